"""Segment-level encoding of long prompts (docs/method.md section 1): splitting, the offline CLIP
tokenizer, merging per-segment hidden states, the pad vector, the unconditional embedding,
and the merged tensor as a diffusers pipeline's prompt_embeds."""

import logging

import pytest
import torch

from longalign_rl.encoding import SegmentEncoder, encode_prompts, pad_vector, split_segments, split_sentences
from longalign_rl.encoding.tokenizer import token_counter
from longalign_rl.encoding.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer, check_clip_tokenizer

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def count(tiny_parts):
    return token_counter(tiny_parts.tokenizer)


@pytest.fixture(scope="module")
def encoder(tiny_parts):
    return SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=240)


def nonspace(text: str) -> str:
    return "".join(text.split())


def assert_fits_and_keeps_text(segments, text, count):
    assert segments, "no segments"
    assert all(segment == segment.strip() and segment for segment in segments), segments
    assert max(count(s) for s in segments) <= 75, [count(s) for s in segments]
    assert "".join(nonspace(s) for s in segments) == nonspace(text)


# ------------------------------------------------------------------------- splitting


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A red cube. A blue ball! Is it big? Yes; it is", ["A red cube.", "A blue ball!", "Is it big?", "Yes;", "it is"]),
        ("first line\nsecond line\n\nthird", ["first line", "second line", "third"]),
        ("It costs 3.5 dollars. Then 10.25 more.", ["It costs 3.5 dollars.", "Then 10.25 more."]),
        ("Pi is about 3.14159 and e is 2.718", ["Pi is about 3.14159 and e is 2.718"]),
        ("I have 3. You have 4.", ["I have 3.", "You have 4."]),  # a number ending a sentence
        ("Wait... what?! Fine;; ok", ["Wait...", "what?!", "Fine;;", "ok"]),  # runs stay together
        ("  padded sentence.   another one  ", ["padded sentence.", "another one"]),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t\n", "...", " . ! ? ; ", "?!\n;\n..."])
def test_blank_or_punctuation_only_text_gives_no_segments(text, count):
    assert split_sentences(text) == []
    assert split_segments(text, count) == []


def test_empty_and_punctuation_only_pieces_are_dropped():
    assert split_sentences("A cat.  . ! \n\n ; A dog.\n \t \n") == ["A cat.", "A dog."]


@pytest.mark.parametrize("ws", [" ", "\t", "\r", "\r\n"])
def test_ascii_whitespace_only_pieces_are_dropped(ws):
    assert split_sentences(f"A cat.{ws}") == ["A cat."]
    assert split_sentences(f"A cat.{ws}{ws}.{ws}A dog.") == ["A cat.", "A dog."]


@pytest.mark.parametrize("ws", ["\u00a0", "\u3000", "\u2003", "\x0b", "\x0c"])
def test_unicode_whitespace_only_pieces_are_dropped(ws):
    """BUG (currently fails): the filter strips only ' \\t\\r\\n.!?;' but the kept piece is
    str.strip()-ed, so a piece of non-ASCII whitespace (a no-break space after the last
    sentence, as text pasted from a web page has) becomes an empty segment ''."""
    assert split_sentences(f"A cat.{ws}") == ["A cat."]
    assert "" not in split_sentences(f"A cat.{ws}A dog.{ws}")


def test_empty_prompt_gives_no_segments(count):
    assert split_segments("", count) == []


def test_short_prompt_is_one_segment_per_sentence(count):
    text = "A red cube on a table. A blue ball beside it."
    assert split_segments(text, count) == ["A red cube on a table.", "A blue ball beside it."]


def test_long_sentence_is_split_at_commas(count):
    clauses = [f"a {c} {a} standing near the {p}" for c, a, p in zip(
        ["red", "blue", "green", "yellow", "white", "black", "grey", "pink", "brown", "orange", "violet", "golden"],
        ["horse", "dog", "cat", "cow", "goat", "sheep", "duck", "goose", "fox", "deer", "owl", "hare"],
        ["barn", "gate", "well", "fence", "river", "tree", "road", "wall", "bridge", "pond", "hill", "mill"])]
    sentence = ", ".join(clauses) + "."
    assert count(sentence) > 75
    segments = split_segments(sentence, count)
    assert len(segments) >= 2
    assert_fits_and_keeps_text(segments, sentence, count)
    # every piece but the last ends at a comma: the cut was made at clause boundaries
    assert all(s.endswith(",") for s in segments[:-1]), segments
    # short clauses are kept together, not one segment per clause
    assert len(segments) < len(clauses)


def test_long_sentence_without_commas_is_word_wrapped(count):
    words = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old oak tree "
             "near the river bank under a pale blue sky ").split()
    sentence = " ".join(words * 6)
    assert "," not in sentence and count(sentence) > 150
    segments = split_segments(sentence, count)
    assert len(segments) >= 3
    assert_fits_and_keeps_text(segments, sentence, count)
    # whole words, in order: wrapping never cuts a word
    assert " ".join(segments).split() == sentence.split()
    # greedy: each line is full (the next word would not have fitted)
    for line, following in zip(segments, segments[1:]):
        assert count(line + " " + following.split()[0]) > 75


@pytest.mark.parametrize(
    "word",
    [
        "x" * 500,
        "abcdefghij" * 50,
        "a1b2c3d4e5" * 40,
        "é" * 300,
        "😀" * 300,
        "👩\u200d👩\u200d👧\u200d👦" * 60,  # emoji joined by zero-width joiners
        "猫" * 200,
        "İ" * 300,  # lower-cases to two code points
    ],
)
def test_absurdly_long_word_is_chunked(word, count):
    text = f"A word: {word} and then more words."
    assert count(word) > 75
    segments = split_segments(text, count)
    assert len(segments) >= 2
    assert_fits_and_keeps_text(segments, text, count)


def test_word_that_grows_under_unicode_normalisation_is_chunked_to_fit(count):
    """BUG (currently fails): U+1D15E MUSICAL SYMBOL HALF NOTE is a composition exclusion,
    so the tokenizer's normalisation (ftfy / NFC) turns it into two 4-byte code points:
    up to 8 BPE tokens per character, not the 4 that segments._MAX_WORD_CHARS = 18
    assumes. An 18-character chunk then counts 108 tokens; encode_prompts tokenizes it
    with truncation=True at 77, so 33 tokens of text are silently cut (no warning)."""
    word = "\U0001d15e" * 300
    segments = split_segments(word, count)
    assert max(count(s) for s in segments) <= 75, max(count(s) for s in segments)


def test_no_text_is_silently_cut_by_the_encoder(tiny_parts, count):
    """BUG (currently fails), the consequence of the one above: 36 half-note symbols are
    216 word tokens, but only 150 word states (+2 <sot>) reach the merged sequence, with
    no warning, although max_tokens has room for all of them."""
    word = "\U0001d15e" * 36
    enc = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=400)
    segments = enc.segments(word)
    out = enc([word])[0]
    content = (~torch.isclose(out, enc.pad, atol=1e-6).all(dim=1)).sum().item()
    assert content == count(word) + len(segments)


def test_long_text_with_mixed_cases(count):
    long_clause = " ".join(["word"] * 100)
    text = ("Short one. " + long_clause + ", then a comma clause, and another one! "
            + "q" * 400 + "\nA last line with 3.5 kg; done?")
    segments = split_segments(text, count)
    assert_fits_and_keeps_text(segments, text, count)
    assert segments[0] == "Short one."
    assert segments[-2:] == ["A last line with 3.5 kg;", "done?"]


def test_pack_segments_joins_short_sentences_while_they_fit(count):
    text = "A cat. A dog. A bird."
    assert split_segments(text, count) == ["A cat.", "A dog.", "A bird."]
    assert split_segments(text, count, pack_segments=True) == ["A cat. A dog. A bird."]

    sentences = [f"Sentence number {i} tells about a {c} house." for i, c in
                 enumerate(["red", "blue", "green", "white", "black", "small", "big", "old", "new", "tall"] * 2)]
    text = " ".join(sentences)
    packed = split_segments(text, count, pack_segments=True)
    assert 1 < len(packed) < len(sentences)
    assert_fits_and_keeps_text(packed, text, count)
    # sentences stay whole and in order
    assert " ".join(packed) == " ".join(sentences)
    # greedy: the next sentence would not have fitted
    for segment, following in zip(packed, packed[1:]):
        first_sentence = split_sentences(following)[0]
        assert count(segment + " " + first_sentence) > 75


def test_pack_segments_keeps_the_75_token_bound_for_long_sentences(count):
    text = "Tiny. " + " ".join(["long"] * 120) + ". Tiny again."
    packed = split_segments(text, count, pack_segments=True)
    assert_fits_and_keeps_text(packed, text, count)


# ------------------------------------------------------------------------- tokenizer


def test_offline_tokenizer_is_the_real_clip_tokenizer(tiny_parts):
    tok = tiny_parts.tokenizer
    assert len(tok) == CLIP_VOCAB_SIZE == 49408
    assert tok("a red cube").input_ids == [SOT, 320, 736, 11353, EOT]
    assert tok.bos_token_id == SOT and tok.eos_token_id == EOT and tok.pad_token_id == EOT
    assert tok.model_max_length == 77


def test_check_clip_tokenizer_rejects_the_wrong_size():
    tok = build_clip_tokenizer()
    check_clip_tokenizer(tok, "fine")  # does not raise
    tok.add_tokens(["<an-extra-token>"])
    with pytest.raises(ValueError, match=r"my tokenizer has 49409 entries.*49408"):
        check_clip_tokenizer(tok, "my tokenizer")

    class ThreeTokens:
        def __len__(self):
            return 3

    with pytest.raises(ValueError, match="3 entries"):
        check_clip_tokenizer(ThreeTokens(), "a broken download")


def test_token_counter_counts_word_tokens_only(tiny_parts, count):
    assert count("a red cube") == 3
    assert count("") == 0
    long = " ".join(["cube"] * 300)
    assert count(long) == 300  # no truncation at 77


# ------------------------------------------------------------------------- encoding


def encode_segment(tiny_parts, segment):
    """One segment, padded to 77 with <eot>, no attention mask, as SD v1.5's pipeline calls it."""
    ids = tiny_parts.tokenizer(segment, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return tiny_parts.text_encoder(ids)[0][0], ids[0]


def expected_encoding(tiny_parts, segments, pad, max_tokens):
    hidden = pad.shape[0]
    kept = []
    for segment in segments:
        states, ids = encode_segment(tiny_parts, segment)
        n = len(tiny_parts.tokenizer(segment, add_special_tokens=False).input_ids)
        assert ids[0] == SOT and ids[n + 1] == EOT and (ids[n + 1:] == EOT).all()
        kept.append(states[: 1 + n])
    kept = torch.cat(kept)[:max_tokens]
    out = pad.expand(max_tokens, hidden).clone()
    out[: kept.shape[0]] = kept
    return out, kept.shape[0]


PROMPTS = [
    "A red cube on a table. A blue ball beside it! Is the light warm? Yes; very warm.",
    "A green tree in a field at noon",
    "An old library with tall shelves. A spiral staircase of black iron stands in the middle.\n"
    "Light falls through a round window onto a long oak table covered with open books, a brass lamp, "
    "a cup of tea, three candles, a globe, a quill, an hourglass, a pair of spectacles and a map.",
]


def test_pad_vector_is_the_mean_of_positions_17_to_76_of_the_empty_prompt(tiny_parts, encoder):
    ids = torch.tensor([[SOT] + [EOT] * 76])
    with torch.no_grad():
        states = tiny_parts.text_encoder(ids)[0][0]
    expected = states[17:77].mean(0)
    assert expected.shape == (32,)
    torch.testing.assert_close(pad_vector(tiny_parts.tokenizer, tiny_parts.text_encoder), expected)
    torch.testing.assert_close(encoder.pad, expected)
    # not CLIP's own padding state at any one position
    assert not torch.allclose(expected, states[17]) and not torch.allclose(expected, states[76])


def test_output_shape(encoder):
    out = encoder(PROMPTS)
    assert out.shape == (3, 240, 32)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_merge_keeps_sot_and_words_of_each_segment_in_order(tiny_parts, encoder):
    out = encoder(PROMPTS)
    sot_state = encode_segment(tiny_parts, "")[0][0]
    for b, prompt in enumerate(PROMPTS):
        segments = encoder.segments(prompt)
        assert len(segments) >= 1
        expected, length = expected_encoding(tiny_parts, segments, encoder.pad, 240)
        assert length == sum(1 + len(tiny_parts.tokenizer(s, add_special_tokens=False).input_ids) for s in segments)
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)
        # positions after the content are the pad vector
        torch.testing.assert_close(out[b, length:], encoder.pad.expand(240 - length, -1))
        # one <sot> state per segment (the causal mask makes them all equal), at each segment's start
        starts, pos = [], 0
        for s in segments:
            starts.append(pos)
            pos += 1 + len(tiny_parts.tokenizer(s, add_special_tokens=False).input_ids)
        for start in starts:
            torch.testing.assert_close(out[b, start], sot_state)
        is_sot = torch.isclose(out[b], sot_state, atol=1e-6).all(dim=1)
        assert is_sot.sum().item() == len(segments)


def test_merge_drops_eot_and_padding_states(tiny_parts, encoder):
    prompt = "A red cube. A blue ball."
    out = encoder([prompt])[0]
    for segment in ["A red cube.", "A blue ball."]:
        states, ids = encode_segment(tiny_parts, segment)
        eot_at = (ids == EOT).nonzero()[0].item()
        for eot_state in states[eot_at:]:
            assert not torch.isclose(out, eot_state, atol=1e-6).all(dim=1).any()


def test_segment_encoding_differs_from_plain_77_token_encoding(tiny_parts, encoder):
    """A one-sentence prompt's merged encoding equals its 77-token encoding up to <eot>; a
    two-sentence prompt's does not (the second sentence starts again with <sot>)."""
    one = "A red cube on a table."
    states, ids = encode_segment(tiny_parts, one)
    n = len(tiny_parts.tokenizer(one, add_special_tokens=False).input_ids)
    torch.testing.assert_close(encoder([one])[0, : n + 1], states[: n + 1])
    two = "A red cube. A blue ball."
    states, _ = encode_segment(tiny_parts, two)
    n2 = len(tiny_parts.tokenizer(two, add_special_tokens=False).input_ids)
    assert not torch.allclose(encoder([two])[0, : n2 + 1], states[: n2 + 1], atol=1e-4)


def test_batch_rows_are_independent(encoder):
    together = encoder(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(together[b], encoder([prompt])[0], atol=1e-5, rtol=1e-5)


def test_encode_prompts_without_a_cached_pad_equals_the_encoder(tiny_parts, encoder):
    torch.testing.assert_close(encode_prompts(PROMPTS, tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=240),
                               encoder(PROMPTS), atol=1e-5, rtol=1e-5)


def test_pack_segments_changes_the_encoding(tiny_parts):
    packed = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=64, pack_segments=True)
    plain = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=64)
    prompt = "A cat. A dog. A bird."
    assert packed.segments(prompt) == ["A cat. A dog. A bird."]
    expected, _ = expected_encoding(tiny_parts, ["A cat. A dog. A bird."], packed.pad, 64)
    torch.testing.assert_close(packed([prompt])[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(packed([prompt]), plain([prompt]), atol=1e-4)


def test_unconditional_embedding_is_sot_then_pad(tiny_parts, encoder):
    uncond = encoder.uncond(4)
    assert uncond.shape == (4, 240, 32)
    sot_state = encode_segment(tiny_parts, "")[0][0]
    for row in uncond:
        torch.testing.assert_close(row[0], sot_state)
        torch.testing.assert_close(row[1:], encoder.pad.expand(239, -1))
    torch.testing.assert_close(uncond[:1], encoder([""]))
    torch.testing.assert_close(encoder(["   ", "..."]), uncond[:2])  # blank prompts are unconditional


def test_prompt_longer_than_max_tokens_is_truncated_with_a_warning(tiny_parts, count, caplog):
    short = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=30)
    wide = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=400)
    prompt = PROMPTS[2]
    total = sum(1 + count(s) for s in short.segments(prompt))
    assert total > 30
    with caplog.at_level(logging.WARNING, logger="longalign_rl.encoding.encode"):
        caplog.clear()
        out = short([PROMPTS[1], prompt])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # only the long prompt, named by its start (a batch index means nothing in a log)
    message = warnings[0].getMessage()
    assert message.startswith(f"prompt {prompt[:57] + '...'!r}: ") and len(prompt) > 60
    assert f"{total - 30} of its {total}" in message and "max_tokens=30" in message
    torch.testing.assert_close(out[1], wide([prompt])[0, :30], atol=1e-5, rtol=1e-5)


def test_prompt_that_fits_logs_no_warning(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="longalign_rl.encoding.encode"):
        caplog.clear()
        encoder(PROMPTS)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("bad, name", [(5, "int"), (None, "NoneType"), (b"a cat", "bytes"), (["a cat"], "list")])
def test_non_str_prompt_raises_type_error_naming_its_index(encoder, bad, name):
    with pytest.raises(TypeError, match=rf"prompt 2 is a {name}"):
        encoder(["a cat", "a dog", bad])


def test_max_tokens_must_be_positive(tiny_parts):
    with pytest.raises(ValueError, match="max_tokens"):
        encode_prompts(["a cat"], tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=0)


class CallCounter:
    def __init__(self, module):
        self.batch_sizes = []
        self.handle = module.register_forward_hook(lambda mod, args, out: self.batch_sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_all_segments_of_all_prompts_go_into_one_encoder_call(tiny_parts, encoder):
    n_segments = sum(len(encoder.segments(p)) for p in PROMPTS)
    assert n_segments >= 7
    with CallCounter(tiny_parts.text_encoder) as calls:
        encoder(PROMPTS)
    assert calls.batch_sizes == [n_segments]
    # without a cached pad vector: the one batched call plus the pad vector's
    with CallCounter(tiny_parts.text_encoder) as calls:
        encode_prompts(PROMPTS, tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=240)
    assert sorted(calls.batch_sizes) == [1, n_segments]


def test_pad_vector_is_computed_once_per_encoder(tiny_parts):
    with CallCounter(tiny_parts.text_encoder) as calls:
        enc = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=16)
        enc.uncond(3)
        enc.uncond(5)
        enc(["a cat"])
    assert calls.batch_sizes == [1, 1, 1]  # pad vector, uncond (once), the prompt


def test_ten_thousand_token_prompt(tiny_parts, count, caplog):
    sentences = [
        "A fisherman in a yellow coat mends a net on the pier while gulls circle above the boats.",
        "Behind him, a row of narrow houses painted blue, green and pink climbs the hill, their windows glowing",
        " ".join(["stone"] * 90),  # one sentence over 75 tokens, no commas
    ]
    prompt = " ".join(sentences * 77)
    assert 10_000 <= count(prompt) <= 11_000
    segments = split_segments(prompt, count)
    assert_fits_and_keeps_text(segments, prompt, count)
    total = sum(1 + count(s) for s in segments)

    # with room for everything, every state is kept, in one encoder call
    full = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=total + 5)
    with CallCounter(tiny_parts.text_encoder) as calls:
        out = full([prompt, "a short one"])
    assert calls.batch_sizes == [len(segments) + 1]
    assert out.shape == (2, total + 5, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out[0, total:], full.pad.expand(5, -1))
    assert not torch.isclose(out[0, :total], full.pad, atol=1e-6).all(dim=1).any()
    # the first and last segments sit at the two ends of the sequence
    first, _ = expected_encoding(tiny_parts, segments[:1], full.pad, 1 + count(segments[0]))
    last, _ = expected_encoding(tiny_parts, segments[-1:], full.pad, 1 + count(segments[-1]))
    torch.testing.assert_close(out[0, : first.shape[0]], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, total - last.shape[0] : total], last, atol=1e-5, rtol=1e-5)

    # at max_tokens=240 the same prompt is cut, with a warning giving the count
    with caplog.at_level(logging.WARNING, logger="longalign_rl.encoding.encode"):
        cut = encode_prompts([prompt], tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=240, pad=full.pad)
    assert cut.shape == (1, 240, 32)
    assert any(f"{total - 240} of its {total}" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(cut[0], out[0, :240], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- diffusers pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_parts):
    from diffusers import StableDiffusionPipeline

    from longalign_rl.models import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=tiny_parts.vae, text_encoder=tiny_parts.text_encoder, tokenizer=tiny_parts.tokenizer, unet=tiny_parts.unet,
        scheduler=make_scheduler(tiny_parts.scheduler_config, timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_segment_encoding_drives_a_diffusers_pipeline(pipeline, encoder):
    """One call, the same starting noise in every row: rows 0 and 2 (the same prompt) give
    the same image, row 1 (another prompt) a different one."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    cond = encoder(prompts)
    assert cond.shape == (3, 240, 32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(3, -1, -1, -1)
    images = pipeline(
        prompt_embeds=cond, negative_prompt_embeds=encoder.uncond(3), latents=latents.clone(),
        num_inference_steps=2, height=64, width=64, output_type="pt",
    ).images
    assert images.shape == (3, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images[2], images[0], atol=1e-5, rtol=1e-5)
    assert (images[1] - images[0]).abs().max() > 1e-4  # a different prompt gives a different image


def test_a_leading_decimal_point_is_part_of_the_number():
    assert split_sentences("It is .5 m wide. Next") == ["It is .5 m wide.", "Next"]


@pytest.mark.parametrize("split, pack", [("sentences", False), ("sentences", True), ("reference", False)])
def test_encoded_lengths_are_what_the_encoder_keeps_before_cutting(tiny_parts, caplog, split, pack):
    """The driver measures prompt files with encoded_lengths (tokenizer only): each length is
    the one encode_prompts reports when it cuts at max_tokens=1."""
    import re

    from longalign_rl.encoding.encode import encoded_lengths

    words = " ".join(["word"] * 90)
    prompts = [*PROMPTS, "", "   ", f"One over-long sentence of {words}.", "Pi is 3.14. Really? Yes!"]
    lengths = encoded_lengths(prompts, tiny_parts.tokenizer, pack_segments=pack, split=split)
    assert lengths[3] == 1  # empty: its <sot>
    # the long sentence: over one window, or (the reference's rule) cut at its 75th word
    assert lengths[5] > 76 if split == "sentences" else lengths[5] == 76
    with caplog.at_level(logging.WARNING, logger="longalign_rl.encoding.encode"):
        caplog.clear()
        encode_prompts(prompts, tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=1, pack_segments=pack,
                       split=split)
    reported = {}
    for record in caplog.records:
        prompt, total = re.match(r"prompt (.+): \d+ of its (\d+) encoded", record.getMessage()).groups()
        reported[prompt] = int(total)
    expected = {repr(p if len(p) <= 60 else p[:57] + "..."): n for p, n in zip(prompts, lengths) if n > 1}
    assert reported == expected


@torch.no_grad()
def test_split_none_is_the_pipelines_77_token_encoding(tiny_parts, count, caplog):
    """prompts.split: none keeps a prompt whole in one window, which cuts it at 77 tokens:
    at max_tokens 77 exactly the plain encoding (TruncatedEncoder, the pipeline's), its own
    <eot> and padding states included, and the empty prompt's too; the driver counts the
    prompts the window cuts. The baseline a long-prompt run is measured against."""
    from longalign_rl import preflight
    from longalign_rl.config import ConfigError, load_config
    from longalign_rl.encoding import TruncatedEncoder

    prompts = ["A red cube. " * 30, "A red cube on a blue floor.", ""]
    assert count(prompts[0]) > 75 and split_segments(prompts[0], count, split="none") == [prompts[0]]
    plain = TruncatedEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder)
    whole = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=77, split="none")
    assert torch.equal(whole(prompts), plain(prompts)) and torch.equal(whole.uncond(2), plain.uncond(2))
    by_sentence = SegmentEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, max_tokens=77)
    assert not torch.equal(by_sentence(prompts[:1]), plain(prompts[:1]))
    cfg = load_config(None, ["prompts.split=none", "prompts.max_tokens=77"])
    with caplog.at_level(logging.WARNING, logger="longalign_rl"):
        preflight.warn_cut_prompts(cfg, "prompts.source", prompts)
    said = [r.getMessage() for r in caplog.records if r.name == "longalign_rl"]
    assert said == ["prompts.source: 1 of 3 prompts are longer than CLIP's 77-token window and are cut there, as "
                    "the pipelines cut them (prompts.split: none); prompts.split: sentences keeps them whole"]
    with pytest.raises(ConfigError, match="prompts.pack_segments"):
        load_config(None, ["prompts.split=none", "prompts.pack_segments=true"])
