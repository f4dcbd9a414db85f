"""`longalign-rl smoke` (issue 21): what it swaps in a config, and only that. The runs
themselves are in tests/e2e/test_configs.py."""

import json

import pytest

from longalign_rl import smoke
from longalign_rl.config import ConfigError, load_config
from tests import REPO


def shrunk(tmp_path, name, *overrides, size="tiny"):
    cfg = load_config(REPO / "configs" / name if name else None, list(overrides))
    return cfg, smoke.shrink(cfg, size, tmp_path)


def test_a_paper_config_keeps_how_it_trains_and_swaps_how_big_it_is(tmp_path):
    cfg, changes = shrunk(tmp_path, "sd15_longalign.yaml")
    assert changes["model.pretrained"] == "tiny" and changes["sampler.resolution"] == 64
    assert changes["reward.name"] == "tiny_openclip"  # hpsv2 is an open_clip CLIP: the same class, tiny
    assert changes["reward.kwargs"] == {"text_irrelevant_weight": 0.3, "direction": "batch"}
    assert (changes["train.num_workers"], changes["sampler.num_actors"], changes["train.steps"]) == (2, 1, 2)
    assert changes["sampler.num_steps"] == 10 and "sampler.num_grad_steps" not in changes  # 5 of 10
    assert set(changes) <= set(smoke.SWAPPED)
    for kept in ("lora.dropout", "train.activation_checkpointing", "train.precision", "sampler.precision",
                 "train.zero_stage", "sampler.train_mode", "algorithm.name"):
        assert kept not in changes


def test_the_reference_config_keeps_its_split_crop_and_t5_branch_at_tiny_size(tmp_path):
    _, changes = shrunk(tmp_path, "longalign_reference.yaml")
    assert changes["t5.encoder"] == "tiny" and changes["model.pretrained"] == "tiny"
    assert changes["reward.name"] == "tiny_clip"  # Denscore is a transformers CLIPModel
    assert changes["reward.kwargs"] == {"text_irrelevant_weight": 0.3, "direction": "batch", "split": "reference",
                                        "crop": "reference"}


def test_models_that_need_no_download_are_kept(tmp_path):
    _, changes = shrunk(tmp_path, "default.yaml")  # shapesworld-partial is shipped
    assert "model.pretrained" not in changes and "reward.name" not in changes
    _, changes = shrunk(tmp_path, None, "model.pretrained=sd15-random")
    assert changes["model.pretrained"] == "tiny"  # the built-in full-size architecture is a size too
    # (a reward that needs no stand-in: the default's, at size "real", is a random ViT-H-14, 17 s to build)
    _, changes = shrunk(tmp_path, None, "model.pretrained=sd15-random", "reward.name=tiny_clip", size="real")
    assert "model.pretrained" not in changes and changes["train.num_workers"] == 1


def test_stage1_data_that_is_not_here_becomes_a_handful_of_generated_pairs_of_the_same_kind(tmp_path):
    from longalign_rl.data import check_source

    cfg, changes = shrunk(tmp_path, "sd15_stage1.yaml")
    source = changes["data.source"]
    assert source.endswith(".jsonl")
    pairs = check_source(load_config(REPO / "configs" / "sd15_stage1.yaml", [f"data.source={source}"]).data)
    # 2 workers x 2 pairs x grad_accum 4 x 2 steps: both steps in the first epoch
    assert len(pairs) == 2 * 2 * cfg.train.grad_accum * 2
    for kind, suffix in (("pairs.csv", ".csv"), ("folder", "")):
        written = smoke.write_pairs(kind, tmp_path / kind.replace(".", "_"), 3, 32)
        assert written.suffix == suffix
        assert len(check_source(load_config(REPO / "configs" / "sd15_stage1.yaml",
                                            [f"data.source={written}"]).data)) == 3


def test_a_grpo_batch_holds_one_group_and_reward_actors_stay(tmp_path):
    from longalign_rl.launch import required_resources

    overrides = ["algorithm.name=grpo", "train.batch_size=8", "reward.num_actors=3", "reward.num_cpus=2",
                 "reward.name=tests.plugins.my_reward:BrightPixels", "reward.kwargs={}"]
    _, changes = shrunk(tmp_path, "tiny.yaml", *overrides)
    assert changes["train.batch_size"] == 4 and changes["reward.num_actors"] == 1
    # 2 workers + 1 sampler actor + 1 reward actor fit the 2 CPUs a smoke run assumes
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides + smoke.as_overrides(changes))
    assert required_resources(cfg)["CPU"] <= smoke.CPUS and cfg.reward.num_cpus == 0.5


def test_an_unknown_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--size: must be one of tiny, real"):
        shrunk(tmp_path, "tiny.yaml", size="huge")


def test_overrides_round_trip_through_the_config_loader(tmp_path):
    _, changes = shrunk(tmp_path, "longalign_reference.yaml")
    cfg = load_config(REPO / "configs" / "longalign_reference.yaml", smoke.as_overrides(changes))
    assert cfg.reward.kwargs == changes["reward.kwargs"] and cfg.model.pretrained == "tiny"
    assert cfg.sampler.train_mode and cfg.lora.dropout == 0.1 and cfg.train.activation_checkpointing


def test_a_real_size_clip_stand_in_is_the_preset_itself_on_random_weights(tmp_path):
    """The mechanism of `--size real` for the transformers presets, on a small architecture
    (the real ViT-H/14 takes 4 GB): the preset loads the folder and scores."""
    import torch

    from rewards.clip import hf_stand_in
    from rewards.tiny import TINY_HF_CLIP

    architecture = {**TINY_HF_CLIP, "text_config": {k: v for k, v in TINY_HF_CLIP["text_config"].items()
                                                     if k != "vocab_size"}}
    name, kwargs = hf_stand_in("denscore", architecture, ("model", "processor"))(
        "real", tmp_path, {"model": "luping-liu/Denscore", "split": "reference", "text_irrelevant_weight": 0.3})
    assert name == "denscore" and kwargs["split"] == "reference" and kwargs["model"] == kwargs["processor"]
    from longalign_rl.registry import get_reward

    reward = get_reward(name, **kwargs)
    out = reward(torch.rand(2, 3, 64, 64), ["a red cube. a blue ball.", "a green square."])
    assert out.total.shape == (2,) and bool(torch.isfinite(out.total).all())
    assert json.loads((tmp_path / "denscore-random" / "config.json").read_text())["projection_dim"] == 32


def test_peak_memory_is_read_for_this_process():
    with smoke.PeakMemory(interval=0.05) as memory:
        block = bytearray(64 * 2**20)  # 64 MB touched
        block[::4096] = b"x" * len(block[::4096])
    count, gb = memory.by_role()["driver"]
    assert count == 1 and gb > 64 / 1024


def test_peak_memory_counts_only_the_actors_that_start_while_it_measures():
    """On a Ray instance shared by runs, an actor of the previous run can still be exiting
    when the next run's measuring begins: it is not one of the new run's processes."""
    import subprocess
    import time

    def actor():  # a process whose command line reads as Ray's does for a trainer worker
        return subprocess.Popen(["bash", "-c", 'exec -a "ray::RayTrainWorker.run" sleep 30'])

    def started(proc):
        import psutil

        while psutil.Process(proc.pid).cmdline()[:1] != ["ray::RayTrainWorker.run"]:
            time.sleep(0.01)

    leftover = actor()
    try:
        started(leftover)
        with smoke.PeakMemory(interval=0.05) as memory:
            new = actor()
            started(new)
            time.sleep(0.2)
        new.kill()
        assert memory.by_role()["trainer worker"][0] == 1
        assert new.pid in memory.peaks and leftover.pid not in memory.peaks
    finally:
        leftover.kill()
