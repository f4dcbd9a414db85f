"""A trainer's forward pass and its recompute agree (issue 21).

With activation checkpointing the backward pass re-runs each UNet block's forward pass, and
that recompute must drop exactly as the forward pass did. The shipped defaults (LoRA
dropout 0.1, checkpointing on: the paper's values) crashed at the first update with
`CheckpointError: Recomputed values ... different metadata`: the replay switched dropout
off around its forward pass only, so the recompute, later, dropped. Here every combination
of LoRA dropout, `sampler.train_mode`, activation checkpointing and precision runs the
trainer's own set-up (training/engine.py `prepare_unet`) and update of each algorithm
(reward backpropagation, the policy-gradient recompute, stage 1's denoising loss) on the
tiny model, and its gradient must equal the one computed without checkpointing: the same
masks in forward and recompute, or none in both.
"""

import copy
import itertools

import pytest
import torch

from longalign_rl.algorithms.denoising import denoising_loss
from longalign_rl.algorithms.policy_gradient import policy_step_loss
from longalign_rl.algorithms.reward_backprop import reward_backprop_step
from longalign_rl.config import load_config
from longalign_rl.lora import load_trainable_state_dict, trainable_state_dict
from longalign_rl.models import DTYPES
from longalign_rl.registry import get_reward
from longalign_rl.sampling.ddim import dropout_layers, set_dropout
from longalign_rl.sampling.sampler import build_sampler, generate_latents, sample_trajectory
from longalign_rl.training.engine import prepare_unet

PROMPTS = ["a red cube. a blue ball on the left.", "two green squares. a yellow triangle."]
COMBINATIONS = list(itertools.product([0.0, 0.1], [False, True], [False, True], ["fp32", "bf16"]))
IDS = [f"dropout{d}-{'train_mode' if m else 'eval'}-{'ckpt' if c else 'nockpt'}-{p}" for d, m, c, p in COMBINATIONS]
# The default run takes a covering array of the four switches: every value of every pair of
# them meets in some case (5 of 16; 0000 and the rows with one 0), the shipped defaults and
# issue 21's crash (dropout 0.1, eval, checkpointing, bf16) among them; `-m slow` runs all 16.
COVERING = {(0.0, False, False, "fp32"), (0.0, True, True, "bf16"), (0.1, False, True, "bf16"),
            (0.1, True, False, "bf16"), (0.1, True, True, "fp32")}


def cases(combinations, ids, covering):
    return [pytest.param(*c, id=i, marks=() if c in covering else pytest.mark.slow) for c, i in zip(combinations, ids)]


STAGE1 = [(d, c, p) for d, m, c, p in COMBINATIONS if not m]
STAGE1_IDS = [i.replace("-eval", "") for i, (_, m, _, _) in zip(IDS, COMBINATIONS) if not m]
# three switches: 4 of 8 cover every pair (000, 011, 101, 110)
STAGE1_COVERING = {(0.0, False, "fp32"), (0.0, True, "bf16"), (0.1, False, "bf16"), (0.1, True, "fp32")}


def config(dropout, train_mode, checkpointing, precision, *more):
    return load_config("configs/tiny.yaml", [f"lora.dropout={dropout}", f"sampler.train_mode={str(train_mode).lower()}",
                                             f"train.activation_checkpointing={str(checkpointing).lower()}",
                                             f"train.precision={precision}", f"sampler.precision={precision}",
                                             "sampler.num_steps=4", *more])


def trainer_unet(cfg, parts):
    """The trainer's UNet as a worker builds it (prepare_unet), in the engine's precision
    (DeepSpeed's bf16 mode casts the module), with a LoRA that is not zero, so that the
    LoRA and its dropout change what the UNet computes."""
    torch.manual_seed(0)
    unet = copy.deepcopy(parts.unet)
    prepare_unet(cfg, unet, torch.device("cpu"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return unet.to(DTYPES[cfg.train.precision])


def sampler_like(cfg, parts, unet):
    """A sampler actor holding the trainer's weights (as published after a sync)."""
    from longalign_rl.lora import make_trainable

    sampler_parts = copy.deepcopy(parts)
    make_trainable(sampler_parts.unet, cfg.lora)
    load_trainable_state_dict(sampler_parts.unet, trainable_state_dict(unet, cfg.lora), cfg.lora)
    sampler = build_sampler(cfg.sampler, sampler_parts, prompts=cfg.prompts)
    sampler.unet.eval().requires_grad_(False)  # as sampling/group.py holds it
    return sampler


def gradients(unet, loss_fn, checkpointing: bool) -> dict[str, torch.Tensor]:
    unet.zero_grad(set_to_none=True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    loss_fn().backward()
    return {n: p.grad.detach().float().clone() for n, p in unet.named_parameters() if p.grad is not None}


def assert_same_as_without_checkpointing(unet, loss_fn, checkpointing: bool):
    """The gradient of `loss_fn` under `checkpointing` equals the one without it (then: is not zero)."""
    grads = gradients(unet, loss_fn, checkpointing)
    assert grads and any(g.abs().sum() > 0 for g in grads.values())  # the loss reaches the LoRA
    if not checkpointing:
        return
    reference = gradients(unet, loss_fn, checkpointing=False)
    assert grads.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("dropout,train_mode,checkpointing,precision", cases(COMBINATIONS, IDS, COVERING))
def test_reward_backprop_update(tiny_parts, dropout, train_mode, checkpointing, precision):
    cfg = config(dropout, train_mode, checkpointing, precision)
    unet = trainer_unet(cfg, tiny_parts)
    rollout = sampler_like(cfg, tiny_parts, unet).sample(PROMPTS, seed=3)
    vae = copy.deepcopy(tiny_parts.vae).to(DTYPES[cfg.train.precision])
    reward = get_reward("tiny_clip")

    def loss():
        value, stats = reward_backprop_step(unet, vae, reward, rollout, cfg.sampler.guidance_scale, train_mode)
        # the trainer replays what the sampler drew, dropout included: not one value off
        assert float(stats["replay_error"]) == 0.0
        return value

    assert_same_as_without_checkpointing(unet, loss, checkpointing)


@pytest.mark.parametrize("dropout,train_mode,checkpointing,precision", cases(COMBINATIONS, IDS, COVERING))
def test_policy_gradient_update(tiny_parts, dropout, train_mode, checkpointing, precision):
    cfg = config(dropout, train_mode, checkpointing, precision, "algorithm.name=ddpo")
    unet = trainer_unet(cfg, tiny_parts)
    traj = sample_trajectory(sampler_like(cfg, tiny_parts, unet), PROMPTS, seed=5, eta=1.0)
    advantages = torch.tensor([1.0, -1.0])

    def loss():
        total = 0.0
        for k in range(2):  # two of the recorded steps: the same path as all of them
            value, stats = policy_step_loss(unet, traj, k, advantages, cfg.sampler.guidance_scale, 1e-4, 5.0,
                                            train_mode=train_mode)
            # unchanged weights, the sampler's masks: the ratio is 1 (bf16 rounds the means)
            torch.testing.assert_close(stats["ratio"], torch.ones(2), rtol=0, atol=2e-5 if precision == "fp32" else 2e-2)
            total = total + value
        return total

    assert_same_as_without_checkpointing(unet, loss, checkpointing)


@pytest.mark.parametrize("dropout,checkpointing,precision", cases(STAGE1, STAGE1_IDS, STAGE1_COVERING))
def test_stage1_update_and_its_validation(tiny_parts, dropout, checkpointing, precision):
    """Stage 1 trains with its dropout on; validation in between (rank 0 samples with the
    trainer's own UNet, dropout off) leaves it on for the next update."""
    cfg = config(dropout, False, checkpointing, precision, "stage=1", "data.source=shapesworld.plugin:pairs")
    unet = trainer_unet(cfg, tiny_parts)
    assert all(m.training for m in dropout_layers(unet) if m.p > 0)
    dtype = DTYPES[cfg.train.precision]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    cond = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    scheduler = __import__("diffusers").DDPMScheduler.from_config(tiny_parts.scheduler_config)

    def loss():
        torch.manual_seed(7)  # the same dropout masks in both runs
        return denoising_loss(unet, scheduler, latents, cond, torch.Generator().manual_seed(0))[0]

    sampler = build_sampler(cfg.sampler, copy.deepcopy(tiny_parts), prompts=cfg.prompts)
    sampler.unet = unet  # what training/denoising.py validates with
    generate_latents(sampler, PROMPTS, [0, 1])
    assert all(m.training for m in dropout_layers(unet) if m.p > 0)  # still on after validation
    assert_same_as_without_checkpointing(unet, loss, checkpointing)


def test_a_replay_with_dropout_switched_the_wrong_way_is_an_error_not_a_silent_mismatch(tiny_parts):
    cfg = config(0.1, False, True, "fp32")
    unet = trainer_unet(cfg, tiny_parts)
    rollout = sampler_like(cfg, tiny_parts, unet).sample(PROMPTS, seed=3)
    set_dropout(unet, True)  # something turned the trainer's dropout on: its masks are not the sampler's
    with pytest.raises(RuntimeError, match=r"dropout layers of the trainer's UNet are on.*set_dropout\(unet, False\)"):
        reward_backprop_step(unet, tiny_parts.vae, get_reward("tiny_clip"), rollout, 5.0, False)


def test_sampling_switches_dropout_only_without_a_graph(tiny_parts):
    from longalign_rl.sampling.ddim import dropout_masks

    with pytest.raises(RuntimeError, match="set_dropout once and replay_dropout"):
        with dropout_masks(tiny_parts.unet, 0):
            pass


def test_the_default_cases_cover_every_pair_of_switches():
    """What the covering arrays promise: each value pair of any two switches is in a default case."""
    for table, covering in ((COMBINATIONS, COVERING), (STAGE1, STAGE1_COVERING)):
        width = len(table[0])
        for i, j in itertools.combinations(range(width), 2):
            assert {(c[i], c[j]) for c in covering} == {(c[i], c[j]) for c in table}, (i, j)
