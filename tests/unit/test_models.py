"""Model parts: the tiny build is reproducible, and a diffusers folder loads back the same."""

import torch

from longalign_rl.config import LoRAConfig
from longalign_rl.lora import export_for_diffusers, load_trainable_state_dict, make_trainable, trainable_state_dict
from longalign_rl.models import load_components


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_parts_are_the_same_in_every_process_and_frozen():
    a, b = load_components("tiny", seed=0), load_components("tiny", seed=0)
    assert same_weights(a.unet, b.unet) and same_weights(a.vae, b.vae)
    assert not same_weights(a.unet, load_components("tiny", seed=1).unet)
    assert not any(p.requires_grad for p in a.unet.parameters())


def test_a_local_diffusers_folder_loads_through_the_pretrained_path(tmp_path):
    """The layout of stable-diffusion-v1-5 (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import DDIMScheduler

    parts = load_components("tiny")
    parts.unet.save_pretrained(tmp_path / "unet")
    parts.vae.save_pretrained(tmp_path / "vae")
    parts.text_encoder.save_pretrained(tmp_path / "text_encoder")
    parts.tokenizer.save_pretrained(tmp_path / "tokenizer")
    DDIMScheduler(**parts.scheduler_config).save_config(tmp_path / "scheduler")

    loaded = load_components(str(tmp_path))
    assert same_weights(parts.unet, loaded.unet) and same_weights(parts.text_encoder, loaded.text_encoder)
    assert loaded.tokenizer("a red cube").input_ids == parts.tokenizer("a red cube").input_ids
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"


def test_full_fine_tuning_trains_and_exports_the_whole_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = LoRAConfig(enabled=False)
    trainer, sampler = load_components("tiny").unet, load_components("tiny").unet
    params = make_trainable(trainer, cfg)
    assert len(params) == len(list(trainer.parameters()))
    with torch.no_grad():
        params[0].add_(1.0)
    load_trainable_state_dict(sampler, trainable_state_dict(trainer, cfg), cfg)
    assert same_weights(trainer, sampler)
    exported = UNet2DConditionModel.from_pretrained(export_for_diffusers(trainer, cfg, tmp_path / "unet"))
    assert same_weights(exported, trainer)


def test_lora_weights_move_from_trainer_to_sampler():
    cfg = LoRAConfig(rank=4, alpha=4.0, dropout=0.0)
    trainer, sampler = load_components("tiny").unet, load_components("tiny").unet
    make_trainable(trainer, cfg)
    make_trainable(sampler, cfg)
    with torch.no_grad():
        for name, p in trainer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    state = trainable_state_dict(trainer, cfg)
    assert state and all("lora" in k for k in state)
    load_trainable_state_dict(sampler, state, cfg)
    assert same_weights(trainer, sampler)


def test_builtin_architectures_include_sd15_sized_configs():
    """sd15-random is SD v1.5's architecture; its UNet config must build (checked on the
    meta device: no 3.4 GB allocation in a unit test)."""
    from diffusers import UNet2DConditionModel

    from longalign_rl.models import _read_config, builtin_models

    assert builtin_models() == ["flux-dev-random", "sd15-random", "sd35-medium-random", "sdxl-random", "tiny",
                                "tiny-flux", "tiny-sd3", "tiny-sdxl"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_read_config("sd15-random", "unet"))
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6  # SD v1.5: 859.5M


def test_sdxl_random_is_sdxl_bases_architecture_on_the_meta_device():
    """sdxl-random's parts at SDXL base 1.0's published sizes (UNet 2.567B, CLIP-L 123M,
    OpenCLIP bigG 695M parameters), built through its family with no memory."""
    from longalign_rl.models import build_random

    with torch.device("meta"):
        parts = build_random("sdxl-random")
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.modules().items()}
    assert parts.family.name == "sdxl" and parts.family.pooled_dim == 1280
    assert 2.56e9 < count["unet"] < 2.57e9 and 1.22e8 < count["text_encoder"] < 1.24e8
    assert 6.9e8 < count["text_encoder_2"] < 7.0e8 and 8.3e7 < count["vae"] < 8.4e7
