"""Model families (issue 25): a model's family comes from its model_index.json, SDXL's
segment encoding gives StableDiffusionXLPipeline's conditioning bit for bit for a prompt of
one segment and loses no text of a long one, the framework's sampler returns what each
family's diffusers pipeline returns, and every algorithm's invariant holds on SDXL (the
float64 replay-gradient test is tests/unit/test_replay.py's, run for both families)."""

import json

import pytest
import torch

from longalign_rl.config import LoRAConfig, PromptConfig, SamplerConfig
from longalign_rl.families.sdxl import SDXLEncoder, time_ids, with_size
from longalign_rl.models import load_components
from longalign_rl.sampling.sampler import build_sampler, generate_latents, initial_noise, sample_trajectory

SHORT = "A red cube on a wooden table"
LONG = ("A red cube on a wooden table. A blue ball rolls beside it. "
        "Behind them a green lamp casts a long shadow on the wall.")


@pytest.fixture(scope="module")
def sdxl():
    return load_components("tiny-sdxl")


def fp32_sampler(parts, max_tokens=77, **kw):
    cfg = SamplerConfig(num_steps=4, num_grad_steps=1, guidance_scale=5.0, resolution=64, precision="fp32", **kw)
    return build_sampler(cfg, parts, prompts=PromptConfig(max_tokens=max_tokens))


def diffusers_pipeline(parts, scheduler):
    pipe = parts.family.pipeline(parts, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------ the registry


def test_the_family_is_read_from_the_model_and_a_wrong_one_is_refused(sdxl, tiny_parts):
    assert sdxl.family.name == "sdxl" and tiny_parts.family.name == "sd"
    assert set(sdxl.modules()) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert not any(p.requires_grad for m in sdxl.modules().values() for p in m.parameters())
    assert sdxl.family.pooled_dim == sdxl.text_encoder_2.config.projection_dim
    with pytest.raises(ValueError, match=r"model.family: 'sd', but 'tiny-sdxl' is a 'sdxl' model"):
        load_components("tiny-sdxl", family="sd")


def test_a_folder_diffusers_saved_loads_as_sdxl_and_an_unknown_pipeline_is_named(sdxl, tmp_path):
    """A folder written by StableDiffusionXLPipeline.save_pretrained (this project's parts,
    diffusers' layout and model_index.json) loads as SDXL with the same weights; a folder of
    a pipeline class no family reads is refused naming the class and the supported ones."""
    from diffusers import DDIMScheduler

    from longalign_rl.models import check_model_folder

    diffusers_pipeline(sdxl, DDIMScheduler.from_config(sdxl.scheduler_config)).save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    loaded = load_components(str(tmp_path / "m"))
    assert loaded.family == sdxl.family
    for name, module in sdxl.modules().items():
        theirs = loaded.modules()[name].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer("a red cube").input_ids == sdxl.tokenizer(
        "a red cube").input_ids

    index = tmp_path / "m" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match=r"'KandinskyV22Pipeline' is not a supported model family; supported: "
                                         r".*StableDiffusionPipeline \(sd\).*StableDiffusionXLPipeline \(sdxl\)"):
        check_model_folder(tmp_path / "m")


# ------------------------------------------------------------------------------ SDXL's encoding


def test_a_one_segment_prompt_gets_encode_prompts_conditioning_bit_for_bit(sdxl):
    from diffusers import DDIMScheduler

    pipe = diffusers_pipeline(sdxl, DDIMScheduler.from_config(sdxl.scheduler_config))
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(SHORT, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    at_77 = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=77), resolution=64)
    cond = at_77([SHORT])
    assert cond.shape == (1, 78, 64)  # 77 tokens + the row of time ids and pooled embedding
    assert torch.equal(cond[:, :77], embeds) and torch.equal(cond[:, 77, 6:38], pooled)
    assert cond[0, 77, :6].tolist() == time_ids((64, 64), (0, 0), (64, 64))
    uncond = at_77.uncond(1)  # force_zeros_for_empty_prompt: zeros, with the same size conditioning
    assert torch.equal(uncond[:, :77], negative) and torch.equal(uncond[:, 77, 6:38], negative_pooled)
    assert torch.equal(uncond[:, 77, :6], cond[:, 77, :6])

    at_240 = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=240), resolution=64)
    wide = at_240([SHORT])
    assert wide.shape == (1, 241, 64)
    assert torch.equal(wide[:, :77], embeds) and torch.equal(wide[:, 240], cond[:, 77])
    assert torch.equal(wide[0, 77:240], at_240.pad.expand(163, -1))  # then the pad vector


def test_a_long_prompt_keeps_every_segments_words_in_both_encoders_and_the_pooled_choice(sdxl):
    encoder = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=240), resolution=64)
    segments = encoder.segments(LONG)
    assert len(segments) == 3
    cond = encoder([LONG])
    windows, pooled = encoder.windows(segments)  # each segment alone, in its own window
    position = 0
    for j, segment in enumerate(segments):
        n = len(sdxl.tokenizer(segment, add_special_tokens=False).input_ids)
        # both encoders' states of every word (CLIP-L's 32 + bigG's 32), in order, none cut
        torch.testing.assert_close(cond[0, position:position + 1 + n], windows[j, :1 + n], rtol=0, atol=1e-6)
        position += 1 + n
    tail = windows[-1, 1 + n:]  # the last segment's <eot> and padding states follow
    torch.testing.assert_close(cond[0, position:position + tail.shape[0]], tail, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[0, -1, 6:38], pooled[0], rtol=0, atol=1e-6)  # "first"
    mean = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=240, pooled="mean"), resolution=64)([LONG])
    torch.testing.assert_close(mean[0, -1, 6:38], pooled.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean[0, :-1], cond[0, :-1])  # the tokens do not depend on the choice
    with pytest.raises(ValueError, match="prompts.pooled must be one of first, mean"):
        SDXLEncoder(sdxl.tokenizer, sdxl.text_encoder, sdxl.tokenizer_2, sdxl.text_encoder_2, pooled="last")


# ------------------------------------------------------------------------------ sampling = diffusers


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_the_sampler_returns_the_latents_of_the_familys_diffusers_pipeline(model):
    """The same short prompt, initial latents, guidance and (DDIM) scheduler: the framework's
    sampler and StableDiffusionPipeline / StableDiffusionXLPipeline(output_type="latent")
    agree to 1e-5. SD 1.x's segment encoding is the reference's (pad vectors after the
    words), so there the prompt goes through the plain 77-token encoding both share."""
    from longalign_rl.encoding import TruncatedEncoder

    parts = load_components(model)
    sampler = fp32_sampler(parts)
    if parts.family.name == "sd":
        sampler.encoder = TruncatedEncoder(parts.tokenizer, parts.text_encoder)
    latents = generate_latents(sampler, [SHORT], [7])
    pipe = diffusers_pipeline(parts, sampler.scheduler)
    ref = pipe(prompt=SHORT, negative_prompt="" if parts.family.name == "sd" else None,
               latents=initial_noise([7], (4, 8, 8)), num_inference_steps=4,
               guidance_scale=5.0, height=64, width=64, output_type="latent").images
    assert latents.abs().mean() > 0.1
    torch.testing.assert_close(latents, ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ algorithms on SDXL


def test_grpo_on_sdxl_first_ratio_is_one_and_log_probs_are_the_closed_form(sdxl):
    import copy

    from longalign_rl.algorithms.policy_gradient import policy_step_loss
    from longalign_rl.lora import make_trainable
    from longalign_rl.sampling.ddim import guided_eps
    from longalign_rl.sampling.stochastic import step_log_prob, step_mean

    parts = copy.deepcopy(sdxl)
    make_trainable(parts.unet, LoRAConfig(rank=4, alpha=4.0, dropout=0.0))
    sampler = fp32_sampler(parts, max_tokens=120)
    unet = sampler.unet.eval()
    traj = sample_trajectory(sampler, [LONG, SHORT], seed=3, eta=1.0)
    assert traj.cond.shape == (2, 121, 64)
    with torch.no_grad():
        for i, t in enumerate(traj.timesteps):
            eps = guided_eps(unet, traj.latents[:, i], t, traj.cond, traj.uncond, 5.0, parts.family)
            mean = step_mean(traj.latents[:, i], eps, float(traj.a[i]), float(traj.b[i]))
            torch.testing.assert_close(step_log_prob(traj.next_latents[:, i], mean, float(traj.sigma[i])),
                                       traj.log_probs[:, i], rtol=1e-5, atol=1e-5)
    for k in range(len(traj.indices)):
        loss, stats = policy_step_loss(unet, traj, k, torch.tensor([1.0, -1.0]), 5.0, clip_range=1e-4,
                                       advantage_clip=5.0, family=parts.family)
        torch.testing.assert_close(stats["ratio"], torch.ones(2), rtol=0, atol=2e-5)
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)


def test_stage_1s_denoising_loss_on_sdxl_reads_each_images_size_conditioning(sdxl):
    from diffusers import DDPMScheduler

    from longalign_rl.algorithms.denoising import denoising_loss_at

    encoder = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=120), resolution=64)
    cond = encoder([LONG, SHORT])
    scheduler = DDPMScheduler.from_config(sdxl.scheduler_config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    loss = denoising_loss_at(sdxl.unet, scheduler, latents, cond, t, noise, sdxl.family)
    assert torch.isfinite(loss)
    cropped = with_size(cond, torch.tensor([time_ids((96, 80), (16, 8), (64, 64))] * 2))
    assert cropped[0, -1, :6].tolist() == [96.0, 80.0, 16.0, 8.0, 64.0, 64.0]
    assert torch.equal(cropped[:, :-1], cond[:, :-1]) and torch.equal(cropped[:, -1, 6:], cond[:, -1, 6:])
    assert denoising_loss_at(sdxl.unet, scheduler, latents, cropped, t, noise, sdxl.family) != loss


def test_an_exported_sdxl_lora_loads_in_diffusers_and_reproduces_the_trained_denoiser(sdxl, tmp_path):
    import copy

    from diffusers import DDIMScheduler

    from longalign_rl.lora import export_for_diffusers, make_trainable

    cfg = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    trained = copy.deepcopy(sdxl)
    make_trainable(trained.unet, cfg)
    with torch.no_grad():
        for name, p in trained.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    export_for_diffusers(trained.unet, cfg, tmp_path / "lora")
    pipe = diffusers_pipeline(copy.deepcopy(sdxl), DDIMScheduler.from_config(sdxl.scheduler_config))
    pipe.load_lora_weights(tmp_path / "lora")
    cond = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=77), resolution=64)([SHORT])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = sdxl.family.predict(trained.unet.eval(), x, 500, cond)
        theirs = sdxl.family.predict(pipe.unet.eval(), x, 500, cond)
        base = sdxl.family.predict(sdxl.unet, x, 500, cond)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the prediction
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_sdxls_vae_stays_float32_when_fp16_is_asked_for(sdxl, tiny_parts):
    """SDXL's VAE overflows float16 to NaN images: its family keeps a VAE whose config says
    force_upcast in float32 (as StableDiffusionXLPipeline upcasts it); SD 1.x's goes to float16
    as before (its pipeline never upcasts), and decode casts the latents to whatever the VAE holds."""
    import copy

    from longalign_rl.vae import decode, placed

    def dtype_of(parts, dtype):
        vae = placed(copy.deepcopy(parts.vae), "cpu", dtype, parts.family.vae_fp16_overflows)
        return next(vae.parameters()).dtype

    assert sdxl.vae.config.force_upcast and sdxl.vae.config.scaling_factor == 0.13025
    assert dtype_of(sdxl, torch.float16) == torch.float32 and dtype_of(sdxl, torch.bfloat16) == torch.bfloat16
    assert dtype_of(tiny_parts, torch.float16) == torch.float16
    vae = placed(copy.deepcopy(sdxl.vae), "cpu", torch.float16, True)
    images = decode(vae, torch.randn(1, 4, 8, 8).half())
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize("resize", ["bicubic", "bilinear"])
def test_a_training_image_reports_its_original_size_and_crop(resize):
    """What stage 1 writes into SDXL's time ids: the original (height, width) and the top-left
    of the centre crop in the resized image, as diffusers' SDXL training scripts compute them."""
    import numpy as np

    from longalign_rl.data import to_training_image, training_crop

    image = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)  # landscape
    array, size = training_crop(image, 64, resize)
    assert array.shape == (3, 64, 64) and np.array_equal(array, to_training_image(image, 64, resize))
    # the shorter side to 64: 107 (PIL, rounded) or 106 (torchvision, truncated) wide; 21 cut on the left
    assert size == [120, 200, 0, 21]
    tall, tall_size = training_crop(image.transpose(1, 0, 2).copy(), 64, resize)
    assert tall_size[:2] == [200, 120] and tall_size[3] == 0 and tall_size[2] > 0


def test_a_third_party_family_registers_by_name_and_by_pipeline_class(sdxl):
    """Families are registered like rewards, algorithms and models: a plugin's subclass is
    found by name and by the pipeline class its folders name; anything else is refused."""
    from dataclasses import dataclass

    from longalign_rl.families import FAMILIES, SDXL, family_for_pipeline, find_family

    @dataclass(frozen=True)
    class Refiner(SDXL):
        name = "sdxl-refiner-like"
        pipeline_classes = ("MyXLPipeline",)

    FAMILIES.register("sdxl-refiner-like", Refiner)
    try:
        assert find_family("sdxl-refiner-like") is Refiner
        assert family_for_pipeline("MyXLPipeline", "here") is Refiner
        assert family_for_pipeline("StableDiffusionXLPipeline", "here") is SDXL
        FAMILIES.register("not-a-family", lambda: None)
        with pytest.raises(TypeError, match="not a subclass of longalign_rl.families.Family"):
            find_family("not-a-family")
    finally:
        FAMILIES.reset()
    with pytest.raises(ValueError, match="unknown model family 'sdxl-refiner-like'"):
        find_family("sdxl-refiner-like")


def test_stage_1s_update_gives_the_sdxl_unet_each_images_size_and_crop(sdxl):
    """training/denoising.update, the stage-1 micro-step the workers run: the UNet's time ids
    are each training image's original (height, width), crop top-left and the training size,
    whether its caption is kept (caption dropout 0) or dropped (1: the zero conditioning)."""
    import numpy as np
    from diffusers import DDPMScheduler

    from longalign_rl.data import training_crop
    from longalign_rl.training.denoising import update

    rng = np.random.default_rng(0)
    crops = [training_crop(rng.integers(0, 255, shape, dtype=np.uint8), 64) for shape in ((96, 80, 3), (64, 128, 3))]
    batch = {"image": np.stack([a for a, _ in crops]), "caption": np.array([LONG, SHORT], dtype=object),
             "size": np.array([size for _, size in crops])}
    assert batch["size"].tolist() == [[96, 80, 6, 0], [64, 128, 0, 32]]
    seen = []

    class Engine:  # what update needs of DeepSpeed's engine: a call, backward and step
        def __call__(self, *args, **kwargs):
            seen.append((kwargs["encoder_hidden_states"].clone(), kwargs["added_cond_kwargs"]["time_ids"].clone()))
            return sdxl.unet(*args, **kwargs)

        def parameters(self):
            return sdxl.unet.parameters()

        def backward(self, loss):
            assert torch.isfinite(loss)

        def step(self):
            pass

    encoder = sdxl.family.encoder(sdxl, PromptConfig(max_tokens=120), resolution=64)
    scheduler = DDPMScheduler.from_config(sdxl.scheduler_config)
    for dropout in (0.0, 1.0):
        generators = [torch.Generator().manual_seed(s) for s in (1, 2)]
        stats = update(Engine(), sdxl.vae, encoder, scheduler, batch, dropout, generators, "cpu", sdxl.family)
        assert torch.isfinite(stats["loss"]).all()
    (kept_tokens, kept_ids), (dropped_tokens, dropped_ids) = seen
    assert kept_tokens.abs().sum() > 0 and dropped_tokens.abs().sum() == 0
    expected = [[96.0, 80.0, 6.0, 0.0, 64.0, 64.0], [64.0, 128.0, 0.0, 32.0, 64.0, 64.0]]
    assert kept_ids.tolist() == dropped_ids.tolist() == expected
