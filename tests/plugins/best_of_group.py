"""A third-party algorithm: reward-ranked fine-tuning (RAFT, Dong et al. 2023) on the best
sample of each group. It plugs in as a third party would, with no line changed under
longalign_rl/: a record (registry.Algorithm), named by `algorithm.name:
tests.plugins.best_of_group:BEST_OF_GROUP`, and a body on the stage-2 half of the worker
skeleton (training/stage2.py's SamplerFed) in best_of_group_body.py, using only public
pieces. The record stays pure (no Ray), as the driver and the sampler actors read it; the
body is imported on the trainer workers only.

Each prompt is drawn `algorithm.kwargs.group_size` times (one deterministic DDIM rollout
each, from its own noise); the reward ranks them without gradient; the UNet then takes one
denoising-loss step on the best sample of each group, conditioned on its prompt."""

from __future__ import annotations

import torch

from longalign_rl.config import ConfigError
from longalign_rl.registry import Algorithm

BODY = "tests.plugins.best_of_group_body:BestOfGroupBody"


class BestOfGroup(Algorithm):
    name = "best_of_group"
    body = BODY
    progress_keys = ("reward", "best_reward", "loss")

    def group_size(self, cfg) -> int:
        return int(cfg.algorithm.kwargs.get("group_size", 2))

    def check(self, cfg) -> None:
        unknown = set(cfg.algorithm.kwargs) - {"group_size"}
        if unknown:
            raise ConfigError(f"algorithm.kwargs.{sorted(unknown)[0]}: best_of_group takes only group_size")
        if self.group_size(cfg) < 2:
            raise ConfigError(f"algorithm.kwargs.group_size: must be >= 2 to rank anything, got {self.group_size(cfg)}")
        if cfg.train.batch_size % self.group_size(cfg):
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not a multiple of "
                              f"algorithm.kwargs.group_size={self.group_size(cfg)}")

    def describe(self, cfg) -> str:
        return f"best_of_group: denoising loss on the best of {self.group_size(cfg)} samples per prompt"


BEST_OF_GROUP = BestOfGroup()


def best_of_groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """The index of the highest finite reward in each run of `group` samples."""
    ranked = torch.where(torch.isfinite(rewards), rewards, torch.full_like(rewards, -torch.inf))
    return ranked.view(-1, group).argmax(dim=1) + torch.arange(0, len(rewards), group)
