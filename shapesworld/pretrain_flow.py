"""Make the shipped ShapesWorld flow model: an SD3-class transformer (the MMDiT of SD3 /
SD3.5, flow matching) trained here on the world, on the shipped base's VAE and text
encoder, the way SD3 was trained: on captions cut at 77 tokens.

    python -m shapesworld.pretrain_flow                 # writes shapesworld/weights/shapesworld-flow/
    python -m shapesworld.pretrain_flow --quick --out /tmp/w   # seconds, for tests

Writes `<out>/shapesworld-flow/`, a complete diffusers folder that
`StableDiffusion3Pipeline.from_pretrained` loads (weights in float16), with a
`report.json` of how it was made and what it scores. The parts:

- `vae/`: the shipped ShapesWorld VAE (32 px -> 4 x 8 x 8), with `shift_factor` 0.0 in its
  config (SD3's pipeline shifts latents by it; SD 1.x's VAE has none).
- `text_encoder/`, `text_encoder_2/`: the shipped ShapesWorld text encoder (a
  CLIPTextModel of width 64) as both of SD3's `CLIPTextModelWithProjection`s, each with
  a seeded random projection for the pooled vector (64 + 64 = 128). SD3 reads their
  penultimate hidden states, concatenated per token: 128 wide, the joint width.
- no T5 (`text_encoder_3` absent: diffusers' `text_encoder_3=None`). The pipeline's T5
  tokens are then zeros; this model was trained with one of them (`max_sequence_length=1`,
  `prompts.t5_max_tokens: 1` in the configs), so the caption reaches it through the CLIPs
  alone: the case where SD3 loses most from the 77-token cut.
- `transformer/`: an `SD3Transformer2DModel` (patch 1 on the 8 x 8 latents, 4 joint
  blocks of width 128, about 3 M parameters) trained from a seed with the flow-matching
  loss as diffusers' SD3 training script trains it (logit-normal sigmas, velocity
  target, algorithms/denoising.py), conditioned on the plain 77-token encoding of each
  caption (`prompts.split: none`), caption dropout 0.1, EMA 0.999. Cells 3-4's colours
  and shapes are past token 77, so it never sees them. Half the captions are cut after a
  random number of their sentences (`shortened`), so that it sees texts of every length as
  SD3 did; trained on whole captions only, its pooled vector is always the <eot> state at
  token 77, and segment encoding's (the first segment's) throws it far off (loss 1.26
  against 0.14 truncated and 0.23 unconditional, measured on that first model).
- `scheduler/`: FlowMatchEulerDiscreteScheduler, shift 1 (SD3's 3 is for 1024 px; these
  images are 32 px).

Stage 1 then runs through the framework (configs/shapesworld_flow_stage1.yaml), and
`python -m shapesworld.ship_model` ships its transformer as `shapesworld-flow-partial`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shapesworld.evaluate import T5_TOKENS
from shapesworld.plugin import SHIPPED_BASE, WEIGHTS_DIR
from shapesworld.pretrain import EVAL_SEED, WORLD, encode_captions, encode_latents, scenes

NAME = "shapesworld-flow"
TRANSFORMER = dict(
    sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
    pos_embed_max_size=8,
)
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


@dataclass
class Budget:
    """Optimiser steps and batch size; the same seed and steps give the same weights on the
    same machine."""

    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50  # linear warm-up steps, as transformers are usually trained
    shortened: float = 0.5  # captions cut after a random number of their sentences (`shortened`)
    pool: int = 16384  # scenes rendered and encoded once, then sampled from

    @classmethod
    def quick(cls) -> "Budget":
        return cls(steps=4, batch=8, pool=64, warmup=2)


def shortened(captions: list[str], fraction: float, seed: int) -> list[str]:
    """`fraction` of the captions cut after their first k sentences, k uniform from 1 (the
    preamble alone) to all: captions of every length, as SD3 saw them. Without them every
    pooled vector it trains on is the <eot> state at token 77 of a cut caption, and the
    pooled vector of a shorter text (segment encoding's first segment) is one it never saw."""
    from longalign_rl.encoding import split_sentences

    rng = np.random.default_rng(seed + 7)
    out = []
    for text in captions:
        sentences = split_sentences(text)
        if rng.random() < fraction:
            sentences = sentences[: rng.integers(1, len(sentences) + 1)]
        out.append(" ".join(sentences))
    return out


def base_parts(seed: int):
    """The shipped base's VAE (with a shift factor), its text encoder as SD3's two CLIPs
    with projections, and a new transformer: models.Components of family sd3."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    from longalign_rl.encoding.tokenizer import build_clip_tokenizer
    from longalign_rl.families.sd3 import SD3
    from longalign_rl.models import Components

    base = WEIGHTS_DIR / SHIPPED_BASE
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    encoders = []
    for k in range(2):
        torch.manual_seed(seed + 10 + k)  # the projections (the base's encoder has none)
        encoders.append(CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder",
                                                                    dtype=torch.float32).eval().requires_grad_(False))
    vae.eval().requires_grad_(False)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TRANSFORMER)
    family = SD3(pooled_dim=TRANSFORMER["pooled_projection_dim"], joint_dim=TRANSFORMER["joint_attention_dim"])
    return Components(transformer, vae, encoders[0], build_clip_tokenizer(), dict(SCHEDULER), family=family,
                      text_encoder_2=encoders[1], tokenizer_2=build_clip_tokenizer(pad_token="!"))


def train(parts, latents, cond, uncond, budget: Budget, seed: int, log) -> dict:
    """The flow-matching loss with caption dropout; the transformer ends with its EMA weights."""
    from diffusers.training_utils import EMAModel

    from longalign_rl.algorithms.denoising import caption_dropout, denoising_loss

    model, scheduler = parts.unet, parts.family.training_scheduler(parts.scheduler_config)
    model.train().requires_grad_(True)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True)
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / budget.warmup))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(budget.steps):
        pick = torch.randint(len(latents), (budget.batch,), generator=g)
        c = caption_dropout(cond[pick], uncond, 0.1, generator=g)
        loss, _ = denoising_loss(model, scheduler, latents[pick], c, generator=g, family=parts.family)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        ema.step(model.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"transformer step {step}: loss {np.mean(losses[-50:]):.4f}")
    ema.copy_to(model.parameters())
    model.eval().requires_grad_(False)
    return {"steps": budget.steps, "batch": budget.batch, "lr": budget.lr, "warmup": budget.warmup,
            "final_loss": float(np.mean(losses[-100:]))}


def save(parts, folder: Path) -> None:
    """The complete diffusers folder, float16 weights (loaded back as float32 by
    models.load_pretrained)."""
    pipe = parts.family.pipeline(parts, parts.family.model_scheduler(parts.scheduler_config))
    modules = [parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2]
    for m in modules:
        m.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    for m in modules:
        m.to(torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.pretrain_flow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help=f"folder for {NAME}/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds instead of minutes (tests)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--eval", type=int, default=256, help="held-out captions to evaluate on (0: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget.quick() if args.quick else Budget()
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    from longalign_rl.config import PromptConfig
    from shapesworld.evaluate import draw_captions, evaluate

    parts = base_parts(args.seed)
    images, captions = scenes(budget.pool, seed=args.seed)  # the base UNet's pool
    captions = shortened(captions, budget.shortened, seed=args.seed)
    truncated = parts.family.encoder(parts, PromptConfig(max_tokens=77, split="none", t5_max_tokens=T5_TOKENS),
                                     resolution=WORLD.image_size)
    latents, cond = encode_latents(parts.vae, images), encode_captions(truncated, captions)
    report: dict = {"seed": args.seed, "quick": args.quick, "made_by": "python -m shapesworld.pretrain_flow"
                    + (" --quick" if args.quick else ""), "transformer": TRANSFORMER, "scheduler": SCHEDULER,
                    "transformer_parameters": sum(p.numel() for p in parts.unet.parameters()),
                    "conditioning": f"the plain 77-token encoding (prompts.split none), T5 tokens {T5_TOKENS} zeros; "
                                    f"{budget.shortened:.0%} of the captions cut after 1 to all of their sentences"}
    log(f"{report['transformer_parameters'] / 1e6:.2f} M transformer parameters; conditioning {tuple(cond.shape)}")
    report["training"] = train(parts, latents, cond, truncated.uncond(1)[0], budget, args.seed + 4, log)
    report["seconds_training"] = round(time.perf_counter() - start, 1)
    folder = Path(args.out) / NAME
    save(parts, folder)
    log(f"saved to {folder}")
    if args.eval:
        prompts = draw_captions(WORLD, args.eval, seed=EVAL_SEED)
        report["eval"] = {"captions": args.eval, "seed": EVAL_SEED, "num_steps": 10, "guidance_scale": 5.0}
        for encoding in ("truncated", "segment"):
            _, report["eval"][encoding] = evaluate(parts, encoding, prompts, seed=EVAL_SEED, num_steps=10,
                                                   guidance_scale=5.0)
            log(f"{encoding} encoding: {report['eval'][encoding]}")
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"done; report in {folder / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
