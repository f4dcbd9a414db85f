"""The sampler: segment-encode prompts, run the no-gradient DDIM chain, record a Rollout
(deterministic DDIM, for reward backpropagation) or a Trajectory (`sample_trajectory`:
stochastic DDIM with every step's log-probability, for policy gradients).

Plain torch, so the same code runs inside a Ray actor (`sampling/group.py`), in a benchmark
on a GPU machine without Ray, in a world's evaluation harness, and in tests.
`build_sampler` assembles one from the config and the model's parts, for all of them.
"""

from __future__ import annotations

import time

import torch

from longalign_rl.config import PromptConfig, SamplerConfig
from longalign_rl.models import DTYPES, Components, vae_scale_factor
from longalign_rl.noise import initial_noise
from longalign_rl.sampling.ddim import (PLAIN, batch_dropout_seed, derive_seed, deterministic_step, dropout_masks,
                                        dropout_seed, grad_step_indices, guided_eps, replay_coefficients,
                                        step_coefficients)
from longalign_rl.sampling.stochastic import stochastic_coefficients, stochastic_step
from longalign_rl.types import Rollout, Trajectory


class Sampler:
    def __init__(
        self,
        unet,
        encoder,
        scheduler,
        *,
        num_steps: int,
        guidance_scale: float,
        resolution: int,
        num_grad_steps: int,
        vae_scale_factor: int = 8,
        train_mode: bool = False,
        family=None,
        latent_channels: int | None = None,
        grad_steps: str = "strided",
    ):
        self.unet = unet
        self.family = family  # Components.family: how the denoiser reads the conditioning (None: SD 1.x)
        self.encoder = encoder
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        if resolution % vae_scale_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale factor {vae_scale_factor}")
        self.latent_size = resolution // vae_scale_factor  # SD's VAE: 8
        # the VAE's latent channels (a UNet takes as many; FLUX's transformer takes them packed)
        channels = latent_channels or unet.config.in_channels
        self.latent_shape = (channels, self.latent_size, self.latent_size)
        # the initial noise's scale: DDIM's init_noise_sigma (1 for SD's); a flow model starts at sigma 1
        self.init_noise_sigma = getattr(scheduler, "init_noise_sigma", 1.0)
        self.num_grad_steps = num_grad_steps
        if grad_steps not in ("strided", "last"):
            raise ValueError(f"sampler.grad_steps must be strided or last, got {grad_steps!r}")
        self.grad_steps = grad_steps  # sampler.grad_steps: which steps carry the gradient
        self.train_mode = train_mode  # sampler.train_mode: the LoRA's dropout on, seeded per call
        (family or PLAIN).set_timesteps(scheduler, num_steps, self.latent_size)
        self.a, self.b = step_coefficients(scheduler)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def dropout(self, seed: int, step: int):
        """The dropout of the chain from `seed` at step `step` (ddim.dropout_masks): seeded
        masks with train_mode, none without."""
        return dropout_masks(self.unet, dropout_seed(seed, step) if self.train_mode else None)

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int, policy_version: int = 0, seeds: list[int] | None = None
               ) -> Rollout:
        """Deterministic DDIM of `prompts`, the gradient steps' inputs recorded. `seed`: the
        batch-wide choice (which steps carry the gradient); `seeds`: each sample's own (its
        initial noise; by default derived from `seed`). A sample is a function of its own
        seed and `seed` only, whatever batch it is drawn in (docs/scaling.md)."""
        start = time.perf_counter()
        seeds = sample_seeds(seed, len(prompts)) if seeds is None else [int(s) for s in seeds]
        generator = torch.Generator().manual_seed(seed)
        if self.grad_steps == "last":  # DRaFT-K: the chain's last K steps
            indices = list(range(self.num_steps - self.num_grad_steps, self.num_steps))
        else:
            stride = self.num_steps // self.num_grad_steps
            offset = int(torch.randint(stride, (1,), generator=generator))
            indices = grad_step_indices(self.num_steps, self.num_grad_steps, offset)

        cond = self.encoder(prompts).float()
        uncond = self.encoder.uncond(1).float()
        latents = (initial_noise(seeds, self.latent_shape) * self.init_noise_sigma).to(self.device)
        cond_d, uncond_d = cond.to(self.device), uncond.to(self.device)

        grad_latents, grad_eps = [], []

        def step(i, t, x, eps):  # deterministic DDIM, the gradient steps' inputs recorded
            if i in indices:
                grad_latents.append(x.cpu())
                grad_eps.append(eps.cpu())
            return deterministic_step(self.scheduler, i, t, x, eps)

        latents = denoise(self, latents, cond_d, uncond_d, step, batch_dropout_seed(seeds))

        return Rollout(
            prompts=list(prompts),
            cond=cond.cpu(),
            uncond=uncond.cpu(),
            grad_indices=indices,
            grad_timesteps=self.scheduler.timesteps[indices].clone(),
            grad_latents=torch.stack(grad_latents, dim=1),
            grad_eps=torch.stack(grad_eps, dim=1),
            coeffs=replay_coefficients(self.a, self.b, indices),
            final_latents=latents.float().cpu(),
            policy_version=policy_version,
            seed=seed,
            seeds=seeds,
            seconds=time.perf_counter() - start,
        )


def denoise(sampler: "Sampler", latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, step,
            seed: int | None = None) -> torch.Tensor:
    """The one DDIM loop: at every timestep of the sampler's schedule the guided noise
    prediction, under the chain's dropout (`sampler.dropout(seed, i)`; none when `seed` is
    None), then `step(i, t, latents, eps)` gives the next latents: deterministic DDIM or a
    stochastic step, with whatever the caller records. Returns the final latents."""
    for i, t in enumerate(sampler.scheduler.timesteps):
        with sampler.dropout(seed, i) if seed is not None else dropout_masks(sampler.unet, None):
            eps = guided_eps(sampler.unet, latents, t, cond, uncond, sampler.guidance_scale, sampler.family)
        latents = step(i, t, latents, eps)
    return latents


def sample_seeds(seed: int, count: int) -> list[int]:
    """`count` samples' own seeds derived from one batch seed: for a caller that draws one
    batch and does not care how its samples would be drawn in another (tests, benchmarks)."""
    return [derive_seed(seed, 1_000_000 + i) for i in range(count)]


def noise_generators(seeds: list[int]) -> list[torch.Generator]:
    """One generator per sample for its stochastic steps' noise, apart from its initial noise."""
    return [torch.Generator().manual_seed(derive_seed(s, 2_000_000)) for s in seeds]


@torch.no_grad()
def generate_latents(sampler: "Sampler", prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from `initial_noise(seeds)`: the final latents [B, C, h, w],
    float32 on the CPU. What validation samples, and what `pipeline.load(...)` reproduces
    with diffusers' own StableDiffusionPipeline."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    cond = sampler.encoder(prompts).to(sampler.device)
    uncond = sampler.encoder.uncond(1).to(sampler.device)
    latents = (initial_noise(seeds, sampler.latent_shape) * sampler.init_noise_sigma).to(sampler.device)
    latents = denoise(sampler, latents, cond, uncond,  # validation and inference: never dropout (seed None)
                      lambda i, t, x, eps: deterministic_step(sampler.scheduler, i, t, x, eps))
    return latents.float().cpu()


@torch.no_grad()
def sample_trajectory(sampler: Sampler, prompts: list[str], seed: int, eta: float, num_recorded: int | None = None,
                      shared_start: int = 1, policy_version: int = 0, window: tuple[int, int] | None = None,
                      seeds: list[int] | None = None) -> Trajectory:
    """Stochastic DDIM (eta > 0) over `sampler`'s UNet, encoder and scheduler, recording
    `num_recorded` steps (all by default) for policy-gradient training. Which steps comes
    from `seed` (the batch-wide choice); each sample's initial noise and every step's noise
    from its own seed in `seeds` (by default derived from `seed`), so a trajectory is a pure
    function of (weights, prompt, its seed, `seed`), whatever batch it is drawn in.
    `shared_start`: runs of that many consecutive samples (a GRPO group) start from the
    noise of the run's first seed, so that within a group only the steps' noise, which the
    policy gradient credits, tells the samples apart. `window` (start, end): only those
    steps are stochastic, and recorded; the others deterministic."""
    start = time.perf_counter()
    seeds = sample_seeds(seed, len(prompts)) if seeds is None else [int(s) for s in seeds]
    generator = torch.Generator().manual_seed(seed)
    a, b, sigma = stochastic_coefficients(sampler.scheduler, eta, window)
    trainable = [i for i in range(len(sigma)) if sigma[i] > 0]  # a step without noise has no density
    num_recorded = len(trainable) if num_recorded is None else num_recorded
    if not 1 <= num_recorded <= len(trainable):
        raise ValueError(f"cannot record {num_recorded} steps: {len(trainable)} of {len(sigma)} steps are stochastic")
    chosen = torch.randperm(len(trainable), generator=generator)[:num_recorded].sort().values
    indices = [trainable[int(i)] for i in chosen]
    cond = sampler.encoder(prompts).float()
    uncond = sampler.encoder.uncond(1).float()
    shape = sampler.latent_shape
    if len(prompts) % shared_start:
        raise ValueError(f"{len(prompts)} samples do not split into runs of {shared_start} with a shared start")
    start_noise = initial_noise(seeds[::shared_start], shape)
    x = (start_noise.repeat_interleave(shared_start, 0) * sampler.init_noise_sigma).to(sampler.device)
    cond_d, uncond_d = cond.to(sampler.device), uncond.to(sampler.device)
    generators = noise_generators(seeds)
    inputs, outputs, log_probs = [], [], []

    def step(i, t, x, eps):  # stochastic DDIM (drawn here: no next state given), the trained steps recorded
        x_next, log_prob, _ = stochastic_step(x.float(), eps.float(), float(a[i]), float(b[i]), float(sigma[i]),
                                              generator=generators)
        if i in indices:
            log_probs.append(log_prob.cpu())
            inputs.append(x.float().cpu())
            outputs.append(x_next.cpu())
        return x_next.to(x.dtype)

    x = denoise(sampler, x, cond_d, uncond_d, step, batch_dropout_seed(seeds))
    return Trajectory(prompts=list(prompts), cond=cond.cpu(), uncond=uncond.cpu(), indices=indices,
                      timesteps=sampler.scheduler.timesteps[indices].clone(), latents=torch.stack(inputs, 1),
                      next_latents=torch.stack(outputs, 1), log_probs=torch.stack(log_probs, 1), a=a[indices],
                      b=b[indices], sigma=sigma[indices], final_latents=x.float().cpu(), policy_version=policy_version,
                      seed=seed, seeds=seeds, seconds=time.perf_counter() - start)


def build_sampler(cfg: SamplerConfig, parts: Components, *, prompts: PromptConfig | None = None,
                  encoder=None, device: torch.device | str = "cpu") -> Sampler:
    """The sampler of `cfg` over `parts`: the UNet (with whatever trainable structure the
    caller added, e.g. a LoRA) and the text encoder moved to `device` in `cfg.precision`,
    a DDIM scheduler on the model's noise schedule with `cfg.timestep_spacing`.

    `encoder`: how prompts are encoded; by default the family's segment encoder of
    `prompts` (families/: SD 1.x's SegmentEncoder, with `parts.t5`'s tokens after the CLIP
    ones when the model has a T5 branch; SDXL's through both encoders); a TruncatedEncoder
    for SD's plain 77-token baseline.
    The modules are moved in place; their requires_grad flags are left as they are."""
    dtype = DTYPES[cfg.precision]
    unet = parts.unet.to(device, dtype)
    if encoder is None:
        t5 = parts.t5.to(device, dtype) if parts.t5 is not None else None
        encoder = parts.family.encoder(parts, prompts or PromptConfig(), resolution=cfg.resolution, device=device,
                                       dtype=dtype, t5=t5)
    scheduler = parts.family.scheduler(parts.scheduler_config, timestep_spacing=cfg.timestep_spacing, final=cfg.final)
    return Sampler(unet, encoder, scheduler, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                   resolution=cfg.resolution, num_grad_steps=cfg.num_grad_steps,
                   vae_scale_factor=vae_scale_factor(parts.vae), train_mode=cfg.train_mode, family=parts.family,
                   latent_channels=parts.vae.config.latent_channels, grad_steps=cfg.grad_steps)
