"""`longalign-rl config` / `--print-config`: every key with its type, default, the value a
config gives it and its meaning, read off the comments above each field in config.py (one
source, no copy).
"""

from __future__ import annotations

import dataclasses
import re
import typing

import yaml

from longalign_rl.config import Config
from longalign_rl.typed_yaml import plain


def field_docs(cls: type) -> dict[str, str]:
    """Each field's meaning: the comment lines right above it in the class body (and a
    comment after it on its line), as this module writes them; one source, no copy."""
    import inspect

    names = {f.name for f in dataclasses.fields(cls)}
    docs, pending, previous = {}, [], ""
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\w+)\s*:", stripped)
        if match and match.group(1) in names:
            trailing = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
            # a field right below another with no comment of its own shares the comment above both
            docs[match.group(1)] = previous = " ".join(pending + ([trailing] if trailing else [])) or previous
        else:
            previous = ""
        pending = []
    return docs


def describe_keys(cfg: "Config | None" = None) -> str:
    """Every key: type, default, the value in `cfg` where it differs, and its meaning."""
    def type_name(tp) -> str:
        return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")

    def walk(cls, obj, prefix):
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{prefix}{f.name}", hints[f.name]
            if dataclasses.is_dataclass(tp):
                section_doc = inspect_doc(tp)
                yield f"\n[{key}]" + (f"  {section_doc}" if section_doc else "")
                yield from walk(tp, getattr(obj, f.name) if obj is not None else None, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            line = f"{key}: {type_name(tp)} = {_show(default)}"
            if obj is not None and getattr(obj, f.name) != default:
                line += f"    (this config: {_show(getattr(obj, f.name))})"
            yield line
            yield from (f"    {text}" for text in _wrap(docs.get(f.name, "")))

    return "\n".join(walk(Config, cfg, "")).lstrip("\n") + "\n"


def inspect_doc(cls: type) -> str:
    """The first paragraph of a config section's docstring, on one line."""
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclass's generated signature: no docstring
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _show(value) -> str:
    return yaml.safe_dump(plain(value), default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def _wrap(text: str, width: int = 92) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) if text else []
