"""Our config -> DeepSpeed's config dict, checked by hand and by DeepSpeed's own parser.

`deepspeed.runtime.config.DeepSpeedConfig(config, mpu=None, mesh_device=None)` (0.19.8) has
no world_size argument: it asks `deepspeed.comm.get_rank()` first and, when that fails
(no process group), falls back to world_size 1 before it looks at `mpu`. World size 1 is
checked as it comes; for world size 2 the test stubs `deepspeed.comm.get_rank` (restored by
monkeypatch) and passes an mpu stub reporting a data-parallel world of 2, so that
torch.distributed is never initialised.
"""

import subprocess
import sys

import pytest
import torch

from longalign_rl.config import load_config
from longalign_rl.training.deepspeed_config import deepspeed_config
from tests import REPO

CASES = [
    # overrides, expected (micro batch, grad accum, clip, zero stage, bf16, fp16)
    ([], (8, 1, 0.3, 2, True, False)),
    (["train.batch_size=2", "train.grad_accum=4", "train.precision=fp32", "train.zero_stage=0"], (2, 4, 0.3, 0, False, False)),
    (["train.batch_size=3", "train.grad_clip=1.5", "train.precision=fp16", "train.zero_stage=1"], (3, 1, 1.5, 1, False, True)),
    (["train.grad_accum=2", "train.grad_clip=0", "train.precision=bf16", "train.zero_stage=2"], (8, 2, 0.0, 2, True, False)),
]


@pytest.mark.parametrize("overrides, expected", CASES)
def test_mapping(overrides, expected):
    micro, accum, clip, stage, bf16, fp16 = expected
    d = deepspeed_config(load_config(None, overrides))
    assert d["train_micro_batch_size_per_gpu"] == micro
    assert d["gradient_accumulation_steps"] == accum
    assert d["gradient_clipping"] == clip
    assert d["zero_optimization"]["stage"] == stage
    assert d["bf16"]["enabled"] is bf16
    assert d["fp16"]["enabled"] is fp16
    assert "train_batch_size" not in d  # DeepSpeed derives it from the world size
    assert "optimizer" not in d and "scheduler" not in d  # built by the trainer
    if fp16:
        assert d["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    else:
        assert set(d["fp16"]) == {"enabled"}
    if stage > 0:
        assert d["zero_optimization"]["overlap_comm"] is True and d["zero_optimization"]["contiguous_gradients"] is True
    else:
        assert d["zero_optimization"] == {"stage": 0}


def test_policy_gradients_accumulate_one_backward_per_trained_step():
    """GRPO / DDPO call backward once per (micro-step, trained DDIM step): DeepSpeed updates once
    after all of them, and the warm-up counts run steps (inner_epochs updates each)."""
    from longalign_rl.training.deepspeed_config import backward_passes_per_update, updates_per_step

    cfg = load_config(None, ["algorithm.name=grpo", "train.grad_accum=2", "sampler.num_steps=10",
                             "algorithm.timestep_fraction=0.5", "algorithm.inner_epochs=3"])
    assert backward_passes_per_update(cfg) == deepspeed_config(cfg)["gradient_accumulation_steps"] == 10
    assert updates_per_step(cfg) == 3
    rb = load_config(None, ["train.grad_accum=2", "algorithm.inner_epochs=3"])
    assert deepspeed_config(rb)["gradient_accumulation_steps"] == 2 and updates_per_step(rb) == 1


def test_the_dict_is_fresh_each_call():
    cfg = load_config()
    a = deepspeed_config(cfg)
    a["zero_optimization"]["stage"] = 99
    assert deepspeed_config(cfg)["zero_optimization"]["stage"] == 2


def test_does_not_import_deepspeed():
    code = ("import sys; from longalign_rl.config import load_config; "
            "from longalign_rl.training.deepspeed_config import deepspeed_config; "
            "deepspeed_config(load_config()); assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


class DataParallelMPU:
    def __init__(self, world_size):
        self.world_size = world_size

    def get_data_parallel_world_size(self):
        return self.world_size


def parse(d, world_size, monkeypatch):
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    if world_size == 1:
        return DeepSpeedConfig(d)
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    return DeepSpeedConfig(d, mpu=DataParallelMPU(world_size))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("overrides, expected", CASES)
def test_deepspeed_accepts_the_dict(overrides, expected, world_size, monkeypatch):
    micro, accum, clip, stage, bf16, fp16 = expected
    cfg = load_config(None, overrides)
    d = deepspeed_config(cfg)
    ds = parse(d, world_size, monkeypatch)
    assert not torch.distributed.is_initialized()
    assert ds.world_size == world_size
    assert ds.train_micro_batch_size_per_gpu == micro
    assert ds.gradient_accumulation_steps == accum
    assert ds.train_batch_size == micro * accum * world_size
    assert ds.gradient_clipping == clip
    assert ds.zero_optimization_stage == stage
    assert ds.zero_enabled is (stage > 0)
    assert ds.bfloat16_config.enabled is bf16
    assert ds.float16_config.enabled is fp16
    if fp16:
        assert ds.float16_config.loss_scale == 0 and ds.float16_config.initial_scale_power == 16
    if stage > 0:
        assert ds.zero_config.overlap_comm is True and ds.zero_config.contiguous_gradients is True
    assert ds.optimizer_name is None and ds.scheduler_name is None
    assert ds.wall_clock_breakdown is False
    assert ds.steps_per_print == 10**9


def test_global_batch_matches_deepspeed_with_num_workers_as_world_size(monkeypatch):
    cfg = load_config()  # reference: 6 workers x 8 = 48
    ds = parse(deepspeed_config(cfg), cfg.train.num_workers, monkeypatch)
    assert ds.train_batch_size == cfg.global_batch == 48
    cfg = load_config(None, ["train.num_workers=2", "sampler.num_actors=2", "train.batch_size=3", "train.grad_accum=5"])
    ds = parse(deepspeed_config(cfg), 2, monkeypatch)
    assert ds.train_batch_size == cfg.global_batch == 30
