"""The reward protocol and the registry of rewards by name (DESIGN.md, "Reward plugin contract").

A reward is built by a factory, `factory(**kwargs) -> Reward` (a class or a function).
`get_reward(name, **kwargs)` finds the factory by
- a name registered with `register_reward`, or
- a name in the entry-point group `longalign_rl.rewards` (read once, on the first lookup;
  the built-in rewards in `rewards/` register this way too, so there is one path), or
- an import path "my_pkg.my_module:MyReward".
Every failure names what failed: the unknown name (with the known ones), the duplicate
name, the import path, the plugin and its distribution, the rejected keyword.

Pure: imports torch only, never ray or deepspeed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Callable

import torch

ENTRY_POINT_GROUP = "longalign_rl.rewards"


@dataclass
class RewardOutput:
    """What a reward returns for a batch of B images."""

    total: torch.Tensor  # [B] the reward that is optimised (carries the graph if differentiable)
    components: dict[str, torch.Tensor]  # named [B] parts, logged
    segment_scores: list[torch.Tensor] | None = None  # per prompt: [n_segments], logged


class Reward(torch.nn.Module):
    """Base class of rewards. Plugins may subclass it or only have the same shape:
    callable as `reward(images, prompts) -> RewardOutput`, with a bool `differentiable`."""

    # Reward backpropagation needs gradients w.r.t. the images; policy gradient does not.
    differentiable: bool = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """images: float [B,3,H,W] in [0,1], any H and W; prompts: B strings."""
        raise NotImplementedError


Factory = Callable[..., Reward]

_registered: dict[str, Factory] = {}  # from register_reward
_entry_points: dict[str, EntryPoint] | None = None  # None until the first lookup


def _describe(ep: EntryPoint) -> str:
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
    return f"{ep.value} (from {dist})"


def _discover() -> dict[str, EntryPoint]:
    """The group's entry points by name, read once; two with one name is an error."""
    global _entry_points
    if _entry_points is None:
        found: dict[str, EntryPoint] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in found:
                raise ValueError(
                    f"reward {ep.name!r} is declared twice in entry-point group {ENTRY_POINT_GROUP!r}: "
                    f"{_describe(found[ep.name])} and {_describe(ep)}"
                )
            found[ep.name] = ep
        _entry_points = found
    return _entry_points


def _reset() -> None:
    """Forget registrations and re-read the entry points on the next lookup (for tests)."""
    global _entry_points
    _registered.clear()
    _entry_points = None


def register_reward(name: str, factory: Factory) -> None:
    """Register `factory` under `name`; a name that is already taken is an error."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a reward name is a non-empty string without ':' (that marks an import path), got {name!r}")
    if not callable(factory):
        raise TypeError(f"the factory of reward {name!r} is not callable: {factory!r}")
    if name in _registered:
        raise ValueError(f"reward {name!r} is already registered (by {_registered[name]!r})")
    if name in _discover():
        raise ValueError(f"reward {name!r} is already declared by entry point {_describe(_discover()[name])}")
    _registered[name] = factory


def list_rewards() -> list[str]:
    """The names `get_reward` knows (import paths are not listed)."""
    return sorted(set(_registered) | set(_discover()))


def _import_path(path: str) -> Factory:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def find_reward(name: str) -> Factory:
    """The factory behind `name` (a registered name or an import path), not called yet."""
    if ":" in name:
        return _import_path(name)
    if name in _registered:
        return _registered[name]
    eps = _discover()
    if name not in eps:
        raise ValueError(
            f"unknown reward {name!r}; known rewards: {', '.join(list_rewards()) or '(none)'}; "
            "or give an import path 'package.module:Factory'"
        )
    try:
        return eps[name].load()
    except Exception as e:  # any failure inside a plugin's import is reported with its origin
        raise RuntimeError(f"reward plugin {name!r} failed to load from {_describe(eps[name])}: {e!r}") from e


def get_reward(name: str, **kwargs) -> Reward:
    """Build the reward `name` (a registered name or "pkg.mod:Attr") with `kwargs`."""
    factory = find_reward(name)
    if not callable(factory):
        raise TypeError(f"reward {name!r}: {factory!r} is not callable, so it cannot build a reward")
    try:
        reward = factory(**kwargs)
    except (TypeError, ValueError) as e:
        # Python's and our own messages name the keyword; add which reward rejected it.
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"reward {name!r}: {e}") from e
    if not callable(reward) or not isinstance(getattr(reward, "differentiable", None), bool):
        raise TypeError(
            f"reward {name!r}: the factory returned {type(reward).__name__}, which is not a reward "
            "(a reward is callable as reward(images, prompts) and has a bool attribute `differentiable`)"
        )
    return reward
