"""Ctrl-C on the driver (issue 10, item 4): the run finishes its step, checkpoints it, says how
to continue and exits 130; --resume continues from that step with no metric row lost or
doubled. The run is a real `python -m longalign_rl.train` process with its own Ray."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import REPO

pytestmark = pytest.mark.filterwarnings("ignore")


def rows(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sigint_checkpoints_the_current_step_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "int"
    args = [sys.executable, "-m", "longalign_rl.train", "train.steps=60", "run.checkpoint_every=100",
            f"run.output_dir={tmp_path}", "run.name=int"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while len(rows(run_dir)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert len(rows(run_dir)) >= 2, "the run did not reach step 2"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT: finishing the current step" in out and f"--resume {run_dir}" in out
    stopped = json.loads((run_dir / "stopped.json").read_text())
    done = len(rows(run_dir))
    assert stopped["cause"] == "interrupt" and stopped["step"] == stopped["last_checkpoint"] == done < 60
    assert not (run_dir / "stop_requested").exists()

    resumed = subprocess.run([sys.executable, "-m", "longalign_rl.train", "--resume", str(run_dir),
                              f"train.steps={done + 1}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [m["step"] for m in rows(run_dir)] == list(range(1, done + 2))
    assert not (run_dir / "stopped.json").exists() and (run_dir / "lora").is_dir()


def test_a_killed_driver_resumes_with_nothing_lost_or_doubled(tmp_path):
    """SIGKILL the driver and its local Ray (its process group) after the step-2 checkpoint,
    mid-step: --resume continues from that checkpoint; metrics rows after it are redone,
    not doubled."""
    run_dir = tmp_path / "k"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "longalign_rl.train", "train.steps=60", "run.checkpoint_every=2",
                             f"run.output_dir={tmp_path}", "run.name=k"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(rows(run_dir)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert len(rows(run_dir)) >= 3, "the run did not reach step 3"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    logged = len(rows(run_dir))
    resumed = subprocess.run([sys.executable, "-m", "longalign_rl.train", "--resume", str(run_dir),
                              f"train.steps={logged + 2}"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [m["step"] for m in rows(run_dir)] == list(range(1, logged + 3))
