"""The flow-matching transformer families (issue 26): SD3 ("tiny-sd3", SD3.5 medium's class)
and FLUX ("tiny-flux", FLUX.1-dev's class). Their encoding equals the pipelines' for a
prompt of one segment and keeps every segment of a long one; the sampler's Euler ODE equals
the pipelines' chain; Flow-GRPO's SDE preserves the marginals and its log-probabilities are
the Gaussian's; the trainer's first ratio is 1; stage 1's loss is the velocity MSE at
logit-normal sigmas; the LoRA is the transformer's and loads with the pipeline's
load_lora_weights. The replay-gradient test for both is test_replay.py's."""

import copy
import logging

import pytest
import torch

from longalign_rl.config import LoRAConfig, PromptConfig, SamplerConfig
from longalign_rl.models import load_components
from longalign_rl.noise import initial_noise
from longalign_rl.sampling import flow
from longalign_rl.sampling.sampler import build_sampler, generate_latents, sample_trajectory

SHORT = "A red cube on a blue floor"
LONG = ("A red cube stands on the left of a wooden table in a quiet room. " * 2 + "A small green ball rests "
        "beside it, lit by the morning sun. A yellow cone lies far on the right, half in shadow.")
FAMILIES = ["tiny-sd3", "tiny-flux"]


@pytest.fixture(scope="module", params=FAMILIES)
def parts(request):
    return load_components(request.param)


@pytest.fixture(scope="module")
def sd3():
    return load_components("tiny-sd3")


def model_pipeline(parts):
    return parts.family.pipeline(parts, parts.family.model_scheduler(parts.scheduler_config))


# ------------------------------------------------------------------------------ the family and its parts


def test_the_family_is_read_from_the_model_and_the_transformer_is_its_denoiser(parts, tmp_path):
    from longalign_rl.families import family_for_pipeline
    from longalign_rl.models import save_model_folder

    family = parts.family
    assert family.name == {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}[type(parts.unet).__name__]
    assert family_for_pipeline(family.pipeline_classes[0], "here") is type(family)
    assert set(parts.modules()) == set(family.parts) and parts.modules()["transformer"] is parts.unet
    folder = save_model_folder(parts, tmp_path / "model")  # a complete diffusers folder of its pipeline
    assert (folder / "transformer" / "config.json").is_file()
    reloaded = load_components(str(folder))
    assert type(reloaded.family) is type(family)
    for (name, a), (_, b) in zip(parts.unet.state_dict().items(), reloaded.unet.state_dict().items()):
        assert torch.equal(a, b), name
    pipe = family.pipeline_class().from_pretrained(folder)  # diffusers' own loader reads it
    assert type(pipe.transformer) is type(parts.unet)


# ------------------------------------------------------------------------------ long prompts


def test_a_one_segment_prompt_equals_the_pipelines_encode_prompt_bit_for_bit(parts):
    family = parts.family
    encoder = family.encoder(parts, PromptConfig(max_tokens=77), resolution=64)
    inputs = family.pipeline_inputs(encoder([SHORT]), encoder.uncond(1))
    pipe = model_pipeline(parts)
    if family.name == "sd3":
        out = pipe.encode_prompt(SHORT, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt="")
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        assert inputs["prompt_embeds"].shape == (1, 77 + 256, family.joint_dim)  # CLIP 77, then T5 256
    else:
        out = pipe.encode_prompt(SHORT, None, device="cpu")[:2]
        names = ["prompt_embeds", "pooled_prompt_embeds"]
        assert inputs["prompt_embeds"].shape == (1, 512, 32)  # FLUX-dev's T5 limit
    for name, expected in zip(names, out):
        assert torch.equal(inputs[name], expected), name


def test_split_none_is_the_pipelines_own_cut_of_a_long_prompt(parts):
    """prompts.split: none at max_tokens 77: the prompt whole, its CLIP part cut at 77 tokens
    as the pipeline cuts it, equal bit for bit to encode_prompt's (the T5 part holds it whole)."""
    family = parts.family
    prompt = LONG + " " + LONG  # over CLIP's 77 tokens, within T5's 256
    encoder = family.encoder(parts, PromptConfig(max_tokens=77, split="none"), resolution=64)
    assert encoder.segments(prompt) == [prompt]
    inputs = family.pipeline_inputs(encoder([prompt]), encoder.uncond(1))
    pipe = model_pipeline(parts)
    if family.name == "sd3":
        out = pipe.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt="")
        names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    else:
        out = pipe.encode_prompt(prompt, None, device="cpu")[:2]
        names = ["prompt_embeds", "pooled_prompt_embeds"]
    for name, expected in zip(names, out):
        assert torch.equal(inputs[name], expected), name
    by_sentence = family.encoder(parts, PromptConfig(max_tokens=77), resolution=64)
    assert not torch.equal(by_sentence([prompt]), encoder([prompt]))


def test_sd3_without_its_t5_equals_the_pipeline_without_it():
    """model.without_t5: diffusers' text_encoder_3=None, whose T5 tokens are zeros."""
    parts = load_components("tiny-sd3", without_t5=True)
    assert parts.text_encoder_3 is None and "text_encoder_3" not in parts.modules()
    encoder = parts.family.encoder(parts, PromptConfig(max_tokens=77), resolution=64)
    cond = encoder([SHORT])
    embeds, _, pooled, _ = model_pipeline(parts).encode_prompt(SHORT, None, None, device="cpu",
                                                                do_classifier_free_guidance=True)
    inputs = parts.family.pipeline_inputs(cond, encoder.uncond(1))
    assert torch.equal(inputs["prompt_embeds"], embeds) and torch.equal(inputs["pooled_prompt_embeds"], pooled)
    assert torch.equal(cond[0, 77:-1], torch.zeros(256, parts.family.joint_dim))
    with pytest.raises(ValueError, match="model.without_t5: only SD3"):
        load_components("tiny-flux", without_t5=True)


def test_a_folder_saved_without_t5_is_complete_and_loads_without_it(tmp_path):
    """A stage-1 run of an SD3 model without T5 writes model/ with text_encoder_3 [null, null]
    (diffusers' save of text_encoder_3=None): the folder check does not ask for the T5's
    folder, it loads without T5, and the driver looks for no T5 tokenizer in it."""
    import json

    from longalign_rl.models import check_model_folder, save_model_folder

    folder = save_model_folder(load_components("tiny-sd3", without_t5=True), tmp_path / "model")
    assert json.loads((folder / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    check_model_folder(folder)
    again = load_components(str(folder))
    assert again.text_encoder_3 is None and again.family.t5_tokenizer(str(folder)) is None
    assert load_components("tiny-sd3").family.t5_tokenizer("tiny-sd3") is not None  # a built-in has its T5


def test_a_long_prompt_keeps_every_segment_in_the_clip_tokens_and_t5_says_what_it_cuts(sd3, caplog):
    encoder = sd3.family.encoder(sd3, PromptConfig(max_tokens=240, t5_max_tokens=32), resolution=64)
    segments = encoder.segments(LONG)
    assert len(segments) == 4
    cond = encoder([LONG])
    assert cond.shape == (1, 240 + 32 + 1, 64)
    windows, pooled = encoder.windows(segments)  # each segment alone, in its own window
    position = 0
    for segment, window in zip(segments, windows):
        n = len(sd3.tokenizer(segment, add_special_tokens=False).input_ids)
        # both CLIPs' states of every word (32 + 32), zero-padded to the joint width, none cut
        torch.testing.assert_close(cond[0, position:position + 1 + n, :64], window[:1 + n], rtol=0, atol=1e-6)
        position += 1 + n
    torch.testing.assert_close(cond[0, -1, :64], pooled[0], rtol=0, atol=1e-6)  # "first": both projections
    mean = sd3.family.encoder(sd3, PromptConfig(max_tokens=240, pooled="mean", t5_max_tokens=32),
                              resolution=64)([LONG])
    torch.testing.assert_close(mean[0, -1, :64], pooled.mean(0), rtol=0, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder([LONG, SHORT])
    cut = [r for r in caplog.records if "T5 tokens are past prompts.t5_max_tokens=32" in r.getMessage()]
    assert len(cut) == 1 and "A red cube stands" in cut[0].getMessage()  # the long one only


def test_flux_takes_its_pooled_vector_from_the_segments_and_its_words_from_t5():
    parts = load_components("tiny-flux")
    first = parts.family.encoder(parts, PromptConfig(), resolution=64)
    mean = parts.family.encoder(parts, PromptConfig(pooled="mean"), resolution=64)
    a, b = first([LONG]), mean([LONG])
    assert torch.equal(a[:, :-1], b[:, :-1])  # the T5 tokens do not depend on the choice
    _, pooled = first.windows(first.segments(LONG))
    torch.testing.assert_close(a[0, -1, :32], pooled[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(b[0, -1, :32], pooled.mean(0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ sampling = diffusers


def test_the_samplers_euler_ode_equals_the_pipelines_chain(parts):
    """SD3: classifier-free guidance, shift 3; FLUX: the guidance embedding, packed latents and
    the resolution-dependent shift. StableDiffusion3Pipeline / FluxPipeline(output_type="latent")
    from the same noise and embeddings."""
    cfg = SamplerConfig(num_steps=5, resolution=64, precision="fp32", guidance_scale=4.5)
    sampler = build_sampler(cfg, parts, prompts=PromptConfig(max_tokens=77))
    prompts, seeds = [SHORT, LONG], [3, 4]
    ours = generate_latents(sampler, prompts, seeds)
    family = parts.family
    noise = family.to_pipeline_latents(initial_noise(seeds, sampler.latent_shape))
    theirs = model_pipeline(parts)(**family.pipeline_inputs(sampler.encoder(prompts), sampler.encoder.uncond(1)),
                                   latents=noise, height=64, width=64, num_inference_steps=5, guidance_scale=4.5,
                                   output_type="latent").images
    torch.testing.assert_close(ours, family.from_pipeline_latents(theirs, 8), rtol=0, atol=1e-5)
    assert ours.abs().max() > 0.5  # a chain that moved, not zeros


def test_flux_reads_the_guidance_scale_and_no_unconditional_branch():
    parts = load_components("tiny-flux")
    cfg = SamplerConfig(num_steps=3, resolution=64, precision="fp32", guidance_scale=3.5)
    sampler = build_sampler(cfg, parts)
    x = initial_noise([1], sampler.latent_shape)
    cond, uncond = sampler.encoder([SHORT]), sampler.encoder.uncond(1)
    t = sampler.scheduler.timesteps[0]
    with torch.no_grad():
        v = parts.family.guided(parts.unet, x, t, cond, uncond, 3.5)
        assert torch.equal(v, parts.family.guided(parts.unet, x, t, cond, torch.randn_like(uncond), 3.5))
        assert not torch.equal(v, parts.family.guided(parts.unet, x, t, cond, uncond, 1.0))


# ------------------------------------------------------------------------------ Flow-GRPO's SDE


def gaussian_world_velocity(x, s, c):
    """The exact velocity of data x0 ~ N(0, c^2) at x_s = (1 - s) x0 + s z: E[z - x0 | x_s]."""
    var = (1 - s) ** 2 * c**2 + s**2
    return x * (s - (1 - s) * c**2) / var


def test_the_sde_preserves_the_marginals_and_reduces_to_the_ode_at_level_0(parts):
    """With the exact velocity of a Gaussian world, Flow-GRPO's SDE carries N(0, 1) at s = 1
    to the data's N(0, c^2) at s = 0, as the ODE does; the same noise without its drift
    correction (a = 1, b = dt) would not."""
    sampler = build_sampler(SamplerConfig(num_steps=200, resolution=64, precision="fp32"), parts)
    scheduler, c = sampler.scheduler, 0.5
    a, b, sigma = flow.sde_coefficients(scheduler, 0.7)
    s = scheduler.sigmas.double()
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    naive = x.clone()
    g = torch.Generator().manual_seed(1)
    for i in range(200):
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = a[i] * x + b[i] * gaussian_world_velocity(x, s[i], c) + sigma[i] * z
        naive = naive + (s[i + 1] - s[i]) * gaussian_world_velocity(naive, s[i], c) + sigma[i] * z
    assert abs(float(x.var()) - c**2) < 0.01, float(x.var())
    assert float(naive.var()) > c**2 + 0.1
    a0, b0, sigma0 = flow.sde_coefficients(scheduler, 1e-8)
    euler_a, euler_b = flow.euler_coefficients(scheduler)
    torch.testing.assert_close(a0, euler_a) and torch.testing.assert_close(b0, euler_b)
    window = flow.sde_coefficients(scheduler, 0.7, window=(10, 20))[2]
    assert (window[10:20] > 0).all() and window[:10].eq(0).all() and window[20:].eq(0).all()
    with pytest.raises(ValueError, match="noise level"):
        flow.sde_coefficients(scheduler, 0.0)


def lora_sampler(parts, guidance=4.5):
    parts = copy.deepcopy(parts)
    from longalign_rl.lora import make_trainable

    make_trainable(parts.unet, LoRAConfig(rank=4, alpha=4.0, dropout=0.0), family=parts.family)
    cfg = SamplerConfig(num_steps=4, num_grad_steps=1, guidance_scale=guidance, resolution=64, precision="fp32")
    return build_sampler(cfg, parts, prompts=PromptConfig(max_tokens=77, t5_max_tokens=16))


def test_recorded_log_probs_are_the_gaussians_and_the_trainers_first_ratio_is_one(parts):
    """Through the sampler: each recorded step's log-probability is the closed-form Gaussian's
    of (x_i, x_{i+1}); the trainer's recompute under the sampling weights gives ratio 1 at
    every step, and its KL to the adapter-free model is 0 (the LoRA starts at zero)."""
    from longalign_rl.algorithms.policy_gradient import policy_step_loss
    from longalign_rl.sampling.ddim import guided_eps
    from longalign_rl.sampling.stochastic import step_mean
    from tests.unit.test_policy_gradient import adapter_off

    sampler = lora_sampler(parts)
    unet, family = sampler.unet.eval(), parts.family
    traj = sample_trajectory(sampler, [SHORT, LONG], seed=3, eta=0.7)
    assert traj.latents.shape[:2] == (2, 4) and (traj.sigma > 0).all()
    torch.testing.assert_close(traj.next_latents[:, -1], traj.final_latents)
    with torch.no_grad():
        for k, t in enumerate(traj.timesteps):
            v = guided_eps(unet, traj.latents[:, k], t, traj.cond, traj.uncond, 4.5, family)
            mean = step_mean(traj.latents[:, k], v, float(traj.a[k]), float(traj.b[k]))
            closed = torch.distributions.Normal(mean, float(traj.sigma[k])).log_prob(traj.next_latents[:, k])
            torch.testing.assert_close(traj.log_probs[:, k], closed.flatten(1).mean(1), rtol=1e-5, atol=1e-5)

    for k in range(len(traj.indices)):
        loss, stats = policy_step_loss(unet, traj, k, torch.tensor([1.0, -1.0]), 4.5, clip_range=1e-4,
                                       advantage_clip=5.0, kl_weight=0.1, reference=adapter_off(unet), family=family)
        torch.testing.assert_close(stats["ratio"], torch.ones(2), rtol=0, atol=2e-5)
        assert stats["kl"].abs().max() < 1e-10
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ stage 1


def test_stage_1_trains_the_velocity_at_logit_normal_sigmas(parts):
    from longalign_rl.algorithms.denoising import denoising_loss

    family = parts.family
    scheduler = family.training_scheduler(parts.scheduler_config)
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = family.encoder(parts, PromptConfig(max_tokens=77, t5_max_tokens=16), resolution=64)([SHORT] * 4)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    with torch.no_grad():
        loss, stats = denoising_loss(parts.unet, scheduler, latents, cond, generators, family)
    # the same draws by hand: u = sigmoid(N(0, 1)), index u * 1000 into the training sigmas
    again = [torch.Generator().manual_seed(i) for i in range(4)]
    u = torch.cat([torch.sigmoid(torch.randn(1, generator=g)) for g in again])
    noise = torch.cat([torch.randn(1, 16, 8, 8, generator=g) for g in again])
    index = (u * 1000).long()
    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    assert torch.equal(stats["timestep"], scheduler.timesteps[index])
    with torch.no_grad():
        pred = family.predict(parts.unet, (1 - sigma) * latents + sigma * noise, scheduler.timesteps[index], cond)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, noise - latents))
    # SD3's logit-normal: the sigmas concentrate in the middle, not at the ends
    u = flow.logit_normal(torch.Generator().manual_seed(0), 10_000, "cpu")
    assert 0.48 < float(u.mean()) < 0.52 and float(((u < 0.05) | (u > 0.95)).float().mean()) < 0.01


# ------------------------------------------------------------------------------ the LoRA


def test_the_default_lora_adapts_the_transformers_projections_and_loads_in_diffusers(parts, tmp_path):
    from longalign_rl.lora import export_for_diffusers, lora_targets, make_trainable

    family = parts.family
    assert lora_targets(LoRAConfig(), family) == list(family.lora_targets)
    assert lora_targets(LoRAConfig(target_modules=("attn.to_q",)), family) == ["attn.to_q"]  # the user's own
    trained = copy.deepcopy(parts)
    make_trainable(trained.unet, LoRAConfig(rank=4, alpha=8.0, dropout=0.0), family=family)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in trained.unet.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("attn.add_q_proj") for n in adapted) and any(n.endswith("ff_context.net.2") for n in adapted)
    if family.name == "flux":  # the single blocks' attention too
        assert any(n.startswith("single_transformer_blocks") and n.endswith("attn.to_q") for n in adapted)
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    export_for_diffusers(trained.unet, LoRAConfig(rank=4, alpha=8.0), tmp_path / "lora", family)
    pipe = model_pipeline(copy.deepcopy(parts))
    pipe.load_lora_weights(tmp_path / "lora")
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = family.encoder(parts, PromptConfig(max_tokens=77, t5_max_tokens=16), resolution=64)([SHORT, LONG])
    with torch.no_grad():
        ours = family.predict(trained.unet, x, torch.tensor(500.0), cond)
        theirs = family.predict(pipe.transformer, x, torch.tensor(500.0), cond)
        base = family.predict(parts.unet, x, torch.tensor(500.0), cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters


# ------------------------------------------------------------------------------ pipeline.load of a run


@pytest.mark.parametrize("config", ["tiny_sd3.yaml", "tiny_flux.yaml"])
def test_pipeline_load_of_a_run_draws_what_its_samplers_draw(tmp_path, config):
    """A stage-2 run directory as a run leaves it (config.yaml, metrics.jsonl, lora/): `load`
    returns the family's diffusers pipeline (StableDiffusion3Pipeline / FluxPipeline) with the
    exported LoRA loaded by load_lora_weights and prompts segment-encoded by the run's encoder;
    it draws the latents the run's sampler draws from the same seeds."""
    import json

    from longalign_rl.config import load_config, to_yaml
    from longalign_rl.lora import export_for_diffusers, make_trainable
    from longalign_rl.pipeline import LongPrompts, load

    cfg = load_config(f"configs/{config}", ["sampler.num_steps=4", "lora.rank=4", "lora.alpha=8.0"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.1}) + "\n")
    parts = load_components(cfg.model.pretrained)
    make_trainable(parts.unet, cfg.lora, family=parts.family)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in parts.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a LoRA that visibly changes the output
    export_for_diffusers(parts.unet, cfg.lora, tmp_path / "lora", parts.family)
    sampler = build_sampler(cfg.sampler, parts, prompts=cfg.prompts)
    prompts, seeds = [SHORT, LONG], [5, 6]
    expected = generate_latents(sampler, prompts, seeds)

    pipe = load(tmp_path, device="cpu")
    assert isinstance(pipe, LongPrompts) and isinstance(pipe, parts.family.pipeline_class())
    assert pipe.longalign["family"] == parts.family.name and pipe.longalign["weights"] == "lora"
    latents = pipe.generate(prompts, seeds, output_type="latent")
    assert latents.shape == expected.shape == (2, 16, 8, 8)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-4 * max(1.0, float(expected.abs().max())))
    base = generate_latents(build_sampler(cfg.sampler, load_components(cfg.model.pretrained), prompts=cfg.prompts),
                            prompts, seeds)
    assert (base - expected).abs().max() > 1e-2  # the LoRA was loaded, not left out
    images = pipe.generate(prompts, seeds, output_type="pt")
    assert images.shape == (2, 3, 64, 64) and 0 <= float(images.min()) and float(images.max()) <= 1
