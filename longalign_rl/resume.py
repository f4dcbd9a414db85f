"""The run directory's bookkeeping on the driver (docs/reliability.md): a new run's name is
free, one driver at a time (`RunLock`), a resume reads the run's config and refuses changes
to what its checkpoints mean (`FIXED_ON_RESUME`), the junk a killed run left is cleared, and
a start that failed leaves nothing. No Ray.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import yaml

from longalign_rl.config import Config, ConfigError, to_dict
from longalign_rl.outputs import CONFIG, METRICS, write_atomic

log = logging.getLogger("longalign_rl")


def read_run_config(run_dir: Path) -> dict:
    """The saved config.yaml of the run to resume, or ConfigError naming what is wrong; its
    metrics.jsonl and validation.jsonl are read too (a damaged line is named here, before
    anything starts; a cut last line is left out by the worker)."""
    from longalign_rl.outputs import read_jsonl
    from longalign_rl.validation import FILE as VALIDATION_FILE

    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there, not a run directory")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        saved, why = None, f"not valid YAML ({' '.join(str(e).split())[:200]})"
    else:
        why = "empty" if saved is None else "not a mapping of sections"
    if not isinstance(saved, dict):
        from longalign_rl.training.checkpoint import on_disk

        if not on_disk(run_dir):
            hint = "the run never checkpointed: start it again with the same run.name"
        elif (run_dir / "config.original.yaml").is_file():
            hint = f"{run_dir / 'config.original.yaml'} holds the config the run started with"
        else:
            hint = ("its checkpoints keep the weights but not the config: write the config the run started with "
                    "back to config.yaml to resume it")
        raise ConfigError(f"--resume: {path} is {why}; {hint}")
    for name in (METRICS, VALIDATION_FILE):
        try:
            read_jsonl(run_dir / name)
        except ValueError as e:
            raise ConfigError(f"--resume: {e}") from None
    return saved


def check_new_run_dir(run_dir: Path) -> None:
    """A new run's directory is new, or empty, or what a start that failed before its first
    step left (no config.yaml worth keeping, no metrics, no checkpoint)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    from longalign_rl.training.checkpoint import on_disk

    config = run_dir / CONFIG
    started = (config.is_file() and config.read_text().strip()) or on_disk(run_dir) or \
        ((run_dir / METRICS).is_file() and (run_dir / METRICS).read_text().strip())
    if started:
        raise ConfigError(f"run.name: {run_dir} already holds a run; pass --resume {run_dir} to continue it")


class RunLock:
    """run_dir/run.lock, held (an exclusive flock) by the driver while it runs in the run
    directory: a second run with the same run.name, or a second --resume, is refused while
    the first lives. The kernel releases it when its process ends, however it ends, so the
    resume of a killed run takes it over. The file names its holder."""

    FILE = "run.lock"

    def __init__(self, run_dir: Path):
        import fcntl
        import socket

        self.path = run_dir / self.FILE
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            raise ConfigError(f"run.name: {run_dir} is in use by another run ({holder or 'a running driver'}); "
                              "wait for it to end, or choose another run.name") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the descriptor releases the flock


def check_checkpoint_index(run_dir: Path) -> None:
    """Ray Train's record of the run's checkpoints (checkpoint_manager_snapshot.json), read
    by Ray when the run restarts: damaged, or naming a checkpoint folder that is gone, it
    stops Ray's controller with a raw traceback. It is moved aside (kept, with a warning),
    and the workers resume from the newest checkpoint folder on disk that verifies
    (worker._resume)."""
    from longalign_rl.training.checkpoint import RAY_SNAPSHOT, snapshot_names

    path = run_dir / RAY_SNAPSHOT
    try:
        names = snapshot_names(run_dir)
        if names is None:
            return
        gone = sorted({n for n in names if not (run_dir / n).is_dir()})
        problem = f"it names {', '.join(gone)}, which is gone" if gone else None
    except ValueError as e:
        problem = str(e)
    if problem:
        aside = path.with_name(f"{path.name}.damaged")
        path.replace(aside)
        log.warning("%s: %s; moved aside to %s, and the run resumes from the newest checkpoint folder that "
                    "verifies", path.name, problem, aside.name)


# What a resume may not change: what the checkpoint's weights, optimiser state or random
# streams mean. Every other key may change and takes effect (docs/reliability.md): the
# workers run on the resumed config, and worker.py applies its optimiser settings over the
# checkpoint's.
FIXED_ON_RESUME = ("stage", "model.pretrained", "model.family", "model.revision", "model.random_seed", "lora.enabled", "lora.rank",
                   "lora.alpha", "lora.target_modules", "train.seed", "train.zero_stage", "train.precision",
                   "t5.encoder", "t5.adapter", "t5.adapter_dim", "t5.max_tokens")


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_resume(saved: dict, cfg: Config, run_dir: Path | None = None) -> None:
    """A resume keeps what the checkpoint's state means (FIXED_ON_RESUME), and has steps left."""
    new = to_dict(cfg)
    defaults = to_dict(Config())

    def was(key: str):  # a key the saved config lacks (an older version) had its default
        return _get(saved, key) if _has(saved, key) else _get(defaults, key)

    changed = [f"{k} ({_get(saved, k)!r} -> {_get(new, k)!r})" for k in FIXED_ON_RESUME if was(k) != _get(new, k)]
    if changed:
        raise ConfigError(f"--resume: the checkpoint was trained with other values of {', '.join(changed)}; "
                          "start a new run to change them")
    workers = was("train.num_workers")
    if run_dir is not None and workers != cfg.train.num_workers:
        from longalign_rl.training.checkpoint import on_disk, saved_workers

        newest = on_disk(run_dir)[:1]
        t = cfg.train
        if newest and t.zero_stage > 0 and saved_workers(newest[0]) is None:
            # a checkpoint from before the whole optimiser state was saved beside DeepSpeed's
            # partitions, which DeepSpeed refuses to load into another count
            raise ConfigError(f"train.num_workers: checkpoint {newest[0].name} holds its optimiser state only as "
                              f"{workers} ZeRO partitions, which cannot be loaded into {t.num_workers} "
                              f"workers; resume with train.num_workers={workers} (train.batch_size and "
                              "train.grad_accum may change, keeping the global batch: docs/scaling.md)")
        if newest and t.zero_stage == 0 and t.precision != "fp32":
            # DeepSpeed's 16-bit optimiser partitions its fp32 state its own way; no whole copy is saved
            raise ConfigError(f"train.num_workers: a ZeRO stage 0 {t.precision} run resumes on its own worker "
                              f"count only; resume with train.num_workers={workers} (docs/scaling.md)")
    if run_dir is not None:
        from longalign_rl.training.checkpoint import on_disk, step_of

        done = max((step_of(p) or 0 for p in on_disk(run_dir)), default=0)
        if cfg.train.steps <= done:
            raise ConfigError(f"train.steps: the run is at step {done} already (its newest checkpoint); a resume "
                              f"with train.steps={cfg.train.steps} has nothing to do: raise it above {done}")


def _has(data: dict, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    return isinstance(data, dict) and last in data


def config_changes(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two resolved configs."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not key.endswith("kwargs"):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def keep_original_config(run_dir: Path, cfg: Config) -> list[str]:
    """Before a resume with other values rewrites config.yaml, the config the run started
    with is kept as config.original.yaml (once: later resumes keep the first). Returns the
    changes."""
    saved = yaml.safe_load((run_dir / CONFIG).read_text())
    changes = config_changes(saved, to_dict(cfg))
    original = run_dir / "config.original.yaml"
    if changes and not original.exists():
        write_atomic(original, (run_dir / CONFIG).read_text())
    return changes


def remove_unregistered_checkpoints(run_dir: Path) -> None:
    """Checkpoint folders a killed run began but Ray Train never registered are deleted (only
    when Ray's record of the registered ones exists, so nothing is guessed)."""
    import shutil

    from longalign_rl.training.checkpoint import RAY_SNAPSHOT, registered

    if not (run_dir / RAY_SNAPSHOT).is_file():
        return
    kept = {p.name for p in registered(run_dir)}
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and folder.name not in kept:
            log.warning("removing %s: a checkpoint that was never completed", folder.name)
            shutil.rmtree(folder)


def check_output_dir(run_dir: Path) -> None:
    """The run directory's parent can be created and written (the run directory itself is
    made only once every check has passed)."""
    target = run_dir if run_dir.is_dir() else run_dir.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write_probe"):
            pass
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write runs to {target}: {e.strerror or e}") from None


def clear_failed_start(run_dir: Path, created: bool) -> None:
    """What a new run wrote before it failed to start (its lock file stays until released)."""
    import shutil

    for child in run_dir.iterdir():
        if child.name == RunLock.FILE:
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)  # the lock's descriptor stays valid until released
