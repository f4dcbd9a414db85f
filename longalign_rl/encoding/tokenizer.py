"""The CLIP tokenizer that SD v1.5 uses, built offline, and the token counter that
segment splitting measures with. Pure: transformers and open_clip's vocabulary file.

Offline, `CLIPTokenizer.from_pretrained(...)` can return a useless 3-token tokenizer
without raising: `check_clip_tokenizer` catches it by the vocabulary size.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from typing import Callable

CLIP_VOCAB_SIZE = 49408

TokenCounter = Callable[[str], int]


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict, list]:
    """CLIP's byte-level BPE vocabulary and merges, from the file open_clip ships (found
    without importing open_clip, which costs every sampler and worker 2 s; transformers has
    the same byte table)."""
    from importlib.util import find_spec
    from pathlib import Path

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed: its CLIP vocabulary file builds the offline tokenizer")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer SD v1.5 uses, built offline (49,408 entries; pad = <|endoftext|>).
    `pad_token`: SDXL's second tokenizer (OpenCLIP bigG's) pads with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=max_length,
        pad_token=pad_token,
    )
    check_clip_tokenizer(tokenizer, "the offline CLIP tokenizer")
    return tokenizer


def check_clip_tokenizer(tokenizer, where: str) -> None:
    """Offline, `from_pretrained` can return a useless 3-token tokenizer without raising."""
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{where} has {len(tokenizer)} entries, not CLIP's {CLIP_VOCAB_SIZE}: it did not load")


def clip_clean(text: str) -> str:
    """The text cleaning of the CLIP tokenizer the reference used (transformers' slow
    CLIPTokenizer with ftfy installed, as OpenAI's CLIP): ftfy.fix_text (mojibake, HTML
    entities when the text holds no "<", curly quotes ...), then runs of whitespace to one
    space, stripped. transformers 5's CLIPTokenizer does only the whitespace part, so
    `prompts.clean_text` applies this to every segment before tokenising."""
    import ftfy

    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip()


def token_counter(tokenizer) -> TokenCounter:
    """A counter of word tokens (no <sot>/<eot>) for a transformers CLIP tokenizer."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    return count
