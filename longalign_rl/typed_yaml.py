"""Typed YAML, as this project's configs are read: a nested mapping (from YAML files and
dotted command-line overrides) built into frozen dataclasses by their annotations, every
value checked against its field's type, unknown keys named with the closest known one,
YAML 1.2's booleans only. Generic: it knows no particular key (config.py holds the schema
and the rules that span keys).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


def plain(v):
    """Tuples as lists, recursively: what YAML and JSON write."""
    if isinstance(v, tuple):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true / false. (YAML 1.1, PyYAML's default, also
    reads yes, no, on, off, y, n as booleans: `train.use_gpu=yes` would pass unnoticed.)"""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load_yaml(text: str) -> Any:
    """YAML as configs are read: YAML 1.2's booleans (true / false only)."""
    return yaml.load(text, Loader=_Loader)


class _Raw(str):
    """A command-line value not parsed yet: a str field takes it as written ("2024" stays
    a string), any other field parses it as YAML ("1e-5" -> 1e-05, "[a, b]" -> a list)."""


def _parse_raw(value: Any) -> Any:
    if isinstance(value, _Raw):
        return load_yaml(value) if value.strip() else ""
    if isinstance(value, dict):
        return {k: _parse_raw(v) for k, v in value.items()}
    return value


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (list -> tuple)."""
    if isinstance(value, _Raw):
        is_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        value = str(value) if is_str and value.strip().lower() not in ("null", "none", "~") else _parse_raw(value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _check_value(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _parse_raw(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "3e-5" as a string; a float field means a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and type(value) is not bool:
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def build(cls: type, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"; did you mean {(f'{prefix}.{close[0]}' if prefix else close[0])!r}?" if close else ""
        raise ConfigError(f"unknown config key {path!r}{hint} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, _parse_raw(value) if isinstance(value, _Raw) else value, key)
        else:
            kwargs[name] = _check_value(value, tp, key)
    return cls(**kwargs)


def merge(base: dict, override: dict) -> dict:
    """Nested dict merge; an override replaces leaves and adds keys (reward.kwargs included)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dotted(overrides: list[str]) -> dict:
    """["train.lr=1e-5", "reward.kwargs.direction=corpus"] -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        value = _Raw(raw)
        node = tree
        *parents, leaf = path.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = value
    return tree
