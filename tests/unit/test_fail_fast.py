"""Bad input is stopped on the driver before Ray starts or a run directory exists (issue 10,
item 1): exit code 2 and one line that names the key, the plugin or the line."""

import pytest

from longalign_rl import train


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
    (["reward.name=tests.plugins.my_reward:failing_factory"],
     "reward 'tests.plugins.my_reward:failing_factory': RuntimeError: cannot reach the reward server"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=raises"], "failed on two test images"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=nan"], "non-finite values"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=wide"], r"shape \[2\].*got \[2, 3\]"),
    (["reward.name=tests.plugins.my_reward:broken", "reward.kwargs.how=detached"], "carries no gradient"),
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


def test_weights_overwritten_in_place_are_refused_on_load(tmp_path):
    """Same size, valid header, NaN values: found when the weights load (every process)."""
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
    with pytest.raises(ValueError, match=r"vae\..* holds NaN or infinite weights"):
        load_components(str(folder))
