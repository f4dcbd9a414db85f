"""The non-finite guard's verdict on one step (training/worker.py; issue 10, item 2)."""

import math

import torch

from longalign_rl.training.worker import GUARDED, nonfinite_cause, weights_finite


def test_names_every_non_finite_field_and_the_weights():
    ok = {"loss": 0.4, "grad_norm": 0.1, "reward": 0.2, "lr": 1e-3}
    assert nonfinite_cause(ok, True) is None
    assert nonfinite_cause({**ok, "reward": math.nan}, True) == "reward"
    assert nonfinite_cause({**ok, "loss": math.inf, "grad_norm": math.nan}, False) == "loss, grad_norm, weights"
    # fields outside the guard (a hook's metric, a missing segment position) never stop a run
    assert nonfinite_cause({**ok, "segment_score/7": math.nan}, True) is None
    # an fp16 run leaves the grad norm to its loss scaler
    keys = tuple(k for k in GUARDED if k != "grad_norm")
    assert nonfinite_cause({**ok, "grad_norm": math.inf}, True, keys) is None


def test_weights_finite_looks_at_what_trains_only():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    assert weights_finite(module)
    module[0].weight.requires_grad_(False)
    with torch.no_grad():
        module[0].weight[0, 0] = math.nan
    assert weights_finite(module)  # frozen
    with torch.no_grad():
        module[1].bias[1] = math.inf
    assert not weights_finite(module)
