"""FLUX.1: a flow-matching transformer (double-stream then single-stream blocks) whose text
tokens are T5-XXL's (512 for dev) and whose pooled vector is CLIP-L's pooled output, cut at
77 tokens. FLUX.1-dev is guidance-distilled: the guidance scale enters as an embedding, one
denoiser call per step, no unconditional branch. Its latents (16 channels) are packed into
2x2 patches, 64 values per token, with (0, row, column) position ids. Pure torch/diffusers.

Long prompts (docs/models.md): the CLIP part is the pooled vector only, of the first
sentence segment or the mean over segments (`prompts.pooled`), each segment in its own
77-token window; the T5 part takes the whole prompt up to `prompts.t5_max_tokens` (0: 512,
the pipeline's default), which is where FLUX reads the words. A prompt of one segment gives
exactly `FluxPipeline.encode_prompt`'s embeddings.

The conditioning tensor (families/base.py) is `[B, t5 tokens + 1, joint]`: the T5 tokens,
then one row [pooled | zeros]. Latents stay `[B, 16, h, w]` everywhere outside `predict`,
which packs them for the transformer and unpacks its velocity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longalign_rl.families.base import Components, load_tokenizer, read_config, scheduler_config
from longalign_rl.families.flowmatch import FlowFamily
from longalign_rl.families.text import ClipSegments, T5Tokens, load_t5_tokenizer, tiny_t5_tokenizer

# The guidance a guidance-distilled FLUX is trained at in stage 1 (diffusers' FLUX training
# scripts' --guidance_scale default).
TRAINING_GUIDANCE = 3.5


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w]: FluxPipeline._unpack_latents."""
    b, _, channels = tokens.shape
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """The packed tokens' position ids [(h/2)(w/2), 3]: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Flux(FlowFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    tiny = "tiny-flux"
    real_size = "flux-dev-random"
    t5_default_tokens = 512  # FluxPipeline's max_sequence_length
    t5_tokenizer_folder = "tokenizer_2"

    pooled_dim: int = 768  # CLIP-L's width: the transformer's pooled_projection_dim
    guidance_embeds: bool = True  # FLUX.1-dev: guidance as an embedding; schnell: none

    @classmethod
    def _family(cls, transformer) -> "Flux":
        c = transformer.config
        return cls(pooled_dim=c.pooled_projection_dim, guidance_embeds=bool(c.guidance_embeds))

    @classmethod
    def build_random(cls, config_dir: Path, seed: int) -> Components:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from longalign_rl.encoding.tokenizer import build_clip_tokenizer

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**read_config(config_dir, "transformer"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**read_config(config_dir, "vae"))
        torch.manual_seed(seed + 2)
        clip = CLIPTextModel(CLIPTextConfig(**read_config(config_dir, "text_encoder")))
        torch.manual_seed(seed + 3)
        t5 = T5EncoderModel(T5Config(**read_config(config_dir, "text_encoder_2")))
        return Components(transformer, vae, clip, build_clip_tokenizer(), read_config(config_dir, "scheduler"),
                          family=cls._family(transformer), text_encoder_2=t5, tokenizer_2=tiny_t5_tokenizer())

    @classmethod
    def load_pretrained(cls, path_or_id, revision=None, model_index=None, without=()) -> Components:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        kw = {"revision": revision} if revision else {}
        transformer = FluxTransformer2DModel.from_pretrained(path_or_id, subfolder="transformer",
                                                            torch_dtype=torch.float32, **kw)
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", torch_dtype=torch.float32, **kw)
        clip = CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", dtype=torch.float32, **kw)
        t5 = T5EncoderModel.from_pretrained(path_or_id, subfolder="text_encoder_2", dtype=torch.float32, **kw)
        return Components(transformer, vae, clip, load_tokenizer(path_or_id, "tokenizer", revision),
                          scheduler_config(path_or_id, revision), family=cls._family(transformer),
                          text_encoder_2=t5, tokenizer_2=load_t5_tokenizer(path_or_id, "tokenizer_2", revision))

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def _pipeline_parts(self, parts: Components, scheduler) -> dict:
        return dict(transformer=parts.unet, scheduler=scheduler, vae=parts.vae, text_encoder=parts.text_encoder,
                    tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2)

    def pipeline(self, parts, scheduler):
        return self.pipeline_class()(**self._pipeline_parts(parts, scheduler))

    def long_prompt_pipeline(self, parts, scheduler):
        from longalign_rl.families.pipelines import LongPromptFluxPipeline

        return LongPromptFluxPipeline(**self._pipeline_parts(parts, scheduler))

    def to_pipeline_latents(self, latents):
        return pack(latents)

    def from_pipeline_latents(self, latents, latent_size):
        return unpack(latents, latent_size, latent_size)

    def schedule_sigmas(self, num_steps):
        return np.linspace(1.0, 1 / num_steps, num_steps)  # FluxPipeline's

    def encoder(self, parts, prompts, *, resolution, device="cpu", dtype=torch.float32, t5=None):
        if t5 is not None:
            raise ValueError("t5.encoder: the T5 branch of the reference release is SD 1.x's; FLUX has its own T5")
        t5_encoder = parts.text_encoder_2.to(device, dtype)
        return FluxEncoder(parts.tokenizer, parts.text_encoder.to(device, dtype),
                           T5Tokens(parts.tokenizer_2, t5_encoder, self.t5_tokens(prompts), t5_encoder.config.d_model),
                           max_tokens=prompts.max_tokens, pack_segments=prompts.pack_segments, split=prompts.split,
                           clean_text=prompts.clean_text, pooled=prompts.pooled)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the T5 tokens [B, tokens, joint], the pooled vector [B, pooled_dim])."""
        return cond[:, :-1], cond[:, -1, :self.pooled_dim]

    def predict(self, unet, latents, timesteps, cond, guidance: float | None = None):
        """The velocity [B, 16, h, w]. `guidance`: the distilled guidance scale (a sampler's;
        stage 1: TRAINING_GUIDANCE); a model without a guidance embedding takes none."""
        tokens, pooled = self.unpack(cond)
        b, _, h, w = latents.shape
        t = self.timestep_batch(timesteps, latents).to(latents.dtype)
        g = None
        if self.guidance_embeds:
            g = torch.full([b], TRAINING_GUIDANCE if guidance is None else guidance, device=latents.device,
                           dtype=torch.float32)
        out = unet(hidden_states=pack(latents), timestep=t / 1000, guidance=g, pooled_projections=pooled,
                   encoder_hidden_states=tokens, txt_ids=torch.zeros(tokens.shape[1], 3, device=latents.device,
                                                                     dtype=tokens.dtype),
                   img_ids=image_ids(h, w, latents.device, latents.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def guided(self, unet, latents, timestep, cond, uncond, guidance_scale):
        """FLUX.1-dev's guidance: one call, the scale as an embedding (FluxPipeline's, without
        true CFG); `uncond` is not used (stage 1's caption dropout still uses it)."""
        dtype = next(unet.parameters()).dtype
        return self.predict(unet, latents.to(dtype), timestep, cond.to(dtype), guidance=guidance_scale
                            ).to(latents.dtype)

    def pipeline_inputs(self, cond, uncond):
        tokens, pooled = self.unpack(cond)
        return {"prompt_embeds": tokens, "pooled_prompt_embeds": pooled}

    def check_config(self, cfg) -> list[str]:
        problems = super().check_config(cfg)
        if cfg.model.without_t5:
            problems.append("model.without_t5: FLUX reads the words from its T5 only; it cannot run without it")
        return problems


class FluxEncoder(ClipSegments):
    """FLUX's encoding (the module docstring): CLIP-L's pooled vector per segment, T5's tokens."""

    def __init__(self, tokenizer, text_encoder, t5: T5Tokens, *, max_tokens: int = 240, pack_segments: bool = False,
                 split: str = "sentences", clean_text: bool = False, pooled: str = "first"):
        super().__init__((tokenizer,), (text_encoder,), max_tokens=max_tokens, pack_segments=pack_segments,
                         split=split, clean_text=clean_text, pooled=pooled, pooled_from=(0,))
        self.t5 = t5
        self._uncond = self([""])

    @torch.no_grad()
    def __call__(self, prompts) -> torch.Tensor:
        _, pooled = self.encode(prompts, tokens=False)
        tokens = self.t5(prompts)
        row = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[-1])
        row[:, 0, :pooled.shape[-1]] = pooled.to(tokens)
        return torch.cat([tokens, row], dim=1)

    def uncond(self, batch_size: int) -> torch.Tensor:
        return self._uncond.expand(batch_size, -1, -1)


__all__ = ["Flux", "FluxEncoder", "image_ids", "pack", "unpack"]
