"""ShapesWorld: a procedural long-prompt task with an exact per-sentence ground truth, and a
user of longalign-rl like any third-party world (it imports only the framework's pure
layers; the framework never imports it).

`world` draws grid scenes of coloured shapes and writes their captions (one sentence per
cell, long enough that 77-token truncation loses the last cells); `checker` says, per
sentence, whether an image shows it; `evaluate` gives that ground truth on generated
images. `soft_checker` (reward "shapes_checker") and `clip_reward` ("shapes_clip") are its
rewards; `plugin` lists every hook by which it plugs into the framework; `pretrain`,
`clip_train` and `experiment` are its scripts, and `weights/` holds what they made.
Pure numpy and torch: no ray, no deepspeed.
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
