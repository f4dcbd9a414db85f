"""Checkpoint contents, written by every worker into one folder that Ray Train merges.

    weights.safetensors     trainable weights (LoRA or UNet), rank 0
    state.json              the counters of TrainerState (step; stage 2's prompt position and
                            ddpo's per-prompt statistics; stage 1's epoch and pairs used in
                            it), rank 0
    rng/rank{r}.safetensors torch (and CUDA) RNG states of worker r, and
    rng/rank{r}.json        its numpy and Python RNG states: no pickle anywhere
    deepspeed/state/...     DeepSpeed's optimiser and LR-scheduler state (each rank its
                            ZeRO partition; DeepSpeed also keeps its own copy of the
                            trainable weights there, which `load` restores with it)
    optimizer.safetensors   with ZeRO 1/2: the same optimiser state whole, not partitioned
    optimizer.json          (every trainable weight's fp32 master copy, exp_avg, exp_avg_sq;
                            the Adam step; the worker count that saved it), rank 0: what a
                            resume on another worker count loads (`load`, docs/scaling.md)
    sampler_weights.safetensors  stage 2 sampling a step ahead: the older weights that draw
                            the next step's samples (TrainerState.sampler_version), so that a
                            resume draws them as the uninterrupted run did, rank 0
    manifest/rank{r}.json   size and SHA-256 of every file worker r wrote

Trust boundary: DeepSpeed stores its states with torch.save (pickle). They are loaded with
`torch.load(weights_only=True)` and an allow-list of the three DeepSpeed classes they hold
(SAFE_GLOBALS), so a crafted file cannot run code; a file that needs anything else is
refused, not unpickled. The manifests catch truncated or altered files before any load
(`verify`); they guard against corruption, not against someone who can rewrite the
manifests as well (whoever can write the run directory can change the code it runs).

A checkpoint becomes visible only after Ray Train has persisted every worker's files, so
a run killed while writing leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
STATE = "state.json"
OPTIMIZER, OPTIMIZER_INFO = "optimizer.safetensors", "optimizer.json"
SAMPLER_WEIGHTS = "sampler_weights.safetensors"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MANIFESTS = "manifest"
DEEPSPEED_TAG = "state"  # not "latest": DeepSpeed writes a file of that name beside the tag
# Ray Train's own record of the checkpoints it registered, in the run directory (read here
# and by the driver's resume checks; Ray reads it when the run restarts).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def folder_name(step: int) -> str:
    """A checkpoint's folder in the run directory, named by its step (not Ray's timestamp)."""
    return f"checkpoint_{step:06d}"


def snapshot_names(run_dir: Path, latest: bool = True) -> list[str] | None:
    """The checkpoint folder names Ray Train's record holds (its registered checkpoints, and
    with `latest` the latest result's), None without a record; ValueError naming the damage
    when it cannot be read."""
    path = run_dir / RAY_SNAPSHOT
    if not path.is_file():
        return None
    try:
        snapshot = json.loads(path.read_text())
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
        last = snapshot.get("latest_checkpoint_result") if latest else None
        return names + ([last["checkpoint_dir_name"]] if last else [])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"it is damaged ({type(e).__name__}: {e})") from None


@dataclass
class TrainerState:
    step: int = 0              # optimiser steps done
    prompt_position: int = 0   # stage 2: prompts handed out (PromptOrder position)
    epoch: int = 0             # stage 1: the epoch in progress (0-based)
    samples_in_epoch: int = 0  # stage 1: pairs of that epoch used, all workers together
    algorithm: dict = field(default_factory=dict)  # an algorithm's own state (ddpo: per-prompt statistics)
    # stage 2, sampling ahead: the version of the weights that draw the next step's samples
    # (saved in sampler_weights.safetensors), when it is not the checkpoint's own step
    sampler_version: int | None = None


# ---------------------------------------------------------------- RNG, without pickle


def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    (directory / "rng").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "rng" / f"rank{rank}.safetensors"))
    (directory / "rng" / f"rank{rank}.json").write_text(json.dumps({
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next]}))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore worker `rank`'s RNG states; False when the checkpoint has none for it (the
    world size changed, or an older checkpoint stored them as pickles, which are not read)."""
    tensors_path, scalars_path = directory / "rng" / f"rank{rank}.safetensors", directory / "rng" / f"rank{rank}.json"
    if not (tensors_path.is_file() and scalars_path.is_file()):
        return False
    tensors, scalars = load_file(str(tensors_path)), json.loads(scalars_path.read_text())
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = scalars["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


# ---------------------------------------------------------------- DeepSpeed, without code execution


def safe_globals() -> list:
    """The only classes DeepSpeed's ZeRO states may hold (found by loading them with nothing allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def make_loads_safe(engine) -> None:
    """Make every DeepSpeed checkpoint read of `engine` a `weights_only` load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = safe_globals()

    if getattr(engine.checkpoint_engine, "loads_weights_only", False):
        return  # made safe by an earlier load (a resume that fell back to an older checkpoint)

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        loads_weights_only = True

        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # torch names the refused global in its message
                raise CheckpointError(f"{path}: refused to load (it needs more than tensors and DeepSpeed's "
                                      f"allowed classes, or is damaged): {str(e).splitlines()[-1][:300]}") from e

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed uses {type(current).__name__} for checkpoints; only the torch engine "
                              "can be loaded safely here")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


# ---------------------------------------------------------------- manifests


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, altered or unsafe to load."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int) -> None:
    """Size and hash of every file this rank wrote into `directory` (its own temporary folder)."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFESTS).mkdir(exist_ok=True)
    (directory / MANIFESTS / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "files": files}, indent=0))


def verify(directory: Path) -> None:
    """CheckpointError naming the first problem: no manifest, a listed file missing, of
    another size or hash. Every worker runs the same check, so they agree on the verdict."""
    manifests = sorted((directory / MANIFESTS).glob("rank*.json"))
    if not manifests:
        raise CheckpointError(f"{directory}: no manifest (written by an older version, or incomplete)")
    for manifest in manifests:
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{manifest}: unreadable ({e})") from None
        for name, expected in files.items():
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: {name} is missing")
            if path.stat().st_size != expected["bytes"]:
                raise CheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, {expected['bytes']} "
                                      "were written (truncated?)")
            if _sha256(path) != expected["sha256"]:
                raise CheckpointError(f"{directory}: {name} differs from what was written")


# ---------------------------------------------------------------- save and load


def save(directory: Path, engine, weights: dict, state: TrainerState, rank: int, world: int,
         extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Every rank calls this (DeepSpeed's save, and gathering the whole optimiser state, are
    collective), each into its own folder."""
    engine.save_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    whole = whole_optimizer_state(engine)
    save_rng(directory, rank)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS))
        for name, tensors in (extra or {}).items():  # a body's own: {file name: tensors}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name))
        (directory / STATE).write_text(json.dumps(asdict(state)))
        if whole is not None:
            tensors, adam_step = whole
            save_file(tensors, str(directory / OPTIMIZER))
            (directory / OPTIMIZER_INFO).write_text(json.dumps({"workers": world, "adam_step": adam_step}))
    write_manifest(directory, rank)


def load(directory: Path, engine, rank: int, world: int) -> TrainerState:
    """Verify, then restore weights, optimiser, scheduler and this rank's RNG; return the
    counters. Saved by another number of workers, a ZeRO optimiser state is loaded from its
    whole copy (optimizer.safetensors) and partitioned over this one's."""
    verify(directory)
    make_loads_safe(engine)
    saved_by = saved_workers(directory)
    elastic = saved_by is not None and saved_by != world
    path, _ = engine.load_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG, load_module_strict=False,
                                     load_optimizer_states=not elastic)
    if path is None:
        raise CheckpointError(f"no DeepSpeed state in checkpoint {directory}")
    if elastic:
        info = json.loads((directory / OPTIMIZER_INFO).read_text())
        set_whole_optimizer_state(engine, load_file(str(directory / OPTIMIZER)), info["adam_step"])
    load_rng(directory, rank)  # absent when the world size changed; the counters still resume
    # A counter missing from an older checkpoint keeps its default.
    return TrainerState(**json.loads((directory / STATE).read_text()))


def saved_workers(directory: Path) -> int | None:
    """How many workers saved a checkpoint's whole optimiser state; None without one (stage 0,
    whose DeepSpeed state is not partitioned, or a checkpoint from before it was saved)."""
    try:
        return int(json.loads((directory / OPTIMIZER_INFO).read_text())["workers"])
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------- the optimiser state, whole


def _trainable(engine) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


def _zero_optimizer(engine):
    """DeepSpeed's ZeRO stage 1/2 optimiser of `engine`, or None (stage 0)."""
    optimizer = engine.optimizer
    return optimizer if hasattr(optimizer, "single_partition_of_fp32_groups") else None


def whole_optimizer_state(engine) -> tuple[dict[str, torch.Tensor], int] | None:
    """Collective: every trainable weight's fp32 master copy and Adam moments, gathered from
    the ZeRO partitions into whole tensors (CPU), and Adam's step count; None at stage 0.
    DeepSpeed's `safe_get_full_*` do the gathering, one all-reduce each."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = _zero_optimizer(engine)
    if zero is None:
        return None
    steps = {float(s["step"]) for s in zero.optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise CheckpointError(f"the optimiser's parameter groups are at different Adam steps {sorted(steps)}")
    if steps:
        # Link each weight to its group's Adam state again: DeepSpeed links every group once,
        # right after the first group's first step, when a second group (stage 1's T5 adapter,
        # t5.adapter_lr) has no state yet, and never again.
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(group, flat, zero.optimizer.state)
    tensors = {}
    for name, param in _trainable(engine).items():
        tensors[f"{name}.fp32"] = safe_get_full_fp32_param(param).detach().float().cpu()
        for key in ADAM_KEYS:
            value = safe_get_full_optimizer_state(param, key) if steps else torch.zeros_like(param, dtype=torch.float32)
            tensors[f"{name}.{key}"] = value.detach().float().cpu()
    return tensors, int(steps.pop()) if steps else 0


def set_whole_optimizer_state(engine, tensors: dict[str, torch.Tensor], adam_step: int) -> None:
    """Partition a whole optimiser state (`whole_optimizer_state`) over this engine's workers:
    each keeps its own ZeRO partition of the fp32 masters and moments, and the trained
    weights become the masters (in the engine's precision). The optimiser's state is created
    first, as its first step would (torch AdamW: step, exp_avg, exp_avg_sq per flat
    partition), and linked to the weights as DeepSpeed links it."""
    from deepspeed.utils import (lazy_init_hp_params_optimizer_state, safe_set_full_fp32_param,
                                 safe_set_full_optimizer_state)

    zero = _zero_optimizer(engine)
    if zero is None:
        raise CheckpointError("a whole optimiser state loads into a ZeRO stage 1 or 2 engine only")
    params = _trainable(engine)
    missing = sorted({f"{n}.{k}" for n in params for k in ("fp32", *ADAM_KEYS)} - set(tensors))
    if missing:
        raise CheckpointError(f"{OPTIMIZER} lacks {len(missing)} tensors of this model, e.g. {missing[0]}")
    for flat in zero.single_partition_of_fp32_groups:
        zero.optimizer.state[flat] = {"step": torch.tensor(float(adam_step)),
                                      **{k: torch.zeros_like(flat) for k in ADAM_KEYS}}
    for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(group, flat, zero.optimizer.state)
    zero._hp_optimizer_states_linked = True  # done: its own lazy link at the first step would redo it
    for name, param in params.items():
        master = tensors[f"{name}.fp32"].to(param.device)
        safe_set_full_fp32_param(param, master)
        with torch.no_grad():
            param.copy_(master.to(param.dtype))
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(param, tensors[f"{name}.{key}"].to(param.device), key)


def step_of(directory: Path) -> int | None:
    try:
        return int(json.loads((directory / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def on_disk(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders that name their step (state.json), newest step first,
    whatever Ray Train's record of them says (it may be damaged or name a deleted folder)."""
    steps = {p: step_of(p) for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    return sorted((p for p, step in steps.items() if step is not None), key=steps.get, reverse=True)


def registered(run_dir: Path) -> list[Path]:
    """The checkpoint folders Ray Train registered for this run, newest step first."""
    names = snapshot_names(run_dir, latest=False) or []
    folders = [run_dir / n for n in names if (run_dir / n).is_dir()]
    return sorted(folders, key=lambda p: step_of(p) or -1, reverse=True)
