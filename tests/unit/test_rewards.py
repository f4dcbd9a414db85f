"""CLIP-type rewards (docs/method.md section 2): the decomposed score, segments, gradients, presets."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from rewards import decomposed
from rewards.clip import HFClipBackend, clip
from rewards.decomposed import ClipTypeReward, batch_direction, decomposed_score
from rewards.hps import OpenClipBackend, hpsv2
from rewards.pickscore import pickscore
from rewards.tiny import TINY_OPEN_CLIP, tiny_clip, tiny_openclip

COLOURS = "red blue green white black grey pink gold".split()
LONG_PROMPT = (
    "A quiet harbour town at dawn. "
    # One sentence longer than a CLIP window: it must be split further, at its commas.
    + ", ".join(f"a small {c} boat with a striped sail and a wooden mast" for c in COLOURS)
    + ". Gulls circle above the fishing nets! Is the lighthouse still lit?"
)
PROMPTS = ["A red cube on a table. A blue ball beside it.", LONG_PROMPT, ""]


def images(n=len(PROMPTS), size=(48, 64), seed=0):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def embeddings(seed=0, b=4, d=16):
    g = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    t = F.normalize(torch.randn(b, d, generator=g), dim=-1) + 0.5  # a shared component, as real t have
    return f, t, F.normalize(torch.randn(d, generator=g), dim=0)


# --- the decomposition, as a pure function ---------------------------------------------


def test_weight_one_is_the_plain_score_and_parts_add_up():
    f, t, v = embeddings()
    total, relevant, irrelevant = decomposed_score(f, t, v, 1.0)
    torch.testing.assert_close(total, (f * t).sum(-1))
    for w in (0.0, 0.3, 2.0):
        total, relevant, irrelevant = decomposed_score(f, t, v, w)
        torch.testing.assert_close(total, relevant + w * irrelevant)
    total, relevant, _ = decomposed_score(f, t, v, 0.0)
    torch.testing.assert_close(total, relevant)


def test_parts_depend_on_the_right_components():
    f, t, v = embeddings()
    _, relevant, irrelevant = decomposed_score(f, t, v, 0.3)
    # Moving the image along v changes only the text-irrelevant part.
    _, relevant_moved, irrelevant_moved = decomposed_score(f + 0.7 * v, t, v, 0.3)
    torch.testing.assert_close(relevant_moved, relevant)
    assert not torch.allclose(irrelevant_moved, irrelevant)
    # Changing the text orthogonally to v changes only the text-relevant part.
    u = torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    u = u - (u @ v)[:, None] * v
    _, relevant_moved, irrelevant_moved = decomposed_score(f, t + u, v, 0.3)
    torch.testing.assert_close(irrelevant_moved, irrelevant)
    assert not torch.allclose(relevant_moved, relevant)


def test_batch_direction_is_the_unit_mean():
    _, t, _ = embeddings()
    v = batch_direction(t.sum(0))
    torch.testing.assert_close(v.norm(), torch.tensor(1.0))
    torch.testing.assert_close(v, F.normalize(t.mean(0), dim=0))


def test_a_reward_never_communicates_and_takes_the_global_batch_direction_it_is_handed(monkeypatch):
    """No hidden collective (issue 23, item 4): under a process group the reward calls no
    torch.distributed function; the caller adds up every worker's batch_statistics (here two
    workers' prompts) and hands the sum in, which gives the direction of the whole batch."""
    from longalign_rl.registry import get_reward
    from longalign_rl.scoring import batch_statistics, score

    def forbidden(*args, **kwargs):
        raise AssertionError("the reward called a collective")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for name in ("all_reduce", "all_gather", "broadcast", "barrier"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    reward = get_reward("tiny_clip")
    mine, theirs = ["a red cube. a blue ball.", "a green square."], ["two yellow stars.", "a cat.", "a dog."]
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    summed = {k: batch_statistics(reward, mine)[k] + batch_statistics(reward, theirs)[k] for k in ("text_sum",)}
    out, finite = score(reward, images[:2], mine, summed)
    whole = reward(images, mine + theirs)  # one call over the whole batch: its own direction
    torch.testing.assert_close(out.total, whole.total[:2])
    assert bool(finite.all())
    alone = reward(images[:2], mine)  # without statistics: this call's own batch
    assert not torch.allclose(alone.total, out.total)
    weighted = get_reward("weighted_sum", rewards=[{"name": "tiny_clip", "weight": 2.0}, {"name": "tiny_clip"}])
    stats = batch_statistics(weighted, mine)
    assert sorted(stats) == ["0/text_sum", "1/text_sum"]
    both = {k: v + batch_statistics(weighted, theirs)[k] for k, v in stats.items()}
    torch.testing.assert_close(weighted(images[:2], mine, statistics=both).total, 3 * whole.total[:2])


# --- the tiny CLIP-type rewards ------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny_clip", "tiny_openclip"])
def factory(request):
    return {"tiny_clip": tiny_clip, "tiny_openclip": tiny_openclip}[request.param]


def test_reward_outputs_are_consistent(factory):
    w = 0.3
    out = factory(text_irrelevant_weight=w)(images(), PROMPTS)
    assert out.total.shape == (3,) and set(out.components) == {"text_relevant", "text_irrelevant", "score"}
    parts = out.components
    torch.testing.assert_close(out.total.detach(), parts["text_relevant"] + w * parts["text_irrelevant"])
    torch.testing.assert_close(parts["score"], parts["text_relevant"] + parts["text_irrelevant"])
    plain = factory(text_irrelevant_weight=1.0)(images(), PROMPTS)
    torch.testing.assert_close(plain.total.detach(), parts["score"])


def test_long_prompts_give_one_score_per_segment(factory):
    reward = factory()
    assert max(reward.backend.count_tokens(s) for s in LONG_PROMPT.split(".")) > 77
    segments = [reward.segments(p) for p in PROMPTS]
    assert len(segments[2]) == 1 and len(segments[1]) > 2  # "" is one segment
    assert "".join(segments[1]).replace(" ", "") == LONG_PROMPT.replace(" ", "")  # no text lost

    out = reward(images(), PROMPTS)
    assert [s.shape for s in out.segment_scores] == [(len(s),) for s in segments]
    # With mean pooling, f·t is the mean of the per-segment scores f·t_i ...
    torch.testing.assert_close(out.components["score"], torch.stack([s.mean() for s in out.segment_scores]))
    # ... and f·t_i is the score of the segment alone.
    alone = reward(images()[1:2].expand(len(segments[1]), -1, -1, -1), segments[1])
    torch.testing.assert_close(out.segment_scores[1], alone.components["score"])


def test_segment_pooling(factory):
    mean = factory().text_embeddings(PROMPTS)
    renorm = factory(segment_pooling="mean_renorm").text_embeddings(PROMPTS)
    assert mean[1].norm() < 0.999  # the mean of several unit vectors is shorter than 1
    torch.testing.assert_close(renorm.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(renorm, F.normalize(mean, dim=-1))


def test_gradient_reaches_the_images_not_the_reward_model(factory):
    reward = factory()
    pixels = images().requires_grad_()
    reward(pixels, PROMPTS).total.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())
    assert not reward.train().backend.training  # frozen in eval mode whatever its owner does


def test_images_of_any_size_are_resized_to_the_model(factory):
    backend = factory().backend
    for size in [(32, 32), (48, 64), (100, 30), (16, 16)]:
        assert backend.preprocess(torch.rand(2, 3, *size)).shape == (2, 3, 32, 32)


def test_same_seed_same_model_and_global_rng_untouched(factory):
    state = torch.get_rng_state()
    a, b, c = factory(seed=0), factory(seed=0), factory(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    x = images()
    torch.testing.assert_close(a(x, PROMPTS).total, b(x, PROMPTS).total)
    assert not torch.allclose(a(x, PROMPTS).total, c(x, PROMPTS).total)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"text_irrelevant_weight": "0.3"}, "text_irrelevant_weight must be a number"),
        ({"text_irrelevant_weight": float("nan")}, r"text_irrelevant_weight must be in \[0, 1\]"),
        ({"text_irrelevant_weight": 1.5}, r"text_irrelevant_weight must be in \[0, 1\]"),
        ({"text_irrelevant_weight": -0.5}, r"text_irrelevant_weight must be in \[0, 1\]"),
        ({"direction": "sideways"}, "direction must be one of"),
        ({"direction": "corpus"}, "direction_path is required"),
        ({"direction_path": "v.safetensors"}, "direction_path is only used with direction='corpus'"),
        ({"segment_pooling": "max"}, "segment_pooling must be one of"),
    ],
)
def test_bad_kwargs_name_the_keyword(kwargs, error):
    with pytest.raises((TypeError, ValueError), match=error):
        tiny_openclip(**kwargs)


def test_mismatched_batch_is_an_error():
    with pytest.raises(ValueError, match="got 3 images but 2 prompts"):
        tiny_openclip()(images(), PROMPTS[:2])


# --- presets load real-format weights ------------------------------------------------------


def test_clip_and_pickscore_load_saved_transformers_weights(tmp_path):
    from transformers import CLIPImageProcessor

    tiny = tiny_clip(seed=3)
    model_dir, processor_dir = tmp_path / "model", tmp_path / "processor"
    tiny.backend.model.save_pretrained(model_dir)
    for folder in (model_dir, processor_dir):
        build_clip_tokenizer().save_pretrained(folder)
    # Pixel statistics that differ from OpenAI's, to see that they are read.
    CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(model_dir)

    x = images()
    loaded = clip(model=str(model_dir))
    torch.testing.assert_close(loaded.backend.image_mean, torch.full((3,), 0.5))
    same_weights = ClipTypeReward(HFClipBackend(tiny.backend.model, build_clip_tokenizer(), [0.5] * 3, [0.25] * 3))
    torch.testing.assert_close(loaded(x, PROMPTS).total, same_weights(x, PROMPTS).total)

    # PickScore: weights from one folder, tokenizer from another that has no pixel
    # statistics, so OpenAI's are used, as in tiny_clip.
    loaded = pickscore(model=str(model_dir), processor=str(processor_dir))
    torch.testing.assert_close(loaded.backend.image_mean, tiny.backend.image_mean)
    torch.testing.assert_close(loaded(x, PROMPTS).total, tiny(x, PROMPTS).total)


def test_clip_refuses_a_folder_without_a_real_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    tiny_clip().backend.model.save_pretrained(tmp_path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not CLIP's 49408"):
        clip(model=str(tmp_path))


def test_hpsv2_loads_a_module_prefixed_checkpoint(tmp_path):
    arch = "tiny-hps-test"
    (tmp_path / f"{arch}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    model = open_clip.create_model(arch)
    checkpoint = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, checkpoint)

    torch.manual_seed(123)  # a different random init inside hpsv2, so only loading can match
    loaded = hpsv2(checkpoint=str(checkpoint), arch=arch)
    same_weights = ClipTypeReward(OpenClipBackend(model, open_clip.get_tokenizer(arch)))
    x = images()
    torch.testing.assert_close(loaded(x, PROMPTS).total, same_weights(x, PROMPTS).total)
    with pytest.raises(FileNotFoundError, match="neither a file nor 'repo_id:filename'"):
        hpsv2(checkpoint=str(tmp_path / "missing.pt"), arch=arch)


@pytest.mark.parametrize("build, message", [
    (lambda: clip(model="nosuchorg/nosuch-clip"), "reward.kwargs.model: 'nosuchorg/nosuch-clip' is not a local folder"),
    (lambda: pickscore(model="nosuchorg/nosuch-pick", processor="nosuchorg/nosuch-proc"),
     "reward.kwargs.model: 'nosuchorg/nosuch-pick' is not a local folder"),
    (lambda: hpsv2(checkpoint="nosuchorg/nosuch-hps:HPS_v2_compressed.pt"),
     "reward.kwargs.checkpoint: 'nosuchorg/nosuch-hps' is not a local folder, not in the hub cache"),
])
def test_a_reward_model_the_hub_cannot_serve_is_named_at_once(build, message):
    """No network here, as on many clusters: one request to the hub, not retries per file."""
    with pytest.raises(ValueError, match=message):
        build()


def test_a_reward_folder_without_weights_names_it(tmp_path):
    build_clip_tokenizer().save_pretrained(tmp_path)  # a tokenizer, but no CLIPModel
    with pytest.raises(ValueError, match=r"cannot be loaded as a CLIP model \(reward.kwargs.model\) \(a local folder\)"):
        clip(model=str(tmp_path))


def test_no_module_level_model_cache():
    assert tiny_clip().backend.model is not tiny_clip().backend.model
    assert not any(isinstance(v, torch.nn.Module) for v in vars(decomposed).values())
