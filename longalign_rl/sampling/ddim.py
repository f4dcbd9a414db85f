"""Deterministic DDIM with classifier-free guidance, and the linear maps that let a trainer
replay a trajectory's gradient without re-running it (docs/method.md section 3). A
flow-matching model's Euler ODE (SD3, FLUX: sampling/flow.py) has the same linear form
and goes through the same functions (`step_coefficients`, `deterministic_step`).

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

from longalign_rl.families.sd import SD
from longalign_rl.sampling import flow


def derive_seed(seed: int, index: int) -> int:
    """A seed of its own for the `index`-th use of `seed`."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def dropout_seed(sample_seed: int, step: int) -> int:
    """The seed of the dropout masks of one chain's UNet call at DDIM step `step`: the same in
    the sampler that drew the chain and in the trainer that replays the step."""
    return derive_seed(sample_seed, step)


def batch_dropout_seed(seeds: list[int]) -> int:
    """The seed of a batch's dropout masks (sampler.train_mode): its first sample's. Masks are
    drawn for the batch as a whole, so, unlike the noise, they depend on how the global batch
    is split (docs/scaling.md)."""
    return int(seeds[0])


def dropout_layers(module) -> list[torch.nn.Dropout]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Dropout)]


def set_dropout(module, active: bool) -> None:
    """Turn every dropout layer of `module` (the LoRA's) on or off, and leave it so.

    A trainer sets this once, before its first forward pass: with activation checkpointing
    the backward pass re-runs each block's forward, and that recompute reads the layers'
    modes as they are *then*. A mode switched on or off around the forward pass only would
    be switched back by the time of the recompute, which then drops where the forward did
    not (CheckpointError: the recomputed tensors differ from the saved ones) or, worse,
    silently draws other masks."""
    for m in dropout_layers(module):
        m.train(active)


@contextlib.contextmanager
def dropout_masks(unet, seed: int | None):
    """For sampling, without a graph: inside, every dropout layer of `unet` active with masks
    drawn from `seed`, or inactive when `seed` is None; the layers' modes and the global RNG
    are restored after.

    `sampler.train_mode` samples as the reference does, with the LoRA's dropout on; the
    trainer then replays a step with `replay_dropout` under the same seed, so that its UNet
    call draws the same masks (same batch, same call) and the replay stays exact. Without
    train_mode both sides run without dropout, for the same reason. It refuses to run with
    gradients on: a forward pass with a graph may be recomputed in the backward pass, after
    the modes are restored (see `set_dropout`)."""
    if torch.is_grad_enabled():
        raise RuntimeError("dropout_masks switches dropout layers for the forward pass only; with gradients on use "
                           "set_dropout once and replay_dropout (an activation-checkpointing recompute in the "
                           "backward pass would see the switched-back modes)")
    layers = dropout_layers(unet)
    modes = [m.training for m in layers]
    set_dropout(unet, seed is not None)
    try:
        with seeded(unet, seed):
            yield
    finally:
        for m, mode in zip(layers, modes):
            m.train(mode)


@contextlib.contextmanager
def replay_dropout(unet, seed: int | None):
    """For a trainer's forward pass with a graph: the masks `dropout_masks(unet, seed)` drew in
    the sampler (`seed`), or none (None). The layers' modes are not switched here, only
    checked: they must already be what the sampler used, set once with `set_dropout` (a
    checkpointed block is recomputed in the backward pass, outside this scope; the recompute
    restores the RNG state of its forward pass itself, so it draws the same masks)."""
    wrong = [m for m in dropout_layers(unet) if m.p > 0 and m.training != (seed is not None)]
    if wrong:
        state = "off" if seed is not None else "on"
        raise RuntimeError(f"{len(wrong)} dropout layers of the trainer's UNet are {state}, but its samples were drawn "
                           f"with dropout {'on' if seed is not None else 'off'}: call set_dropout(unet, "
                           f"{seed is not None}) once before training (sampler.train_mode)")
    with seeded(unet, seed):
        yield


@contextlib.contextmanager
def seeded(module, seed: int | None):
    """Inside, the global RNG (and that of `module`'s GPU) seeded with `seed` (untouched when
    None); restored after."""
    if seed is None:
        yield
        return
    device = next(module.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


PLAIN = SD()  # a UNet whose whole conditioning is its cross-attention tokens


def guided_eps(unet, latents, timestep, cond, uncond, guidance_scale: float, family=None) -> torch.Tensor:
    """The guided prediction (noise, or a flow model's velocity) at `latents`: the family's
    guidance (Family.guided; classifier-free, one batched denoiser call for both halves,
    unless the family has its own, as FLUX's guidance embedding). `family`
    (Components.family) reads its conditioning back into the call (families/base.py);
    None: SD 1.x's, all of `cond` is the cross-attention tokens."""
    return (family or PLAIN).guided(unet, latents, timestep, cond, uncond, guidance_scale)


def deterministic_step(scheduler, i: int, t, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Step i (timestep t) of the deterministic chain: DDIM with eta 0 by the scheduler's own
    `step`, or a flow model's Euler ODE step (flow.euler_step, by index: no scheduler state)."""
    if flow.is_flow(scheduler):
        return flow.euler_step(scheduler, i, x, eps)
    return scheduler.step(eps, t, x, eta=0.0).prev_sample


@torch.no_grad()
def step_coefficients(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with step i: x_{i+1} = a_i x_i + b_i eps_i, for the scheduler's set timesteps
    (a flow model's Euler ODE: a_i = 1, b_i = sigma_{i+1} - sigma_i)."""
    if flow.is_flow(scheduler):
        return flow.euler_coefficients(scheduler)
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
