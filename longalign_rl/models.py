"""Build or load the diffusion model's parts: UNet, VAE, text encoder, tokenizer, scheduler.

`model` is one of
- a built-in architecture, random-initialised from the JSON configs in
  `longalign_rl/model_configs/<name>/` with a fixed seed, so that every process (sampler
  actor or trainer worker) builds the same weights without sharing a file: "tiny"
  (test-sized parts of SD v1.5's classes) or "sd15-random" (SD v1.5's architecture, for
  benchmarks) - see `builtin_models()`;
- a shipped model, trained here and stored in `longalign_rl/model_weights/<name>/`:
  "shapesworld" (the ShapesWorld base, pretrained on 77-token captions) and
  "shapesworld-stage1" (that base after stage 1), made by
  `python -m longalign_rl.shapesworld.pretrain` - see `shipped_models()`;
- a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/);
- a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5" (needs network).

The tokenizer of "tiny" and of the shipped models is the real CLIP BPE tokenizer, built offline from the
vocabulary file that open_clip ships, so token counts in tests are real.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config names
CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "model_weights"
SHIPPED_BASE = "shapesworld"


@dataclass
class Components:
    """The frozen and trainable parts of a UNet/CLIP latent diffusion model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict


def builtin_models() -> list[str]:
    """Names of the architectures built from configs in the package (random weights)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if (p / "unet.json").is_file())


def shipped_models() -> list[str]:
    """Names of the trained models stored in the package (`model_weights/<name>/`)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "unet").is_dir())


def vae_scale_factor(vae) -> int:
    """Pixels per latent along a side: 8 for SD's VAE (three downsamplings)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _read_config(model: str, part: str) -> dict:
    config = json.loads((CONFIG_DIR / model / f"{part}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict, list]:
    """CLIP's byte-level BPE vocabulary and merges, from the file open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 77):
    """The CLIP tokenizer SD v1.5 uses, built offline (49,408 entries; pad = <|endoftext|>)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    check_clip_tokenizer(tokenizer, "the offline CLIP tokenizer")
    return tokenizer


def check_clip_tokenizer(tokenizer, where: str) -> None:
    """Offline, `from_pretrained` can return a useless 3-token tokenizer without raising."""
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{where} has {len(tokenizer)} entries, not CLIP's {CLIP_VOCAB_SIZE}: it did not load")


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


def load_shipped(name: str) -> Components:
    """A shipped model; parts its folder lacks (a stage-1 model ships only its UNet) are
    the shipped base's, "shapesworld"."""
    return load_pretrained(str(WEIGHTS_DIR / SHIPPED_BASE), unet_from=WEIGHTS_DIR / name)


def load_components(model: str, *, seed: int = 0, revision: str | None = None) -> Components:
    """All parts frozen (requires_grad False, eval mode); the caller adds what trains."""
    if model in builtin_models():
        parts = build_random(model, seed)
    elif model in shipped_models():
        parts = load_shipped(model)
    else:
        parts = load_pretrained(model, revision)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.requires_grad_(False).eval()
    return parts


def make_scheduler(scheduler_config: dict, *, timestep_spacing: str):
    """A deterministic-capable DDIM scheduler on the model's own noise schedule."""
    from diffusers import DDIMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(timestep_spacing=timestep_spacing, clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(config)
