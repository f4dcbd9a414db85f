"""The reward contract in one place: how every caller (the trainer workers' bodies, the
reward actors, validation and `longalign-rl evaluate`) builds a reward and calls it.

A reward is a pure function of its images and prompts: it never talks to other processes,
so any process may call it alone, any number of times. Where its value needs a statistic
of the whole global batch (the decomposed reward's batch direction: the mean text
embedding over every worker's prompts), it says so with `batch_statistics(prompts)`, a
dict of sums over its prompts; the caller computes them over the whole global batch
(training/stage2.py `SamplerFed.reward_statistics`: from the step's prompts, which every
worker knows, so no collective) and hands the sums to `score`. A caller that passes none
gets the reward over its own batch.

Pure: torch and the registry, no ray, no deepspeed.
"""

from __future__ import annotations

import torch

from longalign_rl.registry import algorithm_of, check_reward_output, get_reward
from longalign_rl.types import RewardOutput

Statistics = dict[str, torch.Tensor]


def build_reward(cfg, device: torch.device):
    """The run's reward (reward.name, reward.kwargs) on `device`; ValueError naming it when
    the algorithm needs the reward's gradient and it has none."""
    reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    if not reward.differentiable and algorithm_of(cfg).differentiable_reward:
        raise ValueError(f"reward {cfg.reward.name!r} is not differentiable; {cfg.algorithm.name} needs gradients "
                         "from the reward to the image")
    return reward.to(device) if hasattr(reward, "to") else reward


def batch_statistics(reward, prompts: list[str]) -> Statistics | None:
    """What `reward` needs summed over the whole global batch (its `batch_statistics`), or
    None: most rewards need nothing beyond their own call."""
    fn = getattr(reward, "batch_statistics", None)
    return fn(prompts) if fn is not None else None


def _name(reward) -> str:
    return f"{type(reward).__module__}.{type(reward).__qualname__}"


def score(reward, images: torch.Tensor, prompts: list[str],
          statistics: Statistics | None = None) -> tuple[RewardOutput, torch.Tensor]:
    """The reward of `images`, and which samples got a finite one. `statistics`: the global
    batch's sums of `batch_statistics`, when the caller reduced them. A reward that returns
    the wrong shapes is an error naming its class, and so is a reward that calls sys.exit
    (which would end the trainer worker or reward actor silently, leaving its peers to fail
    with a broken connection or Ray to restart the actor for ever).

    A sample whose reward is NaN or infinite sends no gradient back at all (its image
    gradient is zeroed: masking the loss alone would still let 0 * NaN through).
    """
    try:
        out = reward(images, prompts) if statistics is None else reward(images, prompts, statistics=statistics)
    except SystemExit as e:
        raise RuntimeError(f"reward {_name(reward)} called sys.exit({e.code!r})") from e
    check_reward_output(out, len(prompts), _name(reward))
    finite = torch.isfinite(out.total).detach()
    if images.requires_grad and not bool(finite.all()):
        mask = finite.view(-1, *([1] * (images.dim() - 1)))
        images.register_hook(lambda g: torch.where(mask, g, torch.zeros_like(g)))
    return out, finite
