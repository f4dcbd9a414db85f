"""The T5 branch of the reference release (issue 13; docs/method.md 1.6, "optional extra").

The LongAlign authors' released model conditions the UNet on 480 tokens: the 240
segment-encoded CLIP tokens, followed by 240 tokens of the *whole* caption through a
frozen T5 encoder (T5-large, hidden size 1024) and a small trained `TextAdapter` that maps
them to the UNet's cross-attention size (768):

    LayerNorm(1024) -> GEGLU feed-forward 1024 -> 896 -> LayerNorm(896) -> GEGLU feed-forward 896 -> 768

Each feed-forward is diffusers' own `FeedForward` (GEGLU to 4x the input, dropout 0.1, a
linear map out), so the parameter names are those of the reference's adapter folders
(`ff1.net.0.proj`, `ff1.net.2`, `norm1`, ...): `TextAdapter.from_pretrained` loads an
authors' adapter folder as it is. The caption is tokenised to exactly `max_tokens` T5
tokens (cut or padded) and encoded without an attention mask, as the reference calls its
encoder. Stage 1 trains the adapter with the UNet's LoRA; stage 2 keeps it frozen.

`"tiny"` is a test-sized random T5 encoder (model_configs/tiny/t5_encoder.json) with a
small Unigram tokenizer shipped in model_configs/tiny/t5_tokenizer/ (built offline by
scripts/build_tiny_t5_tokenizer.py; no download). Pure torch, transformers and diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
ADAPTER_FOLDER = "text_adapter"  # the adapter's subfolder in a model folder (stage 1's model/)
ADAPTER_DROPOUT = 0.1  # the reference's feed-forward dropout, active while the adapter trains


class TextAdapter(ModelMixin, ConfigMixin):
    """T5 hidden states [B, L, in_dim] -> conditioning tokens [B, L, out_dim] (see the module
    docstring). `in_dim`: the T5 encoder's hidden size; `int_dim`: between the two
    feed-forwards (reference 896); `out_dim`: the UNet's cross-attention size."""

    @register_to_config
    def __init__(self, in_dim: int, int_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(in_dim)
        self.ff1 = FeedForward(in_dim, int_dim, dropout=ADAPTER_DROPOUT, activation_fn="geglu")
        self.norm2 = torch.nn.LayerNorm(int_dim)
        self.ff2 = FeedForward(int_dim, out_dim, dropout=ADAPTER_DROPOUT, activation_fn="geglu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.norm2(self.ff1(self.norm1(hidden_states))))


def load_t5(encoder: str, seed: int = 0):
    """(tokenizer, frozen T5EncoderModel in eval mode) from `encoder`: "tiny" (random,
    seeded), a local folder or a hub id (google-t5/t5-large, the reference's)."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    if encoder == "tiny":
        config = json.loads((CONFIG_DIR / "tiny" / "t5_encoder.json").read_text())
        torch.manual_seed(seed + 3)
        model = T5EncoderModel(T5Config(**{k: v for k, v in config.items() if not k.startswith("_")}))
        tokenizer = AutoTokenizer.from_pretrained(CONFIG_DIR / "tiny" / "t5_tokenizer")
    else:
        from longalign_rl.hub import check_hub_model, unloadable

        if not Path(encoder).exists():
            check_hub_model(encoder, None, key="t5.encoder", filename="config.json")
        with unloadable(encoder, "a T5 encoder (t5.encoder)"):
            model = T5EncoderModel.from_pretrained(encoder, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(encoder)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"t5.encoder: the tokenizer of {encoder!r} has no pad token")
    return tokenizer, model.requires_grad_(False).eval()


def load_adapter(source: str | Path | None, *, in_dim: int, out_dim: int, int_dim: int = 896,
                 seed: int = 0) -> TextAdapter:
    """The adapter from a folder saved by `TextAdapter.save_pretrained` (an authors' adapter
    folder too), or random-initialised (seeded, so every process builds the same) when
    `source` is None. Its sizes must fit the T5 encoder and the UNet."""
    if source is None:
        torch.manual_seed(seed + 4)
        return TextAdapter(in_dim=in_dim, int_dim=int_dim, out_dim=out_dim)
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"t5.adapter: {str(folder)!r} holds no config.json of a TextAdapter")
    adapter = TextAdapter.from_pretrained(folder, torch_dtype=torch.float32)
    got = (adapter.config.in_dim, adapter.config.out_dim)
    if got != (in_dim, out_dim):
        raise ValueError(f"t5.adapter: {str(folder)!r} maps {got[0]} -> {got[1]}, but the T5 encoder gives "
                         f"{in_dim} and the UNet's cross-attention takes {out_dim}")
    return adapter


class T5Branch(torch.nn.Module):
    """The frozen T5 encoder with its tokenizer, and the adapter (trainable in stage 1)."""

    def __init__(self, tokenizer, encoder, adapter: TextAdapter, max_tokens: int = 240):
        super().__init__()
        if max_tokens < 1:
            raise ValueError(f"t5.max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.adapter = adapter
        self.max_tokens = max_tokens

    @torch.no_grad()
    def hidden_states(self, prompts: Sequence[str]) -> torch.Tensor:
        """The T5 encoder's last hidden states of each whole prompt: [B, max_tokens, d_model]."""
        ids = self.tokenizer(list(prompts), max_length=self.max_tokens, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids
        return self.encoder(input_ids=ids.to(next(self.encoder.parameters()).device)).last_hidden_state

    def forward(self, prompts: Sequence[str] | None = None, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's tokens [B, max_tokens, out_dim], with a graph to the adapter's
        weights when grad is enabled (stage 1). Pass `hidden_states` to reuse them."""
        if hidden_states is None:
            hidden_states = self.hidden_states(prompts)
        dtype = next(self.adapter.parameters()).dtype
        return self.adapter(hidden_states.to(dtype))


def build_t5_branch(t5_cfg, *, cross_attention_dim: int, model: str = "", seed: int = 0) -> T5Branch | None:
    """The T5 branch a config asks for (its `t5` section), or None when `t5.encoder` is "".
    The adapter comes from `t5.adapter`, else from `model`'s text_adapter/ when `model` is a
    folder that has one (stage 1's model/), else random."""
    if not t5_cfg.encoder:
        return None
    tokenizer, encoder = load_t5(t5_cfg.encoder, seed=seed)
    source = t5_cfg.adapter or None
    if source is None and model and (Path(model) / ADAPTER_FOLDER / "config.json").is_file():
        source = Path(model) / ADAPTER_FOLDER
    adapter = load_adapter(source, in_dim=encoder.config.d_model, out_dim=cross_attention_dim,
                           int_dim=t5_cfg.adapter_dim, seed=seed)
    return T5Branch(tokenizer, encoder, adapter.requires_grad_(False).eval(), max_tokens=t5_cfg.max_tokens)
