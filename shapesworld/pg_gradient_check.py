"""Is the GRPO policy gradient an estimate of the right thing, and how noisy is it?

For a differentiable reward, the stochastic sampler's objective E[R(x_final)] has a second,
low-noise estimate of its gradient: the pathwise (reparameterised) one, backpropagated
through every step of the chain with the noise held fixed. This script computes, on
`shapesworld-partial` with a LoRA, two independent GRPO estimates (the framework's
`sample_trajectory`, `grpo_advantages` and `policy_step_loss`, every step trained) and two
pathwise estimates, and prints their cosines:

    cos(pg_a, pg_b)       how much two policy-gradient estimates agree (noise)
    cos(path_a, path_b)   the same for the pathwise estimates
    cos(pg, path)         whether the policy gradient points where the objective rises

    python -m shapesworld.pg_gradient_check --eta 0.5 --reward shapes_clip --batches 8    # ~3 min
    python -m shapesworld.pg_gradient_check --quick                                       # tests
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from longalign_rl.algorithms.policy_gradient import grpo_advantages, policy_step_loss
from longalign_rl.config import LoRAConfig, PromptConfig, SamplerConfig
from longalign_rl.lora import make_trainable
from longalign_rl.models import load_components
from longalign_rl.prompts import load_prompts
from longalign_rl.registry import get_reward
from longalign_rl.sampling.ddim import guided_eps
from longalign_rl.sampling.sampler import build_sampler, sample_trajectory
from longalign_rl.sampling.stochastic import stochastic_coefficients
from longalign_rl.vae import decode


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.pg_gradient_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eta", type=float, default=0.5)
    parser.add_argument("--reward", default="shapes_clip", help="a differentiable reward")
    parser.add_argument("--batches", type=int, default=8, help="per estimate; each 2 prompts x group 8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 batch of 2 prompts x 2, 3 steps (tests)")
    args = parser.parse_args(argv)
    group, steps, batches = (2, 3, 1) if args.quick else (8, args.steps, args.batches)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    parts = load_components("shapesworld-partial")
    make_trainable(parts.unet, LoRAConfig(rank=8, alpha=8.0, dropout=0.0))
    with torch.no_grad():  # a LoRA slightly away from zero, so that every LoRA weight has a gradient
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    sampler = build_sampler(SamplerConfig(num_steps=steps, num_grad_steps=1, guidance_scale=5.0, resolution=32,
                                          precision="fp32"), parts, prompts=PromptConfig(max_tokens=120))
    unet, vae = sampler.unet.eval(), parts.vae
    reward = get_reward(args.reward)
    if not reward.differentiable:
        raise SystemExit(f"--reward {args.reward}: the pathwise gradient needs a differentiable reward")
    captions = load_prompts("shapesworld.plugin:captions")
    params = [p for p in unet.parameters() if p.requires_grad]

    def take_grad() -> torch.Tensor:
        g = torch.cat([p.grad.reshape(-1) for p in params])
        for p in params:
            p.grad = None
        return g

    def prompts_of(i: int) -> list[str]:
        return [p for p in captions[2 * i: 2 * i + 2] for _ in range(group)]

    def policy_gradient(first: int) -> torch.Tensor:
        for i in range(first, first + batches):
            prompts = prompts_of(i)
            traj = sample_trajectory(sampler, prompts, 1000 + i, args.eta)
            with torch.no_grad():
                rewards = reward(decode(vae, traj.final_latents), prompts).total.float()
            advantages = grpo_advantages(rewards, torch.arange(len(prompts)) // group)
            for k in range(len(traj.indices)):
                policy_step_loss(unet, traj, k, advantages, 5.0, 1e-4, 5.0)[0].backward()
        return -take_grad()  # the loss's descent = the reward's ascent

    def pathwise(first: int) -> torch.Tensor:
        a, b, sigma = (c.float() for c in stochastic_coefficients(sampler.scheduler, args.eta))
        for i in range(first, first + batches):
            prompts = prompts_of(i)
            generator = torch.Generator().manual_seed(5000 + i)
            cond, uncond = sampler.encoder(prompts).float(), sampler.encoder.uncond(1).float()
            x = torch.randn(len(prompts), unet.config.in_channels, sampler.latent_size, sampler.latent_size,
                            generator=generator)
            for j, t in enumerate(sampler.scheduler.timesteps):
                noise = torch.randn(x.shape, generator=generator)
                x = a[j] * x + b[j] * guided_eps(unet, x, t, cond, uncond, 5.0) + sigma[j] * noise
            reward(decode(vae, x), prompts).total.mean().backward()
        return take_grad()

    pg_a, pg_b = policy_gradient(0), policy_gradient(batches)
    path_a, path_b = pathwise(100), pathwise(100 + batches)
    result = {"eta": args.eta, "reward": args.reward, "samples_per_estimate": batches * 2 * group,
              "cos(pg_a, pg_b)": cosine(pg_a, pg_b), "cos(path_a, path_b)": cosine(path_a, path_b),
              "cos(pg_a, path_a)": cosine(pg_a, path_a), "cos(pg_b, path_b)": cosine(pg_b, path_b),
              "cos(pg_a + pg_b, path_a + path_b)": cosine(pg_a + pg_b, path_a + path_b)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
