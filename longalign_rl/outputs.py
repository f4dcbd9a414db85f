"""What a run writes besides checkpoints: the run directory's names in one place (every
module, ShapesWorld and the tests read them from here), metrics.jsonl, image grids with
their prompts, and stopped.json when the run was stopped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


# ---------------------------------------------------------------- the run directory
# runs/<name>/ holds, besides checkpoint_<step>/ (training/checkpoint.py), validation.jsonl
# (validation.FILE), summary.json (summary.FILE) and warnings.log (console.WARNINGS_LOG):
CONFIG = "config.yaml"      # the resolved config the run trains with (rewritten by a resume)
METRICS = "metrics.jsonl"   # one JSON record per step, cut back to the checkpoint on resume
LORA = "lora"               # the exported LoRA for diffusers (pipe.load_lora_weights)
UNET = "unet"               # the exported UNet, when lora.enabled is false
MODEL = "model"             # stage 1: the LoRA merged into a complete diffusers folder


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's metrics.jsonl records (a last line cut short left out; see read_jsonl)."""
    return read_jsonl(Path(run_dir) / METRICS)


# Written into the run directory when the non-finite guard stops a run (training/worker.py):
# {"step", "cause", "last_checkpoint", "message"}; the driver prints it and exits 1.
STOPPED = "stopped.json"
# Created by the driver on SIGINT/SIGTERM: the workers finish the step, checkpoint and stop.
STOP_REQUEST = "stop_requested"


def write_atomic(path: str | Path, text: str) -> None:
    """`path` holds `text` whole or keeps what it held: written beside it, then renamed (a
    full disk or a kill mid-write never leaves an empty or cut config.yaml)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file the run appends to (metrics.jsonl, validation.jsonl).
    A last line cut short (the run was killed, or its disk filled, while writing it) is left
    out with a warning; a damaged line before it is a ValueError naming the file and line."""
    import logging

    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as e:
            if number == len(lines):
                logging.getLogger(__name__).warning("%s: its last line (%d) is cut short and is left out (%s)",
                                                    path, number, e)
                break
            raise ValueError(f"{path}: line {number} is not a JSON record ({e}); repair or remove that line") from None
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON object per step to run_dir/metrics.jsonl (flushed every line)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def save_images(images: torch.Tensor, folder: str | Path) -> None:
    """Each image as folder/000.png, 001.png ..."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(to_uint8(images)):
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def write_prompt_list(path: str | Path, prompts: list[str], seeds: list[int]) -> None:
    """One line per sample: index, seed and prompt, tab-separated (validation, generate, evaluate)."""
    Path(path).write_text("".join(f"{i:03d}\tseed {s}\t{p}\n" for i, (p, s) in enumerate(zip(prompts, seeds))))


def save_image_grid(images: torch.Tensor, prompts: list[str], path: str | Path) -> Path:
    """images [B,3,H,W] in [0,1] -> one PNG grid, and the prompts in a .txt beside it."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    b, _, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    pixels = to_uint8(images)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = pixels[i]
    path.with_suffix(".txt").write_text("".join(f"{i}: {p}\n" for i, p in enumerate(prompts)))
    partial = path.with_name(f".{path.name}.partial")  # the driver follows images/: never a half-written grid
    Image.fromarray(grid).save(partial, format="PNG")
    partial.replace(path)
    return path
