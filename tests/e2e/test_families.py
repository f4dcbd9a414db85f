"""Model families through the product (issues 25, 26). The default tier runs SDXL and SD3
through the product with their shipped real-size configs and tiny stand-ins
(tests/e2e/test_configs.py: sdxl_longalign.yaml, sd35_medium_longalign.yaml with reward
backpropagation; DeepSpeed workers and sampler actors), FLUX here with Flow-GRPO
(configs/tiny_flux.yaml: its real config's recipe, groups of 12, is slow there), and
`pipeline.load` of a run of each family in tests/unit/test_pipeline.py and
test_flow_families.py. The rest is slow:

SDXL: configs/tiny_sdxl.yaml trains, exports a LoRA that diffusers' StableDiffusionXLPipeline
loads, and `pipeline.load` redraws its validation images; a folder that diffusers saved from
a tiny random StableDiffusionXLPipeline this project did not make (its own sizes, its own
scheduler class) trains with the same config, resumes and loads back; GRPO and stage 1 on
SDXL. The flow-matching transformers: configs/tiny_sd3.yaml (reward backpropagation) and
configs/tiny_flux.yaml (Flow-GRPO) the same way; then each family's other algorithm,
resumed, SD3 without its T5, and stage 1 on both.

One Ray instance (conftest.ray_local) serves every test of this module."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from longalign_rl import train
from longalign_rl.outputs import read_metrics
from tests import REPO

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = str(REPO / "configs" / "tiny_sdxl.yaml")


def validation_of(run_dir, step):
    """The prompts, seeds and saved images of a run's validation at `step`."""
    listed = [line.split("\t") for line in (run_dir / "validation" / "prompts.txt").read_text().splitlines()]
    prompts, seeds = [p for _, _, p in listed], [int(s.split()[1]) for _, s, _ in listed]
    saved = torch.stack([torch.from_numpy(np.array(Image.open(run_dir / "validation" / f"step_{step:06d}" / f"{i:03d}.png")))
                         for i in range(len(prompts))]).permute(0, 3, 1, 2).float() / 255
    return prompts, seeds, saved


def assert_loads_redraw_the_validation(run_dir, step, diffusers_pipe, family="sdxl"):
    """pipeline.load(run_dir) is the family's diffusers pipeline with segment-encoded prompts
    that redraws the validation images of `step` from their seeds (to PNG rounding);
    `diffusers_pipe`, diffusers' own pipeline of the run's base model, with the exported LoRA
    loaded by load_lora_weights and the same embeddings (Family.pipeline_inputs), draws the
    same images."""
    from longalign_rl.noise import initial_noise
    from longalign_rl.pipeline import LongPromptFluxPipeline, LongPromptSD3Pipeline, LongPromptXLPipeline, load

    prompts, seeds, saved = validation_of(run_dir, step)
    pipe = load(run_dir, device="cpu")
    kind = {"sdxl": LongPromptXLPipeline, "sd3": LongPromptSD3Pipeline, "flux": LongPromptFluxPipeline}[family]
    assert isinstance(pipe, kind) and pipe.longalign["family"] == family
    drawn = pipe.generate(prompts, seeds, output_type="pt")
    assert (drawn - saved).abs().max() <= 1 / 255

    diffusers_pipe.scheduler = pipe.scheduler
    diffusers_pipe.load_lora_weights(run_dir / "lora")
    denoiser = getattr(diffusers_pipe, pipe.family.denoiser)
    assert sum("lora_" in n for n, _ in denoiser.named_parameters()) > 0
    diffusers_pipe.set_progress_bar_config(disable=True)
    encoder = pipe.segment_encoder
    embeds = pipe.family.pipeline_inputs(encoder(prompts), encoder.uncond(1))
    latent = pipe.longalign["resolution"] // pipe.vae_scale_factor
    noise = pipe.family.to_pipeline_latents(initial_noise(seeds, (pipe.vae.config.latent_channels, latent, latent)))
    images = diffusers_pipe(**embeds, latents=noise,
                            num_inference_steps=pipe.longalign["num_steps"],
                            guidance_scale=pipe.longalign["guidance_scale"], height=pipe.longalign["resolution"],
                            width=pipe.longalign["resolution"], output_type="pt").images
    torch.testing.assert_close(images, drawn, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def sdxl_run(ray_local, tmp_path_factory):
    """configs/tiny_sdxl.yaml as shipped, for 2 of its 12 steps."""
    out = tmp_path_factory.mktemp("runs")
    assert train.main(["--config", CONFIG, "train.steps=2", f"run.output_dir={out}", "run.name=sdxl"]) == 0
    return out / "sdxl"


@pytest.mark.slow  # SDXL runs in the default tier as configs/sdxl_longalign.yaml's smoke (test_configs.py)
def test_tiny_sdxl_trains_through_the_product(sdxl_run):
    metrics = read_metrics(sdxl_run)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["workers"] == 2 for m in metrics)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["reward"]) and m["grad_norm"] > 0 for m in metrics)
    assert "family: sdxl" in (sdxl_run / "config.yaml").read_text()
    assert [json.loads(line)["step"] for line in (sdxl_run / "validation.jsonl").read_text().splitlines()] == [0, 2]
    assert (sdxl_run / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_the_exported_lora_loads_in_diffusers_and_pipeline_load_redraws_the_validation(sdxl_run):
    from longalign_rl.models import load_components

    parts = load_components("tiny-sdxl")
    assert_loads_redraw_the_validation(sdxl_run, 2, parts.family.pipeline(parts, None))


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """diffusers' own tiny SDXL (the sizes of its SDXL pipeline tests: two layers per block,
    two transformer layers in the second, one norm group), with the real CLIP vocabulary so
    that the offline tokenizer fits, and SDXL's default scheduler class, saved by
    StableDiffusionXLPipeline.save_pretrained."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from longalign_rl.encoding.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(block_out_channels=[32, 32, 32, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        latent_channels=4, sample_size=64, scaling_factor=0.13025, norm_num_groups=8)
    text = dict(bos_token_id=49406, eos_token_id=49407, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                num_attention_heads=4, num_hidden_layers=3, vocab_size=49408, hidden_act="gelu", projection_dim=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler,
        text_encoder=CLIPTextModel(CLIPTextConfig(pad_token_id=49407, **text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=0, **text)),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"))
    folder = tmp_path_factory.mktemp("models") / "diffusers-sdxl"
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.slow  # a third and fourth SDXL run (1.5 minutes); tiny_sdxl.yaml runs above in the default tier
def test_a_folder_diffusers_saved_trains_resumes_and_loads_back(ray_local, sdxl_folder, tmp_path):
    """configs/tiny_sdxl.yaml model.pretrained=FOLDER: 2 steps with a checkpoint each, --resume
    to 3; diffusers' StableDiffusionXLPipeline.from_pretrained(FOLDER) with the exported LoRA,
    and pipeline.load, draw its last validation images."""
    from diffusers import StableDiffusionXLPipeline

    assert train.main(["--config", CONFIG, f"model.pretrained={sdxl_folder}", "train.steps=2",
                       "run.checkpoint_every=1", "run.eval_every=3", "run.image_every=3", f"run.output_dir={tmp_path}",
                       "run.name=sdxl"]) == 0
    run_dir = tmp_path / "sdxl"
    first = read_metrics(run_dir)
    assert train.main(["--resume", str(run_dir), "train.steps=3"]) == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in first] == [1, 2] and [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[:2] == first  # the resume kept what the first run wrote
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    # step 0, the end of the first run, the end of the resumed one
    assert [json.loads(line)["step"] for line in (run_dir / "validation.jsonl").read_text().splitlines()] == [0, 2, 3]
    assert_loads_redraw_the_validation(run_dir, 3, StableDiffusionXLPipeline.from_pretrained(sdxl_folder))


@pytest.mark.slow  # two more SDXL runs (2 minutes); reward backprop on SDXL runs above and in test_configs.py
def test_grpo_and_stage_1_run_on_sdxl(ray_local, tmp_path):
    """GRPO (2 steps) and stage 1 (2 steps, ShapesWorld pairs drawn at 96 px, cropped to 64,
    so each image's time ids name its original size) on tiny-sdxl; stage 1's merged model/
    is an SDXL folder that diffusers and the framework load."""
    from diffusers import StableDiffusionXLPipeline

    from longalign_rl.models import load_components

    assert train.main(["--config", CONFIG, "algorithm.name=grpo", "algorithm.group_size=2", "train.steps=2",
                       f"run.output_dir={tmp_path}", "run.name=grpo"]) == 0
    metrics = read_metrics(tmp_path / "grpo")
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)

    assert train.main(["--config", str(REPO / "configs" / "tiny_stage1.yaml"), "model.pretrained=tiny-sdxl",
                       "data.kwargs.n=16", "data.kwargs.image_size=96", "train.steps=2", "run.eval_every=2",
                       f"run.output_dir={tmp_path}", "run.name=stage1"]) == 0
    run_dir = tmp_path / "stage1"
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2]
    assert json.loads((run_dir / "model" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert load_components(str(run_dir / "model")).family.name == "sdxl"
    StableDiffusionXLPipeline.from_pretrained(run_dir / "model")


# ------------------------------------------------------------------------------ SD3 and FLUX (issue 26)

FLOW = {"sd3": str(REPO / "configs" / "tiny_sd3.yaml"), "flux": str(REPO / "configs" / "tiny_flux.yaml")}
# the default tier runs each family with the algorithm it is most used with: SD3 with reward
# backpropagation through its last Euler steps, FLUX with Flow-GRPO; the slow tier the other
DEFAULT_ALGORITHM = {"sd3": [], "flux": ["algorithm.name=grpo", "algorithm.group_size=2"]}
OTHER_ALGORITHM = {"sd3": ["algorithm.name=grpo", "algorithm.group_size=2"], "flux": []}


def check_flow_run(family, run_dir):
    from longalign_rl.models import load_components

    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["workers"] == 2 for m in metrics)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["reward"]) and m["grad_norm"] > 0 for m in metrics)
    assert f"family: {family}" in (run_dir / "config.yaml").read_text()
    if family == "sd3":  # reward backpropagation: the replay reproduces the sampler's chain to the policy lag
        assert all(m["replay_error"] < 0.05 for m in metrics)
    else:  # Flow-GRPO: the first update's ratio is 1 (the samples are the current policy's)
        assert metrics[0]["ratio_error"] < 1e-5
    parts = load_components(f"tiny-{family}")
    assert_loads_redraw_the_validation(run_dir, 2, parts.family.pipeline(parts, None), family)


def test_tiny_flux_grpo_trains_through_the_product(ray_local, tmp_path):
    """configs/tiny_flux.yaml with Flow-GRPO (groups of 2), 2 of its 12 steps: the exported
    LoRA loads in diffusers' FluxPipeline and `pipeline.load` redraws the validation."""
    assert train.main(["--config", FLOW["flux"], *DEFAULT_ALGORITHM["flux"], "train.steps=2",
                       f"run.output_dir={tmp_path}", "run.name=flux"]) == 0
    check_flow_run("flux", tmp_path / "flux")


@pytest.mark.slow  # SD3 runs in the default tier as sd35_medium_longalign.yaml's smoke, FLUX above
def test_tiny_sd3_trains_through_the_product_and_loads_in_diffusers(ray_local, tmp_path):
    assert train.main(["--config", FLOW["sd3"], *DEFAULT_ALGORITHM["sd3"], "train.steps=2",
                       f"run.output_dir={tmp_path}", "run.name=sd3"]) == 0
    check_flow_run("sd3", tmp_path / "sd3")


@pytest.mark.slow  # four more runs per family (about 3 minutes each); each family runs above in the default tier
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_other_algorithm_resume_and_stage_1_on_flow_families(ray_local, tmp_path, family):
    """The family's other algorithm for 2 steps with a checkpoint each, --resume to 3 (SD3:
    without its T5); stage 1 (2 steps, ShapesWorld pairs): its merged model/ is a folder of
    the family's pipeline that diffusers and the framework load, and stage 2 starts from it."""
    from longalign_rl.models import load_components

    extra = ["model.without_t5=true"] if family == "sd3" else []
    assert train.main(["--config", FLOW[family], *OTHER_ALGORITHM[family], *extra, "train.steps=2",
                       "run.checkpoint_every=1", "run.eval_every=3", "run.image_every=3", f"run.output_dir={tmp_path}",
                       "run.name=other"]) == 0
    run_dir = tmp_path / "other"
    first = read_metrics(run_dir)
    assert train.main(["--resume", str(run_dir), "train.steps=3"]) == 0
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[:2] == first
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    parts = load_components(f"tiny-{family}", without_t5=bool(extra))
    assert_loads_redraw_the_validation(run_dir, 3, parts.family.pipeline(parts, None), family)

    assert train.main(["--config", str(REPO / "configs" / "tiny_stage1.yaml"), f"model.pretrained=tiny-{family}",
                       "prompts.t5_max_tokens=64", "data.kwargs.n=16", "train.steps=2", "run.eval_every=2",
                       f"run.output_dir={tmp_path}", "run.name=stage1"]) == 0
    model = tmp_path / "stage1" / "model"
    assert [m["step"] for m in read_metrics(tmp_path / "stage1")] == [1, 2]
    pipeline_class = parts.family.pipeline_classes[0]
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == pipeline_class
    assert load_components(str(model)).family.name == family
    parts.family.pipeline_class().from_pretrained(model)
    assert train.main(["--config", FLOW[family], f"model.pretrained={model}", "train.steps=1",
                       f"run.output_dir={tmp_path}", "run.name=from_stage1"]) == 0
