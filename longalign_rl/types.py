"""Records that cross module and process boundaries: a sampler actor's `Rollout` goes to a
trainer worker; a reward's `RewardOutput` goes to the loss and the metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One batch of DDIM trajectories, reduced to what reward-backprop training needs.

    Shapes: B prompts, K gradient steps, latents C x h x w, L = max_tokens, H = hidden.
    All tensors are float32 on the CPU.
    """

    prompts: list[str]
    cond: torch.Tensor           # [B, L, H] segment-encoded prompts
    uncond: torch.Tensor         # [1, L, H] the empty prompt through the same path
    grad_indices: list[int]      # which of the DDIM steps are gradient steps
    grad_timesteps: torch.Tensor  # [K] their timesteps
    grad_latents: torch.Tensor   # [B, K, C, h, w] UNet inputs x_{t_k} at those steps
    grad_eps: torch.Tensor       # [B, K, C, h, w] guided noise predictions used there
    coeffs: torch.Tensor         # [K] float64, c_k = d final_latents / d eps_k
    final_latents: torch.Tensor  # [B, C, h, w] the chain's output (before the VAE)
    policy_version: int          # optimiser steps behind the weights that sampled this
    seed: int                    # seed of the initial noise and of the gradient-step offset
    seconds: float               # wall time the actor spent sampling

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RewardOutput:
    """What a reward returns for a batch of B images."""

    total: torch.Tensor  # [B] the reward that is optimised (carries the graph if differentiable)
    components: dict[str, torch.Tensor]  # named [B] parts, logged
    segment_scores: list[torch.Tensor] | None = None  # per prompt: [n_segments], logged
