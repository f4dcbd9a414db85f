"""Bad input is stopped on the driver before Ray starts or a run directory exists (issue 10,
item 1): exit code 2 and one line that names the key, the plugin or the line."""

import pytest
import torch

from longalign_rl import launch, preflight, resume, train


def main(tmp_path, capsys, *overrides):
    code = train.main([*overrides, f"run.output_dir={tmp_path}", "run.name=r"])
    err = capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "a run directory was created for a run that cannot start"
    return code, err


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=inf"], "train.lr: must be a finite number"),
    (["reward.kwargs.text_irrelevant_weight=1.5"], r"reward: reward 'shapes_clip': text_irrelevant_weight must be in \[0, 1\]"),
    (["reward.kwargs.text_irrelevant_weight=-0.5"], r"text_irrelevant_weight must be in \[0, 1\]"),
    (["reward.kwargs.no_such_keyword=1"], "reward 'shapes_clip'.*no_such_keyword"),
    # read off the signatures (the factory's **kwargs go to the class it returns), with a suggestion
    (["reward.kwargs.text_irelevant_weight=0.3"], "^error: reward.kwargs.text_irelevant_weight: reward 'shapes_clip' "
     "takes no argument 'text_irelevant_weight'; did you mean 'text_irrelevant_weight'"),
    (["reward.name=tests.plugins.my_reward:BrightPixels", "algorithm.name=grpo", "reward.kwargs={treshold: 0.5}"],
     "did you mean 'threshold'"),
    (["reward.name=tests.plugins.my_reward:failing_factory"],
     "reward 'tests.plugins.my_reward:failing_factory': RuntimeError: cannot reach the reward server"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=raises"], "failed on two test images"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=nan"], "non-finite values"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=wide"], r"shape \[2\].*got \[2, 3\]"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=detached"], "carries no gradient"),
    # metric hooks are called once on the driver, as rewards are: not first at the first logged step
    (["run.metrics=[tests.unit.test_hooks:brightness, tests.unit.test_hooks:raises]"],
     r"run.metrics\[1\] 'tests.unit.test_hooks:raises' failed on two test images: RuntimeError: OCR model not found"),
    (["run.metrics=[tests.unit.test_hooks:wrong_shape]"], r"run.metrics\[0\] .*'bright' must be a tensor of shape \[2\]"),
    (["run.metrics=[tests.unit.test_hooks:brightness, tests.unit.test_hooks:brightness]"],
     "run.metrics: .*'bright' is also logged by another hook"),
    # model families (issue 25): the family the weights are, one that exists, settings it takes
    (["model.pretrained=tiny-sdxl", "model.family=sd"], "model.family: 'sd', but 'tiny-sdxl' is a 'sdxl' model "
     r"\(pipeline StableDiffusionXLPipeline\)"),
    (["model.family=kandinsky"], "model.family: unknown model family 'kandinsky'; known: flux, sd, sd3, sdxl"),
    # the flow-matching families (issue 26): what they do not take
    (["model.pretrained=tiny-flux", "model.without_t5=true"], "model.without_t5: FLUX reads the words from its T5"),
    (["model.pretrained=tiny", "model.without_t5=true"], "model.without_t5: only SD3 loads without a T5 encoder"),
    (["model.pretrained=tiny-sd3", "sampler.final=pred_x0"], "sampler.final: 'pred_x0' is DDIM's"),
    (["model.pretrained=tiny-sd3", "t5.encoder=tiny"], "t5.encoder: the reference release's T5 branch is SD 1.x's; "
     "sd3 has its own T5"),
    (["prompts.t5_max_tokens=-1"], "prompts.t5_max_tokens: must be >= 0"),
    (["sampler.grad_steps=first"], "sampler.grad_steps: must be strided or last"),
    (["model.pretrained=tiny-sdxl", "t5.encoder=tiny"], "t5.encoder: the reference release's T5 branch is SD 1.x's"),
    (["prompts.pooled=last"], "prompts.pooled: must be first or mean, got 'last'"),
])
def test_bad_rewards_and_values_exit_2_naming_the_problem(tmp_path, capsys, overrides, message):
    code, err = main(tmp_path, capsys, *overrides)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    import re
    assert re.search(message, err), err


def copy_model(tmp_path):
    import shutil

    from shapesworld.plugin import WEIGHTS_DIR

    folder = tmp_path / "models" / "m"
    shutil.copytree(WEIGHTS_DIR / "shapesworld", folder)
    return folder


def test_a_missing_local_model_folder_is_not_read_as_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    code, err = main(tmp_path, capsys, "model.pretrained=models/sd15")
    assert code == 2 and "local diffusers folder 'models/sd15' not found" in err, err


def test_a_hub_id_that_is_neither_cached_nor_reachable_exits_2(tmp_path, capsys):
    """No network here, as on many clusters' heads: the error says so before anything starts."""
    code, err = main(tmp_path, capsys, "model.pretrained=nosuchorg/nosuchmodel")
    assert code == 2 and "'nosuchorg/nosuchmodel' is not a local folder, not in the hub cache" in err, err


@pytest.mark.parametrize("damage, message", [
    ("empty", "unet/config.json is missing"),
    ("truncate", "truncated or corrupt"),
    ("garbage", "not a readable safetensors file"),
    ("no_scheduler", "scheduler/scheduler_config.json is missing"),
])
def test_a_damaged_model_folder_names_the_file(tmp_path, capsys, damage, message):
    import shutil

    folder = copy_model(tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    elif damage == "truncate":
        unet.write_bytes(unet.read_bytes()[:-100])
    elif damage == "garbage":
        unet.write_bytes(b"\xff" * unet.stat().st_size)
    else:
        shutil.rmtree(folder / "scheduler")
    code, err = main(tmp_path, capsys, f"model.pretrained={folder}")
    assert code == 2 and "model.pretrained:" in err and message in err, err


def test_weights_overwritten_in_place_are_refused_on_the_driver_and_on_load(tmp_path, capsys):
    """Same size, valid header, NaN values: found by the driver's check and again wherever
    the weights load."""
    import json
    import struct

    import numpy as np

    from longalign_rl.models import load_components

    folder = copy_model(tmp_path)
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name, info = next((k, v) for k, v in header.items() if k != "__metadata__")
    start, end = (8 + n + o for o in info["data_offsets"])
    data[start:end] = np.full((end - start) // 2, np.nan, dtype=np.float16).tobytes()
    vae.write_bytes(bytes(data))
    code, err = main(tmp_path, capsys, f"model.pretrained={folder}")
    assert code == 2 and f"tensor {name!r} holds NaN or infinite values" in err, err
    with pytest.raises(ValueError, match="holds NaN or infinite values"):  # every process checks the folder
        load_components(str(folder))


def test_a_loader_that_returns_non_finite_weights_is_refused(tiny_parts):
    """Models from a registered loader skip the folder check; their loaded weights are checked."""
    import copy

    from longalign_rl.models import check_finite

    parts = copy.deepcopy(tiny_parts)
    check_finite(parts, "tiny")
    with torch.no_grad():
        next(parts.unet.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"'tiny': unet\..* holds NaN or infinite weights"):
        check_finite(parts, "tiny")


# ---------------------------------------------------------------- resources, output dir, resume


def test_a_run_that_cannot_fit_names_the_keys():
    from longalign_rl.config import load_config

    cfg = load_config(train.DEFAULT_CONFIG, ["train.num_workers=4", "sampler.num_actors=2"])
    assert launch.required_resources(cfg) == {"CPU": 3.0, "GPU": 0.0}  # 4 x 0.5 + 2 x 0.5
    message = launch.resource_shortfall(cfg, {"CPU": 2.0})
    assert "3 CPUs (has 2)" in message and "train.num_workers" in message and "sampler.num_actors" in message
    assert launch.resource_shortfall(cfg, {"CPU": 3.0}) is None
    gpu = load_config(None, ["train.num_workers=2", "sampler.num_actors=2", "sampler.num_gpus=0.5"])
    assert launch.required_resources(gpu)["GPU"] == 3.0
    assert "3 GPUs (has 2)" in launch.resource_shortfall(gpu, {"CPU": 64.0, "GPU": 2.0})
    actors = load_config(None, ["algorithm.name=grpo", "train.num_workers=2", "sampler.num_actors=2",
                                "sampler.num_gpus=0.5", "reward.num_actors=2", "reward.num_gpus=0.5"])
    assert launch.required_resources(actors) == {"CPU": 6.0, "GPU": 4.0}  # 2 x 1 + 2 x 1 + 2 x 1 CPUs
    assert "reward.num_actors" in launch.resource_shortfall(actors, {"CPU": 64.0, "GPU": 3.0})
    # custom resources that place workers and actors on node types: counted, and named when missing
    placed = load_config(None, ["train.num_workers=2", "sampler.num_actors=2", "train.resources={trainer_node: 1}",
                                "sampler.resources={sampler_node: 0.5}"])
    need = launch.required_resources(placed)
    assert need["trainer_node"] == 2.0 and need["sampler_node"] == 1.0
    message = launch.resource_shortfall(placed, {"CPU": 64.0, "GPU": 8.0, "trainer_node": 2.0})
    assert message.startswith("the run needs the custom resources 1 'sampler_node' (has 0)") and "sampler.resources" in message
    assert launch.resource_shortfall(placed, {"CPU": 64.0, "GPU": 8.0, "trainer_node": 2.0, "sampler_node": 1.0}) is None


def test_an_unwritable_or_non_directory_output_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert train.main([f"run.output_dir={blocker / 'runs'}", "run.name=r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.output_dir: cannot write runs to") and "a_file" in err, err
    assert blocker.read_text() == "not a folder"


def test_a_resume_that_changes_the_architecture_is_refused_and_keeps_the_config(tmp_path, capsys):
    from longalign_rl.config import load_config, to_yaml

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    saved = to_yaml(load_config(train.DEFAULT_CONFIG, ["lora.rank=4"]))
    (run_dir / "config.yaml").write_text(saved)
    code = train.main(["--resume", str(run_dir), "lora.rank=8", "model.pretrained=tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "lora.rank (4 -> 8)" in err and "model.pretrained ('shapesworld-partial' -> 'tiny')" in err, err
    assert (run_dir / "config.yaml").read_text() == saved


def test_a_resume_with_other_values_keeps_the_original_config(tmp_path):
    from longalign_rl.config import load_config, to_yaml

    cfg = load_config(train.DEFAULT_CONFIG, ["train.steps=4"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert resume.keep_original_config(tmp_path, cfg) == []
    assert not (tmp_path / "config.original.yaml").exists()  # nothing changed: nothing to keep
    longer = load_config(train.DEFAULT_CONFIG, ["train.steps=8", "reward.kwargs.text_irrelevant_weight=0.5"])
    changes = resume.keep_original_config(tmp_path, longer)
    assert "train.steps: 4 -> 8" in changes and any(c.startswith("reward.kwargs: ") for c in changes)
    assert load_config(tmp_path / "config.original.yaml").train.steps == 4
    (tmp_path / "config.yaml").write_text(to_yaml(longer))  # what the workers write next
    resume.keep_original_config(tmp_path, load_config(train.DEFAULT_CONFIG, ["train.steps=12"]))
    assert load_config(tmp_path / "config.original.yaml").train.steps == 4  # the first one stays


@pytest.mark.parametrize("overrides, message", [
    (["t5.encoder=nosuchorg/nosuch-t5"], "t5.encoder: 'nosuchorg/nosuch-t5' is not a local folder, not in the hub cache"),
    (["t5.encoder=tiny", "t5.adapter=no/such/adapter"], "t5.adapter: 'no/such/adapter' holds no config.json"),
    (["t5.encoder=README.md"], "t5.encoder: 'README.md' is a path without config.json"),
])
def test_a_t5_branch_that_cannot_load_exits_2_naming_the_key(tmp_path, capsys, overrides, message):
    code, err = main(tmp_path, capsys, *overrides)
    assert code == 2 and message in err, err


def test_prompts_longer_than_max_tokens_are_said_once_on_the_driver(tmp_path, caplog):
    """Cut prompts are no error (the reference cuts its own), but a run says how many once,
    before it starts: the samplers that cut them keep it out of warnings.log."""
    import logging

    from longalign_rl.config import load_config

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("A red square.\n" + "A long one. " * 40 + "\n")
    cfg = load_config("configs/default.yaml", ["prompts.max_tokens=60", f"run.validation={held_out}",
                                               "run.validation_size=2"])
    with caplog.at_level(logging.WARNING, logger="longalign_rl"):
        preflight.check_inputs(cfg)
    said = [r.getMessage() for r in caplog.records if r.name == "longalign_rl"]
    assert len(said) == 2, said
    assert said[0].startswith("prompts.source: 4096 of 4096 prompts are longer than prompts.max_tokens=60 encoded "
                              "states and are cut to it (the longest, number ")
    assert said[1].startswith("run.validation: 1 of 2 validation prompts are longer than prompts.max_tokens=60 "
                              "encoded states and are cut to it (the longest, number 2, has 200: 'A long one. A long")
    # 200 = 40 sentences x (<sot> + "a", "long", "one", ".")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longalign_rl"):
        preflight.check_inputs(load_config("configs/default.yaml"))  # ShapesWorld's captions fit its max_tokens
    assert not [r for r in caplog.records if r.name == "longalign_rl"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longalign_rl"):
        preflight.warn_cut_prompts(cfg, "prompts.source", ["short.", "A long one. " * 40, "A long one. " * 40], limit=2)
    assert "prompts.source: 1 of the first 2 prompts are longer" in caplog.records[0].getMessage()


def test_the_driver_counts_the_prompts_a_models_own_t5_cuts(caplog):
    """SD3 and FLUX read the whole prompt through T5 up to prompts.t5_max_tokens: one line
    on the driver counts what it cuts, naming the key; SD3 without its T5 cuts nothing there."""
    import logging

    from longalign_rl.config import load_config

    prompts = ["short.", "A long one. " * 40, "A long one. " * 20]
    for config in ("configs/tiny_sd3.yaml", "configs/tiny_flux.yaml"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="longalign_rl"):
            preflight.warn_cut_prompts(load_config(config, ["prompts.t5_max_tokens=16"]), "prompts.source", prompts)
        said = [r.getMessage() for r in caplog.records if r.name == "longalign_rl"]
        assert said == ["prompts.source: 2 of 3 prompts are longer than prompts.t5_max_tokens=16 T5 tokens and are "
                        "cut to it (the longest, number 2, has 322); raise prompts.t5_max_tokens to keep them whole"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="longalign_rl"):
        preflight.warn_cut_prompts(load_config("configs/tiny_sd3.yaml", ["prompts.t5_max_tokens=16",
                                                                         "model.without_t5=true"]),
                                   "prompts.source", prompts)
        preflight.warn_cut_prompts(load_config("configs/tiny_flux.yaml", ["prompts.t5_max_tokens=0"]),  # 512
                                   "prompts.source", prompts)
    assert not [r for r in caplog.records if r.name == "longalign_rl"]
    # an SD3 model saved without its T5 (model_index.json: text_encoder_3 [null, null]), by folder
    # or by a registered name, has no T5 to cut: no T5 line though prompts.t5_max_tokens is 1
    from shapesworld.plugin import WEIGHTS_DIR

    for model in ("shapesworld-flow", str(WEIGHTS_DIR / "shapesworld-flow")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="longalign_rl"):
            preflight.warn_cut_prompts(load_config("configs/shapesworld_flow.yaml", [f"model.pretrained={model}"]),
                                       "prompts.source", prompts)
        said = [r.getMessage() for r in caplog.records if r.name == "longalign_rl"]
        assert len(said) == 1 and "prompts.max_tokens=120" in said[0] and "T5" not in said[0], said


def test_custom_resources_are_checked_on_the_driver():
    from longalign_rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="sampler.resources: 'GPU' has its own key"):
        load_config(None, ["sampler.resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="train.resources: 'trainer_node': 'many' is not a positive number"):
        load_config(None, ["train.resources={trainer_node: many}"])
    with pytest.raises(ConfigError, match="reward.resources: 'x': 0 is not a positive number"):
        load_config(None, ["reward.resources={x: 0}"])
