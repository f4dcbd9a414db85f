"""The text-irrelevant-weight sweep of issue 9, run through the product: every stage-2 run is
`python -m longalign_rl.train` (sampler actors, DeepSpeed workers, the config, metrics and
checkpoints a user gets), and every checkpoint is evaluated on held-out captions by the
exact checker.

    python -m shapesworld.sweep --out /tmp/sweep               # 4 conditions x 3 seeds, ~36 min on 2 idle cores
    python -m shapesworld.sweep --out /tmp/sweep --quick       # 2 runs of 2 steps (tests)

Conditions: `shapes_pref` at w = 1.0, 0.3, 0.0 and `shapes_clip` at w = 0.3 (the control:
a reward without a text-irrelevant taste), each from `shapesworld-partial` (late shapes
with headroom). For each run, its checkpoints and the starting model are evaluated on the
same held-out captions: colour and shape per cell, the background, and ink (the raters'
prompt-independent taste, shapesworld/pref_train.py). Writes `results.json` (everything)
`report.md` (means ± std over seeds at each checkpoint), `curves.png` and `grids/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_rl.outputs import CONFIG, read_metrics
from shapesworld.plugin import HELDOUT_SEED as EVAL_SEED  # held-out captions: no training or rater pool draws from it

START = "shapesworld-partial"


@dataclass(frozen=True)
class Sweep:
    conditions: tuple[tuple[str, float], ...] = (("shapes_pref", 1.0), ("shapes_pref", 0.3), ("shapes_pref", 0.0),
                                                 ("shapes_clip", 0.3))
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 48
    checkpoint_every: int = 12
    lr: float = 3e-3
    eval_captions: int = 128
    eval_steps: int = 10  # DDIM steps of the evaluation (the runs sample with the same 10)
    guidance: float = 5.0

    @classmethod
    def quick(cls) -> "Sweep":
        return cls(conditions=(("shapes_pref", 1.0), ("shapes_clip", 0.3)), seeds=(0,), steps=2, checkpoint_every=1,
                   eval_captions=4, eval_steps=3)


def run_name(reward: str, w: float, seed: int) -> str:
    return f"{reward}_w{w:g}_s{seed}"


def train_run(s: Sweep, reward: str, w: float, seed: int, runs: Path) -> Path:
    """One stage-2 run of the product, in its own process, as a user starts it."""
    return launch([f"model.pretrained={START}", f"reward.name={reward}", f"reward.kwargs.text_irrelevant_weight={w}",
                   f"train.seed={seed}", f"train.lr={s.lr}", f"train.steps={s.steps}",
                   f"run.checkpoint_every={s.checkpoint_every}", "run.keep_checkpoints=0",
                   f"run.image_every={s.steps}",
                   "run.validation_size=0"],  # every checkpoint is evaluated on held-out captions here
                  run_name(reward, w, seed), runs)


def launch(overrides: list[str], name: str, runs: Path) -> Path:
    """`python -m longalign_rl.train overrides` as run `runs/name`, its output in `runs/name.log`."""
    args = [sys.executable, "-m", "longalign_rl.train", *overrides, f"run.output_dir={runs}", f"run.name={name}"]
    log = runs / f"{name}.log"
    with log.open("w") as f:
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {done.returncode}); see {log}")
    return runs / name


def checkpoints(run_dir: Path) -> dict[int, Path]:
    """step -> checkpoint folder (from each checkpoint's state.json)."""
    out = {}
    for folder in run_dir.glob("checkpoint_*"):
        state = folder / "state.json"
        if state.is_file():
            out[json.loads(state.read_text())["step"]] = folder
    return dict(sorted(out.items()))


@torch.no_grad()
def evaluate_weights(weights: Path | None, lora: dict, s: Sweep, prompts: list[str], grid: Path | None = None,
                     eta: float = 0.0, start: str = START) -> dict:
    """Held-out ground truth of the `start` model with `weights` (a checkpoint's trainable
    weights; None = the start model itself); `grid`: also save the images there; `eta` > 0:
    sampled by the stochastic sampler policy-gradient runs train (DDIM's eta, a flow
    model's SDE)."""
    from safetensors.torch import load_file

    from longalign_rl.config import LoRAConfig
    from longalign_rl.lora import load_trainable_state_dict, make_trainable
    from longalign_rl.models import load_components
    from shapesworld.evaluate import evaluate
    from longalign_rl.outputs import save_image_grid
    from shapesworld.pref_train import ink

    parts = load_components(start)
    if weights is not None:
        cfg = LoRAConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()})
        make_trainable(parts.unet, cfg, family=parts.family)
        load_trainable_state_dict(parts.unet, load_file(weights), cfg)
    images, summary = evaluate(parts, "segment", prompts, seed=EVAL_SEED, num_steps=s.eval_steps,
                               guidance_scale=s.guidance, eta=eta)
    if grid is not None:
        save_image_grid(images, prompts, grid)
    return {**summary, "ink": float(ink(images).mean())}


def run_sweep(s: Sweep, out: Path, log=print) -> dict:
    import yaml

    from shapesworld.evaluate import draw_captions
    from shapesworld.world import WorldConfig

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    prompts = draw_captions(WorldConfig(), s.eval_captions, seed=EVAL_SEED)
    start = time.perf_counter()
    results = {"settings": asdict(s), "start": evaluate_weights(None, {}, s, prompts), "runs": []}
    for reward, w in s.conditions:
        for seed in s.seeds:
            t = time.perf_counter()
            run_dir = runs / run_name(reward, w, seed)
            if max(checkpoints(run_dir), default=0) != s.steps:  # finished runs are kept: a rerun resumes the sweep
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir = train_run(s, reward, w, seed, runs)
            lora = yaml.safe_load((run_dir / CONFIG).read_text())["lora"]
            metrics = read_metrics(run_dir)
            held_out = {step: evaluate_weights(folder / "weights.safetensors", lora, s, prompts)
                        for step, folder in checkpoints(run_dir).items()}
            results["runs"].append({"reward": reward, "w": w, "seed": seed, "metrics": metrics,
                                    "held_out": {str(k): v for k, v in held_out.items()},
                                    "seconds": round(time.perf_counter() - t, 1)})
            log(f"{run_name(reward, w, seed)}: {time.perf_counter() - t:.0f} s; held-out shapes at the last checkpoint "
                f"{[round(x, 2) for x in held_out[max(held_out)]['shape']]}")
            (out / "results.partial.json").write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(report(results))
    figures(results, out)
    return results


def _ms(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


def report(results: dict) -> str:
    s = results["settings"]
    start = results["start"]
    lines = ["# The text-irrelevant-weight sweep, through the product", "",
             f"{len(s['seeds'])} seed(s) x {len(s['conditions'])} conditions from `{START}`; lr {s['lr']}, "
             f"{s['steps']} steps; held-out ground truth on {s['eval_captions']} captions (seed {EVAL_SEED}), "
             f"mean ± std over seeds. Wall clock {results['seconds'] / 60:.1f} min.", "",
             "| condition | step | " + " | ".join(f"shape {i}" for i in range(1, 5)) + " | colour 3 | colour 4 | "
             "background | ink | reward (train window) | text-irrelevant (train window) |",
             "|---" * 12 + "|",
             "| start | 0 | " + " | ".join(f"{x:.2f}" for x in start["shape"]) +
             f" | {start['colour'][2]:.2f} | {start['colour'][3]:.2f} | {start['background']:.3f} | {start['ink']:.3f} | | |"]
    for reward, w in s["conditions"]:
        runs = [r for r in results["runs"] if r["reward"] == reward and r["w"] == w]
        for step in runs[0]["held_out"]:
            h = [r["held_out"][step] for r in runs]
            window = [[m for m in r["metrics"] if int(step) - s["checkpoint_every"] < m["step"] <= int(step)] for r in runs]
            reward_w = [np.mean([m["reward"] for m in ms]) for ms in window]
            irr = [np.mean([m["text_irrelevant"] for m in ms]) for ms in window]
            lines.append(f"| {reward}, w = {w:g} | {step} | " + " | ".join(_ms([x["shape"][i] for x in h]) for i in range(4))
                         + f" | {_ms([x['colour'][2] for x in h])} | {_ms([x['colour'][3] for x in h])} | "
                         f"{_ms([x['background'] for x in h])} | {_ms([x['ink'] for x in h])} | {_ms(reward_w)} | "
                         f"{_ms(irr)} |")
    return "\n".join(lines) + "\n"


CURVES = (("text_relevant", "text-relevant part (training batches)"),
          ("text_irrelevant", "text-irrelevant part (training batches)"),
          ("ink", "ink (held-out)"), ("background", "background (held-out)"),
          ("shape 1-2", "shape, cells 1-2 (held-out)"), ("shape 3", "shape, cell 3 (held-out)"),
          ("shape 4", "shape, cell 4 (held-out)"), ("colour 3-4", "colour, cells 3-4 (held-out)"))


def curve(results: dict, run: dict, key: str) -> tuple[list[int], list[float]]:
    """One run's curve of `key` at step 0 (the start) and at each checkpoint: held-out
    values, or the reward parts as means over the training steps since the last checkpoint."""
    every = results["settings"]["checkpoint_every"]
    held = {0: results["start"], **{int(k): v for k, v in run["held_out"].items()}}
    steps = sorted(held)
    if key in ("text_relevant", "text_irrelevant"):
        steps = steps[1:]
        return steps, [float(np.mean([m[key] for m in run["metrics"] if t - every < m["step"] <= t])) for t in steps]
    pick = {"ink": lambda h: h["ink"], "background": lambda h: h["background"],
            "shape 1-2": lambda h: np.mean(h["shape"][:2]), "shape 3": lambda h: h["shape"][2],
            "shape 4": lambda h: h["shape"][3], "colour 3-4": lambda h: np.mean(h["colour"][2:4])}[key]
    return steps, [float(pick(held[t])) for t in steps]


def figures(results: dict, out: Path) -> None:
    """curves.png: each curve of CURVES, mean ± std over seeds per condition; grids/ and
    grids.png: the held-out images of the start and of each condition's last checkpoint
    (first seed, first 16 captions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    from shapesworld.evaluate import draw_captions
    from shapesworld.world import WorldConfig

    s = Sweep(**{k: tuple(tuple(c) for c in v) if k == "conditions" else tuple(v) if isinstance(v, list) else v
                 for k, v in results["settings"].items()})
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for a, (key, title) in zip(axes.flat, CURVES):
        for reward, w in s.conditions:
            runs = [r for r in results["runs"] if r["reward"] == reward and r["w"] == w]
            steps = curve(results, runs[0], key)[0]
            values = np.array([curve(results, r, key)[1] for r in runs])
            mean, std = values.mean(0), values.std(0)
            a.plot(steps, mean, marker="o", ms=3, label=f"{reward}, w = {w:g}")
            a.fill_between(steps, mean - std, mean + std, alpha=0.15)
        a.set_title(title, fontsize=10)
        a.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"stage 2 from {START}: mean ± std over {len(s.seeds)} seed(s)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=90)
    plt.close(fig)

    prompts = draw_captions(WorldConfig(), s.eval_captions, seed=EVAL_SEED)[:16]
    grids = [out / "grids" / "start.png"]
    evaluate_weights(None, {}, s, prompts, grid=grids[0])
    for reward, w in s.conditions:
        run_dir = out / "runs" / run_name(reward, w, s.seeds[0])
        lora = yaml.safe_load((run_dir / CONFIG).read_text())["lora"]
        step, folder = max(checkpoints(run_dir).items())
        grids.append(out / "grids" / f"{reward}_w{w:g}_step{step}.png")
        evaluate_weights(folder / "weights.safetensors", lora, s, prompts, grid=grids[-1])
    side_by_side(grids, out / "grids.png")


def side_by_side(paths: list[Path], target: Path, gap: int = 8, zoom: int = 3) -> None:
    """The grids in one row (same captions and noise), enlarged: start, then each condition."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    row = Image.new("RGB", (len(images) * (w + gap) - gap, h), (128, 128, 128))
    for i, image in enumerate(images):
        row.paste(image, (i * (w + gap), 0))
    row.resize((row.width * zoom, row.height * zoom), Image.NEAREST).save(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="2 runs of 2 steps, for tests")
    parser.add_argument("--figures", action="store_true", help="only redraw curves.png and grids/ from OUT")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.figures:
        figures(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    results = run_sweep(Sweep.quick() if args.quick else Sweep(), args.out)
    print((args.out / "report.md").read_text())
    print(f"done in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
