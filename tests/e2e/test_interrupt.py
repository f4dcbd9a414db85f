"""Ctrl-C on the driver (issue 10, item 4): the run finishes its step, checkpoints it, says how
to continue and exits 130; --resume continues from that step with no metric row lost or
doubled; and so after a SIGKILL of the driver (slow). The interrupted runs are real
`python -m longalign_rl.train` processes with their own Ray; the last resume runs in this
process, on the session's Ray (conftest.ray_local)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from longalign_rl import train
from longalign_rl.outputs import read_metrics
from tests import LIGHT, REPO

pytestmark = pytest.mark.filterwarnings("ignore")


def rows(run_dir):
    return read_metrics(run_dir)  # the other process may be writing its last line: left out


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start(*args, stdout=subprocess.PIPE):
    """`python -m longalign_rl.train` in its own process group (its local Ray with it)."""
    return subprocess.Popen([sys.executable, "-m", "longalign_rl.train", *args], cwd=REPO, env=ENV, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(run_dir, proc, n):
    deadline = time.time() + 300
    while len(rows(run_dir)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(rows(run_dir)) >= n, f"the run did not reach step {n} (exit code {proc.poll()})"


def interrupted_at_step_2(tmp_path) -> tuple:
    """Ctrl-C after step 2, with no checkpoint due before step 100: the run finishes its step,
    checkpoints it, says how to continue and exits 130. Returns (run_dir, steps done)."""
    run_dir = tmp_path / "int"
    proc = start("train.steps=60", "run.checkpoint_every=100", *LIGHT, f"run.output_dir={tmp_path}", "run.name=int")
    try:
        wait_for(run_dir, proc, 2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT: finishing the current step" in out and f"--resume {run_dir}" in out
    stopped = json.loads((run_dir / "stopped.json").read_text())
    done = len(rows(run_dir))
    assert stopped["cause"] == "interrupt" and stopped["step"] == stopped["last_checkpoint"] == done < 60
    assert not (run_dir / "stop_requested").exists()
    return run_dir, done


def test_sigint_checkpoints_the_step_and_the_resume_loses_nothing(ray_local, tmp_path, capsys):
    """Ctrl-C (`interrupted_at_step_2`), then --resume: it continues from the step the
    interrupt checkpointed, with no metrics row lost or doubled. The default config at
    tests.LIGHT's sizes."""
    run_dir, done = interrupted_at_step_2(tmp_path)
    assert train.main(["--resume", str(run_dir), f"train.steps={done + 2}"]) == 0, capsys.readouterr().err[-3000:]
    assert [m["step"] for m in rows(run_dir)] == list(range(1, done + 3))
    assert not (run_dir / "stopped.json").exists() and (run_dir / "lora").is_dir()


@pytest.mark.slow  # three drivers; the default tier has the Ctrl-C and resume above, and a lost head in test_cluster.py
def test_a_driver_killed_mid_step_loses_nothing_on_resume(ray_local, tmp_path, capsys):
    """One run, interrupted twice (one cold start instead of two: each costs about a minute).
    1. Ctrl-C after step 2 (`interrupted_at_step_2`).
    2. --resume with a checkpoint every 2 steps; SIGKILL to the driver and its local Ray
       (its process group) mid-step, after the checkpoint of step 4.
    3. --resume again: it continues from the last checkpoint; the metrics rows written after
       it are redone, not doubled, and none is lost.
    The default config at tests.LIGHT's sizes."""
    run_dir, done = interrupted_at_step_2(tmp_path)
    proc = start("--resume", str(run_dir), "run.checkpoint_every=2", stdout=subprocess.DEVNULL)
    try:
        wait_for(run_dir, proc, done + 3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    logged = len(rows(run_dir))
    assert [m["step"] for m in rows(run_dir)] == list(range(1, logged + 1))

    assert train.main(["--resume", str(run_dir), f"train.steps={logged + 2}"]) == 0, capsys.readouterr().err[-3000:]
    assert [m["step"] for m in rows(run_dir)] == list(range(1, logged + 3))
    assert not (run_dir / "stopped.json").exists() and (run_dir / "lora").is_dir()
