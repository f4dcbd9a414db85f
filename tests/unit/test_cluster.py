"""Cluster files, checked offline: the launcher YAMLs pass the checks `ray up` makes before
it touches a cloud, the KubeRay manifests turn into the node types Ray's own KubeRay
autoscaler derives from them, and both give the paper config what it asks for: enough
GPUs, a CPU-only head, one shared run directory, the dashboard never on a public
interface, and no credentials in the files."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PAPER_CONFIG = "configs/sd15_longalign.yaml"

ONE_MACHINE = CLUSTER / "one_machine.yaml"  # the fake multi-node provider: tests/e2e/test_cluster.py
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if p != ONE_MACHINE)
CLOUD_YAMLS = [p for p in LAUNCHER_YAMLS if yaml.safe_load(p.read_text())["provider"]["type"] != "local"]

# GPUs of the machine types the cloud YAMLs use or suggest in their comments. Ray reads an
# AWS instance's GPUs from the EC2 API and cannot read a GCE machine's at all, so each node
# type declares `resources`; this table checks the declaration against the hardware.
AWS_INSTANCE_GPUS = {"m6i.2xlarge": 0, "g5.xlarge": 1, "g5.2xlarge": 1, "g5.12xlarge": 4,
                     "p4d.24xlarge": 8, "p4de.24xlarge": 8}
GCP_MACHINE_GPUS = {"n2-standard-8": 0, "g2-standard-8": 1, "g2-standard-12": 1,
                    "a2-highgpu-4g": 4, "a2-highgpu-8g": 8, "a2-ultragpu-8g": 8}

# Field names of KubeRay's v1 types (ray-operator/apis/ray/v1/*_types.go). The API server
# silently drops fields a CRD does not know, so a misspelt `enableInTreeAutoscaling` would
# quietly give a cluster without an autoscaler: these lists catch that here.
RAYCLUSTER_SPEC_FIELDS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                          "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
                          "gcsFaultToleranceOptions", "authOptions"}
AUTOSCALER_OPTIONS_FIELDS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                             "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template",
                     "resources", "labels"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                       "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels"}
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                      "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                      "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                      "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                      "shutdownAfterJobFinishes", "suspend", "schedule"}

CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "private key": r"BEGIN [A-Z ]*PRIVATE KEY",
    "AWS secret key setting": r"aws_secret_access_key|aws_session_token",
    "AWS account id in an ARN": r"arn:aws[\w-]*:[\w-]*:[\w-]*:\d{12}:",
    "GCP service-account key": r'"private_key(_id)?"\s*:|"type"\s*:\s*"service_account"',
    "credentials embedded in a provider": r"^\s*(aws|gcp)_credentials\s*:",
}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _prepared(path: Path) -> dict:
    """The config as `ray up` sees it before it calls the cloud (ray is pinned: private API)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(path))
    validate_config(config)
    return config


def _kuberay_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]


def _kuberay_node_types(spec: dict) -> dict:
    """The node types Ray's KubeRay autoscaler derives from a RayCluster spec (it also runs
    validate_config on them)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": "longalign", "namespace": "default"}, "spec": spec}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def _kuberay_specs() -> dict[str, dict]:
    (cluster,) = _kuberay_docs("raycluster.yaml")
    (job,) = _kuberay_docs("rayjob.yaml")
    return {"raycluster.yaml": cluster["spec"], "rayjob.yaml rayClusterSpec": job["spec"]["rayClusterSpec"]}


def _paper_demands() -> list[dict]:
    """One resource request per sampler actor and per trainer worker, as the framework
    makes them (sampling/group.py, train.py)."""
    from longalign_rl.config import load_config

    cfg = load_config(REPO / PAPER_CONFIG)
    sampler = {"CPU": cfg.sampler.num_cpus, "GPU": cfg.sampler.num_gpus}
    trainer = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    return [dict(sampler) for _ in range(cfg.sampler.num_actors)] + [dict(trainer) for _ in range(cfg.train.num_workers)]


def _assert_capacity(node_types: dict, head_type: str) -> None:
    """Every GPU node type at max_workers holds all of the paper config's requests."""
    from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual

    demands = _paper_demands()
    workers = {name: t for name, t in node_types.items() if name != head_type}
    gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in workers.values())
    needed = sum(d.get("GPU", 0) for d in demands)
    assert gpus >= needed, f"node types provide {gpus} GPUs at most; {PAPER_CONFIG} asks for {needed}"
    # GPUs alone are not enough: each request must also fit a node with its CPUs.
    nodes = [dict(t["resources"]) for t in workers.values() for _ in range(t["max_workers"])]
    unfit, _ = get_bin_pack_residual(nodes, demands)
    assert not unfit, f"requests that fit no node at max_workers: {unfit}"


# ---------------------------------------------------------------- launcher YAMLs


def test_cloud_yamls_are_there():
    assert {"aws.yaml", "gcp.yaml"} <= {p.name for p in CLOUD_YAMLS}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_validates_like_ray_up(path):
    config = _prepared(path)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # never on a public interface
    assert "--dashboard-host=0.0.0.0" not in start
    assert "scripts/setup_env.sh" in " ".join(config["setup_commands"])


def test_validation_rejects_a_misspelt_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(CLUSTER / "onprem.yaml")
    config["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_head_is_cpu_only_and_gpu_types_scale(path):
    config = _prepared(path)
    types, head = config["available_node_types"], config["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0
    assert types[head]["resources"].get("CPU") == 0, "the head advertises CPUs: actors could land there"
    gpu_types = {n: t for n, t in types.items() if n != head and t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        assert t["max_workers"] >= 1, name
    assert sum(t["min_workers"] for t in types.values()) <= config["max_workers"]


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_declared_gpus_match_the_machines(path):
    config = _prepared(path)
    for name, t in config["available_node_types"].items():
        node = t["node_config"]
        if config["provider"]["type"] == "aws":
            kind, table = node["InstanceType"], AWS_INSTANCE_GPUS
            hardware = table.get(kind)
        else:
            kind, table = node["machineType"], GCP_MACHINE_GPUS
            hardware = table.get(kind)
            if hardware is not None:
                hardware += sum(a["acceleratorCount"] for a in node.get("guestAccelerators", []))
        assert hardware is not None, f"{name}: {kind} is not in this test's table; add its GPU count"
        assert t["resources"].get("GPU", 0) == hardware, f"{name}: declares {t['resources']} on a {kind}"


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_gpu_capacity_covers_the_paper_config(path):
    config = _prepared(path)
    _assert_capacity(config["available_node_types"], config["head_node_type"])


def test_capacity_check_fails_on_a_cluster_too_small():
    config = _prepared(CLUSTER / "aws.yaml")
    config["available_node_types"]["trainer_gpu"]["max_workers"] = 0
    with pytest.raises(AssertionError, match="GPUs at most"):
        _assert_capacity(config["available_node_types"], config["head_node_type"])


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_checkout_upload_leaves_out_the_venv(path):
    config = _load(path)
    assert "." in config["file_mounts"].values()
    assert ".gitignore" in config.get("rsync_filter", [])
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored


@pytest.mark.parametrize("path", CLOUD_YAMLS, ids=lambda p: p.name)
def test_cloud_nodes_mount_the_shared_run_directory(path):
    commands = " && ".join(_prepared(path)["worker_setup_commands"])
    assert re.search(r"cluster/mount_shared\.sh \S+ /mnt/shared\b", commands)
    assert (CLUSTER / "mount_shared.sh").is_file()


def test_mount_shared_refuses_an_unedited_placeholder(tmp_path):
    # A `sudo` that only fails: should the script get past its check, it changes nothing here.
    (tmp_path / "sudo").write_text("#!/bin/sh\nexit 99\n")
    (tmp_path / "sudo").chmod(0o755)
    result = subprocess.run(["bash", str(CLUSTER / "mount_shared.sh"), "fs-REPLACE_ME.efs.us-west-2.amazonaws.com:/",
                             str(tmp_path / "mnt")], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "placeholder" in result.stderr


# ---------------------------------------------------------------- credentials


def _credential_findings(text: str) -> list[str]:
    return [what for what, pattern in CREDENTIAL_PATTERNS.items() if re.search(pattern, text, re.MULTILINE)]


def test_no_credentials_in_cluster_files():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 8
    found = {str(p.relative_to(REPO)): f for p in files if (f := _credential_findings(p.read_text()))}
    assert not found


@pytest.mark.parametrize("planted", [
    "aws_access_key_id: AKIA" + "ABCDEFGHIJKLMNOP",
    "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
    "aws_secret_access_key" + " = x",
    "role: arn:aws:iam::" + "123456789012:role/x",
    '{"type": "service_' + 'account", "private_key_id": "1"}',
    "provider:\n  gcp_credentials:\n    type: credentials_token",
])
def test_credential_scan_catches_planted_secrets(planted):
    assert _credential_findings(planted)


# ---------------------------------------------------------------- KubeRay


def test_kuberay_manifests_have_the_right_kinds():
    assert [(d["apiVersion"], d["kind"]) for d in _kuberay_docs("raycluster.yaml")] == [("ray.io/v1", "RayCluster")]
    assert [(d["apiVersion"], d["kind"]) for d in _kuberay_docs("rayjob.yaml")] == [("ray.io/v1", "RayJob")]
    (pvc,) = _kuberay_docs("shared-storage.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # head and every worker mount it
    assert [d["kind"] for d in _kuberay_docs("networkpolicy.yaml")] == ["NetworkPolicy"]


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml rayClusterSpec"])
def test_kuberay_cluster_autoscales_gpu_groups_with_a_cpu_only_head(which):
    spec = _kuberay_specs()[which]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    types = _kuberay_node_types(spec)
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["headgroup"]["resources"].get("GPU", 0) == 0
    gpu_groups = [g for g in spec["workerGroupSpecs"] if types[g["groupName"]]["resources"].get("GPU", 0) > 0]
    assert len(gpu_groups) >= 2  # samplers and trainers
    for group in gpu_groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    _assert_capacity(types, "headgroup")


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml rayClusterSpec"])
def test_kuberay_dashboard_is_not_exposed(which):
    head = _kuberay_specs()[which]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress", False) is False
    kinds = {d["kind"] for f in KUBERAY.glob("*.yaml") for d in _kuberay_docs(f.name)}
    assert not kinds & {"Ingress", "Service", "Gateway", "HTTPRoute"}


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml rayClusterSpec"])
def test_kuberay_requires_rays_token_from_a_secret(which):
    """Issue 10: no request reaches the dashboard, job server or GCS without the token."""
    spec = _kuberay_specs()[which]
    assert spec["authOptions"] == {"mode": "token", "secretName": "longalign-ray-token"}
    major, minor = map(int, spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52)  # token authentication's first Ray release


def test_network_policy_admits_the_job_port_only_from_the_operator_and_the_submitter():
    (policy,) = _kuberay_docs("networkpolicy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    label = policy["spec"]["podSelector"]["matchLabels"]
    assert label == {"app.kubernetes.io/part-of": "longalign-rl"} and policy["spec"]["policyTypes"] == ["Ingress"]
    # every Ray pod of both manifests carries the label the policy selects
    for which, spec in _kuberay_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["template"]["metadata"]["labels"].items() >= label.items(), which
    intra, job_port = policy["spec"]["ingress"]
    assert intra == {"from": [{"podSelector": {"matchLabels": label}}]}  # Ray's own ports: Ray pods only
    assert job_port["ports"] == [{"port": 8265, "protocol": "TCP"}]
    peers = [p["podSelector"]["matchLabels"] for p in job_port["from"]]
    (job,) = _kuberay_docs("rayjob.yaml")
    assert peers == [{"app.kubernetes.io/name": "kuberay-operator"},
                     {"batch.kubernetes.io/job-name": job["metadata"]["name"]}]


def test_kuberay_specs_use_only_known_fields():
    for which, spec in _kuberay_specs().items():
        assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, (which, set(spec) - RAYCLUSTER_SPEC_FIELDS)
        assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS_FIELDS, which
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS, which
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS, (which, group["groupName"])
    (job,) = _kuberay_docs("rayjob.yaml")
    assert set(job["spec"]) <= RAYJOB_SPEC_FIELDS, set(job["spec"]) - RAYJOB_SPEC_FIELDS


def test_rayjob_cluster_is_the_raycluster():
    specs = _kuberay_specs()
    assert specs["rayjob.yaml rayClusterSpec"] == specs["raycluster.yaml"]


def _entrypoint() -> tuple[list[str], str, list[str]]:
    (job,) = _kuberay_docs("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
    return argv, config, overrides


def test_rayjob_runs_the_trainer_with_a_config_from_the_repo():
    from longalign_rl.config import load_config

    (job,) = _kuberay_docs("rayjob.yaml")
    argv, config, overrides = _entrypoint()
    assert argv[:3] == ["python", "-m", "longalign_rl.train"]
    assert (REPO / config).is_file()
    load_config(REPO / config, overrides)  # override keys and values are valid
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert "rayClusterSpec" in job["spec"] and "clusterSelector" not in job["spec"]
    # Relative paths resolve in the job's working directory: the checkout in the image.
    workdir = re.search(r"^WORKDIR\s+(\S+)", (KUBERAY / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


def test_kuberay_pods_mount_the_shared_volume_where_the_job_writes():
    (pvc,) = _kuberay_docs("shared-storage.yaml")
    output_dir = dict(o.split("=", 1) for o in _entrypoint()[2])["run.output_dir"]
    for which, spec in _kuberay_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            volumes = {v["name"] for v in pod["volumes"]
                       if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
            mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes]
            assert any(Path(output_dir).is_relative_to(m) for m in mounts), (which, group.get("groupName", "head"))


def test_image_and_ray_versions_match_the_pinned_ray():
    pinned = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.MULTILINE).group(1)
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(pinned)}-", dockerfile, re.MULTILINE)
    assert "-c constraints.txt" in dockerfile
    for which, spec in _kuberay_specs().items():
        assert spec["rayVersion"] == pinned, which
        pods = [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
        images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
        assert len(images) == 1, images  # one image, built from this repository


def test_the_one_machine_cluster_has_the_aws_node_types_scaled_down():
    """cluster/one_machine.yaml (the autoscaler on one machine) keeps aws.yaml's node types,
    a CPU-only head, and each type's GPUs as a custom resource named after it; it passes the
    checks `ray up` makes."""
    from tests.cluster import scaled_node_types

    config = _prepared(ONE_MACHINE)
    types = config["available_node_types"]
    aws = _load(CLUSTER / "aws.yaml")
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    scaled = scaled_node_types(CLUSTER / "aws.yaml", {"sampler_gpu": 1, "trainer_gpu": 1})
    assert set(scaled) == set(types) - {config["head_node_type"]} == set(aws["available_node_types"]) - {aws["head_node_type"]}
    for name, spec in scaled.items():
        assert types[name]["resources"] == {"CPU": spec.num_cpus, **spec.resources}
        assert types[name]["min_workers"] == 0 and types[name]["max_workers"] >= 1
    assert config["provider"]["module"].endswith("fake_multi_node.node_provider.FakeMultiNodeProvider")
