"""Train `shapes_pref`, a ShapesWorld preference model made the way PickScore and HPSv2 are:
a CLIP-type model fine-tuned on pairwise human-style preferences over *generated* images.

    python -m shapesworld.pref_train --out shapesworld/weights/shapes_pref     # ~8 min on 2 cores
    python -m shapesworld.pref_train --out /tmp/pref --quick                   # seconds (tests)
    python -m shapesworld.pref_train --eval shapesworld/weights/shapes_pref    # the decomposition only

1. POOL. Captions of random scenes; for each, images from the shipped models as a user
   would sample them (the base with plain 77-token encoding, the stage-1 model with
   segment encoding; several guidance scales; DDIM), so late cells are right in some and
   wrong in others. Each image is also redrawn with more or less *ink*: blended towards
   its dilation (shapes grow and brighten) or its erosion (they shrink and fade).
2. RATERS. Simulated raters compare two images of one caption. Their utility is
       U = accuracy (the exact checker: share of the caption's colour and shape claims
           the image shows) + beta * ink (mean brightest channel: colour on the canvas),
   and they prefer A with probability sigmoid((U_A - U_B) / tau), a Bradley-Terry rater
   with noise. Ink is a prompt-independent taste, as real raters' taste for vivid,
   large subjects is; pushed far, it breaks what the checker reads (shapes swell into
   squares, colour spills over the black margins) - the over-fitting LongAlign's
   down-weighting targets.
3. TRAINING. From the shipped `shapes_clip` (a CLIP trained contrastively on clean renders,
   as PickScore starts from CLIP-H), PickScore's objective: for each pair, the softmax of
   logit_scale * f·t over the two images against the rater's choice, where t is the
   caption's pooled text embedding exactly as the reward computes it (the mean of the
   normalised segment embeddings). Nothing in the objective names a text-irrelevant part:
   whatever decomposition the model has, it learned.

The model ships as `shapes_pref` (shapesworld/clip_reward.py, ClipTypeReward like every
CLIP-type reward). `decomposition` measures its split as the paper does.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longalign_rl.encoding import split_segments
from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from rewards.clip import HFClipBackend
from shapesworld.checker import check
from shapesworld.clip_reward import DEFAULT_WEIGHTS as CLIP_WEIGHTS
from shapesworld.evaluate import SEGMENT_MAX_TOKENS, background_clean, draw_captions, generate, make_encoder
from shapesworld.world import WorldConfig

WORLD = WorldConfig()
CLIP_PIXELS = (0.5, 0.5, 0.5)  # mean and std of shapes_clip's processor (weights/shapes_clip/preprocessor_config.json)
POOL_SEED, EVAL_SEED = 31_000, 32_000  # caption streams of the training and held-out pools


@dataclass(frozen=True)
class PrefConfig:
    seed: int = 0
    captions: int = 768                       # training captions (each gets a group of candidates)
    eval_captions: int = 128                  # held-out captions for the decomposition
    sources: tuple[tuple[str, str], ...] = (("shapesworld", "truncated"), ("shapesworld-stage1", "segment"))
    guidance: tuple[float, ...] = (1.5, 5.0)  # guidance scales the candidates are sampled with
    num_steps: int = 10                       # DDIM steps
    inks: int = 2                             # redrawn versions of each image, ink amount uniform in ink_range
    ink_range: tuple[float, float] = (-0.7, 0.7)  # <0: towards erosion, >0: towards dilation
    beta: float = 1.0                         # rater utility: accuracy + beta * ink
    tau: float = 0.05                         # rater noise (Bradley-Terry temperature)
    pairs_per_caption: int = 8
    steps: int = 1200                         # optimiser steps
    batch_pairs: int = 32
    lr: float = 3e-4                          # AdamW; cosine to lr / 10
    weight_decay: float = 0.01
    init: str = str(CLIP_WEIGHTS)             # a shapes_clip weights folder

    @classmethod
    def quick(cls) -> "PrefConfig":
        return cls(captions=6, eval_captions=4, guidance=(5.0,), num_steps=3, inks=1, pairs_per_caption=4,
                   steps=3, batch_pairs=8)


# --- the pool and the raters ------------------------------------------------------------------


def reink(images: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Blend each image towards its 3x3 dilation (amount > 0: shapes grow and brighten) or
    erosion (amount < 0: they shrink and fade); amount [N] in [-1, 1]."""
    dilated = F.max_pool2d(images, 3, 1, 1)
    eroded = -F.max_pool2d(-images, 3, 1, 1)
    a = amount.view(-1, 1, 1, 1)
    return torch.where(a > 0, (1 - a) * images + a * dilated, (1 + a) * images - a * eroded).clamp(0, 1)


def ink(images: torch.Tensor) -> torch.Tensor:
    """[N]: the mean over pixels of the brightest channel - how much colour is on the canvas."""
    return images.max(dim=1).values.mean(dim=(1, 2))


def accuracy(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """[N]: the share of each caption's colour and shape claims its image shows (exact checker)."""
    out = []
    for image, text in zip(images, captions, strict=True):
        results = check(image, text, WORLD)
        out.append(sum(r.colour_ok + r.shape_ok for r in results) / (2 * len(results)))
    return torch.tensor(out, dtype=torch.float32)


def make_pool(pc: PrefConfig, seed: int, n_captions: int) -> dict:
    """Candidates grouped by caption: images [N,3,H,W], group [N], captions, and their
    accuracy, ink and background (measured, not assumed)."""
    from longalign_rl.models import load_components

    captions = draw_captions(WORLD, n_captions, seed=seed)
    images, groups = [], []
    for m, (model, encoding) in enumerate(pc.sources):
        parts = load_components(model)
        encoder = make_encoder(parts, encoding, SEGMENT_MAX_TOKENS)
        for g, scale in enumerate(pc.guidance):
            images.append(generate(parts, encoder, captions, seed=seed + 101 * m + g, num_steps=pc.num_steps,
                                   guidance_scale=scale, resolution=WORLD.image_size))
            groups.append(torch.arange(n_captions))
    images, groups = torch.cat(images), torch.cat(groups)
    rng = torch.Generator().manual_seed(seed)
    lo, hi = pc.ink_range
    variants = [reink(images, lo + (hi - lo) * torch.rand(len(images), generator=rng)) for _ in range(pc.inks)]
    images, groups = torch.cat([images, *variants]), groups.repeat(1 + pc.inks)
    texts = [captions[g] for g in groups.tolist()]
    return {"images": images, "group": groups, "captions": captions, "accuracy": accuracy(images, texts),
            "ink": ink(images), "background": torch.tensor([background_clean(im, WORLD) for im in images])}


def rater_pairs(pool: dict, pc: PrefConfig, seed: int) -> torch.Tensor:
    """[P, 3] (index A, index B, 1 if the simulated rater prefers A) within each caption's group."""
    rng = np.random.default_rng(seed)
    utility = (pool["accuracy"] + pc.beta * pool["ink"]).numpy()
    group = pool["group"].numpy()
    rows = []
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        for _ in range(pc.pairs_per_caption):
            a, b = rng.choice(members, size=2, replace=False)
            p_a = 1 / (1 + math.exp(-(utility[a] - utility[b]) / pc.tau))
            rows.append((a, b, int(rng.random() < p_a)))
    return torch.tensor(rows)


# --- training ---------------------------------------------------------------------------------


def load_clip(folder: str | Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folder, dtype=torch.float32)


class Scorer:
    """f and t of a transformers CLIPModel, with gradient, through the same backend, segment
    split and mean pooling as ClipTypeReward (which freezes its model, so it cannot train)."""

    def __init__(self, model):
        self.backend = HFClipBackend(model, build_clip_tokenizer(), CLIP_PIXELS, CLIP_PIXELS)

    def texts(self, captions: list[str]) -> torch.Tensor:
        segments = [split_segments(c, self.backend.count_tokens) or [""] for c in captions]
        emb = self.backend.encode_texts([s for segs in segments for s in segs])
        return torch.stack([chunk.mean(0) for chunk in emb.split([len(s) for s in segments])])

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return self.backend.encode_images(self.backend.preprocess(images))


def train(pc: PrefConfig, pool: dict, pairs: torch.Tensor, log=print) -> tuple[object, list[dict]]:
    torch.manual_seed(pc.seed)
    model = load_clip(pc.init).train()
    scorer = Scorer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
    rng = torch.Generator().manual_seed(pc.seed)
    history, start = [], time.perf_counter()
    for step in range(pc.steps):
        for group in optimizer.param_groups:
            group["lr"] = pc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, pc.steps))))
        batch = pairs[torch.randint(len(pairs), (pc.batch_pairs,), generator=rng)]
        a, b, prefer_a = batch[:, 0], batch[:, 1], batch[:, 2]
        t = scorer.texts([pool["captions"][g] for g in pool["group"][a].tolist()])
        f = scorer.images(torch.cat([pool["images"][a], pool["images"][b]]))
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * torch.stack([(f[: len(a)] * t).sum(-1), (f[len(a):] * t).sum(-1)], dim=1)  # [P, 2]
        loss = F.cross_entropy(logits, 1 - prefer_a)  # class 0 = A preferred
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0 or (step + 1) % 50 == 0 or step + 1 == pc.steps:
            agree = ((logits[:, 0] > logits[:, 1]).long() == prefer_a).float().mean().item()
            row = {"step": step + 1, "loss": round(loss.item(), 4), "agreement": round(agree, 3),
                   "seconds": round(time.perf_counter() - start, 1)}
            history.append(row)
            log(" ".join(f"{k} {v}" for k, v in row.items()))
    return model.eval(), history


def save(model, out: Path) -> None:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    model.float()
    shutil.copy(Path(CLIP_WEIGHTS) / "preprocessor_config.json", out / "preprocessor_config.json")


# --- the decomposition, measured as the paper does ---------------------------------------------


def _within(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """x minus its group's mean: what varies between images of one caption."""
    means = torch.zeros(int(group.max()) + 1).index_add_(0, group, x) / torch.bincount(group).float()
    return x - means[group]


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-12))


@torch.no_grad()
def decomposition(reward_name: str, pool: dict, pairs: torch.Tensor | None = None, **reward_kwargs) -> dict:
    """The reward's score on the pool split into its text-relevant part and (t·v)(f·v), v the
    normalised mean t of the pool's captions: each part's mean and share of the score,
    its spread across images of one caption, and (within captions) its correlation with
    the checker's accuracy and with ink; with `pairs` (rater_pairs of the pool), how often
    the plain score agrees with the raters."""
    from longalign_rl.registry import get_reward

    reward = get_reward(reward_name, text_irrelevant_weight=1.0, **reward_kwargs)
    t = reward.text_embeddings(list(pool["captions"]))
    v = F.normalize(t.mean(0), dim=0)
    f = torch.cat([reward.image_embeddings(chunk) for chunk in pool["images"].split(256)])
    t_img = t[pool["group"]]
    irrelevant = (t_img @ v) * (f @ v)
    score = (f * t_img).sum(-1)
    relevant = score - irrelevant
    out = {"images": len(f), "captions": len(t), "t_dot_v": float((t @ v).mean())}
    if pairs is not None:
        a, b, prefer_a = pairs.unbind(1)
        out["rater_agreement"] = float(((score[a] > score[b]).long() == prefer_a).float().mean())
    score_w = _within(score, pool["group"])
    for name, x in (("score", score), ("text_relevant", relevant), ("text_irrelevant", irrelevant)):
        w = _within(x, pool["group"])
        out[name] = {
            "mean": float(x.mean()),
            "share_of_score": float(x.mean() / score.mean()),
            "within_caption_std": float(w.std()),
            # cov(part, score) / var(score) within captions: the two parts' shares add up to 1
            "share_of_spread": float((w * score_w).mean() / (score_w * score_w).mean()),
            "corr_accuracy": _corr(w, _within(pool["accuracy"], pool["group"])),
            "corr_ink": _corr(w, _within(pool["ink"], pool["group"])),
        }
    acc_w, ink_w = _within(pool["accuracy"], pool["group"]), _within(pool["ink"], pool["group"])
    out["weighted"] = {}  # the reward at text_irrelevant_weight w: what it rewards within a caption
    for w in (1.0, 0.3, 0.0):
        total = _within(relevant + w * irrelevant, pool["group"])
        out["weighted"][f"w{w:g}"] = {"corr_accuracy": _corr(total, acc_w), "corr_ink": _corr(total, ink_w)}
    return out


def decomposition_table(results: dict[str, dict]) -> str:
    lines = [", ".join(f"{name} agrees with {d['rater_agreement']:.1%} of held-out rater choices"
                       for name, d in results.items() if "rater_agreement" in d), "",
             "| reward | part | mean | spread within a caption (std) | share of that spread | "
             "corr. with checker accuracy | corr. with ink |", "|---|---|---|---|---|---|---|"]
    for name, d in results.items():
        for part in ("score", "text_relevant", "text_irrelevant"):
            p = d[part]
            lines.append(f"| {name} | {part} | {p['mean']:.3f} | {p['within_caption_std']:.4f} | "
                         f"{p['share_of_spread']:.2f} | {p['corr_accuracy']:+.2f} | {p['corr_ink']:+.2f} |")
    lines += ["", "| reward | w | corr. of the reward with checker accuracy | with ink |", "|---|---|---|---|"]
    for name, d in results.items():
        for w, c in d.get("weighted", {}).items():
            lines.append(f"| {name} | {w[1:]} | {c['corr_accuracy']:+.2f} | {c['corr_ink']:+.2f} |")
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapesworld.pref_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder to write the model (fp16 safetensors) and metrics.json to")
    parser.add_argument("--eval", help="only measure the decomposition of the model in this folder")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run for tests")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.out or args.eval):
        parser.error("give --out (train) or --eval (measure)")
    torch.set_num_threads(args.threads)
    pc = PrefConfig.quick() if args.quick else PrefConfig()
    start = time.perf_counter()
    held_out = make_pool(pc, EVAL_SEED, pc.eval_captions)
    command = "python -m shapesworld.pref_train " + shlex.join(argv or sys.argv[1:])
    folder = Path(args.eval or args.out)
    saved = folder / "metrics.json"
    if args.eval and saved.is_file():  # keep how the model was trained; renew its measurement
        metrics = {**json.loads(saved.read_text()), "eval_command": command}
    else:
        metrics = {"config": asdict(pc), "command": command}
    if args.out:
        pool = make_pool(pc, POOL_SEED, pc.captions)
        pairs = rater_pairs(pool, pc, pc.seed)
        print(f"pool: {len(pool['images'])} images of {len(pool['captions'])} captions, {len(pairs)} rated pairs "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        model, history = train(pc, pool, pairs)
        save(model, folder)
        metrics["train"] = {"history": history, "pool_images": len(pool["images"]), "pairs": len(pairs),
                            "logit_scale": float(model.logit_scale.detach().exp())}
    held_pairs = rater_pairs(held_out, pc, EVAL_SEED)
    results = {"shapes_clip": decomposition("shapes_clip", held_out, held_pairs),
               "shapes_pref": decomposition("shapes_pref", held_out, held_pairs, weights=str(folder))}
    utility = held_out["accuracy"] + pc.beta * held_out["ink"]
    a, b, prefer_a = held_pairs.unbind(1)
    metrics["held_out_raters"] = {  # the best any model can agree with noisy raters: their own utility
        "pairs": len(held_pairs), "agreement_of_the_raters_utility": float(((utility[a] > utility[b]).long() == prefer_a).float().mean())}
    metrics["decomposition"] = results
    metrics["held_out"] = {k: float(held_out[k].mean()) for k in ("accuracy", "ink", "background")}
    seconds = round(time.perf_counter() - start, 1)
    metrics["seconds" if args.out else "eval_seconds"] = seconds
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(metrics, indent=2) + "\n")
    print(decomposition_table(results))
    print(f"done in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
