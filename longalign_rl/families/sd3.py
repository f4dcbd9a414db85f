"""SD3 / SD3.5: a flow-matching MMDiT transformer whose text tokens are CLIP-L's and CLIP-G's
penultimate hidden states (77 each, concatenated per token to 2048 and zero-padded to the
joint width 4096) followed by T5-XXL's (256), plus a pooled vector (CLIP-L's and CLIP-G's
projections, 768 + 1280). Both CLIPs cut prompts at 77 tokens, T5 at its own limit.
Pure torch/diffusers.

Long prompts (docs/models.md): the CLIP part is segment-encoded as SDXL's (families/text.py):
every segment's words up to `prompts.max_tokens`, then the last segment's own <eot> and
padding states, then the pad vector; the pooled vectors of the first segment or the mean
over segments (`prompts.pooled`). The T5 part takes the whole prompt up to
`prompts.t5_max_tokens` (0: 256, the pipeline's default). A prompt of one segment at
max_tokens 77 gives exactly `StableDiffusion3Pipeline.encode_prompt`'s embeddings.
`model.without_t5` loads the model without its T5 (diffusers' `text_encoder_3=None`): the
T5 tokens are zeros, as the pipeline gives them, and the CLIP segments carry the whole prompt.

The conditioning tensor (families/base.py) is `[B, max_tokens + t5 tokens + 1, joint]`:
the CLIP tokens (zero-padded), the T5 tokens, then one row [pooled | zeros].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from longalign_rl.families.base import Components, load_tokenizer, read_config, saved_without, scheduler_config
from longalign_rl.families.flowmatch import FlowFamily
from longalign_rl.families.text import ClipSegments, T5Tokens, load_t5_tokenizer, tiny_t5_tokenizer


@dataclass(frozen=True)
class SD3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    tiny = "tiny-sd3"
    real_size = "sd35-medium-random"
    t5_default_tokens = 256  # StableDiffusion3Pipeline's max_sequence_length
    t5_tokenizer_folder = "tokenizer_3"

    pooled_dim: int = 2048  # CLIP-L's + CLIP-G's projections: the transformer's pooled_projection_dim
    joint_dim: int = 4096  # the transformer's joint_attention_dim (T5's width)

    @classmethod
    def _family(cls, transformer) -> "SD3":
        c = transformer.config
        return cls(pooled_dim=c.pooled_projection_dim, joint_dim=c.joint_attention_dim)

    @classmethod
    def build_random(cls, config_dir: Path, seed: int) -> Components:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from longalign_rl.encoding.tokenizer import build_clip_tokenizer

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**read_config(config_dir, "transformer"))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**read_config(config_dir, "vae"))
        encoders = []
        for k, part in enumerate(("text_encoder", "text_encoder_2")):
            torch.manual_seed(seed + 2 + k)
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**read_config(config_dir, part))))
        torch.manual_seed(seed + 4)
        t5 = T5EncoderModel(T5Config(**read_config(config_dir, "text_encoder_3")))
        return Components(transformer, vae, encoders[0], build_clip_tokenizer(), read_config(config_dir, "scheduler"),
                          family=cls._family(transformer), text_encoder_2=encoders[1],
                          tokenizer_2=build_clip_tokenizer(pad_token="!"), text_encoder_3=t5,
                          tokenizer_3=tiny_t5_tokenizer())

    @classmethod
    def load_pretrained(cls, path_or_id, revision=None, model_index=None, without=()) -> Components:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        kw = {"revision": revision} if revision else {}
        transformer = SD3Transformer2DModel.from_pretrained(path_or_id, subfolder="transformer",
                                                           torch_dtype=torch.float32, **kw)
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", torch_dtype=torch.float32, **kw)
        te, te2 = (CLIPTextModelWithProjection.from_pretrained(path_or_id, subfolder=part, dtype=torch.float32, **kw)
                   for part in ("text_encoder", "text_encoder_2"))
        t5 = tokenizer_3 = None
        if "text_encoder_3" not in without and not saved_without(model_index or {}, "text_encoder_3"):
            t5 = T5EncoderModel.from_pretrained(path_or_id, subfolder="text_encoder_3", dtype=torch.float32, **kw)
            tokenizer_3 = load_t5_tokenizer(path_or_id, "tokenizer_3", revision)
        return Components(transformer, vae, te, load_tokenizer(path_or_id, "tokenizer", revision),
                          scheduler_config(path_or_id, revision), family=cls._family(transformer),
                          text_encoder_2=te2, tokenizer_2=load_tokenizer(path_or_id, "tokenizer_2", revision, pad_token="!"),
                          text_encoder_3=t5, tokenizer_3=tokenizer_3)

    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def _pipeline_parts(self, parts: Components, scheduler) -> dict:
        return dict(transformer=parts.unet, scheduler=scheduler, vae=parts.vae, text_encoder=parts.text_encoder,
                    tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                    text_encoder_3=parts.text_encoder_3, tokenizer_3=parts.tokenizer_3)

    def pipeline(self, parts, scheduler):
        return self.pipeline_class()(**self._pipeline_parts(parts, scheduler))

    def long_prompt_pipeline(self, parts, scheduler):
        from longalign_rl.families.pipelines import LongPromptSD3Pipeline

        return LongPromptSD3Pipeline(**self._pipeline_parts(parts, scheduler))

    def encoder(self, parts, prompts, *, resolution, device="cpu", dtype=torch.float32, t5=None):
        if t5 is not None:
            raise ValueError("t5.encoder: the T5 branch of the reference release is SD 1.x's; SD3 has its own T5")
        t5_encoder = parts.text_encoder_3.to(device, dtype) if parts.text_encoder_3 is not None else None
        return SD3Encoder(parts.tokenizer, parts.text_encoder.to(device, dtype), parts.tokenizer_2,
                          parts.text_encoder_2.to(device, dtype),
                          T5Tokens(parts.tokenizer_3, t5_encoder, self.t5_tokens(prompts), self.joint_dim),
                          joint_dim=self.joint_dim, max_tokens=prompts.max_tokens, pack_segments=prompts.pack_segments,
                          split=prompts.split, clean_text=prompts.clean_text, pooled=prompts.pooled)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the joint text tokens [B, tokens, joint], the pooled vector [B, pooled_dim])."""
        return cond[:, :-1], cond[:, -1, :self.pooled_dim]

    def predict(self, unet, latents, timesteps, cond):
        tokens, pooled = self.unpack(cond)
        return unet(hidden_states=latents, timestep=self.timestep_batch(timesteps, latents),
                    encoder_hidden_states=tokens, pooled_projections=pooled, return_dict=False)[0]

    def pipeline_inputs(self, cond, uncond):
        tokens, pooled = self.unpack(cond)
        negative, negative_pooled = self.unpack(uncond.expand_as(cond))
        return {"prompt_embeds": tokens, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
                "negative_pooled_prompt_embeds": negative_pooled}



class SD3Encoder(ClipSegments):
    """Segment encoding through SD3's two CLIPs and its T5 (the module docstring)."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, t5: T5Tokens, *, joint_dim: int,
                 max_tokens: int = 240, pack_segments: bool = False, split: str = "sentences",
                 clean_text: bool = False, pooled: str = "first"):
        super().__init__((tokenizer, tokenizer_2), (text_encoder, text_encoder_2), max_tokens=max_tokens,
                         pack_segments=pack_segments, split=split, clean_text=clean_text, pooled=pooled,
                         pooled_from=(0, 1))
        self.t5, self.joint_dim = t5, joint_dim
        pooled_dim = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
        if max(self.width, pooled_dim) > joint_dim:
            raise ValueError(f"SD3's joint width {joint_dim} cannot hold the CLIP tokens ({self.width}) or the "
                             f"pooled vector ({pooled_dim})")
        self._uncond = self([""])  # the pipeline's negative: the empty prompt encoded

    @torch.no_grad()
    def __call__(self, prompts) -> torch.Tensor:
        tokens, pooled = self.encode(prompts)
        t5 = self.t5(prompts).to(tokens)
        row = tokens.new_zeros(tokens.shape[0], 1, self.joint_dim)
        row[:, 0, :pooled.shape[-1]] = pooled
        return torch.cat([F.pad(tokens, (0, self.joint_dim - self.width)), t5, row], dim=1)

    def uncond(self, batch_size: int) -> torch.Tensor:
        return self._uncond.expand(batch_size, -1, -1)


__all__ = ["SD3", "SD3Encoder"]
