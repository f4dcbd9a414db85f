"""A multi-node Ray cluster on one machine, for the tests of issue 24: Ray's own
`ray.cluster_utils.Cluster` (one raylet per node, each with its own worker processes),
run in a helper process so that the test process keeps its own Ray instance.

    with LocalCluster(tmp_path, {"a": NodeSpec(1, {"trainer_gpu": 1})}) as cluster:
        subprocess.run([... "-m", "longalign_rl.train", ...], env=cluster.env)  # a driver on it
        cluster.kill("a")      # the raylet of node "a" and everything on it, SIGKILL
        cluster.placement()    # which node each actor ran on (Ray's GCS record)

The node types are those of the project's cluster YAMLs scaled down to logical CPUs
(`scaled_node_types`): a node type's GPUs become a custom resource named after the type,
which the run's `train.resources` / `sampler.resources` ask for, so placement is decided by
the same requests as on the real cluster.

The helper (`python -m tests.cluster`) reads one JSON command per line on stdin and answers
one JSON line on stdout."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from tests import REPO

START_TIMEOUT_S = 240


@dataclass
class NodeSpec:
    num_cpus: float
    resources: dict = field(default_factory=dict)


def scaled_node_types(cluster_yaml: Path, cpus: dict[str, float]) -> dict[str, NodeSpec]:
    """The worker node types of a cluster YAML (Ray cluster launcher format), scaled down: a
    type with G GPUs gets {type: G} (a custom resource standing for its GPUs) and cpus[type]
    logical CPUs."""
    types = yaml.safe_load(cluster_yaml.read_text())["available_node_types"]
    head = yaml.safe_load(cluster_yaml.read_text())["head_node_type"]
    return {name: NodeSpec(cpus[name], {name: float(t["resources"].get("GPU", 0))})
            for name, t in types.items() if name != head and name in cpus}


class LocalCluster:
    """A head (no CPUs, as the cluster YAMLs' heads) and worker nodes, in a helper process."""

    def __init__(self, workdir: Path, nodes: dict[str, NodeSpec], dashboard: bool = False):
        self.temp_dir = tempfile.mkdtemp(prefix="rayc")  # short: Ray's socket paths must stay < 107 bytes
        (Path(self.temp_dir) / "ray").mkdir()  # RAY_TMPDIR/ray: where Ray notes this cluster's address
        self.log = workdir / "cluster_helper.log"
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   RAY_TMPDIR=self.temp_dir, PYTHONPATH=str(REPO),
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # a job's `python` is the venv's
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cluster"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     start_new_session=True)
        started = self.call({"start": {name: asdict(spec) for name, spec in nodes.items()},
                             "temp_dir": self.temp_dir, "dashboard": dashboard, "dashboard_port": free_ports(1)[0]})
        self.address, self.dashboard = started["address"], started.get("dashboard")
        self.node_ids: dict[str, str] = started["nodes"]
        # what a driver on this cluster runs with: this cluster's address, this checkout importable
        self.env = dict(os.environ, RAY_ADDRESS=self.address, RAY_AUTH_MODE="disabled",
                        RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))

    def call(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster helper exited ({self.proc.poll()}):\n{self.log.read_text()[-6000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"cluster helper: {answer['error']}")
        return answer

    def kill(self, name: str) -> None:
        """Node `name` lost: its raylet and every process on it killed at once (SIGKILL)."""
        self.call({"kill": name})

    def placement(self) -> list[dict]:
        """Every actor the cluster has had: {"id", "class", "node" (our name; where it last ran), "state"}."""
        names = {node_id: name for name, node_id in self.node_ids.items()}
        return [dict(a, node=names.get(a["node"], a["node"])) for a in self.call({"actors": True})["actors"]]

    def nodes_alive(self) -> list[str]:
        names = {node_id: name for name, node_id in self.node_ids.items()}
        return [names.get(n, n) for n in self.call({"alive": True})["alive"]]

    def run(self, code: str) -> dict:
        """`code` run in the helper, connected to the cluster as a driver; it sets `result`."""
        return self.call({"exec": code})["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call({"quit": True})
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - whatever happened, the processes go
                self.proc.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- the helper process


def _serve() -> None:
    # Answers go to the original stdout; whatever Ray prints goes to stderr (the helper's log).
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import ray
    from ray.cluster_utils import Cluster

    cluster, nodes = None, {}

    def node_args(spec: dict) -> dict:
        return {"num_cpus": spec["num_cpus"], "resources": spec["resources"],
                "object_store_memory": 200 * 1024 * 1024}

    for line in sys.stdin:
        command = json.loads(line)
        try:
            if "start" in command:
                # The head's agents on free ports: their defaults (52365, ...) may be taken by
                # another Ray instance on this machine, and the job server needs the head's agent.
                agent, grpc, metrics, runtime_env = free_ports(4)
                head = {"num_cpus": 0, "temp_dir": command["temp_dir"], "include_dashboard": command["dashboard"],
                        "object_store_memory": 200 * 1024 * 1024, "dashboard_agent_listen_port": agent,
                        "metrics_agent_port": grpc, "metrics_export_port": metrics, "runtime_env_agent_port": runtime_env}
                if command["dashboard"]:
                    head.update(dashboard_host="127.0.0.1", dashboard_port=command["dashboard_port"])
                cluster = Cluster(initialize_head=True, head_node_args=head)
                for name, spec in command["start"].items():
                    nodes[name] = cluster.add_node(**node_args(spec))
                cluster.wait_for_nodes(timeout=START_TIMEOUT_S)
                ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
                answer = {"address": cluster.address, "nodes": {n: node.node_id for n, node in nodes.items()}}
                if command["dashboard"]:
                    answer["dashboard"] = f"http://{cluster.webui_url}"
                    wait_for(lambda: _answers(answer["dashboard"]), START_TIMEOUT_S, "the dashboard")
            elif "kill" in command:
                cluster.remove_node(nodes.pop(command["kill"]), allow_graceful=False)
                answer = {"killed": command["kill"]}
            elif "actors" in command:
                from ray._private import state

                answer = {"actors": [{"id": actor_id, "class": a["ActorClassName"], "node": a["Address"]["NodeID"],
                                      "state": a["State"]} for actor_id, a in state.actors().items()]}
            elif "alive" in command:
                answer = {"alive": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
            elif "exec" in command:
                scope: dict = {}
                exec(command["exec"], scope)  # test code, from the test process
                answer = {"result": scope.get("result")}
            elif "quit" in command:
                ray.shutdown()
                cluster.shutdown()
                print(json.dumps({"quit": True}), file=answers, flush=True)
                return
            else:
                answer = {"error": f"unknown command {command}"}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), file=answers, flush=True)
    if cluster is not None:
        cluster.shutdown()


def probe_elsewhere_on(node_id: str):
    """A storage probe (launch.probe_storage) that answers, on node `node_id`, as a node with
    another file system would: it looks for the driver's folder and does not find it."""

    def probe(folder: str, name: str, token: str) -> str | None:
        import ray

        from longalign_rl.launch import probe_storage

        if ray.get_runtime_context().get_node_id() == node_id:
            folder = str(Path(folder) / "not_mounted_here")
        return probe_storage(folder, name, token)

    return probe


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


# ---------------------------------------------------------------- `ray start --head`, isolated

BIN = Path(sys.executable).parent  # the venv's bin (not resolved: that would leave the venv)
RAY = BIN / "ray"
HEAD_START_TIMEOUT_S = 180
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

    def nodes(self) -> list[dict]:
        """The cluster's nodes, as the dashboard's state API lists them (state ALIVE / DEAD)."""
        with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=1000", timeout=10) as r:
            return json.loads(r.read())["data"]["result"]["result"]


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


@contextlib.contextmanager
def ray_start_head(workdir: Path, num_cpus: float, extra_args: tuple = (), extra_env: dict | None = None,
                   gcs_port: int | None = None):
    """A real `ray start --head --block` on free ports, in its own session and temp dir, with
    random worker ports: it shares nothing with another Ray instance on the machine (another
    test's `ray.init`, another user's cluster), and the teardown kills only this head's
    processes (never `ray stop`, which stops every Ray on the machine)."""
    # Socket paths under the temp dir must stay below ~107 bytes: pytest's tmp_path is too
    # deep for `<temp>/session_<date>_<pid>/sockets/plasma_store`, so a short dir in /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray")
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    gcs = gcs_port or gcs
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a job must get its address from Ray, not from us
    env.pop("PYTHONPATH", None)  # a plugin must come from the job's runtime_env only
    env.update(
        RAY_AUTH_MODE="disabled",  # Ray 2.60 token auth is on by default; a local test cluster goes without
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops at once (the default drains for 30 s)
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # as in an activated venv: the job's `python`
        **(extra_env or {}),
    )
    log = workdir / "ray_start.log"
    cmd = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats", f"--num-cpus={num_cpus:g}",
        f"--temp-dir={temp_dir}", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        "--min-worker-port=0", "--max-worker-port=0",  # 0: the OS picks each worker's port
        *extra_args,
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while "block forever" not in log.read_text():  # printed once every process is up
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start --head` did not come up (exit {proc.poll()}):\n{tail(log.read_text())}")
            time.sleep(0.5)
        # The dashboard retries other ports when its port is taken: use the one it reports.
        found = re.search(r"RAY_API_SERVER_ADDRESS='http://127\.0\.0\.1:(\d+)'", ANSI.sub("", log.read_text()))
        if not found:
            raise RuntimeError(f"no dashboard address in the output of `ray start`:\n{tail(log.read_text())}")
        url = f"http://127.0.0.1:{found.group(1)}"
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard at {url} does not answer:\n{tail(log.read_text())}")
            time.sleep(0.5)
        yield Head(dashboard=url, gcs_port=gcs, env=env, log=log)
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    _serve()
