"""Make the shipped ShapesWorld models: a tiny VAE, text encoder and UNet of SD v1.5's
classes, trained here from a seed, then the same UNet after stage 1.

    python -m shapesworld.pretrain                 # writes shapesworld/weights/
    python -m shapesworld.pretrain --quick --out /tmp/w   # seconds, for tests

Writes `<out>/shapesworld/` (the base: vae/, text_encoder/, unet/, scheduler/, stored in
float16) and `<out>/shapesworld-stage1/` (the stage-1 UNet, with the base's other parts),
each with a `report.json` of how it was made and what it scores. Parts are trained in
order, each frozen before the next:

1. VAE: 32 px images -> 4 x 8 x 8 latents (two downsamplings), L1 reconstruction plus a
   small KL term. Its scaling factor is 1 / std of the latents, as SD's 0.18215 was chosen.
2. Text encoder: a CLIPTextModel with CLIP's vocabulary, trained briefly so that its
   token states carry the sentence content: from every token state, linear heads read
   the token itself and which sentence of the caption it belongs to. It sees whole
   captions (cut at 77 tokens) and single sentences, as CLIP saw captions of every length.
   A random encoder does not work: a UNet trained on it learns to ignore the text.
3. Base UNet, trained the way SD v1.5 was: epsilon prediction on SD's noise schedule,
   conditioned on the plain 77-token encoding of the caption in its natural order, caption
   dropout 0.1. The colours and shapes of the last two cells are past token 77, so this
   UNet has never seen them in its conditioning.
4. Stage 1 (docs/method.md section 4): the base UNet fine-tuned with the same loss on
   segment-encoded captions (all cells visible), full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longalign_rl.algorithms.denoising import caption_dropout, denoising_loss
from longalign_rl.encoding import SegmentEncoder, TruncatedEncoder, split_sentences
from shapesworld.plugin import WEIGHTS_DIR
from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from shapesworld.evaluate import SEGMENT_MAX_TOKENS
from shapesworld.world import WorldConfig, caption, render, sample_scene, to_tensor

WORLD = WorldConfig()  # 32 px, 2 x 2 cells, 7 colours, 3 shapes

# SD v1.5's noise schedule (its scheduler_config.json), epsilon prediction.
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[16, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
)
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[64, 128],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
)


@dataclass
class Budget:
    """Optimiser steps per part and batch sizes. The full run takes about 25 minutes on one
    CPU thread; the same seed and steps give the same weights on the same machine."""

    vae: int = 400
    text: int = 300
    unet: int = 900
    stage1: int = 450
    batch: int = 64
    vae_batch: int = 32
    pool: int = 16384  # scenes rendered and encoded once, then sampled from

    @classmethod
    def quick(cls) -> "Budget":
        return cls(vae=4, text=4, unet=4, stage1=3, batch=8, vae_batch=4, pool=64)


def scenes(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n rendered scenes as float [n, 3, 32, 32] in [0, 1], and their captions."""
    rng = np.random.default_rng(seed)
    drawn = [sample_scene(WORLD, rng) for _ in range(n)]
    images = torch.stack([to_tensor(render(s, WORLD)) for s in drawn])
    return images, [caption(s, WORLD) for s in drawn]


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


# ---------------------------------------------------------------- 1. VAE


def train_vae(images: torch.Tensor, budget: Budget, log) -> tuple[torch.nn.Module, dict]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE)
    opt = _optimizer(vae.parameters(), 1e-3)
    g = torch.Generator().manual_seed(1)
    steps = 0
    for steps in range(budget.vae):
        x = images[torch.randint(len(images), (budget.vae_batch,), generator=g)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps % 50 == 0:
            log(f"vae step {steps}: loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held_out = images[-256:]  # from the pool (any image could be drawn in training)
        latents = vae.encode(held_out * 2 - 1).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        recon = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        pixel_error = (recon - held_out).abs().amax(1)  # worst channel per pixel
    stats = {"steps": steps + 1, "scaling_factor": vae.config.scaling_factor,
             "mean_abs_error": float((recon - held_out).abs().mean()),
             "pixels_off_by_over_half": float((pixel_error > 0.5).float().mean())}
    return vae, stats


# ---------------------------------------------------------------- 2. text encoder


def _sentence_labels(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """For token ids [N, 77]: the index of the sentence each token is in (0 = the first),
    -1 at <sot> and padding. Sentences end at a "." token."""
    labels = torch.full_like(ids, -1)
    for row in range(ids.shape[0]):
        sentence = 0
        for pos in range(1, ids.shape[1]):
            if ids[row, pos] == eos:
                break
            labels[row, pos] = sentence
            if ids[row, pos] == PERIOD_ID:
                sentence += 1
    return labels


PERIOD_ID = 269  # "." in CLIP's vocabulary (checked in train_text_encoder)


def train_text_encoder(captions: list[str], tokenizer, budget: Budget, log) -> tuple[torch.nn.Module, dict]:
    from transformers import CLIPTextConfig, CLIPTextModel

    if tokenizer.convert_tokens_to_ids(".</w>") != PERIOD_ID:
        raise RuntimeError("the CLIP tokenizer's id of '.' is not the expected one")
    encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    # Whole captions (cut at 77 tokens, sentence index of each token) and single sentences
    # (their index in the caption they came from).
    full = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    full_labels = _sentence_labels(full, tokenizer.eos_token_id)
    singles, single_index = [], []
    for text in captions[: max(1, len(captions) // 4)]:
        for i, sentence in enumerate(split_sentences(text)):
            singles.append(sentence)
            single_index.append(i)
    one = tokenizer(singles, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    one_labels = torch.where(one == tokenizer.eos_token_id, -1, torch.tensor(single_index)[:, None])
    one_labels[:, 0] = -1
    ids, sentence_labels = torch.cat([full, one]), torch.cat([full_labels, one_labels])

    vocab = torch.unique(ids)  # the world's words (and <sot>, <eot>)
    token_labels = torch.searchsorted(vocab, ids)
    token_labels = torch.where(sentence_labels >= 0, token_labels, -100)
    sentence_labels = torch.where(sentence_labels >= 0, sentence_labels, -100)
    n_sentences = int(sentence_labels.max()) + 1
    heads = torch.nn.ModuleDict({"token": torch.nn.Linear(TEXT_ENCODER["hidden_size"], len(vocab)),
                                 "sentence": torch.nn.Linear(TEXT_ENCODER["hidden_size"], n_sentences)})
    opt = _optimizer([*encoder.parameters(), *heads.parameters()], 1e-3)
    g = torch.Generator().manual_seed(2)
    steps, accuracy = 0, {}
    for steps in range(budget.text):
        pick = torch.randint(len(ids), (budget.batch,), generator=g)
        states = encoder(ids[pick])[0]
        losses, accuracy = [], {}
        for name, labels in (("token", token_labels[pick]), ("sentence", sentence_labels[pick])):
            logits = heads[name](states)
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
            mask = labels >= 0
            accuracy[name] = float((logits.argmax(-1) == labels)[mask].float().mean())
        loss = sum(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps % 100 == 0:
            log(f"text encoder step {steps}: loss {loss.item():.4f} accuracy {accuracy}")
    encoder.eval().requires_grad_(False)
    return encoder, {"steps": steps + 1, "world_vocabulary": len(vocab), "last_batch_accuracy": accuracy}


# ---------------------------------------------------------------- 3-4. UNet


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Latents of every pooled scene (a posterior sample, scaled), as the UNet is trained on."""
    from longalign_rl.vae import encode as encode_images

    g = torch.Generator().manual_seed(3)
    return torch.cat([encode_images(vae, images[i : i + chunk], g) for i in range(0, len(images), chunk)])


def encode_captions(encoder, captions: list[str], chunk: int = 512) -> torch.Tensor:
    return torch.cat([encoder(captions[i : i + chunk]) for i in range(0, len(captions), chunk)])


def train_unet(unet, scheduler, latents, cond, uncond, steps: int, batch: int, lr: float, seed: int, log, tag: str):
    """The denoising loss with caption dropout; returns the EMA weights' UNet and stats."""
    from diffusers.training_utils import EMAModel

    unet.train().requires_grad_(True)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    opt = _optimizer(unet.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=g)
        c = caption_dropout(cond[pick], uncond, 0.1, generator=g)
        loss, _ = denoising_loss(unet, scheduler, latents[pick], c, generator=g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if step % 50 == 0:
            log(f"{tag} step {step}: loss {np.mean(losses[-50:]):.4f}")
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    return {"steps": steps, "batch": batch, "lr": lr, "final_loss": float(np.mean(losses[-100:]))}


def evaluate_parts(unet, vae, tokenizer, text_encoder, n: int, log, tag: str) -> dict:
    """Ground truth per cell position, truncated and segment encoding, n held-out captions."""
    from longalign_rl.families import SD
    from longalign_rl.models import Components
    from shapesworld.evaluate import draw_captions, evaluate

    parts = Components(unet, vae, text_encoder, tokenizer, SCHEDULER, family=SD())
    prompts = draw_captions(WORLD, n, seed=EVAL_SEED)
    result = {}
    for encoding in ("truncated", "segment"):
        _, result[encoding] = evaluate(parts, encoding, prompts, seed=EVAL_SEED, cfg=WORLD)
        log(f"{tag}, {encoding} encoding: {result[encoding]}")
    return result


EVAL_SEED = 12345  # held-out captions: no training pool uses this seed


def save_part(module, directory: Path) -> None:
    """float16 safetensors (the shipped size), loaded back as float32 by models.load_pretrained."""
    module.to(torch.float16).save_pretrained(directory, safe_serialization=True)
    module.to(torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for shapesworld/ and shapesworld-stage1/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="seconds per part instead of minutes (tests)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--eval", type=int, default=256, help="captions to evaluate each UNet on (0: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget.quick() if args.quick else Budget()
    out = Path(args.out)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(args.seed)
    images, captions = scenes(budget.pool, seed=args.seed)
    report: dict = {"seed": args.seed, "quick": args.quick, "world": "WorldConfig() defaults: 32 px, 2 x 2 cells"}
    vae, report["vae"] = train_vae(images, budget, log)
    log(f"vae: {report['vae']}")
    tokenizer = build_clip_tokenizer()
    text_encoder, report["text_encoder"] = train_text_encoder(captions, tokenizer, budget, log)
    log(f"text encoder: {report['text_encoder']}")

    scheduler = DDIMScheduler.from_config(SCHEDULER)
    truncated = TruncatedEncoder(tokenizer, text_encoder)
    latents, cond = encode_latents(vae, images), encode_captions(truncated, captions)
    unet = UNet2DConditionModel(**UNET)
    report["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    report["base_unet"] = train_unet(unet, scheduler, latents, cond, truncated.uncond(1)[0], budget.unet,
                                     budget.batch, 1e-3, args.seed + 4, log, "base unet")
    evaluations = {}
    if args.eval:
        evaluations["shapesworld"] = evaluate_parts(unet, vae, tokenizer, text_encoder, args.eval, log, "base")
    base = out / "shapesworld"
    for name, part in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        save_part(part, base / name)
    scheduler.save_config(base / "scheduler")
    log(f"base saved to {base}")

    segments = SegmentEncoder(tokenizer, text_encoder, max_tokens=SEGMENT_MAX_TOKENS)
    seg_cond = encode_captions(segments, captions)
    report["stage1_unet"] = train_unet(unet, scheduler, latents, seg_cond, segments.uncond(1)[0], budget.stage1,
                                       budget.batch, 3e-4, args.seed + 5, log, "stage-1 unet")
    stage1 = out / "shapesworld-stage1"
    save_part(unet, stage1 / "unet")  # its VAE, text encoder and scheduler are the base's
    report["seconds_training"] = round(time.perf_counter() - start, 1)
    if args.eval:
        evaluations["shapesworld-stage1"] = evaluate_parts(unet, vae, tokenizer, text_encoder, args.eval, log, "stage 1")
    report["eval"] = evaluations
    for folder in (base, stage1):
        (folder / "report.json").write_text(json.dumps(report, indent=1))
    log(f"done; report in {base / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
