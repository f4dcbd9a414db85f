"""Paper-exact mode (issue 13): `prompts.split: reference` cuts prompts as the reference
code does, and the encoding of those segments is the reference's merge; in the default
mode (`sentences`) each documented difference from it holds. `sampler.final: pred_x0` (what
the reference decodes) is checked against the full chain in test_replay.py.

The oracle below is written from the documented behaviour (docs/method.md 1.1, issue 13): the
reference's pattern splits at ".", "?" and the literal sequences '"!' and ';"', keeps every
non-empty piece (whitespace-only ones too) with "." appended, and falls back to the whole
caption; the CLIP tokenizer then truncates every piece at 77 tokens."""

import re

import pytest
import torch

from longalign_rl.config import REFERENCE_LORA_TARGETS, ConfigError, load_config
from longalign_rl.encoding import SegmentEncoder, encode_prompts, split_segments
from longalign_rl.encoding.encode import pad_vector
from longalign_rl.encoding.segments import split_reference
from longalign_rl.encoding.tokenizer import token_counter
from longalign_rl.models import load_components

LONG = ("A very long sentence with " + ", ".join(f"a small wooden toy number {i}" for i in range(20))
        + " and a red ball at the end")
PROMPTS = [
    "A tower 3.5 m tall. Is it red? It is!",
    "First; second; third.\nA new line here",
    "Dr. Smith walks a dog, e.g. a beagle, at 5 p.m. today.",
    "A cat on a mat.   ",
    "She shouted \"retry!\". Then 'retry!'. Then ok;\" done",
    "A.  . B?",
    LONG + ". A short one.",
    "",
    ".",
    "no delimiter at all",
]


def oracle_split(caption: str) -> list[str]:
    pieces = [p + "." for p in re.split(r'"!|\.|\?|;"', caption) if len(p) > 0]
    return pieces or [caption]


@pytest.fixture(scope="module")
def tiny():
    return load_components("tiny")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reference_split_equals_the_documented_rule(prompt):
    assert split_reference(prompt) == oracle_split(prompt)


def test_reference_split_quirks_are_kept():
    assert split_reference("A tower 3.5 m tall.") == ["A tower 3.", "5 m tall."]  # inside a number
    assert split_reference("A.  . B?") == ["A.", "  .", " B."]  # a whitespace-only piece stays
    assert split_reference("Go! Stop; now") == ["Go! Stop; now."]  # ! and ; alone do not split
    assert split_reference('say "!x" a;" b') == ["say .", 'x" a.', " b."]  # the literal '"!' and ';"' do
    assert split_reference(".") == ["."] and split_reference("") == [""]


def reference_encoding(prompts, tokenizer, text_encoder, max_tokens, tokenize=None):
    """The merge as documented: every piece through CLIP (77 tokens, truncated), the states
    whose token is neither padding nor <eot>, concatenated, cut or padded with the mean state
    of positions 17..76 of the empty prompt. `tokenize`: pieces -> [N, 77] ids, by default
    `tokenizer`'s."""
    pad = pad_vector(tokenizer, text_encoder)
    rows = []
    for prompt in prompts:
        ids = tokenizer(oracle_split(prompt), max_length=77, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids if tokenize is None else tokenize(oracle_split(prompt))
        states = text_encoder(ids)[0]
        keep = (ids != tokenizer.pad_token_id) & (ids != tokenizer.eos_token_id)
        merged = states.reshape(-1, states.shape[-1])[keep.reshape(-1)][:max_tokens]
        rows.append(torch.cat([merged, pad.expand(max_tokens - len(merged), -1)]))
    return torch.stack(rows)


@torch.no_grad()
def test_reference_mode_encodes_as_the_reference(tiny):
    got = encode_prompts(PROMPTS, tiny.tokenizer, tiny.text_encoder, max_tokens=160, split="reference")
    expected = reference_encoding(PROMPTS, tiny.tokenizer, tiny.text_encoder, 160)
    assert torch.equal(got, expected)
    encoder = SegmentEncoder(tiny.tokenizer, tiny.text_encoder, max_tokens=160, split="reference")
    assert torch.equal(encoder(PROMPTS), got) and encoder.segments(PROMPTS[0]) == oracle_split(PROMPTS[0])


def test_the_default_split_differs_where_documented(tiny):
    count = token_counter(tiny.tokenizer)

    def default(text):
        return split_segments(text, count)

    # no split inside a number; the punctuation is kept, no "." is appended
    assert default("A tower 3.5 m tall. Is it red? It is!") == ["A tower 3.5 m tall.", "Is it red?", "It is!"]
    # ! ; and newlines end sentences
    assert default("First; second!\nthird") == ["First;", "second!", "third"]
    # whitespace-only and punctuation-only pieces are dropped, pieces are stripped
    assert default("A.  . B?") == ["A.", "B?"] and default("A cat on a mat.   ") == ["A cat on a mat."]
    # an over-long sentence loses nothing: split at commas, every word kept
    pieces = default(LONG + ".")
    assert len(pieces) > 1 and all(count(p) <= 75 for p in pieces)
    assert " ".join(pieces).split() == (LONG + ".").split()
    # ... while the reference's one piece is cut by the tokenizer: the tail is lost
    (piece,) = split_reference(LONG)
    assert count(piece) > 75
    kept = tiny.tokenizer(piece, max_length=77, truncation=True).input_ids[1:-1]
    assert "ball" not in tiny.tokenizer.decode(kept)


@torch.no_grad()
def test_the_two_modes_encode_differently_and_the_config_key_is_checked(tiny):
    prompt = ["A tower 3.5 m tall. Is it red? It is!"]
    a = encode_prompts(prompt, tiny.tokenizer, tiny.text_encoder, max_tokens=64)
    b = encode_prompts(prompt, tiny.tokenizer, tiny.text_encoder, max_tokens=64, split="reference")
    assert (a - b).abs().max() > 1e-3
    assert load_config(None, ["prompts.split=reference"]).prompts.split == "reference"
    with pytest.raises(ConfigError, match="prompts.split"):
        load_config(None, ["prompts.split=words"])
    with pytest.raises(ConfigError, match="prompts.pack_segments"):
        load_config(None, ["prompts.split=reference", "prompts.pack_segments=true"])
    with pytest.raises(ValueError, match="split must be one of"):
        SegmentEncoder(tiny.tokenizer, tiny.text_encoder, split="words")


def test_reference_lora_targets_wrap_the_reference_layers_of_sd15():
    """SD v1.5's architecture on the meta device (no weights): the reference's layer list
    gives its 224 LoRA layers and 3.54 M parameters at rank 4, the default 272 and 3.99 M."""
    from diffusers import UNet2DConditionModel

    from longalign_rl.config import REFERENCE_LORA_TARGETS, LoRAConfig
    from longalign_rl.lora import make_trainable
    from longalign_rl.models import _read_config

    def count(targets):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**_read_config("sd15-random", "unet"))
        unet.requires_grad_(False)
        make_trainable(unet, LoRAConfig(rank=4, alpha=4.0, target_modules=targets))
        wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
        return wrapped, sum(p.numel() for p in unet.parameters() if p.requires_grad)

    reference, reference_params = count(REFERENCE_LORA_TARGETS)
    default, default_params = count(LoRAConfig().target_modules)
    assert (len(reference), reference_params) == (224, 3_536_384)
    assert (len(default), default_params) == (272, 3_985_664)
    extra = {n.rsplit(".", 1)[-1] if "ff.net" not in n else "ff.net.2" for n in default - reference}
    assert extra == {"proj_in", "proj_out", "ff.net.2"} and reference < default


def test_pred_x0_mode_is_ddim_whose_last_step_returns_the_predicted_clean_latent(tiny):
    from longalign_rl.models import make_scheduler

    assert load_config(None, ["sampler.final=pred_x0"]).sampler.final == "pred_x0"
    with pytest.raises(ConfigError, match="sampler.final"):
        load_config(None, ["sampler.final=x0"])
    step = make_scheduler(tiny.scheduler_config, timestep_spacing="trailing")
    pred = make_scheduler(tiny.scheduler_config, timestep_spacing="trailing", final="pred_x0")
    for s in (step, pred):
        s.set_timesteps(10)
    x, eps, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), pred.timesteps[-1]
    out = pred.step(eps, t, x, eta=0.0)
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample)
    # the model's own scheduler (set_alpha_to_one false) mixes noise back in at the last step
    assert (step.step(eps, t, x, eta=0.0).prev_sample - out.pred_original_sample).abs().max() > 1e-3
    # every earlier step is the same in both modes
    torch.testing.assert_close(pred.step(eps, pred.timesteps[3], x, eta=0.0).prev_sample,
                               step.step(eps, step.timesteps[3], x, eta=0.0).prev_sample)


# Every key that tells the paper-exact mode from the default (docs/reference_mode.md), with
# the reference's value; the reward's kwargs separately (their preset differs by size).
REFERENCE_KEYS = {
    ("prompts", "split"): "reference",
    ("prompts", "clean_text"): True,
    ("lora", "target_modules"): tuple(REFERENCE_LORA_TARGETS),
    ("lora", "dropout"): 0.1,
    ("train", "warmup_from_zero"): True,
}
STAGE1_KEYS = {
    ("data", "resize"): "bilinear",
}
STAGE2_KEYS = {
    ("sampler", "final"): "pred_x0",
    ("sampler", "train_mode"): True,
    ("train", "max_policy_lag"): 0,
}
REWARD_KWARGS = {"split": "reference", "crop": "reference", "text_irrelevant_weight": 0.3, "direction": "batch"}


@pytest.mark.parametrize("name,stage,full", [
    ("longalign_reference_stage1.yaml", 1, True), ("longalign_reference.yaml", 2, True),
    ("tiny_reference_stage1.yaml", 1, False), ("tiny_reference.yaml", 2, False)])
def test_the_paper_exact_configs_select_every_reference_choice(name, stage, full):
    """The SD v1.5 configs and their tiny twins (run end to end in
    tests/e2e/test_reference_mode.py) set the same reference choices; only sizes differ."""
    cfg = load_config(f"configs/{name}")
    assert cfg.stage == stage
    for (section, key), value in {**REFERENCE_KEYS, **(STAGE2_KEYS if stage == 2 else STAGE1_KEYS)}.items():
        assert getattr(getattr(cfg, section), key) == value, f"{name}: {section}.{key}"
    assert cfg.t5.encoder == ("google-t5/t5-large" if full else "tiny")
    assert cfg.lora.alpha == cfg.lora.rank  # the reference's LoRA scale is 1
    if full:
        assert (cfg.prompts.max_tokens, cfg.t5.max_tokens, cfg.t5.adapter_dim, cfg.lora.rank) == (240, 240, 896, 32)
    if stage == 2:
        assert cfg.reward.name == ("denscore" if full else "tiny_clip")
        assert {k: cfg.reward.kwargs[k] for k in REWARD_KWARGS} == REWARD_KWARGS
        assert cfg.t5.adapter == ""  # stage 1's model folder's text_adapter/
    elif full:
        assert cfg.global_batch == 192 and cfg.t5.adapter_lr == cfg.train.lr == 3e-5


# --- issue 23: the warm-up, the tokenizer's text cleaning ------------------------------------


def test_warmup_from_zero_runs_the_first_update_at_lr_0_as_the_references_schedule():
    """The reference's LambdaLR (diffusers' constant_with_warmup) multiplies lr by step / warmup
    with step 0 at the first update; the default starts one step further on."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    from longalign_rl.training.engine import make_schedule

    def lrs(make):  # the lr each of 6 updates runs at, and whether the first moved the weight
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([weight], lr=0.1, weight_decay=1e-2)
        schedule, seen = make(optimizer), []
        for update in range(6):
            seen.append(optimizer.param_groups[0]["lr"])
            weight.grad = torch.ones(3)
            optimizer.step()
            schedule.step()
            if update == 0:
                moved = not torch.equal(weight.detach(), torch.ones(3))
        return [round(lr, 12) for lr in seen], moved

    reference = load_config(None, ["train.warmup_steps=4", "train.warmup_from_zero=true"])
    default = load_config(None, ["train.warmup_steps=4"])
    assert default.train.warmup_from_zero is False
    ours, moved = lrs(lambda o: make_schedule(reference, o))
    theirs, _ = lrs(lambda o: get_constant_schedule_with_warmup(o, num_warmup_steps=4))
    assert ours == theirs == [0.0, 0.025, 0.05, 0.075, 0.1, 0.1] and not moved
    ours, moved = lrs(lambda o: make_schedule(default, o))
    assert ours == [0.025, 0.05, 0.075, 0.1, 0.1, 0.1] and moved  # unchanged
    with pytest.raises(ConfigError, match="train.warmup_from_zero"):
        load_config(None, ["train.warmup_from_zero=1"])


# Double spaces, a newline inside a sentence, an HTML entity, mojibake (UTF-8 read as
# Latin-1) and curly quotes.
DIRTY = "Salt &amp; pepper  on a\ntable. A caf\u00c3\u00a9 sign says \u201copen\u201d?   "


def openai_ids(pieces):
    """The oracle: OpenAI's CLIP tokenizer as open_clip ships it (ftfy, HTML unescaping,
    whitespace cleaning, lower case, the same BPE), 75 word tokens at most, padded to 77."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    sot, eot = simple.sot_token_id, simple.eot_token_id
    rows = [[sot, *simple.encode(piece)[:75], eot] for piece in pieces]
    return torch.tensor([row + [eot] * (77 - len(row)) for row in rows])


@torch.no_grad()
def test_clean_text_tokenises_every_segment_as_the_references_clip_tokenizer(tiny):
    from longalign_rl.encoding.tokenizer import clip_clean

    pieces = oracle_split(DIRTY)
    raw = tiny.tokenizer(pieces, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    clean = tiny.tokenizer([clip_clean(p) for p in pieces], max_length=77, padding="max_length", truncation=True,
                           return_tensors="pt").input_ids
    assert torch.equal(clean, openai_ids(pieces))
    assert not torch.equal(raw, clean)  # transformers 5's tokenizer alone: &amp; and the mojibake stay
    assert clip_clean(DIRTY) == 'Salt & pepper on a table. A caf\u00e9 sign says "open"?'
    # whitespace alone changes no token: transformers 5 already collapses it
    assert tiny.tokenizer("a  red\ncat ").input_ids == tiny.tokenizer("a red cat").input_ids

    encoder = SegmentEncoder(tiny.tokenizer, tiny.text_encoder, max_tokens=64, split="reference", clean_text=True)
    expected = reference_encoding([DIRTY], tiny.tokenizer, tiny.text_encoder, 64, tokenize=openai_ids)
    assert torch.equal(encoder([DIRTY]), expected)
    assert encoder.segments(DIRTY) == [clip_clean(p) for p in pieces]
    default = encode_prompts([DIRTY], tiny.tokenizer, tiny.text_encoder, max_tokens=64, split="reference")
    assert torch.equal(default, reference_encoding([DIRTY], tiny.tokenizer, tiny.text_encoder, 64))  # unchanged
    assert (default - expected).abs().max() > 1e-3
    # with the default split too, each segment is cleaned after the split (so the ";" of
    # "&amp;" has ended a sentence first)
    assert SegmentEncoder(tiny.tokenizer, tiny.text_encoder, clean_text=True).segments(DIRTY) == [
        "Salt &", "pepper on a", "table.", 'A caf\u00e9 sign says "open"?']
    with pytest.raises(ConfigError, match="prompts.clean_text"):
        load_config(None, ["prompts.clean_text=yes please"])
