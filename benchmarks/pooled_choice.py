"""Which pooled embedding should a prompt of several segments give a family that takes one
(SDXL's `prompts.pooled`: the first segment's or the mean over segments)? Measured on the
one contrastively trained CLIP text tower this machine has: ShapesWorld's `shapes_clip`
(transformers CLIPModel, the real CLIP tokenizer; no pretrained SDXL or OpenCLIP weights can
be downloaded here).

For held-out ShapesWorld captions (a preamble and one sentence per cell), split into
segments as the encoder splits them, it prints:
- the cosine between segments' pooled vectors (how different the sentences' vectors are);
- the norm of the mean over segments relative to a single segment's (averaging vectors that
  point apart shortens them: a pooled input of a size the UNet never saw in training);
- the cosine of each choice to the pooled vector of the whole caption cut at 77 tokens, what
  StableDiffusionXLPipeline feeds SDXL's UNet for the same prompt today.

    .venv/bin/python benchmarks/pooled_choice.py [--n 200]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from longalign_rl.encoding.encode import split_prompts
from shapesworld.clip_reward import DEFAULT_WEIGHTS
from shapesworld.evaluate import draw_captions
from shapesworld.world import WorldConfig


@torch.no_grad()
def measure(n: int, seed: int = 12345) -> dict:
    from transformers import CLIPModel

    from longalign_rl.encoding.tokenizer import build_clip_tokenizer

    model = CLIPModel.from_pretrained(DEFAULT_WEIGHTS, dtype=torch.float32).eval()
    tokenizer = build_clip_tokenizer()

    def pooled(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return model.get_text_features(input_ids=ids).pooler_output  # the projected pooled vector

    captions = draw_captions(WorldConfig(), n, seed)
    rows = {"segments": [], "segment_cosine": [], "mean_norm_ratio": [], "first_vs_whole": [], "mean_vs_whole": []}
    for caption, segments in zip(captions, split_prompts(captions, tokenizer)):
        vectors = pooled(segments)
        whole = pooled([caption])[0]
        mean = vectors.mean(0)
        unit = F.normalize(vectors, dim=-1)
        pairs = unit @ unit.T
        k = len(segments)
        rows["segments"].append(k)
        rows["segment_cosine"].append(float((pairs.sum() - k) / (k * (k - 1))))
        rows["mean_norm_ratio"].append(float(mean.norm() / vectors.norm(dim=-1).mean()))
        rows["first_vs_whole"].append(float(F.cosine_similarity(vectors[0], whole, dim=0)))
        rows["mean_vs_whole"].append(float(F.cosine_similarity(mean, whole, dim=0)))
    return {k: statistics.mean(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="held-out captions")
    args = parser.parse_args()
    m = measure(args.n)
    print(f"{args.n} ShapesWorld captions, {m['segments']:.1f} segments each, shapes_clip's text tower:")
    print(f"  cosine between two segments' pooled vectors      {m['segment_cosine']:.3f}")
    print(f"  |mean over segments| / |one segment's|            {m['mean_norm_ratio']:.3f}")
    print(f"  cosine to the whole caption cut at 77 tokens: first segment {m['first_vs_whole']:.3f}, "
          f"mean {m['mean_vs_whole']:.3f}")


if __name__ == "__main__":
    main()
