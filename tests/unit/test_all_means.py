"""The per-step record's all-worker means (training/worker.py), on a one-process gloo group."""

import math

import pytest
import torch
import torch.distributed as dist

from longalign_rl.training.worker import all_means


@pytest.fixture()
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_means_weight_every_value_and_leave_out_empty_sentence_positions(group):
    stats = {"reward": [torch.tensor([0.0, 1.0]), torch.tensor([2.0])], "segment_score/1": [torch.tensor([0.5])],
             "segment_score/7": [torch.tensor([])], "reward_nonfinite": [torch.tensor([])]}
    means = all_means(stats, torch.device("cpu"))
    assert means["reward"] == pytest.approx(1.0) and means["segment_score/1"] == pytest.approx(0.5)
    assert "segment_score/7" not in means  # no prompt had a 7th sentence: not a NaN in metrics.jsonl
    assert math.isnan(means["reward_nonfinite"])  # anything else without values stays visible as NaN
