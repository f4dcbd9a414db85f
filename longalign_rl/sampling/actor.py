"""SamplerActor: a thin Ray shell around `Sampler` that also holds the policy's version.

Each actor builds its own frozen copy of the model parts, adds the same trainable
structure as the trainer (LoRA or full UNet), and loads the trainer's weights when rank 0
publishes them. Actors restart when they die (max_restarts); a restarted actor is back at
version 0, which the trainer sees in the rollouts it gets and repairs.
"""

from __future__ import annotations

import time

import ray
import torch

from longalign_rl.config import Config, from_dict, to_dict
from longalign_rl.encoding import SegmentEncoder
from longalign_rl.lora import load_trainable_state_dict, make_trainable
from longalign_rl.models import DTYPES, load_components, make_scheduler, vae_scale_factor
from longalign_rl.sampling.sampler import Sampler
from longalign_rl.types import Rollout


def build_sampler(cfg: Config, device: torch.device) -> Sampler:
    """The sampler a worker of this config uses, on `device` (also used without Ray)."""
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision)
    make_trainable(parts.unet, cfg.lora)
    dtype = DTYPES[cfg.sampler.precision]
    unet = parts.unet.to(device, dtype).eval().requires_grad_(False)
    text_encoder = parts.text_encoder.to(device, dtype)
    encoder = SegmentEncoder(parts.tokenizer, text_encoder, max_tokens=cfg.prompts.max_tokens,
                             pack_segments=cfg.prompts.pack_segments)
    scheduler = make_scheduler(parts.scheduler_config, timestep_spacing=cfg.sampler.timestep_spacing)
    return Sampler(unet, encoder, scheduler, num_steps=cfg.sampler.num_steps,
                   guidance_scale=cfg.sampler.guidance_scale, resolution=cfg.sampler.resolution,
                   num_grad_steps=cfg.sampler.num_grad_steps, vae_scale_factor=vae_scale_factor(parts.vae))


@ray.remote
class SamplerActor:
    def __init__(self, config: dict):
        self.cfg = from_dict(config)
        torch.set_num_threads(max(1, int(self.cfg.sampler.num_cpus)))
        device = torch.device("cuda" if self.cfg.sampler.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.sampler = build_sampler(self.cfg, device)
        self.version = 0  # optimiser steps behind the weights held now

    def sample(self, prompts: list[str], seed: int) -> Rollout:
        return self.sampler.sample(prompts, seed, policy_version=self.version)

    def set_weights(self, state: dict, version: int) -> float:
        """Load the trainer's trainable weights (an object-store ref, resolved by Ray).

        Returns the seconds spent loading, so the trainer can log the cost of a sync.
        """
        start = time.perf_counter()
        unet = self.sampler.unet
        dtype = next(unet.parameters()).dtype
        load_trainable_state_dict(unet, {k: v.to(dtype) for k, v in state.items()}, self.cfg.lora)
        # Always taken, even when older: a trainer restarted from a checkpoint goes back.
        self.version = version
        return time.perf_counter() - start

    def get_version(self) -> int:
        return self.version


def start_sampler_actors(cfg: Config) -> list:
    """Create cfg.sampler.num_actors actors with the resources the config asks for."""
    options = dict(num_cpus=cfg.sampler.num_cpus, num_gpus=cfg.sampler.num_gpus,
                   max_restarts=-1, max_task_retries=0)
    return [SamplerActor.options(**options).remote(to_dict(cfg)) for _ in range(cfg.sampler.num_actors)]
