"""Policy-gradient updates for diffusion sampling (issue 11): advantages and the PPO-clip
loss, as ddpo-pytorch and Flow-GRPO compute them. Pure torch: no ray, no deepspeed.

    GRPO   advantages = rewards normalised within each group of samples of one prompt
    DDPO   advantages = rewards normalised by a running per-prompt statistic of past rewards
    PPO    loss = mean over samples and trained steps of
               max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),  ratio = exp(logp - logp_old)
           plus kl_weight * KL(policy || reference) where a reference is given
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable

import numpy as np
import torch

from longalign_rl.registry import Algorithm
from longalign_rl.sampling.ddim import batch_dropout_seed, dropout_seed, guided_eps, replay_dropout
from longalign_rl.sampling.stochastic import gaussian_kl, step_mean, stochastic_step
from longalign_rl.types import Trajectory


def grpo_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), per sample. `groups`: [N] ints, one
    id per prompt; every group needs at least 2 samples (a lone sample has no baseline).

    A sample whose reward is not finite gets advantage 0 and is left out of its group's
    statistics; a group with fewer than 2 finite rewards teaches nothing (all 0)."""
    rewards = rewards.double()
    finite = torch.isfinite(rewards)
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        members = groups == g
        if int(members.sum()) < 2:
            raise ValueError(f"group {int(g)} has {int(members.sum())} sample; GRPO needs algorithm.group_size >= 2")
        members &= finite
        if int(members.sum()) < 2:
            continue
        r = rewards[members]
        out[members] = (r - r.mean()) / (r.std(unbiased=False) + eps)
    return out.float()


class PerPromptStatTracker:
    """DDPO's advantages: each reward normalised by the mean and std of the last `buffer_size`
    rewards of the same prompt; until a prompt has `min_count` of them, by the batch's.
    Its state (the buffers) is saved with checkpoints, so a resumed run continues it."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """The advantages of `rewards` (of `prompts`), after adding them to the buffers. A
        reward that is not finite gets advantage 0 and stays out of every statistic."""
        values = rewards.double().cpu().numpy()
        finite = np.isfinite(values)
        out = np.zeros_like(values)
        if not finite.any():
            return torch.as_tensor(out, dtype=torch.float32)
        for prompt in dict.fromkeys(p for p, ok in zip(prompts, finite) if ok):  # each prompt once, in order
            index = [i for i, p in enumerate(prompts) if p == prompt and finite[i]]
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[index].tolist())
            basis = np.asarray(buffer) if len(buffer) >= self.min_count else values[finite]
            out[index] = (values[index] - basis.mean()) / (basis.std() + self.eps)
        return torch.as_tensor(out, dtype=torch.float32)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state["buffers"].items()}


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float, advantage_clip: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate for one trained step of each sample ([B] each), and per-sample
    statistics: the ratio, whether it was clipped, and the approximate KL to the sampling
    policy (0.5 (logp - logp_old)^2, as ddpo-pytorch logs it)."""
    advantages = advantages.clamp(-advantage_clip, advantage_clip).to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "ratio": ratio.detach().float(),
        "clip_fraction": ((ratio.detach() - 1.0).abs() > clip_range).float(),
        "approx_kl": (0.5 * (log_prob.detach() - old_log_prob.detach()) ** 2).float(),
    }
    return loss, stats


def policy_step_loss(unet, traj: Trajectory, k: int, advantages: torch.Tensor, guidance_scale: float,
                     clip_range: float, advantage_clip: float, kl_weight: float = 0.0,
                     reference: Callable[[], contextlib.AbstractContextManager] | None = None,
                     train_mode: bool = False, family=None):
    """PPO-clip loss (with graph) of recorded step k of `traj` under `unet`'s current weights,
    and its per-sample statistics. `reference()`: a context that yields the starting model,
    the KL penalty's reference, evaluated without gradient (`unet` with its LoRA adapter
    disabled, or a frozen copy). Needed when kl_weight > 0. `train_mode`
    (sampler.train_mode): the step is recomputed with the dropout masks it was sampled with
    (ddim.replay_dropout; `unet`'s dropout layers set to match beforehand with ddim.set_dropout),
    so that unchanged weights still give a ratio of exactly 1."""
    device = next(unet.parameters()).device
    x, x_next = traj.latents[:, k].to(device), traj.next_latents[:, k].to(device)
    t = traj.timesteps[k]
    cond, uncond = traj.cond.to(device), traj.uncond.to(device)
    a, b, sigma = float(traj.a[k]), float(traj.b[k]), float(traj.sigma[k])
    with replay_dropout(unet, dropout_seed(batch_dropout_seed(traj.seeds), traj.indices[k]) if train_mode else None):
        eps = guided_eps(unet, x, t, cond, uncond, guidance_scale, family).float()
    _, log_prob, mean = stochastic_step(x, eps, a, b, sigma, x_next=x_next)  # the sampler's step, scored
    loss, stats = ppo_clip_loss(log_prob, traj.log_probs[:, k].to(device), advantages.to(device), clip_range,
                                advantage_clip)
    if kl_weight > 0:
        if reference is None:
            raise ValueError("kl_weight > 0 needs the reference model")
        with torch.no_grad(), reference() as reference_unet:
            reference_mean = step_mean(x, guided_eps(reference_unet, x, t, cond, uncond, guidance_scale, family).float(),
                                       a, b)
        kl = gaussian_kl(mean, reference_mean, sigma)
        loss = loss + kl_weight * kl.mean()
        stats["kl"] = kl.detach().float()
    return loss, stats


# ---------------------------------------------------------------- the records (registry.Algorithm)


def sde_steps(cfg) -> tuple[int, int]:
    """The DDIM steps start <= i < end that are stochastic (algorithm.sde_window)."""
    start, end = cfg.algorithm.sde_window
    return round(start * cfg.sampler.num_steps), round(end * cfg.sampler.num_steps)


def trained_steps(cfg) -> int:
    """DDIM steps recorded and trained per sample (algorithm.timestep_fraction of the window)."""
    start, end = sde_steps(cfg)
    return max(1, round((end - start) * cfg.algorithm.timestep_fraction))


class PolicyGradient(Algorithm):
    """PPO-clip on the log-probabilities of stochastic DDIM steps, any reward, differentiable or
    not (docs/algorithms.md; training/policy_gradient.py). GRPO and DDPO differ only in their
    advantages: `per_prompt_statistics` (DDPO) or groups of one prompt's samples (GRPO)."""

    body = "longalign_rl.training.policy_gradient:PolicyGradientBody"
    progress_keys = ("reward", "advantage_zero", "clip_fraction", "approx_kl")
    per_prompt_statistics = False

    def sample(self, sampler, prompts, seed, cfg, policy_version, seeds=None):
        """Stochastic DDIM (sampler.eta) with the trained steps' log-probabilities: a Trajectory."""
        from longalign_rl.sampling.sampler import sample_trajectory  # the actor's, which has it loaded

        return sample_trajectory(sampler, prompts, seed, cfg.sampler.eta, trained_steps(cfg),
                                 shared_start=cfg.samples_per_start,
                                 policy_version=policy_version, window=sde_steps(cfg), seeds=seeds)

    def backward_passes(self, cfg) -> int:
        """One per trained DDIM step (as ddpo-pytorch accumulates them), so each step's
        activations are freed before the next."""
        return trained_steps(cfg)

    def updates_per_step(self, cfg) -> int:
        return cfg.algorithm.inner_epochs

    def check(self, cfg) -> None:
        from longalign_rl.config import ConfigError

        if not 0.0 < cfg.sampler.eta <= 1.0:
            raise ConfigError(f"sampler.eta: {self.name} needs stochastic steps with a log-probability: eta in (0, 1], "
                              f"got {cfg.sampler.eta}")
        start, end = sde_steps(cfg)
        if end <= start:
            raise ConfigError(f"algorithm.sde_window: {list(cfg.algorithm.sde_window)} holds none of the "
                              f"{cfg.sampler.num_steps} DDIM steps (sampler.num_steps); widen it")

    def describe(self, cfg) -> str:
        a = cfg.algorithm
        return (f"{self.name}: {self.advantages_line(cfg)}; PPO clip {a.clip_range}, {a.inner_epochs} update(s) per "
                "batch" + (f", KL weight {a.kl_weight}" if a.kl_weight else ""))

    def advantages_line(self, cfg) -> str:
        raise NotImplementedError

    def describe_sampling(self, cfg, family=None) -> str:
        window, steps = sde_steps(cfg), cfg.sampler.num_steps
        where = "" if window == (0, steps) else f" on steps {window[0]}-{window[1] - 1}, deterministic elsewhere"
        noise = family.noise_name if family is not None else "eta"
        return f"{noise} {cfg.sampler.eta}{where}, {trained_steps(cfg)} trained"


class GRPO(PolicyGradient):
    name = "grpo"

    def group_size(self, cfg) -> int:
        return cfg.algorithm.group_size

    def shared_start(self, cfg) -> bool:
        return cfg.algorithm.shared_start

    def check(self, cfg) -> None:
        from longalign_rl.config import ConfigError

        super().check(cfg)
        if cfg.train.batch_size % cfg.algorithm.group_size:
            raise ConfigError(f"train.batch_size: grpo keeps each prompt's group on one worker: {cfg.train.batch_size} "
                              f"is not a multiple of algorithm.group_size={cfg.algorithm.group_size}")

    def advantages_line(self, cfg) -> str:
        return f"{cfg.algorithm.group_size} samples per prompt, normalised per group"


class DDPO(PolicyGradient):
    name = "ddpo"
    per_prompt_statistics = True

    def advantages_line(self, cfg) -> str:
        return f"per-prompt statistics of the last {cfg.algorithm.buffer_size} rewards"


GRPO_ALGORITHM, DDPO_ALGORITHM = GRPO(), DDPO()
