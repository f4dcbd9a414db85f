"""Stage 1 (METHOD.md section 4): supervised long-text fine-tuning, the per-worker function
that Ray Train's TorchTrainer runs on every worker.

Each worker streams its shard of the image-caption dataset (data.py) and one step reads:

    LOAD     train.grad_accum micro-batches of train.batch_size pairs from this worker's shard
    UPDATE   each: VAE-encode the images, segment-encode the captions, caption dropout,
             the denoising loss, DeepSpeed backward/step (it steps at the accumulation boundary)
    LOG      rank 0 appends the all-worker means to metrics.jsonl
    CKPT     every checkpoint_every steps every worker reports to Ray Train

The run ends after data.epochs epochs or train.steps optimiser steps, whichever comes first
(a last accumulation that the data cannot fill is dropped). Rank 0 then writes the LoRA
(`lora/`, or `unet/` when fine-tuning the whole UNet) and `model/`: a diffusers folder of
the base model with the trained weights merged into its UNet, which stage 2 loads with
`model.pretrained: <run_dir>/model`.

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
import tempfile
import time
from pathlib import Path
from typing import Iterator

import ray
import ray.train
import ray.train.torch
import torch

from longalign_rl.algorithms.denoising import caption_dropout, denoising_loss, encode_images
from longalign_rl.config import Config, from_dict
from longalign_rl.encoding import SegmentEncoder
from longalign_rl.lora import (
    export_for_diffusers, load_trainable_state_dict, make_trainable, merge_lora, trainable_state_dict,
)
from longalign_rl.models import DTYPES, load_components
from longalign_rl.training import checkpoint
from longalign_rl.training.outputs import MetricsLog
from longalign_rl.training.worker import (
    all_means, grad_norm, make_engine, prepare_unet, require_run_dir, weights_spread,
)

log = logging.getLogger(__name__)


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


def micro_seed(cfg: Config, micro: int, rank: int) -> int:
    """Seed of a micro-step's VAE sample, caption dropout, timesteps and noise: a resumed run
    draws what the killed one would have."""
    return (cfg.train.seed * 1_000_003 + micro) * 1_009 + rank


def update(engine, vae, encoder: SegmentEncoder, scheduler, batch: dict, dropout: float,
           generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """One micro-step of the denoising loss through the DeepSpeed engine."""
    images = torch.tensor(batch["image"], device=device)  # a copy: Ray's arrays are read-only
    latents = encode_images(vae, images, generator).float()
    cond = encoder([str(c) for c in batch["caption"]])
    cond = caption_dropout(cond, encoder.uncond(cond.shape[0]), dropout, generator)
    loss, stats = denoising_loss(engine, scheduler, latents, cond, generator)
    engine.backward(loss)
    engine.step()
    return stats


def save_merged_model(cfg: Config, weights: dict[str, torch.Tensor], directory: Path) -> Path:
    """The base model with the trained weights merged into its UNet, as a diffusers folder
    (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) that
    `models.load_components` and `StableDiffusionPipeline.from_pretrained` load.

    The parts are reloaded in float32, so the frozen ones are saved exactly as they came and
    the LoRA is merged into the float32 base weights whatever the training precision."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision)
    make_trainable(parts.unet, cfg.lora)
    load_trainable_state_dict(parts.unet, weights, cfg.lora)
    if cfg.lora.enabled:
        merge_lora(parts.unet)
    pipeline = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def train_func(loop_config: dict) -> None:
    from diffusers import DDPMScheduler

    cfg: Config = from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    require_run_dir(run_dir, rank)
    accum, per_step = cfg.train.grad_accum, cfg.global_batch

    # ------------------------------------------------------------------ models
    torch.manual_seed(cfg.train.seed)  # same LoRA init on every worker
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision)
    engine, schedule = make_engine(cfg, parts.unet, prepare_unet(cfg, parts.unet, device))
    dtype = DTYPES[cfg.train.precision]
    vae = parts.vae.to(device, dtype)
    encoder = SegmentEncoder(parts.tokenizer, parts.text_encoder.to(device, dtype),
                             max_tokens=cfg.prompts.max_tokens, pack_segments=cfg.prompts.pack_segments)
    scheduler = DDPMScheduler.from_config(parts.scheduler_config)
    log.info("rank %d: models and DeepSpeed engine ready", rank)

    # ------------------------------------------------------------------ resume
    state = checkpoint.TrainerState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint.load(Path(d), engine, rank)
        log.info("rank %d: resumed at step %d (epoch %d, %d pairs into it)", rank, state.step, state.epoch + 1,
                 state.samples_in_epoch)
    metrics_log = MetricsLog(run_dir)
    if rank == 0:
        metrics_log.truncate_after(state.step)

    batch_pairs = world * cfg.train.batch_size  # pairs per micro-step, all workers
    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg, state.epoch,
                            skip=state.samples_in_epoch // batch_pairs)
    checkpointed = state.step
    record = None
    for step in range(state.step, cfg.train.steps):
        # LOAD
        t0 = time.perf_counter()
        group = list(itertools.islice(batches, accum))
        if len(group) < accum:
            break  # data.epochs are done
        load_time = time.perf_counter() - t0

        # UPDATE
        stats: dict[str, list[torch.Tensor]] = {}
        for j, (epoch, batch) in enumerate(group):
            generator = torch.Generator(device).manual_seed(micro_seed(cfg, step * accum + j, rank))
            micro_stats = update(engine, vae, encoder, scheduler, batch, cfg.data.caption_dropout, generator, device)
            for k, v in micro_stats.items():
                stats.setdefault(k, []).append(v)
            if epoch != state.epoch:
                state.epoch, state.samples_in_epoch = epoch, 0
            state.samples_in_epoch += batch_pairs
        state.step = step + 1

        # LOG
        means = all_means(stats, device)
        elapsed = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "loss": means["loss"],
            "timestep": means["timestep"],  # mean drawn timestep (uniform in [0, 1000): about 500)
            "grad_norm": grad_norm(engine),
            "lr": schedule.get_last_lr()[0],
            "epoch": state.epoch + 1,       # the epoch this step's last micro-batch came from
            "weights_spread": weights_spread(engine.module),  # must stay 0: every worker holds the same weights
            "samples_per_s": per_step / elapsed,
            "time/step": elapsed,
            "time/load": load_time,         # waiting for this worker's batches
        }
        if rank == 0:
            metrics_log.write(record)
            log.info("step %d (epoch %d): loss %.4f (%.2fs)", step + 1, state.epoch + 1, record["loss"], elapsed)

        # CKPT
        if (step + 1) % cfg.run.checkpoint_every == 0:
            _report(engine, cfg, state, record, rank)
            checkpointed = state.step

    if record is None and state.step == 0:
        raise RuntimeError(f"data.source {cfg.data.source!r} does not fill one step: each of the {world} workers "
                           f"needs train.batch_size x train.grad_accum = {cfg.train.batch_size * accum} pairs")
    if state.step > checkpointed:  # the run ended between checkpoints: one more, at the end
        _report(engine, cfg, state, record, rank)

    if rank == 0:
        weights = trainable_state_dict(engine.module, cfg.lora)
        export_for_diffusers(engine.module, cfg.lora, run_dir / ("lora" if cfg.lora.enabled else "unet"))
        save_merged_model(cfg, weights, run_dir / "model")
        log.info("wrote %s and the merged model %s", "lora/" if cfg.lora.enabled else "unet/", run_dir / "model")


def _report(engine, cfg: Config, state: checkpoint.TrainerState, record: dict, rank: int) -> None:
    """Every worker saves its part of the checkpoint and reports it to Ray Train."""
    with tempfile.TemporaryDirectory() as d:
        weights = trainable_state_dict(engine.module, cfg.lora) if rank == 0 else {}
        checkpoint.save(Path(d), engine, weights, state, rank)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))
