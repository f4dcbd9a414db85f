"""Stage 2 with policy gradients, GRPO or DDPO (docs/algorithms.md): the body of the worker
skeleton (training/worker.py) that the sampler actors feed with stochastic trajectories.
One step reads:

    SAMPLE     this worker's train.grad_accum batches of trajectories: stochastic DDIM
               (sampler.eta > 0), the trained steps recorded with their log-probabilities
               (sampling/sampler.py::sample_trajectory), requested ahead as in reward
               backpropagation
    SCORE      decode, reward (differentiable or not; no gradient flows through it), the
               run's metric hooks
    ADVANTAGE  grpo: within each prompt's group (a batch holds whole groups, so a group never
               spans actors or workers); ddpo: against each prompt's running statistics,
               updated once per step with the whole global batch's rewards in sample order,
               so that all workers hold the same, whatever the split
    UPDATE     algorithm.inner_epochs times: for every batch and every recorded step, the
               PPO-clip loss of the ratio of its probability under the current weights to
               the sampling weights' (+ kl_weight x KL to the starting model), one backward
               each (algorithms/policy_gradient.py); DeepSpeed updates once per epoch
    SYNC       every sync_every steps rank 0 publishes its trainable weights to the actors
"""

from __future__ import annotations

import time

import ray
import torch
import torch.distributed as dist

from longalign_rl.algorithms.policy_gradient import (PerPromptStatTracker, grpo_advantages, policy_step_loss,
                                                     sde_steps, trained_steps)
from longalign_rl.models import Components, vae_scale_factor
from longalign_rl.sampling.stochastic import stochastic_coefficients
from longalign_rl.scoring import score
from longalign_rl.training.checkpoint import TrainerState
from longalign_rl.training.stage2 import SamplerFed
from longalign_rl.training.worker import StepOutput, WorkerContext
from longalign_rl.types import Trajectory
from longalign_rl.vae import decode


def check_trained_steps(cfg, parts: Components) -> None:
    """The sampler can record trained_steps(cfg) stochastic steps of this model's schedule (a
    scheduler with set_alpha_to_one makes the last DDIM step deterministic: no density)."""
    family = parts.family
    scheduler = family.scheduler(parts.scheduler_config, timestep_spacing=cfg.sampler.timestep_spacing,
                                 final=cfg.sampler.final)
    family.set_timesteps(scheduler, cfg.sampler.num_steps, cfg.sampler.resolution // vae_scale_factor(parts.vae))
    stochastic = int((stochastic_coefficients(scheduler, cfg.sampler.eta, sde_steps(cfg))[2] > 0).sum())
    if stochastic < trained_steps(cfg):
        raise ValueError(f"algorithm.timestep_fraction: {trained_steps(cfg)} trained steps asked for, but only "
                         f"{stochastic} of the {cfg.sampler.num_steps} DDIM steps are stochastic with this "
                         "scheduler and algorithm.sde_window; lower the fraction")


class PolicyGradientBody(SamplerFed):
    """The body of every algorithm.PolicyGradient record (grpo, ddpo): `self.algorithm`."""

    log_keys = ("reward", "loss", "advantage_zero", "clip_fraction", "approx_kl")

    def __init__(self, ctx: WorkerContext, parts: Components, loop_config: dict):
        super().__init__(ctx, parts, loop_config)
        a = self.cfg.algorithm
        check_trained_steps(self.cfg, parts)
        self.tracker = PerPromptStatTracker(a.buffer_size, a.min_count) if self.algorithm.per_prompt_statistics else None
        # Built before the checkpoint loads: the reference is the model the run started from.
        self.reference = self.make_reference() if a.kl_weight > 0 else None

    def start(self, state: TrainerState) -> None:
        super().start(state)
        if self.tracker is not None and self.algorithm.name in state.algorithm:
            self.tracker.load_state_dict(state.algorithm[self.algorithm.name])

    def advantages(self, step: int, batches: list[tuple[list[str], torch.Tensor]]) -> list[torch.Tensor]:
        """The advantages of this worker's batches of step `step` ((prompts, rewards) each)."""
        if self.tracker is None:  # a batch is prompts_per_batch groups of `repeats` samples
            return [grpo_advantages(rewards, torch.arange(len(prompts)) // self.repeats) for prompts, rewards in batches]
        # per-prompt statistics: every worker adds the global batch's rewards in sample order, so
        # all trackers agree, and agree with any other split of the same global batch
        chunks = [self.chunk(step * self.cfg.train.grad_accum + j)[1] for j in range(len(batches))]
        gathered: list = [None] * self.ctx.world
        dist.all_gather_object(gathered, [(c, p, r.tolist()) for c, (p, r) in zip(chunks, batches)])
        ordered = sorted(batch for worker in gathered for batch in worker)
        advantages = self.tracker.update([p for _, prompts, _ in ordered for p in prompts],
                                          torch.tensor([r for _, _, rewards in ordered for r in rewards]))
        size = len(batches[0][0])
        return [advantages[c * size:(c + 1) * size] for c in chunks]

    def score(self, step: int, j: int, traj: Trajectory) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's rewards and its per-sample statistics (reward, components, hooks)."""
        if self.reward is None:  # reward actors scored the sampler's images while it sampled on
            scored, images_ref = self.client.scores(step * self.cfg.train.grad_accum + j)
            out, images = scored.output, lambda: ray.get(images_ref)
            self.reward_actor_seconds += scored.seconds
        else:
            with torch.no_grad():
                images = decode(self.vae, traj.final_latents.to(self.ctx.device))
                out, _ = score(self.reward, images, traj.prompts, self.reward_statistics(step))
        rewards = out.total.detach().float().cpu()
        finite = torch.isfinite(rewards)
        stats = {"reward": rewards[finite], "reward_nonfinite": (~finite).float()}
        stats.update({k: v.detach().float().cpu() for k, v in out.components.items()})
        self.summary_keys += [k for k in out.components if k not in self.summary_keys]
        self.observe(step, j, traj.final_latents, traj.prompts, stats, images=images)
        return rewards, stats

    def step(self, step: int, state: TrainerState) -> StepOutput:
        cfg, ctx, a, accum = self.cfg, self.ctx, self.cfg.algorithm, self.cfg.train.grad_accum
        stats: dict[str, list[torch.Tensor]] = {}
        times = dict.fromkeys(("time/sample_wait", "time/sample_actor", "time/score", "time/train"), 0.0)
        batches, lags = [], []
        self.reward_actor_seconds = 0.0
        for j in range(accum):
            # SAMPLE
            t = time.perf_counter()
            traj: Trajectory = self.fetch(step, step * accum + j)
            times["time/sample_wait"] += time.perf_counter() - t  # trainer blocked on trajectories
            times["time/sample_actor"] += traj.seconds            # actor time spent sampling them
            lags.append(step - traj.policy_version)

            # SCORE
            t = time.perf_counter()
            rewards, batch_stats = self.score(step, j, traj)
            times["time/score"] += time.perf_counter() - t
            batches.append((traj, rewards))
            for k, v in batch_stats.items():
                stats.setdefault(k, []).append(v)

        # ADVANTAGE, over the step's whole global batch
        t = time.perf_counter()
        advantages = self.advantages(step, [(traj.prompts, rewards) for traj, rewards in batches])
        batches = [(traj, adv) for (traj, _), adv in zip(batches, advantages)]
        for adv in advantages:
            for k, v in dict(advantage=adv, advantage_abs=adv.abs(), advantage_zero=(adv == 0).float()).items():
                stats.setdefault(k, []).append(v)
        times["time/score"] += time.perf_counter() - t

        # UPDATE: backward per (batch, recorded step); the engine updates after the last of each epoch
        t = time.perf_counter()
        ratios, on_policy = [], []
        for epoch in range(a.inner_epochs):
            for traj, advantages in batches:
                for k in range(len(traj.indices)):
                    loss, step_stats = policy_step_loss(
                        ctx.engine, traj, k, advantages, cfg.sampler.guidance_scale, a.clip_range,
                        a.advantage_clip, a.kl_weight, self.reference, train_mode=cfg.sampler.train_mode,
                        family=self.family)
                    ctx.engine.backward(loss)
                    ctx.engine.step()
                    step_stats["loss"] = loss.detach().reshape(1).float()
                    ratios.append(step_stats["ratio"])
                    if epoch == 0 and traj.policy_version == step:  # sampled by these very weights
                        on_policy.append((step_stats["ratio"] - 1).abs())
                    for name, v in step_stats.items():
                        stats.setdefault(name, []).append(v.cpu())
        times["time/train"] = time.perf_counter() - t

        # SYNC
        times.update(self.sync(step))
        state.prompt_position = self.prompt_position((step + 1) * accum)
        if self.tracker is not None:
            state.algorithm = {self.algorithm.name: self.tracker.state_dict()}  # saved with the checkpoint
        ratios = torch.cat(ratios)
        return StepOutput(stats, {
            # max |ratio - 1| where it must be 0 (trainer and sampler disagree on the same weights
            # otherwise: precision, dropout, another schedule); NaN when every batch lagged
            "ratio_error": float(torch.cat(on_policy).max()) if on_policy else float("nan"),
            "ratio_min": float(ratios.min()),  # this worker's extremes over every trained step
            "ratio_max": float(ratios.max()),
            "policy_lag": max(lags),
            **times,
            **({"time/reward_actor": self.reward_actor_seconds} if self.reward is None else {}),
        })
