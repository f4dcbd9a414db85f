"""What a user does on a cluster, on one machine: `ray start --head`, then
`ray job submit --working-dir <repo> --runtime-env-json '{"py_modules": [plugin]}' --
python -m longalign_rl.train ...` with a third-party reward plugin that exists only in
the job's runtime environment.

The head runs as `ray start --head --block` in its own session, in its own temp dir, on
ports picked here, with random worker ports: it shares nothing with another Ray instance
on the machine (another test's `ray.init`, another user's cluster), and the teardown
kills only this head's processes (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from longalign_rl.outputs import read_metrics
from tests import LIGHT, REPO

BIN = Path(sys.executable).parent  # the venv's bin (not resolved: that would leave the venv)
RAY = BIN / "ray"
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 600

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

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (all held open together while picked)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def tail(text: str, n: int = 12000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port>, the job submission address
    gcs_port: int
    env: dict  # the environment for `ray` commands that talk to this head
    log: Path  # output of `ray start`

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout)


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop this head and only it: SIGTERM to `ray start --block` (its handler stops the GCS,
    raylet, dashboard, ...; those kill their workers), then SIGKILL whatever of the
    processes it had started is still alive. Workers run in their own process groups, so
    the set is the process tree recorded just before, not a process group."""
    import psutil  # a dependency of ray

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head(tmp_path):
    """A real local Ray head on free ports, stopped (only it) at the end."""
    # Socket paths under the temp dir must stay below ~107 bytes: pytest's tmp_path is too
    # deep for `<temp>/session_<date>_<pid>/sockets/plasma_store`, so a short dir in /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray")
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the job must get its address from Ray, not from us
    env.pop("PYTHONPATH", None)  # the plugin must come from the job's runtime_env only
    env.update(
        RAY_AUTH_MODE="disabled",  # Ray 2.60 token auth is on by default; a local test cluster goes without
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops at once (the default drains for 30 s)
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # as in an activated venv: the job's `python`
    )
    log = tmp_path / "ray_start.log"
    cmd = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
        f"--temp-dir={temp_dir}", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        "--min-worker-port=0", "--max-worker-port=0",  # 0: the OS picks each worker's port
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "block forever" not in log.read_text():  # printed once every process is up
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up (exit {proc.poll()}):\n{tail(log.read_text())}")
            time.sleep(0.5)
        # The dashboard retries other ports when its port is taken: use the one it reports.
        found = re.search(r"RAY_API_SERVER_ADDRESS='http://127\.0\.0\.1:(\d+)'", ANSI.sub("", log.read_text()))
        assert found, f"no dashboard address in the output of `ray start`:\n{tail(log.read_text())}"
        url = f"http://127.0.0.1:{found.group(1)}"
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard at {url} does not answer:\n{tail(log.read_text())}")
            time.sleep(0.5)
        yield Head(dashboard=url, gcs_port=gcs, env=env, log=log)
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def plugin_package(tmp_path):
    """`myplugin` (a package with a reward) in a directory that nothing puts on a path."""
    pkg = tmp_path / "plugin_src" / "myplugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A third-party reward plugin, shipped with the job."""\n')
    (pkg / "rewards.py").write_text(textwrap.dedent(PLUGIN_REWARDS))
    assert importlib.util.find_spec("myplugin") is None, "myplugin must not be importable outside the job"
    return pkg


def test_ray_job_submit_runs_a_plugin_reward_on_a_started_cluster(ray_head, plugin_package, tmp_path):
    out = tmp_path / "runs"
    job_id = f"longalign-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {
        "py_modules": [str(plugin_package)],
        "env_vars": {"MYPLUGIN_COMPONENT": "red", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        # Ray 2.60 already leaves out .git, .venv and what .gitignore lists (the upload is ~0.3 MB,
        # the limit 512 MiB); said here so that neither a Ray default nor .gitignore is relied on.
        "excludes": [".git", ".venv", "runs", ".pytest_cache", "*.egg-info", "__pycache__"],
    }
    cmd = [
        str(RAY), "job", "submit", "--address", ray_head.dashboard, "--submission-id", job_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "-m", "longalign_rl.train", "train.steps=2", "run.checkpoint_every=2",
        f"run.output_dir={out}", "run.name=job", "reward.name=myplugin.rewards:Redness",
        *LIGHT,
    ]
    start = time.monotonic()
    try:
        submit = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                                cwd=tmp_path)
        output, code = submit.stdout + submit.stderr, submit.returncode
    except subprocess.TimeoutExpired as e:
        ray_head.ray("job", "stop", "--address", ray_head.dashboard, job_id)
        output, code = f"{e.stdout or ''}{e.stderr or ''}\n(`ray job submit` timed out after {JOB_TIMEOUT_S} s)", None
    output = ANSI.sub("", output if isinstance(output, str) else output.decode(errors="replace"))
    elapsed = time.monotonic() - start
    (tmp_path / "ray_job_submit.log").write_text(output)

    def diagnosis() -> str:
        status = ray_head.ray("job", "status", "--address", ray_head.dashboard, job_id)
        logs = ray_head.ray("job", "logs", "--address", ray_head.dashboard, job_id)
        return (f"`ray job submit` exit {code} after {elapsed:.0f} s\n--- its output:\n{tail(output)}\n"
                f"--- ray job status:\n{status.stdout}{status.stderr}\n"
                f"--- ray job logs:\n{tail(logs.stdout + logs.stderr)}\n"
                f"--- ray start:\n{tail(ray_head.log.read_text(), 3000)}")

    assert code == 0 and f"Job '{job_id}' succeeded" in output, diagnosis()

    # The job's driver joined this cluster through the RAY_ADDRESS that Ray's job supervisor
    # sets (the head's GCS address, host:port), and did not start a Ray of its own.
    joined = re.search(r"^ray +joined the cluster at ([^\s,]+)", output, re.M)
    assert joined and joined.group(1).endswith(f":{ray_head.gcs_port}"), diagnosis()
    assert "started a local instance" not in output, diagnosis()

    run_dir = out / "job"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2], diagnosis()
    assert all("red" in m and 0.0 <= m["red"] <= 1.0 for m in metrics), metrics[0].keys()  # the plugin's component
    checkpoints = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1, checkpoints
    assert json.loads((checkpoints[0] / "state.json").read_text())["step"] == 2
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
