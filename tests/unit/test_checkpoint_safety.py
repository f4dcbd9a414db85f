"""Checkpoints that are safe and verifiable (issue 10, item 3): RNG without pickle, DeepSpeed
states loaded weights-only, manifests that catch truncated or altered files."""

import json
import pickle
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from longalign_rl.training import checkpoint


class Exploit:
    """A pickle that runs code when it is loaded: it would write a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_rng_round_trips_without_pickle(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached Gaussian in numpy's state
    checkpoint.save_rng(tmp_path, rank=0)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    assert checkpoint.load_rng(tmp_path, rank=0)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert {p.suffix for p in (tmp_path / "rng").iterdir()} == {".safetensors", ".json"}
    assert not checkpoint.load_rng(tmp_path, rank=1)  # another world size: nothing to restore


def test_an_old_pickled_rng_file_is_never_read(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "rng").mkdir()
    (tmp_path / "rng" / "rank0.pt").write_bytes(pickle.dumps(Exploit(marker)))
    assert not checkpoint.load_rng(tmp_path, rank=0)
    assert not marker.exists()


def test_deepspeed_loads_are_weights_only_and_refuse_a_crafted_pickle(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    checkpoint.make_loads_safe(engine)
    good = tmp_path / "optim_states.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "state": {"exp_avg": torch.ones(2)}}, good)
    loaded = engine.checkpoint_engine.load(str(good))
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["state"]["exp_avg"], torch.ones(2))

    marker = tmp_path / "marker"
    crafted = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Exploit(marker)}, crafted)
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        engine.checkpoint_engine.load(str(crafted))
    assert not marker.exists()


def make_checkpoint(directory: Path) -> Path:
    (directory / "deepspeed").mkdir(parents=True)
    (directory / "deepspeed" / "optim.pt").write_bytes(b"x" * 1000)
    (directory / "state.json").write_text(json.dumps({"step": 4}))
    checkpoint.write_manifest(directory, rank=0)
    return directory


@pytest.mark.parametrize("damage, message", [
    ("truncate", "has 500 bytes, 1000 were written"),
    ("alter", "differs from what was written"),
    ("delete", "deepspeed/optim.pt is missing"),
    ("no_manifest", "no manifest"),
])
def test_verify_names_the_damaged_file(tmp_path, damage, message):
    folder = make_checkpoint(tmp_path / "ckpt")
    checkpoint.verify(folder)
    target = folder / "deepspeed" / "optim.pt"
    if damage == "truncate":
        target.write_bytes(b"x" * 500)
    elif damage == "alter":
        target.write_bytes(b"y" * 1000)
    elif damage == "delete":
        target.unlink()
    else:
        for m in (folder / "manifest").iterdir():
            m.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.verify(folder)


def test_registered_lists_what_ray_registered_newest_first(tmp_path):
    for name, step in (("checkpoint_a", 2), ("checkpoint_b", 4), ("checkpoint_partial", 6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"step": step}))
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}, {"checkpoint_dir_name": "checkpoint_b"}]}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    assert [p.name for p in checkpoint.registered(tmp_path)] == ["checkpoint_b", "checkpoint_a"]


def test_a_resume_removes_the_folders_ray_train_never_registered_only_when_its_record_says_so(tmp_path, caplog):
    """resume.remove_unregistered_checkpoints: a folder a killed run began and Ray Train never
    registered is deleted, with a warning; without Ray Train's record nothing is guessed."""
    from longalign_rl.resume import remove_unregistered_checkpoints

    for name in (checkpoint.folder_name(2), "checkpoint_2099-01-01_00-00-00.000000"):
        (tmp_path / name).mkdir()
    remove_unregistered_checkpoints(tmp_path)  # no record: both stay
    assert len(list(tmp_path.glob("checkpoint_*"))) == 2
    record = {"checkpoint_results": [{"checkpoint_dir_name": checkpoint.folder_name(2)}]}
    (tmp_path / checkpoint.RAY_SNAPSHOT).write_text(json.dumps(record))
    remove_unregistered_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()] == [checkpoint.folder_name(2)]
    assert "removing checkpoint_2099-01-01_00-00-00.000000: a checkpoint that was never completed" in caplog.text


def test_ray_trains_record_is_read_in_one_place_and_damage_is_named(tmp_path):
    """snapshot_names reads Ray Train's record for the worker (registered) and the driver
    (resume.check_checkpoint_index): the names, None without it, the damage named."""
    from longalign_rl.resume import check_checkpoint_index

    assert checkpoint.snapshot_names(tmp_path) is None
    record = {"checkpoint_results": [{"checkpoint_dir_name": checkpoint.folder_name(2)}],
              "latest_checkpoint_result": {"checkpoint_dir_name": checkpoint.folder_name(4)}}
    (tmp_path / checkpoint.RAY_SNAPSHOT).write_text(json.dumps(record))
    assert checkpoint.snapshot_names(tmp_path) == ["checkpoint_000002", "checkpoint_000004"]
    assert checkpoint.snapshot_names(tmp_path, latest=False) == ["checkpoint_000002"]
    check_checkpoint_index(tmp_path)  # names folders that are gone: moved aside
    assert not (tmp_path / checkpoint.RAY_SNAPSHOT).exists()
    assert (tmp_path / f"{checkpoint.RAY_SNAPSHOT}.damaged").is_file()
    (tmp_path / checkpoint.RAY_SNAPSHOT).write_text("{not json")
    with pytest.raises(ValueError, match="it is damaged"):
        checkpoint.snapshot_names(tmp_path)
