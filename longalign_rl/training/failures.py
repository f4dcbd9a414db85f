"""When a worker fails: its whole traceback kept, the cause on the driver's console, and no
retries of a failure that would only happen again.

Ray Train restarts the worker group from the last checkpoint up to run.max_failures times,
which heals the loss of a node or a process. It also retried an exception of the run's own
code, at a full restart each (minutes for SD v1.5), and then printed a wrapper whose text it
had cut before the cause. Here:

- `reported(run_dir, rank)` wraps a worker's life. An exception is written, with its whole
  traceback, to run_dir/errors/rank<r>.txt, and raised again as a `WorkerFailure`: a small
  picklable record of what it was (type, first line), where (rank, step), whether the
  worker had finished a step since it started, and whether it looks `transient`.
- `FailFast`, a Ray Train callback in the controller, ends the run at once when a failure
  will happen again on every retry (`repeats`).
- `describe(error)`, on the driver, turns what `fit()` raised into the lines it prints.

How a failure that will happen again is told apart from one that may not: a retry restarts
every worker from the same checkpoint with the same RNG state, prompt position and data
epoch, so it re-runs exactly what it ran before. An exception of the run's own code (not a
lost process, node or connection: `transient`) raised before the worker finished its first
step of an attempt is met again at the same point. So is one raised again at the same step
with the same message as in the attempt before. Everything else (a dead actor or node, a
collective broken by a lost peer, a network or I/O error, an error after some progress) is
retried as before.
"""

from __future__ import annotations

import contextlib
import errno
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import ray.exceptions
import torch.distributed
from ray.train import UserCallback

from longalign_rl.console import actor_cause

ERRORS = "errors"  # run_dir/errors/rank<r>.txt: every failure of that rank, with its traceback

# OSErrors that a retry may not meet again: I/O and network trouble rather than a missing
# file, a wrong permission or a full disk.
TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN}
# Libraries whose errors are network errors (model hub downloads).
NETWORK_MODULES = ("requests.", "urllib3.", "huggingface_hub.", "httpx.")
# What a collective says when a peer process is gone (gloo raises plain RuntimeErrors).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def chain(error: BaseException):
    """`error`, its causes, and the user exception inside a Ray task error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
            error = error.cause
        else:  # `raise ... from None` hides the context on purpose: so does this
            error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def transient(error: BaseException) -> bool:
    """Whether `error` (or anything in its chain) is the loss of a process, node or
    connection, which a retry may not meet again, rather than the outcome of the run's own
    code on the same inputs."""
    for e in chain(error):
        if isinstance(e, ray.exceptions.RayError) and not isinstance(e, ray.exceptions.RayTaskError):
            return True  # an actor, object, node or worker lost; a timeout
        if isinstance(e, torch.distributed.DistError) or any(s in str(e) for s in PEER_LOST):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith(NETWORK_MODULES):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def first_line(error: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (a Ray task error: its cause's)."""
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(error: BaseException) -> str:
    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    return type(error).__name__


class WorkerFailure(RuntimeError):
    """What a worker's exception was, as the controller and the driver need it (picklable:
    its fields are its args)."""

    def __init__(self, kind: str, message: str, rank: int, step: int | None, steps_done: int, transient: bool,
                 traceback_file: str | None):
        super().__init__(kind, message, rank, step, steps_done, transient, traceback_file)
        self.kind, self.message, self.rank, self.step = kind, message, rank, step
        self.steps_done, self.transient, self.traceback_file = steps_done, transient, traceback_file

    @property
    def where(self) -> str:
        return f"rank {self.rank}, " + (f"step {self.step}" if self.step is not None else "while starting")

    def __str__(self) -> str:
        return f"{self.kind}: {self.message} ({self.where})"


@dataclass
class Attempt:
    """One start of a worker: the first, or a retry from the last checkpoint."""

    step: int | None = None  # the step being worked on (1-based); None while setting up
    steps_done: int = 0      # steps finished since this start
    watchdog: "Watchdog | None" = None  # stopped however the worker's life ends


def write_traceback(run_dir: Path, rank: int, attempt: Attempt, error: BaseException) -> Path | None:
    """Append the failure, with its whole traceback, to run_dir/errors/rank<r>.txt."""
    path = run_dir / ERRORS / f"rank{rank}.txt"
    where = f"step {attempt.step}" if attempt.step is not None else "while starting"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: rank {rank} failed at {where}, "
                    f"{attempt.steps_done} steps done since it started ===\n")
            f.write("".join(traceback.format_exception(error)) + "\n")
    except OSError:  # a run directory this node cannot write: Ray's worker log has the traceback
        return None
    return path


@contextlib.contextmanager
def reported(run_dir: Path, rank: int):
    """Around a worker's life: yields its Attempt (the caller keeps its step and steps_done
    current); an exception is kept in run_dir/errors/ and raised again as a WorkerFailure."""
    attempt = Attempt()
    try:
        yield attempt
    except Exception as e:
        path = write_traceback(run_dir, rank, attempt, e)
        raise WorkerFailure(kind(e), first_line(e), rank, attempt.step, attempt.steps_done, transient(e),
                            str(path) if path else None) from e
    finally:
        if attempt.watchdog is not None:
            attempt.watchdog.disarm()


WATCHDOG = "train.step_timeout_s"  # how an entry of errors/rank<r>.txt written by Watchdog starts its message


class Watchdog:
    """Ends this worker's process when one step takes longer than `seconds`
    (train.step_timeout_s). A reward or metric hook that never returns cannot be
    interrupted from Python, and the other workers would wait for this one in the next
    collective, for as long as gloo or NCCL lets them. Before it ends the process it
    appends to run_dir/errors/rank<r>.txt where the worker was blocked (the main thread's
    stack); the driver's last line names the key and that file (`describe`)."""

    def __init__(self, run_dir: Path, rank: int, seconds: float):
        self.run_dir, self.rank, self.seconds = run_dir, rank, seconds
        self.timer = None

    def arm(self, step: int) -> None:
        """Start the clock of `step` (and stop the previous step's)."""
        import threading

        self.disarm()
        self.timer = threading.Timer(self.seconds, self._expire, args=(step, threading.main_thread().ident))
        self.timer.daemon = True
        self.timer.start()

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self, step: int, thread_id: int) -> None:
        import os
        import sys

        frame = sys._current_frames().get(thread_id)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
        path = self.run_dir / ERRORS / f"rank{self.rank}.txt"
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: rank {self.rank} ended by its watchdog at step "
                        f"{step} ===\n{WATCHDOG}: step {step} took more than {self.seconds:g} s (a reward, hook or "
                        f"actor call that does not return?)\nwhere the worker was:\n{stack}\n")
        os._exit(3)


def watchdog_note(run_dir: Path | None, rank: int | None) -> str | None:
    """The watchdog's message, when the last entry of errors/rank<rank>.txt is its."""
    if run_dir is None or rank is None:
        return None
    path = Path(run_dir) / ERRORS / f"rank{rank}.txt"
    try:
        last = path.read_text().rsplit("=== ", 1)[-1]
    except OSError:
        return None
    lines = last.splitlines()
    return f"{lines[1]}; where it was: {path}" if len(lines) > 1 and lines[1].startswith(WATCHDOG) else None


def repeats(failures: dict[int, BaseException], previous: list[WorkerFailure] | None) -> str | None:
    """Why the failures of one attempt (rank -> exception) will happen again on a retry, or
    None when a retry may help. Only WorkerFailures are judged: anything else means a
    process died (a lost node, a crash), which a retry on other processes may not meet."""
    if not failures or not all(isinstance(f, WorkerFailure) for f in failures.values()):
        return None
    # A rank whose collective broke because another one raised is transient: not judged.
    own = [f for f in failures.values() if not f.transient]
    for f in own:
        if f.steps_done == 0:
            return (f"raised before rank {f.rank} finished a step; a retry from the same checkpoint would repeat the "
                    "same computation")
    before = {(f.kind, f.message, f.step) for f in previous or []}
    for f in own:
        if (f.kind, f.message, f.step) in before:
            return f"the attempt before failed the same way at step {f.step}"
    return None


class RunFailed(RuntimeError):
    """Raised by FailFast: the run ends at once (Ray Train does not retry an error raised by a
    callback). Picklable through its args."""

    def __init__(self, failure: WorkerFailure, reason: str):
        super().__init__(failure, reason)
        self.failure, self.reason = failure, reason

    def __str__(self) -> str:
        return f"{self.failure} - not retried: {self.reason}"


class FailFast(UserCallback):
    """A Ray Train callback (it runs in the run's controller): stops a run whose worker
    failure `repeats`, instead of restarting it run.max_failures times to meet the same error."""

    def __init__(self):
        self.previous: list[WorkerFailure] | None = None

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        reason = repeats(worker_exceptions, self.previous)
        self.previous = [f for f in worker_exceptions.values() if isinstance(f, WorkerFailure)]
        if reason:
            raise RunFailed(main_failure(worker_exceptions), reason)


def main_failure(failures: dict[int, BaseException]) -> WorkerFailure | BaseException:
    """The failure to show, lowest rank first: an error of the run's own code; else a worker
    whose process died (its peers' collectives then break: 'Connection closed by peer' is
    the consequence, not the cause); else any."""
    ranked = sorted(failures.items())
    for wanted in (lambda f: isinstance(f, WorkerFailure) and not f.transient,
                   lambda f: not isinstance(f, WorkerFailure), lambda f: True):
        for _, f in ranked:
            if wanted(f):
                return f
    raise ValueError("no failures")


def describe(error: BaseException, max_failures: int, run_dir: Path | None = None) -> str:
    """What `fit()` raised, as the driver's last line: whether it was retried, and the cause
    (the exception, its message, where, and the file with its whole traceback)."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, ControllerError) and isinstance(error.controller_failure, RunFailed):
        failed: RunFailed = error.controller_failure
        return f"the run failed, not retried ({failed.reason}): {cause_line(failed.failure)}"
    if isinstance(error, WorkerGroupError) and error.worker_failures:
        shown = main_failure(error.worker_failures)
        rank = next(r for r, f in error.worker_failures.items() if f is shown)
        return f"the run failed after run.max_failures={max_failures} retries: {cause_line(shown, rank, run_dir)}"
    innermost = list(chain(error))[-1]
    return f"the run failed: {kind(innermost)}: {first_line(innermost)}"


def cause_line(failure: BaseException, rank: int | None = None, run_dir: Path | None = None) -> str:
    if not isinstance(failure, WorkerFailure):
        died = getattr(failure, "health_check_failure", None)  # Ray Train: the worker's process is gone
        note = watchdog_note(run_dir, rank) if died is not None else None
        if note:
            return f"rank {rank} was ended by its watchdog: {note}"
        if died is not None:
            return (f"the process of rank {rank} died ({actor_cause(died)}): a crash in native code, an out-of-memory "
                    "kill or os._exit in the run's code (a reward, a hook); its Ray worker log has the rest")
        return f"{kind(failure)}: {first_line(failure)}"
    where = (f"full traceback in {failure.traceback_file}" if failure.traceback_file
             else "full traceback in the worker's log (Ray dashboard, Jobs / Actors)")
    return f"{failure.kind}: {failure.message} ({failure.where}; {where})"
