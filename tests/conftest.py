"""Fixtures shared by both tiers: tiny model parts, a third-party plugin package, and a
local Ray instance that leaves the process as it found it (environment, sys.path, the
reward registry)."""

import os
import sys
import textwrap

import pytest

from tests import REPO

# Ray Train's controller looks at its workers every 2 s, and each of a run's state changes
# (scheduling, running, finished) waits for that look: 0.5 s saves 3-4 s per run (52.5 vs
# 48.4 s for a 2-step default run), over 20 runs in the e2e tier. Every Ray instance the tests
# start, in this process or a subprocess, inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Two pytest-xdist workers share 2 cores: each computes on one thread. With torch's default (a
# thread per core in each) they fought over the cores: the unit tier took 2:02 and 224 s of CPU,
# on one thread each 1:20 and 145 s (2 idle cores, 965 tests). Ray's processes get one thread
# per CPU they reserve whatever this says (run with 0.5 CPU each: one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # already imported by a plugin: its pool exists
        sys.modules["torch"].set_num_threads(1)

# A third-party package: two rewards, one of them declared as an entry point.
PLUGIN = '''
import torch
from longalign_rl.registry import Reward, RewardOutput


class Redness(Reward):
    """Mean red minus mean green: differentiable and prompt-blind."""

    differentiable = True

    def forward(self, images, prompts):
        total = images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))
        return RewardOutput(total=total, components={"red": images[:, 0].mean(dim=(1, 2)).detach()})


class Darkness(Reward):
    differentiable = True

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, images, prompts):
        total = self.weight * (1 - images.mean(dim=(1, 2, 3)))
        return RewardOutput(total=total, components={})
'''


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist (pyproject.toml: two workers) runs every e2e test in one worker, one module
    after another, since each module starts a Ray instance on the machine's cores and two at once
    would only fight over them; the unit tests go to the other worker beside it. (A scheduler
    rather than xdist_group marks: pytest-xdist 3.8's loadgroup cannot rename pytest 9's node ids.)"""
    from xdist.scheduler import LoadScopeScheduling

    class E2EInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "e2e" if nodeid.startswith("tests/e2e/") else nodeid

    return E2EInOneWorker(config, log)


@pytest.fixture(scope="module")
def tiny_parts():
    """The "tiny" architecture's random-initialised parts (the same weights every time)."""
    from longalign_rl.models import load_components

    return load_components("tiny")


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory):
    """A third-party package `thirdparty_rewards` (not on sys.path until `ray_local`), with
    its reward "redness" declared in the entry-point group longalign_rl.rewards."""
    root = tmp_path_factory.mktemp("site")
    (root / "thirdparty_rewards.py").write_text(textwrap.dedent(PLUGIN))
    dist = root / "thirdparty_rewards-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-rewards\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[longalign_rl.rewards]\nredness = thirdparty_rewards:Redness\n")
    return root


@pytest.fixture(scope="session")
def ray_local(plugin_dir):
    """One local Ray instance (2 CPUs, no dashboard, no auth) for the whole session (starting
    and stopping one costs ~12 s: it used to be one per test module), whose workers see this
    checkout and the plugin package, as `runtime_env` would give them on a cluster.
    Afterwards the environment, sys.path and the registries are as before. A process that a
    test starts (`python -m longalign_rl.train`, `ray start`) starts its own: `ray.init()`
    joins only an instance named by RAY_ADDRESS or started by `ray start`."""
    import ray

    from longalign_rl import registry

    saved_env, saved_path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(plugin_dir))
    registry._reset()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugin_dir), str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.path[:] = saved_path
        sys.modules.pop("thirdparty_rewards", None)
        registry._reset()
