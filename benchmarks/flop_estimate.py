"""FLOPs of one LongAlign stage-2 sample, counted (not guessed) on the meta device for any
model family at real size, with the run config's conditioning shapes and LoRA size, and the
GPU time they imply at a given utilisation.

The model is the family's real-size built-in architecture (random weights, no memory:
`sd15-random`, `sdxl-random`, `sd35-medium-random`, `flux-dev-random`), built through the
same code a run uses; the config gives the
resolution, the prompt encoding (max_tokens, the family's encoder run on meta tensors), the
steps and the LoRA. Forward FLOPs are counted with torch's FlopCounterMode: one guided
denoiser step of one sample (the family's guidance: classifier-free, two calls; FLUX's
embedding, one), the prompt's encoding (every text encoder, T5 included), the VAE decoder at the config's resolution, and a ViT-H/14 image
tower (HPSv2's and PickScore's architecture) at 224 px. The backward multipliers are the
usual ones and are printed with the result:
- denoiser at the gradient steps, LoRA (frozen base weights): backward ~ 1x forward
  (activation gradients only; LoRA weight gradients are < 1 %), plus 1x forward recomputed
  by activation checkpointing: 3x forward in all;
- denoiser, full fine-tuning: backward ~ 2x forward (activation and weight gradients), plus
  the recompute: 4x forward;
- VAE decode and reward (frozen, not checkpointed): forward + activation backward, 2x.

    .venv/bin/python benchmarks/flop_estimate.py [--config configs/sdxl_longalign.yaml] [--mfu 0.3 0.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from longalign_rl.config import load_config
from longalign_rl.families import default_family, find_family
from longalign_rl.lora import make_trainable
from longalign_rl.models import build_random, vae_scale_factor

REPO = Path(__file__).resolve().parent.parent
SD15 = REPO / "configs" / "sd15_longalign.yaml"
# The paper's stage 2: 3,750 steps x 48 samples on 6 A100s in about 20 hours.
PAPER = {"steps": 3750, "samples_per_step": 48, "gpu_hours": 120.0, "gpu": "A100 (312 dense bf16 TFLOP/s)"}


def forward_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def inspect(config: str | Path = SD15, model: str | None = None) -> dict:
    """The run config's model at real size on the meta device: its family, conditioning
    shape, LoRA layers and parameters, and forward FLOPs per sample (see the docstring).
    `model`: the built-in architecture; by default the real-size one of the config's family
    (model.family, SD 1.x when empty)."""
    import open_clip

    cfg = load_config(config)
    model = model or (find_family(cfg.model.family) if cfg.model.family else default_family()).real_size
    with torch.device("meta"):  # the modules; token ids stay real, every activation is meta
        parts = build_random(model)
        make_trainable(parts.unet, cfg.lora, family=parts.family)
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    family, res = parts.family, cfg.sampler.resolution
    encoder = family.encoder(parts, cfg.prompts, resolution=res, device="meta")
    prompt = ["A prompt. Of two sentences."]
    text_encode = forward_flops(lambda: encoder(prompt))  # token ids are real here, the encoders on meta
    cond = encoder(prompt)
    lora = [n for n, m in parts.unet.named_modules() if hasattr(m, "lora_A")]
    trainable = sum(p.numel() for p in parts.unet.parameters() if p.requires_grad)
    side = res // vae_scale_factor(parts.vae)
    channels = parts.vae.config.latent_channels
    with torch.device("meta"):
        latents = torch.empty(1, channels, side, side)  # one guided step (the family's: CFG's two calls, FLUX's one)
        context = torch.empty(1, *cond.shape[1:])
        return {
            "config": str(config), "model": model, "family": family.name, "resolution": res,
            "cond_shape": list(cond.shape), "lora_layers": len(lora), "lora_params": trainable,
            "unet_params": sum(p.numel() for n, p in parts.unet.named_parameters() if "lora_" not in n),
            "unet_guided_step": forward_flops(lambda: family.guided(parts.unet, latents, torch.tensor(500.0), context,
                                                                    context, cfg.sampler.guidance_scale)),
            "text_encode": text_encode,
            "vae_decode": forward_flops(lambda: parts.vae.decode(torch.empty(1, channels, side, side))),
            "reward_image": forward_flops(lambda: clip.encode_image(torch.empty(1, 3, 224, 224))),
            "steps": cfg.train.steps, "samples_per_step": cfg.global_batch,
            "num_steps": cfg.sampler.num_steps, "num_grad_steps": cfg.sampler.num_grad_steps,
            "policy_gradient": policy_gradient(cfg),
        }


def policy_gradient(cfg) -> dict | None:
    """A policy-gradient run's trainer work (GRPO, DDPO): its trained steps per sample, whether
    a KL reference pass runs, its PPO epochs; None for reward backpropagation."""
    from longalign_rl.algorithms.policy_gradient import PolicyGradient, trained_steps
    from longalign_rl.registry import algorithm_of

    if not isinstance(algorithm_of(cfg), PolicyGradient):
        return None
    return {"trained_steps": trained_steps(cfg), "kl": cfg.algorithm.kl_weight > 0,
            "inner_epochs": cfg.algorithm.inner_epochs}


def count(config: str | Path = SD15, model: str | None = None) -> dict[str, float]:
    """Forward FLOPs per sample (`inspect`'s): unet_guided_step, vae_decode, reward_image."""
    found = inspect(config, model)
    return {k: found[k] for k in ("unet_guided_step", "text_encode", "vae_decode", "reward_image")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.5],
                        help="assumed shares of peak FLOP/s (replace with gpu_benchmark.py's measurement)")
    parser.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak of the GPU (A100: 312)")
    parser.add_argument("--config", default=str(SD15), help="a run config (its model family, resolution, "
                        "prompts, sampler steps, LoRA and train steps)")
    parser.add_argument("--model", default=None, help="the built-in architecture (default: the family's real size)")
    args = parser.parse_args()

    f = inspect(args.config, args.model)
    steps, grad_steps = f["num_steps"], f["num_grad_steps"]
    print(f"{f['config']}: {f['model']} (family {f['family']}) at {f['resolution']} px, on the meta device")
    print(f"  conditioning per prompt      {f['cond_shape'][1:]} (tokens, width)")
    print(f"  denoiser parameters          {f['unet_params'] / 1e9:.3f} B")
    print(f"  LoRA                         {f['lora_layers']} layers, {f['lora_params'] / 1e6:.1f} M parameters")
    sampling = steps * f["unet_guided_step"]
    pg = f["policy_gradient"]
    if pg is not None:  # the trained steps' recompute, fwd + bwd each, a KL reference forward; the reward forward only
        per_step = lambda backward: (1 + backward + int(pg["kl"])) * f["unet_guided_step"]  # noqa: E731
        train = {name: pg["inner_epochs"] * pg["trained_steps"] * per_step(backward)
                 + f["vae_decode"] + f["reward_image"] for name, backward in (("LoRA", 2), ("full", 3))}
        grad_steps = pg["trained_steps"]
        print(f"  policy gradient              {grad_steps} trained steps per sample, "
              f"{pg['inner_epochs']} epoch(s), KL reference pass: {pg['kl']}")
    else:
        train = {
            "LoRA": grad_steps * 3 * f["unet_guided_step"] + 2 * (f["vae_decode"] + f["reward_image"]),
            "full": grad_steps * 4 * f["unet_guided_step"] + 2 * (f["vae_decode"] + f["reward_image"]),
        }
    # The reference runs the whole 50-step chain in the trainer (45 steps without grad).
    reference_lora = f["text_encode"] + (steps - grad_steps) * f["unet_guided_step"] + train["LoRA"]
    print("forward TFLOP per sample, counted on the meta device:")
    for k in ("unet_guided_step", "text_encode", "vae_decode", "reward_image"):
        print(f"  {k:<18} {f[k] / 1e12:8.3f}")
    sampling += f["text_encode"]
    print(f"sampling (the prompt encoded, {steps} guided steps, no grad): {sampling / 1e12:.2f} TFLOP/sample")
    what = ("fwd+recompute+bwd" + (" + the KL reference fwd" if pg and pg["kl"] else "") + ", decode+reward fwd" if pg
            else "fwd+recompute+bwd, decode+reward fwd+bwd")
    for k, v in train.items():
        print(f"trainer step, {k} ({grad_steps} {'trained' if pg else 'grad'} steps {what}): "
              f"{v / 1e12:.2f} TFLOP/sample")
    ours = sampling + train["LoRA"]
    if pg:
        print(f"total per sample, LoRA: {ours / 1e12:.2f} TFLOP; {100 * sampling / ours:.0f}% of it in the "
              "gradient-free samplers")
    else:
        print(f"total per sample, LoRA: {ours / 1e12:.2f} TFLOP; the reference's single chain: "
              f"{reference_lora / 1e12:.2f} TFLOP. Replay costs {100 * (ours / reference_lora - 1):.0f}% more "
              f"(the gradient steps' forward runs in the sampler and again in the trainer) and moves "
              f"{100 * sampling / ours:.0f}% of the FLOPs to gradient-free samplers")
    total = f["steps"] * f["samples_per_step"] * (sampling + train["LoRA"])
    print(f"this config's run: {f['steps']} x {f['samples_per_step']} samples = {total / 1e18:.1f} EFLOP "
          f"(the paper's SD 1.5 run: {PAPER['steps']} x {PAPER['samples_per_step']} in about "
          f"{PAPER['gpu_hours']:.0f} {PAPER['gpu']}-hours)")
    for mfu in args.mfu:
        per_gpu = args.peak_tflops * 1e12 * mfu / (sampling + train["LoRA"])
        hours = total / (args.peak_tflops * 1e12 * mfu) / 3600
        print(f"  at {100 * mfu:.0f}% of {args.peak_tflops:.0f} TFLOP/s: {per_gpu:.2f} samples/s per GPU, "
              f"{hours:.0f} GPU-hours")


if __name__ == "__main__":
    main()
