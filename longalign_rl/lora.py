"""What trains: a peft LoRA on the UNet (the reference) or the whole UNet, and in stage 1 the
T5 branch's TextAdapter beside it. Pure torch/peft.

The same functions run in the trainer (which publishes its trainable weights) and in the
sampler actors (which load them), so both sides agree on names by construction.

The TextAdapter trains as a submodule of the UNet (`unet.text_adapter`): one DeepSpeed
engine, one optimiser (its own learning rate, training/engine.py), one checkpoint. Its
weights travel with the LoRA's under the prefix "text_adapter.", and leave the UNet again
when it is exported or merged (`detach_adapter`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from longalign_rl.config import LoRAConfig

ADAPTER = "text_adapter"  # the attribute (and weight-name prefix) of a trained T5 adapter


def lora_targets(cfg: LoRAConfig, family=None) -> list[str]:
    """The layers the LoRA adapts: lora.target_modules, or, left at its default (SD 1.x's UNet
    layers), the family's own (Family.lora_targets: a transformer's attention and
    feed-forward projections)."""
    if family is not None and family.lora_targets is not None and tuple(cfg.target_modules) == DEFAULT_TARGETS:
        return list(family.lora_targets)
    return list(cfg.target_modules)


DEFAULT_TARGETS = LoRAConfig().target_modules


def make_trainable(unet, cfg: LoRAConfig, adapter: torch.nn.Module | None = None, family=None
                   ) -> list[torch.nn.Parameter]:
    """Add the LoRA adapter (or unfreeze the UNet) and return the trainable parameters.
    `adapter`: the T5 branch's TextAdapter, trained too (stage 1); attached after the LoRA,
    so that the LoRA's target names never match its layers. `family`: the model's
    (Components.family), whose LoRA targets a default lora.target_modules means."""
    if cfg.enabled:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=lora_targets(cfg, family),
                init_lora_weights="gaussian",  # down-projection random, up-projection zero
            )
        )
    else:
        unet.requires_grad_(True)
    if adapter is not None:
        setattr(unet, ADAPTER, adapter.to(next(unet.parameters()).device).requires_grad_(True))
    return [p for p in unet.parameters() if p.requires_grad]


def attached_adapter(unet) -> torch.nn.Module | None:
    """The trained T5 adapter on this UNet, if any."""
    return getattr(unet, ADAPTER, None)


def remove_adapter(unet) -> torch.nn.Module | None:
    """Take the T5 adapter off the UNet (after its weights are loaded) and return it."""
    adapter = attached_adapter(unet)
    if adapter is not None:
        delattr(unet, ADAPTER)
    return adapter


@contextlib.contextmanager
def detach_adapter(unet):
    """Inside, the UNet without its T5 adapter (what diffusers saves and merges); yields the
    adapter (or None) and puts it back after."""
    adapter = remove_adapter(unet)
    try:
        yield adapter
    finally:
        if adapter is not None:
            setattr(unet, ADAPTER, adapter)


def trainable_state_dict(unet, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The weights a sampler needs to match the trainer: CPU copies."""
    if cfg.enabled:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(unet)
        adapter = attached_adapter(unet)
        if adapter is not None:
            state.update({f"{ADAPTER}.{k}": v for k, v in adapter.state_dict().items()})
    else:
        state = unet.state_dict()  # the attached adapter's weights are among them
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_trainable_state_dict(unet, state: dict[str, torch.Tensor], cfg: LoRAConfig) -> None:
    adapter_state = {k[len(ADAPTER) + 1:]: v for k, v in state.items() if k.startswith(ADAPTER + ".")}
    if adapter_state and attached_adapter(unet) is None:
        raise ValueError("these weights hold a trained T5 adapter (text_adapter.*), but this UNet has none attached: "
                         "the run had a t5 section")
    if cfg.enabled:
        from peft.utils import set_peft_model_state_dict

        state = {k: v for k, v in state.items() if not k.startswith(ADAPTER + ".")}
        if adapter_state:
            attached_adapter(unet).load_state_dict(adapter_state)
        result = set_peft_model_state_dict(unet, state)
        if result.unexpected_keys:
            raise ValueError(f"LoRA weights do not fit this UNet: unexpected {result.unexpected_keys[:3]}")
    else:
        unet.load_state_dict(state)


def export_for_diffusers(unet, cfg: LoRAConfig, directory: str | Path, family=None) -> Path:
    """Write what the family's pipeline's `load_lora_weights(directory)` (LoRA; SD 1.x's when
    `family` is None) or the denoiser class's `from_pretrained(directory)` (full fine-tuning) loads."""
    directory = Path(directory)
    if cfg.enabled:
        from peft.utils import get_peft_model_state_dict

        from longalign_rl.families import default_family

        # peft's own key names (lora_A / lora_B), which load_lora_weights reads for every
        # layer. Not convert_state_dict_to_diffusers: with diffusers 0.42 its old-style
        # attention names (to_q.lora.down) are silently dropped on loading.
        layers = get_peft_model_state_dict(unet)
        # The adapter's config goes into the file's metadata: without it load_lora_weights
        # takes lora_alpha = rank, which scales a LoRA with alpha != rank wrongly.
        metadata = unet.peft_config["default"].to_dict()
        (family or default_family()()).save_lora(directory, layers, metadata)
    else:
        with detach_adapter(unet):
            unet.save_pretrained(directory, safe_serialization=True)
    return directory


def export_adapter(unet, directory: str | Path) -> Path | None:
    """Write the trained T5 adapter as a TextAdapter folder (config.json + safetensors), if
    the UNet has one; what `TextAdapter.from_pretrained` and `t5.adapter` load."""
    adapter = attached_adapter(unet)
    if adapter is None:
        return None
    adapter.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def merge_lora(unet) -> None:
    """Fold the LoRA adapter into the base weights and remove its layers, in place, so the
    next stage starts from a plain UNet (docs/method.md section 4: the stage-1 LoRA is merged
    before stage 2). Afterwards the state dict has a plain UNet's keys and no adapter
    remains, so `make_trainable` can add a fresh one.

    diffusers' `fuse_lora` merges every peft layer (W += scale * B @ A) and `unload_lora`
    then swaps each peft layer for its base layer; `unload_lora` alone would drop the
    LoRA's effect.
    """
    if not getattr(unet, "_hf_peft_config_loaded", False):
        raise ValueError("merge_lora: this UNet has no LoRA adapter to merge")
    with detach_adapter(unet):
        unet.fuse_lora()
        unet.unload_lora()
