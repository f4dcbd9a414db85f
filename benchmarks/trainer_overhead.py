"""Overhead of the distributed trainer step against a plain single-process torch step.

Both sides run the same reward-backprop update (trajectory replay, VAE decode, decomposed
tiny-CLIP reward, AdamW) on the same tiny batch, one thread per process:
- plain:       one process, torch AdamW, `loss.backward()`, clip, `optimizer.step()`;
- distributed: Ray Train TorchTrainer with 2 workers, each a DeepSpeed ZeRO-2 engine
               (`longalign_rl.training.loop.build_engine` / `update`, the code a run uses),
               gradients all-reduced over gloo.
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
from longalign_rl.sampling.actor import build_sampler
from longalign_rl.training.loop import _warmup

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def rollout_for(cfg: Config):
    """The batch both sides train on: one rollout of the tiny demo prompts."""
    from longalign_rl.prompts import load_prompts

    sampler = build_sampler(cfg, torch.device("cpu"))
    return sampler.sample(load_prompts("demo")[: cfg.train.batch_size], seed=0)


def timed_steps(step_fn, steps: int, warmup: int = 3) -> list[float]:
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        step_fn()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def plain_step_times(cfg: Config, rollout, steps: int) -> list[float]:
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    parts = load_components(cfg.model.pretrained, seed=cfg.model.tiny_seed)
    unet = parts.unet
    params = make_trainable(unet, cfg.lora)
    unet.train()
    reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, eps=cfg.train.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(cfg.train.warmup_steps))

    def step():
        loss, _ = reward_backprop_step(unet, parts.vae, reward, rollout, cfg.sampler.guidance_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, steps)


def _distributed_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from longalign_rl.config import from_dict
    from longalign_rl.training.loop import build_engine, update

    torch.set_num_threads(1)
    cfg = from_dict(config["config"])
    engine, vae, reward, _ = build_engine(cfg, ray.train.torch.get_device())
    times = timed_steps(lambda: update(engine, vae, reward, config["rollout"], cfg.sampler.guidance_scale),
                        config["steps"])
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(times))


def distributed_step_times(cfg: Config, rollout, steps: int) -> list[float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "times.json"
        TorchTrainer(
            _distributed_worker,
            train_loop_config={"config": to_dict(cfg), "rollout": rollout, "steps": steps, "out": str(out)},
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

    plain = plain_step_times(cfg, rollout, args.steps)
    dist = distributed_step_times(cfg, rollout, args.steps)
    p, d = statistics.median(plain), statistics.median(dist)
    print(f"batch {cfg.train.batch_size} per process, {cfg.sampler.num_grad_steps} gradient steps, "
          f"{cfg.sampler.resolution} px, LoRA rank {cfg.lora.rank}, {args.steps} timed steps, 1 thread per process")
    print(f"plain torch, 1 process:            median {p * 1e3:7.1f} ms/step")
    print(f"Ray Train + DeepSpeed ZeRO-{cfg.train.zero_stage}, 2 workers: median {d * 1e3:7.1f} ms/step")
    print(f"overhead ratio (distributed / plain): {d / p:.2f}x   (target <= 1.3x)")


if __name__ == "__main__":
    main()
