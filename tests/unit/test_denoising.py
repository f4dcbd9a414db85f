"""Stage 1's denoising loss (caption dropout, targets, LoRA overfitting) and merging the LoRA."""

import copy

import pytest
import torch

from longalign_rl.algorithms.denoising import (
    caption_dropout, denoising_loss, denoising_loss_at, denoising_target,
)
from longalign_rl.config import LoRAConfig
from longalign_rl.lora import make_trainable, merge_lora
from longalign_rl.models import load_components, make_scheduler
from longalign_rl.vae import encode as encode_images

LORA = LoRAConfig(rank=4, alpha=4.0, dropout=0.0)  # no dropout: outputs comparable call to call


def scheduler_of(tiny_parts, **overrides):
    return make_scheduler(dict(tiny_parts.scheduler_config, **overrides), timestep_spacing="leading")


def lora_unet(tiny_parts):
    unet = copy.deepcopy(tiny_parts.unet)
    make_trainable(unet, LORA)
    return unet


def batch(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 240, 32, generator=g)


# ---------------------------------------------------------------- caption dropout

def test_caption_dropout_with_p_0_changes_nothing_and_p_1_gives_all_uncond():
    cond, uncond = torch.randn(6, 5, 3), torch.randn(5, 3)
    assert torch.equal(caption_dropout(cond, uncond, 0.0, torch.Generator().manual_seed(0)), cond)
    dropped = caption_dropout(cond, uncond, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, uncond.expand(6, 5, 3))


def test_caption_dropout_is_seeded_and_drops_about_p():
    cond, uncond = torch.randn(4000, 2, 3) + 10, torch.zeros(4000, 2, 3)
    before = cond.clone()
    a = caption_dropout(cond, uncond, 0.5, torch.Generator().manual_seed(1))
    b = caption_dropout(cond, uncond, 0.5, torch.Generator().manual_seed(1))
    c = caption_dropout(cond, uncond, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(cond, before)  # the input is not modified
    dropped = (a == 0).all(dim=(1, 2))
    kept = (a == cond).all(dim=(1, 2))
    assert bool((dropped | kept).all())  # whole samples, never parts of one
    assert 0.46 < dropped.float().mean() < 0.54


def test_caption_dropout_rejects_a_probability_outside_0_1():
    with pytest.raises(ValueError, match="1.5"):
        caption_dropout(torch.zeros(2, 1, 1), torch.zeros(1, 1), 1.5)


# ---------------------------------------------------------------- loss

def test_denoising_loss_is_finite_seeded_and_reaches_the_lora(tiny_parts):
    unet, scheduler = lora_unet(tiny_parts), scheduler_of(tiny_parts)
    latents, cond = batch()
    loss, stats = denoising_loss(unet, scheduler, latents, cond, torch.Generator().manual_seed(0))
    again, _ = denoising_loss(unet, scheduler, latents, cond, torch.Generator().manual_seed(0))
    other, _ = denoising_loss(unet, scheduler, latents, cond, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss.detach()) and float(loss.detach()) > 0
    assert float(loss.detach()) == float(again.detach()) and float(loss.detach()) != float(other.detach())
    assert stats["loss"].shape == (1,) and float(stats["loss"]) == float(loss.detach())
    t = stats["timestep"]
    assert t.shape == (2,) and bool(((t >= 0) & (t < 1000) & (t == t.round())).all())
    loss.backward()
    lora = {n: p for n, p in unet.named_parameters() if "lora" in n}
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    # B starts at zero, so the gradient reaches B first (A's gradient is B^T times something)
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in unet.named_parameters() if "lora" not in n)


def test_timesteps_cover_the_whole_training_range(tiny_parts):
    class Zero(torch.nn.Module):  # a stand-in UNet: only the drawn timesteps matter here
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": x * self.w})()

    latents = torch.zeros(20000, 1, 1, 1)
    _, stats = denoising_loss(Zero(), scheduler_of(tiny_parts), latents, torch.zeros(20000, 1, 1),
                              torch.Generator().manual_seed(0))
    t = stats["timestep"]
    assert t.min() < 5 and t.max() > 994 and abs(float(t.mean()) - 499.5) < 10


def test_a_few_adamw_steps_of_the_lora_overfit_one_batch(tiny_parts):
    unet, scheduler = lora_unet(tiny_parts), scheduler_of(tiny_parts)
    latents, cond = batch(n=4)
    g = torch.Generator().manual_seed(3)
    timesteps, noise = torch.tensor([50, 300, 600, 900]), torch.randn(latents.shape, generator=g)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)

    def loss():
        return denoising_loss_at(unet, scheduler, latents, cond, timesteps, noise)

    with torch.no_grad():
        first = float(loss())
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        last = float(loss())
    assert last < 0.8 * first, (first, last)


def test_v_prediction_targets_the_velocity(tiny_parts):
    scheduler = scheduler_of(tiny_parts, prediction_type="v_prediction")
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(denoising_target(scheduler, x0, noise, t), expected, atol=1e-6)
    eps = scheduler_of(tiny_parts)
    assert torch.equal(denoising_target(eps, x0, noise, t), noise)

    # and the loss compares the UNet's output with that velocity
    unet = tiny_parts.unet
    cond = torch.randn(3, 240, 32)
    with torch.no_grad():
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        got = denoising_loss_at(unet, scheduler, x0, cond, t, noise)
        eps_loss = denoising_loss_at(unet, eps, x0, cond, t, noise)
    assert torch.allclose(got, ((pred - expected) ** 2).mean(), rtol=1e-5)
    assert not torch.allclose(got, eps_loss)


def test_an_unknown_prediction_type_is_an_error_naming_it(tiny_parts):
    scheduler = scheduler_of(tiny_parts, prediction_type="sample")
    latents, cond = batch()
    with pytest.raises(ValueError, match="'sample'"):
        denoising_loss(tiny_parts.unet, scheduler, latents, cond, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- images -> latents

def test_encode_images_maps_0_1_to_sd_latents(tiny_parts):
    vae = tiny_parts.vae
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = encode_images(vae, images, torch.Generator().manual_seed(1))
    b = encode_images(vae, images, torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b) and not a.requires_grad
    with torch.no_grad():
        dist = vae.encode(images * 2 - 1).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(1)) * vae.config.scaling_factor
    assert torch.allclose(a, expected)
    with pytest.raises(ValueError, match="0, 1"):
        encode_images(vae, images * 2 - 1)  # already in [-1, 1]: refused, not silently fixed


# ---------------------------------------------------------------- merging the LoRA

def perturbed_lora_unet(tiny_parts):
    unet = lora_unet(tiny_parts)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:  # as after training: B non-zero, so the adapter changes outputs
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet.eval()


def test_merge_lora_keeps_outputs_and_leaves_a_plain_unet(tiny_parts):
    unet = perturbed_lora_unet(tiny_parts)
    latents, cond = batch()
    t = torch.tensor([10, 700])
    with torch.no_grad():
        adapted = unet(latents, t, encoder_hidden_states=cond).sample
        base = tiny_parts.unet(latents, t, encoder_hidden_states=cond).sample
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters

    merge_lora(unet)
    assert not [n for n, _ in unet.named_parameters() if "lora" in n]
    assert not [n for n, _ in unet.named_modules() if "lora" in n]
    assert set(unet.state_dict()) == set(tiny_parts.unet.state_dict())
    with torch.no_grad():
        merged = unet(latents, t, encoder_hidden_states=cond).sample
    assert torch.allclose(merged, adapted, atol=1e-5)

    # stage 2 can start from it: a fresh plain tiny UNet loads it strictly and computes the same
    fresh = load_components("tiny", seed=1).unet
    fresh.load_state_dict(unet.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(latents, t, encoder_hidden_states=cond).sample, adapted, atol=1e-5)
    # ... and can take a new adapter
    assert make_trainable(unet, LORA)


def test_merging_changes_the_base_weights(tiny_parts):
    unet = perturbed_lora_unet(tiny_parts)
    merge_lora(unet)
    merged, original = unet.state_dict(), tiny_parts.unet.state_dict()
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.allclose(merged[to_q], original[to_q])
    norm = "down_blocks.0.attentions.0.norm.weight"  # not a LoRA target: untouched
    assert torch.equal(merged[norm], original[norm])


def test_merge_lora_without_an_adapter_is_an_error(tiny_parts):
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(copy.deepcopy(tiny_parts.unet))
