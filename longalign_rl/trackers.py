"""Experiment trackers (`run.report_to`): TensorBoard (the default, offline files in
run_dir/tensorboard), Weights & Biases and MLflow.

The driver logs to them, from what the run writes: the resolved config at the start, every
record of metrics.jsonl as scalars and every image grid under images/ as it appears
(console.Progress follows both). So only one process talks to a tracker, the one the user
started, with the user's credentials and network; the workers never import a tracker.

    tensorboard   tensorboard --logdir runs/                       (torch.utils.tensorboard)
    wandb         WANDB_PROJECT (default longalign-rl), WANDB_MODE=offline for no network;
                  a resumed run continues the same W&B run (its id is kept in wandb_run_id)
    mlflow        MLFLOW_TRACKING_URI (default: run_dir/mlruns, MLflow's local file store),
                  MLFLOW_EXPERIMENT_NAME (default longalign-rl)

Plain Python: no ray, no deepspeed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
from pathlib import Path
from typing import Protocol

import yaml

# the pip package of each tracker (run.report_to's names are config.REPORT_TO)
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


class Tracker(Protocol):
    def config(self, config: dict) -> None: ...
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, step: int, tag: str, path: Path) -> None: ...
    def close(self) -> None: ...


def missing_packages(report_to: tuple[str, ...]) -> list[str]:
    """'run.report_to' messages for trackers whose package is not installed (checked on the
    driver before anything starts)."""
    return [f"run.report_to: {name} is not installed (pip install {INSTALL[name]})"
            for name in report_to if importlib.util.find_spec(name) is None]


def numbers(record: dict) -> dict[str, float]:
    """The record's finite numbers, but the step itself."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v and not k.endswith(("kwargs", "runtime_env")):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


class TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def config(self, config: dict) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # markdown code block

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, step: int, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path):
        import wandb

        self.wandb = wandb
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "longalign-rl"), name=Path(run_dir).name,
                              id=run_id, resume="allow", dir=str(run_dir))
        id_file.write_text(run_id + "\n")

    def config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # local files, no server: MLflow's file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # (MLflow 3 asks to opt in to it)
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "longalign-rl"))
        id_file = Path(run_dir) / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else Path(run_dir).name)
        id_file.write_text(self.run.info.run_id + "\n")

    def config(self, config: dict) -> None:
        params = _flat(config)
        existing = self.mlflow.get_run(self.run.info.run_id).data.params
        # MLflow refuses to change a logged parameter: a resume logs only the new ones
        self.mlflow.log_params({k: v for k, v in params.items() if k not in existing})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def image(self, step: int, tag: str, path: Path) -> None:
        self.mlflow.log_artifact(str(path), artifact_path=tag)

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(report_to: tuple[str, ...], run_dir: Path, config: dict) -> list[Tracker]:
    """The trackers of run.report_to, opened and given the run's config."""
    make = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    trackers: list[Tracker] = []
    for name in report_to:
        try:
            tracker = make[name](run_dir)
            tracker.config(config)
        except Exception as e:  # W&B without an API key, an MLflow server that is down ...
            for opened in trackers:
                with contextlib.suppress(Exception):
                    opened.close()
            raise TrackerError(f"run.report_to: {name} could not start: {type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]}{START_HINTS.get(name, '')}") from None
        trackers.append(tracker)
    return trackers


class TrackerError(RuntimeError):
    """A tracker of run.report_to that cannot start (the driver exits 2 and keeps nothing)."""


START_HINTS = {
    "wandb": " (W&B needs an API key: run `wandb login` or set WANDB_API_KEY; or set WANDB_MODE=offline to keep "
             "its logs in the run directory's wandb/ for `wandb sync` later)",
    "mlflow": " (is MLFLOW_TRACKING_URI's server up? without it MLflow writes to the run directory's mlruns/)",
}
