"""Denscore (luping-liu/Denscore): the LongAlign authors' segment-level preference model, a
CLIP ViT-H/14 stored as a transformers CLIPModel, trained to score an image against each
segment of a long prompt. The reference code's stage 2 uses it as its reward; its tokenizer
and pixel statistics are those of the LAION CLIP it starts from.

For the reference's stage 2 as it is, use it with crop="reference", split="reference" and
text_irrelevant_weight=0.3 (the default).
"""

from __future__ import annotations

from rewards.clip import VIT_H_14, hf_stand_in, load_hf_clip
from rewards.decomposed import ClipTypeReward


def denscore(
    model: str = "luping-liu/Denscore", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **kwargs
) -> ClipTypeReward:
    """`kwargs` go to ClipTypeReward (text_irrelevant_weight, split, crop, ...)."""
    return ClipTypeReward(load_hf_clip(model, processor), **kwargs)


denscore.stand_in = hf_stand_in("denscore", VIT_H_14, ("model", "processor"))
