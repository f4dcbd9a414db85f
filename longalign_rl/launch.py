"""Joining Ray and running the trainer (train.py's last part): the cluster is reachable and
big enough for the run, the reward and sampler actors are started and probed where they run,
then `TorchTrainer.fit` with the body the algorithm's record names, until done or until a
signal asks the workers to checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

from longalign_rl.config import Config, ConfigError, to_dict
from longalign_rl.console import Progress
from longalign_rl.data import Pair
from longalign_rl.outputs import STOP_REQUEST
from longalign_rl.prompts import load_prompts
from longalign_rl.registry import algorithm_of

log = logging.getLogger("longalign_rl")


def required_resources(cfg: Config) -> dict[str, float]:
    """What the trainer workers (and stage 2's sampler actors) reserve, all together: the
    least an elastic run (train.min_workers) starts with."""
    t, s = cfg.train, cfg.sampler
    workers = t.min_workers or t.num_workers
    need = {"CPU": workers * t.cpus_per_worker, "GPU": float(workers if t.use_gpu else 0)}
    groups = [(workers, t.resources)]
    if cfg.stage == 2:
        r = cfg.reward
        need["CPU"] += s.num_actors * s.num_cpus + r.num_actors * r.num_cpus
        need["GPU"] += s.num_actors * s.num_gpus + r.num_actors * r.num_gpus
        groups += [(s.num_actors, s.resources), (r.num_actors, r.resources)]
    for count, resources in groups:  # custom resources (train/sampler/reward.resources)
        for name, amount in resources.items():
            need[name] = need.get(name, 0.0) + count * float(amount)
    return need


def resource_shortfall(cfg: Config, total: dict[str, float]) -> str | None:
    """A message naming the keys, if the cluster's `total` resources cannot hold the run."""
    need = required_resources(cfg)
    short = [f"{need[r]:g} {r}s (has {total.get(r, 0.0):g})" for r in ("CPU", "GPU") if need[r] > total.get(r, 0.0) + 1e-9]
    custom = [f"{amount:g} {name!r} (has {total.get(name, 0.0):g})" for name, amount in need.items()
              if name not in ("CPU", "GPU") and amount > total.get(name, 0.0) + 1e-9]
    if not short and not custom:
        return None
    if not short:
        return (f"the run needs the custom resources {', '.join(custom)}: train.resources, sampler.resources and "
                "reward.resources ask for them per worker / actor, and no node of the cluster declares enough")
    return (f"the run needs {' and '.join(short)}: train.num_workers x train.cpus_per_worker (use_gpu: 1 GPU each)"
            + (" + sampler.num_actors x sampler.num_cpus / num_gpus" if cfg.stage == 2 else "")
            + (" + reward.num_actors x reward.num_cpus / num_gpus" if cfg.stage == 2 and cfg.reward.num_actors else ""))


def connect(cfg: Config) -> str:
    """Start or join Ray, and check that the run fits: on a local instance a run that can never
    be placed is an error (Ray Train would retry forever); on a cluster the autoscaler may
    still add nodes, so it is a warning. Returns a line for the header: where Ray runs and
    its dashboard. The workers' output reaches this console only with run.verbose."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    dashboard = None
    if not ray.is_initialized():
        if address:
            check_reachable(address, cfg.run.connect_timeout_s)
        # the dashboard's Train view (Ray Train's run and worker states) needs this switch
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
        context = ray.init(address=address, log_to_driver=cfg.run.verbose,
                           logging_level=logging.INFO if cfg.run.verbose else logging.ERROR)
        dashboard = getattr(context, "dashboard_url", None)
    if not address:
        # A local instance is one node that no autoscaler drains: Ray Train's preemption watcher
        # (one more actor process per run, polling for drained nodes) has nothing to watch there.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    shortfall = resource_shortfall(cfg, ray.cluster_resources())
    if shortfall and not address:
        raise ConfigError(f"resources: {shortfall}; this local Ray instance can never place it")
    if shortfall:
        log.warning("resources: %s; waiting for the autoscaler to add nodes", shortfall)
    where = f"joined the cluster at {address}" if address else "a local instance"
    return where + (f", dashboard http://{dashboard}" if dashboard else "")


def probe_storage(folder: str, name: str, token: str) -> str | None:
    """On a node: None if it sees the driver's probe file `folder/name` holding `token` and can
    write beside it, else what is wrong."""
    import tempfile

    probe = Path(folder) / name
    try:
        if probe.read_text() != token:
            return f"sees another {probe} than the driver's"
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe"):
            pass
    except FileNotFoundError:
        return f"cannot see {folder} as the driver does"
    except OSError as e:
        return f"cannot write to {folder} ({e.strerror or e})"
    return None


def check_shared_storage(run_dir: Path, probe=probe_storage, timeout_s: float = 120.0) -> None:
    """Every node of a multi-node cluster sees the folder the driver writes runs into (the run
    directory, or its parent before it exists) and can write there: the workers persist
    checkpoints and the actors read config.yaml from it. The driver writes a probe file and a
    zero-CPU task pinned to each alive node reads it back; ConfigError, one line naming the
    first node that cannot. Nodes the autoscaler adds later are checked by the workers
    themselves (worker.require_run_dir). One node: nothing to check."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    folder = run_dir if run_dir.is_dir() else run_dir.parent
    name, token = f".storage_probe_{secrets.token_hex(4)}", secrets.token_hex(16)
    (folder / name).write_text(token)
    task = ray.remote(num_cpus=0, max_retries=0)(probe)
    try:
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(folder), name, token) for n in nodes]
        try:
            answers = ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError(f"run.output_dir: not every node answered the storage check within {timeout_s:g} s") from None
    finally:
        (folder / name).unlink(missing_ok=True)
    for node, problem in zip(nodes, answers):
        if problem:
            raise ConfigError(f"run.output_dir: node {node['NodeID'][:8]} ({node['NodeManagerAddress']}) {problem}: "
                              "on a multi-node cluster runs must go to storage every node mounts at the same path "
                              "(cluster/README.md)")


def check_reachable(address: str, timeout_s: float) -> None:
    """ConfigError unless something answers at RAY_ADDRESS's host and port within
    `timeout_s` (run.connect_timeout_s): ray.init retries a cluster that is not there for
    ever. 'auto' and 'local' are Ray's to resolve."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.hostname is None or parts.port is None:
        raise ConfigError(f"RAY_ADDRESS={address!r}: expected host:port (or ray://host:port, or auto)")
    deadline, error = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            error = e
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there within run.connect_timeout_s="
                      f"{timeout_s:g} s ({error.strerror if isinstance(error, OSError) and error.strerror else error}); "
                      "start the cluster (ray start --head), or unset RAY_ADDRESS to run on a local instance")


def start_reward_actors(cfg: Config, run_dir: Path | None = None):
    """The run's reward actors (reward.num_actors > 0), with the reward built and probed in
    each (ConfigError if it cannot be); None without them. Their warnings go to
    `run_dir`/warnings.log once it exists."""
    if cfg.stage != 2 or not cfg.reward.num_actors:
        return None
    from longalign_rl.reward_actors import RewardPool

    pool = RewardPool(cfg, run_dir)
    pool.check(load_prompts(cfg.prompts.source)[:2])  # shut down if it fails
    log.info("reward %r: %d reward actors ready", cfg.reward.name, cfg.reward.num_actors)
    return pool


def start_sampler_actors(cfg: Config, run_dir: Path):
    """Stage 2's sampler actors, each built where it runs and waited for (ConfigError with
    the actor's own exception if one cannot be); None in stage 1."""
    if cfg.stage != 2:
        return None
    from longalign_rl.sampling.group import SamplerGroup

    group = SamplerGroup(cfg, run_dir)
    group.check()  # shut down if it fails
    return group


def shutdown(*pools) -> None:
    """The actor pools a driver started (reward, sampler), when the run will not start."""
    for pool in pools:
        if pool is not None:
            pool.shutdown()


def fit(trainer):
    """trainer.fit() in a helper thread, so that the main thread keeps our signal handlers
    (stop_on_signal) instead of Ray Train's, which abort the run without a checkpoint."""
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="trainer-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: signals are handled between them
    if "error" in box:
        raise box["error"]
    return box["result"]


def run(cfg: Config, run_dir: Path, pairs: list[Pair] | None = None, rewards=None, trackers: list | None = None,
        samplers=None):
    """Start (or join) Ray and the trainer workers (stage 2: and the sampler and reward
    actors, unless `samplers` and `rewards` hold them already); block until done. `pairs`:
    check_inputs' result, so a stage-1 manifest is not read twice."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from longalign_rl.training import checkpoint
    from longalign_rl.training.failures import FailFast
    from longalign_rl.training.worker import train_func

    if not ray.is_initialized():
        connect(cfg)

    start_step = max((checkpoint.step_of(p) or 0 for p in checkpoint.on_disk(run_dir)), default=0)
    t = cfg.train
    workers = (t.min_workers, t.num_workers) if t.min_workers else t.num_workers  # a range: elastic
    common = dict(
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={**t.resources, "CPU": t.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[FailFast()],  # a failure that would only happen again is not retried
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
        ),
    )
    if cfg.stage == 1:
        from longalign_rl.training import denoising

        trainer = TorchTrainer(
            train_func,
            train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "body": denoising.BODY,
                               "data": denoising.source_spec(cfg.data, pairs)},
            **common,
        )
        with Progress(run_dir, cfg, start_step, trackers=trackers):
            return fit(trainer)

    from longalign_rl.sampling.group import SamplerGroup

    if rewards is None:
        rewards = start_reward_actors(cfg, run_dir)
    if samplers is None:
        samplers = SamplerGroup(cfg, run_dir)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": to_dict(cfg), "samplers": samplers, "rewards": rewards, "run_dir": str(run_dir),
                           "body": algorithm_of(cfg).body},
        **common,
    )
    try:
        with Progress(run_dir, cfg, start_step, trackers=trackers):
            return fit(trainer)
    finally:
        samplers.shutdown()
        if rewards is not None:
            rewards.shutdown()


@contextlib.contextmanager
def stop_on_signal(run_dir: Path):
    """The first SIGINT/SIGTERM asks the workers to checkpoint after the current step and stop
    (they look for run_dir/stop_requested); a second one stops at once. A request left by an
    earlier interrupted run is cleared first."""
    (run_dir / STOP_REQUEST).unlink(missing_ok=True)
    signals = [signal.SIGINT, signal.SIGTERM]
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        request = run_dir / STOP_REQUEST
        if request.exists():
            print("second interrupt: stopping now, without a checkpoint of the current step", flush=True)
            raise KeyboardInterrupt
        request.touch()
        print(f"{signal.Signals(signum).name}: finishing the current step, checkpointing it and stopping "
              "(interrupt again to stop at once)", flush=True)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in signals:
            signal.signal(s, previous[s])
        (run_dir / STOP_REQUEST).unlink(missing_ok=True)
