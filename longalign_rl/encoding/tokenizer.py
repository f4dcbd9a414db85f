"""The CLIP tokenizer that SD v1.5 uses, built offline, and the token counter that
segment splitting measures with. Pure: transformers and open_clip's vocabulary file.

Offline, `CLIPTokenizer.from_pretrained(...)` can return a useless 3-token tokenizer
without raising: `check_clip_tokenizer` catches it by the vocabulary size.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from typing import Callable

CLIP_VOCAB_SIZE = 49408

TokenCounter = Callable[[str], int]


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict, list]:
    """CLIP's byte-level BPE vocabulary and merges, from the file open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 77):
    """The CLIP tokenizer SD v1.5 uses, built offline (49,408 entries; pad = <|endoftext|>)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    check_clip_tokenizer(tokenizer, "the offline CLIP tokenizer")
    return tokenizer


def check_clip_tokenizer(tokenizer, where: str) -> None:
    """Offline, `from_pretrained` can return a useless 3-token tokenizer without raising."""
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{where} has {len(tokenizer)} entries, not CLIP's {CLIP_VOCAB_SIZE}: it did not load")


def token_counter(tokenizer) -> TokenCounter:
    """A counter of word tokens (no <sot>/<eot>) for a transformers CLIP tokenizer."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])

    return count
