"""Inference (issue 12): `pipeline.load` of a run or a model, matching the training-time
sampler on the same embeddings and noise; `generate` and `evaluate`; the shipped
ShapesWorld models as complete diffusers folders; the LoRA export's alpha. For each model
family (issue 25): a run of configs/tiny.yaml (SD 1.x) and of configs/tiny_sdxl.yaml."""

import json

import pytest
import torch
from safetensors.torch import save_file

from longalign_rl import evaluate, generate
from longalign_rl.config import load_config, to_yaml
from longalign_rl.lora import export_for_diffusers, load_trainable_state_dict, make_trainable, trainable_state_dict
from longalign_rl.models import load_components
from longalign_rl.pipeline import LongPrompts, load
from longalign_rl.prompts import demo_prompts
from longalign_rl.sampling.sampler import build_sampler, generate_latents
from longalign_rl.vae import decode

# alpha != rank: the export must carry the scale (load_lora_weights assumed alpha = rank)
OVERRIDES = ["sampler.num_steps=4", "sampler.guidance_scale=3.0", "prompts.max_tokens=120", "lora.rank=4",
             "lora.alpha=8.0", "sampler.timestep_spacing=leading"]


@pytest.fixture(scope="module", params=["tiny.yaml", "tiny_sdxl.yaml"])
def run_dir(tmp_path_factory, request):
    """A stage-2 run directory as a run leaves it: config.yaml, metrics.jsonl, lora/, a checkpoint."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(f"configs/{request.param}", OVERRIDES)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.1}) + "\n")
    unet = load_components(cfg.model.pretrained).unet
    make_trainable(unet, cfg.lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a LoRA that visibly changes the output
    export_for_diffusers(unet, cfg.lora, run_dir / "lora")
    (run_dir / "checkpoint_000001").mkdir()
    save_file(trainable_state_dict(unet, cfg.lora), run_dir / "checkpoint_000001" / "weights.safetensors")
    return run_dir


def training_sampler(run_dir, trained=True):
    """What the run's sampler actors hold: the base, the trainer's LoRA weights, build_sampler."""
    cfg = load_config(run_dir / "config.yaml")
    parts = load_components(cfg.model.pretrained)
    if trained:
        from safetensors.torch import load_file

        make_trainable(parts.unet, cfg.lora)
        load_trainable_state_dict(parts.unet, load_file(run_dir / "checkpoint_000001" / "weights.safetensors"), cfg.lora)
    return build_sampler(cfg.sampler, parts, prompts=cfg.prompts), parts


def test_load_matches_the_training_time_sampler_on_the_same_embeddings_and_noise(run_dir):
    prompts, seeds = demo_prompts()[:3], [5, 6, 7]
    sampler, parts = training_sampler(run_dir)
    expected = generate_latents(sampler, prompts, seeds)
    pipe = load(run_dir, device="cpu")
    # the family's own diffusers pipeline class (StableDiffusionPipeline, StableDiffusionXLPipeline)
    assert isinstance(pipe, LongPrompts) and isinstance(pipe, type(parts.family.pipeline(parts, pipe.scheduler)))
    assert pipe.longalign["family"] == parts.family.name
    assert pipe.longalign["weights"] == "lora" and pipe.longalign["max_tokens"] == 120  # the run's, not 240
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.longalign["num_steps"] == 4
    # the same embeddings: the pipeline's encode_prompt is the run's segment encoder (in the
    # order diffusers returns them: SD 1.x the first two, SDXL all four)
    got = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    expected_embeds = parts.family.pipeline_inputs(sampler.encoder(prompts), sampler.encoder.uncond(1))
    assert set(expected_embeds) == set(names[:len(got)])
    for name, value in zip(names, got):
        assert torch.equal(value, expected_embeds[name]), name
    latents = pipe.generate(prompts, seeds, output_type="latent")
    assert latents.shape == expected.shape == (3, 4, 8, 8)
    # to float32 rounding, relative to the latents' size (tiny SDXL's reach 20; 3e-4 apart on
    # one thread: the sampler's LoRA is peft's layer, the pipeline's diffusers' load_lora_weights)
    size = max(1.0, float(expected.abs().max()))
    assert torch.allclose(latents, expected, atol=1e-5 * size), (latents - expected).abs().max()
    images = pipe.generate(prompts, seeds, output_type="pt")
    assert torch.allclose(images, decode(parts.vae, expected), atol=1e-5)
    # one at a time or together: each prompt's noise is its own seed's
    alone = pipe.generate(prompts[1], seeds[1], output_type="latent")
    assert torch.allclose(alone, expected[1:2], atol=1e-4 * size), (alone - expected[1:2]).abs().max()
    # and the trained weights matter: the base model draws other images
    base, _ = training_sampler(run_dir, trained=False)
    assert (generate_latents(base, prompts, seeds) - expected).abs().max() > 1e-2


def test_a_checkpoint_loads_the_same_weights_and_a_long_prompt_is_not_cut(run_dir):
    pipe = load(run_dir, checkpoint=1, device="cpu")
    assert pipe.longalign["weights"] == "checkpoint"
    exported = load(run_dir, device="cpu").generate(["a red cube."], [0], output_type="latent")
    assert torch.allclose(pipe.generate(["a red cube."], [0], output_type="latent"), exported, atol=1e-5)
    # diffusers' own call segment-encodes: a change in the last sentence, past CLIP's 77
    # tokens, still changes the image
    long_prompt = demo_prompts()[0]
    assert len(pipe.tokenizer(long_prompt).input_ids) > 77
    altered = long_prompt.rsplit(".", 2)[0] + ". A purple elephant stands in the foreground."

    def draw(prompt):
        return pipe(prompt, num_inference_steps=3, height=64, width=64, output_type="pt",
                    latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).images

    assert (draw(long_prompt) - draw(altered)).abs().max() > 1e-4


def test_load_errors_name_the_problem(run_dir, tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="exported nothing"):
        load(empty)
    with pytest.raises(FileNotFoundError, match="checkpoint '7'"):
        load(run_dir, checkpoint="7")
    with pytest.raises(ValueError, match="needs a run directory"):
        load("tiny", checkpoint=1)
    with pytest.raises(ValueError, match="like=.* is not a run directory"):
        load("tiny", like=tmp_path)


def test_a_model_alone_samples_at_its_native_size_and_like_a_run_on_request(run_dir):
    model = load_config(run_dir / "config.yaml").model.pretrained
    alone = load(model, device="cpu").longalign
    assert alone["resolution"] == 64 and alone["num_steps"] == 50 and alone["max_tokens"] == 240
    pipe = load(model, device="cpu", like=run_dir)
    assert pipe.longalign["num_steps"] == 4 and pipe.longalign["max_tokens"] == 120
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_shipped_shapesworld_models_are_complete_diffusers_folders():
    from diffusers import StableDiffusionPipeline

    from shapesworld.plugin import WEIGHTS_DIR

    base = load_components("shapesworld")
    for name in ("shapesworld", "shapesworld-stage1", "shapesworld-partial"):
        pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / name, safety_checker=None)
        assert pipe.tokenizer("a red square.").input_ids == base.tokenizer("a red square.").input_ids
        shipped = load_components(name)
        assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), shipped.unet.state_dict().values()))
    assert load("shapesworld-partial", device="cpu").longalign["weights"] == "base"


def test_generate_writes_images_and_their_prompts(run_dir, tmp_path, capsys):
    prompt_file = tmp_path / "more.txt"
    prompt_file.write_text("a green square.\n")
    code = generate.main([str(run_dir), "a red cube. a blue ball.", "--prompts", str(prompt_file), "--out",
                          str(tmp_path / "out"), "--seed", "3", "--steps", "2"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000.png", "001.png", "grid.png"]
    assert (tmp_path / "out" / "prompts.txt").read_text().splitlines()[1] == "001\tseed 4\ta green square."
    assert "2 image(s)" in capsys.readouterr().out
    assert generate.main([str(run_dir), "--out", str(tmp_path / "none")]) == 2
    assert "no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("model, options, message", [
    # no network here: the hub is asked once, not file by file with retries, and the key is named
    ("nosuchorg/nosuchmodel", [], "model.pretrained: 'nosuchorg/nosuchmodel' is not a local folder, not in the hub cache"),
    ("tiny", ["--t5", "nosuchorg/nosuch-t5"], "t5.encoder: 'nosuchorg/nosuch-t5' is not a local folder, not in the hub cache"),
])
def test_generate_with_a_model_that_cannot_be_loaded_exits_2_in_one_line(tmp_path, capsys, model, options, message):
    code = generate.main([model, "a red cube.", "--out", str(tmp_path / "out"), *options])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and not (tmp_path / "out").exists()


def test_evaluate_scores_a_run_against_its_base_on_the_same_prompts_and_noise(run_dir, tmp_path, capsys):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("".join(p + "\n" for p in demo_prompts()[:4]))
    code = evaluate.main([str(run_dir), "--prompts", str(prompts), "--against", "base", "--out", str(tmp_path / "ev"),
                          "--metrics", "tests.unit.test_hooks:brightness"])
    assert code == 0
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    run, base = result["models"]
    model = load_config(run_dir / "config.yaml").model.pretrained
    assert result["reward"] == "tiny_clip" and base["source"] == model and base["weights"] == "base"
    assert base["settings"] == run["settings"] == {"num_steps": 4, "guidance_scale": 3.0, "resolution": 64,
                                                   "max_tokens": 120}  # the base sampled as the run samples
    assert set(run["values"]) >= {"reward", "text_relevant", "text_irrelevant", "bright", "words"}
    assert len(run["values"]["reward"]) == 4
    rows = {r["key"]: r for r in result["comparison"]["rows"]}
    diffs = [a - b for a, b in zip(run["values"]["reward"], base["values"]["reward"])]
    assert rows["reward"]["change"] == pytest.approx(sum(diffs) / 4)
    assert len(list((tmp_path / "ev").glob("*/003.png"))) == 2
    assert "change = " in capsys.readouterr().out
    assert evaluate.main(["tiny", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts" in capsys.readouterr().err
