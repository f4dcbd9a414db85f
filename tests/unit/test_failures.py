"""A worker's failure on the driver's console, and which failures are not retried (issue 21,
item 2; training/failures.py). The whole path through Ray Train is in
tests/e2e/test_end_to_end.py."""

import errno
import pickle

import pytest
import ray.exceptions
import torch.distributed
from ray.train import ControllerError, WorkerGroupError

from longalign_rl.training.failures import (
    FailFast, RunFailed, WorkerFailure, describe, repeats, reported, transient,
)

CHECKPOINT_MESSAGE = ("torch.utils.checkpoint: Recomputed values for the following tensors have different metadata "
                      "than during the forward pass.\ntensor at position 13:\nsaved metadata: {...}")


def failure(rank=0, step=1, steps_done=0, transient=False, kind="CheckpointError", message="Recomputed values differ"):
    return WorkerFailure(kind, message, rank, step, steps_done, transient, f"/runs/r/errors/rank{rank}.txt")


def raised_in_worker(error, tmp_path, rank=0, step=None, steps_done=0) -> WorkerFailure:
    with pytest.raises(WorkerFailure) as info:
        with reported(tmp_path, rank) as attempt:
            attempt.step, attempt.steps_done = step, steps_done
            raise error
    return info.value


def test_a_workers_exception_is_kept_whole_and_raised_as_a_picklable_record(tmp_path):
    from torch.utils.checkpoint import CheckpointError

    def deep():
        raise CheckpointError(CHECKPOINT_MESSAGE + "x" * 5000)

    with pytest.raises(WorkerFailure) as info:
        with reported(tmp_path, 1) as attempt:
            attempt.step = 1
            deep()
    f = info.value
    assert (f.kind, f.rank, f.step, f.steps_done, f.transient) == ("CheckpointError", 1, 1, 0, False)
    assert f.message.startswith("torch.utils.checkpoint: Recomputed values") and "\n" not in f.message
    assert len(f.message) <= 400
    text = (tmp_path / "errors" / "rank1.txt").read_text()
    assert "rank 1 failed at step 1, 0 steps done" in text and "in deep" in text and "x" * 5000 in text
    again = pickle.loads(pickle.dumps(f))  # it crosses from the worker to the controller and the driver
    assert (again.kind, again.message, again.rank, again.step, again.traceback_file) == \
        (f.kind, f.message, 1, 1, str(tmp_path / "errors" / "rank1.txt"))
    # a second failure of the same rank (a retry) is appended
    raised_in_worker(ValueError("bad"), tmp_path, rank=1, step=5, steps_done=3)
    assert (tmp_path / "errors" / "rank1.txt").read_text().count("=== ") == 2


@pytest.mark.parametrize("error, expected", [
    (ValueError("shapes do not match"), False),
    (RuntimeError("CUDA out of memory"), False),
    (FileNotFoundError(errno.ENOENT, "no such file"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (ray.exceptions.ActorDiedError(), True),                       # a sampler actor (or its node) lost
    (ray.exceptions.GetTimeoutError(), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted"), True),
    (RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:29500"), True),
    (ConnectionResetError(), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),             # shared storage
])
def test_transient_means_a_lost_process_node_or_connection(error, expected):
    assert transient(error) is expected


def test_transient_looks_through_causes_and_into_ray_task_errors():
    try:
        try:
            raise ConnectionError("hub unreachable")
        except ConnectionError as e:
            raise ValueError("could not load the model") from e
    except ValueError as e:
        assert transient(e)
    # a sampler actor's own code raised: its cause decides, not the Ray wrapper
    task_error = ray.exceptions.RayTaskError("sample", "Traceback ...", ValueError("bad prompt"))
    assert not transient(task_error)
    assert transient(ray.exceptions.RayTaskError("sample", "Traceback ...", ConnectionError("x")))


def test_a_failure_before_the_first_step_repeats_and_one_after_progress_is_retried():
    assert "raised before rank 0 finished a step" in repeats({0: failure(steps_done=0)}, None)
    assert repeats({0: failure(step=7, steps_done=3)}, None) is None
    # the same error at the same step as the attempt before: it repeats
    assert "failed the same way at step 7" in repeats({0: failure(step=7, steps_done=3)}, [failure(step=7)])
    assert repeats({0: failure(step=7, steps_done=3)}, [failure(step=6)]) is None
    assert repeats({0: failure(step=7, steps_done=3)}, [failure(step=7, message="other")]) is None


def test_a_lost_process_or_connection_is_always_retried():
    # a worker process died (node lost, killed): not a WorkerFailure at all
    assert repeats({0: failure(steps_done=0), 1: ray.exceptions.ActorDiedError()}, None) is None
    # only transient failures (a peer's collective broke, a network error while starting)
    assert repeats({0: failure(steps_done=0, transient=True)}, None) is None
    # one rank's own error, the other's collective broken by it: the own error is judged
    assert repeats({0: failure(rank=0, transient=True), 1: failure(rank=1, steps_done=0)}, None) is not None


def test_fail_fast_raises_in_the_controller_only_for_a_repeating_failure():
    callback = FailFast()
    callback.after_exception(None, {0: failure(step=7, steps_done=3)})  # retried: returns
    with pytest.raises(RunFailed, match="failed the same way at step 7"):
        callback.after_exception(None, {0: failure(step=7, steps_done=2)})
    with pytest.raises(RunFailed) as info:
        FailFast().after_exception(None, {1: failure(rank=1, transient=True), 0: failure(rank=0)})
    assert info.value.failure.rank == 0  # the rank whose own code raised is the one shown
    pickle.loads(pickle.dumps(info.value))  # Ray sends it from the controller to the driver


def test_the_drivers_last_line_names_the_exception_its_message_and_the_traceback_file():
    f = failure(message="torch.utils.checkpoint: Recomputed values for the following tensors have different metadata")
    line = describe(ControllerError(RunFailed(f, "raised before rank 0 finished a step")), 3)
    assert line == ("the run failed, not retried (raised before rank 0 finished a step): CheckpointError: "
                    "torch.utils.checkpoint: Recomputed values for the following tensors have different metadata "
                    "(rank 0, step 1; full traceback in /runs/r/errors/rank0.txt)")
    retried = WorkerGroupError("[Rank 0 Error Snippet]: ... (Output truncated)", {0: failure(step=9, steps_done=4)})
    assert describe(retried, 3).startswith("the run failed after run.max_failures=3 retries: CheckpointError: ")
    died = WorkerGroupError("...", {1: ray.exceptions.ActorDiedError()})
    assert describe(died, 0).startswith("the run failed after run.max_failures=0 retries: ActorDiedError: ")
    try:
        try:
            raise KeyError("x")
        except KeyError as e:
            raise RuntimeError("validation: no sampler actor answered") from e
    except RuntimeError as e:
        assert describe(e, 1) == "the run failed: KeyError: 'x'"


def test_a_worker_whose_process_died_is_shown_before_the_peers_broken_collective():
    """Issue 22: a rank that died (a reward that killed its process) left its peer with gloo's
    'Connection closed by peer', which the console showed as the cause."""
    peer = failure(rank=0, transient=True, kind="RuntimeError", message="Connection closed by peer [127.0.0.1]:1234")
    died = ray.exceptions.ActorDiedError()
    line = describe(WorkerGroupError("...", {0: peer, 1: died}), 0)
    assert line.startswith("the run failed after run.max_failures=0 retries: ActorDiedError: "), line


def test_a_reward_that_calls_sys_exit_raises_an_error_naming_it():
    from longalign_rl.scoring import score
    from tests.plugins.my_reward import Crashing

    reward = Crashing("exit", after=0)
    with pytest.raises(RuntimeError, match=r"reward tests.plugins.my_reward.Crashing called sys.exit\(3\)"):
        score(reward, torch.rand(2, 3, 8, 8), ["a", "b"])


def test_a_worker_process_that_died_is_named_with_its_rank():
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("A worker health check failed.", ray.exceptions.ActorDiedError())
    peer = failure(rank=1, transient=True, kind="RuntimeError", message="Connection closed by peer")
    line = describe(WorkerGroupError("...", {1: peer, 0: died}), 1)
    assert line.startswith("the run failed after run.max_failures=1 retries: the process of rank 0 died "
                           "(ActorDiedError: The actor died unexpectedly"), line


def test_the_watchdog_ends_a_blocked_worker_and_the_driver_names_it(tmp_path):
    """train.step_timeout_s: a step that blocks (a reward that never returns) ends the
    worker's process, after writing where it was; the driver's last line names the key."""
    import subprocess
    import sys
    import textwrap

    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from longalign_rl.training.failures import Watchdog
        dog = Watchdog(Path({str(tmp_path)!r}), 1, 0.5)
        dog.arm(7)
        def a_reward_that_never_returns():
            time.sleep(60)
        a_reward_that_never_returns()
    """)
    done = subprocess.run([sys.executable, "-c", script], timeout=50)
    assert done.returncode == 3
    text = (tmp_path / "errors" / "rank1.txt").read_text()
    assert "train.step_timeout_s: step 7 took more than 0.5 s" in text and "a_reward_that_never_returns" in text
    died = WorkerHealthCheckFailedError("A worker health check failed.", ray.exceptions.ActorDiedError())
    line = describe(WorkerGroupError("...", {1: died}), 0, tmp_path)
    assert line == ("the run failed after run.max_failures=0 retries: rank 1 was ended by its watchdog: "
                    "train.step_timeout_s: step 7 took more than 0.5 s (a reward, hook or actor call that does not "
                    f"return?); where it was: {tmp_path / 'errors' / 'rank1.txt'}"), line
