"""A third-party style reward plugin: it only needs longalign_rl.registry."""

import torch

from longalign_rl.registry import Reward, RewardOutput


class MyReward(Reward):
    """`scale` times the mean brightness: the smallest differentiable reward."""

    differentiable = True

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        total = self.scale * images.mean(dim=(1, 2, 3))
        return RewardOutput(total=total, components={"brightness": images.mean(dim=(1, 2, 3)).detach()})


def not_a_reward():
    """A factory that returns something that is not a reward."""
    return 42


def tiny_model(seed: int = 0):
    """A model loader by import path (model.pretrained: tests.plugins.my_reward:tiny_model)."""
    from longalign_rl.models import build_random

    return build_random("tiny", seed)


def not_a_model(seed: int = 0):
    """A model loader that returns something that is not the model's parts."""
    return "unet"
