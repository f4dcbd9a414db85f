"""Stage 2, reward backpropagation (METHOD.md section 5): the body of the worker skeleton
(training/worker.py) that the sampler actors feed. One step reads:

    SAMPLE   this worker's rollouts from its sampler actor (requested one step ahead when
             the lag bound allows it, so sampling overlaps training)
    UPDATE   replay the gradient steps, decode, score with the reward, DeepSpeed step
             (algorithms/reward_backprop.py); the run's metric hooks on the decoded images
    SYNC     every sync_every steps rank 0 publishes its trainable weights to the actors

A micro-step's prompts and noise seed are pure functions of (micro-step, rank) and of
where the run (re)started, so a resumed run asks for exactly what the killed run would
have asked for, even with another worker count.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from longalign_rl.algorithms.reward_backprop import reward_backprop_step
from longalign_rl.config import Config
from longalign_rl.hooks import load_metric_hooks, run_metric_hooks
from longalign_rl.models import DTYPES, Components
from longalign_rl.outputs import save_image_grid
from longalign_rl.prompts import PromptOrder, load_prompts
from longalign_rl.registry import get_reward
from longalign_rl.sampling.group import SamplerGroup
from longalign_rl.training.checkpoint import TrainerState
from longalign_rl.training.worker import StepOutput, WorkerContext, micro_seed, run_worker
from longalign_rl.types import Rollout
from longalign_rl.vae import decode


def build_reward(cfg: Config, device: torch.device):
    reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    if not reward.differentiable:
        raise ValueError(f"reward {cfg.reward.name!r} is not differentiable; reward backpropagation "
                         "needs gradients from the reward to the image")
    return reward.to(device) if hasattr(reward, "to") else reward


def update(engine, vae, reward, rollout: Rollout, guidance_scale: float) -> dict[str, torch.Tensor]:
    """One micro-step of reward backpropagation through the DeepSpeed engine."""
    loss, stats = reward_backprop_step(engine, vae, reward, rollout, guidance_scale)
    engine.backward(loss)
    engine.step()
    stats["loss"] = loss.detach().reshape(1).float()
    return stats


class RewardBackprop:
    log_keys = ("reward", "loss")
    # What the end-of-run summary compares (first vs last window); the hooks' names join
    # at their first call.
    summary_keys = ["reward", "text_relevant", "text_irrelevant"]

    def __init__(self, ctx: WorkerContext, parts: Components, loop_config: dict):
        cfg = self.cfg = ctx.cfg
        self.ctx = ctx
        del parts.text_encoder  # prompts arrive encoded in the rollouts
        self.vae = parts.vae.to(ctx.device, DTYPES[cfg.train.precision])
        self.reward = build_reward(cfg, ctx.device)
        self.hooks = load_metric_hooks(cfg.run.metrics)
        self.summary_keys = list(type(self).summary_keys)
        self.samplers: SamplerGroup = loop_config["samplers"]
        self.client = self.samplers.client(ctx.rank)
        self.order = PromptOrder(load_prompts(cfg.prompts.source), seed=cfg.train.seed, shuffle=cfg.prompts.shuffle)
        self.prefetch = cfg.train.max_policy_lag >= cfg.train.sync_every  # overlap sampling with training

    def start(self, state: TrainerState) -> None:
        self.start_micro = state.step * self.cfg.train.grad_accum
        self.start_position = state.prompt_position
        # The actors start from the base weights: bring them to this run's version first.
        if self.ctx.rank == 0:
            self.samplers.publish(self.ctx.trainable_weights(), state.step)
        dist.barrier()

    def prompt_position(self, micro: int) -> int:
        """Prompts handed out to all workers before micro-step `micro`."""
        return self.start_position + (micro - self.start_micro) * self.ctx.world * self.cfg.train.batch_size

    def request(self, micro: int) -> None:
        b = self.cfg.train.batch_size
        prompts = self.order.batch(self.prompt_position(micro) + self.ctx.rank * b, b)
        self.client.request(micro, prompts, micro_seed(self.cfg, micro, self.ctx.rank))

    def step(self, step: int, state: TrainerState) -> StepOutput:
        cfg, ctx, accum = self.cfg, self.ctx, self.cfg.train.grad_accum
        stats: dict[str, list[torch.Tensor]] = {}
        sample_wait = train_time = actor_seconds = 0.0
        lags, replay_errors = [], []
        for j in range(accum):
            # SAMPLE
            micro = step * accum + j
            t = time.perf_counter()
            self.request(micro)
            rollout = self.client.get(micro, step, ctx.trainable_weights)
            if self.prefetch and step + 1 < cfg.train.steps:
                self.request(micro + accum)
            sample_wait += time.perf_counter() - t
            actor_seconds += rollout.seconds
            lags.append(step - rollout.policy_version)

            # UPDATE
            t = time.perf_counter()
            step_stats = update(ctx.engine, self.vae, self.reward, rollout, cfg.sampler.guidance_scale)
            train_time += time.perf_counter() - t
            replay_errors.append(step_stats.pop("replay_error"))
            grid_due = ctx.rank == 0 and j == 0 and (step == 0 or (step + 1) % cfg.run.image_every == 0)
            if self.hooks or grid_due:
                with torch.no_grad():
                    images = decode(self.vae, rollout.final_latents.to(ctx.device))
                hooked = run_metric_hooks(self.hooks, images, rollout.prompts, reserved=step_stats)
                self.summary_keys += [k for k in hooked if k not in self.summary_keys]
                step_stats.update(hooked)
                if grid_due:
                    save_image_grid(images, rollout.prompts, ctx.run_dir / "images" / f"step_{step + 1:06d}.png")
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(v)

        # SYNC
        t = time.perf_counter()
        sync_load = 0.0
        if (step + 1) % cfg.train.sync_every == 0:
            if ctx.rank == 0:
                sync_load = self.samplers.publish(ctx.trainable_weights(), step + 1)
            dist.barrier()  # no worker requests new rollouts before the actors hold step + 1
        sync_wait = time.perf_counter() - t

        state.prompt_position = self.prompt_position((step + 1) * accum)
        return StepOutput(stats, {
            "replay_error": float(torch.cat(replay_errors).max()),  # this worker's max |replayed - recorded x0|
            "policy_lag": max(lags),
            "time/sample_wait": sample_wait,     # trainer blocked on rollouts
            "time/sample_actor": actor_seconds,  # actor time spent sampling them
            "time/train": train_time,
            "time/sync": sync_wait,              # put + slowest actor load + barrier
            "time/sync_load": sync_load,
        })

    def export(self) -> None:
        pass  # lora/ (or unet/) is all stage 2 writes


def train_func(loop_config: dict) -> None:
    run_worker(loop_config, RewardBackprop)
