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

import json
import os
import subprocess
import sys
import tempfile
import time
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
                   RAY_TMPDIR=self.temp_dir, PYTHONPATH=str(REPO))
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.cluster"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     start_new_session=True)
        started = self.call({"start": {name: asdict(spec) for name, spec in nodes.items()},
                             "temp_dir": self.temp_dir, "dashboard": dashboard})
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

    def add(self, name: str, spec: NodeSpec) -> str:
        self.node_ids[name] = self.call({"add": name, "spec": asdict(spec)})["node"]
        return self.node_ids[name]

    def kill(self, name: str) -> None:
        """Node `name` lost: its raylet and every process on it killed at once (SIGKILL)."""
        self.call({"kill": name})

    def placement(self) -> list[dict]:
        """Every actor the cluster has had: {"class", "node" (our name), "state"}."""
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
        import shutil

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
                head = {"num_cpus": 0, "temp_dir": command["temp_dir"], "include_dashboard": command["dashboard"],
                        "object_store_memory": 200 * 1024 * 1024}
                if command["dashboard"]:
                    head["dashboard_host"] = "127.0.0.1"
                cluster = Cluster(initialize_head=True, head_node_args=head)
                for name, spec in command["start"].items():
                    nodes[name] = cluster.add_node(**node_args(spec))
                cluster.wait_for_nodes(timeout=START_TIMEOUT_S)
                ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
                answer = {"address": cluster.address, "nodes": {n: node.node_id for n, node in nodes.items()}}
                if command["dashboard"]:
                    answer["dashboard"] = f"http://{cluster.webui_url}"
            elif "add" in command:
                nodes[command["add"]] = cluster.add_node(**node_args(command["spec"]))
                answer = {"node": nodes[command["add"]].node_id}
            elif "kill" in command:
                cluster.remove_node(nodes.pop(command["kill"]), allow_graceful=False)
                answer = {"killed": command["kill"]}
            elif "actors" in command:
                from ray._private import state

                answer = {"actors": [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
                                     for a in state.actors().values()]}
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


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s:g} s")


if __name__ == "__main__":
    _serve()
