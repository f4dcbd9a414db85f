"""`shapes_clip`: a tiny CLIP-type preference model of ShapesWorld, trained in this repository.

A transformers CLIPModel trained from scratch by `python -m shapesworld.clip_train`
(see docs/shapesworld_clip.md for how well it does), shipped in fp16 under
shapesworld/weights/shapes_clip/, and used through the same segment-aware, decomposed
ClipTypeReward as the `clip`, `pickscore` and `hpsv2` presets (docs/method.md section 2).
"""

from __future__ import annotations

from pathlib import Path

import torch

from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from rewards.clip import HFClipBackend
from rewards.decomposed import ClipTypeReward

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "shapes_clip"
PREF_WEIGHTS = Path(__file__).parent / "weights" / "shapes_pref"


def _load(name: str, folder: Path, make: str, **kwargs) -> ClipTypeReward:
    from transformers import CLIPImageProcessor, CLIPModel

    needed = ("config.json", "model.safetensors", "preprocessor_config.json")
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{name} weights folder {str(folder)!r} lacks {', '.join(missing)}; "
                                f"train the model into it with `{make}`")
    model = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    processor = CLIPImageProcessor.from_pretrained(folder)
    backend = HFClipBackend(model, build_clip_tokenizer(), processor.image_mean, processor.image_std)
    return ClipTypeReward(backend, **kwargs)


def shapes_clip(weights: str | None = None, **kwargs) -> ClipTypeReward:
    """The shipped model (or the one in the folder `weights`), as float32; `kwargs` go to
    ClipTypeReward (text_irrelevant_weight, direction, ...)."""
    folder = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    return _load("shapes_clip", folder, f"python -m shapesworld.clip_train --out {folder}"
                 " (about 8 minutes on one CPU core)", **kwargs)


def shapes_pref(weights: str | None = None, **kwargs) -> ClipTypeReward:
    """`shapes_pref`: shapes_clip fine-tuned on simulated raters' pairwise preferences over
    generated images (shapesworld/pref_train.py), as PickScore fine-tunes CLIP."""
    folder = Path(weights) if weights is not None else PREF_WEIGHTS
    return _load("shapes_pref", folder, f"python -m shapesworld.pref_train --out {folder}", **kwargs)
