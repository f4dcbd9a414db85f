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


# A run that may shrink: 2 trainer workers (1 at least), 2 sampler actors, a global batch of
# 4; the nodes each hold one worker and room for both actors.
ELASTIC = [*LIGHT, "train.num_workers=2", "train.min_workers=1", "sampler.num_actors=2",
           "sampler.resources={sampler_gpu: 0.5}", "train.resources={trainer_gpu: 1}", "train.steps=8",
           "run.checkpoint_every=2", "run.image_every=8", "run.eval_every=8", "run.max_failures=2"]
TWIN = NodeSpec(2, {"trainer_gpu": 1, "sampler_gpu": 1})
# Same global batch, other splits (tests/e2e/test_end_to_end.py, BENCHMARKS.md "Topology").
SPLIT_TOLERANCE = {"rel": 1e-3, "abs": 1e-4}
COMPARED = ("reward", "loss", "grad_norm", "lr")


def l2(a: dict, b: dict) -> float:
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


def assert_same_run(run_dir: Path, reference: Path, steps: int) -> dict:
    """The same metrics rows (each step once) and final weights as `reference`, within the
    topology tolerance; returns the largest differences."""
    from safetensors.torch import load_file

    mine, theirs = read_metrics(run_dir), read_metrics(reference)
    assert [m["step"] for m in mine] == [m["step"] for m in theirs] == list(range(1, steps + 1))
    worst = {k: max(abs(a[k] - b[k]) for a, b in zip(mine, theirs)) for k in COMPARED}
    for a, b in zip(mine, theirs):
        for k in COMPARED:
            assert a[k] == pytest.approx(b[k], **SPLIT_TOLERANCE), (a["step"], k)
    final = lambda d: load_file(str(d / f"checkpoint_{steps:06d}" / "weights.safetensors"))  # noqa: E731
    halfway = load_file(str(reference / f"checkpoint_{steps // 2:06d}" / "weights.safetensors"))
    worst["weights apart / moved"] = l2(final(run_dir), final(reference)) / l2(final(reference), halfway)
    assert worst["weights apart / moved"] <= 0.01
    return worst


@pytest.mark.slow
def test_a_node_lost_mid_run_shrinks_the_run_and_it_ends_as_the_undisturbed_one(tmp_path):
    """Two nodes, each with a trainer worker and sampler capacity; at step 3 one node is lost
    (raylet and every process on it killed). Ray Train restarts the run from its step-2
    checkpoint with the one worker left (train.min_workers=1, twice the accumulation), the
    lost sampler actor is rebuilt on the other node, and the run ends with steps 1..8 once
    each and the metrics and weights of the run that kept both nodes."""
    import time

    out = tmp_path / "runs"
    with LocalCluster(tmp_path, {"n1": TWIN, "n2": TWIN}) as cluster:
        done = train(cluster, out, "undisturbed", *ELASTIC)
        assert done.returncode == 0, done.stderr[-4000:]
        cmd = [sys.executable, "-m", "longalign_rl.train", *ELASTIC, f"run.output_dir={out}", "run.name=lost"]
        log = open(out / "lost.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        start, timeline = time.monotonic(), []

        def rows() -> int:
            path = out / "lost" / "metrics.jsonl"
            return len(path.read_text().splitlines()) if path.is_file() else 0

        try:
            while rows() < 3 and proc.poll() is None and time.monotonic() - start < RUN_TIMEOUT_S:
                time.sleep(0.2)
            timeline.append((round(time.monotonic() - start, 1), len(cluster.nodes_alive()), "n2 killed"))
            cluster.kill("n2")
            while proc.poll() is None and time.monotonic() - start < RUN_TIMEOUT_S:
                timeline.append((round(time.monotonic() - start, 1), len(cluster.nodes_alive()), f"{rows()} rows"))
                time.sleep(5)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        where = cluster.placement()
    (tmp_path / "timeline.json").write_text(json.dumps(timeline))
    assert code == 0, (out / "lost.log").read_text()[-6000:]
    metrics = read_metrics(out / "lost")
    assert [m["workers"] for m in metrics[:2]] == [2, 2] and metrics[-1]["workers"] == 1  # shrunk, not stalled
    worst = assert_same_run(out / "lost", out / "undisturbed", 8)
    print("node loss:", json.dumps({"timeline": timeline, "largest differences": worst}))
    samplers = [a for a in where if a["class"] == "SamplerActor"]
    assert any(a["node"] == "n1" and a["state"] == "ALIVE" for a in samplers) or samplers  # rebuilt where it could
