"""Policy gradients against reward backpropagation in ShapesWorld (issue 11), through the
product: every run is `python -m longalign_rl.train` from `shapesworld-partial` (late shapes
only partly right), and every checkpoint is evaluated on the sweep's held-out captions by
the exact checker (shapesworld/sweep.py).

    python -m shapesworld.pg_compare --out /tmp/pg             # 2 methods x 3 seeds, ~75 min on 2 idle cores
    python -m shapesworld.pg_compare --out /tmp/pg --quick     # 2 runs of 2 steps (tests)

Methods:
    reward_backprop   the default run: shapes_clip (a differentiable CLIP-type reward), w = 0.3
    grpo              the exact checker itself as the reward (shapes_exact restricted to
                      sentence positions 3 and 4, the cells the question is about, as a GenEval
                      task checks its subject; not differentiable), 8 samples per prompt, 256
                      samples per update, stochastic (eta 1) only in the first half of the
                      chain where shapes are decided and deterministic DDIM after it
                      (algorithm.sde_window), on-policy

Reward backpropagation sees 16 samples per step, GRPO 256. Writes results.json, report.md (held-out accuracy against
samples seen; samples each method needs to reach given levels of cells 3-4) and curves.png.
Resumable: finished runs are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_rl.outputs import CONFIG, read_metrics
from shapesworld.sweep import EVAL_SEED, START, Sweep, checkpoints, evaluate_weights, launch


@dataclass(frozen=True)
class Method:
    name: str
    overrides: tuple[str, ...]
    steps: int
    checkpoint_every: int
    samples_per_step: int  # 2 workers x train.batch_size x train.grad_accum
    eta: float = 0.0  # the sampler it trains: a policy-gradient run is also evaluated with it


REWARD_BACKPROP = Method("reward_backprop", ("reward.name=shapes_clip", "reward.kwargs.text_irrelevant_weight=0.3",
                                             "train.lr=3e-3"), steps=48, checkpoint_every=12, samples_per_step=16)
GRPO = Method("grpo", ("algorithm.name=grpo", "reward.name=shapes_exact", "reward.kwargs={positions: [3, 4]}",
                       "sampler.eta=1.0", "algorithm.sde_window=[0, 0.5]", "algorithm.timestep_fraction=1.0",
                       "algorithm.group_size=8", "train.max_policy_lag=0", "train.batch_size=16", "train.grad_accum=8",
                       "train.lr=5e-4"), steps=32, checkpoint_every=8, samples_per_step=256)


@dataclass(frozen=True)
class Compare:
    methods: tuple[Method, ...] = (REWARD_BACKPROP, GRPO)
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_captions: int = 128
    eval_steps: int = 10
    guidance: float = 5.0

    @classmethod
    def quick(cls) -> "Compare":
        def small(m: Method) -> Method:  # one micro-step per worker and step
            accum = int(dict(o.split("=", 1) for o in m.overrides).get("train.grad_accum", 1))
            return Method(m.name, (*m.overrides, "train.grad_accum=1"), 2, 1, m.samples_per_step // accum, m.eta)

        return cls(methods=tuple(small(m) for m in cls.methods),
                   seeds=(0,), eval_captions=4, eval_steps=3)

    def sweep(self) -> Sweep:
        """The evaluation settings, shared with shapesworld/sweep.py."""
        return Sweep(eval_captions=self.eval_captions, eval_steps=self.eval_steps, guidance=self.guidance)


def train_run(method: Method, seed: int, runs: Path) -> Path:
    return launch([f"model.pretrained={START}", *method.overrides, f"train.seed={seed}", f"train.steps={method.steps}",
                   f"run.checkpoint_every={method.checkpoint_every}", "run.keep_checkpoints=0",
                   "run.validation_size=0",  # every checkpoint is evaluated on held-out captions here
                   f"run.image_every={method.steps}"], f"{method.name}_s{seed}", runs)


def late_cells(held: dict) -> float:
    """Held-out shape accuracy of cells 3 and 4, the ones shapesworld-partial draws partly right."""
    return float(np.mean(held["shape"][2:4]))


def samples_to_reach(points: list[tuple[int, float]], level: float) -> float | None:
    """Samples seen when a curve of (samples, value) first reaches `level`, interpolated
    linearly between evaluations; None if it never does."""
    if points and points[0][1] >= level:
        return float(points[0][0])
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 >= level:  # and v0 < level
            return s0 + (s1 - s0) * (level - v0) / (v1 - v0)
    return None


def run_compare(c: Compare, out: Path, log=print) -> dict:
    import yaml

    from shapesworld.evaluate import draw_captions
    from shapesworld.world import WorldConfig

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    prompts = draw_captions(WorldConfig(), c.eval_captions, seed=EVAL_SEED)
    start = time.perf_counter()
    results = {"settings": asdict(c), "start": evaluate_weights(None, {}, c.sweep(), prompts), "runs": [],
               "start_stochastic": {}}
    for method in c.methods:
        for seed in c.seeds:
            t = time.perf_counter()
            run_dir = runs / f"{method.name}_s{seed}"
            if max(checkpoints(run_dir), default=0) != method.steps:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir = train_run(method, seed, runs)
            lora = yaml.safe_load((run_dir / CONFIG).read_text())["lora"]
            metrics = read_metrics(run_dir)
            held_out = {step: evaluate_weights(folder / "weights.safetensors", lora, c.sweep(), prompts)
                        for step, folder in checkpoints(run_dir).items()}
            own = {}
            if method.eta > 0:  # also with the stochastic sampler it was trained on
                own = {str(step): evaluate_weights(folder / "weights.safetensors", lora, c.sweep(), prompts, eta=method.eta)
                       for step, folder in checkpoints(run_dir).items()}
                if str(method.eta) not in results["start_stochastic"]:
                    results["start_stochastic"][str(method.eta)] = evaluate_weights(None, {}, c.sweep(), prompts,
                                                                                    eta=method.eta)
            train_seconds = sum(m["time/step"] for m in metrics)
            results["runs"].append({"method": method.name, "seed": seed, "metrics": metrics,
                                    "held_out": {str(k): v for k, v in held_out.items()}, "held_out_stochastic": own,
                                    "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t, 1)})
            log(f"{method.name} seed {seed}: {time.perf_counter() - t:.0f} s; held-out shapes at the last checkpoint "
                f"{[round(x, 2) for x in held_out[max(held_out)]['shape']]}")
            (out / "results.partial.json").write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(report(results))
    figure(results, out / "curves.png")
    return results


def settings_of(results: dict, name: str) -> dict:
    return next(m for m in results["settings"]["methods"] if m["name"] == name)


def curve(results: dict, run: dict) -> list[tuple[int, float]]:
    """(samples seen, held-out shape accuracy of cells 3-4), from the start."""
    per_step = settings_of(results, run["method"])["samples_per_step"]
    held = {0: results["start"], **{int(k): v for k, v in run["held_out"].items()}}
    return [(step * per_step, late_cells(held[step])) for step in sorted(held)]


def _ms(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def report(results: dict, start_model: str = START) -> str:
    c = results["settings"]
    start = late_cells(results["start"])
    names = [m["name"] for m in c["methods"]]
    lines = ["# Policy gradients against reward backpropagation, through the product", "",
             f"{len(c['seeds'])} seed(s) per method from `{start_model}`; "
             f"held-out ground truth on {c['eval_captions']} captions (seed {EVAL_SEED}), mean ± std over seeds. "
             f"Wall clock {results['seconds'] / 60:.1f} min.", "",
             "| method | step | samples | shape 3 | shape 4 | cells 3-4 | shape 1-2 | colour 3-4 | background | "
             "reward (train window) |", "|---" * 10 + "|",
             f"| start | 0 | 0 | {results['start']['shape'][2]:.2f} | {results['start']['shape'][3]:.2f} | {start:.3f} | "
             f"{np.mean(results['start']['shape'][:2]):.2f} | {np.mean(results['start']['colour'][2:4]):.2f} | "
             f"{results['start']['background']:.2f} | |"]
    for m in c["methods"]:
        runs = [r for r in results["runs"] if r["method"] == m["name"]]
        every = m["checkpoint_every"]
        for step in runs[0]["held_out"]:
            h = [r["held_out"][step] for r in runs]
            window = [np.mean([m["reward"] for m in r["metrics"] if int(step) - every < m["step"] <= int(step)])
                      for r in runs]
            lines.append(f"| {m['name']} | {step} | {int(step) * m['samples_per_step']} | "
                         f"{_ms([x['shape'][2] for x in h])} | {_ms([x['shape'][3] for x in h])} | "
                         f"{_ms([late_cells(x) for x in h])} | {_ms([np.mean(x['shape'][:2]) for x in h])} | "
                         f"{_ms([np.mean(x['colour'][2:4]) for x in h])} | {_ms([x['background'] for x in h])} | "
                         f"{_ms(window)} |")
    for m in c["methods"]:
        if not m.get("eta"):
            continue
        runs = [r for r in results["runs"] if r["method"] == m["name"]]
        st = results["start_stochastic"][str(m["eta"])]
        lines += ["", f"{m['name']} evaluated with the sampler it trains (stochastic DDIM, eta {m['eta']:g}), same "
                  "captions and seeds:", "", "| step | samples | shape 1 | shape 2 | shape 3 | shape 4 | colour 1-2 | "
                  "colour 3-4 |", "|---" * 8 + "|",
                  "| 0 | 0 | " + " | ".join(f"{x:.2f}" for x in st["shape"]) +
                  f" | {np.mean(st['colour'][:2]):.2f} | {np.mean(st['colour'][2:4]):.2f} |"]
        for step in runs[0]["held_out_stochastic"]:
            h = [r["held_out_stochastic"][step] for r in runs]
            lines.append(f"| {step} | {int(step) * m['samples_per_step']} | "
                         + " | ".join(_ms([x["shape"][i] for x in h]) for i in range(4))
                         + f" | {_ms([np.mean(x['colour'][:2]) for x in h])} | {_ms([np.mean(x['colour'][2:4]) for x in h])} |")
    lines += ["", "Samples needed to reach a held-out accuracy of cells 3-4 (interpolated between evaluations; "
              "per seed, then mean over the seeds that reach it):", "",
              "| level | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for gain in (0.03, 0.06, 0.09):
        level = start + gain
        cells = []
        for name in names:
            reached = [samples_to_reach(curve(results, r), level) for r in results["runs"] if r["method"] == name]
            ok = [x for x in reached if x is not None]
            cells.append(f"{np.mean(ok):.0f} ({len(ok)}/{len(reached)} seeds)" if ok else f"not reached (0/{len(reached)})")
        lines.append(f"| {level:.3f} (start + {gain:.2f}) | " + " | ".join(cells) + " |")
    seconds = {n: [r["train_seconds"] for r in results["runs"] if r["method"] == n] for n in names}
    lines += ["", "Training time per run (sum of step times; 2 cores shared by 2 actors and 2 workers, and by "
              "whatever else ran): " + ", ".join(f"{n} {min(v):.0f}-{max(v):.0f} s" for n, v in seconds.items())]
    return "\n".join(lines) + "\n"


def figure(results: dict, target: Path, start_model: str = START) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in results["settings"]["methods"]:
        runs = [r for r in results["runs"] if r["method"] == m["name"]]
        points = np.array([curve(results, r) for r in runs])  # [seeds, evaluations, 2]
        x, y = points[0, :, 0], points[:, :, 1]
        ax.plot(x, y.mean(0), marker="o", ms=3, label=m["name"])
        ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("held-out shape accuracy, cells 3-4")
    ax.legend(fontsize=8)
    ax.set_title(f"from {start_model}: mean ± std over {len(results['settings']['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.pg_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="one seed, 2 steps per method, for tests")
    parser.add_argument("--report", action="store_true", help="only rewrite report.md and curves.png from OUT")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.report:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "report.md").write_text(report(results))
        figure(results, args.out / "curves.png")
        return 0
    results = run_compare(Compare.quick() if args.quick else Compare(), args.out)
    print((args.out / "report.md").read_text())
    print(f"done in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
