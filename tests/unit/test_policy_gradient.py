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
from longalign_rl.sampling.stochastic import (gaussian_kl, step_log_prob, step_mean, stochastic_step,
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
            x_next, recorded, _ = stochastic_step(x, eps, float(a[i]), float(b[i]), float(sigma[i]), g)
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


def test_recording_a_subset_of_steps_draws_the_same_chain(tiny_parts):
    """Which steps are recorded comes from the seed and does not change the noise: recording 2
    of 4 steps gives the same images and, at those steps, the same records as recording all."""
    from longalign_rl.config import SamplerConfig
    from longalign_rl.sampling.sampler import build_sampler, sample_trajectory

    cfg = SamplerConfig(num_steps=4, num_grad_steps=1, guidance_scale=5.0, resolution=64, precision="fp32")
    sampler = build_sampler(cfg, tiny_parts)
    prompts = ["a red cube.", "a green cone."]
    full = sample_trajectory(sampler, prompts, seed=7, eta=1.0)
    part = sample_trajectory(sampler, prompts, seed=7, eta=1.0, num_recorded=2)
    assert full.indices == [0, 1, 2, 3] and len(part.indices) == 2 and part.indices == sorted(part.indices)
    assert part.latents.shape[1] == part.log_probs.shape[1] == part.timesteps.shape[0] == part.sigma.shape[0] == 2
    torch.testing.assert_close(part.final_latents, full.final_latents)
    torch.testing.assert_close(part.log_probs, full.log_probs[:, part.indices])
    torch.testing.assert_close(part.next_latents, full.next_latents[:, part.indices])
    assert torch.equal(part.timesteps, full.timesteps[part.indices])
    others = {tuple(sample_trajectory(sampler, prompts, seed=s, eta=1.0, num_recorded=2).indices) for s in range(8)}
    assert len(others) > 1  # the subset varies with the seed
    with pytest.raises(ValueError, match="cannot record 5 steps"):
        sample_trajectory(sampler, prompts, seed=7, eta=1.0, num_recorded=5)


def test_outside_the_sde_window_the_chain_is_deterministic_ddim(tiny_parts):
    """algorithm.sde_window: steps outside it add no noise and are never recorded: replaying
    plain DDIM (eta 0) from the last recorded step's output lands on the final latents."""
    from longalign_rl.config import SamplerConfig
    from longalign_rl.sampling.sampler import build_sampler, sample_trajectory

    cfg = SamplerConfig(num_steps=6, num_grad_steps=1, guidance_scale=5.0, resolution=64, precision="fp32")
    sampler = build_sampler(cfg, tiny_parts)
    prompts = ["a red cube.", "a green cone."]
    a, b, sigma = stochastic_coefficients(sampler.scheduler, 1.0, window=(1, 3))
    full_a, full_b, full_sigma = stochastic_coefficients(sampler.scheduler, 1.0)
    a0, b0 = step_coefficients(sampler.scheduler)
    assert (sigma[1:3] > 0).all() and (sigma[[0, 3, 4, 5]] == 0).all()
    torch.testing.assert_close(a[1:3], full_a[1:3])
    torch.testing.assert_close(b[[0, 3, 4, 5]], b0[[0, 3, 4, 5]])
    traj = sample_trajectory(sampler, prompts, seed=5, eta=1.0, window=(1, 3))
    assert traj.indices == [1, 2]
    x = traj.next_latents[:, -1]
    with torch.no_grad():
        for t in sampler.scheduler.timesteps[3:]:
            eps = guided_eps(sampler.unet, x, t, traj.cond, traj.uncond, 5.0)
            x = sampler.scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(x, traj.final_latents, rtol=1e-4, atol=1e-5)


def test_trained_steps_count_the_window():
    from longalign_rl.algorithms.policy_gradient import sde_steps, trained_steps
    from longalign_rl.config import ConfigError, load_config

    cfg = load_config(None, ["algorithm.name=grpo", "sampler.num_steps=10", "algorithm.sde_window=[0, 0.5]",
                             "algorithm.timestep_fraction=0.4"])
    assert sde_steps(cfg) == (0, 5) and trained_steps(cfg) == 2
    with pytest.raises(ConfigError, match="algorithm.sde_window"):
        load_config(None, ["algorithm.name=grpo", "algorithm.sde_window=[0.6, 0.2]"])


@pytest.fixture()
def lora_sampler(tiny_parts):
    """A sampler over a copy of the tiny UNet with a LoRA adapter (fp32, dropout 0.1)."""
    import copy

    from longalign_rl.config import LoRAConfig, SamplerConfig
    from longalign_rl.lora import make_trainable
    from longalign_rl.sampling.sampler import build_sampler

    parts = copy.deepcopy(tiny_parts)
    make_trainable(parts.unet, LoRAConfig(rank=4, alpha=4.0, dropout=0.1))
    cfg = SamplerConfig(num_steps=4, num_grad_steps=1, guidance_scale=5.0, resolution=64, precision="fp32")
    return build_sampler(cfg, parts)


def adapter_off(unet):
    import contextlib

    @contextlib.contextmanager
    def context():
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()
    return context


def test_the_trainers_first_ratio_is_one_and_its_kl_to_the_start_is_zero(lora_sampler):
    """policy_step_loss under the sampling weights: ratio 1 at every recorded step, nothing
    clipped, and (the LoRA's up-projection starts at zero) no KL to the adapter-free model."""
    from longalign_rl.algorithms.policy_gradient import policy_step_loss
    from longalign_rl.sampling.sampler import sample_trajectory

    unet = lora_sampler.unet.eval()
    traj = sample_trajectory(lora_sampler, ["a red cube.", "a blue ball.", "a red cube.", "a blue ball."], seed=1,
                             eta=1.0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for k in range(len(traj.indices)):
        loss, stats = policy_step_loss(unet, traj, k, advantages, 5.0, clip_range=1e-4, advantage_clip=5.0,
                                       kl_weight=0.1, reference=adapter_off(unet))
        torch.testing.assert_close(stats["ratio"], torch.ones(4), rtol=0, atol=2e-5)
        assert stats["clip_fraction"].sum() == 0 and stats["kl"].abs().max() < 1e-10
        loss.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the loss reaches the LoRA
    with torch.no_grad():  # away from the start the KL is positive
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    _, stats = policy_step_loss(unet, traj, 0, advantages, 5.0, 1e-4, 5.0, kl_weight=0.1, reference=adapter_off(unet))
    assert (stats["kl"] > 0).all()
    with pytest.raises(ValueError, match="reference"):
        policy_step_loss(unet, traj, 0, advantages, 5.0, 1e-4, 5.0, kl_weight=0.1)


def test_a_policy_gradient_step_makes_positive_advantage_samples_likelier(lora_sampler):
    """The sign of the update: one small SGD step on the PPO loss raises the log-probability of
    the sample with a positive advantage and lowers that of the negative one."""
    from longalign_rl.algorithms.policy_gradient import policy_step_loss
    from longalign_rl.sampling.sampler import sample_trajectory

    unet = lora_sampler.unet.eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)  # away from zero, so that lora_A gets a gradient too
    traj = sample_trajectory(lora_sampler, ["a red cube.", "a red cube."], seed=2, eta=1.0)
    advantages = torch.tensor([1.0, -1.0])
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    loss = sum(policy_step_loss(unet, traj, k, advantages, 5.0, 10.0, 5.0)[0] for k in range(len(traj.indices)))
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = torch.stack([policy_step_loss(unet, traj, k, advantages, 5.0, 10.0, 5.0)[1]["ratio"]
                             for k in range(len(traj.indices))]).log().sum(0)
    assert after[0] > 0 > after[1], after


def test_non_finite_rewards_get_no_advantage_and_stay_out_of_the_statistics():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0, float("inf"), 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    adv = grpo_advantages(rewards, groups)
    assert adv[1] == 0 and adv[4] == 0
    assert adv[0] > 0 > adv[2] and adv[0] == pytest.approx(-adv[2])  # group 0 from its two finite rewards
    assert adv[3] == 0  # group 1 has one finite reward: nothing to compare it with
    assert (adv[5:] == 0).all()  # equal rewards: no signal
    tracker = PerPromptStatTracker(buffer_size=4, min_count=1)
    out = tracker.update(["a", "a", "b"], torch.tensor([1.0, float("nan"), 3.0]))
    assert out[1] == 0 and tracker.buffers["a"] == type(tracker.buffers["a"])([1.0], maxlen=4)
    assert torch.equal(tracker.update(["a"], torch.tensor([float("nan")])), torch.zeros(1))


def test_a_shared_start_gives_a_group_one_starting_noise_and_different_steps(tiny_parts):
    from longalign_rl.config import SamplerConfig
    from longalign_rl.sampling.sampler import build_sampler, sample_trajectory

    cfg = SamplerConfig(num_steps=3, num_grad_steps=1, guidance_scale=5.0, resolution=64, precision="fp32")
    sampler = build_sampler(cfg, tiny_parts)
    prompts = ["a red cube."] * 2 + ["a green cone."] * 2
    traj = sample_trajectory(sampler, prompts, seed=5, eta=1.0, shared_start=2)
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0]) and torch.equal(traj.latents[2, 0], traj.latents[3, 0])
    assert not torch.equal(traj.latents[0, 0], traj.latents[2, 0])
    assert not torch.equal(traj.final_latents[0], traj.final_latents[1])  # the steps' noise differs
    independent = sample_trajectory(sampler, prompts, seed=5, eta=1.0)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])
    with pytest.raises(ValueError, match="runs of 3"):
        sample_trajectory(sampler, prompts, seed=5, eta=1.0, shared_start=3)


@pytest.mark.parametrize("lora", [True, False])
def test_the_kl_reference_is_the_starting_model(tiny_parts, lora):
    """With a LoRA the reference is the UNet with its adapter disabled (and enabled again after);
    fine-tuning the whole UNet, a frozen copy taken before training moves the weights."""
    import copy
    from types import SimpleNamespace

    from longalign_rl.config import LoRAConfig
    from longalign_rl.lora import make_trainable
    from longalign_rl.training.stage2 import SamplerFed

    unet = copy.deepcopy(tiny_parts.unet)
    make_trainable(unet, LoRAConfig(enabled=lora, rank=4, alpha=4.0, dropout=0.0))
    body = SimpleNamespace(ctx=SimpleNamespace(engine=SimpleNamespace(module=unet)),
                           cfg=SimpleNamespace(lora=SimpleNamespace(enabled=lora)))
    reference = SamplerFed.make_reference(body)  # policy gradients' KL and reward backprop's penalty
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(500)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    before = unet(x, t, encoder_hidden_states=context).sample.detach()
    with torch.no_grad():  # training moves the weights
        for name, p in unet.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(0.05 * torch.randn_like(p))
    moved = unet(x, t, encoder_hidden_states=context).sample.detach()
    assert not torch.allclose(moved, before)
    with reference() as start:
        torch.testing.assert_close(start(x, t, encoder_hidden_states=context).sample, before)
        assert not any(p.requires_grad for p in start.parameters()) or lora
    torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample, moved)  # adapter back on


def test_one_stochastic_step_draws_without_a_next_state_and_scores_with_one():
    """stochastic_step (ddpo-pytorch's shape): what it draws it scores the same when handed that
    state back, with a mean that carries the gradient of eps; a step without noise has no density."""
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g).requires_grad_()
    drawn, log_prob, mean = stochastic_step(x, eps, 0.9, 0.3, 0.2, generator=torch.Generator().manual_seed(5))
    same, scored, mean2 = stochastic_step(x, eps, 0.9, 0.3, 0.2, x_next=drawn)
    assert same is drawn and torch.equal(scored, log_prob) and torch.equal(mean, mean2)
    scored.sum().backward()
    assert eps.grad is not None and bool(eps.grad.abs().sum() > 0)
    _, none, _ = stochastic_step(x, eps.detach(), 0.9, 0.3, 0.0, generator=torch.Generator().manual_seed(5))
    assert none is None
