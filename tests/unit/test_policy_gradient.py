"""The pure pieces of policy-gradient training (issue 11): stochastic DDIM with
log-probabilities, GRPO / DDPO advantages, the PPO-clip loss and the KL penalty. The
invariants the issue asks for: the first ratio is 1, GRPO advantages have zero mean per
group, the KL term is 0 at the start, clipping engages when the ratio leaves the range."""

import math

import pytest
import torch

from longalign_rl.algorithms.policy_gradient import PerPromptStatTracker, grpo_advantages, ppo_clip_loss
from longalign_rl.models import make_scheduler
from longalign_rl.sampling.ddim import guided_eps, step_coefficients
from longalign_rl.sampling.stochastic import (gaussian_kl, sample_step, step_log_prob, step_mean,
                                              stochastic_coefficients)


@pytest.fixture(scope="module")
def scheduler(tiny_parts):
    s = make_scheduler(tiny_parts.scheduler_config, timestep_spacing="trailing")
    s.set_timesteps(10)
    return s


def test_coefficients_follow_the_scheduler_and_reduce_to_ddim_at_eta_0(scheduler):
    a, b, sigma = stochastic_coefficients(scheduler, eta=1.0)
    x, eps, z = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        expected = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(a[i] * x + b[i] * eps + sigma[i] * z, expected)
    assert (sigma[:-1] > 0).all()
    a0, b0 = step_coefficients(scheduler)
    a_small, b_small, sigma_small = stochastic_coefficients(scheduler, eta=1e-6)
    torch.testing.assert_close(a_small, a0)
    torch.testing.assert_close(b_small, b0)
    with pytest.raises(ValueError, match="sampler.eta must be > 0"):
        stochastic_coefficients(scheduler, eta=0.0)


def test_log_prob_is_the_gaussian_density_per_element():
    mean, x = torch.zeros(2, 3), torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    sigma = 0.5
    expected = torch.distributions.Normal(mean, sigma).log_prob(x).mean(1)
    torch.testing.assert_close(step_log_prob(x, mean, sigma), expected)


def test_recomputed_log_prob_under_the_sampling_weights_equals_the_samplers(tiny_parts, scheduler):
    """What the trainer recomputes from the recorded (x_i, x_{i+1}) with the same weights is
    what the sampler recorded, so the first PPO ratio is 1."""
    unet = tiny_parts.unet
    a, b, sigma = stochastic_coefficients(scheduler, eta=1.0)
    cond, uncond = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps[:3]):
            eps = guided_eps(unet, x, t, cond, uncond, 5.0)
            x_next, recorded = sample_step(x, eps, float(a[i]), float(b[i]), float(sigma[i]), g)
            recomputed = step_log_prob(x_next, step_mean(x, guided_eps(unet, x, t, cond, uncond, 5.0),
                                                         float(a[i]), float(b[i])), float(sigma[i]))
            torch.testing.assert_close(recomputed, recorded)
            loss, stats = ppo_clip_loss(recomputed, recorded, torch.randn(2), clip_range=1e-4)
            assert torch.allclose(stats["ratio"], torch.ones(2)) and stats["clip_fraction"].sum() == 0
            x = x_next


def test_grpo_advantages_have_zero_mean_and_unit_spread_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0, 0.5, 0.7])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv = grpo_advantages(rewards, groups)
    for g in range(3):
        members = adv[groups == g]
        assert abs(float(members.mean())) < 1e-5
        assert float(members.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert adv[0] < adv[1] < adv[2]
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_ddpo_tracker_uses_the_batch_until_a_prompt_has_history_and_survives_a_save():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    first = tracker.update(["a", "b"], torch.tensor([1.0, 3.0]))  # one sample each: batch statistics
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    second = tracker.update(["a", "b"], torch.tensor([2.0, 3.0]))  # now per prompt: a has [1, 2], b [3, 3]
    assert second[0] == pytest.approx(1.0, abs=1e-4) and second[1] == pytest.approx(0.0, abs=1e-4)
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    torch.testing.assert_close(restored.update(["a"], torch.tensor([5.0])), tracker.update(["a"], torch.tensor([5.0])))


def test_clipping_engages_when_the_ratio_leaves_the_range():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([0.5, 0.95, 1.05, 2.0])).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, 1.0, 1.0])
    loss, stats = ppo_clip_loss(new, old, advantages, clip_range=0.2)
    assert stats["clip_fraction"].tolist() == [1.0, 0.0, 0.0, 1.0]
    loss.backward()
    # a positive advantage: the ratio 2.0 is clipped (no gradient), 0.5 is not (pessimistic bound)
    assert new.grad[3] == 0 and new.grad[0] != 0 and new.grad[1] != 0
    assert stats["approx_kl"][3] == pytest.approx(0.5 * math.log(2.0) ** 2)


def test_kl_to_the_reference_is_zero_at_the_start_and_grows_with_the_distance():
    mean = torch.randn(2, 4, 8, 8)
    assert torch.equal(gaussian_kl(mean, mean.clone(), 0.3), torch.zeros(2))
    moved = gaussian_kl(mean + 0.1, mean, 0.3)
    torch.testing.assert_close(moved, torch.full((2,), 0.01 / (2 * 0.09)))


def test_a_recorded_trajectory_gives_ratio_one_when_replayed_with_the_sampling_weights(tiny_parts):
    """Through the sampler: every recorded step's log-probability is what a trainer recomputes
    from (x_i, x_{i+1}) with the same weights; the chain ends where the records say."""
    from longalign_rl.config import SamplerConfig
    from longalign_rl.sampling.sampler import build_sampler, sample_trajectory

    cfg = SamplerConfig(num_steps=4, num_grad_steps=1, guidance_scale=5.0, resolution=64, precision="fp32")
    sampler = build_sampler(cfg, tiny_parts)
    prompts = ["a red cube. a blue ball on the left.", "a green cone."]
    traj = sample_trajectory(sampler, prompts, seed=3, eta=1.0)
    assert traj.latents.shape[:2] == traj.next_latents.shape[:2] == (2, 4) and traj.log_probs.shape == (2, 4)
    torch.testing.assert_close(traj.next_latents[:, -1], traj.final_latents)
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1])  # a chain
    with torch.no_grad():
        for i, t in enumerate(traj.timesteps):
            eps = guided_eps(sampler.unet, traj.latents[:, i], t, traj.cond, traj.uncond, 5.0)
            mean = step_mean(traj.latents[:, i], eps, float(traj.a[i]), float(traj.b[i]))
            recomputed = step_log_prob(traj.next_latents[:, i], mean, float(traj.sigma[i]))
            torch.testing.assert_close(recomputed, traj.log_probs[:, i], rtol=1e-5, atol=1e-5)
    again = sample_trajectory(sampler, prompts, seed=3, eta=1.0)
    assert torch.equal(again.final_latents, traj.final_latents)  # a pure function of (weights, prompts, seed)
    assert not torch.equal(sample_trajectory(sampler, prompts, seed=4, eta=1.0).final_latents, traj.final_latents)
