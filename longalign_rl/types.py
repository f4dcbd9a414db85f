"""Records that cross module and process boundaries: a sampler actor's `Rollout` (reward
backpropagation) or `Trajectory` (policy gradients) goes to a trainer worker; a reward's
`RewardOutput` goes to the loss and the metrics."""

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
    seed: int                    # the batch-wide choice: which DDIM steps are gradient steps
    seeds: list[int]             # [B] each sample's own: its initial noise (the first's: dropout masks)
    seconds: float               # wall time the actor spent sampling

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Trajectory:
    """One batch of stochastic DDIM trajectories (eta > 0) for policy-gradient training:
    for the K recorded (to be trained) steps, each step's input and output latents and its
    log-probability under the sampling weights (sampling/stochastic.py). Shapes: B samples,
    latents C x h x w; float32 on the CPU. Recorded step k is DDIM step indices[k]:
    x_{i+1} ~ N(a_k x_i + b_k eps_i, sigma_k^2)."""

    prompts: list[str]
    cond: torch.Tensor           # [B, L, H] segment-encoded prompts
    uncond: torch.Tensor         # [1, L, H]
    indices: list[int]           # [K] which DDIM steps were recorded, ascending
    timesteps: torch.Tensor      # [K] their timesteps
    latents: torch.Tensor        # [B, K, C, h, w] x_i, the UNet's input at step i
    next_latents: torch.Tensor   # [B, K, C, h, w] x_{i+1}, what step i drew
    log_probs: torch.Tensor      # [B, K] log-probability of each step under the sampling weights
    a: torch.Tensor              # [K] float64
    b: torch.Tensor              # [K] float64
    sigma: torch.Tensor          # [K] float64, all > 0
    final_latents: torch.Tensor  # [B, C, h, w]
    policy_version: int
    seed: int                    # the batch-wide choice: which DDIM steps are recorded
    seeds: list[int]             # [B] each sample's own: its noise (the first's: dropout masks)
    seconds: float

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class RewardOutput:
    """What a reward returns for a batch of B images."""

    total: torch.Tensor  # [B] the reward that is optimised (carries the graph if differentiable)
    components: dict[str, torch.Tensor]  # named [B] parts, logged
    segment_scores: list[torch.Tensor] | None = None  # per prompt: [n_segments], logged
