"""Stage 1, supervised long-text fine-tuning (docs/method.md section 4): the body of the worker
skeleton (training/worker.py) that trains on image-caption pairs. One step reads:

    LOAD     its global batch's pairs (data.GlobalOrder: a pure function of train.seed, the
             epoch and the step), this worker's train.grad_accum chunks of train.batch_size
             of them, decoded here (`PairSource`; the next step's are loaded while this one trains)
    UPDATE   each chunk: VAE-encode the images, segment-encode the captions, caption dropout,
             the denoising loss (algorithms/denoising.py), DeepSpeed backward/step (it steps
             at the accumulation boundary)

Worker `rank`'s micro-step j holds chunk j * world + rank of the global batch, and every
pair's random draws (its VAE posterior sample, caption dropout, timestep and noise) come from
its own generator, seeded by (train.seed, step, its place in the global batch): the same
global batch split over other worker counts or accumulations trains on the same pairs with
the same draws, and a resumed run, with any worker count, goes on exactly where the killed
one was (docs/scaling.md).

The run ends after data.epochs epochs or train.steps optimiser steps, whichever comes first;
an epoch is n // global batch steps (the pairs left over are not trained on that epoch).
Besides the skeleton's `lora/` (or `unet/`), rank 0 writes `model/`: a diffusers folder of
the base model with the trained weights merged into its UNet, which stage 2 loads with
`model.pretrained: <run_dir>/model`.

The noise schedule is a DDPMScheduler built from the model's own scheduler config: the
schedule the model was trained on, as diffusers' text-to-image training scripts use;
epsilon or v-prediction follows its `prediction_type`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray
import torch

from longalign_rl import validation
from longalign_rl.algorithms.denoising import caption_dropout, denoising_loss
from longalign_rl.config import Config, DataConfig
from longalign_rl.data import GlobalOrder, Pair, generate_rows, is_generator, load_pairs
from longalign_rl import guard
from longalign_rl.hooks import load_metric_hooks
from longalign_rl.encoding.t5 import ADAPTER_FOLDER
from longalign_rl.lora import ADAPTER, export_adapter, load_trainable_state_dict, make_trainable, merge_lora
from longalign_rl.models import DTYPES, Components, load_components, save_model_folder, vae_scale_factor
from longalign_rl.sampling.sampler import Sampler, generate_latents
from longalign_rl.training.checkpoint import TrainerState
from longalign_rl.training.worker import StepOutput, WorkerContext, global_chunk, sample_seed
from longalign_rl.vae import decode, encode, placed
from longalign_rl.outputs import MODEL

log = logging.getLogger(__name__)


def source_spec(data: DataConfig, pairs: list[Pair] | None) -> dict:
    """On the driver: what every worker needs to load pairs by index. Files: their paths and
    captions (`check_source`'s pairs; the images are decoded by the worker that trains on
    them). A generator: run once, in one Ray task, its rows kept in the object store for
    every worker of every node; the driver waits for it, so a generator that fails, or
    gives nothing, stops the run before the workers start, with its own error."""
    if not is_generator(data.source):
        return {"n": len(pairs), "pairs": [(p.image, p.caption) for p in pairs]}
    generate = ray.remote(num_returns=2)(_generate)
    count, rows = generate.remote(data.source, dict(data.kwargs), data.resolution, data.resize)
    return {"n": ray.get(count), "rows": rows}


def _generate(source: str, kwargs: dict, resolution: int, resize: str) -> tuple[int, dict]:
    rows = generate_rows(source, kwargs, resolution, resize)
    return len(rows["caption"]), rows


class PairSource:
    """A run's pairs by index (`source_spec`), as training rows {"image" float32 [B, 3, R, R],
    "caption" [B]}."""

    def __init__(self, spec: dict, data: DataConfig):
        self.n, self.data = spec["n"], data
        self.pairs = [Pair(*p) for p in spec["pairs"]] if "pairs" in spec else None
        self.ref, self.rows = spec.get("rows"), None

    def load(self, indices: list[int]) -> dict[str, np.ndarray]:
        if self.pairs is not None:
            return load_pairs([self.pairs[i] for i in indices], self.data.resolution, self.data.resize)
        if self.rows is None:
            self.rows = ray.get(self.ref)  # read-only arrays in this node's object store
        return {key: self.rows[key][indices] for key in ("image", "caption", "size")}


def update(engine, vae, encoder, scheduler, batch: dict, dropout: float,
           generators: list[torch.Generator], device, family=None) -> dict[str, torch.Tensor]:
    """One micro-step of the denoising loss through the DeepSpeed engine; each pair's random
    draws from its own generator. `encoder`: the family's (Family.encoder); `family`: the
    model's, which reads the conditioning back (Components.family)."""
    images = torch.tensor(batch["image"], device=device)  # a copy: Ray's arrays are read-only
    latents = encode(vae, images, generators).float()
    cond = encoder([str(c) for c in batch["caption"]])
    cond = caption_dropout(cond, encoder.uncond(cond.shape[0]), dropout, generators)
    if family is not None:  # SDXL: each image's original size and crop (SD 1.x: unchanged)
        cond = family.with_image_sizes(cond, torch.as_tensor(batch["size"]), images.shape[-1])
    loss, stats = denoising_loss(engine, scheduler, latents, cond, generators, family)
    engine.backward(loss)
    engine.step()
    return stats


def save_merged_model(cfg: Config, weights: dict[str, torch.Tensor], directory: Path) -> Path:
    """The base model with the trained weights merged into its UNet, as a diffusers folder
    (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) that
    `models.load_components` and `StableDiffusionPipeline.from_pretrained` load. A trained
    T5 adapter's weights (text_adapter.*) are left out here: `Denoising.export` writes them
    beside it, as model/text_adapter/.

    The parts are reloaded in float32, so the frozen ones are saved exactly as they came and
    the LoRA is merged into the float32 base weights whatever the training precision."""
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision,
                            family=cfg.model.family, without_t5=cfg.model.without_t5)
    make_trainable(parts.unet, cfg.lora, family=parts.family)
    load_trainable_state_dict(parts.unet, {k: v for k, v in weights.items() if not k.startswith(ADAPTER + ".")},
                              cfg.lora)
    if cfg.lora.enabled:
        merge_lora(parts.unet)
    return save_model_folder(parts, directory)


class Denoising:
    log_keys = ("epoch", "loss")
    summary_keys = ("loss",)  # what the end-of-run summary compares

    def __init__(self, ctx: WorkerContext, parts: Components, loop_config: dict):
        cfg = self.cfg = ctx.cfg
        self.ctx = ctx
        dtype = DTYPES[cfg.train.precision]
        self.vae = placed(parts.vae, ctx.device, dtype, parts.family.vae_fp16_overflows)
        # With a T5 branch its adapter is the one the engine trains (attached to the UNet):
        # the encoder's output carries its graph, and validation sees its current weights.
        t5 = parts.t5
        if t5 is not None:
            t5.encoder.to(ctx.device, dtype)
        self.family = parts.family
        # validation's size conditioning (SDXL's time ids) is sampler.resolution's; each training
        # image's own is written over it in `update` (Family.with_image_sizes)
        self.encoder = parts.family.encoder(parts, cfg.prompts, resolution=cfg.sampler.resolution,
                                            device=ctx.device, dtype=dtype, t5=t5)
        self.scheduler = parts.family.training_scheduler(parts.scheduler_config)
        self.scheduler_config = parts.scheduler_config  # validation's sampler: the model's own settings
        self.validation = validation.validation_set(cfg) if ctx.rank == 0 else None
        self.judges = guard.build_judges(cfg.run, ctx.device) if self.validation else None  # run.judge: rank 0 alone
        self.hooks = load_metric_hooks(cfg.run.metrics)
        self.source = PairSource(loop_config["data"], cfg.data)

    def validate(self, step: int) -> None:
        """Rank 0 alone: the validation prompts drawn by its own UNet (dropout off) from their
        fixed noise, scored by the metric hooks (stage 1 has no reward), saved (validation.py)."""
        cfg, ctx, unet = self.cfg, self.ctx, self.ctx.engine.module
        scheduler = self.family.scheduler(self.scheduler_config, timestep_spacing=cfg.sampler.timestep_spacing,
                                          final=cfg.sampler.final)
        sampler = Sampler(unet, self.encoder, scheduler,
                          num_steps=cfg.sampler.num_steps, guidance_scale=cfg.sampler.guidance_scale,
                          resolution=cfg.sampler.resolution, num_grad_steps=1, vae_scale_factor=vae_scale_factor(self.vae),
                          family=self.family, latent_channels=self.vae.config.latent_channels)
        vset, batch = self.validation, cfg.train.batch_size
        images, values = [], {}
        for i in range(0, len(vset.prompts), batch):  # generate_latents turns dropout off for its chain
            prompts = vset.prompts[i:i + batch]
            latents = generate_latents(sampler, prompts, vset.seeds[i:i + batch])
            with torch.no_grad():
                chunk = decode(self.vae, latents.to(ctx.device)).float()
            images.append(chunk.cpu())
            validation.extend(values, validation.score_images(None, self.hooks, chunk, prompts, judges=self.judges,
                                                              every_prompt=vset.prompts))
        images = torch.cat(images)
        tower = guard.image_tower(*(self.judges.scorers if self.judges else []))  # stage 1 has no reward
        values.update(guard.drift_values(ctx.run_dir, images, tower, ctx.device))
        validation.save(ctx.run_dir, step, images, vset, values)
        self.validated = step

    def start(self, state: TrainerState) -> None:
        cfg, ctx = self.cfg, self.ctx
        # the last step done and the last validated (a resumed run's start counts as seen)
        self.step_done = self.validated = state.step
        if self.validation:
            validation.truncate_after(ctx.run_dir, state.step)
            if state.step == 0:
                self.validate(0)
        t = cfg.train
        self.order = GlobalOrder(self.source.n, cfg.global_batch, t.seed, cfg.data.shuffle)
        if self.order.steps_per_epoch == 0:
            raise RuntimeError(f"data.source {cfg.data.source!r} gives {self.source.n} pairs, fewer than one step "
                               f"needs: {ctx.world} workers x train.batch_size {t.batch_size} x train.grad_accum "
                               f"{t.grad_accum} = {self.order.global_batch}")
        self.end = cfg.data.epochs * self.order.steps_per_epoch  # the step that the epochs end at
        if state.step:
            log.info("rank %d: step %d, epoch %d", ctx.rank, state.step, self.order.epoch_of(state.step) + 1)
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="pairs")
        self.next = None  # (step, future of its micro-batches)

    def load(self, step: int) -> list[dict[str, np.ndarray]]:
        """This worker's micro-batches of step `step`: chunks j * world + rank of its global batch."""
        size = self.cfg.train.batch_size
        return [self.source.load(self.order.pairs(step, self.chunk(j) * size, size))
                for j in range(self.cfg.train.grad_accum)]

    def chunk(self, j: int) -> int:
        return global_chunk(j, self.ctx.world, self.ctx.rank)

    def step(self, step: int, state: TrainerState) -> StepOutput | None:
        cfg, ctx, size = self.cfg, self.ctx, self.cfg.train.batch_size
        if step >= self.end:
            return None  # data.epochs are done
        # LOAD (the next step's pairs are decoded while this one trains)
        t0 = time.perf_counter()
        group = self.next[1].result() if self.next and self.next[0] == step else self.load(step)
        self.next = (step + 1, self.loader.submit(self.load, step + 1)) if step + 1 < self.end else None
        load_time = time.perf_counter() - t0

        # UPDATE
        stats: dict[str, list[torch.Tensor]] = {}
        for j, batch in enumerate(group):
            first = self.chunk(j) * size
            generators = [torch.Generator(ctx.device).manual_seed(sample_seed(cfg, step, first + i))
                          for i in range(size)]
            micro_stats = update(ctx.engine, self.vae, self.encoder, self.scheduler, batch, cfg.data.caption_dropout,
                                 generators, ctx.device, self.family)
            for k, v in micro_stats.items():
                stats.setdefault(k, []).append(v)
        state.epoch = self.order.epoch_of(step)
        state.samples_in_epoch = (step % self.order.steps_per_epoch + 1) * self.order.global_batch
        extra = {"epoch": state.epoch + 1,  # the epoch of this step
                 "time/load": load_time}    # waiting for this worker's pairs
        if self.validation and validation.due(cfg, step + 1):
            t = time.perf_counter()
            self.validate(step + 1)
            extra["time/validation"] = time.perf_counter() - t
        self.step_done = step + 1
        return StepOutput(stats, extra)

    def finish(self) -> None:
        """Before the export: the last validation, when the data ended before train.steps."""
        if self.validation and self.validated != self.step_done:
            self.validate(self.step_done)

    def export(self) -> None:
        model_dir = save_merged_model(self.cfg, self.ctx.trainable_weights(), self.ctx.run_dir / MODEL)
        # the trained T5 adapter, which a stage 2 from model/ takes (t5.adapter "" looks there)
        export_adapter(self.ctx.engine.module, model_dir / ADAPTER_FOLDER)
        log.info("wrote the merged model %s", self.ctx.run_dir / MODEL)


# Stage 1's body, as train.py hands it to worker.train_func.
BODY = f"{__name__}:{Denoising.__name__}"
