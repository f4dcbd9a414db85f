"""Reward actors against scoring in the trainer workers (issue 11), through the product:
`python -m longalign_rl.train` with algorithm.name=grpo, once with the reward in the trainer
workers (reward.num_actors=0) and once in 2 reward actors, rounds alternating so that
machine noise hits both alike.

The reward is BrightPixels that takes --seconds per batch without using a core
(tests/plugins/my_reward.py:SlowBrightPixels): a reward model on a device of its own, which
this machine does not have. In the workers that time adds to every micro-step; in reward
actors it runs while the samplers sample the next batch (train.max_policy_lag 1) and the
trainers train, so it should leave the step time.

    .venv/bin/python benchmarks/reward_actors.py --seconds 3             # 2 rounds, 8 steps per run
    .venv/bin/python benchmarks/reward_actors.py --rounds 1 --steps 3 --actors 2   # the test's size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from longalign_rl.outputs import read_metrics

REPO = Path(__file__).resolve().parent.parent



def run(overrides: list[str], out: Path, name: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    args = [sys.executable, "-m", "longalign_rl.train", *overrides, f"run.output_dir={out}", f"run.name={name}"]
    log = out / f"{name}.log"
    with log.open("w") as f:
        done = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {done.returncode}); see {log}")
    return read_metrics(out / name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="the reward's time per batch")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (the first is left out)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", type=int, nargs="+", default=[2, 4], help="reward actor pool sizes to time")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    common = ["algorithm.name=grpo", "reward.name=tests.plugins.my_reward:SlowBrightPixels",
              f"reward.kwargs={{seconds: {args.seconds}}}", "algorithm.timestep_fraction=0.5",
              f"train.steps={args.steps}", f"run.checkpoint_every={args.steps}", f"run.image_every={args.steps}",
              "run.metrics=[]"]
    setups = {"reward in the trainer workers": ["reward.num_actors=0"],
              **{f"reward in {n} reward actors": [f"reward.num_actors={n}", "reward.num_cpus=0"] for n in args.actors}}
    keys = ("time/step", "time/score", "time/sample_wait", "time/train")
    rows = {name: [] for name in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, overrides) in enumerate(setups.items()):
                metrics = run(common + overrides, Path(tmp), f"r{r}_{i}")[1:]  # the first step pays start-up
                rows[name].append({k: statistics.median(m[k] for m in metrics) for k in keys})
    base = rows["reward in the trainer workers"]
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "setups": {}}
    for name, rs in rows.items():  # ratios per round (both sides of one round share the machine's state)
        results["setups"][name] = {k: statistics.median(row[k] for row in rs) for k in keys}
        results["setups"][name]["step_ratio"] = statistics.median(a["time/step"] / b["time/step"] for a, b in zip(rs, base))
    print(f"grpo (default run's shapes: 2 sampler actors, 2 workers, 8 samples each), a reward taking "
          f"{args.seconds:g} s per batch; medians over {args.rounds} round(s) of {args.steps - 1} steps")
    print(f"{'setup':<32} {'step s':>8} {'score s':>8} {'sample wait s':>14} {'train s':>8} {'step / workers':>15}")
    for name, m in results["setups"].items():
        print(f"{name:<32} {m['time/step']:>8.2f} {m['time/score']:>8.2f} {m['time/sample_wait']:>14.2f} "
              f"{m['time/train']:>8.2f} {m['step_ratio']:>14.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
