"""A third-party style reward plugin: it only needs longalign_rl.registry."""

import time

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


# Rewards that break the contract in the ways a plugin can (issue 10): each must be stopped
# on the driver with a message that names it.

class _Broken(Reward):
    def __init__(self, how: str, after: int = 0):
        super().__init__()
        self.how, self.after, self.calls = how, after, 0

    def forward(self, images, prompts):
        b = images.shape[0]
        mean = images.mean(dim=(1, 2, 3))
        self.calls += 1
        if self.how == "raise_after" and self.calls > self.after:
            raise RuntimeError("the reward server went away")
        if self.how == "nan_after":  # fine for `after` calls (the driver's probe passes), then NaN
            return RewardOutput(total=mean * (float("nan") if self.calls > self.after else 1.0), components={})
        if self.how == "raises":
            raise RuntimeError("model weights missing")
        if self.how == "nan":
            return RewardOutput(total=mean * float("nan"), components={})
        if self.how == "wide":
            return RewardOutput(total=images.mean(dim=(2, 3)), components={})  # [B, 3]
        if self.how == "detached":
            return RewardOutput(total=mean.detach(), components={})
        if self.how == "bad_component":
            return RewardOutput(total=mean, components={"part": mean[:1]})
        if self.how == "not_an_output":
            return mean
        return RewardOutput(total=mean, components={"part": torch.zeros(b)})


def broken(how: str = "ok", after: int = 0):
    return _Broken(how, after)


def failing_factory():
    raise RuntimeError("cannot reach the reward server")


class BrightPixels(Reward):
    """A rule, not a model: the fraction of pixels brighter than `threshold`. A step function
    of the pixels, so it has no useful gradient: only policy gradients can optimise it."""

    differentiable = False

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        bright = (images.mean(dim=1) > self.threshold).float().mean(dim=(1, 2))
        return RewardOutput(total=bright, components={"bright_fraction": bright.clone()})


class SlowBrightPixels(BrightPixels):
    """BrightPixels that takes `seconds` per batch without using a core: stands for a reward
    model that runs on a device of its own (benchmarks/reward_actors.py)."""

    def __init__(self, threshold: float = 0.5, seconds: float = 1.0):
        super().__init__(threshold)
        self.seconds = seconds

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        time.sleep(self.seconds)
        return super().forward(images, prompts)


class Crashing(Reward):
    """Fine for `after` calls (the driver's probe passes), then it ends its process the way
    a plugin can: `exit` calls sys.exit, `die` kills the process (a crash in native code),
    `block` never returns (a server that does not answer)."""

    differentiable = True

    def __init__(self, how: str = "exit", after: int = 1):
        super().__init__()
        self.how, self.after, self.calls = how, after, 0

    def forward(self, images, prompts):
        import os
        import sys

        self.calls += 1
        if self.calls > self.after:
            if self.how == "exit":
                sys.exit(3)
            if self.how == "die":
                os._exit(1)
            if self.how == "block":
                time.sleep(3600)
        return RewardOutput(total=images.mean(dim=(1, 2, 3)), components={})
