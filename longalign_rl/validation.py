"""Validation (`run.validation`, `run.validation_size`, `run.validation_seed`,
`run.eval_every`): the same prompts from the same noise at step 0, every eval_every steps
and at the end, so a user sees what the training changed and nothing else. Pure: no ray.

What a run writes (rank 0):

    validation/prompts.txt            index, seed and prompt of every validation sample
    validation/step_000024/003.png    each image as sampled
    validation/step_000024.png        the grid: each prompt's image at step 0 beside its
                                      image at step 24, labelled with both scores
    validation.jsonl                  one record per validation: {"step", "prompts" (how
                                      many), "means": {key: mean}, "values": {key: [one
                                      value per prompt]}}

The scores are the reward's total ("reward") and parts, and every metric hook's values.
`compare` sets the last validation against the first, prompt by prompt (the same prompt
and noise on both sides, so the pairing removes most of the spread): the summary's
validation rows (summary.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_rl.hooks import run_metric_hooks
from longalign_rl.outputs import read_jsonl, save_images, write_prompt_list
from longalign_rl.prompts import load_prompts
from longalign_rl.scoring import Statistics, score
from longalign_rl.types import RewardOutput
from longalign_rl.uncertainty import mean_and_error

FILE = "validation.jsonl"
FOLDER = "validation"
CELL = 128  # pixels per image side in the grid (small images are enlarged, large ones reduced to 2 * CELL)


@dataclass(frozen=True)
class ValidationSet:
    prompts: list[str]
    seeds: list[int]


def validation_set(cfg) -> ValidationSet | None:
    """The run's validation prompts and their seeds; None when run.validation_size is 0.
    A bad source is a PromptFileError naming run.validation (or prompts.source)."""
    r = cfg.run
    if r.validation_size == 0:
        return None
    key, source = ("run.validation", r.validation) if r.validation else ("prompts.source", cfg.prompts.source)
    prompts = load_prompts(source, key=key)[: r.validation_size]
    return ValidationSet(prompts, [r.validation_seed + i for i in range(len(prompts))])


def due(cfg, step: int) -> bool:
    """Whether the run validates after `step` optimiser steps (0: before the first)."""
    return cfg.run.validation_size > 0 and (step == 0 or step % cfg.run.eval_every == 0 or step == cfg.train.steps)


def reward_values(out: RewardOutput) -> dict[str, torch.Tensor]:
    """A reward's output as validation values: "reward" (the total) and its named parts."""
    values = {"reward": out.total.detach().float().cpu()}
    values.update({k: v.detach().float().cpu() for k, v in out.components.items()})
    return values


def score_images(reward, hooks, images: torch.Tensor, prompts: list[str],
                 scored: RewardOutput | None = None, statistics: Statistics | None = None,
                 judges=None, every_prompt: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The values a validation (or `longalign_rl.evaluate`) records for one batch: the
    reward's total and parts (`reward` may be None; `scored`: its output computed elsewhere,
    by the reward actors), every metric hook's, and the judges' (guard.Judges, run.judge),
    [B] each. `statistics`: the reward's batch statistics of every prompt scored
    (`batch_statistics(reward, all prompts)`, once for the whole set), and `every_prompt`
    those prompts, for the judges: a value does not depend on the batch size it was scored at."""
    if scored is None and reward is not None:
        with torch.no_grad():  # a reward is a pure function: rank 0 may call it alone (scoring.py)
            scored, _ = score(reward, images, prompts, statistics)
    values = reward_values(scored) if scored is not None else {}
    values.update(run_metric_hooks(hooks, images, prompts, reserved=values))
    if judges is not None:
        values.update(judges.values(images, prompts, every_prompt))
    return values


def extend(values: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
    """Append one batch's values [b] to the values so far, key by key."""
    for k, v in batch.items():
        values[k] = torch.cat([values[k], v]) if k in values else v


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def save(run_dir: str | Path, step: int, images: torch.Tensor, vset: ValidationSet,
         values: dict[str, torch.Tensor]) -> dict:
    """Write one validation (images [B, 3, H, W] in [0, 1], values {key: Tensor[B]}) and its
    grid beside step 0's; returns its record (also appended to validation.jsonl)."""
    run_dir = Path(run_dir)
    save_images(images, run_dir / FOLDER / f"step_{step:06d}")
    listing = run_dir / FOLDER / "prompts.txt"
    if not listing.is_file():
        write_prompt_list(listing, vset.prompts, vset.seeds)
    record = {"step": step, "prompts": len(vset.prompts),
              "means": {k: _mean(v.tolist()) for k, v in values.items()},
              "values": {k: [float(x) for x in v.tolist()] for k, v in values.items()}}
    truncate_after(run_dir, step - 1)  # a step validated again (a resumed run) replaces its record
    # The grid before the record: the driver's console takes a record as the sign that the
    # validation's files are complete (and hands the grid to the trackers).
    save_grid(run_dir, step, [*read(run_dir), record])
    with (run_dir / FILE).open("a") as f:
        f.write(json.dumps(record, allow_nan=True) + "\n")
    return record


def read(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / FILE)


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Keep the records of validations at or before `step` (a resume redoes the later ones)."""
    path = Path(run_dir) / FILE
    if path.is_file():
        kept = [r for r in read(run_dir) if r["step"] <= step]
        path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))


def label_key(record: dict) -> str | None:
    """The value a grid labels its images with: the reward, else the first metric."""
    keys = list(record["values"])
    return "reward" if "reward" in keys else (keys[0] if keys else None)


def save_grid(run_dir: str | Path, step: int, records: list[dict]) -> Path:
    """validation/step_<step>.png: for every prompt its image at the first validation and at
    `step` side by side, labelled with the index and both scores (from `records`). Written
    to a temporary name and renamed, so a reader never sees half a file."""
    from PIL import Image, ImageDraw, ImageFont

    run_dir = Path(run_dir)
    records = {r["step"]: r for r in records}
    first = min(records)
    steps = [first] if step == first else [first, step]
    paths = sorted((run_dir / FOLDER / f"step_{step:06d}").glob("*.png"))
    n = len(paths)
    key = label_key(records[step])
    opened = [[Image.open(run_dir / FOLDER / f"step_{s:06d}" / p.name).convert("RGB") for s in steps] for p in paths]
    side = opened[0][0].width
    cell = CELL if side < CELL else min(side, 2 * CELL)
    label_h = 16
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pair_w = cell * len(steps) + 4
    grid = Image.new("RGB", (cols * pair_w, rows * (cell + label_h) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    heading = f"step {steps[0]} | step {steps[-1]}" if len(steps) > 1 else f"step {step}"
    draw.text((2, 2), heading + (f"   ({key})" if key else ""), fill="black", font=font)
    for i, pair in enumerate(opened):
        r, c = divmod(i, cols)
        x, y = c * pair_w, label_h + r * (cell + label_h)
        for j, image in enumerate(pair):
            grid.paste(image.resize((cell, cell), Image.NEAREST if side < cell else Image.BICUBIC), (x + j * cell, y))
        if key:
            scores = [records[s]["values"][key][i] for s in steps if key in records[s]["values"]]
            text = f"{i}: " + " -> ".join(f"{v:.3f}" for v in scores)
        else:
            text = f"{i}"
        draw.text((x + 2, y + cell + 2), text, fill="black", font=font)
    out = run_dir / FOLDER / f"step_{step:06d}.png"
    partial = out.with_name(f".{out.name}.partial")
    grid.save(partial, format="PNG")
    partial.replace(out)
    return out


def compare(records: list[dict]) -> dict | None:
    """The last validation against the first, prompt by prompt, for every key both have:
    the means, the mean change and two standard errors of the paired changes."""
    if len(records) < 2:
        return None
    first, last = records[0], records[-1]
    rows = []
    for key, after in last["values"].items():
        before = first["values"].get(key)
        if before is None or len(before) != len(after):
            continue
        pairs = np.array([(a, b) for a, b in zip(before, after) if math.isfinite(a) and math.isfinite(b)], dtype=float)
        if len(pairs) == 0:
            continue
        change, spread = mean_and_error(pairs[:, 1] - pairs[:, 0])
        rows.append({"key": key, "first": float(pairs[:, 0].mean()), "last": float(pairs[:, 1].mean()),
                     "change": change, "uncertainty": spread})
    return {"first_step": first["step"], "last_step": last["step"], "prompts": last["prompts"], "rows": rows}
