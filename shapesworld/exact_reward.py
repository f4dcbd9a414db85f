"""`shapes_exact`: the exact ShapesWorld checker as a reward, the way GenEval's rule-based
checks serve Flow-GRPO. Non-differentiable (it reads pixels through nearest-palette
labelling and blob shapes), so only a policy-gradient algorithm can optimise it; reward
backpropagation refuses it on the driver.

    total      = mean over the caption's cell sentences of (colour right and shape right)
    components = "exact/colour", "exact/shape" (the fraction right per image), "exact/background"

`positions` (1-based sentence positions, e.g. [3, 4]) restricts which cell sentences count,
the way a GenEval task checks only what its prompt is about; by default all of them.

The prompts must be captions of the default world (prompts.source: shapesworld.plugin:captions).
"""

from __future__ import annotations

import torch

from longalign_rl.registry import Reward, RewardOutput
from shapesworld.checker import check
from shapesworld.evaluate import background_clean
from shapesworld.world import WorldConfig


class ExactChecker(Reward):
    differentiable = False

    def __init__(self, background_weight: float = 0.0, positions: list[int] | None = None):
        super().__init__()
        if not 0.0 <= background_weight <= 1.0:
            raise ValueError(f"background_weight must be in [0, 1], got {background_weight!r}")
        self.cfg = WorldConfig()
        cells = self.cfg.grid ** 2
        if positions is not None and (not positions or not all(isinstance(p, int) and 1 <= p <= cells
                                                                    for p in positions)):
            raise ValueError(f"positions must be sentence positions in 1..{cells}, got {positions!r}")
        self.positions = sorted(set(positions)) if positions is not None else None
        self.background_weight = float(background_weight)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        both, colour, shape, background = [], [], [], []
        for image, prompt in zip(images.detach().float().cpu(), prompts):
            results = check(image, prompt, self.cfg)
            if self.positions is not None:
                results = [results[p - 1] for p in self.positions]
            both.append(sum(r.colour_ok and r.shape_ok for r in results) / len(results))
            colour.append(sum(r.colour_ok for r in results) / len(results))
            shape.append(sum(r.shape_ok for r in results) / len(results))
            background.append(background_clean(image, self.cfg))
        background_t = torch.tensor(background)
        total = (1 - self.background_weight) * torch.tensor(both) + self.background_weight * background_t
        return RewardOutput(total=total.to(images.device),
                            components={"exact/colour": torch.tensor(colour), "exact/shape": torch.tensor(shape),
                                        "exact/background": background_t})


def shapes_exact(**kwargs) -> ExactChecker:
    return ExactChecker(**kwargs)
