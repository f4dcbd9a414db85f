"""FLOPs of one LongAlign stage-2 sample at SD v1.5 size, counted (not guessed) on the meta
device, and the GPU time they imply at a given utilisation.

Forward FLOPs are counted with torch's FlopCounterMode on meta tensors (no memory, no GPU):
SD v1.5's UNet at 64x64 latents with a 240-token context (one guided step = batch 2), the
VAE decoder at 512 px, and a ViT-H/14 image tower (HPSv2's architecture) at 224 px. The
backward multipliers are the usual ones and are printed with the result:
- UNet at the gradient steps, LoRA (frozen base weights): backward ~ 1x forward
  (activation gradients only; LoRA weight gradients are < 1 %), plus 1x forward recomputed
  by activation checkpointing: 3x forward in all;
- UNet, full fine-tuning: backward ~ 2x forward (activation and weight gradients), plus
  the recompute: 4x forward;
- VAE decode and reward (frozen, not checkpointed): forward + activation backward, 2x.

    .venv/bin/python benchmarks/flop_estimate.py [--mfu 0.3 0.5] [--peak-tflops 312]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from longalign_rl.models import _read_config

# The paper's stage 2: 3,750 steps x 48 samples on 6 A100s in about 20 hours.
PAPER = {"steps": 3750, "samples_per_step": 48, "gpu_hours": 120.0, "gpu": "A100 (312 dense bf16 TFLOP/s)"}


def forward_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count() -> dict[str, float]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import open_clip

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_read_config("sd15-random", "unet"))
        vae = AutoencoderKL(**_read_config("sd15-random", "vae"))
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
        latents = torch.empty(2, 4, 64, 64)  # one guided step: uncond + cond
        context = torch.empty(2, 240, 768)
        return {
            "unet_guided_step": forward_flops(lambda: unet(latents, 500, encoder_hidden_states=context)),
            "vae_decode": forward_flops(lambda: vae.decode(torch.empty(1, 4, 64, 64))),
            "reward_image": forward_flops(lambda: clip.encode_image(torch.empty(1, 3, 224, 224))),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.3, 0.5],
                        help="assumed shares of peak FLOP/s (replace with gpu_benchmark.py's measurement)")
    parser.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak of the GPU (A100: 312)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--grad-steps", type=int, default=5)
    args = parser.parse_args()

    f = count()
    sampling = args.steps * f["unet_guided_step"]
    train = {
        "LoRA": args.grad_steps * 3 * f["unet_guided_step"] + 2 * (f["vae_decode"] + f["reward_image"]),
        "full": args.grad_steps * 4 * f["unet_guided_step"] + 2 * (f["vae_decode"] + f["reward_image"]),
    }
    # The reference runs the whole 50-step chain in the trainer (45 steps without grad).
    reference_lora = (args.steps - args.grad_steps) * f["unet_guided_step"] + train["LoRA"]
    print("forward TFLOP per sample, counted on the meta device:")
    for k, v in f.items():
        print(f"  {k:<18} {v / 1e12:8.3f}")
    print(f"sampling ({args.steps} guided steps, no grad): {sampling / 1e12:.2f} TFLOP/sample")
    for k, v in train.items():
        print(f"trainer step, {k} ({args.grad_steps} grad steps fwd+recompute+bwd, decode+reward fwd+bwd): "
              f"{v / 1e12:.2f} TFLOP/sample")
    ours = sampling + train["LoRA"]
    print(f"total per sample, LoRA: {ours / 1e12:.2f} TFLOP; the reference's single chain: "
          f"{reference_lora / 1e12:.2f} TFLOP. Replay costs {100 * (ours / reference_lora - 1):.0f}% more "
          f"(the gradient steps' forward runs in the sampler and again in the trainer) and moves "
          f"{100 * sampling / ours:.0f}% of the FLOPs to gradient-free samplers")
    total = PAPER["steps"] * PAPER["samples_per_step"] * (sampling + train["LoRA"])
    print(f"paper run: {PAPER['steps']} x {PAPER['samples_per_step']} samples = {total / 1e18:.1f} EFLOP")
    for mfu in args.mfu:
        per_gpu = args.peak_tflops * 1e12 * mfu / (sampling + train["LoRA"])
        hours = total / (args.peak_tflops * 1e12 * mfu) / 3600
        print(f"  at {100 * mfu:.0f}% of {args.peak_tflops:.0f} TFLOP/s: {per_gpu:.2f} samples/s per GPU, "
              f"{hours:.0f} GPU-hours (paper: about {PAPER['gpu_hours']:.0f} {PAPER['gpu']}-hours)")


if __name__ == "__main__":
    main()
