"""Metric hooks (`run.metrics`): functions a world or a user adds to what every rollout logs.

A hook is given by import path, "pkg.module:function", and called as

    fn(images: Tensor [B, 3, H, W] in [0, 1], prompts: list[str]) -> {name: Tensor [B]}

on the decoded images of every rollout (no gradient). Its values are logged per step as
all-worker means beside the reward, so every call must return the same names. A world
with an exact checker logs the ground truth this way. Pure torch: no ray, no deepspeed.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from longalign_rl.registry import import_path

MetricHook = Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]


def load_metric_hooks(paths: tuple[str, ...] | list[str]) -> list[tuple[str, MetricHook]]:
    """(path, function) for each import path; ValueError naming `run.metrics[i]` otherwise."""
    hooks = []
    for i, path in enumerate(paths):
        fn = import_path(path, f"run.metrics[{i}]")
        if not callable(fn):
            raise ValueError(f"run.metrics[{i}] {path!r} is not a function")
        hooks.append((path, fn))
    return hooks


@torch.no_grad()
def run_metric_hooks(hooks: list[tuple[str, MetricHook]], images: torch.Tensor, prompts: list[str],
                     reserved: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every hook's metrics on one batch, each a float tensor [B] on the CPU. `reserved`:
    names logged already (the reward's statistics), which a hook may not reuse."""
    reserved = set(reserved)
    out: dict[str, torch.Tensor] = {}
    for path, fn in hooks:
        result = fn(images, prompts)
        if not isinstance(result, dict):
            raise TypeError(f"metric hook {path!r} returned {type(result).__name__}, not a dict of name -> Tensor[B]")
        for name, value in result.items():
            if not isinstance(value, torch.Tensor) or value.shape != (len(prompts),):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TypeError(f"metric hook {path!r}: {name!r} must be a tensor of shape [{len(prompts)}], got {got}")
            if name in out or name in reserved:
                raise ValueError(f"metric hook {path!r}: {name!r} is also logged by "
                                 f"{'another hook' if name in out else 'the algorithm (the reward statistics)'}")
            out[name] = value.detach().float().cpu()
    return out


def probe_metric_hooks(hooks: list[tuple[str, MetricHook]], prompts: list[str], resolution: int) -> set[str]:
    """Every hook called once on two random images, as a run calls it: ValueError naming
    `run.metrics[i]` when a hook raises, returns something else than {name: Tensor [2]}, or
    reuses another hook's name. Run on the driver, so that a broken hook stops the run before
    it starts, not at its first logged step. Returns the names the hooks log."""
    images = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    prompts = (list(prompts) * 2)[:2]
    logged: set[str] = set()
    for i, (path, fn) in enumerate(hooks):
        try:
            names = run_metric_hooks([(path, fn)], images, prompts)
        except Exception as e:
            raise ValueError(f"run.metrics[{i}] {path!r} failed on two test images: {type(e).__name__}: {e}") from e
        for name in names:
            if name in logged:
                raise ValueError(f"run.metrics: metric hook {path!r}: {name!r} is also logged by another hook")
            logged.add(name)
    return logged
