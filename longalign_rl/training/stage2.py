"""What every stage-2 body (reward backpropagation, the policy gradients, a plug-in's) shares: the sampler actors
that feed it, the prompts it asks them for, the reward, the metric hooks and image grids,
and the weight sync. A body subclasses `SamplerFed` and writes its own `step`.

A step's global batch is the same whatever its split over workers, micro-steps and actors
(docs/scaling.md): its prompts are the next `global batch` of the prompt order, its
samples are numbered in that order, and each sample's noise comes from (train.seed, step,
its number) alone; the reward's batch statistics are those of the whole global batch,
computed from its prompts by every worker alike (no collective). Worker `rank`'s micro-step
j holds the samples of chunk j * world + rank (worker.global_chunk). A resumed run therefore
asks for exactly what the killed run would have asked for, with any worker count.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.distributed as dist

from longalign_rl import guard, validation
from longalign_rl.hooks import load_metric_hooks, run_metric_hooks
from longalign_rl.models import DTYPES, Components
from longalign_rl.outputs import save_image_grid
from longalign_rl.prompts import PromptOrder, load_prompts
from longalign_rl.registry import algorithm_of
from longalign_rl.scoring import Statistics, batch_statistics, build_reward
from longalign_rl.sampling.group import SamplerGroup
from longalign_rl.training.checkpoint import TrainerState
from longalign_rl.training.worker import WorkerContext, global_chunk, sample_seed
from longalign_rl.vae import decode, placed


class SamplerFed:
    """The shared half of a stage-2 body (training/worker.py's Body protocol)."""

    # What the end-of-run summary compares (first vs last window); the reward's components
    # and the hooks' names join at their first call.
    summary_keys = ["reward"]

    def __init__(self, ctx: WorkerContext, parts: Components, loop_config: dict):
        cfg = self.cfg = ctx.cfg
        self.ctx = ctx
        self.algorithm = algorithm_of(cfg)  # its record (registry.Algorithm)
        del parts.text_encoder, parts.text_encoder_2  # prompts arrive encoded in the samples
        self.family = parts.family  # reads the samples' conditioning back into the denoiser call
        self.vae = placed(parts.vae, ctx.device, DTYPES[cfg.train.precision], parts.family.vae_fp16_overflows)
        # With reward actors (reward.num_actors) the reward lives there; this worker never builds it.
        self.reward = None if cfg.reward.num_actors else build_reward(cfg, ctx.device)
        self.hooks = load_metric_hooks(cfg.run.metrics)
        self.summary_keys = list(type(self).summary_keys)
        self.samplers: SamplerGroup = loop_config["samplers"]
        pool = loop_config.get("rewards")
        self.client = self.samplers.client(ctx.rank, pool.client(ctx.rank) if pool is not None else None)
        self.order = PromptOrder(load_prompts(cfg.prompts.source), seed=cfg.train.seed, shuffle=cfg.prompts.shuffle)
        self.prefetch = cfg.train.max_policy_lag >= cfg.train.sync_every  # overlap sampling with training
        # an algorithm with groups (grpo) draws each prompt group_size times, side by side in one batch
        self.repeats = self.algorithm.group_size(cfg)
        self.prompts_per_batch = cfg.prompts_per_batch  # read once: the property looks up the record
        self.validation = validation.validation_set(cfg) if ctx.rank == 0 else None
        self.judges = guard.build_judges(cfg.run, ctx.device) if self.validation else None  # run.judge: rank 0 alone
        self._step_prompts: dict[int, list[str]] = {}
        self._statistics: dict[int, Statistics | None] = {}

    def make_reference(self):
        """A context that yields the starting model, for a penalty that keeps the weights near
        it (algorithm.kl_weight): the UNet with its LoRA adapter disabled, or (fine-tuning the
        whole UNet) a frozen copy of it. Called before the checkpoint loads."""
        unet = self.ctx.engine.module
        if self.cfg.lora.enabled:
            @contextlib.contextmanager
            def adapter_off():
                unet.disable_adapters()
                try:
                    yield unet
                finally:
                    unet.enable_adapters()
            return adapter_off
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        return lambda: contextlib.nullcontext(frozen)

    def step_prompts(self, step: int) -> list[str]:
        """The prompts of step `step`'s whole global batch, in sample order (each prompt
        `repeats` times, side by side): the same on every worker."""
        if step not in self._step_prompts:
            accum = self.cfg.train.grad_accum
            n = self.prompts_per_batch * self.ctx.world * accum
            prompts = self.order.batch(self.prompt_position(step * accum), n)
            # kept for the step asked ahead (prefetch) and the one in progress
            self._step_prompts = {s: v for s, v in self._step_prompts.items() if s >= step - 1}
            self._step_prompts[step] = [p for p in prompts for _ in range(self.repeats)]
        return self._step_prompts[step]

    def reward_statistics(self, step: int) -> Statistics | None:
        """The reward's batch statistics (scoring.py) over step `step`'s whole global batch,
        computed by every worker from the step's prompts (a text-only statistic): no
        collective, and the same sums whatever the split (None for a reward that needs none)."""
        if self.reward is None:
            return None
        if step not in self._statistics:
            stats = batch_statistics(self.reward, self.step_prompts(step))
            self._statistics = {step: None if stats is None else
                                {k: v.detach().to(self.ctx.device, torch.float32) for k, v in stats.items()}}
        return self._statistics[step]

    def chunk(self, micro: int) -> tuple[int, int]:
        """(step, which chunk of the step's global batch) micro-step `micro` of this worker holds."""
        step, j = divmod(micro, self.cfg.train.grad_accum)
        return step, global_chunk(j, self.ctx.world, self.ctx.rank)

    def start(self, state: TrainerState) -> None:
        self.start_micro = state.step * self.cfg.train.grad_accum
        self.start_position = state.prompt_position
        # The actors start from the base weights: bring them to this run's version first. A
        # run that samples a step ahead drew its next step with the weights the actors held
        # during the step before (one version older, with sync_every 1): a resume gives the
        # actors those first, asks for the step's samples, and only then this version, so it
        # draws what the uninterrupted run drew (docs/scaling.md).
        lagging = self.lagging_weights(state)
        if self.ctx.rank == 0:
            self.publish(*(lagging or (state.step, self.ctx.trainable_weights())))
            self.held_during = self.held  # what the actors hold while a step trains (sync renews it)
            validation.truncate_after(self.ctx.run_dir, state.step)  # a resume redoes what came after
            if state.step == 0 and self.validation:
                self.validate(0)
        dist.barrier()
        if lagging is not None:
            for j in range(self.cfg.train.grad_accum):
                self.request(self.start_micro + j)
            dist.barrier()  # every worker's requests are with the actors before the next version
            if self.ctx.rank == 0:
                self.publish(state.step, self.ctx.trainable_weights())
            dist.barrier()

    def lagging_weights(self, state: TrainerState) -> tuple[int, dict] | None:
        """(version, weights) that drew the resumed step in the uninterrupted run, if the
        checkpoint holds them (rank 0 reads them; the others get an empty dict)."""
        folder = self.ctx.resumed_from
        if not (self.prefetch and state.step and state.sampler_version is not None and folder is not None):
            return None
        from safetensors.torch import load_file

        from longalign_rl.training.checkpoint import SAMPLER_WEIGHTS

        return state.sampler_version, (load_file(str(folder / SAMPLER_WEIGHTS)) if self.ctx.rank == 0 else {})

    def publish(self, version: int, weights: dict) -> float:
        """Rank 0: the actors get `weights` as `version`; kept as what they hold."""
        self.held = (version, weights)
        return self.samplers.publish(weights, version)

    def checkpoint_extras(self, state: TrainerState) -> dict:
        """Rank 0 (whose state.json the checkpoint keeps), after step state.step: the weights
        the actors held during that step, which draw the next step's samples (sampling ahead),
        if older than it."""
        if self.ctx.rank != 0:
            return {}
        version, weights = self.held_during
        state.sampler_version = version if self.prefetch and version != state.step else None
        if state.sampler_version is None:
            return {}
        from longalign_rl.training.checkpoint import SAMPLER_WEIGHTS

        return {SAMPLER_WEIGHTS: weights}

    def prompt_position(self, micro: int) -> int:
        """Prompts handed out to all workers before micro-step `micro`."""
        return self.start_position + (micro - self.start_micro) * self.ctx.world * self.prompts_per_batch

    def request(self, micro: int) -> None:
        """Ask this worker's sampler actor for micro-step `micro`'s chunk of the global batch."""
        step, chunk = self.chunk(micro)
        size = self.prompts_per_batch * self.repeats
        everyone = self.step_prompts(step)
        first = chunk * size
        seeds = [sample_seed(self.cfg, step, first + i) for i in range(size)]
        self.client.request(micro, everyone[first:first + size], sample_seed(self.cfg, step, -1), seeds,
                            everyone if self.reward is None else None)

    def fetch(self, step: int, micro: int):
        """Micro-step `micro`'s samples (a Rollout or a Trajectory); the same micro-step of the
        next step is asked for at once when the lag bound allows (sampling overlaps training)."""
        self.request(micro)
        sample = self.client.get(micro, step, self.ctx.trainable_weights)
        if self.prefetch and step + 1 < self.cfg.train.steps:
            self.request(micro + self.cfg.train.grad_accum)
        return sample

    def observe(self, step: int, j: int, final_latents: torch.Tensor, prompts: list[str],
                stats: dict[str, torch.Tensor], images=None) -> None:
        """The run's metric hooks on the decoded samples (added to `stats`), and the image grid
        of the first micro-step at step 1 and every run.image_every steps (rank 0). `images`:
        the decoded samples, a function that fetches them, or None (decoded here when needed)."""
        ctx = self.ctx
        grid_due = ctx.rank == 0 and j == 0 and (step == 0 or (step + 1) % self.cfg.run.image_every == 0)
        if not (self.hooks or grid_due):
            return
        if callable(images):
            images = images().to(ctx.device)
        if images is None:
            with torch.no_grad():
                images = decode(self.vae, final_latents.to(ctx.device))
        hooked = run_metric_hooks(self.hooks, images, prompts, reserved=stats)
        stats.update(hooked)
        self.summary_keys += [k for k in hooked if k not in self.summary_keys]
        if grid_due:
            save_image_grid(images, prompts, ctx.run_dir / "images" / f"step_{step + 1:06d}.png")

    def sync(self, step: int) -> dict[str, float]:
        """Every train.sync_every steps rank 0 publishes the weights; every worker waits for it.
        Then, when due, rank 0 validates (the last step is published for it if need be)."""
        t = time.perf_counter()
        sync_load, synced = 0.0, (step + 1) % self.cfg.train.sync_every == 0
        if self.ctx.rank == 0:
            self.held_during = self.held  # what drew the next step's samples, asked for during this one
        if synced:
            if self.ctx.rank == 0:
                sync_load = self.publish(step + 1, self.ctx.trainable_weights())
            dist.barrier()  # no worker requests new samples before the actors hold step + 1
        times = {"time/sync": time.perf_counter() - t,  # put + slowest actor load + barrier
                 "time/sync_load": sync_load}
        if self.validation and validation.due(self.cfg, step + 1):
            t = time.perf_counter()
            if not synced:  # the actors get this step's weights early: their samples lag less, never more
                self.publish(step + 1, self.ctx.trainable_weights())
            self.validate(step + 1)
            times["time/validation"] = time.perf_counter() - t
        return times

    def validate(self, step: int) -> dict:
        """Rank 0: the validation prompts drawn by the weights of `step` from their fixed noise,
        decoded, scored by the reward and the metric hooks, and saved (validation.py)."""
        vset, ctx, batch = self.validation, self.ctx, self.cfg.train.batch_size
        latents = self.samplers.generate(vset.prompts, vset.seeds, step, ctx.trainable_weights)
        with torch.no_grad():
            images = torch.cat([decode(self.vae, latents[i:i + batch].to(ctx.device)).float()
                                for i in range(0, len(latents), batch)])
        values: dict[str, torch.Tensor] = {}
        # the whole set's batch statistics, once: a value does not depend on the batch size
        statistics = batch_statistics(self.reward, vset.prompts) if self.reward is not None else None
        for i in range(0, len(images), batch):
            chunk, prompts = images[i:i + batch], vset.prompts[i:i + batch]
            scored = None
            if self.reward is None:  # the reward lives in the reward actors
                rewards = self.client.rewards
                scored = rewards.get(rewards.submit(chunk.cpu(), prompts, vset.prompts)).output
            validation.extend(values, validation.score_images(self.reward, self.hooks, chunk, prompts, scored,
                                                              statistics, self.judges, vset.prompts))
        towers = [self.reward, *(self.judges.scorers if self.judges else [])]  # feature drift: the reward's tower first
        values.update(guard.drift_values(ctx.run_dir, images, guard.image_tower(*towers), ctx.device))
        return validation.save(ctx.run_dir, step, images.cpu(), vset, values)

    def export(self) -> None:
        pass  # lora/ (or unet/) is all stage 2 writes
