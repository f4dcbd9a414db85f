"""Build or load the diffusion model's parts: UNet, VAE, text encoder, tokenizer, scheduler.

`model.pretrained` names one of (longalign_rl.registry.resolve_source, in this order):
- a built-in architecture, random-initialised from the JSON configs in
  `longalign_rl/model_configs/<name>/` with a fixed seed, so that every process (sampler
  actor or trainer worker) builds the same weights without sharing a file: "tiny"
  (test-sized parts of SD v1.5's classes) or "sd15-random" (SD v1.5's architecture, for
  benchmarks) - see `builtin_models()`;
- a model registered in the entry-point group `longalign_rl.models` (name -> loader), as
  the ShapesWorld world registers its shipped "shapesworld" and "shapesworld-stage1";
- an import path "pkg.module:loader";
- a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5" (needs network).
A loader is called as `loader(seed=model.random_seed)` and returns `Components`; the seed
matters only to models whose weights are random-initialised.

The tokenizer of "tiny" is the real CLIP BPE tokenizer, built offline from the vocabulary
file that open_clip ships (encoding/tokenizer.py), so token counts in tests are real.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from longalign_rl.encoding.tokenizer import build_clip_tokenizer, check_clip_tokenizer
from longalign_rl.registry import Registry, resolve_source
from longalign_rl.hub import check_hub_model, unloadable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config names
CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class Components:
    """The frozen and trainable parts of a UNet/CLIP latent diffusion model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    # The T5 branch (encoding/t5.py T5Branch) when the config asks for one: `load_model`.
    t5: object = None


def builtin_models() -> list[str]:
    """Names of the architectures built from configs in the package (random weights)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if (p / "unet.json").is_file())


def vae_scale_factor(vae) -> int:
    """Pixels per latent along a side: 8 for SD's VAE (three downsamplings)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _read_config(model: str, part: str) -> dict:
    config = json.loads((CONFIG_DIR / model / f"{part}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_random(model: str = "tiny", seed: int = 0) -> Components:
    """Random-initialised parts of a built-in architecture; the same weights for the same seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_read_config(model, "unet"))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**_read_config(model, "vae"))
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_read_config(model, "text_encoder")))
    return Components(unet, vae, text_encoder, build_clip_tokenizer(), _read_config(model, "scheduler"))


def load_pretrained(path_or_id: str, revision: str | None = None, unet_from: str | Path | None = None) -> Components:
    """SD v1.5 (or another UNet/CLIP model) from a local diffusers folder or a hub id.

    Weights load in float32 whatever their stored dtype (the shipped models are stored in
    float16); a folder without tokenizer/ gets the offline CLIP tokenizer. `unet_from`: a
    folder whose unet/ replaces `path_or_id`'s (a model that ships only its UNet)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = {"revision": revision} if revision else {}
    f32 = {"torch_dtype": torch.float32}
    with unloadable(path_or_id, "a diffusers model"):
        unet = UNet2DConditionModel.from_pretrained(unet_from or path_or_id, subfolder="unet", **f32,
                                                    **({} if unet_from else kw))
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", **f32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", dtype=torch.float32, **kw)
        local = Path(path_or_id)
        if local.is_dir() and not (local / "tokenizer").is_dir():
            tokenizer = build_clip_tokenizer()
        else:
            tokenizer = CLIPTokenizer.from_pretrained(path_or_id, subfolder="tokenizer", **kw)
            check_clip_tokenizer(tokenizer, f"the tokenizer of {path_or_id}")
        scheduler_config = dict(DDIMScheduler.load_config(path_or_id, subfolder="scheduler", **kw))
    return Components(unet, vae, text_encoder, tokenizer, scheduler_config)


PARTS = ("unet", "vae", "text_encoder")  # each a subfolder with config.json and its weights


def check_safetensors(path: Path) -> None:
    """ValueError unless `path` is a complete safetensors file: a parseable header whose
    tensors end exactly where the file does (a truncated or padded file fails)."""
    import struct

    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit in {size} bytes")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if 8 + n + end != size:
        raise ValueError(f"{path}: {size} bytes, but its header describes {8 + n + end} (truncated or corrupt)")


def check_finite_file(path: Path) -> None:
    """ValueError naming the first tensor of a safetensors file with a NaN or infinite value:
    a file overwritten in place keeps a valid header and size. Reads one tensor at a time."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values")


def check_model_folder(folder: Path, key: str = "model.pretrained") -> None:
    """ValueError naming `key` and the file, unless `folder` holds a loadable diffusers model:
    unet/, vae/, text_encoder/ each with config.json and complete, finite weights, and
    scheduler/'s config."""
    problems = []
    for part in PARTS:
        sub = folder / part
        weights = sorted(sub.glob("*.safetensors")) + sorted(sub.glob("*.bin"))
        if not (sub / "config.json").is_file():
            problems.append(f"{part}/config.json is missing")
        elif not weights:
            problems.append(f"{part}/ has no weights (*.safetensors or *.bin)")
        for file in weights:
            if file.suffix == ".safetensors":
                try:
                    check_safetensors(file)
                    check_finite_file(file)
                except ValueError as e:
                    problems.append(str(e))
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        problems.append("scheduler/scheduler_config.json is missing")
    if problems:
        raise ValueError(f"{key}: {folder} is not a loadable diffusers model folder: {'; '.join(problems)}")


def check_finite(parts: "Components", model: str) -> None:
    """ValueError naming the part whose loaded weights hold NaN or infinite values (a file
    overwritten in place keeps a valid header)."""
    for name in PARTS:
        for pname, p in getattr(parts, name).named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"model.pretrained: {model!r}: {name}.{pname} holds NaN or infinite weights")


MODELS = Registry("model", "longalign_rl.models",
                  builtins=lambda: {name: partial(build_random, name) for name in builtin_models()})


def load_components(model: str, *, seed: int = 0, revision: str | None = None) -> Components:
    """All parts frozen (requires_grad False, eval mode); the caller adds what trains.
    `model`: see the module docstring; `seed`: a random-initialised model's weights."""
    source = resolve_source(model, key="model.pretrained", names=MODELS, path_kind="diffusers folder", hub_ids=True)
    if source.kind in ("name", "import"):
        try:
            inspect.signature(source.target).bind(seed=seed)
        except (TypeError, ValueError) as e:
            raise TypeError(f"model.pretrained: the loader of {model!r} must be callable as loader(seed=...): {e}") from None
        parts = source.target(seed=seed)
        if not isinstance(parts, Components):
            raise TypeError(f"model.pretrained: the loader of {model!r} returned {type(parts).__name__}, "
                            "not longalign_rl.models.Components")
    else:
        if source.kind == "path":
            check_model_folder(Path(model))  # headers, sizes and finite values, before loading
        else:
            check_hub_model(model, revision)
        parts = load_pretrained(model, revision)
    if source.kind != "path":  # a folder's values were checked in its files already
        check_finite(parts, model)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.requires_grad_(False).eval()
    return parts


def save_model_folder(parts: Components, directory: str | Path) -> Path:
    """The parts as a complete diffusers folder (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/ with DDIM, model_index.json) that `load_components` and
    `StableDiffusionPipeline.from_pretrained` load."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def load_model(cfg) -> Components:
    """`load_components` of a run config's model.pretrained, with the T5 branch of its t5
    section attached as `parts.t5` (None when t5.encoder is empty)."""
    from longalign_rl.encoding.t5 import build_t5_branch

    m = cfg.model
    parts = load_components(m.pretrained, seed=m.random_seed, revision=m.revision)
    parts.t5 = build_t5_branch(cfg.t5, cross_attention_dim=parts.unet.config.cross_attention_dim,
                               model=m.pretrained, seed=m.random_seed)
    return parts


def make_scheduler(scheduler_config: dict, *, timestep_spacing: str, final: str = "step"):
    """A deterministic-capable DDIM scheduler on the model's own noise schedule. `final`
    (sampler.final): "pred_x0" sets set_alpha_to_one, so that the last step returns the
    predicted clean latent exactly (sqrt(1) x0_pred + sqrt(0) eps); "step" keeps the
    model's own setting."""
    from diffusers import DDIMScheduler

    if final not in ("step", "pred_x0"):
        raise ValueError(f"final must be step or pred_x0, got {final!r}")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(timestep_spacing=timestep_spacing, clip_sample=False, thresholding=False)
    if final == "pred_x0":
        config["set_alpha_to_one"] = True
    return DDIMScheduler.from_config(config)
