"""Stage 1, supervised long-text fine-tuning (docs/method.md section 4): the body of the worker
skeleton (training/worker.py) that streams image-caption pairs. One step reads:

    LOAD     train.grad_accum micro-batches of train.batch_size pairs from this worker's shard
             of the Ray Data dataset (`build_dataset`: the pairs of data.py, streamed)
    UPDATE   each: VAE-encode the images, segment-encode the captions, caption dropout,
             the denoising loss (algorithms/denoising.py), DeepSpeed backward/step (it steps
             at the accumulation boundary)

The run ends after data.epochs epochs or train.steps optimiser steps, whichever comes first
(a last accumulation that the data cannot fill is dropped). Besides the skeleton's `lora/`
(or `unet/`), rank 0 writes `model/`: a diffusers folder of the base model with the
trained weights merged into its UNet, which stage 2 loads with `model.pretrained:
<run_dir>/model`.

The noise schedule is a DDPMScheduler built from the model's own scheduler config: the
schedule the model was trained on, as diffusers' text-to-image training scripts use;
epsilon or v-prediction follows its `prediction_type`.

Resuming restarts the epoch in progress and skips the micro-batches already used in it
(their images are read but not trained on). The count is exact; which pairs are skipped is
not: Ray Data's streaming_split hands rows to workers as they become ready, and the epoch's
shuffle is not the killed run's.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Iterator

import ray.train
import torch

from longalign_rl import validation
from longalign_rl.algorithms.denoising import caption_dropout, denoising_loss
from longalign_rl.config import Config, DataConfig
from longalign_rl.data import ROWS_PER_BATCH, Pair, check_source, generate_batches, is_generator, load_batch
from longalign_rl.encoding import SegmentEncoder
from longalign_rl.hooks import load_metric_hooks
from longalign_rl.encoding.t5 import ADAPTER_FOLDER
from longalign_rl.lora import ADAPTER, export_adapter, load_trainable_state_dict, make_trainable, merge_lora
from longalign_rl.models import DTYPES, Components, load_components, make_scheduler, save_model_folder, vae_scale_factor
from longalign_rl.sampling.sampler import Sampler, generate_latents
from longalign_rl.training.checkpoint import TrainerState
from longalign_rl.training.worker import StepOutput, WorkerContext, micro_seed
from longalign_rl.vae import decode, encode
from longalign_rl.outputs import MODEL

log = logging.getLogger(__name__)


def build_dataset(data: DataConfig, seed: int, pairs: list[Pair] | None = None):
    """The `ray.data.Dataset` of {"image": float32 [3, R, R] in [0, 1], "caption": str} rows.

    `pairs`: `check_source(data)`'s result when the caller has it (a folder or manifest is
    read again otherwise). File sources hold only paths and captions on the driver; Ray Data
    workers decode the images a batch at a time while the trainers consume them. A generator
    runs in one Ray Data task per epoch (it should be seeded: each epoch calls it again).
    With `data.shuffle` every epoch has another order, seeded by `seed`.
    """
    import ray.data
    from ray.data import RandomSeedConfig

    shuffle_seed = RandomSeedConfig(seed=seed, reseed_after_execution=True)  # a new order each epoch
    if is_generator(data.source):
        ds = ray.data.range(1).map_batches(
            generate_batches, batch_size=None,
            fn_kwargs={"source": data.source, "kwargs": dict(data.kwargs), "resolution": data.resolution,
                       "resize": data.resize})
        return ds.random_shuffle(seed=shuffle_seed) if data.shuffle else ds
    pairs = pairs if pairs is not None else check_source(data)
    ds = ray.data.from_items([{"path": p.image, "caption": p.caption} for p in pairs])
    if data.shuffle:  # shuffle the paths, before the (much larger) images exist
        ds = ds.random_shuffle(seed=shuffle_seed)
    return ds.map_batches(load_batch, batch_size=ROWS_PER_BATCH,
                          fn_kwargs={"resolution": data.resolution, "resize": data.resize})


def micro_batches(shard, cfg: Config, start_epoch: int, skip: int) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) for every full micro-batch of this worker's shard, epoch after epoch
    from `start_epoch`, leaving out the first `skip` batches of that one. Ray Data's
    streaming_split gives every worker the same number of rows, so every worker gets the
    same number of batches and takes part in the same all-reduces."""
    for epoch in range(start_epoch, cfg.data.epochs):
        batches = shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True)
        for i, batch in enumerate(batches):
            if epoch > start_epoch or i >= skip:
                yield epoch, batch


def update(engine, vae, encoder: SegmentEncoder, scheduler, batch: dict, dropout: float,
           generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """One micro-step of the denoising loss through the DeepSpeed engine."""
    images = torch.tensor(batch["image"], device=device)  # a copy: Ray's arrays are read-only
    latents = encode(vae, images, generator).float()
    cond = encoder([str(c) for c in batch["caption"]])
    cond = caption_dropout(cond, encoder.uncond(cond.shape[0]), dropout, generator)
    loss, stats = denoising_loss(engine, scheduler, latents, cond, generator)
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
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision)
    make_trainable(parts.unet, cfg.lora)
    load_trainable_state_dict(parts.unet, {k: v for k, v in weights.items() if not k.startswith(ADAPTER + ".")},
                              cfg.lora)
    if cfg.lora.enabled:
        merge_lora(parts.unet)
    return save_model_folder(parts, directory)


class Denoising:
    log_keys = ("epoch", "loss")
    summary_keys = ("loss",)  # what the end-of-run summary compares

    def __init__(self, ctx: WorkerContext, parts: Components, loop_config: dict):
        from diffusers import DDPMScheduler

        cfg = self.cfg = ctx.cfg
        self.ctx = ctx
        dtype = DTYPES[cfg.train.precision]
        self.vae = parts.vae.to(ctx.device, dtype)
        # With a T5 branch its adapter is the one the engine trains (attached to the UNet):
        # the encoder's output carries its graph, and validation sees its current weights.
        t5 = parts.t5
        if t5 is not None:
            t5.encoder.to(ctx.device, dtype)
        self.encoder = SegmentEncoder(parts.tokenizer, parts.text_encoder.to(ctx.device, dtype),
                                      max_tokens=cfg.prompts.max_tokens, pack_segments=cfg.prompts.pack_segments,
                                      split=cfg.prompts.split, clean_text=cfg.prompts.clean_text, t5=t5)
        self.scheduler = DDPMScheduler.from_config(parts.scheduler_config)
        self.scheduler_config = parts.scheduler_config  # validation's DDIM: the model's own settings
        self.validation = validation.validation_set(cfg) if ctx.rank == 0 else None
        self.hooks = load_metric_hooks(cfg.run.metrics)

    def validate(self, step: int) -> None:
        """Rank 0 alone: the validation prompts drawn by its own UNet (dropout off) from their
        fixed noise, scored by the metric hooks (stage 1 has no reward), saved (validation.py)."""
        cfg, ctx, unet = self.cfg, self.ctx, self.ctx.engine.module
        scheduler = make_scheduler(self.scheduler_config, timestep_spacing=cfg.sampler.timestep_spacing,
                                   final=cfg.sampler.final)
        sampler = Sampler(unet, self.encoder, scheduler,
                          num_steps=cfg.sampler.num_steps, guidance_scale=cfg.sampler.guidance_scale,
                          resolution=cfg.sampler.resolution, num_grad_steps=1, vae_scale_factor=vae_scale_factor(self.vae))
        vset, batch = self.validation, cfg.train.batch_size
        images, values = [], {}
        for i in range(0, len(vset.prompts), batch):  # generate_latents turns dropout off for its chain
            prompts = vset.prompts[i:i + batch]
            latents = generate_latents(sampler, prompts, vset.seeds[i:i + batch])
            with torch.no_grad():
                chunk = decode(self.vae, latents.to(ctx.device)).float()
            images.append(chunk.cpu())
            validation.extend(values, validation.score_images(None, self.hooks, chunk, prompts))
        validation.save(ctx.run_dir, step, torch.cat(images), vset, values)
        self.validated = step

    def start(self, state: TrainerState) -> None:
        # the last step done and the last validated (a resumed run's start counts as seen)
        self.step_done = self.validated = state.step
        if self.validation:
            validation.truncate_after(self.ctx.run_dir, state.step)
            if state.step == 0:
                self.validate(0)
        if state.step:
            log.info("rank %d: epoch %d, %d pairs into it", self.ctx.rank, state.epoch + 1, state.samples_in_epoch)
        self.batch_pairs = self.ctx.world * self.cfg.train.batch_size  # pairs per micro-step, all workers
        self.batches = micro_batches(ray.train.get_dataset_shard("train"), self.cfg, state.epoch,
                                     skip=state.samples_in_epoch // self.batch_pairs)

    def step(self, step: int, state: TrainerState) -> StepOutput | None:
        cfg, ctx, accum = self.cfg, self.ctx, self.cfg.train.grad_accum
        # LOAD
        t0 = time.perf_counter()
        group = list(itertools.islice(self.batches, accum))
        if len(group) < accum:
            if step == 0:
                raise RuntimeError(f"data.source {cfg.data.source!r} does not fill one step: each of the {ctx.world} "
                                   f"workers needs train.batch_size x train.grad_accum = "
                                   f"{cfg.train.batch_size * accum} pairs")
            return None  # data.epochs are done
        load_time = time.perf_counter() - t0

        # UPDATE
        stats: dict[str, list[torch.Tensor]] = {}
        for j, (epoch, batch) in enumerate(group):
            generator = torch.Generator(ctx.device).manual_seed(micro_seed(cfg, step * accum + j, ctx.rank))
            micro_stats = update(ctx.engine, self.vae, self.encoder, self.scheduler, batch, cfg.data.caption_dropout,
                                 generator, ctx.device)
            for k, v in micro_stats.items():
                stats.setdefault(k, []).append(v)
            if epoch != state.epoch:
                state.epoch, state.samples_in_epoch = epoch, 0
            state.samples_in_epoch += self.batch_pairs
        extra = {"epoch": state.epoch + 1,  # the epoch this step's last micro-batch came from
                 "time/load": load_time}    # waiting for this worker's batches
        if self.validation and validation.due(cfg, step + 1):
            t = time.perf_counter()
            self.validate(step + 1)
            extra["time/validation"] = time.perf_counter() - t
        self.step_done = step + 1
        return StepOutput(stats, extra)

    def export(self) -> None:
        if self.validation and self.validated != self.step_done:
            self.validate(self.step_done)  # the data ended before train.steps
        model_dir = save_merged_model(self.cfg, self.ctx.trainable_weights(), self.ctx.run_dir / MODEL)
        # the trained T5 adapter, which a stage 2 from model/ takes (t5.adapter "" looks there)
        export_adapter(self.ctx.engine.module, model_dir / ADAPTER_FOLDER)
        log.info("wrote the merged model %s", self.ctx.run_dir / MODEL)


# Stage 1's body, as train.py hands it to worker.train_func.
BODY = f"{__name__}:{Denoising.__name__}"
