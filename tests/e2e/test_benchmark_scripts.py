"""The Ray benchmark scripts run at their smallest size and print the ratios BENCHMARKS.md
quotes, so a change in the code they drive cannot leave them broken unnoticed. Each runs
in its own process: they start their own local Ray instance."""

import os
import re
import subprocess
import sys

import pytest

from tests import REPO


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # CI time (30 s): the sampler actors it times run in every e2e run
def test_sampling_throughput_compares_a_plain_process_with_sampler_actors():
    out = run_script("sampling_throughput.py", "--rounds", "1", "--calls", "1", "--batch", "2")
    overhead = float(re.search(r"actor overhead \(plain / 1 actor\): ([\d.]+)x", out).group(1))
    scaling = float(re.search(r"scaling \(2 actors / 1 actor\): +([\d.]+)x", out).group(1))
    assert overhead > 0 and scaling > 0
    assert re.search(r"weight sync to 2 actors \([\d.]+ MB of LoRA weights\): median [\d.]+ ms", out)


@pytest.mark.slow  # CI time (54 s): the Ray Train + DeepSpeed step it times runs in every e2e run
def test_trainer_overhead_times_the_distributed_step_against_a_plain_one():
    out = run_script("trainer_overhead.py", "--steps", "2")
    ratio = float(re.search(r"overhead ratio \(distributed / plain alone\): ([\d.]+)x", out).group(1))
    assert ratio > 0
    assert re.search(r"Ray Train \+ DeepSpeed ZeRO-2, 2 workers: median +[\d.]+ ms/step", out)


@pytest.mark.slow  # two full runs through the product; the reward actors themselves are in test_reward_actors.py
def test_reward_actors_times_a_slow_reward_in_the_workers_and_in_reward_actors():
    out = run_script("reward_actors.py", "--rounds", "1", "--steps", "2", "--actors", "2", "--seconds", "0.2")
    rows = dict(re.findall(r"^(reward in [\w ]+?)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out, re.M))
    assert set(rows) == {"reward in the trainer workers", "reward in 2 reward actors"}
    assert all(float(v) > 0 for v in rows.values())


@pytest.mark.slow  # 20 runs through the product; the default tier compares splits in test_end_to_end.py and test_stage1.py
def test_topology_compares_splits_of_one_global_batch_for_every_algorithm():
    import json

    out = run_script("topology.py", "--steps", "2")
    results = json.loads(out[out.rindex("\n{\n") + 1:])["results"]  # the last thing printed
    assert {name.split(":")[0] for name in results} == {"reward_backprop", "grpo", "stage1"}
    # against the first split (4x1 cannot hold grpo's groups of 2; stage 1 has no actors), and
    # each algorithm's elastic resume
    assert len(results) == 4 + 3 + 3 + 3
    for name, row in results.items():
        assert row.get("reward", 0.0) < 1e-3 and row["loss"] < 1e-3 and row["weights apart / moved"] < 0.05, (name, row)
