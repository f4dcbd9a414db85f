"""The shipped ShapesWorld models and how the world plugs into the framework: the plain
77-token encoder, the ground-truth statistics and metric hook, the shipped weights loaded
by name through the models entry points, and the prompt and pair sources by import path.
(The scripts that make the models run in tests/e2e/test_shapesworld_scripts.py.)"""

import json

import numpy as np
import pytest
import torch

from longalign_rl.encoding import SegmentEncoder, TruncatedEncoder
from longalign_rl.models import MODELS, load_components, vae_scale_factor
from longalign_rl.prompts import load_prompts
from shapesworld import WorldConfig, make_dataset, parse_caption, to_tensor
from shapesworld.evaluate import draw_captions, generate, ground_truth, summarize

WORLD = WorldConfig()


@pytest.fixture(scope="module")
def base():
    return load_components("shapesworld")


def test_truncated_encoder_is_sd_plain_encoding(base):
    """77 states per prompt, exactly the text encoder's output on the cut token ids."""
    prompts = draw_captions(WORLD, 3, seed=1)
    encoder = TruncatedEncoder(base.tokenizer, base.text_encoder)
    states = encoder(prompts)
    ids = base.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert states.shape == (3, 77, base.text_encoder.config.hidden_size)
    torch.testing.assert_close(states, base.text_encoder(ids)[0])
    # The prompts are longer than the window: the cut keeps only the first 75 word tokens.
    assert all(len(base.tokenizer(p).input_ids) > 77 for p in prompts)
    assert encoder.uncond(2).shape == (2, 77, states.shape[-1])


def test_ground_truth_of_clean_renders_and_of_a_blank_image():
    data = make_dataset(WORLD, 6, seed=3)
    images = torch.stack([to_tensor(image) for image, _, _ in data])
    prompts = [text for _, text, _ in data]
    stats = ground_truth(images, prompts, WORLD)
    assert set(stats) == {*(f"gt/{a}/{i}" for a in ("colour", "shape") for i in range(1, 5)), "gt/background"}
    assert all(float(v.min()) == 1.0 for v in stats.values())
    blank = summarize(ground_truth(torch.zeros_like(images), prompts, WORLD))
    assert blank["colour"] == [0.0] * 4 and blank["shape"] == [0.0] * 4 and blank["background"] == 1.0
    noisy = summarize(ground_truth(torch.ones_like(images), prompts, WORLD))  # all white
    assert noisy["background"] == 0.0


def test_shipped_models_load_with_their_report():
    assert {"shapesworld", "shapesworld-stage1", "shapesworld-partial"} <= set(MODELS.names())  # a plugin's entry points
    stage1 = load_components("shapesworld-stage1")
    base = load_components("shapesworld")
    assert vae_scale_factor(base.vae) == 4  # 32 px -> 8 x 8 latents
    assert all(p.dtype == torch.float32 for p in stage1.unet.parameters())
    # Stage 1 changed the UNet and nothing else.
    diff = sum(float((a - b).abs().sum()) for a, b in zip(base.unet.parameters(), stage1.unet.parameters()))
    assert diff > 0
    torch.testing.assert_close(next(base.vae.parameters()), next(stage1.vae.parameters()))
    from shapesworld.plugin import WEIGHTS_DIR

    report = json.loads((WEIGHTS_DIR / "shapesworld" / "report.json").read_text())
    assert report["quick"] is False and report["eval"]["shapesworld"]["truncated"]["colour"]


def test_shipped_base_draws_the_cells_its_77_tokens_name(base):
    """The base was pretrained on truncated captions: it draws the first two cells' colours
    far above chance (1/7), on held-out captions, in a handful of DDIM steps."""
    prompts = draw_captions(WORLD, 24, seed=777)
    images = generate(base, TruncatedEncoder(base.tokenizer, base.text_encoder), prompts, seed=0, num_steps=10,
                      resolution=32)
    assert images.shape == (24, 3, 32, 32)
    acc = summarize(ground_truth(images, prompts, WORLD))
    assert np.mean(acc["colour"][:2]) > 0.5, acc


def test_segment_encoding_of_the_shipped_base_fits_its_unet(base):
    encoder = SegmentEncoder(base.tokenizer, base.text_encoder, max_tokens=120)
    cond = encoder(draw_captions(WORLD, 2, seed=5))
    out = base.unet(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=cond).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_shapesworld_prompt_source_by_import_path():
    prompts = load_prompts("shapesworld.plugin:captions")
    assert len(prompts) == 4096 and prompts == load_prompts("shapesworld.plugin:captions")
    assert all(parse_caption(p, WORLD) for p in prompts[:20])


def test_ground_truth_metric_hook_through_the_framework():
    """run.metrics: the hook loads by import path and returns one [B] tensor per name."""
    from longalign_rl.hooks import load_metric_hooks, run_metric_hooks

    scenes = make_dataset(WORLD, 3, seed=4)
    images = torch.stack([to_tensor(image) for image, _, _ in scenes])
    prompts = [caption for _, caption, _ in scenes]
    stats = run_metric_hooks(load_metric_hooks(["shapesworld.plugin:ground_truth"]), images, prompts)
    assert set(stats) == {f"gt/{a}/{i}" for a in ("colour", "shape") for i in range(1, 5)} | {"gt/background"}
    assert all(v.shape == (3,) for v in stats.values())
    assert all(float(v.min()) == 1.0 for v in stats.values())  # clean renders: every verdict right


def test_the_partial_stage1_model_leaves_headroom_on_the_late_shapes():
    """shapesworld-partial (the framework's own stage 1): by its report, cells 3-4 have the
    right colours but shapes well short of the full stage-1 model's, and it loads by name."""
    from shapesworld.plugin import WEIGHTS_DIR

    report = json.loads((WEIGHTS_DIR / "shapesworld-partial" / "report.json").read_text())
    segment = report["eval"]["segment"]
    assert min(segment["colour"]) > 0.9 and max(segment["shape"][2:]) < 0.8
    assert report["run_config"]["stage"] == 1 and report["run_config"]["lora"]["enabled"]
    parts = load_components("shapesworld-partial")
    base = load_components("shapesworld")
    assert any(not torch.equal(a, b) for a, b in zip(parts.unet.state_dict().values(), base.unet.state_dict().values()))
    torch.testing.assert_close(next(parts.vae.parameters()), next(base.vae.parameters()))


def test_the_shipped_flow_model_is_sd3_without_t5_and_cut_at_77_tokens():
    """shapesworld-flow (shapesworld/pretrain_flow.py): an SD3 transformer on the base's VAE
    and text encoder, no T5, loaded by name; by its report it draws cells 1-2 (colours far
    above chance 1/7) and not cells 3-4, whose words are past its 77 tokens; and the sampler
    draws the first cells' colours on held-out captions through the framework."""
    from shapesworld.evaluate import make_encoder
    from shapesworld.plugin import WEIGHTS_DIR

    assert {"shapesworld-flow", "shapesworld-flow-partial"} <= set(MODELS.names())
    flow = load_components("shapesworld-flow")
    assert flow.family.name == "sd3" and flow.text_encoder_3 is None and type(flow.unet).__name__ == "SD3Transformer2DModel"
    torch.testing.assert_close(next(flow.vae.parameters()), next(load_components("shapesworld").vae.parameters()))
    report = json.loads((WEIGHTS_DIR / "shapesworld-flow" / "report.json").read_text())
    truncated = report["eval"]["truncated"]
    assert report["quick"] is False and min(truncated["colour"][:2]) > 0.9 and max(truncated["colour"][2:]) < 0.3
    prompts = draw_captions(WORLD, 16, seed=777)
    images = generate(flow, make_encoder(flow, "truncated"), prompts, seed=0, num_steps=10, resolution=32)
    acc = summarize(ground_truth(images, prompts, WORLD))
    assert np.mean(acc["colour"][:2]) > 0.6, acc


def test_the_flow_partial_model_leaves_headroom_on_the_late_shapes():
    """shapesworld-flow-partial (the framework's stage 1 of the flow model, stopped at 160 of
    its config's 256 steps): by its report the first cells are right and the late shapes
    have headroom; it loads by name, its transformer changed and nothing else."""
    from shapesworld.plugin import WEIGHTS_DIR

    report = json.loads((WEIGHTS_DIR / "shapesworld-flow-partial" / "report.json").read_text())
    segment, truncated = report["eval"]["segment"], report["eval"]["truncated"]
    assert min(segment["colour"][:2]) > 0.9 and np.mean(segment["shape"][2:]) < 0.75
    assert np.mean(segment["colour"][2:]) > np.mean(truncated["colour"][2:]) + 0.3  # stage 1 reached cells 3-4
    run = report["run_config"]
    assert run["stage"] == 1 and run["model"]["pretrained"] == "shapesworld-flow" and run["lora"]["enabled"]
    parts, base = load_components("shapesworld-flow-partial"), load_components("shapesworld-flow")
    assert parts.family.name == "sd3" and parts.text_encoder_3 is None
    assert any(not torch.equal(a, b) for a, b in zip(parts.unet.state_dict().values(), base.unet.state_dict().values()))
    for a, b in ((parts.vae, base.vae), (parts.text_encoder_2, base.text_encoder_2)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
