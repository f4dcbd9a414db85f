"""What a model family is: the parts a model of it has (`Components`) and what the framework
asks of it (`Family`). Pure torch: no ray, no deepspeed.

A family says how a prompt becomes conditioning (its text encoders, segment encoding of long
prompts, pooled embeddings, any extra conditioning), how the denoiser is called, which
diffusers classes build and load its parts, and which diffusers pipeline class saves and
loads it. Everything else (samplers, algorithms, trainers, rewards) works on what a family
hands it and never asks which family it is (docs/models.md).

The conditioning contract. A family's encoder turns B prompts into ONE tensor
`cond [B, tokens, width]` (and the empty prompt's `uncond [1, tokens, width]`): one tensor
crosses actors, records (types.Rollout, Trajectory), caption dropout and classifier-free
guidance unchanged, whatever the family. What its rows mean is the family's business: SD
1.x's are the cross-attention tokens; SDXL appends one row that carries the pooled text
embedding and the size conditioning (families/sdxl.py). Only the family's `predict` reads
them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Components:
    """The parts of a latent diffusion model, frozen or trainable as the caller makes them.
    `unet`: the denoiser that trains. `text_encoder_2`/`tokenizer_2`: a second CLIP (SDXL's
    OpenCLIP bigG), None for a family with one. `family`: the `Family` that reads them."""

    unet: torch.nn.Module  # the denoiser: a UNet, or a flow family's transformer (its folder: Family.denoiser)
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    # The T5 branch (encoding/t5.py T5Branch) when the config asks for one: `models.load_model`.
    t5: object = None
    # The Family that reads these parts; a loader that leaves it out gets SD 1.x's
    # (models.load_components), what every loader built before families existed.
    family: "Family" = None
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    # SD3's T5 (None: a model loaded without it, model.without_t5).
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object = None

    def modules(self) -> dict[str, torch.nn.Module]:
        """The parts with weights, by their diffusers folder name (unet or transformer, vae,
        text_encoder, ...)."""
        found = {}
        for name in self.family.parts:
            module = self.unet if name == self.family.denoiser else getattr(self, name)
            if module is not None:
                found[name] = module
        return found


class Family:
    """A model family. Subclasses are small frozen dataclasses whose fields are the model's
    constants the calls need (SDXL: the pooled width), so `Components.family` travels with
    the parts it describes. Registered in `families.FAMILIES` by `name`."""

    name: str = ""
    # model_index.json `_class_name`s of the diffusers pipelines whose folders are this family.
    pipeline_classes: tuple[str, ...] = ()
    # The folders of a diffusers model of this family that hold weights, in loading order.
    parts: tuple[str, ...] = ()
    # The built-in architectures of this family (random weights, models.py): test-sized, and
    # at real size (what shape, memory and FLOP checks build on the meta device).
    tiny: str = ""
    real_size: str = ""
    # The VAE's decoder overflows float16 (SDXL's): it stays float32 then (vae.placed).
    vae_fp16_overflows: bool = False
    # The denoiser's diffusers folder (and pipeline argument): "unet", or a flow family's "transformer".
    denoiser: str = "unet"
    # The layers a LoRA adapts when lora.target_modules is left at its default (SD 1.x's UNet
    # layers); None: that default. A transformer family names its own (as diffusers' LoRA
    # training scripts for it choose).
    lora_targets: tuple[str, ...] | None = None
    # What its sampling steps are called in the run header, and what sampler.eta is there.
    steps_name = "DDIM"
    noise_name = "eta"
    # What the pipeline's __call__ takes for its deterministic sampler (DDIM: eta 0).
    deterministic_kwargs = {"eta": 0.0}

    # -------------------------------------------------------------- building and loading
    @classmethod
    def build_random(cls, config_dir: Path, seed: int) -> Components:
        """Random-initialised parts from the JSON configs in `config_dir`, the same for the same seed."""
        raise NotImplementedError

    @classmethod
    def load_pretrained(cls, path_or_id: str, revision: str | None = None, model_index: dict | None = None
                        ) -> Components:
        """The parts of a local diffusers folder or hub id, in float32."""
        raise NotImplementedError

    def pipeline(self, parts: Components, scheduler):
        """The diffusers pipeline of this family over `parts` (for `save_pretrained`)."""
        raise NotImplementedError

    def pipeline_inputs(self, cond: torch.Tensor, uncond: torch.Tensor) -> dict[str, torch.Tensor]:
        """This family's encoder output as the keyword arguments its diffusers pipeline's
        `__call__` takes instead of prompts (prompt_embeds, negative_prompt_embeds, ...)."""
        raise NotImplementedError

    def to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents `[B, C, h, w]` as the pipeline's `latents` argument takes them (FLUX packs them)."""
        return latents

    def from_pipeline_latents(self, latents: torch.Tensor, latent_size: int) -> torch.Tensor:
        """The pipeline's output_type="latent" result as `[B, C, h, w]`."""
        return latents

    def long_prompt_pipeline(self, parts: Components, scheduler):
        """The same pipeline class with its prompts segment-encoded (families/pipelines.py):
        what `longalign_rl.pipeline.load` returns."""
        raise NotImplementedError

    # -------------------------------------------------------------- prompts and the denoiser
    def encoder(self, parts: Components, prompts, *, resolution: int, device="cpu", dtype=torch.float32, t5=None):
        """How this family's prompts become conditioning: an object with `__call__(prompts)
        -> cond [B, tokens, width]`, `uncond(batch) -> [batch, tokens, width]`,
        `segments(prompt)` and `max_tokens`. `prompts`: config.PromptConfig; `resolution`:
        the images' side in pixels (families with size conditioning write it into cond)."""
        raise NotImplementedError

    def predict(self, unet, latents: torch.Tensor, timesteps, cond: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction (noise or velocity, by the scheduler's prediction_type)
        for `latents` at `timesteps` under conditioning `cond` from this family's encoder.
        `unet` may be the module, a peft-wrapped one or a DeepSpeed engine around it."""
        raise NotImplementedError

    def guided(self, unet, latents: torch.Tensor, timestep, cond: torch.Tensor, uncond: torch.Tensor,
               guidance_scale: float) -> torch.Tensor:
        """The guided prediction at `latents`: classifier-free guidance, one batched denoiser
        call for both halves (the unconditional first, as the pipelines batch them)."""
        dtype = next(unet.parameters()).dtype
        x = torch.cat([latents, latents]).to(dtype)
        context = torch.cat([uncond.expand_as(cond), cond]).to(dtype)
        eps_uncond, eps_cond = self.predict(unet, x, timestep, context).to(latents.dtype).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    # -------------------------------------------------------------- the noise schedule
    def scheduler(self, scheduler_config: dict, *, timestep_spacing: str = "trailing", final: str = "step"):
        """The sampling scheduler on the model's own schedule: deterministic-capable DDIM
        (`ddim_scheduler`) for a diffusion family; a flow family's flow-matching scheduler."""
        return ddim_scheduler(scheduler_config, timestep_spacing=timestep_spacing, final=final)

    def model_scheduler(self, scheduler_config: dict):
        """The scheduler a saved model folder of this family carries (save_model_folder)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler_config)

    def set_timesteps(self, scheduler, num_steps: int, latent_size: int) -> None:
        """The sampling schedule of `num_steps`, as the family's pipeline sets it
        (`latent_size`: the latents' side, for a family whose shift depends on it)."""
        scheduler.set_timesteps(num_steps)

    def training_scheduler(self, scheduler_config: dict):
        """Stage 1's noise schedule (add_noise and the target; a flow family's training sigmas)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler_config)

    def save_lora(self, directory, layers: dict, metadata: dict) -> None:
        """Write a LoRA's peft state dict as this family's pipeline's `load_lora_weights` reads it."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=metadata)

    def with_image_sizes(self, cond: torch.Tensor, sizes: torch.Tensor, resolution: int) -> torch.Tensor:
        """Stage 1: `cond` for training images whose originals had `sizes [B, 4]` (height,
        width, crop top, crop left; data.training_crop), cropped to `resolution`. A family
        without size conditioning returns `cond` as it is."""
        return cond

    def check_config(self, cfg) -> list[str]:
        """Problems of a run config with this family (one line each, naming the key)."""
        return []

    def t5_tokenizer(self, model: str, revision: str | None = None):
        """The tokenizer of the model's own T5 encoder (SD3, FLUX), for the driver's count of
        the prompts it cuts; None for a family without one."""
        return None


def saved_without(model_index: dict, part: str) -> bool:
    """Whether a model folder's model_index.json says `part` was saved as None (diffusers
    writes [null, null], as for SD3 saved with text_encoder_3=None)."""
    return model_index.get(part, ["saved"])[0] is None


def read_config(config_dir: Path, part: str) -> dict:
    """One part's JSON config of a built-in architecture, without its `_comment` keys."""
    import json

    config = json.loads((Path(config_dir) / f"{part}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_tokenizer(path_or_id: str, subfolder: str, revision: str | None = None, pad_token: str | None = None):
    """A model's CLIP tokenizer; the offline one (encoding/tokenizer.py) for a local folder
    without `subfolder`/. `pad_token`: the offline tokenizer's (SDXL's second pads with "!")."""
    from transformers import CLIPTokenizer

    from longalign_rl.encoding.tokenizer import build_clip_tokenizer, check_clip_tokenizer

    local = Path(path_or_id)
    if local.is_dir() and not (local / subfolder).is_dir():
        return build_clip_tokenizer(**({"pad_token": pad_token} if pad_token else {}))
    tokenizer = CLIPTokenizer.from_pretrained(path_or_id, subfolder=subfolder, **({"revision": revision} if revision else {}))
    check_clip_tokenizer(tokenizer, f"the {subfolder} of {path_or_id}")
    return tokenizer


def ddim_scheduler(scheduler_config: dict, *, timestep_spacing: str, final: str = "step"):
    """A deterministic-capable DDIM scheduler on the model's own noise schedule. `final`
    (sampler.final): "pred_x0" sets set_alpha_to_one, so that the last step returns the
    predicted clean latent exactly (sqrt(1) x0_pred + sqrt(0) eps); "step" keeps the
    model's own setting."""
    from diffusers import DDIMScheduler

    if final not in ("step", "pred_x0"):
        raise ValueError(f"final must be step or pred_x0, got {final!r}")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(timestep_spacing=timestep_spacing, clip_sample=False, thresholding=False)
    if final == "pred_x0":
        config["set_alpha_to_one"] = True
    return DDIMScheduler.from_config(config)


def scheduler_config(path_or_id: str, revision: str | None = None) -> dict:
    """The model's noise schedule (scheduler/scheduler_config.json), whatever scheduler class it names."""
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.load_config(path_or_id, subfolder="scheduler", **({"revision": revision} if revision else {})))
