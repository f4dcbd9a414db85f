"""GPU benchmark without Ray: our sampler against diffusers' pipeline, and one trainer step.

Runs the code the actors and trainer workers run (`Sampler`, `reward_backprop_step`), on a
model family's architecture with random weights (`sd15-random`, `sdxl-random`,
`sd35-medium-random`, `flux-dev-random`: no download), so it fits on a machine where Ray
cannot be installed. On the CPU it runs at tiny size as a check (`tiny`, `tiny-sdxl`,
`tiny-sd3`, `tiny-flux`).

1. Sampling: images/s of our `Sampler` (segment-encoded 240-token prompts, DDIM, guidance,
   recording the gradient steps) against the family's diffusers pipeline
   (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`,
   `FluxPipeline`) given the same embeddings
   (Family.pipeline_inputs), scheduler, steps, guidance and starting noise
   (`output_type="latent"`, so neither decodes). Rounds alternate between the two; medians
   are compared.
2. Training: time and peak memory of one reward-backprop step (replay of the gradient
   steps with activation checkpointing, VAE decode, decomposed reward, backward, AdamW) for
   a rank-32 LoRA and for full fine-tuning; FLOPs counted with torch's FlopCounterMode, as
   a share of the card's peak dense bf16 FLOP/s (`--peak-tflops`, default by card name).

    python benchmarks/gpu_benchmark.py --out $OUT/gpu.json                 # GPU, SD v1.5 size
    python benchmarks/gpu_benchmark.py --model sdxl-random --resolution 1024 --guidance 5 \\
        --batch 4 --out $OUT/gpu_sdxl.json                                 # GPU, SDXL size
    python benchmarks/gpu_benchmark.py --model sd35-medium-random --resolution 512 --steps 28 \
        --grad-steps 4 --guidance 4.5 --batch 4 --out $OUT/gpu_sd35.json    # GPU, SD3.5 medium
    python benchmarks/gpu_benchmark.py --model flux-dev-random --resolution 512 --steps 28 \
        --grad-steps 4 --guidance 3.5 --batch 1 --out $OUT/gpu_flux.json    # GPU (H200), FLUX.1-dev
    python benchmarks/gpu_benchmark.py --model tiny --resolution 64 --steps 10 --grad-steps 2 \\
        --batch 2 --reward tiny --dtype fp32 --rounds 2                     # CPU check (tiny-sdxl too)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from longalign_rl.algorithms.reward_backprop import reward_backprop_step
from longalign_rl.config import LoRAConfig, PromptConfig, SamplerConfig
from longalign_rl.lora import make_trainable
from longalign_rl.models import DTYPES, load_components, vae_scale_factor
from longalign_rl.prompts import load_prompts
from longalign_rl.sampling.sampler import build_sampler
from longalign_rl.vae import placed

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_reward(name: str, device):
    """A CLIP-type decomposed reward: random ViT-H/14 (HPSv2's architecture) or tiny."""
    if name == "tiny":
        from rewards.tiny import tiny_openclip

        return tiny_openclip().to(device)
    import open_clip

    from rewards.decomposed import ClipTypeReward
    from rewards.hps import OpenClipBackend

    model = open_clip.create_model("ViT-H-14", pretrained=None)
    return ClipTypeReward(OpenClipBackend(model, open_clip.get_tokenizer("ViT-H-14"))).to(device)


def bench_sampling(args, parts, device, dtype) -> dict:
    settings = SamplerConfig(num_steps=args.steps, guidance_scale=args.guidance, resolution=args.resolution,
                             num_grad_steps=args.grad_steps, timestep_spacing="trailing", precision=args.dtype)
    sampler = build_sampler(settings, parts, prompts=PromptConfig(max_tokens=240), device=device)
    unet, encoder = sampler.unet, sampler.encoder
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    parts.vae.to(device, dtype)
    pipe = parts.family.pipeline(parts, parts.family.scheduler(parts.scheduler_config, timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    prompts = (load_prompts("demo") * 8)[: args.batch]
    embeds = parts.family.pipeline_inputs(encoder(prompts), encoder.uncond(1))
    size, channels = args.resolution // vae_scale_factor(parts.vae), parts.vae.config.latent_channels

    def ours(seed):
        sampler.sample(prompts, seed)

    def diffusers_pipe(seed):
        latents = torch.randn(args.batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            pipe(**embeds, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, height=args.resolution, width=args.resolution,
                 latents=parts.family.to_pipeline_latents(latents.to(device, dtype)), output_type="latent")

    runs = {"ours": ours, "diffusers": diffusers_pipe}
    if args.compile:
        sampler.unet = torch.compile(unet)
    for fn in runs.values():  # warm-up
        fn(0)
    times = {k: [] for k in runs}
    for r in range(args.rounds):
        for name, fn in runs.items():
            sync(device)
            t = time.perf_counter()
            fn(r + 1)
            sync(device)
            times[name].append(time.perf_counter() - t)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    return {"images_per_s": ips, "ratio_ours_over_diffusers": ips["ours"] / ips["diffusers"],
            "rollout": sampler.sample(prompts, 123)}


def bench_train_step(args, model, lora: bool, rollout, device, dtype) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    parts = load_components(model)
    unet = parts.unet.to(device)
    params = make_trainable(unet, LoRAConfig(enabled=lora, rank=32, alpha=32.0, dropout=0.0), family=parts.family)
    unet = unet.to(dtype).train()
    unet.enable_gradient_checkpointing()
    vae = placed(parts.vae, device, dtype, parts.family.vae_fp16_overflows)
    reward = build_reward(args.reward, device)
    optimizer = torch.optim.AdamW(params, lr=3e-5)

    def step():
        loss, _ = reward_backprop_step(unet, vae, reward, rollout, args.guidance, family=parts.family)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (optimizer state allocated)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.rounds):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    with FlopCounterMode(display=False) as counter:
        step()
    seconds = statistics.median(times)
    result = {"seconds": seconds, "peak_memory_gib": peak, "tflop": counter.get_total_flops() / 1e12,
              "trainable_params": sum(p.numel() for p in params)}
    result["achieved_tflops"] = result["tflop"] / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--grad-steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (SD 1.5: 7.5; SDXL: 5)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--reward", default="vit-h-14", choices=["vit-h-14", "tiny"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our sampler's UNet")
    parser.add_argument("--train-batch", type=int, default=2, help="samples per trainer step")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in card), float("nan"))
    torch.backends.cuda.matmul.allow_tf32 = True

    t = time.perf_counter()
    parts = load_components(args.model)
    results = {"card": card, "args": vars(args), "build_seconds": time.perf_counter() - t}
    sampling = bench_sampling(args, parts, device, dtype)
    rollout = sampling.pop("rollout")
    results["sampling"] = sampling
    print(f"[{card}] sampling {args.batch} x {args.resolution} px, {args.steps} steps: "
          f"ours {sampling['images_per_s']['ours']:.2f} img/s, diffusers {sampling['images_per_s']['diffusers']:.2f} img/s, "
          f"ratio {sampling['ratio_ours_over_diffusers']:.2f}x", flush=True)
    del parts

    for k in ("cond", "grad_latents", "grad_eps", "final_latents"):  # a smaller trainer batch
        setattr(rollout, k, getattr(rollout, k)[: args.train_batch])
    rollout.prompts = rollout.prompts[: args.train_batch]
    for name, lora in (("lora_r32", True), ("full", False)):
        r = bench_train_step(args, args.model, lora, rollout, device, dtype)
        r["share_of_peak"] = r["achieved_tflops"] / peak
        results[f"train_{name}"] = r
        print(f"[{card}] train step ({name}, batch {args.train_batch}, {args.grad_steps} grad steps): "
              f"{r['seconds']:.3f} s, peak {r['peak_memory_gib']:.1f} GiB, {r['tflop']:.3g} TFLOP, "
              f"{r['achieved_tflops']:.3g} TFLOP/s = {100 * r['share_of_peak']:.1f}% of {peak} peak", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
