"""ShapesWorld: procedural images with long captions and an exact ground truth.

An image is a grid x grid array of cells on a black background; each cell is empty or
holds one crisp shape of one colour. The caption is a fixed preamble sentence, then one
sentence per cell in reading order (row-major). With the defaults (32 px, 2 x 2 cells)
the preamble is 28 CLIP tokens and every cell sentence 19 (20 if cyan), 104 to 108 in all, so
plain 77-token truncation (75 word tokens) cuts the third sentence in the middle and
drops the fourth entirely: a model conditioned on truncated text cannot know the last
cell, one conditioned on every segment can.

Everything is deterministic from a numpy Generator; drawing is plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# The eight corners of the RGB cube: black is the background, the other seven are the
# shape colours. Every pair is at least 255 apart, and nearest-palette-colour
# classification reduces to thresholding each channel at 128, so a pixel can be off by
# up to 127 in every channel and still read as the right colour - the widest margin any
# 8-colour palette can have. (A grey background would sit only 221 from each colour.)
BACKGROUND_NAME = "black"
BACKGROUND_RGB = (0, 0, 0)
COLOURS = (
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)),
    ("magenta", (255, 0, 255)),
    ("cyan", (0, 255, 255)),
    ("white", (255, 255, 255)),
)
# Shapes whose bounding-box fill ratios are far apart (1.0, pi/4 = 0.785, 0.5): that is
# what the checker reads them by.
SHAPES = ("square", "circle", "triangle")

# The caption's templates. The parser builds its regular expressions from these same
# strings, so captions and parsing cannot drift apart. With the default config both cell
# sentences are 19 CLIP tokens for every position, colour and shape, except 20 for "cyan"
# (two tokens; kept because it is the name a text-to-image model knows for 0, 255, 255).
PREAMBLE = (
    "This image is a grid of {n} rows by {n} columns of cells on a {background} background, "
    "and each cell is described below in reading order."
)
SHAPE_SENTENCE = (
    "In the {position} cell of the picture there is exactly one {colour} {shape} on the {background} background."
)
EMPTY_SENTENCE = "The {position} cell of the picture is empty, with nothing at all on the {background} background."

_NUMBER_WORDS = {2: "two", 3: "three"}
_ROW_WORDS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COL_WORDS = {2: ("left", "right"), 3: ("left", "middle", "right")}


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 32  # pixels per side; must be a multiple of `grid`
    grid: int = 2  # grid x grid cells; 2 or 3 (the cells are named in words)
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = COLOURS  # (name, RGB) pairs
    shapes: tuple[str, ...] = SHAPES  # a subset of SHAPES (those are the ones we can draw)
    # Probability that a cell is empty. 0 by default so that every sentence names a colour
    # and a shape and the per-position colour and shape accuracies all count every image.
    empty_prob: float = 0.0

    def __post_init__(self):
        if self.grid not in _NUMBER_WORDS:
            raise ValueError(f"grid must be one of {sorted(_NUMBER_WORDS)}, got {self.grid}")
        # Below 12 px a cell's drawn circle and triangle have too few pixels for their fill
        # ratios (what the checker reads shapes by) to stay clearly apart.
        if self.image_size % self.grid or self.cell_size < 12:
            raise ValueError(f"image_size {self.image_size} must split into {self.grid} cells of at least 12 px")
        names = [name for name, _ in self.colours]
        if len(set(names)) != len(names) or BACKGROUND_NAME in names:
            raise ValueError(f"colour names must be unique and not {BACKGROUND_NAME!r}: {names}")
        if any(tuple(rgb) == BACKGROUND_RGB for _, rgb in self.colours):
            raise ValueError("no shape colour may equal the background")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown or not self.shapes:
            raise ValueError(f"unknown shapes {unknown}; known: {SHAPES}")
        if not 0.0 <= self.empty_prob <= 1.0:
            raise ValueError(f"empty_prob must be in [0, 1], got {self.empty_prob}")

    @property
    def cell_size(self) -> int:
        return self.image_size // self.grid

    @property
    def margin(self) -> int:
        """Blank pixels between a shape and its cell's edge, so shapes never touch."""
        return max(1, self.cell_size // 8)

    @property
    def box_size(self) -> int:
        """Side of the square each shape is drawn in."""
        return self.cell_size - 2 * self.margin

    def rgb(self, colour: str) -> tuple[int, int, int]:
        return dict(self.colours)[colour]


@dataclass(frozen=True)
class Cell:
    row: int
    col: int
    shape: str | None = None  # None (with colour None) for an empty cell
    colour: str | None = None

    def __post_init__(self):
        if (self.shape is None) != (self.colour is None):
            raise ValueError(f"a cell has both a shape and a colour or neither: {self}")

    @property
    def empty(self) -> bool:
        return self.shape is None


@dataclass(frozen=True)
class Scene:
    cells: tuple[Cell, ...]  # row-major: cells[row * grid + col]

    def __post_init__(self):
        grid = int(round(len(self.cells) ** 0.5))
        positions = [(c.row, c.col) for c in self.cells]
        if positions != [(r, c) for r in range(grid) for c in range(grid)]:
            raise ValueError(f"cells must fill a square grid in row-major order, got {positions}")

    @property
    def grid(self) -> int:
        return int(round(len(self.cells) ** 0.5))


def position_words(row: int, col: int, grid: int) -> str:
    """'top left', 'bottom right', ...; the middle of a 3 x 3 grid is 'centre'."""
    if grid == 3 and row == col == 1:
        return "centre"
    return f"{_ROW_WORDS[grid][row]} {_COL_WORDS[grid][col]}"


def sample_scene(cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    cells = []
    for row in range(cfg.grid):
        for col in range(cfg.grid):
            if rng.random() < cfg.empty_prob:
                cells.append(Cell(row, col))
            else:
                shape = cfg.shapes[rng.integers(len(cfg.shapes))]
                colour = cfg.colours[rng.integers(len(cfg.colours))][0]
                cells.append(Cell(row, col, shape, colour))
    return Scene(tuple(cells))


def _check_scene(scene: Scene, cfg: WorldConfig) -> None:
    if scene.grid != cfg.grid:
        raise ValueError(f"scene is {scene.grid} x {scene.grid}, config is {cfg.grid} x {cfg.grid}")
    colours = dict(cfg.colours)
    for cell in scene.cells:
        if not cell.empty and (cell.shape not in cfg.shapes or cell.colour not in colours):
            raise ValueError(f"{cell} uses a shape or colour the config does not have")


def preamble(cfg: WorldConfig) -> str:
    return PREAMBLE.format(n=_NUMBER_WORDS[cfg.grid], background=BACKGROUND_NAME)


def cell_sentence(cell: Cell, cfg: WorldConfig) -> str:
    position = position_words(cell.row, cell.col, cfg.grid)
    if cell.empty:
        return EMPTY_SENTENCE.format(position=position, background=BACKGROUND_NAME)
    return SHAPE_SENTENCE.format(position=position, colour=cell.colour, shape=cell.shape, background=BACKGROUND_NAME)


def cell_sentences(scene: Scene, cfg: WorldConfig) -> list[str]:
    _check_scene(scene, cfg)
    return [cell_sentence(cell, cfg) for cell in scene.cells]


def caption(scene: Scene, cfg: WorldConfig) -> str:
    """The preamble, then one sentence per cell in row-major order, joined by spaces."""
    return " ".join([preamble(cfg), *cell_sentences(scene, cfg)])


def shape_mask(shape: str, size: int) -> np.ndarray:
    """A bool [size, size] mask; a pixel is inside if its centre is (no anti-aliasing)."""
    y = (np.arange(size) + 0.5)[:, None]  # pixel centres
    x = (np.arange(size) + 0.5)[None, :]
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - size / 2) ** 2 + (y - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        # Apex up, base along the bottom row; the apex row is 2 px wide, not a lone pixel.
        return np.abs(x - size / 2) <= (y + 0.5) / 2
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """The scene as a uint8 [H, W, 3] image."""
    _check_scene(scene, cfg)
    image = np.empty((cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    box = cfg.box_size
    for cell in scene.cells:
        if cell.empty:
            continue
        top, left = cell.row * cfg.cell_size + cfg.margin, cell.col * cfg.cell_size + cfg.margin
        image[top : top + box, left : left + box][shape_mask(cell.shape, box)] = cfg.rgb(cell.colour)
    return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1] (the layout a VAE decodes to, after rescaling)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def to_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Either a uint8 [H, W, 3] array or a float [3, H, W] tensor in [0, 1] -> uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"expected a float [3, H, W] tensor in [0, 1], got {image.dtype} {tuple(image.shape)}")
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
    return image


def make_dataset(cfg: WorldConfig, n: int, seed: int) -> list[tuple[np.ndarray, str, Scene]]:
    """n (image, caption, scene) triples; the same seed gives byte-identical images and captions."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(cfg, rng) for _ in range(n)]
    return [(render(scene, cfg), caption(scene, cfg), scene) for scene in scenes]
