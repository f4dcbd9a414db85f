"""Runs on a multi-node Ray cluster, on one machine (issue 24, item 3): the node types of
cluster/aws.yaml scaled down to logical CPUs (tests/cluster.py), a driver that joins the
cluster as `ray job submit` would start it (`python -m longalign_rl.train` with RAY_ADDRESS
set), and nodes lost mid-run. The placement test runs by default; the node-loss, autoscaler
and head-loss tests are marked slow (each several runs long)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longalign_rl.outputs import read_metrics
from tests import LIGHT, REPO
from tests.cluster import LocalCluster, NodeSpec, scaled_node_types

pytestmark = pytest.mark.filterwarnings("ignore")

RUN_TIMEOUT_S = 900
# GRPO with a reward actor: sampler actors, a reward actor and trainer workers, each placed
# by the custom resource of its node type (the scaled-down GPUs of cluster/aws.yaml).
PLACED = ["algorithm.name=grpo", "algorithm.group_size=2", "reward.num_actors=1", "reward.num_cpus=0.5",
          "reward.resources={sampler_gpu: 0.5}", "sampler.resources={sampler_gpu: 0.25}",
          "train.resources={trainer_gpu: 1}"]


def train(cluster: LocalCluster, out: Path, name: str, *overrides: str, timeout: float = RUN_TIMEOUT_S):
    """`python -m longalign_rl.train` as a driver on `cluster`; its output is kept beside the run."""
    cmd = [sys.executable, "-m", "longalign_rl.train", *overrides, f"run.output_dir={out}", f"run.name={name}"]
    done = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.log").write_text(done.stdout + done.stderr)
    return done


def test_a_run_places_actors_and_workers_on_the_node_types_it_asks_for(tmp_path):
    """Two node types from cluster/aws.yaml (a sampler node with 1 GPU, a trainer node with 8),
    a head with no CPUs: the sampler and reward actors run where sampler.resources and
    reward.resources send them, the trainer workers where train.resources does, and the run
    ends as on one machine. Before that, an output folder one node cannot see is refused by the
    driver in one line that names the node, and nothing is written."""
    types = scaled_node_types(REPO / "cluster" / "aws.yaml", {"sampler_gpu": 2, "trainer_gpu": 1})
    assert types["trainer_gpu"].resources == {"trainer_gpu": 8.0} and types["sampler_gpu"].resources == {"sampler_gpu": 1.0}
    out = tmp_path / "runs"
    out.mkdir()
    with LocalCluster(tmp_path, types) as cluster:
        trainer_node = cluster.node_ids["trainer_gpu"]
        refused = cluster.run(
            "from pathlib import Path\n"
            "from longalign_rl.config import ConfigError\n"
            "from longalign_rl.launch import check_shared_storage\n"
            "from tests.cluster import probe_elsewhere_on\n"
            f"try:\n    check_shared_storage(Path({str(out / 'x')!r}), probe=probe_elsewhere_on({trainer_node!r}))\n"
            "    result = None\n"
            "except ConfigError as e:\n    result = str(e)\n"
            f"checked = check_shared_storage(Path({str(out / 'x')!r}))\n"
            "result = [result, checked]\n")
        message, checked = refused
        assert message.startswith(f"run.output_dir: node {trainer_node[:8]} (") and "cannot see" in message
        assert "\n" not in message and checked == 3  # the real probe: head and both nodes see the folder
        assert list(out.iterdir()) == []  # the probe files are gone

        done = train(cluster, out, "placed", *LIGHT, *PLACED, "train.steps=2", "run.checkpoint_every=2")
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        where: dict[str, list[str]] = {}
        for actor in cluster.placement():
            where.setdefault(actor["class"], []).append(actor["node"])
    assert sorted(where["SamplerActor"]) == ["sampler_gpu", "sampler_gpu"]
    assert where["RewardActor"] == ["sampler_gpu"]
    assert sorted(where["RayTrainWorker"]) == ["trainer_gpu", "trainer_gpu"]
    metrics = read_metrics(out / "placed")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["reward"] == m["reward"] for m in metrics)
    assert (out / "placed" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "placed" / "checkpoint_000002" / "state.json").read_text())["step"] == 2
