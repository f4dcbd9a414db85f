"""Split a long prompt into segments that each fit one CLIP text-encoder call.

docs/method.md section 1.1. The reference splits on "." and "?" only and truncates a sentence
longer than the encoder's window; we split on ". ! ? ;" and newlines, never inside a
decimal number, and split an over-long sentence further (at commas, then at word and
character boundaries) so that no text is silently lost. `split="reference"` reproduces
the reference's rule (`split_reference`) for a paper-exact run; `split="none"` keeps the
prompt whole as one segment, which the encoder's window cuts at 77 tokens: the plain
pipeline encoding, the baseline a long prompt is measured against.

Pure Python: the only thing needed from the tokenizer is a token counter (tokenizer.py).
"""

from __future__ import annotations

import re
from typing import Sequence

from longalign_rl.encoding.tokenizer import TokenCounter

# One CLIP call holds 77 tokens: <sot> + 75 word tokens + <eot>.
MAX_SEGMENT_TOKENS = 75

# A sentence ends after . ! ? ; (any run of them) or at a newline. A "." followed by a
# digit (3.5, .5) is part of a number, not a sentence end.
_SENTENCE_END = re.compile(r"(?:\.(?!\d)|[!?;])+|\n")
_COMMA = re.compile(r"(?<=,)")


def split_sentences(text: str) -> list[str]:
    """Split at sentence ends and newlines; keep the punctuation; drop empty pieces."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    pieces = [p.strip() for p in pieces]
    return [p for p in pieces if p.strip(".!?;")]


# How a prompt is cut into segments (prompts.split): this project's sentences (the
# default), the reference code's rule (paper-exact mode), or not at all (the pipeline's
# 77-token truncation).
SPLITS = ("sentences", "reference", "none")
# The reference's delimiters, tried in this order at every position: its pattern was meant
# to list ! and ; but, quoted as written, matches the two-character sequences '"!' and ';"'.
_REFERENCE_DELIMITERS = ('"!', ".", "?", ';"')


def split_reference(text: str) -> list[str]:
    """The reference code's split (luping-liu/LongAlign, from its documented behaviour):
    cut at every "." and "?" (inside numbers too: "3.5" gives "3" and "5") and at the
    sequences '"!' and ';"', remove the delimiters, drop empty pieces but keep
    whitespace-only ones, and append "." to every piece; a text with no piece left is its
    own single segment. Nothing is shortened here: the tokenizer's truncation at 77 tokens
    cuts a piece over 75 tokens, dropping its tail, as in the reference."""
    pieces, start, i = [], 0, 0
    while i < len(text):
        found = next((d for d in _REFERENCE_DELIMITERS if text.startswith(d, i)), None)
        if found is None:
            i += 1
            continue
        pieces.append(text[start:i])
        i = start = i + len(found)
    pieces.append(text[start:])
    kept = [p + "." for p in pieces if p]
    return kept or [text]


def _chunk_word(word: str, count: TokenCounter, limit: int) -> list[str]:
    """Cut one over-long "word" into pieces of at most `limit` tokens, by token count
    (a character may become several tokens, more after Unicode normalisation)."""
    chunks, current = [], ""
    for char in word:
        if current and count(current + char) > limit:
            chunks.append(current)
            current = ""
        current += char
    return chunks + [current] if current else chunks


def _wrap_words(text: str, count: TokenCounter, limit: int) -> list[str]:
    """Greedy word wrap so that every line has at most `limit` tokens.

    CLIP's tokenizer splits on whitespace before BPE, so token counts add up over
    words and each word is counted once.
    """
    words: list[str] = []
    for word in text.split():
        if count(word) > limit:
            words.extend(_chunk_word(word, count, limit))
        else:
            words.append(word)
    lines, line, used = [], [], 0
    for word in words:
        n = count(word)
        if line and used + n > limit:
            lines.append(" ".join(line))
            line, used = [], 0
        line.append(word)
        used += n
    if line:
        lines.append(" ".join(line))
    return lines


def _fit(sentence: str, count: TokenCounter, limit: int) -> list[str]:
    """One sentence -> pieces of at most `limit` tokens: whole, else at commas, else wrapped."""
    if count(sentence) <= limit:
        return [sentence]
    pieces: list[str] = []
    for clause in _COMMA.split(sentence):
        clause = clause.strip()
        if not clause:
            continue
        if pieces and count(pieces[-1] + " " + clause) <= limit:
            pieces[-1] = pieces[-1] + " " + clause  # keep short clauses together
        elif count(clause) <= limit:
            pieces.append(clause)
        else:
            pieces.extend(_wrap_words(clause, count, limit))
    return pieces


def _pack(segments: Sequence[str], count: TokenCounter, limit: int) -> list[str]:
    packed: list[str] = []
    for segment in segments:
        if packed and count(packed[-1] + " " + segment) <= limit:
            packed[-1] = packed[-1] + " " + segment
        else:
            packed.append(segment)
    return packed


def split_segments(
    text: str,
    count_tokens: TokenCounter,
    *,
    max_segment_tokens: int = MAX_SEGMENT_TOKENS,
    pack_segments: bool = False,
    split: str = "sentences",
) -> list[str]:
    """Split `text` into segments of at most `max_segment_tokens` tokens each.

    One sentence per segment (the reference's choice) unless `pack_segments`, which
    joins consecutive sentences while they fit. An empty or blank text gives [].
    `split="reference"`: the reference's pieces as they are (`split_reference`; over-long
    ones are cut by the encoder's truncation), never packed. `split="none"`: the text as
    one segment (cut by the encoder's truncation at 77 tokens, as the pipelines cut it).
    """
    if split == "reference":
        return split_reference(text)
    if split == "none":
        return [text] if text.strip() else []
    if split != "sentences":
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    segments = [piece for s in split_sentences(text) for piece in _fit(s, count_tokens, max_segment_tokens)]
    if pack_segments:
        segments = _pack(segments, count_tokens, max_segment_tokens)
    return segments
