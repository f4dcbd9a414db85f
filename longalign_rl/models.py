"""Build or load the diffusion model's parts (UNet, VAE, text encoders, tokenizers, scheduler)
through its model family (longalign_rl/families/: SD 1.x/2.x, SDXL).

`model.pretrained` names one of (longalign_rl.registry.resolve_source, in this order):
- a built-in architecture, random-initialised from the JSON configs in
  `longalign_rl/model_configs/<name>/` with a fixed seed, so that every process (sampler
  actor or trainer worker) builds the same weights without sharing a file: "tiny"
  (test-sized parts of SD v1.5's classes), "sd15-random" (SD v1.5's architecture, for
  benchmarks), "tiny-sdxl" and "sdxl-random" (the same for SDXL) - see `builtin_models()`;
- a model registered in the entry-point group `longalign_rl.models` (name -> loader), as
  the ShapesWorld world registers its shipped "shapesworld" and "shapesworld-stage1";
- an import path "pkg.module:loader";
- a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, and
  text_encoder_2/, tokenizer_2/ for SDXL);
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5" (needs network).
The family of a folder, hub id or built-in is its model_index.json's pipeline class.
A loader is called as `loader(seed=model.random_seed)` and returns `Components`; the seed
matters only to models whose weights are random-initialised.

The tokenizer of "tiny" is the real CLIP BPE tokenizer, built offline from the vocabulary
file that open_clip ships (encoding/tokenizer.py), so token counts in tests are real.
"""

from __future__ import annotations

import inspect
import json
from functools import partial
from pathlib import Path

import torch

from longalign_rl.families import Components, Family, default_family, family_for_pipeline
from longalign_rl.families.base import ddim_scheduler, read_config, saved_without
from longalign_rl.registry import Registry, resolve_source
from longalign_rl.hub import check_hub_model, unloadable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config names
CONFIG_DIR = Path(__file__).parent / "model_configs"
MODEL_INDEX = "model_index.json"

__all__ = ["Components", "DTYPES", "MODELS", "load_components", "load_model", "make_scheduler", "save_model_folder"]


def builtin_models() -> list[str]:
    """Names of the architectures built from configs in the package (random weights)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if (p / MODEL_INDEX).is_file())


def vae_scale_factor(vae) -> int:
    """Pixels per latent along a side: 8 for SD's VAE (three downsamplings)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _read_config(model: str, part: str) -> dict:
    """One part's JSON config of the built-in architecture `model` (benchmarks, tests)."""
    return read_config(CONFIG_DIR / model, part)


def read_model_index(source: str | Path, revision: str | None = None) -> dict:
    """A diffusers model's model_index.json (a local folder's, or a hub id's); {} when a
    folder has none (then it is SD 1.x, as folders made before families were)."""
    local = Path(source)
    if local.is_dir():
        file = local / MODEL_INDEX
        return json.loads(file.read_text()) if file.is_file() else {}
    from huggingface_hub import hf_hub_download

    with unloadable(str(source), "a diffusers model"):
        return json.loads(Path(hf_hub_download(str(source), MODEL_INDEX, revision=revision)).read_text())


def family_of(source: str | Path, model_index: dict, key: str = "model.pretrained") -> type[Family]:
    """The family of a folder, hub id or built-in from its model_index.json's `_class_name`."""
    if not model_index:
        return default_family()
    return family_for_pipeline(str(model_index.get("_class_name")), f"{key}: {source}")


def declared_family(model: str, revision: str | None = None, download: bool = True) -> type[Family] | None:
    """The family `model.pretrained` names without loading weights (the driver's check): a
    built-in's, a folder's or a hub id's model_index.json; None for a loader (a registered
    model or an import path), whose family is known once it has run, and, without
    `download`, for a hub id whose model_index.json is not in the local hub cache."""
    source = resolve_source(model, key="model.pretrained", names=MODELS, path_kind="diffusers folder", hub_ids=True)
    if source.kind == "name" and model in builtin_models():
        return family_of(model, read_model_index(CONFIG_DIR / model))
    if source.kind == "hub" and not download:
        import huggingface_hub

        cached = huggingface_hub.try_to_load_from_cache(model, MODEL_INDEX, revision=revision)
        return family_of(model, json.loads(Path(cached).read_text())) if isinstance(cached, str) else None
    if source.kind in ("path", "hub"):
        return family_of(model, read_model_index(model, revision))
    return None


def build_random(model: str = "tiny", seed: int = 0) -> Components:
    """Random-initialised parts of a built-in architecture; the same weights for the same seed.
    Its family is the one its model_index.json names."""
    config_dir = CONFIG_DIR / model
    return family_of(model, read_model_index(config_dir)).build_random(config_dir, seed)


def load_pretrained(path_or_id: str, revision: str | None = None, without: tuple[str, ...] = ()) -> Components:
    """A local diffusers folder or a hub id, by its family (model_index.json), in float32.
    `without`: parts not to load (SD3's "text_encoder_3", model.without_t5)."""
    model_index = read_model_index(path_or_id, revision)
    family = family_of(path_or_id, model_index)
    with unloadable(path_or_id, "a diffusers model"):
        if without:
            return family.load_pretrained(path_or_id, revision, model_index, without=without)
        return family.load_pretrained(path_or_id, revision, model_index)


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
    each weight folder of its family (SD: unet/, vae/, text_encoder/; SDXL also
    text_encoder_2/) with config.json and complete, finite weights, and scheduler/'s config;
    a part model_index.json says was saved as None (SD3's text_encoder_3) is not looked for.
    A pipeline class of no known family is named with the supported ones."""
    problems = []
    index = read_model_index(folder)
    for part in family_of(folder, index, key).parts:
        if saved_without(index, part):  # SD3 saved without its T5
            continue
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
    for name, module in parts.modules().items():
        for pname, p in module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"model.pretrained: {model!r}: {name}.{pname} holds NaN or infinite weights")


MODELS = Registry("model", "longalign_rl.models",
                  builtins=lambda: {name: partial(build_random, name) for name in builtin_models()})


def load_components(model: str, *, seed: int = 0, revision: str | None = None, family: str = "",
                    without_t5: bool = False) -> Components:
    """All parts frozen (requires_grad False, eval mode); the caller adds what trains.
    `model`: see the module docstring; `seed`: a random-initialised model's weights;
    `family` (model.family): the family the weights must be, "" for whichever they are;
    `without_t5` (model.without_t5): SD3 without its T5 encoder (not loaded at all from a folder)."""
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
        parts = load_pretrained(model, revision, without=("text_encoder_3",) if without_t5 else ())
    if without_t5:
        if "text_encoder_3" not in (parts.family.parts if parts.family is not None else ()):
            raise ValueError(f"model.without_t5: only SD3 loads without a T5 encoder; {model!r} is not an SD3 model")
        parts.text_encoder_3 = parts.tokenizer_3 = None
    if parts.family is None:  # a loader from before model families: its parts are SD 1.x's
        parts.family = default_family()()
    if family and parts.family.name != family:
        raise ValueError(f"model.family: {family!r}, but {model!r} is a {parts.family.name!r} model "
                         f"({type(parts.unet).__name__}, pipeline {', '.join(parts.family.pipeline_classes)}); "
                         "leave model.family empty to read it from the model")
    if source.kind != "path":  # a folder's values were checked in its files already
        check_finite(parts, model)
    for module in parts.modules().values():
        module.requires_grad_(False).eval()
    return parts


def save_model_folder(parts: Components, directory: str | Path) -> Path:
    """The parts as a complete diffusers folder of their family's pipeline class (SD: unet/,
    vae/, text_encoder/, tokenizer/, scheduler/ with DDIM, model_index.json) that
    `load_components` and the pipeline's `from_pretrained` load."""
    pipeline = parts.family.pipeline(parts, parts.family.model_scheduler(parts.scheduler_config))
    pipeline.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def load_model(cfg) -> Components:
    """`load_components` of a run config's model.pretrained, with the T5 branch of its t5
    section attached as `parts.t5` (None when t5.encoder is empty)."""
    from longalign_rl.encoding.t5 import build_t5_branch

    m = cfg.model
    parts = load_components(m.pretrained, seed=m.random_seed, revision=m.revision, family=m.family,
                            without_t5=m.without_t5)
    parts.t5 = build_t5_branch(cfg.t5, cross_attention_dim=getattr(parts.unet.config, "cross_attention_dim", 0),
                               model=m.pretrained, seed=m.random_seed)
    return parts


def make_scheduler(scheduler_config: dict, *, timestep_spacing: str, final: str = "step"):
    """SD 1.x's sampling scheduler (families.base.ddim_scheduler); a model of any family:
    `parts.family.scheduler(...)`."""
    return ddim_scheduler(scheduler_config, timestep_spacing=timestep_spacing, final=final)
