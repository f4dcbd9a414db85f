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


def test_a_capped_reward_sends_no_gradient_from_samples_above_the_cap():
    images = torch.tensor([0.2, 0.7]).view(2, 1, 1, 1).expand(2, 3, 2, 2).clone().requires_grad_()
    out = RewardOutput(total=images.mean(dim=(1, 2, 3)), components={})
    loss = reward_loss(out, cap=0.5)
    assert math.isclose(float(loss.detach()), 0.5 * (1 - (0.2 + 0.5) / 2), rel_tol=1e-6)
    loss.backward()
    assert (images.grad[0] < 0).all() and (images.grad[1] == 0).all()


def test_the_kl_style_penalty_is_the_squared_distance_to_the_starting_model_at_the_replayed_steps():
    """With the LoRA's up-projections non-zero the replayed predictions differ from the
    adapter-disabled model's; the penalty is their mean squared difference over the replayed
    steps, it has a gradient to the LoRA, and it is 0 for the starting model itself."""
    import contextlib

    from longalign_rl.algorithms.reward_backprop import replay, reward_backprop_step
    from longalign_rl.config import LoRAConfig
    from longalign_rl.lora import make_trainable
    from longalign_rl.models import load_components
    from longalign_rl.sampling.ddim import guided_eps
    from tests.unit.test_replay import PROMPTS, make_sampler

    parts = load_components("tiny")
    make_trainable(parts.unet, LoRAConfig(rank=4, alpha=4.0, dropout=0.0))
    unet = parts.unet

    @contextlib.contextmanager
    def start():
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()

    rollout = make_sampler(parts, num_steps=8, num_grad_steps=2).sample(PROMPTS, seed=3)
    _, zero = replay(unet, rollout, 5.0, family=parts.family, reference=start)
    assert zero.shape == (2,) and float(zero.detach().abs().max()) == 0.0  # lora_B starts at 0: the starting model
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    latents, distance = replay(unet, rollout, 5.0, family=parts.family, reference=start)
    expected = []
    with torch.no_grad():
        for k, t in enumerate(rollout.grad_timesteps.tolist()):
            x = rollout.grad_latents[:, k]
            now = guided_eps(unet, x, t, rollout.cond, rollout.uncond, 5.0, parts.family)
            with start() as s:
                before = guided_eps(s, x, t, rollout.cond, rollout.uncond, 5.0, parts.family)
            expected.append((now - before).square().flatten(1).mean(dim=1))
    torch.testing.assert_close(distance.detach(), torch.stack(expected).mean(dim=0))
    assert float(distance.min()) > 0
    distance.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for n, p in unet.named_parameters() if "lora_" in n)
    # through the step: the loss adds kl_weight times the mean distance, and logs it as "kl"
    reward = lambda images, prompts: RewardOutput(total=images.mean(dim=(1, 2, 3)), components={})  # noqa: E731
    plain, _ = reward_backprop_step(unet, parts.vae, reward, rollout, 5.0, family=parts.family)
    with_kl, stats = reward_backprop_step(unet, parts.vae, reward, rollout, 5.0, family=parts.family, kl_weight=2.0,
                                          reference=start)
    torch.testing.assert_close(with_kl.detach() - plain.detach(), 2.0 * distance.detach().mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["kl"], distance.detach())
