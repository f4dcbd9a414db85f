"""ShapesWorld: a procedural long-prompt task with an exact per-sentence ground truth.

`world` draws grid scenes of coloured shapes and writes their captions (one sentence per
cell, long enough that 77-token truncation loses the last cells); `checker` says, per
sentence, whether an image shows it. Pure numpy and torch: no ray, no deepspeed.
"""

from shapesworld.checker import SentenceResult, accuracy_by_position, check, parse_caption
from shapesworld.world import (
    COLOURS,
    SHAPES,
    Cell,
    Scene,
    WorldConfig,
    caption,
    cell_sentences,
    make_dataset,
    preamble,
    render,
    sample_scene,
    to_tensor,
    to_uint8,
)

__all__ = [
    "COLOURS",
    "SHAPES",
    "Cell",
    "Scene",
    "SentenceResult",
    "WorldConfig",
    "accuracy_by_position",
    "caption",
    "cell_sentences",
    "check",
    "make_dataset",
    "parse_caption",
    "preamble",
    "render",
    "sample_scene",
    "to_tensor",
    "to_uint8",
]
