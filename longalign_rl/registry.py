"""Plugins by name, and the one resolver of what a config value names (docs/architecture.md,
"Extension points").

A `Registry` holds one kind of plugin: rewards (entry-point group `longalign_rl.rewards`),
algorithms (`longalign_rl.algorithms`), models (`longalign_rl.models`, in models.py) and the
built-in prompt sources (prompts.py, no group). A name is found
- among the kind's built-ins (the framework's own, such as the "tiny" architecture), or
- registered in code with `register`, or
- in the kind's entry-point group (read once, on the first lookup; the built-in rewards in
  `rewards/` and the ShapesWorld world register this way too, so there is one path).

`resolve_source` says what a config value such as `model.pretrained`, `prompts.source` or
`data.source` names, by fixed rules rather than by guessing (see its docstring): a name, an
import path "pkg.module:attr", an existing local path, or (where allowed) a hub id.

Every failure names what failed: the config key, the unknown name (with the known ones),
the duplicate name, the import path, the plugin and its distribution, the rejected keyword.

Pure: imports torch only, never ray or deepspeed.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable

import torch

from longalign_rl.types import RewardOutput

__all__ = ["ALGORITHMS", "Algorithm", "Registry", "Reward", "RewardOutput", "Source", "REWARDS", "algorithm_of",
           "check_reward_kwargs", "find_algorithm", "find_reward", "get_reward", "import_path", "list_rewards",
           "register_reward", "resolve_source"]

# "pkg.module:attr": dotted identifiers, one colon, an identifier. Nothing else is read as
# an import path (so "C:\\data" or "runs/a:b" never is).
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# "org/name" as the Hugging Face hub spells a repository id.
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _describe(ep: EntryPoint) -> str:
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
    return f"{ep.value} (from {dist})"


class Registry:
    """Plugins of one kind by name: built-ins, registrations in code, and one entry-point group."""

    def __init__(self, kind: str, group: str | None, builtins: Callable[[], dict[str, Any]] | None = None):
        self.kind, self.group = kind, group  # "reward", "longalign_rl.rewards"; group None: built-ins only
        self._builtins = builtins or dict
        self._registered: dict[str, Any] = {}
        self._entry_points: dict[str, EntryPoint] | None = None  # None until the first lookup

    def _discover(self) -> dict[str, EntryPoint]:
        """The group's entry points by name, read once; two with one name is an error."""
        if self._entry_points is None:
            found: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group) if self.group else []:
                if ep.name in found:
                    raise ValueError(f"{self.kind} {ep.name!r} is declared twice in entry-point group "
                                     f"{self.group!r}: {_describe(found[ep.name])} and {_describe(ep)}")
                found[ep.name] = ep
            self._entry_points = found
        return self._entry_points

    def reset(self) -> None:
        """Forget registrations and re-read the entry points on the next lookup (for tests)."""
        self._registered.clear()
        self._entry_points = None

    def register(self, name: str, obj: Any) -> None:
        """Register `obj` under `name`; a name that is already taken is an error."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"a {self.kind} name is a non-empty string without ':' (that marks an import path), "
                             f"got {name!r}")
        if not callable(obj):
            raise TypeError(f"the factory of {self.kind} {name!r} is not callable: {obj!r}")
        if name in self._builtins():
            raise ValueError(f"{self.kind} {name!r} is built in")
        if name in self._registered:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._registered[name]!r})")
        if name in self._discover():
            raise ValueError(f"{self.kind} {name!r} is already declared by entry point {_describe(self._discover()[name])}")
        self._registered[name] = obj

    def names(self) -> list[str]:
        return sorted(set(self._builtins()) | set(self._registered) | set(self._discover()))

    def __contains__(self, name: str) -> bool:
        return name in self._builtins() or name in self._registered or name in self._discover()

    def find(self, name: str) -> Any:
        """The object behind a known name (an entry point is imported now)."""
        builtins = self._builtins()
        if name in builtins:
            return builtins[name]
        if name in self._registered:
            return self._registered[name]
        eps = self._discover()
        if name not in eps:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names()) or '(none)'}")
        try:
            return eps[name].load()
        except Exception as e:  # any failure inside a plugin's import is reported with its origin
            raise RuntimeError(f"{self.kind} plugin {name!r} failed to load from {_describe(eps[name])}: {e!r}") from e


def import_path(path: str, what: str = "") -> Any:
    """The attribute named by "pkg.module:attr"; ValueError naming the path otherwise."""
    where = f"{what} {path!r}" if what else repr(path)
    if not IMPORT_PATH.match(path):
        raise ValueError(f"{where}: not an import path of the form 'package.module:attribute'")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{where}: cannot import module {module_name!r}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"{where}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


@dataclass(frozen=True)
class Source:
    """What a config value names: kind "name" or "import" (target: the object), "path"
    (target: the Path) or "hub" (target: None; a hub repository id)."""

    kind: str
    value: str
    target: Any = None


def resolve_source(value: str, *, key: str, names: Registry | None = None, path_kind: str = "",
                   hub_ids: bool = False) -> Source:
    """What the config value `value` of `key` names, by these rules in this order:

    1. a name that `names` knows (built-in, registered or an entry point);
    2. an import path "pkg.module:attr" (only that exact shape): it must import;
    3. an existing local path, where the key takes one: `path_kind` names what it is for
       the error message (e.g. "diffusers folder"); "" = the key takes no paths;
    4. a hub id "org/name", if `hub_ids`, unless a local folder "org" exists (then the
       value was meant as a path, and the error says it is not found).
    Anything else is a ValueError that names the key and lists what the value may be.
    """
    if names is not None and value in names:
        return Source("name", value, names.find(value))
    if IMPORT_PATH.match(value):
        return Source("import", value, import_path(value, key))
    if path_kind and Path(value).exists():
        return Source("path", value, Path(value))
    if hub_ids and HUB_ID.match(value) and not value.startswith("."):
        owner = value.split("/")[0]
        if path_kind and Path(owner).is_dir():  # "runs/model" with runs/ here: a path, not a hub id
            raise ValueError(f"{key}: local {path_kind} {value!r} not found ({owner}/ exists here, so the value "
                             "is read as a path, not as a hub id)")
        return Source("hub", value)
    forms = [f"a known name ({', '.join(names.names()) or 'none'})"] if names is not None else []
    forms.append("an import path 'package.module:function'")
    if path_kind:
        forms.append(f"an existing {path_kind}")
    if hub_ids:
        forms.append("a hub id 'org/name'")
    listed = ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else forms[0]
    raise ValueError(f"{key}: {value!r} does not exist; expected {listed}")


# ---------------------------------------------------------------- rewards


class Reward(torch.nn.Module):
    """Base class of rewards. Plugins may subclass it or only have the same shape:
    callable as `reward(images, prompts) -> RewardOutput`, with a bool `differentiable`."""

    # Reward backpropagation needs gradients w.r.t. the images; policy gradient does not.
    differentiable: bool = True

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """images: float [B,3,H,W] in [0,1], any H and W; prompts: B strings."""
        raise NotImplementedError


Factory = Callable[..., Reward]

REWARDS = Registry("reward", "longalign_rl.rewards")
ENTRY_POINT_GROUP = REWARDS.group


def _reset() -> None:
    """Forget reward and algorithm registrations and re-read the entry points on the next
    lookup (for tests)."""
    REWARDS.reset()
    ALGORITHMS.reset()


def register_reward(name: str, factory: Factory) -> None:
    """Register `factory` under `name`; a name that is already taken is an error."""
    REWARDS.register(name, factory)


def list_rewards() -> list[str]:
    """The names `get_reward` knows (import paths are not listed)."""
    return REWARDS.names()


def find_reward(name: str) -> Factory:
    """The factory behind `name` (a registered name or an import path), not called yet."""
    if ":" in name:
        return import_path(name, "reward")
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(list_rewards()) or '(none)'}; "
                         "or give an import path 'package.module:Factory'")
    return REWARDS.find(name)


def _keywords(fn: Any) -> tuple[list[str], bool] | None:
    """The names `fn` takes by keyword, and whether it also takes **kwargs; None if unknown."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def reward_keywords(factory: Any) -> list[str] | None:
    """The keyword arguments a reward factory takes, its **kwargs followed to the class it is
    annotated to return; None when that cannot be told (anything may be accepted)."""
    import typing

    found = _keywords(factory)
    if found is None:
        return None
    accepted, forwards = found
    if not forwards:
        return accepted
    try:
        target = typing.get_type_hints(factory).get("return")
    except Exception:  # an annotation that does not resolve: nothing to follow
        return None
    inner = _keywords(target) if isinstance(target, type) else None
    if inner is None or inner[1]:
        return None
    return accepted + [n for n in inner[0] if n not in accepted]


def check_reward_kwargs(name: str, kwargs: dict, factory: Any = None) -> None:
    """TypeError naming `reward.kwargs.<key>` (and the closest name the reward takes) for a
    keyword the factory of reward `name` does not take: read off its signature, without
    building it. A factory with **kwargs forwards them to the class it is annotated to
    return (`def shapes_clip(weights=None, **kwargs) -> ClipTypeReward`), whose signature
    then counts too; with no such class nothing is checked."""
    import difflib

    accepted = reward_keywords(find_reward(name) if factory is None else factory)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"reward.kwargs.{key}: reward {name!r} takes no argument {key!r}{hint} "
                            f"(it takes: {', '.join(accepted) or 'none'})")


def get_reward(name: str, **kwargs) -> Reward:
    """Build the reward `name` (a registered name or "pkg.mod:Attr") with `kwargs`."""
    factory = find_reward(name)
    if not callable(factory):
        raise TypeError(f"reward {name!r}: {factory!r} is not callable, so it cannot build a reward")
    check_reward_kwargs(name, kwargs, factory)
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


def check_reward_output(out: Any, batch: int, name: str) -> None:
    """TypeError naming the reward unless `out` is a RewardOutput whose total and components
    are tensors of shape [batch] (called on every reward call of a run)."""
    if not isinstance(getattr(out, "components", None), dict):
        raise TypeError(f"reward {name!r} returned {type(out).__name__}, not a RewardOutput (total, components)")
    for key, value in [("total", out.total), *((f"components[{k!r}]", v) for k, v in out.components.items())]:
        if not isinstance(value, torch.Tensor) or value.shape != (batch,):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"reward {name!r}: {key} must be a tensor of shape [{batch}] (one value per image), "
                            f"got {got}")


def probe_reward(reward: Reward, name: str, prompts: list[str], resolution: int) -> RewardOutput:
    """One call on two random images, as a run would make it: ValueError naming the reward
    unless it returns finite values of the right shapes and, when it says it is
    differentiable, a finite gradient to the images. Returns the call's output."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, resolution, resolution, generator=generator)
    images.requires_grad_(reward.differentiable)
    prompts = (list(prompts) * 2)[:2]
    try:
        out = reward(images, prompts)
    except Exception as e:
        raise ValueError(f"reward {name!r} failed on two test images: {type(e).__name__}: {e}") from e
    check_reward_output(out, 2, name)
    if not bool(torch.isfinite(out.total).all()):
        raise ValueError(f"reward {name!r} returned non-finite values on two test images: {out.total.tolist()}")
    if reward.differentiable:
        if not out.total.requires_grad:
            raise ValueError(f"reward {name!r} says it is differentiable, but its total carries no gradient to the "
                             "images (computed under no_grad, or detached?)")
        out.total.sum().backward()
        if images.grad is None or not bool(torch.isfinite(images.grad).all()):
            raise ValueError(f"reward {name!r} says it is differentiable, but its gradient to the images is "
                             f"{'missing' if images.grad is None else 'not finite'}")
    return out


# ---------------------------------------------------------------- algorithms


class Algorithm:
    """One way to turn the sampler actors' samples into updates (stage 2): everything the
    framework outside the algorithm's own modules knows of it, so that nothing else branches
    on which algorithm runs (docs/architecture.md, "How to add an algorithm").

    Subclass it, set `name` and `body`, override what differs from these defaults (those of
    reward backpropagation's shape: one deterministic rollout per prompt, one backward pass
    per micro-step), and declare an instance in the entry-point group
    `longalign_rl.algorithms`, or name it by import path (`algorithm.name: pkg.module:OBJ`).
    The record is pure (torch only); the body is imported on the trainer workers alone.
    Every method takes the run's config (a config.Config, which imports this module).
    Its own hyper-parameters come from `algorithm.kwargs` (checked by `check`), or from the
    shared `algorithm.*` keys where they mean the same thing."""

    # The name `algorithm.name` gives (entry-point name; the import path for one given by path).
    name: str = ""
    # The trainer workers' body, "pkg.module:Class" (training/worker.py's Body protocol).
    body: str = ""
    # True: the loss needs the reward's gradient to the images (a non-differentiable reward is
    # refused, and reward actors cannot score); False: any reward, scored without gradient.
    differentiable_reward: bool = False
    # The fields of a step's record the driver's progress line shows, when present.
    progress_keys: tuple[str, ...] = ("reward", "loss")

    def sample(self, sampler: Any, prompts: list[str], seed: int, cfg, policy_version: int,
               seeds: list[int] | None = None) -> Any:
        """What a sampler actor sends for one batch (run in the actor): by default a `Rollout`
        (deterministic DDIM, the gradient steps' inputs recorded, sampling/sampler.py).
        `seed`: the step's, for choices shared by its whole global batch (which steps are
        trained); `seeds`: each sample's own, from its place in the global batch, so that a
        sample does not depend on the worker or actor that draws it (docs/scaling.md)."""
        return sampler.sample(prompts, seed, policy_version=policy_version, seeds=seeds)

    def group_size(self, cfg) -> int:
        """Samples drawn per prompt, side by side in one worker's batch (grpo: a group)."""
        return 1

    def shared_start(self, cfg) -> bool:
        """Whether the samples of one prompt's group start from the same noise."""
        return False

    def backward_passes(self, cfg) -> int:
        """engine.backward calls per micro-step (DeepSpeed divides each loss by their number)."""
        return 1

    def updates_per_step(self, cfg) -> int:
        """Optimiser updates per run step (the warm-up still counts run steps)."""
        return 1

    def check(self, cfg) -> None:
        """Checks of the keys this algorithm reads: raise config.ConfigError naming the key."""

    def describe(self, cfg) -> str:
        """The run header's "algorithm" line."""
        return self.name

    def describe_sampling(self, cfg, family=None) -> str:
        """What the samplers' chain records, for the run header's "samplers" line; `family`:
        the model's family class, where the driver knows it without loading the model."""
        where = " (the last)" if cfg.sampler.grad_steps == "last" else ""
        return f"{cfg.sampler.num_grad_steps} with gradient{where}"


ALGORITHMS = Registry("algorithm", "longalign_rl.algorithms")


def find_algorithm(name: str) -> Algorithm:
    """The algorithm `name` names: a registered name or an import path "pkg.module:OBJ" to an
    `Algorithm` instance (or a class, instantiated here); ValueError naming it otherwise."""
    if ":" in name:
        found = import_path(name, "algorithm.name")
    elif name in ALGORITHMS:
        found = ALGORITHMS.find(name)
    else:
        raise ValueError(f"algorithm.name: unknown algorithm {name!r}; known algorithms: "
                         f"{', '.join(ALGORITHMS.names()) or '(none)'}; or give an import path 'package.module:ALGORITHM'")
    algorithm = found() if isinstance(found, type) and issubclass(found, Algorithm) else found
    if not isinstance(algorithm, Algorithm):
        what = f"the class {found.__name__}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise TypeError(f"algorithm.name: {name!r} is {what}, not a longalign_rl.registry.Algorithm")
    if not IMPORT_PATH.match(algorithm.body or ""):
        raise TypeError(f"algorithm.name: algorithm {name!r} has no body 'package.module:Class' (got {algorithm.body!r})")
    return algorithm


def algorithm_of(cfg) -> Algorithm:
    """The algorithm a stage-2 config trains with (`algorithm.name`)."""
    return find_algorithm(cfg.algorithm.name)
