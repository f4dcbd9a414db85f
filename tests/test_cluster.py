"""Cluster launcher YAMLs pass the checks `ray up` makes before it touches any machine."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_cluster_yaml_validates_like_ray_up(path):
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: ray is pinned

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # never on a public interface
    assert "scripts/setup_env.sh" in " ".join(config["setup_commands"])


def test_validation_rejects_a_misspelt_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "onprem.yaml").read_text())
    config["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(config))
