"""Sampling throughput: one plain process against 1 and 2 Ray sampler actors, and the cost
of a weight sync.

All three use the same `Sampler` (segment encoding, DDIM with guidance, recording) on the
tiny config, one thread per process. Rounds alternate between the three set-ups so that
machine noise hits them alike; medians over rounds are printed, with the ratios:
- actor overhead = plain images/s / (1 actor) images/s (target: close to 1);
- scaling = (2 actors) / (1 actor) images/s (2 cores: at most 2).
Then one `SamplerGroup.publish` to both actors (what the trainer's rank 0 does) is timed against one sampling call.

    .venv/bin/python benchmarks/sampling_throughput.py [--rounds 5] [--batch 4] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from longalign_rl.config import load_config
from longalign_rl.lora import make_trainable, trainable_state_dict
from longalign_rl.models import load_components
from longalign_rl.prompts import load_prompts
from longalign_rl.sampling.sampler import build_sampler

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="prompts per sampling call")
    parser.add_argument("--calls", type=int, default=4, help="sampling calls per actor per round")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(TINY, ["sampler.num_actors=2", "sampler.num_cpus=1", *args.overrides])
    prompts = load_prompts("demo")[: args.batch]

    import ray

    from longalign_rl.sampling.group import SamplerGroup

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    torch.set_num_threads(1)
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed)
    make_trainable(parts.unet, cfg.lora)  # the actors' structure: the same UNet with its LoRA
    plain = build_sampler(cfg.sampler, parts, prompts=cfg.prompts)
    group = SamplerGroup(cfg)
    actors = group.actors
    ray.get([a.get_version.remote() for a in actors])  # wait until built
    for a in actors:  # warm-up: first calls pay one-off costs
        ray.get(a.sample.remote(prompts, 0))
    plain.sample(prompts, 0)

    rates = {"plain": [], "1 actor": [], "2 actors": []}
    n = args.calls * args.batch
    for r in range(args.rounds):
        t = time.perf_counter()
        for i in range(args.calls):
            plain.sample(prompts, seed=i)
        rates["plain"].append(n / (time.perf_counter() - t))

        t = time.perf_counter()
        ray.get([actors[0].sample.remote(prompts, i) for i in range(args.calls)])
        rates["1 actor"].append(n / (time.perf_counter() - t))

        t = time.perf_counter()
        ray.get([a.sample.remote(prompts, i) for a in actors for i in range(args.calls)])
        rates["2 actors"].append(2 * n / (time.perf_counter() - t))

    # A weight sync as the trainer's rank 0 does it: put once, every actor loads.
    weights = trainable_state_dict(plain.unet, cfg.lora)
    sync, sample = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        group.publish(weights, r)
        sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        ray.get(actors[0].sample.remote(prompts, r))
        sample.append(time.perf_counter() - t)
    group.shutdown()
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in rates.items()}
    size = sum(v.numel() * v.element_size() for v in weights.values())
    print(f"tiny config: {cfg.sampler.num_steps} DDIM steps with guidance, {cfg.sampler.resolution} px, "
          f"{args.batch} prompts per call, {args.rounds} rounds x {args.calls} calls, 1 thread per process")
    for k, v in med.items():
        print(f"{k:<10} {v:7.2f} images/s (median)")
    print(f"actor overhead (plain / 1 actor): {med['plain'] / med['1 actor']:.2f}x")
    print(f"scaling (2 actors / 1 actor):     {med['2 actors'] / med['1 actor']:.2f}x  (2 cores)")
    print(f"weight sync to 2 actors ({size / 1e6:.2f} MB of LoRA weights): median {statistics.median(sync) * 1e3:.1f} ms, "
          f"{statistics.median(sync) / statistics.median(sample):.2f}x of one sampling call "
          f"({statistics.median(sample) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
