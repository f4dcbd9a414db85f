"""A differentiable soft version of the exact ShapesWorld checker (shapesworld/).

The exact checker labels each pixel with its nearest palette colour and reads, per cell,
the colour and the shape; it has no gradient. This reward scores the same claims softly:

- Every pixel gets a softmax over the palette (the background first, then the shape
  colours) of minus its squared RGB distance to each, over `temperature`. Its soft
  foreground is 1 - p(background).
- A cell is read where the checker reads it: the cell less half its margin on each side.
- Colour: the foreground-weighted mean probability of the claimed colour over that region.
- Shape: the soft IoU of the foreground with the claimed shape's mask, drawn in that cell
  by world.render itself (so the geometry cannot drift from the generator's).
- A cell the sentence calls empty scores exp(-foreground pixels / the checker's empty
  threshold) for both: 1 when empty, 0.37 at the checker's threshold, ~0 with a shape.
Unlike the checker (any position or scale), the shape term wants the shape where
render() draws it: the one place a generator trained on ShapesWorld should put it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from longalign_rl.registry import Reward, RewardOutput
from shapesworld.checker import EMPTY_FRACTION, parse_caption
from shapesworld.world import BACKGROUND_RGB, COLOURS, SHAPES, Cell, Scene, WorldConfig, render


class SoftShapesChecker(Reward):
    """Per cell sentence: colour_weight * soft colour + shape_weight * soft shape, in [0, 1]."""

    differentiable = True

    def __init__(self, cfg: WorldConfig, colour_weight: float, shape_weight: float, temperature: float):
        super().__init__()
        if colour_weight < 0 or shape_weight < 0 or not math.isclose(colour_weight + shape_weight, 1.0):
            raise ValueError(
                f"colour_weight and shape_weight must be >= 0 and sum to 1 (so a sentence scores in [0, 1]), "
                f"got {colour_weight} and {shape_weight}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cfg, self.colour_weight, self.shape_weight, self.temperature = cfg, colour_weight, shape_weight, temperature
        self.inset = cfg.margin // 2  # as the checker: ignore paint bleeding in from a neighbour
        self.region = cfg.cell_size - 2 * self.inset  # side of the region read per cell
        self.min_pixels = EMPTY_FRACTION * cfg.box_size**2  # the checker's empty threshold
        palette = torch.tensor([BACKGROUND_RGB] + [rgb for _, rgb in cfg.colours], dtype=torch.float32) / 255.0
        self.register_buffer("palette", palette, persistent=False)  # [K + 1, 3]
        self.register_buffer("templates", self._templates(), persistent=False)  # [n_cells, n_shapes, R, R]

    def _templates(self) -> torch.Tensor:
        """Each shape's mask in each cell's region, drawn by render() of a one-shape scene."""
        cfg, n = self.cfg, self.cfg.grid**2
        positions = [divmod(i, cfg.grid) for i in range(n)]
        colour = cfg.colours[0][0]
        out = torch.zeros(n, len(cfg.shapes), self.region, self.region)
        for i, (row, col) in enumerate(positions):
            for s, shape in enumerate(cfg.shapes):
                cells = tuple(Cell(r, c, shape, colour) if j == i else Cell(r, c) for j, (r, c) in enumerate(positions))
                drawn = np.any(render(Scene(cells), cfg) != BACKGROUND_RGB, axis=-1)
                out[i, s] = torch.from_numpy(self._crop(drawn, row, col).copy())
        return out

    def _crop(self, a, row: int, col: int):
        """The region the checker reads of cell (row, col), from the last two axes of `a`."""
        top, left = row * self.cfg.cell_size + self.inset, col * self.cfg.cell_size + self.inset
        return a[..., top : top + self.region, left : left + self.region]

    def _claims(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per prompt and cell: colour index into the palette (0 if empty), shape index, empty flag."""
        colours = {name: k + 1 for k, (name, _) in enumerate(self.cfg.colours)}
        shapes = {name: s for s, name in enumerate(self.cfg.shapes)}
        colour_idx, shape_idx, empty = [], [], []
        for i, prompt in enumerate(prompts):
            try:
                scene = parse_caption(prompt, self.cfg)
            except ValueError as e:
                raise ValueError(f"prompt {i} is not a ShapesWorld caption: {e}") from e
            colour_idx.append([0 if c.empty else colours[c.colour] for c in scene.cells])
            shape_idx.append([0 if c.empty else shapes[c.shape] for c in scene.cells])
            empty.append([c.empty for c in scene.cells])
        return torch.tensor(colour_idx), torch.tensor(shape_idx), torch.tensor(empty)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        """images: float [B, 3, H, W] in [0, 1] (any H, W: resized to image_size); prompts: B captions."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        colour_idx, shape_idx, empty = (t.to(images.device) for t in self._claims(prompts))
        size = self.cfg.image_size
        x = images.float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

        # [B, K + 1, H, W]: each pixel's soft palette label.
        distance = ((x[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)
        probs = torch.softmax(-distance / self.temperature, dim=1)
        grid = self.cfg.grid
        cells = torch.stack([self._crop(probs, *divmod(i, grid)) for i in range(grid**2)], dim=1)  # [B, n, K+1, R, R]
        foreground = 1.0 - cells[:, :, 0]  # [B, n, R, R]
        claimed = cells.gather(2, colour_idx[:, :, None, None, None].expand(-1, -1, 1, *cells.shape[-2:]))[:, :, 0]
        template = self.templates[torch.arange(grid**2, device=images.device)[None], shape_idx]  # [B, n, R, R]

        fg_pixels = foreground.sum((-1, -2))
        colour = claimed.sum((-1, -2)) / (fg_pixels + 1e-6)
        overlap = (foreground * template).sum((-1, -2))
        shape = overlap / (fg_pixels + template.sum((-1, -2)) - overlap + 1e-6)
        emptiness = torch.exp(-fg_pixels / self.min_pixels)
        colour, shape = torch.where(empty, emptiness, colour), torch.where(empty, emptiness, shape)
        sentences = self.colour_weight * colour + self.shape_weight * shape  # [B, n]
        return RewardOutput(
            total=sentences.mean(1),
            components={"colour": colour.mean(1).detach(), "shape": shape.mean(1).detach()},
            segment_scores=list(sentences.detach().unbind(0)),
        )


def shapes_checker(
    image_size: int = 32,
    grid: int = 2,
    colours: tuple[tuple[str, tuple[int, int, int]], ...] = COLOURS,
    shapes: tuple[str, ...] = SHAPES,
    colour_weight: float = 0.5,
    shape_weight: float = 0.5,
    # Softmax temperature in squared RGB distance (channels in [0, 1]; palette colours are
    # >= 1 apart): at 0.05 a pixel 0.4 off in one channel still gives its colour p ~ 0.98.
    temperature: float = 0.05,
) -> SoftShapesChecker:
    """The world is described as in WorldConfig (same defaults); unknown keywords are a TypeError."""
    colours = tuple((name, tuple(rgb)) for name, rgb in colours)  # YAML gives lists
    cfg = WorldConfig(image_size=image_size, grid=grid, colours=colours, shapes=tuple(shapes))
    return SoftShapesChecker(cfg, colour_weight, shape_weight, temperature)
