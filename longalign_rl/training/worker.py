"""The one worker skeleton: what every algorithm's Ray Train worker does, around the body
that is the algorithm's own.

`TorchTrainer.fit()` runs `train_func(loop_config)` on every worker, with the body
loop_config["body"] names (the algorithm's record, registry.Algorithm, says which), and it
reads:

    SET UP   context (rank, device, run directory); the UNet with what trains in a DeepSpeed
             engine (training/engine.py); the body builds the rest (VAE, reward, encoder ...)
    RESUME   weights, optimiser, RNG and counters from the newest checkpoint that every
             worker verifies and loads; the config's optimiser settings over the
             checkpoint's; metrics.jsonl cut back to it; config.yaml (re)written once loaded
    LOOP     body.step(): the algorithm's own step (stage 2: SAMPLE, UPDATE, SYNC;
             stage 1: LOAD, UPDATE), then here:
      LOG    all-worker means of the body's statistics, plus the common fields (grad norm,
             lr, weights spread, samples/s, step time); rank 0 appends them to metrics.jsonl
      GUARD  a non-finite loss, grad norm, reward or weights for more than
             run.max_nonfinite_steps steps in a row stops the run: no checkpoint, no
             export, stopped.json says why (the driver exits 1)
      SELECT after a validation, the guard's verdict (guard.py: run.judge, run.select_by,
             run.early_stop): rank 0 keeps a new best validation's weights in best/;
             every worker learns whether the run stops early (it then ends as a finished
             run does: checkpoint, export)
      CKPT   every run.checkpoint_every steps and at the end, every worker reports to Ray Train
      STOP   when the driver was interrupted: checkpoint this step and stop (resumable)
    EXPORT   rank 0 writes lora/ (or unet/), from the fp32 master weights of a bf16/fp16
             run (and text_adapter/ when stage 1 trained a T5 adapter), then whatever the
             body adds (stage 1: model/); a run that selects (guard.py) writes the last
             step's as lora_last/ (unet_last/) and the selected validation's as lora/ ...,
             and summary.json: the body's summary_keys, first vs last window (summary.py)

A body is a class `Body(ctx, parts, loop_config)` with `start(state)`, `step(step, state)
-> StepOutput | None` (None: its data ended), `export()`, `log_keys` and `summary_keys`,
and optionally `finish()` (before the export: stage 1's last validation). Adding an
algorithm means writing its body, its pure loss and its record (registry.Algorithm),
nothing else (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from longalign_rl.config import Config, from_dict, to_yaml
from longalign_rl.console import WARNINGS_LOG, log_warnings_to
from longalign_rl.encoding.encode import CUT_PROMPTS_LOGGER
from longalign_rl.data import is_generator
from longalign_rl import guard, validation
from longalign_rl.lora import export_adapter, export_for_diffusers, load_trainable_state_dict, trainable_state_dict
from longalign_rl.models import Components
from longalign_rl.outputs import CONFIG, LORA, MetricsLog, STOPPED, STOP_REQUEST, UNET, write_atomic
from longalign_rl.registry import import_path
from longalign_rl.summary import write_summary
from longalign_rl.training import checkpoint, failures
from longalign_rl.training.engine import apply_optimizer_settings, build_trainable, grad_norm

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a body knows of the worker it runs in."""

    cfg: Config
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    engine: Any  # DeepSpeed engine; engine.module is the UNet with what trains
    resumed_from: Path | None = None  # the checkpoint folder the run resumed from (set before body.start)

    @contextlib.contextmanager
    def master_precision(self):
        """Inside it the trainable weights hold DeepSpeed's fp32 master values (a bf16/fp16
        run's exports and checkpoints must not be rounded to 16 bits); outside, their own.
        For ZeRO 1/2 the master weights are partitioned, so every worker must enter it."""
        if self.cfg.train.precision == "fp32":
            yield
            return
        from deepspeed.utils import safe_get_full_fp32_param

        saved = []
        for p in self.engine.module.parameters():
            if p.requires_grad:
                master = safe_get_full_fp32_param(p)  # a collective: all ranks, same order
                if master is not None:
                    saved.append((p, p.data))
                    p.data = master.detach().reshape(p.shape)
        try:
            yield
        finally:
            for p, data in saved:
                p.data = data

    def trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights (LoRA or whole UNet) as CPU copies: what samplers and exports need."""
        return trainable_state_dict(self.engine.module, self.cfg.lora)


@dataclass
class StepOutput:
    """What a body's step returns to the skeleton."""

    # Per-sample (or per-micro-step) values, averaged over every worker: loss, reward ...
    stats: dict[str, list[torch.Tensor]]
    # Logged as they are, after the common fields: counters, timings, this worker's maxima.
    extra: dict[str, float] = field(default_factory=dict)


class Body(Protocol):
    log_keys: tuple[str, ...]  # record fields shown in the per-step log line
    summary_keys: tuple[str, ...] | list[str]  # compared first vs last window at the end (summary.py)

    def start(self, state: checkpoint.TrainerState) -> None: ...
    def step(self, step: int, state: checkpoint.TrainerState) -> StepOutput | None: ...
    def export(self) -> None: ...


def sample_seed(cfg: Config, step: int, index: int) -> int:
    """The seed of sample `index` of step `step`'s global batch (stage 2: its initial noise
    and every stochastic step's noise; stage 1: its VAE draw, caption dropout, timestep and
    noise), whichever worker, micro-step and actor handle it, so that any split of the global
    batch, and a resumed run, draw the same (docs/scaling.md). Index -1: the step's own seed,
    for the choices its whole batch shares (which steps are trained)."""
    return ((cfg.train.seed * 1_000_003 + step) * 1_000_033 + index) % (2**63 - 1)


def global_chunk(j: int, world: int, rank: int) -> int:
    """Which chunk of its step's global batch worker `rank`'s micro-step `j` holds: chunk
    j * world + rank, of train.batch_size samples each (so a global batch's samples are
    numbered the same however it is split)."""
    return j * world + rank


def require_run_dir(run_dir: Path, rank: int) -> None:
    """The driver wrote config.yaml before starting the workers: a worker that cannot see it
    runs on a node without the shared storage."""
    if not (run_dir / CONFIG).is_file():
        raise RuntimeError(
            f"rank {rank} on node {ray.get_runtime_context().get_node_id()[:8]} cannot see the run directory "
            f"{run_dir}: on a multi-node cluster run.output_dir must be shared storage (see cluster/README.md)")


# Statistics that may have no value at all in a step (no prompt had a 7th sentence): left
# out of that step's record rather than logged as NaN.
OPTIONAL_STATS = ("segment_score/",)


def all_means(stats: dict[str, list[torch.Tensor]], device) -> dict[str, float]:
    """Mean of each statistic over every sample of every worker (NaN where there is none,
    except OPTIONAL_STATS, which are left out then).

    Sums and counts are all-reduced, so workers with different numbers of values (say,
    of 7th sentences) are weighted by what they saw; every worker must pass the same keys.
    """
    names = sorted(stats)
    values = [torch.cat([v.reshape(-1) for v in stats[k]]).double() for k in names]
    sums = torch.stack([torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=torch.float64)]) for v in values])
    sums = sums.to(device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return {k: s / c if c > 0 else math.nan for k, (s, c) in zip(names, sums.tolist())
            if c > 0 or not k.startswith(OPTIONAL_STATS)}


def trainable_checksum(module) -> torch.Tensor:
    """The sum of every trainable weight (float64): compared across workers, and not finite
    as soon as one weight is not."""
    return torch.stack([p.detach().double().sum() for p in module.parameters() if p.requires_grad]).sum()


def weights_spread(checksum: torch.Tensor) -> float:
    """Max - min over workers of their trainable_checksum: 0 when they agree."""
    both = torch.stack([checksum, -checksum])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return float(both[0] + both[1])


GUARDED = ("loss", "grad_norm", "reward")  # record fields that must stay finite


def weights_finite(module) -> bool:
    """Whether every trainable weight is finite."""
    return bool(torch.isfinite(trainable_checksum(module)))


def nonfinite_cause(record: dict, weights_ok: bool, keys: tuple[str, ...] = GUARDED) -> str | None:
    """What is not finite in a step's record, or None. `reward` is the mean over the samples
    with a finite reward, so it is NaN only when every sample's is."""
    bad = [k for k in keys if k in record and not math.isfinite(record[k])]
    if not weights_ok:
        bad.append("weights")
    return ", ".join(bad) or None


def stop_requested(run_dir: Path, rank: int, device) -> bool:
    """Whether the driver asked the run to stop (rank 0 looks; every worker learns the answer)."""
    flag = torch.tensor([1.0 if rank == 0 and (run_dir / STOP_REQUEST).exists() else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _stopped(step: int, cause: str, checkpointed: int, why: str) -> dict:
    kept = (f"the last checkpoint (step {checkpointed}) holds finite weights" if checkpointed
            else "no checkpoint was written")
    return {"step": step, "cause": cause, "last_checkpoint": checkpointed,
            "message": f"{why}; nothing was checkpointed or exported after it; {kept}"}


def _resume(ctx: WorkerContext) -> checkpoint.TrainerState:
    """The newest checkpoint that every worker verifies and loads: Ray Train's latest first,
    then the run's other checkpoint folders on disk, newest step first (with a warning for
    each one skipped). A folder that verifies but does not load (a file DeepSpeed refuses)
    is skipped the same way, and so are the folders Ray Train's record no longer has (the
    driver moves a damaged record aside: resume.check_checkpoint_index). Each try's outcome is
    all-reduced, so every worker loads the same checkpoint or none."""
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt is not None else contextlib.nullcontext()) as d:
        latest = [Path(d)] if d is not None else []
        candidates = latest + [p for p in checkpoint.on_disk(ctx.run_dir)
                               if not latest or p.resolve() != latest[0].resolve()]
        if not candidates:
            return checkpoint.TrainerState()
        problems = []
        for folder in candidates:
            state, error = None, None
            try:
                checkpoint.verify(folder)
                state = checkpoint.load(folder, ctx.engine, ctx.rank, ctx.world)
            except Exception as e:  # CheckpointError, or what DeepSpeed or torch.load raise
                error = f"{type(e).__name__}: {e}"
            if all_agree(error is None, ctx.device):
                log.info("rank %d: resumed at step %d from %s", ctx.rank, state.step, folder.name)
                ctx.resumed_from = folder
                return state
            problems.append(f"{folder.name}: {error or 'another worker could not load it'}")
            if ctx.rank == 0:
                log.warning("checkpoint %s cannot be resumed from (%s); trying the previous one", folder.name,
                            problems[-1])
    raise checkpoint.CheckpointError("no checkpoint of this run verifies and loads: " + "; ".join(problems))


def all_agree(ok: bool, device) -> bool:
    """Whether `ok` holds on every worker (a MIN all-reduce)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _report(ctx: WorkerContext, state: checkpoint.TrainerState, record: dict, body) -> None:
    """Every worker saves its part of the checkpoint and reports it to Ray Train. A body with
    `checkpoint_extras(state)` adds tensors of its own (rank 0: the sampler actors' lagging
    weights, stage2.SamplerFed)."""
    extra = body.checkpoint_extras(state) if hasattr(body, "checkpoint_extras") else {}
    with tempfile.TemporaryDirectory() as d:
        with ctx.master_precision():
            weights = ctx.trainable_weights() if ctx.rank == 0 else {}
        checkpoint.save(Path(d), ctx.engine, weights, state, ctx.rank, ctx.world, extra)
        # named by step (checkpoint_000024), not by Ray Train's timestamp
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint.folder_name(state.step))


def _format(record: dict, keys: tuple[str, ...]) -> str:
    shown = [f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in keys if k in record]
    return f"step {record['step']}: {' '.join(shown)} ({record['time/step']:.2f}s)"


def select(ctx: WorkerContext, step: int) -> bool:
    """After the validation at `step`: rank 0 takes the guard's verdict from
    validation.jsonl and, when this validation is the selected one, keeps the weights it sampled
    with in best/ (guard.assess: the latest within the uncertainty of the best). Whether the
    run stops early, the same on every worker."""
    stop = False
    if ctx.rank == 0:
        verdict = guard.assess(ctx.cfg.run, validation.read(ctx.run_dir))
        if verdict is not None and verdict.selected_step == step:
            guard.save_best(ctx.run_dir, step, ctx.trainable_weights(), verdict)
        stop = verdict is not None and verdict.stop is not None
        if stop:
            log.info("early stop at step %d: %s", step, verdict.stop)
    flag = torch.tensor([1.0 if stop else 0.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reconcile_best(ctx: WorkerContext, step: int) -> None:
    """Rank 0, at the start: best/ must hold the weights of the selected validation up to `step`
    (a resume cut validation.jsonl back to it). Weights of a later step are of a future the
    resume dropped; the selected step's are taken from its checkpoint when best/ lacks them."""
    import shutil

    verdict = guard.assess(ctx.cfg.run, validation.read(ctx.run_dir))
    held = guard.held_step(ctx.run_dir)
    if held is not None and (verdict is None or held != verdict.selected_step):
        shutil.rmtree(ctx.run_dir / guard.BEST)
        held = None
    if verdict is None or verdict.selected_step is None or held is not None:
        return
    from safetensors.torch import load_file

    selected = verdict.selected_step
    folder = next((p for p in checkpoint.on_disk(ctx.run_dir) if checkpoint.step_of(p) == selected), None)
    if folder is not None:
        guard.save_best(ctx.run_dir, selected, load_file(str(folder / checkpoint.WEIGHTS)), verdict)
    elif selected == step:
        guard.save_best(ctx.run_dir, step, ctx.trainable_weights(), verdict)
    else:
        log.warning("the selected validation's weights (step %d) are not in best/ nor in a checkpoint (the run resumed "
                    "from step %d); a later selection replaces them, else lora/ holds the last step's", selected, step)


def use_selected(ctx: WorkerContext, verdict: guard.Verdict, last: int) -> None:
    """Rank 0, exporting: the selected validation's weights into the model (from best/), so
    that lora/ (unet/, model/) are theirs; the last step's are the model's already."""
    if verdict.selected_step not in (None, last) and guard.held_step(ctx.run_dir) == verdict.selected_step:
        load_trainable_state_dict(ctx.engine.module, guard.load_best(ctx.run_dir), ctx.cfg.lora)


def exported_step(ctx: WorkerContext, verdict: guard.Verdict, last: int) -> int:
    """The step whose weights lora/ holds: the selected one's, or the last step's when best/
    lost them (reconcile_best)."""
    held = guard.held_step(ctx.run_dir)
    return held if held is not None and held == verdict.selected_step else last


def train_func(loop_config: dict) -> None:
    """Ray Train's function on every worker: the skeleton above, with the body named by
    loop_config["body"], "pkg.module:Class" (imported here, on the worker). An exception is
    kept with its traceback in run_dir/errors/rank<r>.txt and reaches the driver as a
    failures.WorkerFailure, which tells whether a retry would meet it again."""
    with failures.reported(Path(loop_config["run_dir"]), ray.train.get_context().get_world_rank()) as attempt:
        _run_worker(loop_config, import_path(loop_config["body"], "the algorithm's body"), attempt)


def _run_worker(loop_config: dict, make_body: type, attempt: failures.Attempt) -> None:
    # ------------------------------------------------------------------ SET UP
    run_dir = Path(loop_config["run_dir"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    # An elastic run (train.min_workers) may have fewer workers than train.num_workers: the
    # same global batch, more micro-steps each.
    asked: Config = from_dict(loop_config["config"])
    cfg = asked.with_workers(world)
    if rank == 0 and world != asked.train.num_workers:
        log.warning("%d workers (train.min_workers elastic run): train.grad_accum %d keeps the global batch of %d",
                    world, cfg.train.grad_accum, cfg.global_batch)
    device = ray.train.torch.get_device()
    require_run_dir(run_dir, rank)
    # Stage 1 encodes captions here; those of a folder or manifest were measured by the driver.
    measured = cfg.stage == 2 or not is_generator(cfg.data.source)
    log_warnings_to(run_dir / WARNINGS_LOG, f"rank {rank}", skip=(CUT_PROMPTS_LOGGER,) if measured else ())
    parts: Components
    parts, engine, schedule = build_trainable(cfg, device)
    ctx = WorkerContext(cfg, run_dir, rank, world, device, engine)
    body: Body = make_body(ctx, parts, loop_config)
    log.info("rank %d: models and DeepSpeed engine ready", rank)

    # ------------------------------------------------------------------ RESUME
    state = _resume(ctx)
    if state.step:  # the config's optimiser settings, not the checkpoint's: a resume may change them
        apply_optimizer_settings(cfg, schedule)
    metrics_log = MetricsLog(run_dir)
    if rank == 0:
        metrics_log.truncate_after(state.step)
        # Only now that the checkpoint has loaded: a resume whose load fails leaves the run's
        # config as it was, so the run stays resumable.
        write_atomic(run_dir / CONFIG, to_yaml(asked))  # as asked: not an elastic run's count of the moment
    body.start(state)
    selecting = guard.selection_key(cfg.run) is not None  # config.validate: a selection needs validation
    if selecting and rank == 0:
        reconcile_best(ctx, state.step)

    # ------------------------------------------------------------------ LOOP
    checkpointed, record, nonfinite, stopped, cause = state.step, None, 0, None, None
    ended_early = False
    if rank == 0:
        (run_dir / STOPPED).unlink(missing_ok=True)
    watchdog = attempt.watchdog = failures.Watchdog(run_dir, rank, cfg.train.step_timeout_s)
    for step in range(state.step, cfg.train.steps):
        attempt.step = step + 1
        watchdog.arm(step + 1)
        t0 = time.perf_counter()
        out = body.step(step, state)
        if out is None:
            break  # the body's data ended (stage 1: data.epochs are done)
        state.step = step + 1

        # LOG
        means = all_means(out.stats, device)
        checksum = trainable_checksum(engine.module)  # one pass serves the spread and the guard
        spread = weights_spread(checksum)
        elapsed = time.perf_counter() - t0
        lrs = schedule.get_last_lr()  # a second group: stage 1's T5 adapter (t5.adapter_lr)
        record = {
            "step": step + 1,
            **means,
            "grad_norm": grad_norm(engine),
            "lr": lrs[0],
            **({"lr/t5_adapter": lrs[1]} if len(lrs) > 1 else {}),
            "weights_spread": spread,  # must stay 0: every worker holds the same weights
            "workers": world,  # fewer than train.num_workers after an elastic run lost a node
            "samples_per_s": cfg.global_batch / elapsed,
            "time/step": elapsed,
            **out.extra,
        }
        if rank == 0:
            metrics_log.write(record)
            log.info(_format(record, body.log_keys))

        # GUARD: every worker sees the same all-reduced record, so all stop together
        # fp16's loss scaling skips overflowing steps by design, and an engine that did not
        # measure the norm (no clipping) reports none: the grad norm is guarded otherwise only.
        skip_norm = cfg.train.precision == "fp16" or engine.get_global_grad_norm() is None
        cause = nonfinite_cause(record, bool(torch.isfinite(checksum)),
                                tuple(k for k in GUARDED if not (skip_norm and k == "grad_norm")))
        nonfinite = nonfinite + 1 if cause else 0
        if cause and rank == 0:
            log.warning("step %d: %s not finite (%d in a row, run.max_nonfinite_steps=%d)", step + 1, cause,
                        nonfinite, cfg.run.max_nonfinite_steps)
        if nonfinite > cfg.run.max_nonfinite_steps:
            stopped = _stopped(step + 1, cause, checkpointed,
                               f"{cause} not finite for {nonfinite} steps in a row (run.max_nonfinite_steps="
                               f"{cfg.run.max_nonfinite_steps}): stopped at step {step + 1}")
            break

        # SELECT (guard.py): after a validation; every worker stops together
        if selecting and validation.due(cfg, state.step) and select(ctx, state.step):
            ended_early = True
            break

        # CKPT (never of non-finite weights)
        if state.step % cfg.run.checkpoint_every == 0 and not cause:
            _report(ctx, state, record, body)
            checkpointed = state.step

        # STOP: the driver got SIGINT/SIGTERM; end here, resumable
        if stop_requested(run_dir, rank, device):
            if state.step > checkpointed and not cause:
                _report(ctx, state, record, body)
                checkpointed = state.step
            stopped = {"step": state.step, "cause": "interrupt", "last_checkpoint": checkpointed,
                       "message": f"interrupted after step {state.step}; the last checkpoint is of step {checkpointed}"}
            break
        attempt.steps_done += 1
    watchdog.disarm()
    if cause and not stopped:  # the last step was tolerated, but its weights are not to be kept
        stopped = _stopped(state.step, cause, checkpointed, f"the last step's {cause} was not finite")
    if stopped:
        if rank == 0:
            (run_dir / STOPPED).write_text(json.dumps(stopped, indent=1) + "\n")
        return
    if state.step > checkpointed:  # the run ended between checkpoints: one more, at the end
        _report(ctx, state, record, body)

    finish = getattr(body, "finish", None)  # stage 1: the last validation when its data ended early
    if finish is not None:
        finish()
        if selecting and not ended_early and not validation.due(cfg, state.step):
            select(ctx, state.step)

    # ------------------------------------------------------------------ EXPORT
    exported = run_dir / (LORA if cfg.lora.enabled else UNET)
    family = getattr(body, "family", None)
    with ctx.master_precision():  # a bf16/fp16 run exports its fp32 master weights
        if rank == 0:
            verdict = guard.assess(cfg.run, validation.read(run_dir)) if selecting else None
            if verdict is not None:  # the last step's weights beside the selected ones
                export_for_diffusers(engine.module, cfg.lora, exported.with_name(exported.name + "_last"), family)
                use_selected(ctx, verdict, state.step)
            export_for_diffusers(engine.module, cfg.lora, exported, family)
            export_adapter(engine.module, run_dir / "text_adapter")  # stage 1's trained T5 adapter, if any
            body.export()
            records = validation.read(run_dir)
            if records:  # guard.json: what was selected, and the drift alarms
                report = {"selection": guard.selection_record(cfg.run, records, ended_early,
                                                              exported_step(ctx, verdict, state.step))
                          if verdict is not None else None,
                          "alarms": [asdict(a) for a in guard.drift_alarms(cfg.run.drift, records)]}
                write_atomic(run_dir / guard.REPORT, json.dumps(report, indent=1, allow_nan=True) + "\n")
    if rank == 0:
        write_summary(run_dir, body.summary_keys, cfg.global_batch)
