"""Overhead of the distributed trainer step against a plain single-process torch step.

Both sides run the same reward-backprop update (trajectory replay, VAE decode, decomposed
tiny-CLIP reward, AdamW) on the same tiny batch, one thread per process:
- plain:       torch AdamW, `loss.backward()`, clip, `optimizer.step()`, in one process
               while the other worker waits;
- distributed: Ray Train TorchTrainer with 2 workers, each a DeepSpeed ZeRO-2 engine
               (`training/engine.py`'s `build_trainable` and `training/reward_backprop.py`'s
               `update`, the code a run uses),
               gradients reduced over gloo.
The two alternate step by step inside the same Ray workers, so machine noise hits both.
Printed: median step time of each and their ratio (target: at most 1.3x).

    .venv/bin/python benchmarks/trainer_overhead.py [--steps 30] [key.path=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from longalign_rl.algorithms.reward_backprop import reward_backprop_step
from longalign_rl.config import Config, load_config, to_dict
from longalign_rl.lora import make_trainable
from longalign_rl.models import load_components
from longalign_rl.registry import get_reward
from longalign_rl.sampling.sampler import build_sampler
from longalign_rl.training.engine import warmup

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def rollout_for(cfg: Config):
    """The batch both sides train on: one rollout of the tiny demo prompts."""
    from longalign_rl.prompts import load_prompts

    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed)
    make_trainable(parts.unet, cfg.lora)
    sampler = build_sampler(cfg.sampler, parts, prompts=cfg.prompts)
    return sampler.sample(load_prompts("demo")[: cfg.train.batch_size], seed=0)


def plain_step_fn(cfg: Config, rollout):
    """A plain single-process torch update: the same loss, torch AdamW, no DeepSpeed."""
    torch.manual_seed(cfg.train.seed)
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed)
    unet = parts.unet
    params = make_trainable(unet, cfg.lora)
    unet.train()
    # One process alone: its batch direction must not wait for the other worker.
    reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup(cfg.train.warmup_steps, cfg.train.warmup_from_zero))

    def step():
        loss, _ = reward_backprop_step(unet, parts.vae, reward, rollout, cfg.sampler.guidance_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _worker(config: dict) -> None:
    """Alternates, step by step, so all three see the same machine noise:
    a plain step on rank 0 alone (rank 1 waits); plain steps on both workers at once
    (no communication: what two busy processes cost each other on this machine); a
    distributed step on both."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from longalign_rl.config import from_dict
    from longalign_rl.training.engine import build_trainable
    from longalign_rl.training.reward_backprop import update
    from longalign_rl.scoring import build_reward

    torch.set_num_threads(1)
    cfg, rollout = from_dict(config["config"]), config["rollout"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    parts, engine, _ = build_trainable(cfg, device)
    vae, reward = parts.vae.to(device), build_reward(cfg, device)
    plain = plain_step_fn(cfg, rollout)
    times = {"plain": [], "plain_concurrent": [], "distributed": []}
    for i in range(config["warmup"] + config["steps"]):
        dist.barrier()
        if rank == 0:
            t = time.perf_counter()
            plain()
            times["plain"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        plain()
        times["plain_concurrent"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        update(engine, vae, reward, rollout, cfg.sampler.guidance_scale)
        times["distributed"].append(time.perf_counter() - t)
    if rank == 0:
        w = config["warmup"]
        Path(config["out"]).write_text(json.dumps({k: v[w:] for k, v in times.items()}))


def measure(cfg: Config, rollout, steps: int, warmup: int = 3) -> dict[str, list[float]]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "times.json"
        TorchTrainer(
            _worker,
            train_loop_config={"config": to_dict(cfg), "rollout": rollout, "steps": steps,
                               "warmup": warmup, "out": str(out)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="overhead", storage_path=d),
        ).fit()
        times = json.loads(out.read_text())
    ray.shutdown()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(TINY, ["train.zero_stage=2", *args.overrides])
    rollout = rollout_for(cfg)

    times = measure(cfg, rollout, args.steps)
    p, c, d = (statistics.median(times[k]) for k in ("plain", "plain_concurrent", "distributed"))
    paired = statistics.median(b / a for a, b in zip(times["plain"], times["distributed"]))
    print(f"batch {cfg.train.batch_size} per process, {cfg.sampler.num_grad_steps} gradient steps, "
          f"{cfg.sampler.resolution} px, LoRA rank {cfg.lora.rank}, {args.steps} timed steps, 1 thread per process")
    print(f"plain torch, 1 process alone:            median {p * 1e3:7.1f} ms/step")
    print(f"plain torch, 2 processes at once:        median {c * 1e3:7.1f} ms/step")
    print(f"Ray Train + DeepSpeed ZeRO-{cfg.train.zero_stage}, 2 workers: median {d * 1e3:7.1f} ms/step")
    print(f"overhead ratio (distributed / plain alone): {d / p:.2f}x of medians, {paired:.2f}x median of "
          f"step-by-step ratios   (target <= 1.3x)")
    print(f"of which two busy processes on this machine: {c / p:.2f}x; the distributed machinery "
          f"(DeepSpeed + gloo) on top: {d / c:.2f}x")


if __name__ == "__main__":
    main()
