"""Stochastic DDIM (eta > 0) with the log-probability of every step: the sampling side of
policy-gradient training (DDPO, GRPO; issue 11).

With eta > 0 a DDIM step is Gaussian:

    x_{i+1} ~ N(mean_i, sigma_i^2 I),   mean_i = a_i x_i + b_i eps_i

where eps_i is the guided noise prediction at x_i. The coefficients a_i, b_i and sigma_i
are read off the diffusers scheduler itself by probe calls of `scheduler.step` (as
ddim.step_coefficients does for eta = 0), so they follow whatever schedule it implements.
A trainer that recomputes eps_i with the sampling weights gets the same mean, hence the same
log-probability: the first PPO ratio is exactly 1.

The log-probability of a step is the Gaussian log-density averaged over the latent's
elements (as ddpo-pytorch does), so its scale does not grow with the resolution.

Pure torch: no ray, no deepspeed.
"""

from __future__ import annotations

import math

import torch

from longalign_rl.sampling import flow

@torch.no_grad()
def stochastic_coefficients(scheduler, eta: float, window: tuple[int, int] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, sigma), each [num_steps] float64: step i is x_{i+1} = a_i x_i + b_i eps_i + sigma_i z.

    `window` (start, end): only steps start <= i < end are stochastic; the others are
    deterministic DDIM (eta 0, sigma 0), as Flow-GRPO-Fast and MixGRPO sample outside the
    steps they train. None: every step. A flow-matching scheduler (SD3, FLUX) gives
    Flow-GRPO's SDE with `eta` as its noise level (flow.sde_coefficients)."""
    if flow.is_flow(scheduler):
        return flow.sde_coefficients(scheduler, eta, window)
    if eta <= 0:
        raise ValueError(f"sampler.eta must be > 0 for policy-gradient sampling, got {eta}")
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    start, end = window if window is not None else (0, len(scheduler.timesteps))
    a, b, sigma = [], [], []
    for i, t in enumerate(scheduler.timesteps):
        e = eta if start <= i < end else 0.0
        a.append(scheduler.step(zero, t, one, eta=e, variance_noise=zero).prev_sample.item())
        b.append(scheduler.step(one, t, zero, eta=e, variance_noise=zero).prev_sample.item())
        sigma.append(scheduler.step(zero, t, zero, eta=e, variance_noise=one).prev_sample.item())
    return (torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
            torch.tensor(sigma, dtype=torch.float64))


def step_mean(x: torch.Tensor, eps: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The mean of step i's Gaussian (differentiable in eps, hence in the UNet)."""
    return a * x + b * eps


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x_next; mean, sigma^2 I), averaged over each sample's elements: [B]."""
    if sigma <= 0:
        raise ValueError(f"a step with sigma {sigma} has no density (eta must be > 0 and the step not the last "
                         "of a schedule whose final alpha is 1)")
    log_density = -((x_next.detach() - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def stochastic_step(x: torch.Tensor, eps: torch.Tensor, a: float, b: float, sigma: float,
                    generator: torch.Generator | list[torch.Generator] | None = None,
                    x_next: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One stochastic DDIM step, as ddpo-pytorch's ddim_step_with_logprob: with no `x_next`
    it draws one (the sampler; noise from `generator`, or from one generator per sample so
    that a sample's noise does not depend on its batch, on the CPU, drawn even where sigma is
    0, so that a chain's noise does not depend on its window), with `x_next` it scores that
    one (the trainer's recompute). Returns (x_next, its log-probability [B] (None for a step
    without noise: no density), the step's mean, differentiable in eps)."""
    mean = step_mean(x, eps, a, b)
    if x_next is None:
        if isinstance(generator, list):
            noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator])
        else:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        x_next = mean + sigma * noise.to(x.device)
    return x_next, step_log_prob(x_next, mean, sigma) if sigma > 0 else None, mean


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(N(mean, s^2) || N(reference_mean, s^2)) per element, averaged per sample: [B]. Zero
    when the policy equals the reference (the KL penalty at the start of a run)."""
    return ((mean - reference_mean) ** 2 / (2 * sigma**2)).flatten(1).mean(1)
