"""Prompt sources (`prompts.source`): the built-in long demo prompts, a text file, a JSONL
file, or a function given by import path.

    "demo"               the built-in long prompts (longalign_rl/demo_prompts.txt)
    a .txt file          one prompt per line (blank lines skipped)
    a .jsonl file        one JSON object per line with a "prompt" string (blank lines skipped)
    "pkg.module:fn"      fn() returns the list of prompts (e.g. shapesworld.plugin:captions)

Lines that cannot be used (not UTF-8, not JSON, no "prompt" string, an empty prompt) are
reported together with their line numbers, so a user fixes a file in one pass.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from longalign_rl.registry import Registry, resolve_source

DEMO_PROMPTS = Path(__file__).parent / "demo_prompts.txt"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the bad lines."""


def _parse_line(raw: bytes, jsonl: bool) -> str | None:
    """One line -> its prompt, None for a blank line; ValueError says what is wrong."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    text = text.strip()
    if not text:
        return None
    if not jsonl:
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str):
        raise ValueError('no "prompt" string')
    if not prompt.strip():
        raise ValueError("empty prompt")
    return prompt.strip()


def demo_prompts() -> list[str]:
    return _read_file(DEMO_PROMPTS)


BUILTIN = Registry("prompt source", None, builtins=lambda: {"demo": demo_prompts})


def load_prompts(source: str, key: str = "prompts.source") -> list[str]:
    """`prompts.source` -> the list of prompts, in file (or function) order. `key`: the
    config key errors name (run.validation is a prompt source too)."""
    try:
        resolved = resolve_source(source, key=key, names=BUILTIN, path_kind="prompt file (.txt or .jsonl)")
    except ValueError as e:
        raise PromptFileError(str(e)) from None
    if resolved.kind == "path":
        return _read_file(resolved.target)
    prompts = resolved.target()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise PromptFileError(f"{key} {source!r} returned {type(prompts).__name__}, not a non-empty list of prompts")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise PromptFileError(f"{key} {source!r}: items {bad[:10]} are not non-empty strings")
    return [p.strip() for p in prompts]


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise PromptFileError(f"prompt file {str(path)!r} does not exist as a file (it is a folder)")
    jsonl = path.suffix.lower() == ".jsonl"
    prompts, errors = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            prompt = _parse_line(raw, jsonl)
        except ValueError as e:
            errors.append(f"  line {number}: {e}")
            continue
        if prompt is not None:
            prompts.append(prompt)
    if errors:
        shown = "\n".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise PromptFileError(f"prompt file {str(path)!r} has {len(errors)} bad line(s):\n{shown}")
    if not prompts:
        raise PromptFileError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


class PromptOrder:
    """A seeded, endless order over the prompts, in passes (epochs), with random access.

    Position p is the p-th prompt handed out since the run began. Every trainer worker
    holds the same order, so a batch is a pure function of its position, and a checkpoint
    resumes the exact prompt order from one integer.
    """

    def __init__(self, prompts: list[str], *, seed: int, shuffle: bool):
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:  # one shuffle per pass, not per prompt
            order = list(range(len(self.prompts)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def batch(self, position: int, n: int) -> list[str]:
        """The n prompts at positions position, position + 1, ..."""
        out = []
        for p in range(position, position + n):
            epoch, i = divmod(p, len(self.prompts))
            out.append(self.prompts[self._order_of(epoch)[i]])
        return out
