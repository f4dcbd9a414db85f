"""Trajectory replay (docs/method.md section 3): the trainer's replayed x0 equals the sampler's,
and its gradient equals the gradient of the reference chain, which runs every step in one
graph with gradient at the chosen steps on detached inputs. For every model family: SD 1.x
("tiny"), SDXL ("tiny-sdxl"), whose conditioning carries its pooled embedding and time ids,
and the flow-matching transformers SD3 ("tiny-sd3") and FLUX ("tiny-flux"), whose chain is
the Euler ODE of diffusers' own FlowMatchEulerDiscreteScheduler."""

import pytest
import torch

from longalign_rl.algorithms.reward_backprop import replay_final_latents
from longalign_rl.config import LoRAConfig, PromptConfig
from longalign_rl.lora import make_trainable
from longalign_rl.models import load_components
from longalign_rl.sampling.ddim import grad_step_indices, guided_eps, replay_coefficients
from longalign_rl.sampling.sampler import Sampler
from longalign_rl.types import Rollout

PROMPTS = ["A red cube on a table. A blue ball beside it.", "A green tree in a field at noon."]


def reference_chain(unet, scheduler, noise, cond, uncond, guidance, grad_indices, final="step", family=None):
    """The reference code's loop: all steps, gradient only at grad_indices, input detached.
    final="pred_x0": what the reference decodes, the last step's predicted clean latent,
    computed here from its definition (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    latents = noise
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i in grad_indices):
            eps = guided_eps(unet, latents.detach(), t, cond, uncond, guidance, family)
        if final == "pred_x0" and i == len(scheduler.timesteps) - 1:
            abar = scheduler.alphas_cumprod[int(t)]  # float32 coefficients, as the scheduler's own
            return (latents - (1 - abar) ** 0.5 * eps) / abar ** 0.5
        latents = scheduler_step(scheduler, eps, t, latents, family)
    return latents


def scheduler_step(scheduler, eps, t, latents, family):
    """The diffusers scheduler's own DDIM step; a flow model's Euler step x + (s' - s) v in
    float64 (FlowMatchEulerDiscreteScheduler.step would round a float64 sample to float32;
    that the sampler equals its step in float32 is test_families.py's pipeline test)."""
    if family.denoiser == "unet":
        return scheduler.step(eps, t, latents, eta=0.0).prev_sample
    i = int((scheduler.timesteps == t).nonzero())
    return latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]).double() * eps


def model_schedule(parts, num_steps, final="step"):
    scheduler = parts.family.scheduler(parts.scheduler_config, timestep_spacing="trailing", final=final)
    parts.family.set_timesteps(scheduler, num_steps, 8)
    return scheduler


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def parts(request):
    c = load_components(request.param)
    torch.manual_seed(0)
    make_trainable(c.unet, LoRAConfig(rank=4, alpha=4.0, dropout=0.0))
    # LoRA's up-projection starts at zero; make it non-zero so the LoRA matters.
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    for module in c.modules().values():
        module.double()
    return c


def make_sampler(parts, num_steps=8, num_grad_steps=3, final="step"):
    encoder = parts.family.encoder(parts, PromptConfig(max_tokens=24, t5_max_tokens=16), resolution=64,
                                   dtype=torch.float64)
    scheduler = parts.family.scheduler(parts.scheduler_config, timestep_spacing="trailing", final=final)
    return Sampler(parts.unet, encoder, scheduler, num_steps=num_steps, guidance_scale=5.0,
                   resolution=64, num_grad_steps=num_grad_steps, family=parts.family,
                   latent_channels=parts.vae.config.latent_channels)


def lora_grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


# sampler.final pred_x0 is DDIM's (a flow family's chain always ends at its last Euler step)
@pytest.mark.parametrize("parts,final", [("tiny", "step"), ("tiny", "pred_x0"), ("tiny-sdxl", "step"),
                                         ("tiny-sdxl", "pred_x0"), ("tiny-sd3", "step"), ("tiny-flux", "step")],
                         indirect=["parts"])
def test_replay_matches_reference_chain_value_and_gradient(parts, final):
    """In float64, so that only rounding separates the two computations. sampler.final
    pred_x0: the sampler's scheduler returns the predicted clean latent at the last step,
    and the reference chain computes it from its definition on the model's own schedule."""
    sampler = make_sampler(parts, final=final)
    scheduler, unet, guidance = sampler.scheduler, parts.unet, sampler.guidance_scale
    model_scheduler = model_schedule(parts, 8)  # DDIM: set_alpha_to_one false, the model's own
    cond = sampler.encoder(PROMPTS).double()
    uncond = sampler.encoder.uncond(1).double()
    noise = torch.randn(2, *sampler.latent_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    indices = grad_step_indices(8, 3, offset=1)  # includes the last step (index 7)

    family = parts.family
    ref = reference_chain(unet, model_scheduler, noise, cond, uncond, guidance, indices, final, family)

    # What a sampler records for the same chain, without gradient.
    scheduler = model_schedule(parts, 8, final)
    with torch.no_grad():
        latents, grad_latents, grad_eps = noise, [], []
        for i, t in enumerate(scheduler.timesteps):
            eps = guided_eps(unet, latents, t, cond, uncond, guidance, family)
            if i in indices:
                grad_latents.append(latents)
                grad_eps.append(eps)
            latents = scheduler_step(scheduler, eps, t, latents, family)
    rollout = Rollout(
        prompts=PROMPTS, cond=cond, uncond=uncond, grad_indices=indices,
        grad_timesteps=scheduler.timesteps[indices], grad_latents=torch.stack(grad_latents, 1),
        grad_eps=torch.stack(grad_eps, 1), coeffs=replay_coefficients(sampler.a, sampler.b, indices),
        final_latents=latents, policy_version=0, seed=3, seeds=[3, 4], seconds=0.0,
    )

    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    unet.zero_grad()
    (ref * weights).sum().backward()
    g_ref = lora_grads(unet)
    unet.zero_grad()
    replayed = replay_final_latents(unet, rollout, guidance, family=family)
    (replayed * weights).sum().backward()
    g_replay = lora_grads(unet)

    torch.testing.assert_close(replayed.detach(), ref.detach(), rtol=0, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in g_ref.values()) > 0, "zero reference gradient proves nothing"
    for name in g_ref:
        torch.testing.assert_close(g_replay[name], g_ref[name], rtol=1e-9, atol=1e-12, msg=name)
    if final == "pred_x0":  # and the two modes do decode different latents
        other = reference_chain(unet, model_schedule(parts, 8), noise, cond, uncond, guidance, indices, "step", family)
        assert (other - ref).abs().max() > 1e-3


def test_sampler_records_what_replay_needs(parts):
    sampler = make_sampler(parts, num_steps=8, num_grad_steps=2)
    a = sampler.sample(PROMPTS, seed=11, policy_version=4)
    b = sampler.sample(PROMPTS, seed=11)
    assert a.grad_latents.shape[:2] == (2, 2) and a.grad_eps.shape == a.grad_latents.shape
    assert a.grad_indices == grad_step_indices(8, 2, a.grad_indices[0])
    assert a.policy_version == 4
    torch.testing.assert_close(a.final_latents, b.final_latents)  # seeded
    # Replaying under unchanged weights reproduces the recorded output.
    with torch.no_grad():
        replayed = replay_final_latents(parts.unet, a, 5.0, family=parts.family)
    torch.testing.assert_close(replayed.float(), a.final_latents, atol=1e-5, rtol=0)


def test_gradient_step_selection():
    assert grad_step_indices(50, 5, 0) == [0, 10, 20, 30, 40]
    assert grad_step_indices(50, 5, 9) == [9, 19, 29, 39, 49]
    with pytest.raises(ValueError, match="offset 10"):
        grad_step_indices(50, 5, 10)


def test_activation_checkpointing_gives_the_same_gradient(parts):
    """The reference recomputes UNet activations at gradient steps; the UNet's inputs there
    are detached, so a checkpoint variant that needs an input with grad would return none."""
    sampler = make_sampler(parts, num_steps=8, num_grad_steps=2)
    rollout = sampler.sample(PROMPTS, seed=5)
    unet = parts.unet
    for name in ("grad_latents", "grad_eps", "final_latents", "cond", "uncond"):
        setattr(rollout, name, getattr(rollout, name).double())

    def grads(checkpointing: bool):
        unet.zero_grad()
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        replay_final_latents(unet, rollout, 5.0, family=parts.family).square().sum().backward()
        unet.disable_gradient_checkpointing()
        unet.eval()
        return lora_grads(unet)

    plain, checkpointed = grads(False), grads(True)
    assert sum(float(g.abs().sum()) for g in plain.values()) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-9, atol=1e-12, msg=name)
