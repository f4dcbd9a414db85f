"""Segment-aware CLIP-type rewards with the decomposed, reweighted score (docs/method.md section 2).

`ClipTypeReward` turns any CLIP-type model (CLIP, PickScore, HPSv2: a `ClipBackend`) into a
reward for long prompts:
- each prompt is split into segments that fit the text encoder (no text is lost), every
  segment of the batch is encoded in one call, and the prompt's text embedding t is the
  mean of its L2-normalised segment embeddings (not re-normalised, as the reference);
- the score f·t is split along the shared text direction v into a text-relevant and a
  text-irrelevant part, and the text-irrelevant part is down-weighted by
  `text_irrelevant_weight` (w): total = f·(t - (t·v)v) + w (t·v)(f·v).

For a paper-exact run, `split="reference"` and `crop="reference"` score as the reference
code's stage 2 does (its prompt split, truncated at 77 tokens; its random 504 px crop).

Pure torch (no ray, no deepspeed). The text and image towers are frozen; gradients flow
from the reward to the images.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from longalign_rl.encoding.segments import SPLITS, split_segments
from longalign_rl.registry import Reward, RewardOutput

# OpenAI CLIP's pixel statistics, used by every model here unless its config says otherwise.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DIRECTIONS = ("batch", "corpus")
SEGMENT_POOLINGS = ("mean", "mean_renorm")
# How images are cropped to the model's input: CLIP's own centre crop, or the reference's.
CROPS = ("center", "reference")
# The reference crops a random 504 px square (of its 512 px images: a small random shift),
# whatever the image size. An image under 504 px, where its RandomCrop would raise, gets the
# same fraction of its shorter side instead, 504/512 (the tiny paper-exact run's 64 px: 63).
REFERENCE_CROP = 504
REFERENCE_CROP_FRACTION = 504 / 512


def decomposed_score(
    image_emb: torch.Tensor, text_emb: torch.Tensor, direction: torch.Tensor, text_irrelevant_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, text_relevant, text_irrelevant), each [B] (docs/method.md 2.2).

    image_emb f [B,D] L2-normalised; text_emb t [B,D]; direction v [D] a unit vector.
    text_relevant = f·(t - (t·v)v); text_irrelevant = (t·v)(f·v), unweighted;
    total = text_relevant + w * text_irrelevant, so w = 1 gives the plain score f·t.
    """
    t_along_v = text_emb @ direction  # [B]
    text_relevant = (image_emb * (text_emb - t_along_v[:, None] * direction)).sum(-1)
    text_irrelevant = t_along_v * (image_emb @ direction)
    return text_relevant + text_irrelevant_weight * text_irrelevant, text_relevant, text_irrelevant


def batch_direction(text_sum: torch.Tensor) -> torch.Tensor:
    """v = the normalised sum (so the normalised mean) of a batch's text embeddings [D]. Over
    the trainer workers' global batch the caller adds up every worker's sum first
    (`ClipTypeReward.batch_statistics`, scoring.py): the reward itself never communicates.
    The count need not be added: normalising the sum gives the unit vector of the mean."""
    return F.normalize(text_sum, dim=0)


def load_direction(path: str | Path, dim: int) -> torch.Tensor:
    """The corpus direction saved by `python -m longalign_rl.direction`: key "direction", [dim], unit."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"direction_path {str(path)!r} does not exist; compute it with `python -m longalign_rl.direction`"
        )
    tensors = load_file(path)
    if "direction" not in tensors:
        raise ValueError(f"direction_path {str(path)!r} holds no tensor 'direction' (it holds {sorted(tensors)})")
    v = tensors["direction"].float()
    if tuple(v.shape) != (dim,):
        raise ValueError(
            f"direction in {str(path)!r} has shape {tuple(v.shape)}, but this reward model's embeddings have "
            f"dimension {dim}: it was computed with another model"
        )
    if not torch.isfinite(v).all() or abs(v.norm().item() - 1) > 1e-3:
        raise ValueError(f"direction in {str(path)!r} is not a finite unit vector (norm {v.norm().item():.4g})")
    return v


class ClipBackend(torch.nn.Module):
    """A CLIP-type model as the reward needs it. Subclasses set the model and implement
    `count_tokens`, `encode_images` and `encode_texts`; this class does the pixel side."""

    def __init__(self, image_size: int | tuple[int, int], image_mean, image_std, embed_dim: int):
        super().__init__()
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.embed_dim = embed_dim
        # Buffers, so that `.to(device)` moves them with the model; not part of a state dict.
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32), persistent=False)

    def count_tokens(self, text: str) -> int:
        """Word tokens of `text` (no start/end tokens), for splitting prompts into segments."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [B,3,h,w] -> L2-normalised image embeddings [B,D]."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts that fit one encoder call -> L2-normalised text embeddings [N,D]."""
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor, crop: str = "center") -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> the model's input, differentiably.

        crop="center", as CLIP's image processor does: resize the shorter side to the
        model's size (bicubic, antialiased), centre-crop. crop="reference", as the
        reference's stage 2 does: `reference_crop`. Then normalise with the model's mean
        and std.
        """
        if crop == "reference":
            x = self.reference_crop(images)
        elif crop == "center":
            x = self.center_crop(images)
        else:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        return (x - self.image_mean[:, None, None]) / self.image_std[:, None, None]

    def center_crop(self, images: torch.Tensor) -> torch.Tensor:
        """Resize the shorter side to the model's size (bicubic, antialiased), centre-crop."""
        h, w = self.image_size
        height, width = images.shape[-2:]
        scale = max(h / height, w / width)
        size = (max(h, round(height * scale)), max(w, round(width * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        return x[..., top : top + h, left : left + w]

    def reference_crop(self, images: torch.Tensor) -> torch.Tensor:
        """The reference's torchvision RandomCrop((504, 504)) then Resize(model size) on a
        batch: one 504 px square crop (under 504 px, where the reference's would raise: a side
        of round(504/512 of the shorter side)) at one random offset for the whole batch,
        drawn by torchvision from torch's global RNG (so a seed gives the reference's
        offsets), then a bilinear antialiased resize."""
        from torchvision.transforms import RandomCrop

        short = min(images.shape[-2:])
        side = REFERENCE_CROP if short >= REFERENCE_CROP else round(short * REFERENCE_CROP_FRACTION)
        top, left, _, _ = RandomCrop.get_params(images, (side, side))
        x = images[..., top : top + side, left : left + side]
        return F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)


class ClipTypeReward(Reward):
    """A CLIP-type preference model as a segment-aware, decomposed reward (docs/method.md section 2).

    text_irrelevant_weight: w in total = text_relevant + w * text_irrelevant; 0.3 is the
        reference value, 1 gives the plain score f·t.
    direction: where v comes from. "batch" (reference): the normalised mean text embedding
        of the batch's prompts: of this call's, or of the whole global batch when the caller
        hands in `statistics` (the sum of every worker's `batch_statistics`, as the trainer
        workers do); with a single prompt t·v v = t, so text_relevant is 0. "corpus": a fixed
        v read from `direction_path`.
    direction_path: a .safetensors file with key "direction" [D], from
        `python -m longalign_rl.direction`; only with direction="corpus".
    segment_pooling: "mean" (reference) or "mean_renorm" (the mean, L2-normalised).
    split: how a prompt is cut into the reward's segments. "sentences": this project's
        split, nothing lost (`split_segments`). "reference": the reference's rule
        (`split_reference`); the text encoder's truncation at 77 tokens then drops the tail
        of a piece over 75 tokens, as in the reference.
    crop: how images become the model's input. "center": CLIP's image processor (resize,
        centre crop). "reference": the reference's random 504 px crop (of an image under
        504 px: 504/512 of its shorter side), one offset per call from torch's global RNG,
        then a bilinear resize (`ClipBackend.reference_crop`).
    """

    differentiable = True

    def __init__(
        self,
        backend: ClipBackend,
        *,
        text_irrelevant_weight: float = 0.3,
        direction: str = "batch",
        direction_path: str | None = None,
        segment_pooling: str = "mean",
        split: str = "sentences",
        crop: str = "center",
    ):
        super().__init__()
        if isinstance(text_irrelevant_weight, bool) or not isinstance(text_irrelevant_weight, (int, float)):
            raise TypeError(f"text_irrelevant_weight must be a number, got {text_irrelevant_weight!r}")
        if not (math.isfinite(text_irrelevant_weight) and 0.0 <= text_irrelevant_weight <= 1.0):
            raise ValueError(f"text_irrelevant_weight must be in [0, 1] (0.3 is the paper's), got "
                             f"{text_irrelevant_weight!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if segment_pooling not in SEGMENT_POOLINGS:
            raise ValueError(f"segment_pooling must be one of {SEGMENT_POOLINGS}, got {segment_pooling!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if direction == "corpus" and direction_path is None:
            raise ValueError("direction_path is required with direction='corpus'")
        if direction == "batch" and direction_path is not None:
            raise ValueError("direction_path is only used with direction='corpus'; remove it or set direction='corpus'")

        self.backend = backend.requires_grad_(False).eval()
        self.text_irrelevant_weight = float(text_irrelevant_weight)
        self.direction = direction
        self.segment_pooling = segment_pooling
        self.split = split
        self.crop = crop
        if direction == "corpus":
            v = load_direction(direction_path, backend.embed_dim)
            self.register_buffer("corpus_direction", v, persistent=False)

    def train(self, mode: bool = True):
        """The reward model stays in eval mode, whatever mode its owner is switched to."""
        super().train(mode)
        self.backend.eval()
        return self

    def segments(self, prompt: str) -> list[str]:
        """The prompt's segments; an empty prompt is one empty segment, so it still has a t."""
        return split_segments(prompt, self.backend.count_tokens, split=self.split) or [""]

    @torch.no_grad()  # the text side is frozen and never needs a graph
    def _segment_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """All segments of all prompts in one encoder call: ([S,D] float32, segments per prompt)."""
        per_prompt = [self.segments(p) for p in prompts]
        embeddings = self.backend.encode_texts([s for segs in per_prompt for s in segs]).float()
        return embeddings, [len(segs) for segs in per_prompt]

    def _pool(self, segment_emb: torch.Tensor, counts: list[int]) -> torch.Tensor:
        t = torch.stack([chunk.mean(0) for chunk in segment_emb.split(counts)])
        return F.normalize(t, dim=-1) if self.segment_pooling == "mean_renorm" else t

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """The pooled text embedding t of each prompt, [N,D] float32 (no graph)."""
        return self._pool(*self._segment_embeddings(prompts))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings f [B,D] float32, differentiable w.r.t. `images`."""
        dtype = next(self.backend.parameters()).dtype
        return self.backend.encode_images(self.backend.preprocess(images, self.crop).to(dtype)).float()

    def batch_statistics(self, prompts: list[str]) -> dict[str, torch.Tensor] | None:
        """direction="batch": the sum of the prompts' text embeddings, which the caller adds up
        over the global batch and hands to forward (scoring.py); "corpus" needs nothing."""
        return {"text_sum": self.text_embeddings(prompts).sum(0)} if self.direction == "batch" else None

    def forward(self, images: torch.Tensor, prompts: list[str],
                statistics: dict[str, torch.Tensor] | None = None) -> RewardOutput:
        """`statistics`: `batch_statistics` summed over the global batch; without them, over
        this call's prompts."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        segment_emb, counts = self._segment_embeddings(prompts)
        t = self._pool(segment_emb, counts)
        f = self.image_embeddings(images)
        if self.direction == "corpus":
            v = self.corpus_direction
        else:
            v = batch_direction((statistics["text_sum"] if statistics is not None else t.sum(0)).to(t.device, t.dtype))
        total, text_relevant, text_irrelevant = decomposed_score(f, t, v, self.text_irrelevant_weight)
        # Logged only: cut from the graph so that logging keeps no activations alive.
        segment_scores = [f_b.detach() @ seg.T for f_b, seg in zip(f, segment_emb.split(counts))]
        components = {
            "text_relevant": text_relevant.detach(),
            "text_irrelevant": text_irrelevant.detach(),
            "score": (f.detach() * t).sum(-1),
        }
        return RewardOutput(total=total, components=components, segment_scores=segment_scores)
