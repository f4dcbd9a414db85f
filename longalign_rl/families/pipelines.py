"""Each family's diffusers pipeline with long prompts: diffusers' own pipeline class whose
`encode_prompt` hook segment-encodes through the family's encoder, so `pipe(prompt)` and
`pipe.generate(...)` take prompts of any length. `longalign_rl.pipeline.load` builds them
(Family.long_prompt_pipeline). Imported only there: diffusers' pipelines are a slow import.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from longalign_rl.noise import initial_noise


def _as_list(text, batch: int) -> list[str]:
    return [text] * batch if isinstance(text, str) else list(text)


class LongPrompts:
    """What `load` sets on a family's pipeline (`segment_encoder`: the family's encoder;
    `family`: the model's Family, whose `pipeline_inputs` turn the encoder's output into this
    pipeline's arguments; `longalign`: the run's defaults and where the weights came from) and
    `generate`."""

    segment_encoder: object
    family: object
    longalign: dict

    def encoded(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_classifier_free_guidance):
        """The packed conditioning (families/base.py) of the prompts and of the negatives (the
        family's empty prompt unless negatives are given), or the embeddings passed in."""
        cond = self.segment_encoder(_as_list(prompt, 1)) if prompt_embeds is None else prompt_embeds
        negative = negative_prompt_embeds
        if do_classifier_free_guidance and negative is None:
            negative = (self.segment_encoder.uncond(cond.shape[0]) if negative_prompt is None
                        else self.segment_encoder(_as_list(negative_prompt, cond.shape[0])))
        return cond, negative

    def pooled_embeds(self, prompt, negative_prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      dtype):
        """What SDXL's and SD3's encode_prompt return, from the family's encoder: (prompt_embeds,
        negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds), the
        negatives None without guidance."""
        cond, negative = self.encoded(prompt, negative_prompt, None, None, do_classifier_free_guidance)
        if negative is None:  # no guidance: the family's inputs want one; the zeros are dropped below
            negative = torch.zeros_like(cond)
        embeds = {k: v.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
                  for k, v in self.family.pipeline_inputs(cond, negative).items()}
        if not do_classifier_free_guidance:
            return embeds["prompt_embeds"], None, embeds["pooled_prompt_embeds"], None
        return (embeds["prompt_embeds"], embeds["negative_prompt_embeds"], embeds["pooled_prompt_embeds"],
                embeds["negative_pooled_prompt_embeds"])

    @torch.no_grad()
    def generate(self, prompts: str | list[str], seeds: int | list[int] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 resolution: int | None = None, negative_prompt: str | list[str] | None = None,
                 batch_size: int = 8, output_type: str = "pil"):
        """Prompt i from its own seed (seeds[i]; by default 0, 1, 2 ...) with the pipeline's
        scheduler (deterministic DDIM unless the model folder names another; a flow family's
        Euler ODE);
        the run's steps, guidance and resolution unless given. Returns PIL images
        (output_type "pil"), or a tensor [B, 3, H, W] in [0, 1] ("pt"), or the final latents
        ("latent")."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else [seeds] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        d = self.longalign
        resolution = resolution or d["resolution"]
        latent = resolution // self.vae_scale_factor
        shape = (self.vae.config.latent_channels, latent, latent)
        denoiser = getattr(self, self.family.denoiser)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            noise = initial_noise(seeds[i:i + batch_size], shape).to(self.device, denoiser.dtype)
            negatives = negative_prompt[i:i + batch_size] if isinstance(negative_prompt, list) else negative_prompt
            result = self(prompt=chunk, latents=self.family.to_pipeline_latents(noise),  # DDIM: scaled by
                          negative_prompt=negatives, height=resolution, width=resolution,  # init_noise_sigma there
                          num_inference_steps=num_inference_steps or d["num_steps"],
                          guidance_scale=d["guidance_scale"] if guidance_scale is None else guidance_scale,
                          output_type=output_type, **self.family.deterministic_kwargs)
            images = result.images
            out.append(self.family.from_pipeline_latents(images, latent) if output_type == "latent" else images)
        if output_type == "pil":
            return [image for images in out for image in images]
        return torch.cat([torch.as_tensor(images) for images in out])


class LongPromptPipeline(LongPrompts, StableDiffusionPipeline):
    """SD 1.x: a StableDiffusionPipeline whose prompts (and negative prompts) are segment-encoded."""

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None,
                      prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """diffusers' hook for the text encoder, segment by segment (lora_scale and clip_skip
        do not apply: the text encoder is frozen and its last layer is what the UNet saw)."""
        cond, negative = self.encoded(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                      do_classifier_free_guidance)
        dtype = self.text_encoder.dtype
        cond = cond.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        if negative is not None:
            negative = negative.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        return cond, negative


class LongPromptXLPipeline(LongPrompts, StableDiffusionXLPipeline):
    """SDXL: a StableDiffusionXLPipeline whose prompts (and negative prompts) are
    segment-encoded through both encoders; the pooled embedding is the run's
    `prompts.pooled` choice. The size conditioning is the pipeline's own (from height and
    width, as the run's samplers wrote it)."""

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=True, negative_prompt=None, negative_prompt_2=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, lora_scale=None, clip_skip=None):
        """diffusers' hook for both text encoders, segment by segment. `prompt_2` is not read:
        both encoders see the same segments (families/sdxl.py)."""
        if prompt_embeds is not None:  # the caller's own embeddings, as diffusers takes them
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt, do_classifier_free_guidance,
                                         negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
                                         pooled_prompt_embeds, negative_pooled_prompt_embeds, lora_scale, clip_skip)
        return self.pooled_embeds(prompt, negative_prompt, device, num_images_per_prompt,
                                  do_classifier_free_guidance, self.text_encoder_2.dtype)


class LongPromptSD3Pipeline(LongPrompts, StableDiffusion3Pipeline):
    """SD3: a StableDiffusion3Pipeline whose prompts (and negative prompts) are segment-encoded
    through both CLIPs, with T5 at the run's limit (families/sd3.py). `prompt_2`, `prompt_3`
    and `max_sequence_length` are not read: every encoder sees the same prompt, and the T5
    limit is the run's (prompts.t5_max_tokens)."""

    def encode_prompt(self, prompt, prompt_2=None, prompt_3=None, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=True, negative_prompt=None, negative_prompt_2=None,
                      negative_prompt_3=None, prompt_embeds=None, negative_prompt_embeds=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, clip_skip=None,
                      max_sequence_length=256, lora_scale=None):
        if prompt_embeds is not None:  # the caller's own embeddings, as diffusers takes them
            return super().encode_prompt(prompt, prompt_2, prompt_3, device, num_images_per_prompt,
                                         do_classifier_free_guidance, negative_prompt, negative_prompt_2,
                                         negative_prompt_3, prompt_embeds, negative_prompt_embeds,
                                         pooled_prompt_embeds, negative_pooled_prompt_embeds, clip_skip,
                                         max_sequence_length, lora_scale)
        return self.pooled_embeds(prompt, negative_prompt, device, num_images_per_prompt,
                                  do_classifier_free_guidance, self.text_encoder.dtype)


class LongPromptFluxPipeline(LongPrompts, FluxPipeline):
    """FLUX.1: a FluxPipeline whose pooled CLIP vector comes from the prompt's sentence
    segments and whose T5 tokens stop at the run's limit (families/flux.py). Guidance is
    FLUX-dev's embedding; `negative_prompt` is read only with true CFG (true_cfg_scale > 1),
    as diffusers reads it."""

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length=512, lora_scale=None):
        if prompt_embeds is not None:
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt, prompt_embeds,
                                         pooled_prompt_embeds, max_sequence_length, lora_scale)
        cond = self.segment_encoder(_as_list(prompt, 1))
        dtype = self.text_encoder.dtype
        embeds = {k: v.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
                  for k, v in self.family.pipeline_inputs(cond, cond).items()}
        text_ids = torch.zeros(embeds["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        return embeds["prompt_embeds"], embeds["pooled_prompt_embeds"], text_ids
