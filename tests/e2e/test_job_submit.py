"""What a user does on a cluster, on one machine: `ray start --head`, then
`ray job submit --working-dir <repo> --runtime-env-json '{"py_modules": [plugin]}' --
python -m longalign_rl.train ...` with a third-party reward plugin that exists only in
the job's runtime environment.

The head runs as `ray start --head --block` in its own session, in its own temp dir, on
ports picked here, with random worker ports (tests/cluster.py, `ray_start_head`): it shares
nothing with another Ray instance on the machine, and the teardown kills only its processes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import textwrap
import time
import uuid

import pytest

from longalign_rl.outputs import read_metrics
from tests import LIGHT, REPO
from tests.cluster import ANSI, RAY, ray_start_head, tail

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


@pytest.fixture
def ray_head(tmp_path):
    """A real local Ray head on free ports, stopped (only it) at the end."""
    with ray_start_head(tmp_path, num_cpus=2) as head:
        yield head


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
