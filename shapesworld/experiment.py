"""The ShapesWorld encoding experiment: what do truncation, segment encoding and stage 1
do to each sentence of a long caption, where the truth is known?

    python -m shapesworld.experiment                        # about 1 minute on 2 CPU cores
    python -m shapesworld.experiment --quick --out /tmp/x   # seconds (tests)

For each seed it measures the exact checker's accuracy per cell-sentence position (colour
and shape) and the background (an attribute no reward scores), on held-out captions:
- the shipped base, prompts encoded the plain 77-token way (truncated) and by segments;
- the shipped stage-1 model (the base fine-tuned on segment-encoded captions), both ways.
It writes report.md (a table, mean +- std over seeds), results.json, a plot and image
grids to --out.

Stage 2 is measured through the product itself, by `python -m shapesworld.sweep` (every
run there is `python -m longalign_rl.train`). Pure torch: no ray, no deepspeed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from shapesworld.evaluate import draw_captions, evaluate
from shapesworld.world import WorldConfig
from longalign_rl.outputs import save_image_grid

WORLD = WorldConfig()


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    base: str = "shapesworld"
    stage1: str = "shapesworld-stage1"
    num_steps: int = 10  # DDIM steps
    guidance_scale: float = 5.0
    eval_n: int = 128  # held-out captions per evaluation
    workers: int = 2  # processes, one torch thread each

    @classmethod
    def quick(cls) -> "Settings":
        return cls(seeds=(0, 1), eval_n=4, workers=1)


@dataclass
class Job:
    seed: int
    model: str
    encoding: str
    result: dict = field(default_factory=dict)


# ------------------------------------------------------------------------- jobs


def _eval_prompts(s: Settings, seed: int) -> list[str]:
    return draw_captions(WORLD, s.eval_n, seed=10_000 + seed)  # no training pool uses these seeds


def run_eval(job: Job, s: Settings, out: Path) -> dict:
    from longalign_rl.models import load_components

    prompts = _eval_prompts(s, job.seed)
    images, result = evaluate(load_components(job.model), job.encoding, prompts, seed=job.seed, cfg=WORLD,
                              num_steps=s.num_steps, guidance_scale=s.guidance_scale)
    if job.seed == s.seeds[0]:
        save_image_grid(images[:16], prompts[:16], out / "grids" / f"{job.model}_{job.encoding}.png")
    return result


def _run(args: tuple[Job, Settings, str]) -> Job:
    job, s, out = args
    torch.set_num_threads(1)
    start = time.perf_counter()
    job.result = run_eval(job, s, Path(out))
    job.result["seconds"] = round(time.perf_counter() - start, 1)
    return job


def jobs(s: Settings) -> list[Job]:
    out = []
    for seed in s.seeds:
        out += [Job(seed, model, encoding) for model in (s.base, s.stage1) for encoding in ("truncated", "segment")]
    return out


# ------------------------------------------------------------------------- report


def conditions(done: list[Job], s: Settings) -> dict[str, list[dict]]:
    """Condition name -> one ground-truth summary per seed."""
    table: dict[str, list[dict]] = {}
    for model, name in ((s.base, "base"), (s.stage1, "stage 1")):
        for encoding in ("truncated", "segment"):
            table[f"{name}, {encoding}"] = [j.result for j in done if j.model == model and j.encoding == encoding]
    return table


def _ms(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


def write_report(done: list[Job], s: Settings, out: Path, seconds: float, command: str) -> str:
    table = conditions(done, s)
    n_cells = WORLD.grid**2
    lines = [
        "# ShapesWorld experiment",
        "",
        f"Command: `{command}`  ",
        f"Wall clock: {seconds / 60:.1f} min ({s.workers} processes, one torch thread each). "
        f"Seeds: {', '.join(map(str, s.seeds))}; {s.eval_n} held-out captions per evaluation and seed; "
        f"DDIM {s.num_steps} steps, guidance {s.guidance_scale}.",
        "",
        "Ground truth = the exact checker (shapesworld/checker.py), per cell-sentence "
        "position (1 = top left ... 4 = bottom right). Under 77-token truncation the colours and "
        "shapes of cells 3 and 4 are cut off. Background = fraction of the pixels between cells that "
        "read as black (no reward scores it). Mean ± std over seeds.",
        "",
        "| condition | " + " | ".join(f"colour {i}" for i in range(1, n_cells + 1)) + " | "
        + " | ".join(f"shape {i}" for i in range(1, n_cells + 1)) + " | background |",
        "|---" * (2 * n_cells + 2) + "|",
    ]
    for name, rows in table.items():
        colour = [_ms([r["colour"][i] for r in rows]) for i in range(n_cells)]
        shape = [_ms([r["shape"][i] for r in rows]) for i in range(n_cells)]
        lines.append(f"| {name} | " + " | ".join(colour + shape) + f" | {_ms([r['background'] for r in rows])} |")
    lines += ["", "Plot: `accuracy_by_position.png`; image grids (seed "
              f"{s.seeds[0]}, first 16 held-out captions) in `grids/`.", ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def plot(done: list[Job], s: Settings, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = conditions(done, s)
    n_cells = WORLD.grid**2
    fig, axes = plt.subplots(1, 2, figsize=(14, 4), sharey=True)
    width = 0.8 / len(table)
    for a, attribute in zip(axes, ("colour", "shape")):
        for j, (name, rows) in enumerate(table.items()):
            values = np.array([r[attribute] for r in rows])
            a.bar(np.arange(n_cells) + j * width, values.mean(0), width, yerr=values.std(0), label=name)
        a.set_xticks(np.arange(n_cells) + 0.4 - width / 2, [f"cell {i + 1}" for i in range(n_cells)])
        a.set_title(f"{attribute} accuracy by sentence position")
        a.axhline(1 / (len(WORLD.colours) if attribute == "colour" else len(WORLD.shapes)), color="grey", ls=":")
    axes[0].set_ylabel("exact checker accuracy")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_position.png", dpi=100)
    plt.close(fig)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/shapesworld", help="folder for report.md, results.json, plots, grids")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4 captions, 1 process: seconds (tests)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--workers", type=int, help="processes (default 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite report.md and the plots from --out/results.json without running anything")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["settings"].items()})
        done = [Job(**j) for j in saved["jobs"]]
        plot(done, s, Path(args.out))
        print(write_report(done, s, Path(args.out), saved["seconds"], saved.get("command", "")))
        return 0
    s = Settings.quick() if args.quick else Settings()
    s = replace(s, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in
                      (("seeds", args.seeds), ("workers", args.workers))
                      if v is not None})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    todo = [(job, s, str(out)) for job in jobs(s)]
    if s.workers > 1:
        with multiprocessing.get_context("spawn").Pool(s.workers) as pool:
            done = []
            for job in pool.imap_unordered(_run, todo):
                done.append(job)
                print(f"[{time.perf_counter() - start:6.0f} s] {job.model} {job.encoding} seed={job.seed}: "
                      f"{job.result}"[:300], flush=True)
    else:
        done = [_run(t) for t in todo]
    seconds = time.perf_counter() - start
    done.sort(key=lambda j: (j.model, j.encoding, j.seed))
    command = " ".join(["python -m shapesworld.experiment", *(sys.argv[1:] if argv is None else argv)])
    (out / "results.json").write_text(json.dumps({"settings": asdict(s), "seconds": seconds, "command": command,
                                                  "jobs": [asdict(j) for j in done]}, indent=1))
    plot(done, s, out)
    print(write_report(done, s, out, seconds, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
