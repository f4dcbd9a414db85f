"""Text encoding shared by the families with more than one text encoder (SDXL, SD3, FLUX).
Pure torch/transformers.

`ClipSegments`: one or more CLIP encoders that see the same sentence segments, each in its
own 77-token window, so no text is lost (docs/method.md 1.2-1.5). Per prompt, the
penultimate hidden states of every encoder, concatenated per token, merged across
segments as SD 1.x's segment encoder merges them (every segment's <sot> and word states up
to `max_tokens`), then the last segment's own <eot> and padding states, then the pad
vector; so a prompt of one segment at max_tokens 77 gets exactly the pipeline's 77 states.
And the pooled embedding: each chosen encoder's (`pooled_from`) of the first segment or the
mean over segments (`prompts.pooled`), concatenated.

`T5Tokens`: a T5 encoder over the whole prompt, cut or padded to its own limit, as the SD3
and FLUX pipelines call theirs; zeros where the model has no T5 (SD3 loaded without it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from longalign_rl.encoding.encode import (CUT_PROMPTS_LOGGER, PAD_POSITIONS, merge_segments, prompt_segments,
                                          split_prompts, window_ids, word_counts)
from longalign_rl.encoding.tokenizer import token_counter

POOLED_CHOICES = ("first", "mean")
cut_log = logging.getLogger(CUT_PROMPTS_LOGGER)


def pooled_output(out) -> torch.Tensor:
    """A CLIP text model's pooled vector: the projection of a ...WithProjection model
    (SDXL's and SD3's encoders), else the pooler output (FLUX's CLIPTextModel), as each
    pipeline takes it."""
    embeds = getattr(out, "text_embeds", None)
    return embeds if embeds is not None else out.pooler_output


class ClipSegments:
    """Segment encoding through CLIP encoders that see the same segments (the module docstring)."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence, *, max_tokens: int = 240,
                 pack_segments: bool = False, split: str = "sentences", clean_text: bool = False,
                 pooled: str = "first", pooled_from: Sequence[int] = (-1,)):
        if pooled not in POOLED_CHOICES:
            raise ValueError(f"prompts.pooled must be one of {', '.join(POOLED_CHOICES)}, got {pooled!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizers, self.encoders = tuple(tokenizers), tuple(encoders)
        self.tokenizer = self.tokenizers[0]  # segments are measured with the first (all are CLIP's BPE)
        self.max_tokens = max_tokens
        self.pack_segments, self.split, self.clean_text = pack_segments, split, clean_text
        self.pooled = pooled
        self.pooled_from = tuple(pooled_from)
        self.width = sum(e.config.hidden_size for e in self.encoders)
        states, _ = self.windows([""])
        self.pad = states[0, PAD_POSITIONS].mean(dim=0)

    @torch.no_grad()
    def windows(self, segments: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each segment's 77-token window through every encoder: penultimate hidden states
        concatenated per token `[S, 77, width]`, and the chosen encoders' pooled vectors
        concatenated `[S, pooled width]` (what the pipelines' encode_prompt take, clip_skip None)."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = window_ids(tokenizer, segments).to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(pooled_output(out))
        return torch.cat(hidden, dim=-1), torch.cat([pooled[i] for i in self.pooled_from], dim=-1)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], tokens: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(tokens [B, max_tokens, width], pooled [B, pooled width]) of each prompt; with
        `tokens` False the pooled vectors only (FLUX reads no CLIP tokens)."""
        per_prompt = split_prompts(prompts, self.tokenizer, pack_segments=self.pack_segments, split=self.split,
                                   clean_text=self.clean_text)
        flat = [segment for segments in per_prompt for segment in segments]
        states, pooled = self.windows(flat)
        counts = [len(s) for s in per_prompt]
        merged = None
        if tokens:
            n_words = word_counts(window_ids(self.tokenizer, flat), self.tokenizer.eos_token_id)
            merged = merge_segments(states, n_words, counts, prompts, max_tokens=self.max_tokens, pad=self.pad,
                                    keep_tail=True)
        starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
        if self.pooled == "first":
            chosen = pooled[starts]
        else:
            chosen = torch.stack([pooled[s:s + n].mean(dim=0) for s, n in zip(starts, counts)])
        return merged, chosen

    def segments(self, prompt: str) -> list[str]:
        return prompt_segments(prompt, token_counter(self.tokenizer), pack_segments=self.pack_segments,
                               split=self.split, clean_text=self.clean_text)


class T5Tokens:
    """A T5 encoder's last hidden states of each whole prompt, `[B, max_tokens, width]`: the
    prompt tokenised to exactly `max_tokens` (cut, with the cut prompts said on the
    CUT_PROMPTS logger, or padded), as StableDiffusion3Pipeline and FluxPipeline encode
    it. `encoder` None (SD3 without its T5): zeros of `width`, as diffusers gives then."""

    def __init__(self, tokenizer, encoder, max_tokens: int, width: int):
        if max_tokens < 1:
            raise ValueError(f"prompts.t5_max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer, self.encoder = tokenizer, encoder
        self.max_tokens, self.width = max_tokens, width

    def lengths(self, prompts: Sequence[str]) -> list[int]:
        """Each prompt's T5 token count (with its </s>), uncut."""
        return [len(ids) for ids in self.tokenizer(list(prompts)).input_ids]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.encoder is None:
            return torch.zeros(len(prompts), self.max_tokens, self.width)
        lengths = self.lengths(prompts)
        for prompt, n in zip(prompts, lengths):
            if n > self.max_tokens:
                short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                cut_log.warning("prompt %r: %d of its %d T5 tokens are past prompts.t5_max_tokens=%d and were cut",
                                short, n - self.max_tokens, n, self.max_tokens)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        return self.encoder(ids.to(next(self.encoder.parameters()).device))[0]


def tiny_t5_tokenizer():
    """The test-sized T5 tokenizer shipped in model_configs/tiny/t5_tokenizer/ (no download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "model_configs" / "tiny" / "t5_tokenizer")


def load_t5_tokenizer(path_or_id: str, subfolder: str, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path_or_id, subfolder=subfolder, **({"revision": revision} if revision else {}))


__all__ = ["ClipSegments", "POOLED_CHOICES", "T5Tokens", "load_t5_tokenizer", "pooled_output", "tiny_t5_tokenizer"]
