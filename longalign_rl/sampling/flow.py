"""Flow matching (SD3, FLUX): the Euler ODE step, Flow-GRPO's SDE step and the training
target, written in the same linear form as DDIM's (ddim.py, stochastic.py), so that every
sampler, replay and policy-gradient trainer works on either without knowing which
(docs/models.md "Flow-matching families"). Pure torch: no ray, no deepspeed.

The model predicts a velocity v at x_t = (1 - s) x_0 + s noise, s = sigma in [0, 1]
(`FlowMatchEulerDiscreteScheduler.sigmas`, the family's shift applied there), and:

    Euler (the deterministic ODE the pipelines run):
        x_{i+1} = x_i + (s_{i+1} - s_i) v_i                        a_i = 1, b_i = ds_i
    Flow-GRPO's SDE (arXiv 2505.05470, eq. 9; marginal-preserving), noise level `level`:
        std_i = level * sqrt(s_i / (1 - s_i))   (s_i = 1: s_1 in the denominator, as Flow-GRPO)
        x_{i+1} = a_i x_i + b_i v_i + sigma_i z,  dt = s_{i+1} - s_i < 0
        a_i = 1 + std_i^2 dt / (2 s_i),  b_i = (1 + std_i^2 (1 - s_i) / (2 s_i)) dt,
        sigma_i = std_i sqrt(-dt)

The coefficients are float64 and per step, exactly what ddim.step_coefficients and
stochastic.stochastic_coefficients give for DDIM; the deterministic step itself is computed
as the scheduler computes it (float32, `sample + dt * model_output`), so a chain equals the
diffusers pipeline's bit for bit.
"""

from __future__ import annotations

import math

import torch


def is_flow(scheduler) -> bool:
    """A flow-matching scheduler (diffusers' FlowMatch* classes), whose steps this module computes."""
    return type(scheduler).__name__.startswith("FlowMatch")


def _sigmas(scheduler) -> torch.Tensor:
    """The schedule's sigmas [num_steps + 1] (the last is 0), float32 as the scheduler keeps them."""
    return scheduler.sigmas.detach().to("cpu", torch.float32)


def euler_coefficients(scheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the Euler ODE for the scheduler's set timesteps: a_i = 1, b_i = s_{i+1} - s_i
    (the float32 difference the scheduler's step takes, in float64)."""
    s = _sigmas(scheduler)
    b = (s[1:] - s[:-1]).double()
    return torch.ones_like(b), b


def euler_step(scheduler, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Step i of the Euler ODE, computed as FlowMatchEulerDiscreteScheduler.step computes it
    (the sample upcast to float32, the result in the prediction's dtype), but by index: no
    scheduler state is read or changed. A float64 chain (the replay tests) stays float64,
    where the scheduler would round it to float32."""
    s = scheduler.sigmas
    dt = (s[i + 1] - s[i]).to(x.device)
    return (x.to(torch.promote_types(x.dtype, torch.float32)) + dt * v).to(v.dtype)


def sde_coefficients(scheduler, level: float, window: tuple[int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, sigma) [num_steps] float64 of Flow-GRPO's SDE at noise level `level` (the module
    docstring); outside `window` (start, end) the steps are the Euler ODE (sigma 0)."""
    if level <= 0:
        raise ValueError(f"the SDE's noise level (sampler.eta) must be > 0, got {level}")
    s = _sigmas(scheduler).double()
    n = len(s) - 1
    start, end = window if window is not None else (0, n)
    sigma_max = float(s[1]) if n > 1 else 0.5
    a, b, noise = [], [], []
    for i in range(n):
        now, dt = float(s[i]), float(s[i + 1] - s[i])
        if not start <= i < end or now <= 0:
            a.append(1.0), b.append(dt), noise.append(0.0)
            continue
        std = level * math.sqrt(now / (1 - (sigma_max if now == 1 else now)))
        a.append(1 + std**2 * dt / (2 * now))
        b.append((1 + std**2 * (1 - now) / (2 * now)) * dt)
        noise.append(std * math.sqrt(-dt))
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_tensor(a), as_tensor(b), as_tensor(noise)


# ---------------------------------------------------------------- stage 1: the training target


def logit_normal(generator, count: int, device, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """u = sigmoid(N(mean, std)) in (0, 1): SD3's logit-normal timestep density (diffusers'
    compute_density_for_timestep_sampling, weighting_scheme "logit_normal", and the SD3 paper's
    choice: mean 0, std 1)."""
    return torch.sigmoid(mean + std * torch.randn(count, generator=generator, device=device))


def training_sigmas(scheduler, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) [B] of the training schedule at density draws `u` in (0, 1), as
    diffusers' SD3 and FLUX training scripts pick them: index (u * num_train_timesteps) into
    the scheduler's full 1000-step schedule (its shift applied as at construction)."""
    n = scheduler.config.num_train_timesteps
    index = (u * n).long().clamp(0, n - 1).cpu()
    timesteps = scheduler.timesteps[index]
    sigmas = scheduler.sigmas[index]
    return timesteps.to(u.device), sigmas.to(u.device)


def sigmas_at(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The training schedule's sigma of each timestep [B] (looked up, as diffusers' training
    scripts' get_sigmas does)."""
    schedule = scheduler.timesteps.to(timesteps.device)
    index = (schedule[None, :] == timesteps.reshape(-1, 1).to(schedule.dtype)).float().argmax(dim=1)
    return scheduler.sigmas.to(timesteps.device)[index]


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x_0 + s noise (the scheduler's scale_noise, per sample)."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What a flow-matching model predicts: d x_s / d s = noise - x_0."""
    return noise - latents
