"""Deterministic DDIM with classifier-free guidance, and the linear maps that let a trainer
replay a trajectory's gradient without re-running it (METHOD.md section 5).

With eta = 0 each DDIM update is linear in the latent and the noise prediction:
    x_{i+1} = a_i * x_i + b_i * eps_i
so the final latent is x_N = (prod a) x_0 + sum_i c_i eps_i with c_i = b_i * prod_{j>i} a_j.
A change of eps_k reaches x_N multiplied by c_k: that is all the trainer needs to know
about the no-gradient steps. The a_i and b_i are read off the diffusers scheduler itself
(two probe calls of `scheduler.step`), so they follow whatever schedule it implements.

Pure torch: no ray, no deepspeed.
"""

from __future__ import annotations

import contextlib

import torch


def dropout_seed(sample_seed: int, step: int) -> int:
    """The seed of the dropout masks of one chain's UNet call at DDIM step `step`: the same in
    the sampler that drew the chain and in the trainer that replays the step."""
    return (int(sample_seed) * 1_000_003 + int(step)) % (2**63 - 1)


@contextlib.contextmanager
def dropout_masks(unet, seed: int | None):
    """Inside: every dropout layer of `unet` (the LoRA's) active with masks drawn from `seed`,
    or inactive when `seed` is None; the layers' modes and the global RNG are restored after.

    `sampler.train_mode` samples as the reference does, with the LoRA's dropout on; the
    trainer then replays a step under the same seed, so that its UNet call draws the same
    masks (same batch, same call) and the replay stays exact. Without train_mode both sides
    run without dropout, for the same reason. Activation checkpointing restores the RNG
    state before recomputing, so the backward pass sees the same masks too."""
    layers = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout)]
    modes = [m.training for m in layers]
    for m in layers:
        m.train(seed is not None)
    device = next(unet.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


def guided_eps(unet, latents, timestep, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guided noise prediction, one batched UNet call for both halves."""
    dtype = next(unet.parameters()).dtype
    x = torch.cat([latents, latents]).to(dtype)
    context = torch.cat([uncond.expand_as(cond), cond]).to(dtype)
    eps_uncond, eps_cond = unet(x, timestep, encoder_hidden_states=context).sample.to(latents.dtype).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def step_coefficients(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with step i: x_{i+1} = a_i x_i + b_i eps_i, for the scheduler's set timesteps."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    a, b = [], []
    for t in scheduler.timesteps:
        a.append(scheduler.step(zero, t, one, eta=0.0).prev_sample.item())
        b.append(scheduler.step(one, t, zero, eta=0.0).prev_sample.item())
    return torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def replay_coefficients(a: torch.Tensor, b: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """c_k = d x_N / d eps_k for the steps in `indices`: b_k times every later a_j."""
    return torch.stack([b[k] * torch.prod(a[k + 1 :]) for k in indices])


def grad_step_indices(num_steps: int, num_grad_steps: int, offset: int) -> list[int]:
    """Every (num_steps // num_grad_steps)-th step from `offset` (reference: 5 of 50, offset 0..9)."""
    stride = num_steps // num_grad_steps
    if not 0 <= offset < stride:
        raise ValueError(f"offset {offset} is outside 0..{stride - 1}")
    return [offset + stride * j for j in range(num_grad_steps)]
