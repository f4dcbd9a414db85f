"""The trainable UNet in a DeepSpeed engine, with AdamW and the warm-up schedule: how every
algorithm's trainer worker trains, whatever its loss (training/worker.py builds it once).
"""

from __future__ import annotations

import math

import torch

from longalign_rl.config import Config
from longalign_rl.lora import attached_adapter, make_trainable
from longalign_rl.models import Components, load_components, load_model
from longalign_rl.sampling.ddim import set_dropout
from longalign_rl.training.deepspeed_config import deepspeed_config, updates_per_step


def trains_with_dropout(cfg: Config) -> bool:
    """Whether the trainer's dropout layers (the LoRA's, the T5 adapter's) drop. Stage 1: yes,
    as any supervised fine-tuning. Stage 2: exactly when the samplers drop
    (sampler.train_mode), since the trainer recomputes the samplers' UNet calls: unseeded
    masks, or none where the sampler drew some, would change what it recomputes."""
    return cfg.stage == 1 or cfg.sampler.train_mode


def prepare_unet(cfg: Config, unet, device: torch.device, adapter=None, family=None) -> list[torch.nn.Parameter]:
    """Move the UNet to the device, add what trains (LoRA or everything, and `adapter`, the
    T5 branch's TextAdapter in stage 1), training mode with the dropout of
    `trains_with_dropout`, set here once for the whole run: an activation-checkpointing
    recompute in the backward pass drops as its forward pass did only if nothing switches
    the layers in between (sampling/ddim.py set_dropout)."""
    unet = unet.to(device)
    params = make_trainable(unet, cfg.lora, adapter, family)
    unet.train()
    set_dropout(unet, trains_with_dropout(cfg))
    if cfg.train.activation_checkpointing:
        unet.enable_gradient_checkpointing()
    return params


def warmup(steps: int, from_zero: bool = False):
    """LambdaLR factor of the update after `s` updates: linear warm-up to the full lr over
    `steps` updates, then constant. `from_zero` (train.warmup_from_zero): s / steps, the
    reference's (diffusers' constant_with_warmup), whose first update runs at lr 0; else
    (s + 1) / steps, so that no update is wasted."""
    if steps <= 0:
        return lambda s: 1.0
    return (lambda s: min(1.0, s / steps)) if from_zero else (lambda s: min(1.0, (s + 1) / steps))


def make_schedule(cfg: Config, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up schedule of `cfg.train` on `optimizer`; it advances once per optimiser
    update, and the warm-up is counted in run steps."""
    t = cfg.train
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup(t.warmup_steps * updates_per_step(cfg),
                                                               t.warmup_from_zero))


def make_engine(cfg: Config, unet, params: list[torch.nn.Parameter]):
    """AdamW and the warm-up schedule on `params`, in a DeepSpeed engine around `unet`
    (ZeRO stage, precision, clipping and accumulation from training/deepspeed_config.py)."""
    import deepspeed  # here, not at the top: the driver imports the worker modules, and never trains

    t = cfg.train
    groups: list[dict] = [{"params": params}]
    adapter = attached_adapter(unet)
    if adapter is not None:  # stage 1's T5 adapter: its own learning rate (t5.adapter_lr)
        own = {id(p) for p in adapter.parameters()}
        groups = [{"params": [p for p in params if id(p) not in own]},
                  {"params": [p for p in params if id(p) in own], "lr": cfg.t5.adapter_lr or t.lr}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, eps=t.eps)
    schedule = make_schedule(cfg, optimizer)
    engine, _, _, schedule = deepspeed.initialize(
        model=unet, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg), dist_init_required=False,
    )
    return engine, schedule


def apply_optimizer_settings(cfg: Config, schedule) -> None:
    """After a checkpoint has loaded: the config's learning rates, betas, eps and weight decay
    over the ones it restored (DeepSpeed restores the optimiser's and the scheduler's state,
    so a resume's `train.lr=...` would otherwise be printed, saved, and ignored). The warm-up
    is the config's too: the scheduler's factor is a function of the step, not state."""
    t = cfg.train
    groups = schedule.optimizer.param_groups
    lrs = [t.lr, cfg.t5.adapter_lr or t.lr][: len(groups)]  # make_engine's groups, in order
    for group, lr in zip(groups, lrs):
        group.update(initial_lr=lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    schedule.base_lrs = list(lrs)
    for group, lr, factor in zip(groups, lrs, schedule.lr_lambdas):
        group["lr"] = lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in groups]


def build_trainable(cfg: Config, device: torch.device) -> tuple[Components, object, object]:
    """The model's parts (frozen), and its UNet with what trains in a DeepSpeed engine.

    Seeded by train.seed first, so every worker initialises the same LoRA. With a T5 branch
    (`parts.t5`), stage 1 trains its adapter too. Stage 2 loads no T5 branch: the samplers
    encode the prompts, so its trainers never run one."""
    torch.manual_seed(cfg.train.seed)
    if cfg.stage == 1:
        parts = load_model(cfg)
    else:
        parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision,
                                family=cfg.model.family, without_t5=cfg.model.without_t5)
    adapter = parts.t5.adapter if parts.t5 is not None else None
    engine, schedule = make_engine(cfg, parts.unet, prepare_unet(cfg, parts.unet, device, adapter, parts.family))
    return parts, engine, schedule


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan
