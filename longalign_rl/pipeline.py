"""Inference: a run's model as its family's diffusers pipeline (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`) that encodes prompts by segments, as the run's samplers did.

    from longalign_rl.pipeline import load

    pipe = load("runs/<name>")                       # a run directory, or any model.pretrained:
                                                     # "shapesworld-partial", a diffusers folder, a hub id
    images = pipe.generate(["A long prompt. With many sentences. ..."], seeds=[0])
    image = pipe("A long prompt ...").images[0]      # diffusers' own call: segment-encoded too

What `load` assembles from a run directory (its config.yaml):
- the model: stage 1's `model/` (the LoRA merged), else the run's `model.pretrained` with the
  run's `lora/` (`load_lora_weights`) or full fine-tune `unet/`; `checkpoint=` takes a
  checkpoint's weights instead (a run in progress; the newest when nothing is exported yet);
- the scheduler: DDIM on the model's noise schedule with the run's `sampler.timestep_spacing`;
- a model folder with a sampling.json (`longalign-rl import-reference` writes the authors'
  sample.py's: UniPC, 25 steps, their split): its scheduler and its sampler, prompts and t5
  settings as the defaults of the model alone;
- the segment encoder: the run's `prompts.max_tokens` and `prompts.pack_segments`, and its
  T5 branch (`t5` section; stage 1's trained adapter, text_adapter/) when it had one;
- the defaults of `generate`: the run's `sampler.num_steps`, `guidance_scale`, `resolution`.

`generate(prompts, seeds)` draws prompt i from `initial_noise([seeds[i]])` with
deterministic DDIM, exactly what the run's validation drew (sampling/sampler.py
`generate_latents`), so a run's validation images are reproduced here. Pure torch and
diffusers: no ray, no deepspeed; it runs on a GPU machine without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from longalign_rl.config import Config, ConfigError, from_dict, load_config
from longalign_rl.encoding.t5 import ADAPTER_FOLDER, build_t5_branch
from longalign_rl.families.pipelines import (LongPromptFluxPipeline, LongPromptPipeline, LongPrompts,
                                             LongPromptSD3Pipeline, LongPromptXLPipeline)
from longalign_rl.lora import load_trainable_state_dict, make_trainable, remove_adapter
from longalign_rl.models import load_components
from longalign_rl.outputs import CONFIG, LORA, METRICS, MODEL, UNET

log = logging.getLogger(__name__)

__all__ = ["LongPromptFluxPipeline", "LongPromptPipeline", "LongPromptSD3Pipeline", "LongPromptXLPipeline",
           "LongPrompts", "load"]

# A model folder's own sampling defaults: {"scheduler": ddim | unipc, "config": {sampler,
# prompts and t5 keys}}; reference_import writes the authors' sample.py's.
SAMPLING_FILE = "sampling.json"
SCHEDULERS = ("ddim", "unipc")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / METRICS).exists()


def newest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "weights.safetensors").is_file())
    return found[-1] if found else None


def load(source: str | Path, *, checkpoint: str | Path | None = None, device: str | torch.device | None = None,
         dtype: torch.dtype = torch.float32, max_tokens: int | None = None,
         like: str | Path | None = None, t5: str | None = None, last: bool = False) -> LongPrompts:
    """The pipeline of a run directory (or of a model: a built-in or registered name, a
    diffusers folder, a hub id); see the module docstring. `checkpoint`: a checkpoint folder
    of the run (or its step) whose weights replace the exported ones. `max_tokens`
    overrides the run's. `like`: another run directory whose sampling and encoding
    settings (sampler.*, prompts.*; for a model, its t5 branch too) this pipeline takes, to
    compare a model with a run on equal terms. A model without a run samples at its UNet's
    native size (SD v1.5: 512 px) with the defaults of its folder's sampling.json, else
    of config.py (50 DDIM steps, guidance 7.5, 240 tokens). `t5`: the
    T5 encoder (t5.encoder: "tiny", a folder, a hub id) of a model that has a T5 branch,
    whose adapter is the model folder's text_adapter/; a run directory names its own.
    `last`: a run that selected its weights by validation (run.select_by, guard.py) exported
    the selected step's as lora/ (unet/, model/), which load takes; last=True takes the last
    step's (lora_last/, unet_last/) instead."""
    source = str(source)
    other = None
    if like is not None:
        if not is_run_dir(like):
            raise ValueError(f"like={str(like)!r} is not a run directory (no config.yaml and metrics.jsonl)")
        other = load_config(Path(like) / CONFIG)
    if is_run_dir(source):
        run_dir = Path(source)
        cfg = load_config(run_dir / CONFIG)
        weights, model = _run_weights(run_dir, cfg, checkpoint, last)
        scheduler = "ddim"
    else:
        if checkpoint is not None or last:
            raise ValueError(f"{'checkpoint=' if checkpoint is not None else 'last='} needs a run directory; "
                             f"{source!r} is a model (no config.yaml and metrics.jsonl)")
        scheduler, recorded = read_sampling_defaults(source)
        try:
            cfg = from_dict({**recorded, "model": {"pretrained": source}})
        except ConfigError as e:
            raise ValueError(f"{Path(source) / SAMPLING_FILE}: {e}") from None
        weights, model = ("base", None), source
        if t5 is not None:
            cfg = dataclasses.replace(cfg, t5=dataclasses.replace(cfg.t5, encoder=t5))
        elif other is not None and other.t5.encoder:  # a run's base: encoded as the run is
            cfg = dataclasses.replace(cfg, t5=other.t5)
        elif not cfg.t5.encoder and (Path(source) / ADAPTER_FOLDER / "config.json").is_file():
            raise ValueError(f"{source} has a T5 branch ({ADAPTER_FOLDER}/): pass its T5 encoder as t5= "
                             "(the reference's: google-t5/t5-large)")
    if other is not None:  # sampled as that run's validation samples
        cfg = dataclasses.replace(cfg, sampler=other.sampler, prompts=other.prompts)
        scheduler = "ddim"
    check_weights(*weights)
    parts = load_components(model, seed=cfg.model.random_seed, revision=cfg.model.revision,
                            family=cfg.model.family if is_run_dir(source) else "",
                            without_t5=cfg.model.without_t5 if is_run_dir(source) else False)
    kind, where = weights
    t5_cfg = cfg.t5
    if cfg.stage == 1 and kind != "checkpoint" and is_run_dir(source) and (Path(source) / ADAPTER_FOLDER).is_dir():
        t5_cfg = dataclasses.replace(t5_cfg, adapter=str(Path(source) / ADAPTER_FOLDER))  # the trained adapter
    parts.t5 = build_t5_branch(t5_cfg, cross_attention_dim=getattr(parts.unet.config, "cross_attention_dim", 0), model=model,
                               seed=cfg.model.random_seed)
    if kind == "checkpoint":
        from safetensors.torch import load_file

        trained_adapter = parts.t5.adapter if parts.t5 is not None and cfg.stage == 1 else None
        make_trainable(parts.unet, cfg.lora, trained_adapter, parts.family)
        load_trainable_state_dict(parts.unet, load_file(where / "weights.safetensors"), cfg.lora)
        if trained_adapter is not None:  # loaded: it runs in the encoder, not on the UNet
            remove_adapter(parts.unet).requires_grad_(False).eval()
    elif kind == "unet":  # the whole denoiser fine-tuned: its own class (a UNet, or a flow family's transformer)
        parts.unet = type(parts.unet).from_pretrained(where, torch_dtype=torch.float32).eval()
    pipe = parts.family.long_prompt_pipeline(parts, _scheduler(scheduler, parts, cfg))
    if kind == "lora":
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for CLIPTextModel": none were trained
        try:
            pipe.load_lora_weights(where)
        finally:
            diffusers_logging.set_verbosity(level)
    parts.unet.eval()  # the pipeline's denoiser: layers a LoRA added start in train mode (dropout)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype != torch.float32:  # the parts load in float32
        pipe.to(dtype=dtype)
    t5_branch = parts.t5.to(pipe.device, pipe.text_encoder.dtype) if parts.t5 is not None else None
    native = kind == "base" and like is None  # a model alone: its own size
    # FLUX's transformer names no sample size: its pipeline's default, 128 latents (1024 px)
    native_latents = getattr(parts.unet.config, "sample_size", None) or 128
    resolution = native_latents * pipe.vae_scale_factor if native else cfg.sampler.resolution
    prompts = dataclasses.replace(cfg.prompts, max_tokens=max_tokens or cfg.prompts.max_tokens)
    pipe.segment_encoder = parts.family.encoder(parts, prompts, resolution=resolution, device=pipe.device,
                                                dtype=pipe.text_encoder.dtype, t5=t5_branch)
    pipe.family = parts.family  # its pipeline_inputs turn segment_encoder's output into pipe(...)'s arguments
    pipe.longalign = {"family": parts.family.name, "source": source, "weights": kind, "from": str(where) if where else None,
                      "scheduler": scheduler, "num_steps": cfg.sampler.num_steps,
                      "guidance_scale": cfg.sampler.guidance_scale,
                      "resolution": resolution, "max_tokens": pipe.segment_encoder.max_tokens,
                      "t5": t5_cfg.encoder or None, "t5_tokens": t5_branch.max_tokens if t5_branch is not None else 0}
    return pipe


def read_sampling_defaults(model: str) -> tuple[str, dict]:
    """(scheduler, config sections) of a model folder's sampling.json, ("ddim", {}) when it
    has none: how the model is meant to be sampled when it is loaded alone."""
    path = Path(model) / SAMPLING_FILE
    if not path.is_file():
        return "ddim", {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("scheduler") not in SCHEDULERS or \
            not isinstance(data.get("config", {}), dict) or set(data.get("config", {})) - {"sampler", "prompts", "t5"}:
        raise ValueError(f"{path}: expected {{\"scheduler\": {' | '.join(SCHEDULERS)}, \"config\": {{sampler, prompts, "
                         f"t5 sections}}}}, got {str(data)[:200]}")
    return data["scheduler"], data.get("config", {})


def _scheduler(name: str, parts, cfg: Config):
    """The run's sampler (DDIM with the run's settings; a flow family's flow-matching
    scheduler), or diffusers' UniPC on the model's noise schedule with
    `sampler.timestep_spacing`, as the reference's sample.py builds it."""
    scheduler_config = parts.scheduler_config
    if name == "ddim":
        return parts.family.scheduler(scheduler_config, timestep_spacing=cfg.sampler.timestep_spacing,
                                      final=cfg.sampler.final)
    from diffusers import UniPCMultistepScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return UniPCMultistepScheduler.from_config({**config, "timestep_spacing": cfg.sampler.timestep_spacing})


def check_weights(kind: str, where: Path | None) -> None:
    """The run's weights are complete and finite before anything loads them (ValueError
    naming the file): a truncated export, or the NaN LoRA of a run that diverged, would
    otherwise give a raw library traceback or black images."""
    from longalign_rl.arguments import check_weights_file
    from longalign_rl.models import check_model_folder

    if kind == "merged":
        check_model_folder(where, key="the run's model/")
    elif kind == "checkpoint":
        check_weights_file(where / "weights.safetensors", f"checkpoint {where.name}")
    elif kind in ("lora", "unet"):
        files = sorted(where.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"the run's {kind}/: {where} holds no .safetensors file")
        for file in files:
            check_weights_file(file, f"the run's {kind}/")


def _run_weights(run_dir: Path, cfg: Config, checkpoint, last: bool = False) -> tuple[tuple[str, Path | None], str]:
    """(what to load on the model, where) and the model to load it on, for a run directory."""
    if last:
        if checkpoint is not None:
            raise ValueError("last=True and checkpoint= name two different weights; pass one")
        if cfg.stage == 1 and (run_dir / ADAPTER_FOLDER).is_dir():
            raise ValueError(f"{run_dir}: its trained T5 adapter is exported for the selected step only; load the "
                             "last step's weights with checkpoint= (its step)")
        for name, kind in ((LORA, "lora"), (UNET, "unet")):
            if (run_dir / f"{name}_last").is_dir():
                return (kind, run_dir / f"{name}_last"), cfg.model.pretrained
        raise FileNotFoundError(f"{run_dir} has no lora_last/ or unet_last/: it selected no weights by validation "
                                "(run.select_by), so its lora/ (unet/, model/) are the last step's already")
    if checkpoint is not None:
        folder = run_dir / f"checkpoint_{int(checkpoint):06d}" if str(checkpoint).isdigit() else Path(checkpoint)
        if not (folder / "weights.safetensors").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint!r}: no weights.safetensors in {folder}")
        return ("checkpoint", folder), cfg.model.pretrained
    if cfg.stage == 1 and (run_dir / MODEL).is_dir():
        return ("merged", run_dir / "model"), str(run_dir / "model")
    if (run_dir / LORA).is_dir():
        return ("lora", run_dir / LORA), cfg.model.pretrained
    if (run_dir / UNET).is_dir():
        return ("unet", run_dir / UNET), cfg.model.pretrained
    newest = newest_checkpoint(run_dir)
    if newest is None:
        raise FileNotFoundError(f"{run_dir}: the run exported nothing (lora/, unet/, model/) and has no checkpoint yet")
    log.warning("%s exported nothing yet (a run in progress or stopped): using its newest checkpoint %s",
                run_dir, newest.name)
    return ("checkpoint", newest), cfg.model.pretrained
