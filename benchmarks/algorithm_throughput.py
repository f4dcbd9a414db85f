"""The cost of a GRPO step against a reward-backpropagation step at the same batch (issue 11).

One process, one model, the framework's own functions, rounds alternating between the
algorithms so that machine noise hits them alike (medians over rounds; ratios per round):

    reward_backprop   Sampler.sample (deterministic DDIM, K steps recorded), then
                      reward_backprop_step (replay K guided UNet calls, decode, reward) +
                      backward + AdamW step
    grpo (f)          sample_trajectory (eta 1, a fraction f of the steps recorded), decode +
                      reward without gradient, GRPO advantages, then policy_step_loss +
                      backward for every recorded step + AdamW step

Plain torch (no Ray, no DeepSpeed), so it runs as it is on a GPU machine; the distributed
machinery adds the same per-step overhead to both (BENCHMARKS.md, trainer overhead).

    .venv/bin/python benchmarks/algorithm_throughput.py                       # the default run's shapes
    .venv/bin/python benchmarks/algorithm_throughput.py --model tiny --rounds 2 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from longalign_rl.algorithms.policy_gradient import grpo_advantages, policy_step_loss
from longalign_rl.algorithms.reward_backprop import reward_backprop_step
from longalign_rl.config import LoRAConfig, PromptConfig, SamplerConfig
from longalign_rl.lora import make_trainable
from longalign_rl.models import load_components
from longalign_rl.prompts import load_prompts
from longalign_rl.registry import get_reward
from longalign_rl.sampling.sampler import build_sampler, sample_trajectory
from longalign_rl.vae import decode


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapesworld-partial")
    parser.add_argument("--prompts", default="shapesworld.plugin:captions")
    parser.add_argument("--reward", default="shapes_clip", help="the same reward for both (differentiable)")
    parser.add_argument("--batch", type=int, default=8, help="samples per step (grpo: groups of 4)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--grad-steps", type=int, default=2, help="reward backprop: gradient steps")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0], help="grpo: trained fraction")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one core, as a worker has)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    parts = load_components(args.model)
    make_trainable(parts.unet, LoRAConfig(rank=8, alpha=8.0, dropout=0.0))
    sampler = build_sampler(SamplerConfig(num_steps=args.steps, num_grad_steps=args.grad_steps, guidance_scale=5.0,
                                          resolution=args.resolution, precision="fp32"),
                            parts, prompts=PromptConfig(max_tokens=args.max_tokens), device=device)
    unet, vae = sampler.unet, parts.vae.to(device)
    unet.eval()  # as the policy-gradient body runs it (no LoRA dropout here either way)
    reward = get_reward(args.reward)
    reward = reward.to(device) if hasattr(reward, "to") else reward
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-6)
    group = 4
    prompts = [p for p in load_prompts(args.prompts)[: args.batch // group] for _ in range(group)]
    assert len(prompts) == args.batch, "--batch must be a multiple of 4"

    def reward_backprop(seed):
        rollout, t_sample = timed(lambda: sampler.sample(prompts, seed))

        def update():
            loss, _ = reward_backprop_step(unet, vae, reward, rollout, 5.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        _, t_update = timed(update)
        return {"sample": t_sample, "score": 0.0, "update": t_update}

    def grpo(seed, fraction):
        recorded = max(1, round(args.steps * fraction))
        traj, t_sample = timed(lambda: sample_trajectory(sampler, prompts, seed, eta=1.0, num_recorded=recorded))

        def score():
            with torch.no_grad():
                total = reward(decode(vae, traj.final_latents.to(device)), prompts).total.float().cpu()
            return grpo_advantages(total, torch.arange(len(prompts)) // group)
        advantages, t_score = timed(score)

        def update():
            for k in range(len(traj.indices)):
                loss, _ = policy_step_loss(unet, traj, k, advantages, 5.0, 1e-4, 5.0)
                (loss / len(traj.indices)).backward()
            optimizer.step()
            optimizer.zero_grad()
        _, t_update = timed(update)
        return {"sample": t_sample, "score": t_score, "update": t_update}

    setups = {"reward_backprop": reward_backprop,
              **{f"grpo (fraction {f:g})": (lambda seed, f=f: grpo(seed, f)) for f in args.fractions}}
    for fn in setups.values():  # warm-up: first calls pay one-off costs
        fn(0)
    times = {name: [] for name in setups}
    for r in range(args.rounds):
        for name, fn in setups.items():
            times[name].append(fn(r + 1))

    results = {"settings": vars(args) | {"out": str(args.out) if args.out else None, "device": str(device)}, "setups": {}}
    base = times["reward_backprop"]
    header = f"{'setup':<24} {'sample s':>9} {'score s':>8} {'update s':>9} {'step s':>8} {'samples/s':>10} {'step / rb':>10}"
    print(header)
    for name, rounds in times.items():
        medians = {part: statistics.median(t[part] for t in rounds) for part in ("sample", "score", "update")}
        totals = [sum(t.values()) for t in rounds]
        ratio = statistics.median(sum(t.values()) / sum(b.values()) for t, b in zip(rounds, base))
        step = statistics.median(totals)
        results["setups"][name] = {**medians, "step": step, "samples_per_s": args.batch / step, "step_ratio": ratio}
        print(f"{name:<24} {medians['sample']:>9.3f} {medians['score']:>8.3f} {medians['update']:>9.3f} {step:>8.3f} "
              f"{args.batch / step:>10.2f} {ratio:>9.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
