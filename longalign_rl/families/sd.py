"""SD 1.x / 2.x: a UNet cross-attending to one CLIP text encoder's 77-token window, which
LongAlign extends to long prompts by segment encoding (encoding/encode.py, docs/method.md
section 1). The reference family: every choice here is the authors'. Pure torch/diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longalign_rl.families.base import Components, Family, load_tokenizer, read_config, scheduler_config


@dataclass(frozen=True)
class SD(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    parts = ("unet", "vae", "text_encoder")
    tiny = "tiny"
    real_size = "sd15-random"

    @classmethod
    def build_random(cls, config_dir: Path, seed: int) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from longalign_rl.encoding.tokenizer import build_clip_tokenizer

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**read_config(config_dir, "unet"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**read_config(config_dir, "vae"))
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**read_config(config_dir, "text_encoder")))
        return Components(unet, vae, text_encoder, build_clip_tokenizer(), read_config(config_dir, "scheduler"),
                          family=cls())

    @classmethod
    def load_pretrained(cls, path_or_id: str, revision: str | None = None, model_index: dict | None = None
                        ) -> Components:
        """Weights load in float32 whatever their stored dtype (the shipped models are stored
        in float16); a folder without tokenizer/ gets the offline CLIP tokenizer."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        kw = {"revision": revision} if revision else {}
        unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", torch_dtype=torch.float32, **kw)
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", torch_dtype=torch.float32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", dtype=torch.float32, **kw)
        return Components(unet, vae, text_encoder, load_tokenizer(path_or_id, "tokenizer", revision),
                          scheduler_config(path_or_id, revision), family=cls())

    def pipeline(self, parts: Components, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=parts.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def encoder(self, parts: Components, prompts, *, resolution: int, device="cpu", dtype=torch.float32, t5=None):
        from longalign_rl.encoding import SegmentEncoder

        return SegmentEncoder(parts.tokenizer, parts.text_encoder.to(device, dtype), max_tokens=prompts.max_tokens,
                              pack_segments=prompts.pack_segments, split=prompts.split,
                              clean_text=prompts.clean_text, t5=t5)

    def predict(self, unet, latents, timesteps, cond):
        return unet(latents, timesteps, encoder_hidden_states=cond).sample

    def pipeline_inputs(self, cond, uncond):
        return {"prompt_embeds": cond, "negative_prompt_embeds": uncond.expand_as(cond)}

    def long_prompt_pipeline(self, parts: Components, scheduler):
        from longalign_rl.families.pipelines import LongPromptPipeline

        return LongPromptPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                  unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)
