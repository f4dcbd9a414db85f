"""The same run on different splits of one global batch (issue 24): `train.main`, the code a
user runs, on the default config (stage 2) and configs/tiny_stage1.yaml (stage 1) with one
global batch of 4 samples split as workers x batch x accumulation (and over 1 or 2 sampler
actors), for reward backpropagation, GRPO and stage 1; and each algorithm's run checkpointed
halfway on 2 workers and resumed on 1 (elastic resume). Printed, against the first split of
each algorithm: the largest difference of each step's reward, loss and grad norm, and how
far apart the final weights are, as a fraction of how far they moved over the second half
of the run (docs/scaling.md).

    .venv/bin/python benchmarks/topology.py [--steps 12] [--out runs/topology]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

SPLITS = {  # name -> overrides; a global batch of 4 samples in each
    "1x4, 1 actor": ["train.num_workers=1", "train.batch_size=4", "sampler.num_actors=1"],
    "2x2, 2 actors": ["train.num_workers=2", "train.batch_size=2", "sampler.num_actors=2"],
    "2x2, 1 actor": ["train.num_workers=2", "train.batch_size=2", "sampler.num_actors=1"],
    "1x2x2 accum, 1 actor": ["train.num_workers=1", "train.batch_size=2", "train.grad_accum=2",
                             "sampler.num_actors=1"],
    "4x1, 2 actors": ["train.num_workers=4", "train.batch_size=1", "sampler.num_actors=2",
                      "train.cpus_per_worker=0.25"],
}
ALGORITHMS = {  # name -> (config flags, overrides, the metrics compared)
    "reward_backprop": ([], [], ("reward", "loss", "grad_norm")),
    "grpo": ([], ["algorithm.name=grpo", "algorithm.group_size=2"], ("reward", "loss", "grad_norm")),  # whole groups per batch
    "stage1": (["--config", "configs/tiny_stage1.yaml"], ["train.grad_accum=1"], ("loss", "grad_norm")),
}
# Elastic resume: checkpointed halfway by the first run, resumed with this split.
RESUMED_ON = ["train.num_workers=1", "train.batch_size=4", "train.grad_accum=1", "sampler.num_actors=1"]


def weights(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / f"checkpoint_{step:06d}" / "weights.safetensors")


def l2(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from longalign_rl import train
    from longalign_rl.outputs import read_metrics

    out = Path(args.out or tempfile.mkdtemp(prefix="topology-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    half = args.steps // 2
    common = [f"train.steps={args.steps}", f"run.checkpoint_every={half}", "run.keep_checkpoints=2",
              "run.validation_size=2", f"run.eval_every={args.steps}", f"run.image_every={args.steps}",
              f"run.output_dir={out}"]

    def run(name: str, flags: list[str], *overrides: str) -> float:
        start = time.perf_counter()
        code = train.main([*flags, *common, *overrides, f"run.name={name}"])
        if code != 0:
            raise SystemExit(f"{name}: train.main exited {code}")
        return time.perf_counter() - start

    def compare(label: str, run_dir: Path, first: Path, keys: tuple) -> None:
        metrics, reference = read_metrics(run_dir), read_metrics(first)
        assert [m["step"] for m in metrics] == [m["step"] for m in reference], label
        row = {k: max(abs(m[k] - r[k]) for m, r in zip(metrics, reference)) for k in keys}
        row["relative " + "/".join(keys)] = max(abs(m[k] - r[k]) / max(abs(r[k]), 1e-12)
                                               for m, r in zip(metrics, reference) for k in keys)
        moved = l2(weights(first, args.steps), weights(first, half))
        row["weights apart / moved"] = l2(weights(run_dir, args.steps), weights(first, args.steps)) / moved
        results[label] = row
        print(f"  {label}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()), flush=True)

    results = {}
    for algorithm, (flags, extra, keys) in ALGORITHMS.items():
        runs = {}
        for i, (split, overrides) in enumerate(SPLITS.items()):
            if algorithm == "grpo" and "train.batch_size=1" in overrides:
                print(f"{algorithm:16s} {split:22s} skipped: a batch of 1 cannot hold a group of 2", flush=True)
                continue
            if algorithm == "stage1" and split == "2x2, 1 actor":
                continue  # stage 1 has no sampler actors: the same run as 2x2
            name = f"{algorithm}-{i}"
            seconds = run(name, flags, *extra, *overrides)
            runs[split] = out / name
            print(f"{algorithm:16s} {split:22s} ran in {seconds:.0f} s", flush=True)
        (first_split, first), *others = runs.items()
        for split, run_dir in others:
            compare(f"{algorithm}: {split} vs {first_split}", run_dir, first, keys)
        # elastic resume: the 2x2 run's first half again, then resumed on one worker
        name = f"{algorithm}-resumed"
        run(name, flags, *extra, *SPLITS["2x2, 2 actors"], f"train.steps={half}")
        start = time.perf_counter()
        if train.main(["--resume", str(out / name), f"train.steps={args.steps}", *RESUMED_ON]) != 0:
            raise SystemExit(f"{name}: the resume failed")
        print(f"{algorithm:16s} 2x2 to step {half}, resumed on 1x4 in {time.perf_counter() - start:.0f} s", flush=True)
        compare(f"{algorithm}: 2x2 resumed halfway on 1x4 vs 2x2 uninterrupted", out / name,
                runs["2x2, 2 actors"], keys)
    ray.shutdown()
    print(json.dumps({"steps": args.steps, "global_batch": 4, "results": results}, indent=1))


if __name__ == "__main__":
    main()
