"""`shapes_pref`, the ShapesWorld preference model trained on simulated raters' choices over
generated images (shapesworld/pref_train.py): found by name, decomposed like every
CLIP-type reward, ranking checker-correct images first, and with a text-irrelevant part
that follows the raters' prompt-independent taste (ink) for a fixed caption."""

import pytest
import torch
import torch.nn.functional as F

from longalign_rl.registry import get_reward
from rewards.decomposed import ClipTypeReward
from shapesworld import WorldConfig, make_dataset, to_tensor
from shapesworld.clip_train import mismatched
from shapesworld.evaluate import draw_captions
from shapesworld.pref_train import PrefConfig, accuracy, ink, rater_pairs, reink
from shapesworld.world import render

WORLD = WorldConfig()


@pytest.fixture(scope="module")
def pref():
    return get_reward("shapes_pref", text_irrelevant_weight=1.0)


def test_found_by_name_and_decomposed_like_the_presets(pref):
    assert isinstance(pref, ClipTypeReward) and pref.differentiable


def test_ranks_the_checker_correct_image_above_a_wrong_one_for_the_same_caption(pref):
    import numpy as np

    rng = np.random.default_rng(3)
    data = make_dataset(WORLD, 32, seed=21)
    captions = [text for _, text, _ in data]
    right = torch.stack([to_tensor(image) for image, _, _ in data])
    wrong = torch.stack([to_tensor(render(mismatched(scene, WORLD, rng, what), WORLD))
                         for (_, _, scene), what in zip(data, ["colour", "shape"] * 16)])
    assert accuracy(right, captions).min() == 1.0 and accuracy(wrong, captions).max() < 1.0
    better = pref(right, captions).total > pref(wrong, captions).total
    assert better.float().mean() >= 0.9, better


def test_its_text_irrelevant_part_rises_with_ink_for_a_fixed_caption(pref):
    captions = draw_captions(WORLD, 64, seed=22)
    v = F.normalize(pref.text_embeddings(captions).mean(0), dim=0)  # the shared direction
    data = make_dataset(WORLD, 8, seed=23)
    clean = torch.stack([to_tensor(image) for image, _, _ in data])
    t = pref.text_embeddings([text for _, text, _ in data])
    levels = [-0.6, 0.0, 0.6]
    irrelevant = []
    for amount in levels:
        images = reink(clean, torch.full((len(clean),), amount))
        irrelevant.append((t @ v) * (pref.image_embeddings(images) @ v))
    assert bool((ink(reink(clean, torch.full((8,), 0.6))) > ink(clean)).all())
    # For every caption, more ink -> a larger (t·v)(f·v): the raters' taste sits in that part.
    assert bool((irrelevant[2] > irrelevant[1]).all() and (irrelevant[1] > irrelevant[0]).all()), irrelevant


def test_raters_prefer_the_correct_and_then_the_inkier_image():
    pc = PrefConfig(pairs_per_caption=200, tau=0.02)
    pool = {"accuracy": torch.tensor([1.0, 0.75, 1.0]), "ink": torch.tensor([0.3, 0.3, 0.5]),
            "group": torch.tensor([0, 0, 0])}
    pairs = rater_pairs(pool, pc, seed=0)
    wins = torch.zeros(3)
    for a, b, prefer_a in pairs.tolist():
        wins[a if prefer_a else b] += 1
    assert wins[2] > wins[0] > wins[1]  # accuracy + 0.5 ink: 1.15 > 1.0 > 0.9


def test_reink_grows_or_shrinks_the_shapes_and_stays_in_range():
    image = torch.stack([to_tensor(render(make_dataset(WORLD, 1, seed=5)[0][2], WORLD))])
    more, less = reink(image, torch.tensor([0.8])), reink(image, torch.tensor([-0.8]))
    assert ink(more) > ink(image) > ink(less)
    assert 0.0 <= float(less.min()) and float(more.max()) <= 1.0
    torch.testing.assert_close(reink(image, torch.tensor([0.0])), image)
