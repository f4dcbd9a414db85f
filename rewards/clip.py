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

    from longalign_rl.hub import check_hub_model, unloadable

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
    """CLIP score (docs/method.md 2.1); `kwargs` go to ClipTypeReward (text_irrelevant_weight, ...)."""
    return ClipTypeReward(load_hf_clip(model, model), **kwargs)


# The transformers CLIPConfig of the architectures the presets load, for stand-ins with
# random weights (`longalign-rl smoke --size real`): OpenAI's ViT-L/14 (clip) and the LAION
# ViT-H/14 that PickScore and Denscore fine-tune.
VIT_L_14 = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"},
    "projection_dim": 768,
}
VIT_H_14 = {
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "max_position_embeddings": 77, "hidden_act": "gelu"},
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "hidden_act": "gelu"},
    "projection_dim": 1024,
}


def random_clip_folder(folder: Path, name: str, architecture: dict) -> Path:
    """A CLIPModel of `architecture` with random weights, with the real CLIP tokenizer (built
    offline) and an image processor, as a local folder that `load_hf_clip` loads."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from longalign_rl.encoding.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

    path = folder / f"{name}-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = {**architecture, "text_config": {**architecture["text_config"], "vocab_size": CLIP_VOCAB_SIZE}}
        CLIPModel(CLIPConfig(**config)).save_pretrained(path, safe_serialization=True)
        build_clip_tokenizer().save_pretrained(path)
        size = architecture["vision_config"]["image_size"]
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)
    return path


def hf_stand_in(name: str, architecture: dict, loaders: tuple[str, ...]):
    """The `stand_in` of a preset that loads a transformers CLIPModel (longalign_rl/smoke.py),
    the other arguments kept: "tiny" -> tiny_clip (the same class, tiny); "real" -> the preset
    itself on `architecture` with random weights; `loaders`: its arguments naming what to load."""
    def stand_in(size: str, folder: Path, kwargs: dict) -> tuple[str, dict]:
        kept = {k: v for k, v in kwargs.items() if k not in loaders}
        if size == "tiny":
            return "tiny_clip", kept
        path = str(random_clip_folder(folder, name, architecture))
        return name, {**kept, **{key: path for key in loaders}}
    return stand_in


clip.stand_in = hf_stand_in("clip", VIT_L_14, ("model",))
