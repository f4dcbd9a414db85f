"""Summarise a run's metrics.jsonl: throughput and where the step time goes.

    .venv/bin/python benchmarks/run_summary.py runs/<name> [--skip 1]

Step 1 is left out by default (it includes first-call costs: allocator warm-up, the
first weight sync). Times are medians over the remaining steps, in seconds per step.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from longalign_rl.outputs import read_metrics

KEYS = [
    ("time/step", "whole step (rank 0)"),
    ("time/sample_wait", "trainer blocked on rollouts"),
    ("time/train", "replay + decode + reward + backward + DeepSpeed step"),
    ("time/sync", "weight sync incl. waiting for the in-flight rollout + barrier"),
    ("time/sync_load", "slowest actor loading the weights"),
    ("time/sample_actor", "actor time spent sampling this step's rollouts (overlapped)"),
]


def summarise(run_dir: Path, skip: int) -> str:
    records = read_metrics(run_dir)[skip:]
    if not records:
        raise SystemExit(f"{run_dir}: no steps after skipping {skip}")
    lines = [f"{run_dir.name}: {len(records)} steps (after skipping {skip})",
             f"samples/s (median)            {statistics.median(r['samples_per_s'] for r in records):8.2f}"]
    step = statistics.median(r["time/step"] for r in records)
    for key, what in KEYS:
        value = statistics.median(r[key] for r in records)
        lines.append(f"{key:<28}  {value:8.3f} s  {100 * value / step:5.1f}%  {what}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--skip", type=int, default=1)
    args = parser.parse_args()
    print(summarise(args.run_dir, args.skip))


if __name__ == "__main__":
    main()
