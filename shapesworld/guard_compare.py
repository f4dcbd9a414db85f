"""The guard against reward hacking on ShapesWorld (issue 27), through the product: every
run is `python -m longalign_rl.train` with a judge, selection and early stopping, and the
weights it selects are evaluated on held-out captions by the exact checker.

    python -m shapesworld.guard_compare --out /tmp/guard        # 3 conditions x 3 seeds, ~30 min on 2 cores
    python -m shapesworld.guard_compare --out /tmp/x --quick    # one run of 4 steps (tests)

Conditions, each from `shapesworld-partial` with the sweep's settings (shapesworld/sweep.py:
lr 3e-3, 48 steps, 16 samples per step), seeds 0-2:
    shapes_pref, w = 1     the sweep's hacked condition (held-out cell-1 shapes 0.88 -> 0.38)
    shapes_pref, w = 0.3   hacked more slowly
    shapes_clip, w = 0.3   the default run: no hacking
Every run validates on 16 captions of their own (shapesworld.plugin:validation_captions, not
the evaluation's) every 6 steps, judged by the exact checker (`shapes_exact`, never trained
on), selects by it and stops at its first drop beyond the uncertainty (run.early_stop.on_drop).
Each run's selected weights (best/) and last step's (the step it stopped at) are evaluated on
the 128 held-out captions of the sweep. Writes results.json, report.md.
`--regularisers`: reward backprop's optional regularisers instead, without the guard: the KL
penalty and the reward cap on the hacked condition and the KL penalty on the default run, 3
seeds each (REGULARISERS), every checkpoint evaluated held out; regularisers.json, .md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_rl import guard, validation
from longalign_rl.outputs import CONFIG, read_metrics
from shapesworld.pg_compare import _ms
from shapesworld.sweep import EVAL_SEED, START, Sweep, checkpoints, evaluate_weights, launch

JUDGE = "run.judge=[{reward: shapes_exact}]"


@dataclass(frozen=True)
class GuardCompare:
    conditions: tuple[tuple[str, float], ...] = (("shapes_pref", 1.0), ("shapes_pref", 0.3), ("shapes_clip", 0.3))
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 48
    eval_every: int = 6
    validation_size: int = 16
    lr: float = 3e-3
    eval_captions: int = 128
    eval_steps: int = 10
    guidance: float = 5.0

    @classmethod
    def quick(cls) -> "GuardCompare":
        return cls(conditions=(("shapes_pref", 1.0),), seeds=(0,), steps=4, eval_every=2, validation_size=4,
                   eval_captions=4, eval_steps=3)

    def sweep(self) -> Sweep:
        return Sweep(eval_captions=self.eval_captions, eval_steps=self.eval_steps, guidance=self.guidance)


def run_name(reward: str, w: float, seed: int) -> str:
    return f"{reward}_w{w:g}_s{seed}"


def train_run(c: GuardCompare, reward: str, w: float, seed: int, runs: Path) -> Path:
    """One run of the product with the guard on, as a user starts it."""
    return launch([f"model.pretrained={START}",
                   f"reward.name={reward}", f"reward.kwargs.text_irrelevant_weight={w}",
                   f"train.seed={seed}", f"train.lr={c.lr}", f"train.steps={c.steps}",
                   "run.checkpoint_every=12", "run.keep_checkpoints=1", f"run.image_every={c.steps}",
                   "run.validation=shapesworld.plugin:validation_captions",
                   f"run.validation_size={c.validation_size}", f"run.eval_every={c.eval_every}",
                   JUDGE, "run.early_stop.on_drop=true"], run_name(reward, w, seed), runs)


def finished(run_dir: Path) -> bool:
    return guard.read_selection(run_dir) is not None and (run_dir / "summary.json").is_file()


def run_compare(c: GuardCompare, out: Path, log=print) -> dict:
    import yaml

    from shapesworld.evaluate import draw_captions
    from shapesworld.world import WorldConfig

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    prompts = draw_captions(WorldConfig(), c.eval_captions, seed=EVAL_SEED)
    began = time.perf_counter()
    results = {"settings": asdict(c), "start": evaluate_weights(None, {}, c.sweep(), prompts), "runs": []}
    for reward, w in c.conditions:
        for seed in c.seeds:
            t = time.perf_counter()
            run_dir = runs / run_name(reward, w, seed)
            if not finished(run_dir):
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir = train_run(c, reward, w, seed, runs)
            selection = guard.read_selection(run_dir)
            lora = yaml.safe_load((run_dir / CONFIG).read_text())["lora"]
            last_step, last_folder = max(checkpoints(run_dir).items())
            selected = evaluate_weights(run_dir / guard.BEST / "weights.safetensors", lora, c.sweep(), prompts)
            last = evaluate_weights(last_folder / "weights.safetensors", lora, c.sweep(), prompts)
            metrics = read_metrics(run_dir)
            results["runs"].append({
                "reward": reward, "w": w, "seed": seed, "selection": selection,
                "alarms": guard.read_report(run_dir).get("alarms", []),
                "validations": validation.read(run_dir), "selected": selected, "last_step": last_step, "last": last,
                "train_seconds": round(sum(m["time/step"] for m in metrics), 1),
                "seconds": round(time.perf_counter() - t, 1)})
            log(f"{run_name(reward, w, seed)}: {time.perf_counter() - t:.0f} s; selected step "
                f"{selection['exported_step']}, ended early: {selection['ended_early']} (step {selection['last_step']}); "
                f"held-out shapes selected {[round(x, 2) for x in selected['shape']]}, last "
                f"{[round(x, 2) for x in last['shape']]}")
            (out / "results.partial.json").write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = round(time.perf_counter() - began, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.md").write_text(report(results))
    return results


def alarms_now(run: dict) -> list:
    """The run's drift alarms at run.drift's current defaults, from its validation records (a
    pure function of them: guard.drift_alarms), whatever thresholds the run had."""
    from longalign_rl.config import DriftConfig

    return guard.drift_alarms(DriftConfig(), run["validations"])


def accuracy(held: dict) -> float:
    """Mean held-out accuracy over the four cells' colour and shape."""
    return float(np.mean([*held["colour"], *held["shape"]]))


def selected_step(run: dict) -> str:
    """The step whose weights the run exported, and the best validation's where it is another."""
    s = run["selection"]
    return str(s["exported_step"]) + (f" ({s['best_step']})" if s["best_step"] != s["exported_step"] else "")


def report(results: dict) -> str:
    c = results["settings"]
    start = results["start"]
    lines = ["# The guard against reward hacking on ShapesWorld, through the product", "",
             f"{len(c['seeds'])} seed(s) per condition from `shapesworld-partial`, lr {c['lr']}, up to {c['steps']} "
             f"steps; judge: the exact checker on {c['validation_size']} validation captions of their own every "
             f"{c['eval_every']} steps; selection by it; early stop at its first drop beyond the uncertainty. "
             f"Held-out: the exact checker on {c['eval_captions']} captions (seed {EVAL_SEED}), mean ± std over "
             f"seeds. Wall clock {results['seconds'] / 60:.1f} min.", "",
             "Accuracy = the mean over the four cells' colour and shape; shape 1 is the cell the sweep saw hacked.",
             "", "| condition | stopped at | selected step | accuracy: start | selected | last step | shape 1: start | "
             "selected | last step | divergence warned at | drift alarms (runs) |", "|---" * 11 + "|"]
    for reward, w in c["conditions"]:
        runs = [r for r in results["runs"] if (r["reward"], r["w"]) == (reward, w)]
        stopped = [r["selection"]["last_step"] if r["selection"]["ended_early"] else None for r in runs]
        warned = [r["selection"]["diverged_at"][0] if r["selection"]["diverged_at"] else None for r in runs]
        fired = [alarms_now(r) for r in runs]
        alarms = sorted({a.statistic for f in fired for a in f})
        counts = ", ".join(f"{a} ({sum(any(x.statistic == a for x in f) for f in fired)})" for a in alarms)
        lines.append(
            f"| {reward}, w = {w:g} | {', '.join(str(s) if s else 'never' for s in stopped)} | "
            f"{', '.join(map(selected_step, runs))} | {accuracy(start):.3f} | "
            f"{_ms([accuracy(r['selected']) for r in runs])} | {_ms([accuracy(r['last']) for r in runs])} | "
            f"{start['shape'][0]:.2f} | {_ms([r['selected']['shape'][0] for r in runs])} | "
            f"{_ms([r['last']['shape'][0] for r in runs])} | {', '.join(str(s) if s else 'never' for s in warned)} | "
            f"{counts or 'none'} |")
    lines += ["", "Selected step: the latest validation within run.select_by.within (1) standard errors of the best "
              "one (the best's step in brackets where it is another). Drift alarms at run.drift's current defaults, "
              "recomputed from each run's validation.jsonl (guard.json keeps what the run said at its own "
              "thresholds).", "", "Per run: the judge (exact checker on the validation captions) at every "
              "validation, the drift alarms, and the held-out accuracy of the selected and the last weights.", ""]
    for r in results["runs"]:
        s = r["selection"]
        rows = ", ".join(f"{v['step']}: {v['key']:.3f}" + (" (selected)" if v["step"] == s["exported_step"] else "")
                         + (" (best)" if v["step"] == s["best_step"] != s["exported_step"] else "")
                         for v in s["validations"] if isinstance(v["key"], (int, float)))
        alarms = "; ".join(f"{a.statistic} {a.change:+.3f} at {a.step}" for a in alarms_now(r)) or "none"
        lines.append(f"- {run_name(r['reward'], r['w'], r['seed'])}: judge {rows}. Alarms: {alarms}. "
                     f"Held-out accuracy selected {accuracy(r['selected']):.3f}, last step ({r['last_step']}) "
                     f"{accuracy(r['last']):.3f}.")
    drift = {}
    for r in results["runs"]:
        last, first = r["validations"][-1], r["validations"][0]
        for name in guard.STATISTICS:
            change, _ = guard.paired_change(first, last, guard.DRIFT + name)
            if math.isfinite(change):
                drift.setdefault((r["reward"], r["w"]), {}).setdefault(name, []).append(change)
    lines += ["", "Drift statistics at each run's last validation against step 0 (mean ± std over seeds; the "
              "calibration of run.drift's defaults):", "",
              "| condition | " + " | ".join(guard.STATISTICS) + " |", "|---" * (len(guard.STATISTICS) + 1) + "|"]
    for (reward, w), stats in drift.items():
        lines.append(f"| {reward}, w = {w:g} | " + " | ".join(_ms(stats[n]) if n in stats else "" for n in guard.STATISTICS) + " |")
    return "\n".join(lines) + "\n"


# The regularisers of reward backpropagation (algorithm.kl_weight, algorithm.reward_cap), without
# the guard, 48 steps: (run name, seed, reward, text-irrelevant weight, override). On the
# sweep's hacked condition (shapes_pref, w = 1): each regulariser and the run without one, 3
# seeds (the latter is what the guarded runs' early stops saved them from); on the default
# run (shapes_clip, w = 0.3) the KL penalty, to see whether it also holds back a real gain
# (its unregularised runs are run_compare's default condition, which never stops early).
# Ordered so that a stopped command has the most telling runs.
HACKED, DEFAULT = ("shapes_pref", 1.0), ("shapes_clip", 0.3)
NONE, KL, CAP = "algorithm.kl_weight=0.0", "algorithm.kl_weight=10.0", "algorithm.reward_cap=0.12"
REGULARISERS = (
    ("unguarded_s0", 0, *HACKED, NONE), ("kl_weight_s0", 0, *HACKED, KL), ("reward_cap_s0", 0, *HACKED, CAP),
    ("kl_weight_s1", 1, *HACKED, KL), ("unguarded_s1", 1, *HACKED, NONE),
    ("kl_weight_s2", 2, *HACKED, KL), ("unguarded_s2", 2, *HACKED, NONE),
    ("default_kl_weight_s0", 0, *DEFAULT, KL), ("default_kl_weight_s1", 1, *DEFAULT, KL),
    ("default_kl_weight_s2", 2, *DEFAULT, KL),
    ("reward_cap_s1", 1, *HACKED, CAP), ("reward_cap_s2", 2, *HACKED, CAP))


def run_regularisers(c: GuardCompare, out: Path, log=print, only: int | None = None) -> dict:
    """Each regulariser's runs and the runs without one, every checkpoint evaluated held out;
    regularisers.json is rewritten after each run (`only`: the first runs alone, for tests)."""
    import yaml

    from shapesworld.evaluate import draw_captions
    from shapesworld.world import WorldConfig

    runs = out / "regularisers"
    runs.mkdir(parents=True, exist_ok=True)
    prompts = draw_captions(WorldConfig(), c.eval_captions, seed=EVAL_SEED)
    results = {"settings": asdict(c), "runs": []}
    for name, seed, reward, w, override in REGULARISERS[:only]:
        t = time.perf_counter()
        run_dir = runs / name
        if max(checkpoints(run_dir), default=0) != c.steps:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir = launch([f"model.pretrained={START}", f"reward.name={reward}",
                              f"reward.kwargs.text_irrelevant_weight={w}", f"train.seed={seed}", f"train.lr={c.lr}",
                              f"train.steps={c.steps}", "run.checkpoint_every=12", "run.keep_checkpoints=0",
                              f"run.image_every={c.steps}", "run.validation_size=0", override], name, runs)
        lora = yaml.safe_load((run_dir / CONFIG).read_text())["lora"]
        held = {step: evaluate_weights(folder / "weights.safetensors", lora, c.sweep(), prompts)
                for step, folder in checkpoints(run_dir).items()}
        results["runs"].append({"name": name, "seed": seed, "reward": reward, "w": w, "override": override,
                                "metrics": read_metrics(run_dir), "held_out": {str(k): v for k, v in held.items()},
                                "seconds": round(time.perf_counter() - t, 1)})
        log(f"{name}: {time.perf_counter() - t:.0f} s; held-out accuracy "
            f"{ {k: round(accuracy(v), 3) for k, v in held.items()} }")
        (out / "regularisers.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def regulariser_report(results: dict) -> str:
    """Held-out accuracy (and cell 1's shape) at each checkpoint, mean ± std over the seeds of
    each condition and override; the training reward and the regulariser's own metric over
    the last quarter of the steps."""
    steps = sorted({int(k) for r in results["runs"] for k in r["held_out"]})
    groups: dict = {}
    for r in results["runs"]:
        groups.setdefault((r["reward"], r["w"], r["override"]), []).append(r)
    lines = ["| condition | override | seeds | " + " | ".join(f"step {s}: accuracy, shape 1" for s in steps)
             + " | reward, last quarter | kl or capped share, last quarter |", "|---" * (len(steps) + 5) + "|"]
    for (reward, w, override), rs in groups.items():
        extra = {KL: "kl", CAP: "reward_capped"}.get(override)
        quarters = [r["metrics"][-max(1, len(r["metrics"]) // 4):] for r in rs]
        cells = []
        for s in steps:
            held = [r["held_out"][str(s)] for r in rs if str(s) in r["held_out"]]
            cells.append(f"{_ms([accuracy(h) for h in held])}, {_ms([h['shape'][0] for h in held])}" if held else "")
        lines.append(f"| {reward}, w = {w:g} | `{override}` | {', '.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(cells)
                     + f" | {_ms([float(np.mean([m['reward'] for m in q])) for q in quarters])} | "
                     + (_ms([float(np.mean([m.get(extra, math.nan) for m in q])) for q in quarters]) if extra else "")
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.guard_compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="one run of 4 steps, for tests")
    parser.add_argument("--report", action="store_true", help="only rewrite report.md from OUT/results.json")
    parser.add_argument("--regularisers", action="store_true", help="instead: the hacked condition without the "
                        "guard and with reward backprop's regularisers (3 seeds each; the KL penalty on the default "
                        "run too), OUT/regularisers.json and regularisers.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.regularisers:
        results = run_regularisers(GuardCompare.quick() if args.quick else GuardCompare(), args.out,
                                   only=2 if args.quick else None)
        text = regulariser_report(results)
        (args.out / "regularisers.md").write_text(text)
        print(text)
        return 0
    if args.report:
        (args.out / "report.md").write_text(report(json.loads((args.out / "results.json").read_text())))
        return 0
    results = run_compare(GuardCompare.quick() if args.quick else GuardCompare(), args.out)
    print((args.out / "report.md").read_text())
    print(f"done in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
