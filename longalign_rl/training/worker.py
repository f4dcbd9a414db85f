"""What the Ray Train worker functions of both stages share: the trainable UNet in a
DeepSpeed engine with AdamW and the warm-up schedule, and all-worker statistics.

Stage 1 (training/supervised.py) and stage 2 (training/loop.py) differ in where their
batches come from and in their loss, not in how the UNet is trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from longalign_rl.config import Config
from longalign_rl.lora import make_trainable
from longalign_rl.training.deepspeed_config import deepspeed_config


def require_run_dir(run_dir: Path, rank: int) -> None:
    """The driver wrote config.yaml before starting the workers: a worker that cannot see it
    runs on a node without the shared storage."""
    if not (run_dir / "config.yaml").is_file():
        import ray

        raise RuntimeError(
            f"rank {rank} on node {ray.get_runtime_context().get_node_id()[:8]} cannot see the run directory "
            f"{run_dir}: on a multi-node cluster run.output_dir must be shared storage (see cluster/README.md)")


def prepare_unet(cfg: Config, unet, device: torch.device) -> list[torch.nn.Parameter]:
    """Move the UNet to the device, add what trains (LoRA or everything), training mode."""
    unet = unet.to(device)
    params = make_trainable(unet, cfg.lora)
    unet.train()
    if cfg.train.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    return params


def warmup(steps: int):
    """LambdaLR factor: linear warm-up to the full lr over `steps` optimiser steps, then constant."""
    return lambda s: min(1.0, (s + 1) / steps) if steps > 0 else 1.0


def make_engine(cfg: Config, unet, params: list[torch.nn.Parameter]):
    """AdamW and the warm-up schedule on `params`, in a DeepSpeed engine around `unet`
    (ZeRO stage, precision, clipping and accumulation from training/deepspeed_config.py)."""
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, eps=t.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup(t.warmup_steps))
    engine, _, _, schedule = deepspeed.initialize(
        model=unet, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg), dist_init_required=False,
    )
    return engine, schedule


def all_means(stats: dict[str, list[torch.Tensor]], device) -> dict[str, float]:
    """Mean of each statistic over every sample of every worker (NaN where there is none).

    Sums and counts are all-reduced, so workers with different numbers of values (say,
    of 7th sentences) are weighted by what they saw; every worker must pass the same keys.
    """
    names = sorted(stats)
    values = [torch.cat([v.reshape(-1) for v in stats[k]]).double() for k in names]
    sums = torch.stack([torch.stack([v.sum(), torch.tensor(float(v.numel()), dtype=torch.float64)]) for v in values])
    sums = sums.to(device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return {k: s / c if c > 0 else math.nan for k, (s, c) in zip(names, sums.tolist())}


def weights_spread(module) -> float:
    """Max - min over workers of a checksum of the trainable weights: 0 when they agree."""
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters() if p.requires_grad]).sum()
    both = torch.stack([checksum, -checksum]).to(next(module.parameters()).device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return float(both[0] + both[1])


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan
