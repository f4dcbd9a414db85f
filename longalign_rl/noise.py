"""Where every chain starts: one latent per sample, each from its own seed. Shared by the
samplers (sampling/sampler.py), validation and the inference pipelines (families/pipelines.py),
so that the same prompt and seed give the same image everywhere. Pure torch."""

from __future__ import annotations

import torch


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One starting latent per sample, each from its own seed: [len(seeds), *shape], float32
    on the CPU. A sample's noise does not depend on the batch it is drawn in, so validation
    (run.validation) and the inference helper (longalign_rl.pipeline) draw the same images
    one at a time or together."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
