"""The reward-backprop loss and its handling of bad reward values."""

import math

import torch

from longalign_rl.algorithms.reward_backprop import reward_loss
from longalign_rl.scoring import score
from longalign_rl.registry import RewardOutput


def test_loss_is_half_one_minus_the_mean_reward():
    out = RewardOutput(total=torch.tensor([0.2, 0.4]), components={})
    assert math.isclose(float(reward_loss(out)), 0.5 * (1 - 0.3), rel_tol=1e-6)


def test_a_non_finite_reward_is_left_out_and_sends_no_gradient():
    def reward(images, prompts):  # sample 1 has a NaN reward, with a NaN Jacobian behind it
        return RewardOutput(total=images.mean(dim=(1, 2, 3)) * torch.tensor([1.0, float("nan"), 1.0]),
                            components={})

    images = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1, 1).expand(3, 3, 2, 2).clone().requires_grad_()
    out, finite = score(reward, images, ["a", "b", "c"])
    assert finite.tolist() == [True, False, True]
    loss = reward_loss(out)
    assert math.isclose(float(loss.detach()), 0.5 * (1 - 0.4), rel_tol=1e-6)
    loss.backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad[1] == 0).all() and (images.grad[0] < 0).all()


def test_segment_scores_are_grouped_by_sentence_position():
    from longalign_rl.algorithms.reward_backprop import SEGMENT_POSITIONS, segment_score_stats

    stats = segment_score_stats([torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5])])
    assert len(stats) == SEGMENT_POSITIONS  # the same keys whatever the prompts
    assert torch.allclose(stats["segment_score/1"], torch.tensor([0.1, 0.5]))
    assert torch.allclose(stats["segment_score/3"], torch.tensor([0.3]))
    assert stats["segment_score/4"].numel() == 0
