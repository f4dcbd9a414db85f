"""Stage 1: supervised long-text fine-tuning with the denoising loss (docs/method.md section 4).

Pure torch/diffusers: no ray, no deepspeed. The reference trains a LoRA on the UNet with
the standard epsilon-MSE loss on long-caption image pairs whose captions are segment
encoded ([B, 240, H]); timesteps uniform in [0, 1000), caption dropout 0.1. The noise
schedule is the scheduler's (`add_noise`, `get_velocity`), not a copy of it.

A flow-matching model (SD3, FLUX: a FlowMatchEulerDiscreteScheduler) trains as diffusers'
SD3 and FLUX training scripts train it: sigma from SD3's logit-normal density (mean 0,
std 1) indexed into the scheduler's training sigmas, x_s = (1 - s) x_0 + s noise, and the
MSE to the velocity noise - x_0, unweighted (sampling/flow.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longalign_rl.sampling import flow
from longalign_rl.sampling.ddim import PLAIN

# Reference: 10% of captions replaced by the empty prompt, so the model keeps learning the
# unconditional branch that classifier-free guidance needs.
CAPTION_DROPOUT = 0.1


# One generator for the whole batch, or one per sample (so that a sample's draws do not
# depend on the batch it is in: training/denoising.py, docs/scaling.md), or None.
Generators = torch.Generator | list[torch.Generator] | None


def _draw(generator: Generators, n: int, fallback: torch.device, draw) -> torch.Tensor:
    """`draw(generator, count, device)` for `n` samples: once from one generator, or once per
    sample from each of `n` generators. Random numbers are drawn where the generator lives (a
    CUDA generator cannot fill CPU tensors)."""
    if isinstance(generator, list):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for a batch of {n}")
        return torch.cat([draw(g, 1, g.device) for g in generator])
    return draw(generator, n, generator.device if generator is not None else fallback)


def caption_dropout(cond: torch.Tensor, uncond: torch.Tensor, p: float,
                    generator: Generators = None) -> torch.Tensor:
    """Each sample's conditioning `[B, L, H]` replaced by `uncond` (`[B, L, H]` or `[L, H]`)
    with probability `p`; a new tensor, `cond` is left alone."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout probability must lie in [0, 1], got {p}")
    u = _draw(generator, cond.shape[0], cond.device, lambda g, k, d: torch.rand(k, generator=g, device=d))
    drop = (u < p).to(cond.device).view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(drop, uncond.to(cond.dtype).expand_as(cond), cond)


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict, by the scheduler's `prediction_type`."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: expected 'epsilon' or 'v_prediction'")


def denoising_loss_at(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor,
                      timesteps: torch.Tensor, noise: torch.Tensor, family=None) -> torch.Tensor:
    """The MSE between the UNet's prediction and its target at given timesteps and noise.
    `family` (Components.family) reads `cond` back into the call; None: SD 1.x's."""
    dtype = next(unet.parameters()).dtype
    if flow.is_flow(scheduler):
        noisy = flow.noisy_latents(latents, noise, flow.sigmas_at(scheduler, timesteps))
        target = flow.velocity_target(latents, noise)
    else:
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = denoising_target(scheduler, latents, noise, timesteps)
    pred = (family or PLAIN).predict(unet, noisy.to(dtype), timesteps, cond.to(dtype))
    return F.mse_loss(pred.float(), target.float())  # the mean in float32 whatever the UNet's dtype


def denoising_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, generator: Generators = None,
                   family=None):
    """Loss (with graph) and statistics for one batch of latents `[B, 4, h, w]` (already
    scaled by the VAE's scaling factor) and conditioning `[B, L, H]` (after dropout).

    Timesteps are uniform integers in [0, num_train_timesteps) (a flow model's: its training
    sigmas at logit-normal draws, flow.training_sigmas) and the noise N(0, 1), both drawn
    from `generator` (or each sample's from its own), so seeded generators give the same loss.
    Statistics are 1-D tensors as the worker skeleton averages them (training/worker.py): "loss" (one value) and
    "timestep" (one per sample; its mean is the mean timestep).
    """
    n, total = latents.shape[0], scheduler.config.num_train_timesteps
    if flow.is_flow(scheduler):
        u = _draw(generator, n, latents.device, lambda g, k, d: flow.logit_normal(g, k, d))
        timesteps, _ = flow.training_sigmas(scheduler, u)
    else:
        timesteps = _draw(generator, n, latents.device,
                          lambda g, k, d: torch.randint(0, total, (k,), generator=g, device=d))
    noise = _draw(generator, n, latents.device,
                  lambda g, k, d: torch.randn((k, *latents.shape[1:]), generator=g, device=d, dtype=torch.float32))
    timesteps, noise = timesteps.to(latents.device), noise.to(latents.device, latents.dtype)
    loss = denoising_loss_at(unet, scheduler, latents, cond, timesteps, noise, family)
    stats = {"loss": loss.detach().reshape(1).float(), "timestep": timesteps.float()}
    return loss, stats
