"""The trainer workers' half of best_of_group (the record is best_of_group.py)."""

from __future__ import annotations

import time

import torch
from diffusers import DDPMScheduler

from longalign_rl.algorithms.denoising import denoising_loss
from longalign_rl.training.stage2 import SamplerFed
from longalign_rl.training.worker import StepOutput
from longalign_rl.vae import decode
from tests.plugins.best_of_group import BEST_OF_GROUP, best_of_groups


class BestOfGroupBody(SamplerFed):
    """SAMPLE group_size rollouts per prompt, RANK them by the reward, UPDATE with the
    denoising loss on each group's best, SYNC the weights to the samplers."""

    log_keys = BEST_OF_GROUP.progress_keys

    def __init__(self, ctx, parts, loop_config):
        super().__init__(ctx, parts, loop_config)
        self.scheduler = DDPMScheduler.from_config(parts.scheduler_config)
        self.generator = torch.Generator().manual_seed(ctx.cfg.train.seed + ctx.rank)

    def step(self, step, state):
        ctx, accum = self.ctx, self.cfg.train.grad_accum
        stats: dict[str, list[torch.Tensor]] = {}
        start = time.perf_counter()
        for j in range(accum):
            rollout = self.fetch(step, step * accum + j)  # SAMPLE
            with torch.no_grad():  # RANK
                images = decode(self.vae, rollout.final_latents.to(ctx.device)).float()
                out = self.reward(images, rollout.prompts)
            rewards = out.total.float().cpu()
            best = best_of_groups(rewards, self.repeats)
            finite = torch.isfinite(rewards)
            batch_stats = {"reward": rewards[finite], "best_reward": rewards[best], "reward_nonfinite": (~finite).float(),
                           **{k: v.float().cpu() for k, v in out.components.items()}}
            self.observe(step, j, rollout.final_latents, rollout.prompts, batch_stats, images=images)
            loss, loss_stats = denoising_loss(ctx.engine, self.scheduler, rollout.final_latents[best].to(ctx.device),
                                              rollout.cond[best].to(ctx.device), self.generator)  # UPDATE
            ctx.engine.backward(loss)
            ctx.engine.step()
            batch_stats["loss"] = loss_stats["loss"]
            for k, v in batch_stats.items():
                stats.setdefault(k, []).append(v)
        timings = self.sync(step)  # SYNC
        state.prompt_position = self.prompt_position((step + 1) * accum)
        return StepOutput(stats, {"time/train": time.perf_counter() - start, **timings})
