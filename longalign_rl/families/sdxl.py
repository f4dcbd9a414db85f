"""SDXL: a UNet cross-attending to two CLIP encoders' penultimate hidden states, concatenated
per token (CLIP-L 768 + OpenCLIP bigG 1280 = 2048 wide), plus a pooled text embedding (bigG's
projection) and six size-and-crop numbers ("time ids") added to its timestep embedding.
Both encoders cut prompts at 77 tokens, the problem LongAlign solves. Pure torch/diffusers.

Long prompts (docs/models.md): both encoders see the same sentence segments, each in its own
77-token window, so no text is lost. The merged sequence keeps every segment's <sot> and word
states up to `prompts.max_tokens` (as SD 1.x's), then the last segment's own <eot> and
padding states, then the pad vector. A prompt of one segment at max_tokens 77 therefore gets
exactly `StableDiffusionXLPipeline.encode_prompt`'s 77 states, and at a larger max_tokens
the same 77 followed by the pad vector. The pooled embedding of a prompt of several
segments is `prompts.pooled`: the first segment's or the mean over segments.

The conditioning tensor (families/base.py's contract) is `[B, max_tokens + 1, 2048]`: the
cross-attention tokens, then one row holding [time ids (6) | pooled (1280) | zeros].
`predict` splits it again. The time ids are those diffusers gives an image generated at the
sampler's resolution: (H, W, 0, 0, H, W); stage 1 writes each training image's own size and
crop (`with_size`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from longalign_rl.families.base import Components, Family, load_tokenizer, read_config, scheduler_config
from longalign_rl.families.sd import SD
from longalign_rl.families.text import POOLED_CHOICES, ClipSegments

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


@dataclass(frozen=True)
class SDXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    tiny = "tiny-sdxl"
    real_size = "sdxl-random"
    vae_fp16_overflows = True

    pooled_dim: int = 1280  # text_encoder_2's projection width, what the UNet's add_embedding takes
    # model_index.json's force_zeros_for_empty_prompt: the empty prompt's conditioning is zeros
    # (SDXL base), not its encoding (the pipeline's default, and so ours).
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def build_random(cls, config_dir: Path, seed: int) -> Components:
        """SD 1.x's three parts built the same way (the same seeds), and the second encoder."""
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from longalign_rl.encoding.tokenizer import build_clip_tokenizer

        parts = SD.build_random(config_dir, seed)
        torch.manual_seed(seed + 3)
        parts.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**read_config(config_dir, "text_encoder_2")))
        parts.tokenizer_2 = build_clip_tokenizer(pad_token="!")
        parts.family = cls(pooled_dim=parts.text_encoder_2.config.projection_dim)
        return parts

    @classmethod
    def load_pretrained(cls, path_or_id: str, revision: str | None = None, model_index: dict | None = None
                        ) -> Components:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        kw = {"revision": revision} if revision else {}
        unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", torch_dtype=torch.float32, **kw)
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", torch_dtype=torch.float32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", dtype=torch.float32, **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path_or_id, subfolder="text_encoder_2",
                                                                     dtype=torch.float32, **kw)
        zeros = bool((model_index or {}).get("force_zeros_for_empty_prompt", True))
        return Components(unet, vae, text_encoder, load_tokenizer(path_or_id, "tokenizer", revision),
                          scheduler_config(path_or_id, revision),
                          family=cls(pooled_dim=text_encoder_2.config.projection_dim, force_zeros_for_empty_prompt=zeros),
                          text_encoder_2=text_encoder_2,
                          tokenizer_2=load_tokenizer(path_or_id, "tokenizer_2", revision, pad_token="!"))

    def pipeline(self, parts: Components, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                         text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                         tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

    def encoder(self, parts: Components, prompts, *, resolution: int, device="cpu", dtype=torch.float32, t5=None):
        if t5 is not None:
            raise ValueError("t5.encoder: the T5 branch of the reference release is SD 1.x's; SDXL runs without it")
        return SDXLEncoder(parts.tokenizer, parts.text_encoder.to(device, dtype), parts.tokenizer_2,
                           parts.text_encoder_2.to(device, dtype), max_tokens=prompts.max_tokens,
                           pack_segments=prompts.pack_segments, split=prompts.split, clean_text=prompts.clean_text,
                           pooled=prompts.pooled, resolution=resolution, zeros_for_empty=self.force_zeros_for_empty_prompt)

    def predict(self, unet, latents, timesteps, cond):
        tokens, pooled, ids = unpack(cond, self.pooled_dim)
        return unet(latents, timesteps, encoder_hidden_states=tokens,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample

    def pipeline_inputs(self, cond, uncond):
        tokens, pooled, _ = unpack(cond, self.pooled_dim)  # the pipeline writes its own time ids
        negative, negative_pooled, _ = unpack(uncond.expand_as(cond), self.pooled_dim)
        return {"prompt_embeds": tokens, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
                "negative_pooled_prompt_embeds": negative_pooled}

    def long_prompt_pipeline(self, parts: Components, scheduler):
        from longalign_rl.families.pipelines import LongPromptXLPipeline

        return LongPromptXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                    text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                    tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=scheduler,
                                    force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

    def with_image_sizes(self, cond, sizes, resolution):
        ids = torch.cat([sizes, torch.tensor([[resolution, resolution]]).expand(len(sizes), 2)], dim=1)
        return with_size(cond, ids.to(cond.dtype))

    def check_config(self, cfg) -> list[str]:
        problems = []
        if cfg.t5.encoder:
            problems.append("t5.encoder: the reference release's T5 branch is SD 1.x's; leave it empty for SDXL")
        return problems


def unpack(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL's packed conditioning `[B, tokens + 1, width]` as the UNet takes it: the
    cross-attention tokens `[B, tokens, width]`, the pooled embedding `[B, pooled_dim]` and
    the time ids `[B, 6]`."""
    row = cond[:, -1]
    return cond[:, :-1], row[:, TIME_IDS:TIME_IDS + pooled_dim], row[:, :TIME_IDS]


def time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> list[float]:
    """SDXL's size conditioning, in diffusers' order: original (h, w), crop top-left (y, x), target (h, w)."""
    return [float(v) for v in (*original, *crop, *target)]


def with_size(cond: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`cond` (SDXL's packed conditioning) with each sample's time ids `ids [B, 6]` instead
    of the sampler's: a training image's own original size and crop (stage 1)."""
    out = cond.clone()
    out[:, -1, :TIME_IDS] = ids.to(out)
    return out


class SDXLEncoder(ClipSegments):
    """Segment encoding through both of SDXL's CLIP encoders (the module docstring;
    families/text.py): the tokens of both, the pooled embedding of the second."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, *, max_tokens: int = 240,
                 pack_segments: bool = False, split: str = "sentences", clean_text: bool = False,
                 pooled: str = "first", resolution: int = 1024, zeros_for_empty: bool = True):
        super().__init__((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), max_tokens=max_tokens,
                         pack_segments=pack_segments, split=split, clean_text=clean_text, pooled=pooled,
                         pooled_from=(1,))
        self.ids = time_ids((resolution, resolution), (0, 0), (resolution, resolution))
        pooled_dim = text_encoder_2.config.projection_dim
        if TIME_IDS + pooled_dim > self.width:
            raise ValueError(f"SDXL's conditioning row of {self.width} values cannot hold {TIME_IDS} time ids and a "
                             f"{pooled_dim}-wide pooled embedding")
        if zeros_for_empty:  # the pipeline's force_zeros_for_empty_prompt: zeros, then our size conditioning
            zeros = self.pad.new_zeros
            self._uncond = self._pack(zeros(1, max_tokens, self.width), zeros(1, pooled_dim))
        else:
            self._uncond = self([""])

    def _pack(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        row = torch.zeros(tokens.shape[0], 1, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        row[:, 0, :TIME_IDS] = torch.tensor(self.ids, dtype=tokens.dtype)
        row[:, 0, TIME_IDS:TIME_IDS + pooled.shape[-1]] = pooled
        return torch.cat([tokens, row], dim=1)

    @torch.no_grad()
    def __call__(self, prompts) -> torch.Tensor:
        return self._pack(*self.encode(prompts))

    def uncond(self, batch_size: int) -> torch.Tensor:
        return self._uncond.expand(batch_size, -1, -1)


__all__ = ["POOLED_CHOICES", "SDXL", "SDXLEncoder", "time_ids", "unpack", "with_size"]
