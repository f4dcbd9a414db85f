"""`weighted_sum`: several rewards as one, `total = sum_i weight_i * total_i`, every part
logged. Differentiable only when every part is.

    reward:
      name: weighted_sum
      kwargs:
        rewards:
          - {name: shapes_clip, weight: 1.0, kwargs: {text_irrelevant_weight: 0.3}}
          - {name: shapes_exact, weight: 0.5}

Components are logged as "<name>" (that part's total) and "<name>/<component>"; a name used
twice gets "#2", "#3" ... Needs only the registry: no ray, no deepspeed.
"""

from __future__ import annotations

import torch

from longalign_rl.registry import Reward, RewardOutput, get_reward
from longalign_rl.scoring import batch_statistics


class WeightedSum(Reward):
    def __init__(self, rewards: list[dict]):
        super().__init__()
        if not isinstance(rewards, list) or not rewards:
            raise ValueError("rewards must be a non-empty list of {name, weight, kwargs} mappings")
        self.names, self.weights, parts = [], [], []
        for i, spec in enumerate(rewards):
            if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "weight", "kwargs"}:
                raise ValueError(f"rewards[{i}] must be a mapping with name, weight (default 1.0) and kwargs, got {spec!r}")
            weight = spec.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"rewards[{i}].weight must be a number, got {weight!r}")
            name = spec["name"]
            label = name if name not in self.names else f"{name}#{self.names.count(name) + 1}"
            parts.append(get_reward(name, **(spec.get("kwargs") or {})))
            self.names.append(label)
            self.weights.append(float(weight))
        self.parts = torch.nn.ModuleList([p if isinstance(p, torch.nn.Module) else _Wrapped(p) for p in parts])
        self.differentiable = all(p.differentiable for p in parts)

    def batch_statistics(self, prompts: list[str]) -> dict[str, torch.Tensor] | None:
        """Every part's batch statistics, under "<part index>/<key>" (scoring.py)."""
        found = {}
        for i, part in enumerate(self.parts):
            stats = batch_statistics(part, prompts)
            found.update({f"{i}/{k}": v for k, v in (stats or {}).items()})
        return found or None

    def forward(self, images: torch.Tensor, prompts: list[str],
                statistics: dict[str, torch.Tensor] | None = None) -> RewardOutput:
        total, components = 0.0, {}
        for i, (name, weight, part) in enumerate(zip(self.names, self.weights, self.parts)):
            mine = {k.split("/", 1)[1]: v for k, v in (statistics or {}).items() if k.split("/", 1)[0] == str(i)}
            out = part(images, prompts, statistics=mine) if mine else part(images, prompts)
            total = total + weight * out.total
            components[name] = out.total.detach()
            components.update({f"{name}/{k}": v for k, v in out.components.items()})
        return RewardOutput(total=total, components=components)


class _Wrapped(torch.nn.Module):
    """A reward that is a plain callable, held as a module so that .to() and .train() reach the rest."""

    def __init__(self, reward):
        super().__init__()
        self.reward, self.differentiable = reward, reward.differentiable

    def batch_statistics(self, prompts):
        return batch_statistics(self.reward, prompts)

    def forward(self, images, prompts, **statistics):
        return self.reward(images, prompts, **statistics)


def weighted_sum(**kwargs) -> WeightedSum:
    return WeightedSum(**kwargs)
