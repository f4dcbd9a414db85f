"""CLIP-type rewards from a transformers `CLIPModel`: the `clip` preset, and the backend that
`pickscore` and `tiny_clip` share."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from longalign_rl.encoding.tokenizer import token_counter
from longalign_rl.encoding.tokenizer import check_clip_tokenizer
from rewards.decomposed import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipBackend, ClipTypeReward


class HFClipBackend(ClipBackend):
    """A transformers CLIPModel with its tokenizer and pixel statistics."""

    def __init__(self, model, tokenizer, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
        config = model.config
        super().__init__(config.vision_config.image_size, image_mean, image_std, config.projection_dim)
        self.model = model
        self.tokenizer = tokenizer
        self._count = token_counter(tokenizer)

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def encode_images(self, pixels):
        return F.normalize(self.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    def encode_texts(self, texts):
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.model.config.text_config.max_position_embeddings,
            # Cuts only with split="reference", whose pieces may exceed 75 word tokens:
            # their tail is dropped, as in the reference.
            truncation=True,
            return_tensors="pt",
        ).to(self.image_mean.device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(features.pooler_output, dim=-1)


def load_hf_clip(model: str, processor: str) -> HFClipBackend:
    """CLIPModel weights from `model`; tokenizer and pixel statistics from `processor`
    (each a local folder or a hub id)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from longalign_rl.models import check_hub_model, unloadable

    sources = {"reward.kwargs.model": model}
    if processor != model:
        sources["reward.kwargs.processor"] = processor
    for key, source in sources.items():
        if not Path(source).exists():  # one quick request instead of retries per file
            check_hub_model(source, None, key=key, filename="config.json")
    with unloadable(model, "a CLIP model (reward.kwargs.model)"):
        clip_model = CLIPModel.from_pretrained(model)
    with unloadable(processor, "a CLIP tokenizer (reward.kwargs.processor)"):
        tokenizer = CLIPTokenizer.from_pretrained(processor)
    check_clip_tokenizer(tokenizer, f"the tokenizer of {processor}")
    try:
        image_processor = CLIPImageProcessor.from_pretrained(processor)
    except OSError:  # no preprocessor_config.json: the model was trained on OpenAI's statistics
        return HFClipBackend(clip_model, tokenizer)
    return HFClipBackend(clip_model, tokenizer, image_processor.image_mean, image_processor.image_std)


def clip(model: str = "openai/clip-vit-large-patch14", **kwargs) -> ClipTypeReward:
    """CLIP score (METHOD.md 2); `kwargs` go to ClipTypeReward (text_irrelevant_weight, ...)."""
    return ClipTypeReward(load_hf_clip(model, model), **kwargs)
