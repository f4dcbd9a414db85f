"""Reward backpropagation by trajectory replay (docs/method.md section 3). Pure torch.

The reference runs the whole 50-step chain in the trainer, with gradient at 5 steps whose
UNet *inputs* are detached. Because those inputs are detached and every DDIM update is
linear, the final latent depends on the weights only through the guided noise predictions
at the gradient steps:

    x0(theta) = x0_recorded + sum_k c_k * (eps_k(theta; x_{t_k}) - eps_k_recorded)

Its value equals the recorded x0 when the weights are the sampler's, and its gradient is
the reference gradient exactly. So the trainer re-runs only the K guided UNet calls, the
VAE decode and the reward.
"""

from __future__ import annotations

import torch

from longalign_rl.registry import Algorithm
from longalign_rl.sampling.ddim import batch_dropout_seed, dropout_seed, guided_eps, replay_dropout
from longalign_rl.scoring import score
from longalign_rl.types import RewardOutput, Rollout
from longalign_rl.vae import decode


def replay_final_latents(unet, rollout: Rollout, guidance_scale: float, train_mode: bool = False,
                         family=None) -> torch.Tensor:
    """The rollout's final latents as a function of the UNet's weights (with gradient); see replay."""
    return replay(unet, rollout, guidance_scale, train_mode, family)[0]


def replay(unet, rollout: Rollout, guidance_scale: float, train_mode: bool = False, family=None,
           reference=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rollout's final latents as a function of the UNet's weights (with gradient), and,
    given `reference()` (a context that yields the starting model, as the policy gradients'
    KL uses), the squared distance of the guided predictions to the starting model's at the
    replayed steps, averaged over steps and elements, per sample [B] (with gradient): the KL
    between the two models' steps, up to the step's own factor (their means differ by b_k
    times the predictions' difference).
    `train_mode` (sampler.train_mode): the rollout was sampled with the LoRA's dropout on,
    so each replayed call draws that step's masks again (ddim.replay_dropout); otherwise
    dropout is off, as it was in the sampler. Either way `unet`'s dropout layers must be set
    to match beforehand (ddim.set_dropout; training/engine.py does it once), so that an
    activation-checkpointing recompute in the backward pass drops as this forward pass did."""
    device = next(unet.parameters()).device
    cond, uncond = rollout.cond.to(device), rollout.uncond.to(device)
    latents = rollout.final_latents.to(device)
    distances = []
    for k, t in enumerate(rollout.grad_timesteps.tolist()):
        x_k = rollout.grad_latents[:, k].to(device)  # a recorded tensor: no graph behind it
        seed = dropout_seed(batch_dropout_seed(rollout.seeds), rollout.grad_indices[k]) if train_mode else None
        with replay_dropout(unet, seed):
            eps_k = guided_eps(unet, x_k, t, cond, uncond, guidance_scale, family)
        recorded = rollout.grad_eps[:, k].to(device)
        latents = latents + float(rollout.coeffs[k]) * (eps_k.to(latents.dtype) - recorded)
        if reference is not None:
            with torch.no_grad(), reference() as start:
                eps_start = guided_eps(start, x_k, t, cond, uncond, guidance_scale, family)
            distances.append((eps_k.float() - eps_start.float()).square().flatten(1).mean(dim=1))
    return latents, (torch.stack(distances).mean(dim=0) if distances else None)


def reward_loss(out: RewardOutput, cap: float | None = None) -> torch.Tensor:
    """The reference loss: 0.5 * (1 - mean reward). A cosine reward lies in [-1, 1].

    Samples whose reward is NaN or infinite are left out of the mean (see scoring.score).
    `cap` (algorithm.reward_cap): each sample's reward counts up to it, so a sample already
    above it sends no gradient: the reward cannot be pushed further on that prompt.
    """
    finite = torch.isfinite(out.total)
    total = torch.where(finite, out.total, torch.zeros_like(out.total))
    if cap is not None:
        total = total.clamp(max=cap)
    return 0.5 * (1.0 - total.sum() / finite.sum().clamp(min=1))


# Per-sentence scores are logged for the first this many sentence positions.
SEGMENT_POSITIONS = 8


def segment_score_stats(segment_scores: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """"segment_score/i": the scores of every prompt's i-th sentence (1-based); always the
    same keys, so every worker logs the same statistics. A low score at a position says
    which sentences of long prompts are not shown yet."""
    stats = {f"segment_score/{i + 1}": [] for i in range(SEGMENT_POSITIONS)}
    for scores in segment_scores or []:
        for i, value in enumerate(scores[:SEGMENT_POSITIONS].tolist()):
            stats[f"segment_score/{i + 1}"].append(value)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in stats.items()}


def reward_backprop_step(unet, vae, reward, rollout: Rollout, guidance_scale: float, train_mode: bool = False,
                         statistics=None, family=None, kl_weight: float = 0.0, reference=None,
                         reward_cap: float | None = None):
    """Loss (with graph) and per-sample statistics for one rollout. `replay_error`, the
    largest |replayed - recorded| final latent, is what the policy lag (and the precision
    of the two sides' arithmetic) changed: dropout is the sampler's, draw for draw.
    `statistics`: the reward's batch statistics summed over every worker (scoring.score).
    `family`: the model's (Components.family), which reads the conditioning back.
    The optional regularisers (algorithm.kl_weight, algorithm.reward_cap): kl_weight times
    `replay`'s distance to the starting model (`reference()`), and the reward capped."""
    if kl_weight > 0 and reference is None:
        raise ValueError("kl_weight > 0 needs the reference model")
    latents, distance = replay(unet, rollout, guidance_scale, train_mode, family, reference if kl_weight > 0 else None)
    replay_error = (latents.detach() - rollout.final_latents.to(latents.device)).abs().max()
    out, finite = score(reward, decode(vae, latents), rollout.prompts, statistics)
    stats = {"reward": out.total.detach().float()[finite], "replay_error": replay_error.reshape(1).float(),
             "reward_nonfinite": (~finite).float()}
    stats.update({k: v.detach().float() for k, v in out.components.items()})
    if out.segment_scores is not None:
        stats.update(segment_score_stats(out.segment_scores))
    loss = reward_loss(out, reward_cap)
    if reward_cap is not None:
        stats["reward_capped"] = (out.total.detach() >= reward_cap).float()
    if distance is not None:
        loss = loss + kl_weight * distance.mean()
        stats["kl"] = distance.detach().float()
    return loss, stats


class RewardBackprop(Algorithm):
    """LongAlign's reference: the reward's gradient flows back through the decoder and the
    gradient steps of a deterministic DDIM rollout (training/reward_backprop.py)."""

    name = "reward_backprop"
    body = "longalign_rl.training.reward_backprop:RewardBackpropBody"
    differentiable_reward = True

    def describe(self, cfg) -> str:
        a = cfg.algorithm
        extra = ([f"KL-style penalty {a.kl_weight:g} to the starting model"] if a.kl_weight else []) + (
            [f"reward capped at {a.reward_cap:g}"] if a.reward_cap is not None else [])
        return "reward backpropagation through the decoder and the gradient steps" + (
            f" ({', '.join(extra)})" if extra else "")


REWARD_BACKPROP = RewardBackprop()
