"""Segment-level encoding of long prompts through a CLIP text encoder (docs/method.md 1.2-1.5).

Every segment is encoded on its own (padded to 77 tokens, no attention mask, as SD v1.5's
pipeline calls its encoder); the per-segment hidden states are concatenated keeping each
segment's <sot> state and word states and dropping <eot>/padding; the result is cut or
padded to `max_tokens` with a fixed pad vector. The output is the `[B, max_tokens,
hidden]` tensor that the UNet's cross-attention takes unchanged, and that a diffusers
`StableDiffusionPipeline` accepts as `prompt_embeds` / `negative_prompt_embeds`.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch

from longalign_rl.encoding.segments import MAX_SEGMENT_TOKENS, SPLITS, split_segments
from longalign_rl.encoding.tokenizer import TokenCounter, clip_clean, token_counter

log = logging.getLogger(__name__)
# The warning that a prompt was cut at max_tokens has a logger of its own, so that the
# processes whose prompts the driver measured beforehand can leave it out of warnings.log
# (console.log_warnings_to's `skip`) by this name, not by a copy of a module path.
CUT_PROMPTS_LOGGER = f"{__name__}.cut_prompts"
cut_log = logging.getLogger(CUT_PROMPTS_LOGGER)

CLIP_WINDOW = MAX_SEGMENT_TOKENS + 2  # <sot> + 75 words + <eot>
# The pad vector is the mean hidden state over these positions of the empty prompt
# (reference choice: they are deep in the padding, far from <sot>/<eot>).
PAD_POSITIONS = slice(17, CLIP_WINDOW)


def _run_encoder(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """Final-layer-norm hidden states, the tensor SD's UNet normally receives."""
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids.to(device))[0]


@torch.no_grad()
def pad_vector(tokenizer, text_encoder) -> torch.Tensor:
    """Mean hidden state at positions 17..76 of "" padded to 77 tokens: `[hidden]`."""
    ids = tokenizer([""], padding="max_length", max_length=CLIP_WINDOW, return_tensors="pt").input_ids
    return _run_encoder(text_encoder, ids)[0, PAD_POSITIONS].mean(dim=0)


def prompt_segments(prompt: str, count: TokenCounter, *, pack_segments: bool = False, split: str = "sentences",
                    clean_text: bool = False) -> list[str]:
    """`split_segments` of the prompt, as they are tokenised: with `clean_text`
    (prompts.clean_text) each segment cleaned after the split, as the reference's tokenizer
    cleaned each piece it got (tokenizer.clip_clean), and measured cleaned."""
    if not clean_text:
        return split_segments(prompt, count, pack_segments=pack_segments, split=split)
    pieces = split_segments(prompt, lambda s: count(clip_clean(s)), pack_segments=pack_segments, split=split)
    return [clip_clean(piece) for piece in pieces]


def encoded_lengths(prompts: Sequence[str], tokenizer, *, pack_segments: bool = False,
                    split: str = "sentences", clean_text: bool = False) -> list[int]:
    """How many states `encode_prompts` gives each prompt before it cuts at `max_tokens`:
    per segment its <sot> and up to 75 word tokens (a prompt without segments: 1). Needs
    only the tokenizer, and counts each distinct sentence once, so the driver measures a
    whole prompt file in seconds."""
    count = functools.lru_cache(maxsize=1 << 16)(token_counter(tokenizer))
    return [sum(1 + min(count(s), MAX_SEGMENT_TOKENS)
                for s in prompt_segments(prompt, count, pack_segments=pack_segments, split=split,
                                         clean_text=clean_text) or [""])
            for prompt in prompts]


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str],
    tokenizer,
    text_encoder,
    *,
    max_tokens: int = 240,
    pack_segments: bool = False,
    pad: torch.Tensor | None = None,
    split: str = "sentences",
    clean_text: bool = False,
) -> torch.Tensor:
    """Encode prompts by segments: `[B, max_tokens, hidden]`.

    `split`: "sentences" (this project's), "reference" (the reference code's rule,
    segments.split_reference) or "none" (the prompt as one window, cut at 77 tokens: with
    max_tokens 77 exactly the pipeline's encoding, TruncatedEncoder's), see segments.py.
    `clean_text`: see `prompt_segments`.

    `pad` is the pad vector; pass a cached one (see `SegmentEncoder`) to save one
    encoder call. The empty prompt gives <sot> followed by pad vectors: the
    unconditional embedding for classifier-free guidance.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    per_prompt = split_prompts(prompts, tokenizer, pack_segments=pack_segments, split=split, clean_text=clean_text)
    ids = window_ids(tokenizer, [segment for segments in per_prompt for segment in segments])
    states = _run_encoder(text_encoder, ids)  # one call for all segments of all prompts
    if pad is None:
        pad = pad_vector(tokenizer, text_encoder)
    # split "none" is the pipeline's encoding: the window's own <eot> and padding states follow the words
    return merge_segments(states, word_counts(ids, tokenizer.eos_token_id), [len(s) for s in per_prompt], prompts,
                          max_tokens=max_tokens, pad=pad, keep_tail=split == "none")


def split_prompts(prompts: Sequence[str], tokenizer, *, pack_segments: bool = False, split: str = "sentences",
                  clean_text: bool = False) -> list[list[str]]:
    """Each prompt's segments (`prompt_segments`); the empty prompt has one, "". TypeError
    naming the prompt that is not a string."""
    count = token_counter(tokenizer)
    per_prompt = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
        per_prompt.append(prompt_segments(prompt, count, pack_segments=pack_segments, split=split,
                                          clean_text=clean_text) or [""])
    return per_prompt


def window_ids(tokenizer, segments: list[str]) -> torch.Tensor:
    """Token ids of each segment in its own 77-token window: `[S, 77]`."""
    return tokenizer(segments, padding="max_length", max_length=CLIP_WINDOW, truncation=True,
                     return_tensors="pt").input_ids


def word_counts(ids: torch.Tensor, eos_token_id: int) -> list[int]:
    """Word tokens of each window: those at 1..n, before the first <eot>."""
    return (ids[:, 1:] != eos_token_id).int().cumprod(dim=1).sum(dim=1).tolist()


def merge_segments(states: torch.Tensor, n_words: list[int], counts: list[int], prompts: Sequence[str], *,
                   max_tokens: int, pad: torch.Tensor, keep_tail: bool = False) -> torch.Tensor:
    """Each prompt's segment windows `states [S, 77, H]` (its `counts[b]` consecutive rows)
    merged into one sequence: every segment's <sot> and word states in order, cut at
    `max_tokens` (with a warning: text is lost), then filled to `max_tokens`.

    The fill is the pad vector (the reference's rule). With `keep_tail`, the last segment's
    own <eot> and padding states come first, so that a prompt of one segment keeps its whole
    77-token window, exactly what the pipeline's encode_prompt gives (families/sdxl.py)."""
    pad = pad.to(states)
    out = pad.expand(len(counts), max_tokens, pad.shape[-1]).clone()
    row = 0
    for b, n in enumerate(counts):
        kept = torch.cat([states[row + j, : 1 + n_words[row + j]] for j in range(n)])
        last = row + n - 1
        row += n
        if kept.shape[0] > max_tokens:
            prompt = prompts[b] if len(prompts[b]) <= 60 else prompts[b][:57] + "..."
            cut_log.warning(
                "prompt %r: %d of its %d encoded states are past max_tokens=%d and were cut (raise prompts.max_tokens)",
                prompt, kept.shape[0] - max_tokens, kept.shape[0], max_tokens,
            )
        if keep_tail:
            kept = torch.cat([kept, states[last, 1 + n_words[last]:]])
        kept = kept[:max_tokens]
        out[b, : kept.shape[0]] = kept
    return out


class SegmentEncoder:
    """A frozen tokenizer + text encoder with its pad vector, computed once and kept here.

    `t5` (encoding/t5.py, the reference release's T5 branch): its adapter's tokens of the
    whole prompt follow the CLIP segment tokens, [B, max_tokens + t5.max_tokens, hidden].
    The adapter runs in the caller's grad mode (stage 1 trains it), the encoders never do."""

    def __init__(self, tokenizer, text_encoder, *, max_tokens: int = 240, pack_segments: bool = False,
                 split: str = "sentences", clean_text: bool = False, t5=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_tokens = max_tokens
        self.pack_segments = pack_segments
        self.split = split
        self.clean_text = clean_text
        self.t5 = t5
        self.pad = pad_vector(tokenizer, text_encoder)
        self._uncond_clip = self.clip([""])
        self._uncond_t5 = t5.hidden_states([""]) if t5 is not None else None

    def clip(self, prompts: Sequence[str]) -> torch.Tensor:
        """The CLIP segment tokens alone: [B, max_tokens, hidden]."""
        return encode_prompts(
            prompts, self.tokenizer, self.text_encoder,
            max_tokens=self.max_tokens, pack_segments=self.pack_segments, pad=self.pad, split=self.split,
            clean_text=self.clean_text,
        )

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        clip = self.clip(prompts)
        if self.t5 is None:
            return clip
        return torch.cat([clip, self.t5(prompts).to(clip.dtype)], dim=1)

    def uncond(self, batch_size: int) -> torch.Tensor:
        """The unconditional embedding repeated: `[batch_size, tokens, hidden]`."""
        uncond = self._uncond_clip
        if self.t5 is not None:  # through the adapter now: stage 1 changes it
            uncond = torch.cat([uncond, self.t5(hidden_states=self._uncond_t5).to(uncond.dtype)], dim=1)
        return uncond.expand(batch_size, -1, -1)

    def segments(self, prompt: str) -> list[str]:
        return prompt_segments(prompt, token_counter(self.tokenizer), pack_segments=self.pack_segments,
                               split=self.split, clean_text=self.clean_text)


class TruncatedEncoder:
    """The plain SD v1.5 encoding, the baseline that segment encoding replaces: the whole
    prompt in one 77-token window, cut after 75 word tokens, `<eot>`/padding states kept.
    The same interface as `SegmentEncoder`, so a `Sampler` takes either."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._uncond = self([""])

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=CLIP_WINDOW, truncation=True,
                             return_tensors="pt").input_ids
        return _run_encoder(self.text_encoder, ids)

    def uncond(self, batch_size: int) -> torch.Tensor:
        return self._uncond.expand(batch_size, -1, -1)
