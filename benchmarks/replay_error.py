"""What `replay_error` measures, cause by cause (issue 13).

`replay_error` is the largest |replayed - recorded| final latent of a step's rollouts: the
trainer's replay of the gradient steps (algorithms/reward_backprop.py) against what its
sampler recorded. Before issue 13 three causes mixed in it; each is measured here apart,
with the product's own sampler, replay and update (build_sampler, Sampler.sample,
replay_final_latents, reward_backprop_step), on one rollout of long demo prompts:

    floor    the same weights, the same precision, dropout as sampled (the seeded masks
             of sampler.train_mode, or none): what is left when nothing differs
    dropout  the LoRA's dropout (0.1) drawn afresh in the trainer, as it was before the
             masks were seeded: the trainer's replay with other masks than the sampler's
             (those of another seed)
    bf16     sampler and trainer in bf16 (weights and activations), the same weights
    lag      one optimiser step (AdamW at the reference's lr 3e-5) between sampling and
             replay: policy lag, what the metric is named for

    .venv/bin/python benchmarks/replay_error.py [--model sd15-random] [--resolution 128] [--steps 10]

A LoRA whose up-projection is random (std 0.01, as after some training) makes the LoRA and
its dropout matter; everything else is the reference's (rank 32, dropout 0.1, guidance 7.5).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch

from longalign_rl.algorithms.reward_backprop import replay_final_latents, reward_backprop_step
from longalign_rl.config import LoRAConfig, SamplerConfig
from longalign_rl.lora import make_trainable
from longalign_rl.models import load_components
from longalign_rl.prompts import load_prompts
from longalign_rl.registry import get_reward
from longalign_rl.sampling.ddim import set_dropout
from longalign_rl.sampling.sampler import build_sampler


def max_error(unet, rollout, guidance: float, train_mode: bool) -> float:
    with torch.no_grad():
        replayed = replay_final_latents(unet, rollout, guidance, train_mode)
    return float((replayed.float() - rollout.final_latents).abs().max())


def measure(model: str, resolution: int, steps: int, batch: int, lr: float) -> dict:
    parts = load_components(model)
    torch.manual_seed(0)
    lora = LoRAConfig(rank=32, alpha=32.0, dropout=0.1)
    make_trainable(parts.unet, lora)
    with torch.no_grad():
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    prompts = load_prompts("demo")[:batch]
    guidance = 7.5
    result = {"model": model, "resolution": resolution, "num_steps": steps, "batch": batch}

    def sampler_for(precision: str, train_mode: bool):
        cfg = SamplerConfig(num_steps=steps, num_grad_steps=2, guidance_scale=guidance, resolution=resolution,
                            precision=precision, train_mode=train_mode)
        return build_sampler(cfg, copy.deepcopy(parts))

    def trainer(sampler, train_mode: bool):
        """The sampler's UNet as a trainer runs it (training/engine.py prepare_unet)."""
        set_dropout(sampler.unet.train(), train_mode)
        return sampler.unet

    start = time.perf_counter()
    seeded = sampler_for("fp32", train_mode=True)
    rollout = seeded.sample(prompts, seed=0)
    unet = trainer(seeded, train_mode=True)
    result["floor_fp32_train_mode"] = max_error(unet, rollout, guidance, train_mode=True)
    other_masks = dataclasses.replace(rollout, seeds=[s + 1 for s in rollout.seeds])  # the masks of another draw
    result["dropout_unseeded"] = max_error(unet, other_masks, guidance, train_mode=True)

    plain = sampler_for("fp32", train_mode=False)
    rollout_eval = plain.sample(prompts, seed=0)
    result["floor_fp32_eval"] = max_error(trainer(plain, False), rollout_eval, guidance, train_mode=False)

    half = sampler_for("bf16", train_mode=False)
    rollout_bf16 = half.sample(prompts, seed=0)
    result["floor_bf16"] = max_error(trainer(half, False), rollout_bf16, guidance, train_mode=False)

    # One AdamW step on the reward-backprop loss of this rollout, then replay it again.
    reward = get_reward("tiny_clip")
    unet = trainer(plain, False)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr, weight_decay=1e-2)
    loss, _ = reward_backprop_step(unet, parts.vae, reward, rollout_eval, guidance)
    loss.backward()
    optimizer.step()
    result["lag_one_step"] = max_error(unet, rollout_eval, guidance, train_mode=False)
    result["lr"] = lr
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-random", help="a model.pretrained (default: SD v1.5's architecture)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (2 of them replayed)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-5)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = measure(args.model, args.resolution, args.steps, args.batch, args.lr)
    lag = result["lag_one_step"]
    print(json.dumps(result, indent=1))
    print("max |replayed - recorded| final latent, and as a fraction of one step of policy lag:")
    for key in ("floor_fp32_train_mode", "floor_fp32_eval", "floor_bf16", "dropout_unseeded", "lag_one_step"):
        print(f"  {key:<24} {result[key]:.3g}   {result[key] / lag if lag else float('nan'):.3g}x lag")
    return result


if __name__ == "__main__":
    main()
