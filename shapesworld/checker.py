"""The exact ground-truth metric for ShapesWorld: per cell sentence, does the image show it?

Like the paper's key-fact check, but read off the pixels rather than asked of a VQA
model, so it cannot be gamed and agrees 100% with the generator on clean renders.

Reading one cell of an image:
1. Label every pixel with its nearest palette colour in RGB (background black or one of
   the shape colours). With the default palette (the RGB cube's corners) that tolerates an
   error of up to 127 per channel, so a generated image's slightly-off colours still read.
2. The cell is empty if fewer than EMPTY_FRACTION of its shape box are non-background.
3. Its colour is the most common non-background label.
4. Its shape is read from the largest 4-connected blob of that colour (stray specks
   elsewhere in the cell neither move its bounding box nor change its shape) by the blob's
   fill ratio of its bounding box: a square fills ~1.0, a circle ~pi/4 = 0.785 and a
   triangle ~0.5 (0.53-0.6 rasterised at our sizes) - in any position, at any scale, and
   for the triangle in any orientation. A blob too small or too ragged for any of the
   three (noise) reads as no shape.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from longalign_rl.encoding.segments import split_sentences
from shapesworld.world import (
    BACKGROUND_NAME,
    BACKGROUND_RGB,
    EMPTY_SENTENCE,
    SHAPE_SENTENCE,
    Cell,
    Scene,
    WorldConfig,
    caption,
    cell_sentence,
    position_words,
    preamble,
    to_uint8,
)

# A quarter of the smallest shape's area (the triangle covers ~0.55 of its box): fewer
# non-background pixels than this are specks, not a shape.
EMPTY_FRACTION = 0.15
# Fill-ratio bands, split halfway between the rasterised values at the smallest allowed
# box (10 px: square 1.0, circle 0.80, triangle 0.60); below 0.35 is no shape at all.
SQUARE_MIN_FILL, CIRCLE_MIN_FILL, TRIANGLE_MIN_FILL = 0.9, 0.7, 0.35


@dataclass(frozen=True)
class SentenceResult:
    """Whether the image shows one cell sentence; colour and shape judged separately."""

    index: int  # the sentence's position among the cell sentences (0 = first cell)
    sentence: str
    claimed: Cell  # what the sentence says
    seen_colour: str | None  # what the image shows (None, None: empty; a colour, None: no clear shape)
    seen_shape: str | None
    colour_ok: bool  # for an "empty" sentence both are "the cell is empty"
    shape_ok: bool

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.shape_ok


def _template_regex(template: str) -> re.Pattern:
    """A caption template as a regex: the background fixed, every other field a named group."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field == "background":
            parts.append(re.escape(BACKGROUND_NAME))
        elif field is not None:
            parts.append(f"(?P<{field}>.+?)")
    return re.compile("".join(parts))


_SHAPE_RE, _EMPTY_RE = _template_regex(SHAPE_SENTENCE), _template_regex(EMPTY_SENTENCE)


def parse_caption(text: str, cfg: WorldConfig) -> Scene:
    """The scene a caption describes; the exact inverse of `caption()`, anything else an error."""
    sentences = split_sentences(text)
    n = cfg.grid * cfg.grid
    if len(sentences) != n + 1 or sentences[0] != preamble(cfg):
        raise ValueError(f"expected the preamble and {n} cell sentences, got {len(sentences)} sentences: {text!r}")
    cells = []
    for index, sentence in enumerate(sentences[1:]):
        row, col = divmod(index, cfg.grid)
        match = _SHAPE_RE.fullmatch(sentence) or _EMPTY_RE.fullmatch(sentence)
        if match is None or match["position"] != position_words(row, col, cfg.grid):
            raise ValueError(f"sentence {index} does not describe cell ({row}, {col}): {sentence!r}")
        fields = match.groupdict()
        cells.append(Cell(row, col, fields.get("shape"), fields.get("colour")))
    scene = Scene(tuple(cells))
    # Unknown colour or shape names raise here; spacing or other text that split_sentences
    # would forgive shows up as a caption that does not come back unchanged.
    if caption(scene, cfg) != text:
        raise ValueError(f"not a caption that caption() writes: {text!r}")
    return scene


def _labels(image: np.ndarray, cfg: WorldConfig) -> np.ndarray:
    """int [H, W]: each pixel's nearest palette colour, 0 = background, i + 1 = cfg.colours[i]."""
    palette = np.array([BACKGROUND_RGB] + [rgb for _, rgb in cfg.colours], dtype=np.int32)
    distance = ((image.astype(np.int32)[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    return distance.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of a bool mask (labels spread by max until stable)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.maximum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[counts.argmax()]


def _shape_from_fill(fill: float) -> str | None:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    if fill >= TRIANGLE_MIN_FILL:
        return "triangle"
    return None


def _read_cell(labels: np.ndarray, row: int, col: int, cfg: WorldConfig) -> tuple[str | None, str | None]:
    """(colour, shape) a cell shows: (None, None) if empty, shape None if no clear shape."""
    # Look inside the cell less half its margin, so paint bleeding over from a neighbour
    # (as in a generated image) is not counted here.
    inset = cfg.margin // 2
    size = cfg.cell_size
    cell = labels[row * size + inset : (row + 1) * size - inset, col * size + inset : (col + 1) * size - inset]
    min_pixels = EMPTY_FRACTION * cfg.box_size**2
    foreground = cell[cell > 0]
    if foreground.size < min_pixels:
        return None, None
    label = int(np.bincount(foreground).argmax())
    colour = cfg.colours[label - 1][0]
    blob = _largest_component(cell == label)
    if blob.sum() < min_pixels:
        return colour, None
    ys, xs = np.nonzero(blob)
    fill = blob.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return colour, _shape_from_fill(fill)


def check(image: np.ndarray | torch.Tensor, scene_or_caption: Scene | str, cfg: WorldConfig) -> list[SentenceResult]:
    """Per cell sentence (row-major), whether `image` shows it.

    `image` is uint8 [H, W, 3] or a float [3, H, W] tensor in [0, 1]; the claim is a Scene
    or a caption written by `caption()`.
    """
    image = to_uint8(image)
    if image.shape[:2] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"image is {image.shape[:2]}, config says {cfg.image_size} px")
    scene = parse_caption(scene_or_caption, cfg) if isinstance(scene_or_caption, str) else scene_or_caption
    if scene.grid != cfg.grid:
        raise ValueError(f"scene is {scene.grid} x {scene.grid}, config is {cfg.grid} x {cfg.grid}")
    labels = _labels(image, cfg)
    results = []
    for index, claimed in enumerate(scene.cells):
        colour, shape = _read_cell(labels, claimed.row, claimed.col, cfg)
        if claimed.empty:
            colour_ok = shape_ok = colour is None
        else:
            colour_ok, shape_ok = colour == claimed.colour, shape == claimed.shape
        results.append(SentenceResult(index, cell_sentence(claimed, cfg), claimed, colour, shape, colour_ok, shape_ok))
    return results


def accuracy_by_position(
    images: Iterable[np.ndarray | torch.Tensor], claims: Iterable[Scene | str], cfg: WorldConfig
) -> dict[str, np.ndarray]:
    """Mean over a batch, per cell-sentence position: {"colour", "shape", "sentence"} -> float [grid * grid].

    "sentence" is both right. `images` may be a list or a [B, 3, H, W] tensor in [0, 1].
    """
    rows = [check(image, claim, cfg) for image, claim in zip(images, claims, strict=True)]
    if not rows:
        raise ValueError("accuracy_by_position needs at least one image")
    return {
        "colour": np.array([[r.colour_ok for r in row] for row in rows], dtype=float).mean(0),
        "shape": np.array([[r.shape_ok for r in row] for row in rows], dtype=float).mean(0),
        "sentence": np.array([[r.ok for r in row] for row in rows], dtype=float).mean(0),
    }
