"""What the flow-matching transformer families (SD3, FLUX) share: the denoiser is a
transformer in transformer/, the scheduler is FlowMatchEulerDiscreteScheduler (its
sampling steps in sampling/flow.py), the LoRA adapts the attention and feed-forward
projections, and its export is the pipeline's `transformer_lora_layers`. Pure torch/diffusers.
"""

from __future__ import annotations

import torch

from longalign_rl.families.base import Family

# diffusers' LoRA training scripts for SD3 and FLUX (train_dreambooth_lora_flux.py's default,
# train_dreambooth_lora_sd3.py's attention layers and the feed-forwards beside them): every
# joint block's image and text attention projections and feed-forwards, and the single
# blocks' attention projections. Flow-GRPO's SD3 runs adapt the eight attention ones only
# (set lora.target_modules to those to match it).
TRANSFORMER_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


def calculate_shift(image_tokens: int, config) -> float:
    """mu of the dynamic timestep shift (FLUX; SD3 with use_dynamic_shifting), linear in the
    image's token count between the scheduler config's base and max, as the pipelines compute it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * slope + base_shift - slope * base_len


class FlowFamily(Family):
    """A flow-matching transformer family. `patch`: latent pixels per image token side (SD3's
    patch size 2, FLUX's 2x2 packing), for the dynamic shift's token count."""

    denoiser = "transformer"
    lora_targets = TRANSFORMER_LORA_TARGETS
    patch = 2
    deterministic_kwargs = {}  # the Euler ODE takes no eta
    steps_name = "flow-matching Euler"
    noise_name = "SDE noise level"  # sampler.eta is Flow-GRPO's a (sampling/flow.py)
    # the T5 encoder's token limit when prompts.t5_max_tokens is 0 (the pipeline's default)
    t5_default_tokens = 256

    def scheduler(self, scheduler_config, *, timestep_spacing="trailing", final="step"):
        """The model's own FlowMatchEulerDiscreteScheduler (sampler.timestep_spacing and
        sampler.final are DDIM's: not read)."""
        return self.model_scheduler(scheduler_config)

    def model_scheduler(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(
            {k: v for k, v in scheduler_config.items() if not k.startswith("_")})

    def training_scheduler(self, scheduler_config):
        return self.model_scheduler(scheduler_config)  # fresh: its 1000 training sigmas (sampling/flow.py)

    def schedule_sigmas(self, num_steps: int):
        """The sigmas the pipeline passes to set_timesteps; None: the scheduler's own spacing."""
        return None

    def set_timesteps(self, scheduler, num_steps, latent_size):
        kw = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kw["mu"] = calculate_shift((latent_size // self.patch) ** 2, scheduler.config)
        sigmas = self.schedule_sigmas(num_steps)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, **kw)
        else:
            scheduler.set_timesteps(num_steps, **kw)

    def save_lora(self, directory, layers, metadata):
        pipeline = self.pipeline_class()
        pipeline.save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True,
                                   transformer_lora_adapter_metadata=metadata)

    def pipeline_class(self):
        raise NotImplementedError

    def check_config(self, cfg) -> list[str]:
        problems = []
        if cfg.t5.encoder:
            problems.append(f"t5.encoder: the reference release's T5 branch is SD 1.x's; {self.name} has its own T5 "
                            "(prompts.t5_max_tokens)")
        if cfg.sampler.final != "step":
            problems.append(f"sampler.final: {cfg.sampler.final!r} is DDIM's; a flow-matching model's last Euler step "
                            "lands on its clean latent (leave it at step)")
        return problems

    # the T5 tokenizer's folder in a diffusers model (SD3: tokenizer_3, FLUX: tokenizer_2)
    t5_tokenizer_folder = ""

    def t5_tokenizer(self, model, revision=None):
        import json
        from pathlib import Path

        from longalign_rl.families.base import saved_without
        from longalign_rl.families.text import load_t5_tokenizer, tiny_t5_tokenizer

        index_file = Path(model) / "model_index.json"
        if index_file.is_file() and saved_without(json.loads(index_file.read_text()), self.t5_tokenizer_folder):
            return None  # a diffusers folder saved without its T5
        if Path(model).is_dir() or "/" in model:  # a diffusers folder or a hub id
            return load_t5_tokenizer(model, self.t5_tokenizer_folder, revision)
        config_dir = Path(__file__).resolve().parent.parent / "model_configs" / model
        if (config_dir / "model_index.json").is_file():
            return tiny_t5_tokenizer()  # the built-ins carry the shipped test tokenizer
        return None  # a registered model's loader: its workers say what their T5 cuts

    def t5_tokens(self, prompts) -> int:
        """The T5 limit of a run: prompts.t5_max_tokens, or the family's default."""
        return prompts.t5_max_tokens or self.t5_default_tokens

    @staticmethod
    def timestep_batch(timesteps, latents: torch.Tensor) -> torch.Tensor:
        """The timestep(s) as one per sample (a sampler passes the step's one)."""
        t = torch.as_tensor(timesteps, device=latents.device)
        return t.expand(latents.shape[0]) if t.dim() == 0 else t


__all__ = ["FlowFamily", "TRANSFORMER_LORA_TARGETS", "calculate_shift"]
