"""Stage 2, reward backpropagation (docs/method.md section 3): the body of the worker skeleton
(training/worker.py) that the sampler actors feed. One step reads:

    SAMPLE   this worker's rollouts from its sampler actor (requested one step ahead when
             the lag bound allows it, so sampling overlaps training)
    UPDATE   replay the gradient steps, decode, score with the reward, DeepSpeed step
             (algorithms/reward_backprop.py); the run's metric hooks on the decoded images
    SYNC     every sync_every steps rank 0 publishes its trainable weights to the actors

What it shares with the policy-gradient bodies (actors, prompts, reward, hooks, sync) is
training/stage2.py.
"""

from __future__ import annotations

import time

import torch

from longalign_rl.algorithms.reward_backprop import REWARD_BACKPROP, reward_backprop_step
from longalign_rl.training.checkpoint import TrainerState
from longalign_rl.training.stage2 import SamplerFed
from longalign_rl.training.worker import StepOutput
from longalign_rl.types import Rollout


def update(engine, vae, reward, rollout: Rollout, guidance_scale: float, train_mode: bool = False,
           statistics=None, family=None, **regularisers) -> dict[str, torch.Tensor]:
    """One micro-step of reward backpropagation through the DeepSpeed engine; `statistics`:
    the reward's batch statistics over the step's global batch (SamplerFed.reward_statistics);
    `family`: the model's (Components.family); `regularisers`: reward_backprop_step's
    kl_weight, reference and reward_cap."""
    loss, stats = reward_backprop_step(engine, vae, reward, rollout, guidance_scale, train_mode, statistics, family,
                                       **regularisers)
    engine.backward(loss)
    engine.step()
    stats["loss"] = loss.detach().reshape(1).float()
    return stats


class RewardBackpropBody(SamplerFed):
    log_keys = REWARD_BACKPROP.progress_keys
    summary_keys = ["reward", "text_relevant", "text_irrelevant"]

    def __init__(self, ctx, parts, loop_config: dict):
        super().__init__(ctx, parts, loop_config)
        a = self.cfg.algorithm
        # Built before the checkpoint loads: the reference is the model the run started from.
        self.regularisers = {"kl_weight": a.kl_weight, "reward_cap": a.reward_cap,
                             "reference": self.make_reference() if a.kl_weight > 0 else None}

    def step(self, step: int, state: TrainerState) -> StepOutput:
        cfg, ctx, accum = self.cfg, self.ctx, self.cfg.train.grad_accum
        stats: dict[str, list[torch.Tensor]] = {}
        sample_wait = train_time = actor_seconds = 0.0
        lags, replay_errors = [], []
        for j in range(accum):
            # SAMPLE
            t = time.perf_counter()
            rollout = self.fetch(step, step * accum + j)
            sample_wait += time.perf_counter() - t
            actor_seconds += rollout.seconds
            lags.append(step - rollout.policy_version)

            # UPDATE
            t = time.perf_counter()
            step_stats = update(ctx.engine, self.vae, self.reward, rollout, cfg.sampler.guidance_scale,
                                cfg.sampler.train_mode, self.reward_statistics(step), self.family, **self.regularisers)
            train_time += time.perf_counter() - t
            replay_errors.append(step_stats.pop("replay_error"))
            self.observe(step, j, rollout.final_latents, rollout.prompts, step_stats)
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(v)

        # SYNC
        timings = self.sync(step)
        state.prompt_position = self.prompt_position((step + 1) * accum)
        return StepOutput(stats, {
            "replay_error": float(torch.cat(replay_errors).max()),  # this worker's max |replayed - recorded x0|
            "policy_lag": max(lags),
            "time/sample_wait": sample_wait,     # trainer blocked on rollouts
            "time/sample_actor": actor_seconds,  # actor time spent sampling them
            "time/train": train_time,
            **timings,
        })
