"""Tiny random-initialised CLIP-type rewards for tests and the CPU demo: the real classes
(transformers CLIPModel, open_clip CLIP) and real CLIP tokenizers, with tiny widths.
The same seed gives the same weights in every process; the global RNG is left as it was."""

from __future__ import annotations

import torch

from longalign_rl.encoding.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer
from rewards.clip import HFClipBackend
from rewards.decomposed import ClipTypeReward
from rewards.hps import OpenClipBackend

# Both towers: 2 layers of width 32; 32 px images in 8 px patches; 77-token text window.
TINY_HF_CLIP = {
    "text_config": {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "projection_dim": 32,
}
# open_clip's model-config format (the same as its JSON files).
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 2},
}


def tiny_clip(seed: int = 0, **kwargs) -> ClipTypeReward:
    """`kwargs` go to ClipTypeReward (text_irrelevant_weight, ...)."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**TINY_HF_CLIP))
    return ClipTypeReward(HFClipBackend(model, build_clip_tokenizer()), **kwargs)


def tiny_openclip(seed: int = 0, **kwargs) -> ClipTypeReward:
    """`kwargs` go to ClipTypeReward (text_irrelevant_weight, ...)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_OPEN_CLIP)
    return ClipTypeReward(OpenClipBackend(model, open_clip.SimpleTokenizer()), **kwargs)
