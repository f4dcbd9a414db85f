"""The soft ShapesWorld checker (shapesworld/soft_checker.py): found through the registry, near 1 on
clean renders and above every mismatched caption, lowered by exactly the perturbed cell,
differentiable, and ranked like the exact checker."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from longalign_rl.registry import get_reward
from shapesworld import Cell, Scene, WorldConfig, caption, check, make_dataset, render, to_tensor
from shapesworld.soft_checker import SoftShapesChecker, shapes_checker

NAME = "shapesworld.soft_checker:shapes_checker"
WITH_EMPTIES = WorldConfig(empty_prob=0.25)
GRID3 = WorldConfig(image_size=48, grid=3, empty_prob=0.25)


def batch(data):
    return torch.stack([to_tensor(image) for image, _, _ in data]), [text for _, text, _ in data]


def with_cell(scene: Scene, index: int, **change) -> Scene:
    cells = list(scene.cells)
    cells[index] = replace(cells[index], **change)
    return Scene(tuple(cells))


def test_factory_is_found_by_import_path_and_builds_the_configured_world():
    reward = get_reward(NAME, image_size=48, grid=3, temperature=0.1)
    assert isinstance(reward, SoftShapesChecker) and reward.differentiable is True
    assert (reward.cfg.image_size, reward.cfg.grid, reward.temperature) == (48, 3, 0.1)
    assert reward.templates.shape[:2] == (9, 3)
    assert get_reward(NAME).cfg == WorldConfig()  # the defaults are WorldConfig's


@pytest.mark.parametrize("cfg", [WITH_EMPTIES, GRID3], ids=["2x2", "3x3"])
def test_clean_renders_score_high_and_above_another_scenes_caption(cfg):
    data = make_dataset(cfg, 50, seed=1)
    images, texts = batch(data)
    reward = shapes_checker(image_size=cfg.image_size, grid=cfg.grid)
    out = reward(images, texts)
    others = texts[1:] + texts[:1]
    assert all(a != b for a, b in zip(texts, others))
    mismatched = reward(images, others)
    assert out.total.shape == (50,) and (out.total > 0.9).all()
    assert (out.total > mismatched.total).all()
    assert [s.shape for s in out.segment_scores] == [(cfg.grid**2,)] * 50
    torch.testing.assert_close(out.total, torch.stack([s.mean() for s in out.segment_scores]))
    assert all(((s >= 0) & (s <= 1)).all() for s in mismatched.segment_scores)


def test_other_image_sizes_are_resized_first():
    images, texts = batch(make_dataset(WorldConfig(), 8, seed=2))
    reward = shapes_checker()
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    assert (reward(big, texts).total > 0.9).all()
    assert (reward(big, texts[1:] + texts[:1]).total < reward(big, texts).total).all()


def test_a_wrong_colour_lowers_that_sentence_and_the_colour_component():
    cfg = WorldConfig()
    scene = Scene((Cell(0, 0, "square", "red"), Cell(0, 1, "circle", "green"),
                   Cell(1, 0, "triangle", "blue"), Cell(1, 1, "circle", "white")))  # fmt: skip
    text = caption(scene, cfg)
    reward = shapes_checker()
    right = reward(to_tensor(render(scene, cfg))[None], [text])
    wrong = reward(to_tensor(render(with_cell(scene, 2, colour="yellow"), cfg))[None], [text])
    drop = right.segment_scores[0] - wrong.segment_scores[0]
    assert drop[2] > 0.3 and torch.allclose(drop[[0, 1, 3]], torch.zeros(3), atol=1e-4)
    assert wrong.components["colour"] < right.components["colour"] - 0.2
    torch.testing.assert_close(wrong.components["shape"], right.components["shape"])


@pytest.mark.parametrize("new_shape", ["circle", "triangle"])
def test_a_wrong_shape_lowers_that_sentence_and_the_shape_component(new_shape):
    cfg = WorldConfig()
    scene = Scene((Cell(0, 0, "square", "red"), Cell(0, 1, "square", "green"),
                   Cell(1, 0, "triangle", "blue"), Cell(1, 1, "circle", "cyan")))  # fmt: skip
    text = caption(scene, cfg)
    reward = shapes_checker()
    right = reward(to_tensor(render(scene, cfg))[None], [text])
    wrong = reward(to_tensor(render(with_cell(scene, 1, shape=new_shape), cfg))[None], [text])
    drop = right.segment_scores[0] - wrong.segment_scores[0]
    assert drop[1] > 0.05 and torch.allclose(drop[[0, 2, 3]], torch.zeros(3), atol=1e-4)
    assert wrong.components["shape"] < right.components["shape"] - 0.05
    torch.testing.assert_close(wrong.components["colour"], right.components["colour"])


def test_an_empty_claim_wants_an_empty_cell():
    cfg = WorldConfig()
    empty = Scene((Cell(0, 0), Cell(0, 1, "circle", "red"), Cell(1, 0, "square", "blue"), Cell(1, 1)))
    filled = with_cell(empty, 0, shape="triangle", colour="white")
    reward = shapes_checker()
    text = caption(empty, cfg)
    out = reward(torch.stack([to_tensor(render(empty, cfg)), to_tensor(render(filled, cfg))]), [text, text])
    assert out.segment_scores[0][0] > 0.99 and out.segment_scores[1][0] < 0.1
    assert torch.allclose(out.segment_scores[0][1:], out.segment_scores[1][1:])


def test_gradients_reach_the_images_and_ascent_raises_the_score():
    data = make_dataset(WorldConfig(), 4, seed=3)
    _, texts = batch(data)
    reward = shapes_checker()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    reward(images, texts).total.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0

    logits = torch.zeros(4, 3, 64, 64, requires_grad=True)  # grey images: nothing right yet
    start = reward(torch.sigmoid(logits), texts).total.detach()
    optimiser = torch.optim.Adam([logits], lr=0.2)
    for _ in range(30):
        optimiser.zero_grad()
        (-reward(torch.sigmoid(logits), texts).total.sum()).backward()
        optimiser.step()
    end = reward(torch.sigmoid(logits), texts).total.detach()
    assert (end > start + 0.2).all()


def test_soft_scores_rank_like_the_exact_checker():
    """Noisy renders of perturbed scenes, each scored against its original caption: the
    sentences (and images) the exact checker passes score higher than those it fails."""
    cfg = WITH_EMPTIES
    rng = np.random.default_rng(4)
    images, texts = [], []
    for _, text, scene in make_dataset(cfg, 60, seed=4):
        shown = scene
        for index in rng.choice(4, size=rng.integers(0, 3), replace=False):
            shape, colour = cfg.shapes[rng.integers(3)], cfg.colours[rng.integers(7)][0]
            shown = with_cell(shown, index, shape=None, colour=None) if rng.random() < 0.2 else \
                with_cell(shown, index, shape=shape, colour=colour)  # fmt: skip
        noisy = to_tensor(render(shown, cfg)) + 0.12 * torch.from_numpy(rng.standard_normal((3, 32, 32))).float()
        images.append(noisy.clamp(0, 1))
        texts.append(text)
    images = torch.stack(images)
    out = shapes_checker()(images, texts)
    passed = torch.tensor([[r.ok for r in check(image, text, cfg)] for image, text in zip(images, texts)])
    scores = torch.stack(out.segment_scores)
    assert passed.sum() > 50 and (~passed).sum() > 20  # both kinds are there
    assert scores[passed].mean() > scores[~passed].mean() + 0.3
    all_ok = passed.all(1)
    assert all_ok.any() and (~all_ok).any()
    assert out.total[all_ok].mean() > out.total[~all_ok].mean() + 0.1
    assert out.total[all_ok].min() > out.total[~all_ok].mean()


def test_a_prompt_that_is_not_a_caption_names_its_index():
    images, texts = batch(make_dataset(WorldConfig(), 3, seed=5))
    reward = shapes_checker()
    with pytest.raises(ValueError, match="prompt 1 "):
        reward(images, [texts[0], "a red square on a black background", texts[2]])
    with pytest.raises(ValueError, match="prompt 2 "):
        reward(images, [texts[0], texts[1], texts[2].replace("left", "lfet")])


def test_bad_arguments_are_rejected_by_name():
    with pytest.raises(TypeError, match="colour_wieght"):
        get_reward(NAME, colour_wieght=0.7)
    with pytest.raises(TypeError, match="empty_prob"):
        shapes_checker(empty_prob=0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        shapes_checker(colour_weight=0.7, shape_weight=0.7)
    with pytest.raises(ValueError, match="temperature"):
        shapes_checker(temperature=0.0)
