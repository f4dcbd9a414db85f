"""Ground truth on generated images: the exact checker's accuracy per sentence position.

`ground_truth` turns a batch of images and their captions into per-sample statistics
("gt/colour/1" ... , "gt/background") that the `run.metrics` hook
`shapesworld.plugin:ground_truth` logs for every rollout; `evaluate_model` samples a model
on held-out captions with either encoding and returns the accuracies. Pure torch/numpy.

"gt/background" is an attribute no reward here scores: the fraction of the pixels outside
every shape's box (the margins between cells) that read as background, as the preamble
says ("on a black background"). A reward that is being gamed with stray colour shows there.
"""

from __future__ import annotations

import numpy as np
import torch

from shapesworld.checker import _labels, check
from shapesworld.world import WorldConfig, caption, sample_scene, to_uint8

# Segment-encoded length of a default ShapesWorld caption: preamble (1 + 28 states) and
# 4 cell sentences (1 + 19 or 20 each), at most 113.
SEGMENT_MAX_TOKENS = 120
# The ShapesWorld flow model (an SD3 transformer, shapesworld/pretrain_flow.py) has no T5:
# the pipeline's zero T5 tokens, one of them (prompts.t5_max_tokens in its configs).
T5_TOKENS = 1


def margin_mask(cfg: WorldConfig) -> np.ndarray:
    """bool [H, W]: pixels outside every cell's shape box."""
    mask = np.ones((cfg.image_size, cfg.image_size), dtype=bool)
    for row in range(cfg.grid):
        for col in range(cfg.grid):
            top, left = row * cfg.cell_size + cfg.margin, col * cfg.cell_size + cfg.margin
            mask[top : top + cfg.box_size, left : left + cfg.box_size] = False
    return mask


def background_clean(image, cfg: WorldConfig) -> float:
    """Fraction of the margin pixels that read as background (1.0 on a clean render)."""
    return float((_labels(to_uint8(image), cfg)[margin_mask(cfg)] == 0).mean())


def ground_truth(images: torch.Tensor, prompts: list[str], cfg: WorldConfig) -> dict[str, torch.Tensor]:
    """Per-sample statistics, each a float tensor [B]: "gt/colour/i", "gt/shape/i" (i = 1-based
    cell-sentence position: 1 or 0) and "gt/background"."""
    stats: dict[str, list[float]] = {}
    for image, prompt in zip(images.detach().float().cpu(), prompts, strict=True):
        for r in check(image, prompt, cfg):
            stats.setdefault(f"gt/colour/{r.index + 1}", []).append(float(r.colour_ok))
            stats.setdefault(f"gt/shape/{r.index + 1}", []).append(float(r.shape_ok))
        stats.setdefault("gt/background", []).append(background_clean(image, cfg))
    return {k: torch.tensor(v) for k, v in stats.items()}


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, list[float] | float]:
    """{"colour": [per position], "shape": [...], "background": mean} from ground_truth()."""
    n = len([k for k in stats if k.startswith("gt/colour/")])
    return {
        "colour": [float(stats[f"gt/colour/{i}"].mean()) for i in range(1, n + 1)],
        "shape": [float(stats[f"gt/shape/{i}"].mean()) for i in range(1, n + 1)],
        "background": float(stats["gt/background"].mean()),
    }


def draw_captions(cfg: WorldConfig, n: int, seed: int) -> list[str]:
    """n captions of random scenes, deterministic from the seed."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(cfg, rng), cfg) for _ in range(n)]


@torch.no_grad()
def generate(parts, encoder, prompts: list[str], *, seed: int, num_steps: int = 20, guidance_scale: float = 5.0,
             resolution: int = 32, batch: int = 64, eta: float = 0.0) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from DDIM with guidance, by the framework's sampler over
    `parts` (models.Components), prompts encoded by `encoder` (`make_encoder`), in float32
    on the CPU. `eta` > 0: the stochastic sampler policy-gradient runs train (DDIM's eta, a
    flow model's SDE noise level; sample_trajectory)."""
    from longalign_rl.config import SamplerConfig
    from longalign_rl.sampling.sampler import build_sampler, sample_trajectory
    from longalign_rl.vae import decode

    settings = SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, resolution=resolution,
                             num_grad_steps=1, timestep_spacing="trailing", precision="fp32")
    sampler = build_sampler(settings, parts, encoder=encoder)
    images = []
    for i in range(0, len(prompts), batch):
        chunk, chunk_seed = prompts[i : i + batch], seed * 100_003 + i
        if eta > 0:
            final = sample_trajectory(sampler, chunk, chunk_seed, eta, num_recorded=1).final_latents
        else:
            final = sampler.sample(chunk, seed=chunk_seed).final_latents
        images.append(decode(parts.vae, final))
    return torch.cat(images)


def make_encoder(parts, encoding: str, max_tokens: int = SEGMENT_MAX_TOKENS):
    """The model family's own prompt encoder (families/): "segment" (sentence by sentence, up to
    `max_tokens` states) or "truncated" (the prompt whole, cut at 77 tokens: exactly the
    pipeline's encoding)."""
    from longalign_rl.config import PromptConfig

    if encoding not in ("segment", "truncated"):
        raise ValueError(f"encoding must be 'segment' or 'truncated', got {encoding!r}")
    prompts = (PromptConfig(max_tokens=max_tokens, t5_max_tokens=T5_TOKENS) if encoding == "segment"
               else PromptConfig(max_tokens=77, split="none", t5_max_tokens=T5_TOKENS))
    return parts.family.encoder(parts, prompts, resolution=WorldConfig().image_size)


def evaluate(parts, encoding: str, prompts: list[str], *, seed: int, cfg: WorldConfig | None = None,
             **sampling) -> tuple[torch.Tensor, dict]:
    """Sample `parts` (models.Components) on `prompts` with `encoding`; the images and the
    ground-truth summary (`summarize`). `sampling` goes to `generate`."""
    cfg = cfg or WorldConfig()
    images = generate(parts, make_encoder(parts, encoding), prompts, seed=seed, resolution=cfg.image_size, **sampling)
    return images, summarize(ground_truth(images, prompts, cfg))


def evaluate_model(model: str, encoding: str, *, n: int = 256, seed: int = 12345,
                   cfg: WorldConfig | None = None, **sampling) -> dict:
    """Ground-truth accuracy per position of `model` (a name or folder for
    models.load_components) on n held-out captions."""
    from longalign_rl.models import load_components

    cfg = cfg or WorldConfig()
    return evaluate(load_components(model), encoding, draw_captions(cfg, n, seed), seed=seed, cfg=cfg, **sampling)[1]
