"""`sampler.train_mode` (issue 13): the reference samples with the LoRA's dropout active.
Here the sampler draws each UNet call's dropout masks from a seed of the chain and the step,
and the trainer draws them again when it replays that step, so that the replay (reward
backpropagation) and the recomputed log-probability (policy gradients) stay exact with
dropout on; without train_mode neither side drops anything. What dropout alone would do to
the replay is measured here too: that is what `replay_error` no longer mixes in."""

import copy
import dataclasses

import pytest
import torch

from longalign_rl.algorithms.policy_gradient import policy_step_loss
from longalign_rl.algorithms.reward_backprop import replay_final_latents
from longalign_rl.config import LoRAConfig, SamplerConfig
from longalign_rl.lora import make_trainable
from longalign_rl.sampling.ddim import dropout_masks, set_dropout
from longalign_rl.sampling.sampler import build_sampler, sample_trajectory

PROMPTS = ["a red cube. a blue ball.", "two green squares on the left."]


def lora_sampler(tiny_parts, train_mode: bool, dropout: float = 0.5):
    parts = copy.deepcopy(tiny_parts)
    torch.manual_seed(0)
    make_trainable(parts.unet, LoRAConfig(rank=4, alpha=4.0, dropout=dropout))
    with torch.no_grad():  # the up-projection starts at zero: make the LoRA (and its dropout) matter
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    cfg = SamplerConfig(num_steps=6, num_grad_steps=2, guidance_scale=5.0, resolution=64, precision="fp32",
                        train_mode=train_mode)
    return build_sampler(cfg, parts)


def test_dropout_masks_are_seeded_and_leave_modes_and_rng_as_they_were(tiny_parts):
    sampler = lora_sampler(tiny_parts, train_mode=True)
    unet = sampler.unet.eval()
    x = torch.randn(1, 4, 8, 8)
    cond = sampler.encoder(PROMPTS[:1])

    def call(seed):
        with torch.no_grad(), dropout_masks(unet, seed):
            return unet(x, 500, encoder_hidden_states=cond).sample

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c, off = call(7), call(7), call(8), call(None)
    torch.testing.assert_close(torch.rand(3), expected_next)  # the global RNG is untouched
    assert torch.equal(a, b)  # the same seed, the same masks
    assert (a - c).abs().max() > 1e-3 and (a - off).abs().max() > 1e-3  # dropout acts, per seed
    assert not any(m.training for m in unet.modules())  # eval mode restored
    unet.train()
    with torch.no_grad(), dropout_masks(unet, None):
        assert not any(m.training for m in unet.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.training for m in unet.modules())


def test_train_mode_sampling_replays_exactly_with_its_dropout(tiny_parts):
    sampler = lora_sampler(tiny_parts, train_mode=True)
    unet = sampler.unet
    rollout = sampler.sample(PROMPTS, seed=3)
    plain = lora_sampler(tiny_parts, train_mode=False).sample(PROMPTS, seed=3)
    assert (rollout.final_latents - plain.final_latents).abs().max() > 1e-3  # dropout changed the chain

    set_dropout(unet.train(), True)  # as in a trainer worker (training/engine.py prepare_unet)
    replayed = replay_final_latents(unet, rollout, 5.0, train_mode=True)
    torch.testing.assert_close(replayed.detach(), rollout.final_latents, rtol=0, atol=1e-5)
    replayed.sum().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert any(g.abs().sum() > 0 for g in grads.values())

    # Activation checkpointing recomputes under the same masks: the same gradient.
    unet.zero_grad()
    unet.enable_gradient_checkpointing()
    try:
        replay_final_latents(unet, rollout, 5.0, train_mode=True).sum().backward()
    finally:
        unet.disable_gradient_checkpointing()
    for n, p in unet.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)

    # The cause measured apart: replaying the same rollout with other masks is off.
    with torch.no_grad():
        other = replay_final_latents(unet, dataclasses.replace(rollout, seeds=[s + 1 for s in rollout.seeds]), 5.0, train_mode=True)
    assert (other - rollout.final_latents).abs().max() > 1e-3


def test_without_train_mode_the_trainers_replay_drops_nothing(tiny_parts):
    sampler = lora_sampler(tiny_parts, train_mode=False)
    rollout = sampler.sample(PROMPTS, seed=4)
    set_dropout(sampler.unet.train(), False)  # a trainer's module: train mode, its LoRA dropout off
    with torch.no_grad():
        replayed = replay_final_latents(sampler.unet, rollout, 5.0)
    torch.testing.assert_close(replayed, rollout.final_latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train_mode", [True, False])
def test_policy_gradient_ratio_is_one_under_the_sampling_weights(tiny_parts, train_mode):
    sampler = lora_sampler(tiny_parts, train_mode=train_mode)
    traj = sample_trajectory(sampler, PROMPTS, seed=5, eta=1.0)
    set_dropout(sampler.unet.train(), train_mode)  # as a trainer worker holds it
    advantages = torch.tensor([1.0, -1.0])
    for k in range(len(traj.indices)):
        _, stats = policy_step_loss(sampler.unet, traj, k, advantages, 5.0, 1e-4, 5.0, train_mode=train_mode)
        torch.testing.assert_close(stats["ratio"], torch.ones(2), rtol=0, atol=2e-5)
    if train_mode:  # recomputed with other masks than the sampler's, the ratio is not 1
        other = dataclasses.replace(traj, seeds=[s + 1 for s in traj.seeds])
        with torch.no_grad():
            _, stats = policy_step_loss(sampler.unet, other, 0, advantages, 5.0, 1e-4, 5.0, train_mode=True)
        assert (stats["ratio"] - 1).abs().max() > 1e-3


def test_the_inference_helper_never_drops(tiny_parts, tmp_path):
    """A run's LoRA loaded by pipeline.load: the layers load_lora_weights adds start in train
    mode, and with lora.dropout > 0 (the reference's 0.1) its images would be random."""
    from longalign_rl.config import load_config, to_yaml
    from longalign_rl.lora import export_for_diffusers
    from longalign_rl.pipeline import load

    sampler = lora_sampler(tiny_parts, train_mode=False)
    cfg = load_config("configs/tiny.yaml", ["lora.dropout=0.5"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    (tmp_path / "metrics.jsonl").write_text("")
    export_for_diffusers(sampler.unet, cfg.lora, tmp_path / "lora")
    pipe = load(tmp_path, device="cpu")
    assert pipe.longalign["weights"] == "lora" and not any(m.training for m in pipe.unet.modules())
    first, second = (pipe.generate(PROMPTS[:1], [0], num_inference_steps=3, output_type="pt") for _ in range(2))
    assert torch.equal(first, second)
