"""Every shipped config runs as shipped (issue 21, item 3): each file in configs/, and the
defaults of longalign_rl/config.py with no file, through `longalign-rl smoke` for two steps
on local Ray, with only its sizes swapped (longalign_rl/smoke.py: the model and a reward or
T5 encoder that needs a download for tiny stand-ins of the same classes, the resolution,
steps, workers and actors). Every other key is kept, and checked to be: dropout,
checkpointing, precision, train_mode, the T5 branch, splits, crops, the algorithm. A new
file in configs/ is picked up without editing this test. (The tiny files that other e2e
modules run as shipped are run there: RUN_ELSEWHERE.)

Before issue 21 the config a real user starts from (sd15_longalign.yaml) and the defaults
crashed at their first update, while the tests ran only the tiny configs, which turn dropout
and checkpointing off."""

import math

import pytest
import yaml

from longalign_rl import smoke
from longalign_rl.config import load_config, to_dict
from tests import REPO
from longalign_rl.outputs import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore")

# Files that another e2e module already runs as shipped (more steps, a resume, its own
# checks), each a minute of the test command: run there, not twice. Only these seven are left
# out; a new file is run here. test_the_files_left_out_are_run_as_shipped_elsewhere keeps this true.
RUN_ELSEWHERE = {
    "default.yaml": "test_end_to_end.py",  # tiny_run: `python -m longalign_rl.train` with no --config
    "tiny_stage1.yaml": "test_stage1.py",
    "tiny_reference_stage1.yaml": "test_reference_mode.py",
    "tiny_reference.yaml": "test_reference_mode.py",
    # slow there (a family's tiny config is its real config's smoke run here, with the same models)
    "tiny_sdxl.yaml": "test_families.py",
    "tiny_sd3.yaml": "test_families.py",
    "tiny_flux.yaml": "test_families.py",
}
CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if p.name not in RUN_ELSEWHERE]
# Files whose smoke run is slow-marked (still run as shipped with -m slow), each with the
# default-tier run that covers the same keys: Flow-GRPO on FLUX with its recipe's group of 12
# per worker is three minutes here, configs/tiny_flux.yaml's GRPO run (groups of 2, the same
# classes) is test_families.py's default-tier FLUX run; the paper-exact configs are included
# whole by configs/tiny_reference*.yaml, which change only their sizes (as a smoke run does)
# and run in test_reference_mode.py's default tier; SD3's reward backpropagation runs in the
# default tier here as configs/shapesworld_flow.yaml's smoke (the ShapesWorld SD3 model, kept
# as shipped: no T5; SD3's T5 encoding is test_flow_families.py's).
SLOW = {"flux_dev_longalign.yaml": "test_families.py::test_tiny_flux_grpo_trains_through_the_product",
        "sd35_medium_longalign.yaml": "test_configs.py::test_a_shipped_config_runs_as_shipped_with_its_sizes_swapped",
        "longalign_reference.yaml": "test_reference_mode.py::test_stage2_replays_exactly_with_dropout_on_and_on_policy",
        "longalign_reference_stage1.yaml": "test_reference_mode.py::test_stage1_trains_the_t5_adapter_beside_the_lora"}


def test_the_files_left_out_are_run_as_shipped_elsewhere():
    from longalign_rl import train

    from longalign_rl.config import load_config

    defaults, paper = to_dict(load_config(None)), to_dict(load_config(REPO / "configs" / "sd15_longalign.yaml"))
    assert leaves(defaults) == {**leaves(paper), "reward.kwargs": {}}  # the slow "defaults" smoke's twin
    for name, where in SLOW.items():  # a slow smoke's family and algorithm run in the default tier there
        module, test = where.split("::")
        source = (REPO / "tests" / "e2e" / module).read_text()
        before = source[:source.index(f"def {test}(")].rstrip().splitlines()[-1]
        assert (REPO / "configs" / name).is_file() and "pytest.mark.slow" not in before, where

    sd35, twin = (load_config(REPO / "configs" / n) for n in ("sd35_medium_longalign.yaml", "shapesworld_flow.yaml"))
    assert twin.model.family == sd35.model.family == "sd3" and twin.algorithm.name == sd35.algorithm.name
    assert "shapesworld_flow.yaml" not in SLOW and (REPO / "configs" / "shapesworld_flow.yaml") in CONFIGS

    assert train.DEFAULT_CONFIG == REPO / "configs" / "default.yaml"
    for name, module in RUN_ELSEWHERE.items():
        assert (REPO / "configs" / name).is_file(), name
        source = (REPO / "tests" / "e2e" / module).read_text()
        if name == "default.yaml":  # the run of the module's fixture names no --config
            fixture = source[source.index("def tiny_run"):].split("\ndef ")[0]
            assert "run_main(" in fixture and "--config" not in fixture
        else:
            assert f'"configs" / "{name}"' in source, f"{module} no longer runs configs/{name}"


def leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and not k.endswith("kwargs"):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# The defaults of config.py alone (no file) are configs/sd15_longalign.yaml's but for the
# reward's kwargs, whose smoke runs in the default tier: slow-marked too.
@pytest.mark.parametrize("config", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
                                    for p in CONFIGS] + [pytest.param(None, marks=pytest.mark.slow)],
                         ids=[p.name for p in CONFIGS] + ["defaults"])
def test_a_shipped_config_runs_as_shipped_with_its_sizes_swapped(ray_local, tmp_path, config):
    code, run_dir, memory, used = smoke.run(config, "tiny", output_dir=tmp_path, name="smoke", work=tmp_path)
    assert code == 0, (run_dir / "errors").exists() and sorted((run_dir / "errors").iterdir())
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert (run_dir / ("lora" if "lora.enabled=false" not in used else "unet")).is_dir()

    # only what smoke swapped differs from the file: every other key ran as shipped
    original = leaves(to_dict(load_config(config)) if config else to_dict(load_config(None)))
    ran = leaves(yaml.safe_load((run_dir / "config.yaml").read_text()))
    swapped = {o.split("=", 1)[0] for o in used}
    assert {k for k in original if original[k] != ran[k]} <= swapped
    assert swapped <= set(smoke.SWAPPED) | {"run.output_dir", "run.name"}
    # a reward stand-in keeps every argument but those naming the weights it replaces
    kept, dropped = ran["reward.kwargs"], set(original["reward.kwargs"]) - set(ran["reward.kwargs"])
    assert all(kept[k] == v for k, v in original["reward.kwargs"].items() if k in kept)
    assert dropped <= {"model", "processor", "checkpoint", "arch"}
    roles = memory.by_role()
    assert roles["trainer worker"][0] == 2 and roles["driver"][1] > 0  # peak memory was measured
    if ran["train.precision"] != "fp32":
        assert_exports_fp32_master_weights(run_dir, ran)


def assert_exports_fp32_master_weights(run_dir, ran):
    """The module trains in bf16/fp16; what is exported and checkpointed is DeepSpeed's fp32
    master copy (a collective gather on every worker), which 16 bits cannot represent."""
    import torch
    from safetensors.torch import load_file

    exported = load_file(run_dir / ("lora/pytorch_lora_weights.safetensors" if ran["lora.enabled"]
                                    else "unet/diffusion_pytorch_model.safetensors"))
    (ckpt,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    for weights in (exported, load_file(ckpt / "weights.safetensors")):
        assert {w.dtype for w in weights.values()} == {torch.float32}
        assert any((w - w.to(torch.bfloat16).float()).abs().max() > 0 for w in weights.values())


# The configs a paper-scale run starts from, at their real size (issue 21, item 4).
REAL_SIZE = ["sd15_longalign.yaml", "longalign_reference.yaml", "sd15_stage1.yaml", "longalign_reference_stage1.yaml"]


@pytest.mark.slow  # SD v1.5's architecture at 256 px on 2 CPU cores: 4-6 minutes each, 21 GB in use at most
@pytest.mark.parametrize("name", REAL_SIZE)
def test_a_paper_config_runs_at_real_size(ray_local, tmp_path, name):
    """SD v1.5's architecture (random weights) at 256 px with the reward's and the T5
    encoder's real architectures (random weights), one trainer worker and one sampler actor:
    the numbers in BENCHMARKS.md come from `longalign-rl smoke --size real`, the same code."""
    code, run_dir, memory, used = smoke.run(REPO / "configs" / name, "real", output_dir=tmp_path, name="real",
                                            work=tmp_path)
    assert code == 0, (run_dir / "errors").exists() and sorted((run_dir / "errors").iterdir())
    assert "model.pretrained=sd15-random" in used and "sampler.resolution=256" in used
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    print("\n".join(smoke.memory_lines(memory)))
