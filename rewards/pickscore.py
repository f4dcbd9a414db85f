"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on human preferences, stored as
a transformers CLIPModel; its tokenizer and pixel statistics are those of the LAION CLIP it
was fine-tuned from."""

from __future__ import annotations

from rewards.clip import VIT_H_14, hf_stand_in, load_hf_clip
from rewards.decomposed import ClipTypeReward


def pickscore(
    model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **kwargs
) -> ClipTypeReward:
    """`kwargs` go to ClipTypeReward (text_irrelevant_weight, direction, ...)."""
    return ClipTypeReward(load_hf_clip(model, processor), **kwargs)


pickscore.stand_in = hf_stand_in("pickscore", VIT_H_14, ("model", "processor"))
