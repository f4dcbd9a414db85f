"""How ShapesWorld plugs into longalign-rl: through the public extension points any
third-party world or dataset uses, and nothing else (docs/architecture.md).

| config key / entry-point group      | here                                              |
|-------------------------------------|---------------------------------------------------|
| `prompts.source`                    | `shapesworld.plugin:captions` (4,096 captions)    |
| `run.validation`, `evaluate --prompts` | `shapesworld.plugin:heldout_captions` (128)     |
| `data.source` (stage 1)             | `shapesworld.plugin:pairs` (rendered image pairs) |
| `run.metrics`                       | `shapesworld.plugin:ground_truth` (exact checker) |
| `longalign_rl.models` entry points  | "shapesworld", "shapesworld-stage1",              |
|                                     | "shapesworld-partial" (SD 1.x UNets),             |
|                                     | "shapesworld-flow", "shapesworld-flow-partial"    |
|                                     | (SD3 transformers; all shipped)                   |
| `longalign_rl.rewards` entry points | "shapes_clip", "shapes_pref", "shapes_checker"    |

The entry points are declared in setup.cfg, as a plugin package declares its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shapesworld.evaluate import draw_captions
from shapesworld.evaluate import ground_truth as _ground_truth
from shapesworld.world import WorldConfig, make_dataset

# The shipped models (pretrain.py writes them) and the shipped shapes_clip reward.
WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_BASE = "shapesworld"
NUM_CAPTIONS = 4096


def captions() -> list[str]:
    """`prompts.source`: 4,096 captions of the default world, drawn with seed 0."""
    return draw_captions(WorldConfig(), NUM_CAPTIONS, seed=0)


# Held-out captions: no training, rater or stage-1 pool draws from this seed (sweep.py's too).
HELDOUT_SEED = 54_321


def heldout_captions() -> list[str]:
    """`run.validation` / `longalign_rl.evaluate --prompts`: 128 captions of the default world
    that no training pool holds (seed HELDOUT_SEED)."""
    return draw_captions(WorldConfig(), 128, seed=HELDOUT_SEED)


VALIDATION_SEED = 65_432


def validation_captions() -> list[str]:
    """`run.validation` when the held-out captions are kept for the evaluation after the run
    (shapesworld/guard_compare.py selects weights on these and evaluates on those): 64
    captions of the default world from a seed of their own, in no training pool."""
    return draw_captions(WorldConfig(), 64, seed=VALIDATION_SEED)


def pairs(n: int = 1000, seed: int = 0, **world) -> list[tuple[np.ndarray, str]]:
    """`data.source`: n (uint8 image, caption) pairs; `world` are WorldConfig fields
    (image_size, grid, ...), given as `data.kwargs`."""
    return [(image, caption) for image, caption, _ in make_dataset(WorldConfig(**world), n, seed)]


def _check_pairs_kwargs(n: int = 1000, seed: int = 0, **world) -> None:
    try:
        WorldConfig(**world)
    except (TypeError, ValueError) as e:
        raise ValueError(f"not a ShapesWorld config: {e}") from None


pairs.validate = _check_pairs_kwargs  # run on the driver before anything starts (longalign_rl/data.py)


def ground_truth(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """`run.metrics` hook: the exact checker's verdicts per sentence position ("gt/colour/i",
    "gt/shape/i") and "gt/background", each a tensor [B]; the prompts must be captions of
    the default world (prompts.source: shapesworld.plugin:captions)."""
    return _ground_truth(images, prompts, WorldConfig())


def _load_shipped(name: str):
    """A shipped model: a complete diffusers folder (a stage-1 model ships only its UNet; its
    other parts are links to the base's, ship_model.complete_folder)."""
    from longalign_rl.models import load_pretrained

    return load_pretrained(str(WEIGHTS_DIR / name))


def base_model(seed: int = 0):
    """Model "shapesworld": the base, pretrained on plain 77-token captions (weights/README.md)."""
    return _load_shipped("shapesworld")


def stage1_model(seed: int = 0):
    """Model "shapesworld-stage1": the base after stage 1 on segment-encoded captions."""
    return _load_shipped("shapesworld-stage1")


def partial_model(seed: int = 0):
    """Model "shapesworld-partial": the base after the framework's own stage 1
    (configs/shapesworld_stage1.yaml, a LoRA merged): cells 3-4 in the right colours but
    their shapes only partly right, so stage 2 has headroom (weights/shapesworld-partial/report.json)."""
    return _load_shipped("shapesworld-partial")


def flow_model(seed: int = 0):
    """Model "shapesworld-flow": an SD3-class transformer pretrained on plain 77-token
    captions, on the base's VAE and text encoder, without T5 (shapesworld/pretrain_flow.py)."""
    return _load_shipped("shapesworld-flow")


def flow_partial_model(seed: int = 0):
    """Model "shapesworld-flow-partial": "shapesworld-flow" after the framework's own stage 1
    (configs/shapesworld_flow_stage1.yaml, a LoRA merged), a start for stage 2 with headroom
    (weights/shapesworld-flow-partial/report.json)."""
    return _load_shipped("shapesworld-flow-partial")
