"""Runs on a multi-node Ray cluster, on one machine (issue 24, item 3): the node types of
cluster/aws.yaml scaled down to logical CPUs (tests/cluster.py), runs submitted with `ray job
submit` or started as drivers on the cluster (`python -m longalign_rl.train` with RAY_ADDRESS
set), and nodes lost mid-run. All four are marked slow (each minutes long; run them with
`-m slow`)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from longalign_rl.outputs import read_metrics
from tests import LIGHT, REPO
from tests.cluster import ANSI, RAY, LocalCluster, NodeSpec, scaled_node_types, tail

pytestmark = pytest.mark.filterwarnings("ignore")

RUN_TIMEOUT_S = 900

PLUGIN_REWARDS = '''
import os

from longalign_rl.registry import Reward, RewardOutput


class Redness(Reward):
    """Mean red minus mean green: differentiable and prompt-blind. Its component's name
    comes from the job's runtime_env env_vars, so the metric shows they reached the workers."""

    differentiable = True

    def __init__(self, **kwargs):
        super().__init__()
        self.component = os.environ["MYPLUGIN_COMPONENT"]  # set only in the job's runtime_env

    def forward(self, images, prompts):
        red, green = images[:, 0].mean(dim=(1, 2)), images[:, 1].mean(dim=(1, 2))
        return RewardOutput(total=red - green, components={self.component: red.detach()})
'''

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


@pytest.fixture
def plugin_package(tmp_path):
    """`myplugin` (a package with a reward) in a directory that nothing puts on a path."""
    pkg = tmp_path / "plugin_src" / "myplugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A third-party reward plugin, shipped with the job."""\n')
    (pkg / "rewards.py").write_text(textwrap.dedent(PLUGIN_REWARDS))
    assert importlib.util.find_spec("myplugin") is None, "myplugin must not be importable outside the job"
    return pkg


@pytest.mark.slow  # CI time: a 3-node cluster with a dashboard and a GRPO run with a reward actor, 250 s of the
# test command's ~31 minutes; joining a running cluster (RAY_ADDRESS, as `ray job submit` sets it) is
# test_end_to_end.py's default-tier test_the_run_joins_the_cluster_named_by_ray_address
def test_ray_job_submit_places_a_plugin_run_on_the_node_types_it_asks_for(tmp_path, plugin_package):
    """What a user does on a cluster: `ray job submit --working-dir <repo> --runtime-env-json
    '{"py_modules": [plugin]}' -- python -m longalign_rl.train ...`, with a reward plugin that
    exists only in the job's runtime environment, on two node types from cluster/aws.yaml (a
    sampler node with 1 GPU, a trainer node with 8) and a head with no CPUs. The job's driver
    joins the cluster; the sampler and reward actors run where sampler.resources and
    reward.resources send them, the trainer workers where train.resources does; the run ends
    as on one machine. Before that, an output folder one node cannot see is refused by the
    driver's check in one line that names the node, and nothing is written."""
    types = scaled_node_types(REPO / "cluster" / "aws.yaml", {"sampler_gpu": 2, "trainer_gpu": 1})
    assert types["trainer_gpu"].resources == {"trainer_gpu": 8.0} and types["sampler_gpu"].resources == {"sampler_gpu": 1.0}
    out = tmp_path / "runs"
    out.mkdir()
    with LocalCluster(tmp_path, types, dashboard=True) as cluster:
        trainer_node = cluster.node_ids["trainer_gpu"]
        message = cluster.run(
            "from pathlib import Path\n"
            "from longalign_rl.config import ConfigError\n"
            "from longalign_rl.launch import check_shared_storage\n"
            "from tests.cluster import probe_elsewhere_on\n"
            f"try:\n    check_shared_storage(Path({str(out / 'x')!r}), probe=probe_elsewhere_on({trainer_node!r}))\n"
            "    refused = None\n"
            "except ConfigError as e:\n    refused = str(e)\n"
            "result = refused\n")
        assert message.startswith(f"run.output_dir: node {trainer_node[:8]} (") and "cannot see" in message
        assert "\n" not in message and list(out.iterdir()) == []  # one line; the probe file is gone
        # (the run below passes the same check with the real probe on the head and both nodes)

        job_id = f"longalign-test-{uuid.uuid4().hex[:8]}"
        runtime_env = {
            "py_modules": [str(plugin_package)],
            "env_vars": {"MYPLUGIN_COMPONENT": "red", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
            # Ray 2.60 already leaves out .git, .venv and what .gitignore lists (the upload is ~0.3 MB,
            # the limit 512 MiB); said here so that neither a Ray default nor .gitignore is relied on.
            "excludes": [".git", ".venv", "runs", ".pytest_cache", "*.egg-info", "__pycache__"],
        }
        cmd = [str(RAY), "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "longalign_rl.train", *LIGHT, *PLACED, "train.steps=2", "run.checkpoint_every=2",
               f"run.output_dir={out}", "run.name=job", "reward.name=myplugin.rewards:Redness"]
        env = {k: v for k, v in cluster.env.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        try:
            for _ in range(30):  # the head's job agent registers a few seconds after the dashboard answers
                submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                                        cwd=tmp_path)
                output, code = ANSI.sub("", submit.stdout + submit.stderr), submit.returncode
                if "No available agent to submit job" not in output:
                    break
                time.sleep(2)
        except subprocess.TimeoutExpired as e:
            subprocess.run([str(RAY), "job", "stop", "--address", cluster.dashboard, job_id], env=env, timeout=60)
            output, code = f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {RUN_TIMEOUT_S} s)", None
        (tmp_path / "ray_job_submit.log").write_text(str(output))
        assert code == 0 and f"Job '{job_id}' succeeded" in output, tail(str(output))
        where: dict[str, list[str]] = {}
        for actor in cluster.placement():
            where.setdefault(actor["class"], []).append(actor["node"])
    # The job's driver joined this cluster through the RAY_ADDRESS that Ray's job supervisor
    # sets (the head's GCS address), and did not start a Ray of its own.
    joined = re.search(r"^ray +joined the cluster at ([^\s,]+)", output, re.M)
    assert joined and joined.group(1).endswith(":" + cluster.address.rsplit(":", 1)[1]), tail(output)
    assert "started a local instance" not in output
    assert sorted(where["SamplerActor"]) == ["sampler_gpu", "sampler_gpu"]
    assert where["RewardActor"] == ["sampler_gpu"]
    assert sorted(where["RayTrainWorker"]) == ["trainer_gpu", "trainer_gpu"]
    run_dir = out / "job"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("red" in m and 0.0 <= m["red"] <= 1.0 for m in metrics), metrics[0].keys()  # the plugin's component
    assert json.loads((run_dir / "checkpoint_000002" / "state.json").read_text())["step"] == 2
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


# A run that may shrink: 2 trainer workers (1 at least), 2 sampler actors, a global batch of
# 4; the nodes each hold one worker and room for both actors.
ELASTIC = [*LIGHT, "train.num_workers=2", "train.min_workers=1", "sampler.num_actors=2",
           "sampler.resources={sampler_gpu: 0.5}", "train.resources={trainer_gpu: 1}", "train.steps=8",
           "run.checkpoint_every=2", "run.image_every=8", "run.eval_every=8", "run.max_failures=2"]
TWIN = NodeSpec(2, {"trainer_gpu": 1, "sampler_gpu": 1})
# Same global batch, other splits (tests/e2e/test_end_to_end.py, BENCHMARKS.md "Topology").
SPLIT_TOLERANCE = {"rel": 1e-3, "abs": 1e-4}
COMPARED = ("reward", "loss", "grad_norm", "lr")


def rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def start_until(cluster: LocalCluster, out: Path, name: str, overrides: list[str], wanted: int):
    """A driver started on `cluster` (its output in out/<name>.log), returned once its run has
    `wanted` metrics rows (or has ended): (process, log file)."""
    import time

    cmd = [sys.executable, "-m", "longalign_rl.train", *overrides, f"run.output_dir={out}", f"run.name={name}"]
    log = open(out / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while rows(out / name) < wanted and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return proc, log


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
        earlier = {a["id"] for a in cluster.placement()}
        start = time.monotonic()
        proc, log = start_until(cluster, out, "lost", ELASTIC, 3)
        timeline = []
        try:
            at_kill = {a["id"]: a["node"] for a in cluster.placement() if a["class"] == "SamplerActor"}
            timeline.append((round(time.monotonic() - start, 1), len(cluster.nodes_alive()), "n2 killed"))
            cluster.kill("n2")
            while proc.poll() is None and time.monotonic() - start < RUN_TIMEOUT_S:
                timeline.append((round(time.monotonic() - start, 1), len(cluster.nodes_alive()),
                                 f"{rows(out / 'lost')} rows"))
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
    # Ray keeps one record per actor, with where it last ran: this run's two sampler actors
    # ended on the node that was left (rebuilt there if they were on n2 when it was lost;
    # Ray's scheduler may also have put both on n1 from the start)
    samplers = [a for a in where if a["class"] == "SamplerActor" and a["id"] not in earlier]
    assert sorted(a["node"] for a in samplers) == ["n1", "n1"]
    moved = sum(at_kill.get(a["id"]) == "n2" for a in samplers)
    print("node loss:", json.dumps({"timeline": timeline, "largest differences": worst,
                                    "sampler actors on n2 when it was lost, rebuilt on n1": moved}))


@pytest.mark.slow
def test_ray_job_submit_to_an_empty_autoscaling_cluster_adds_nodes_and_they_go_when_idle(tmp_path):
    """cluster/one_machine.yaml (aws.yaml's node types on Ray's fake multi-node provider):
    the head has no CPUs and there are no worker nodes. `ray job submit` of the default run,
    with its actors and workers asking for the node types' resources, makes the autoscaler
    add a sampler node and a trainer node; the run completes; the idle nodes are removed."""
    import threading
    import time

    import yaml

    from tests.cluster import free_ports, ray_start_head

    port = free_ports(1)[0]
    config = yaml.safe_load((REPO / "cluster" / "one_machine.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config["idle_timeout_minutes"] = 0.2  # 12 s, for the test
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
    out, timeline = tmp_path / "runs", []
    with ray_start_head(tmp_path, num_cpus=0, gcs_port=port,
                        extra_args=("--node-ip-address=127.0.0.1", f"--autoscaling-config={tmp_path / 'cluster.yaml'}"),
                        extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as head:
        start, done, types = time.monotonic(), threading.Event(), set()

        def workers_alive() -> int:
            alive = [n for n in head.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]]
            types.update(k for n in alive for k in n.get("resources_total", {}) if k in ("sampler_gpu", "trainer_gpu"))
            return len(alive)

        def watch():
            while not done.is_set():
                timeline.append((round(time.monotonic() - start, 1), workers_alive()))
                done.wait(2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert workers_alive() == 0
        cmd = [str(head.env["PATH"].split(":")[0] + "/ray"), "job", "submit", "--address", head.dashboard,
               "--working-dir", str(REPO), "--runtime-env-json",
               json.dumps({"excludes": [".git", ".venv", "runs", "__pycache__"]}), "--",
               "python", "-m", "longalign_rl.train", *LIGHT, "train.steps=2", "run.checkpoint_every=2",
               "sampler.resources={sampler_gpu: 0.5}", "train.resources={trainer_gpu: 1}",
               f"run.output_dir={out}", "run.name=autoscaled"]
        job = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=tmp_path)
        ended = time.monotonic() - start
        assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-4000:] + job.stderr[-4000:]
        deadline = time.monotonic() + 180
        while workers_alive() and time.monotonic() < deadline:
            time.sleep(2)
        done.set()
        watcher.join()
        timeline.append((round(time.monotonic() - start, 1), workers_alive()))
    (tmp_path / "timeline.json").write_text(json.dumps(timeline))
    print("autoscaling:", json.dumps({"job ended at s": round(ended, 1), "worker nodes over time": timeline}))
    assert max(n for _, n in timeline) >= 2 and types == {"sampler_gpu", "trainer_gpu"}  # one node of each type
    assert timeline[-1][1] == 0  # and removed once idle
    assert [m["step"] for m in read_metrics(out / "autoscaled")] == [1, 2]


@pytest.mark.slow
def test_a_lost_head_ends_the_run_and_a_resume_on_a_new_cluster_ends_it_as_undisturbed(tmp_path):
    """The head (GCS) is lost mid-run: every node and the driver go with it. The run directory
    on shared storage keeps its last checkpoint; `--resume` on a new cluster goes on from it,
    and the run ends with the undisturbed run's rows and weights."""
    import time

    out = tmp_path / "runs"
    overrides = [*ELASTIC, "run.max_failures=0"]
    with LocalCluster(tmp_path, {"n1": TWIN, "n2": TWIN}) as cluster:
        done = train(cluster, out, "undisturbed", *overrides)
        assert done.returncode == 0, done.stderr[-4000:]
        proc, log = start_until(cluster, out, "headless", overrides, 3)
        import psutil  # a dependency of ray

        # The head and both nodes at once, with every process on them (the helper started them all).
        tree = [psutil.Process(cluster.proc.pid), *psutil.Process(cluster.proc.pid).children(recursive=True)]
        lost = time.monotonic()
        for process in tree:
            process.kill()
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "hung"
        log.close()
    lost_after = time.monotonic() - lost
    assert code != 0, "a driver whose head is gone must not exit 0"
    said = [line for line in (out / "headless.log").read_text().splitlines() if line.strip()][-3:]
    kept = sorted(p.name for p in (out / "headless").glob("checkpoint_*") if p.is_dir())
    assert kept and kept[-1] >= "checkpoint_000002"
    with LocalCluster(tmp_path, {"n1": TWIN, "n2": TWIN}) as fresh:
        resumed = subprocess.run([sys.executable, "-m", "longalign_rl.train", "--resume", str(out / "headless")],
                                 cwd=REPO, env=fresh.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    worst = assert_same_run(out / "headless", out / "undisturbed", 8)
    print("head loss:", json.dumps({"driver exit": code, "seconds from loss to exit": round(lost_after, 1),
                                    "driver said": said, "checkpoints kept": kept, "largest differences": worst}))
