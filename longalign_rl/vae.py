"""Between pixels and latents: SD's VAE convention, used by every algorithm and every world.

Images are float `[B, 3, H, W]` in [0, 1]; the VAE works in [-1, 1]; latents are scaled by
the VAE's `scaling_factor` (0.18215 for SD v1.5), after its `shift_factor` is taken off
where it has one (SD3's and FLUX's VAEs, as their pipelines do). Pure torch/diffusers.
"""

from __future__ import annotations

import torch


def placed(vae, device, dtype: torch.dtype, fp16_overflows: bool = False):
    """The VAE on `device` in `dtype`; with `fp16_overflows` (Family.vae_fp16_overflows: SDXL's
    decoder overflows float16 to NaN images), a VAE whose config says `force_upcast` stays
    float32 when float16 is asked for, as StableDiffusionXLPipeline upcasts it. `decode` casts
    the latents to whatever the VAE holds."""
    if fp16_overflows and dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        dtype = torch.float32
    return vae.to(device, dtype)


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], float32, differentiable (SD's VAE convention)."""
    dtype = next(vae.parameters()).dtype
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:  # SD3, FLUX
        latents = latents + shift
    images = vae.decode(latents.to(dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Images `[B, 3, H, W]` in [0, 1] -> latents scaled by the VAE's scaling factor.

    A *sample* of the posterior, not its mode, as diffusers' text-to-image training scripts
    (and SD's own training) do: the posterior's spread is small and acts as a slight
    augmentation, and it is what the UNet was trained to denoise. With a list of generators,
    each sample's draw comes from its own (diffusers' `randn_tensor`).
    """
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"images must lie in [0, 1], got [{float(images.min()):.3g}, {float(images.max()):.3g}]")
    dtype = next(vae.parameters()).dtype
    dist = vae.encode((images * 2 - 1).to(dtype)).latent_dist  # SD's VAE expects [-1, 1]
    latents = dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:  # SD3, FLUX
        latents = latents - shift
    return latents * vae.config.scaling_factor
