"""ShapesWorld: the generator is deterministic, captions are long and parse back exactly,
and the checker agrees with the generator on clean renders and fails exactly the
sentence that a perturbation makes false."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from longalign_rl.encoding import split_segments, split_sentences, token_counter
from longalign_rl.encoding.tokenizer import build_clip_tokenizer
from shapesworld import (
    COLOURS,
    SHAPES,
    Cell,
    Scene,
    WorldConfig,
    accuracy_by_position,
    caption,
    cell_sentences,
    check,
    make_dataset,
    parse_caption,
    preamble,
    render,
    sample_scene,
    to_tensor,
    to_uint8,
)

DEFAULT = WorldConfig()
WITH_EMPTIES = WorldConfig(empty_prob=0.25)
GRID3 = WorldConfig(image_size=48, grid=3, empty_prob=0.25)


@pytest.fixture(scope="module")
def count():
    return token_counter(build_clip_tokenizer())


def scenes(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(cfg, rng) for _ in range(n)]


def with_cell(scene, index, **changes):
    return Scene(tuple(replace(c, **changes) if i == index else c for i, c in enumerate(scene.cells)))


def cell_slice(cfg, index):
    row, col = divmod(index, cfg.grid)
    s = cfg.cell_size
    return slice(row * s, (row + 1) * s), slice(col * s, (col + 1) * s)


def assert_only_sentence_fails(results, index, *, colour_ok, shape_ok):
    for r in results:
        if r.index == index:
            assert (r.colour_ok, r.shape_ok) == (colour_ok, shape_ok), r
        else:
            assert r.ok, r


# ---- generator ---------------------------------------------------------------------


def test_same_seed_same_dataset_and_other_seeds_differ():
    a, b, c = (make_dataset(WITH_EMPTIES, 16, seed) for seed in (3, 3, 4))
    assert all(ia.dtype == np.uint8 and ia.tobytes() == ib.tobytes() for (ia, _, _), (ib, _, _) in zip(a, b))
    assert [cap for _, cap, _ in a] == [cap for _, cap, _ in b]
    assert [cap for _, cap, _ in a] != [cap for _, cap, _ in c]
    assert any(ia.tobytes() != ic.tobytes() for (ia, _, _), (ic, _, _) in zip(a, c))
    for image, text, scene in a:  # each triple is self-consistent
        assert image.shape == (32, 32, 3) and np.array_equal(image, render(scene, WITH_EMPTIES))
        assert text == caption(scene, WITH_EMPTIES)


def test_sampling_covers_every_colour_shape_and_empty_cells():
    cells = [cell for scene in scenes(WITH_EMPTIES, 200) for cell in scene.cells]
    assert {c.colour for c in cells} == {name for name, _ in COLOURS} | {None}
    assert {c.shape for c in cells} == set(SHAPES) | {None}
    assert not any(c.empty for scene in scenes(DEFAULT, 200) for c in scene.cells)  # empty_prob 0


def test_tensor_round_trip():
    image = make_dataset(DEFAULT, 1, 0)[0][0]
    tensor = to_tensor(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and 0 <= tensor.min() <= tensor.max() <= 1
    assert np.array_equal(to_uint8(tensor), image)
    with pytest.raises(ValueError, match="uint8"):
        to_uint8(image.astype(np.float32))


def test_config_rejects_what_it_cannot_draw_or_name():
    bad = [
        (dict(grid=4), "grid"),
        (dict(image_size=33), "split"),  # not a multiple of the grid
        (dict(image_size=20), "split"),  # 10 px cells: too small to tell shapes apart
        (dict(shapes=("star",)), "unknown shapes"),
        (dict(empty_prob=1.5), "empty_prob"),
        (dict(colours=(("black", (9, 9, 9)),)), "unique"),
        (dict(colours=(("ink", (0, 0, 0)),)), "background"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            WorldConfig(**kwargs)
    assert WorldConfig(image_size=24).cell_size == 12  # the smallest cell allowed


# ---- captions ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [DEFAULT, WITH_EMPTIES, GRID3], ids=["default", "empties", "grid3"])
def test_captions_parse_back_to_the_same_scene(cfg):
    for scene in scenes(cfg, 300, seed=1):
        assert parse_caption(caption(scene, cfg), cfg) == scene


def test_parse_rejects_text_that_caption_does_not_write():
    scene = scenes(WITH_EMPTIES, 1)[0]
    text = caption(scene, WITH_EMPTIES)
    sentences = [preamble(WITH_EMPTIES)] + cell_sentences(scene, WITH_EMPTIES)
    full = "In the top left cell of the picture there is exactly one red circle on the black background."
    bad = [
        " ".join(sentences[1:]),  # no preamble
        " ".join([sentences[0], sentences[2], sentences[1], *sentences[3:]]),  # cells out of order
        " ".join(sentences[:-1]),  # a cell missing
        text.replace(sentences[1], full.replace("red", "orange")),  # unknown colour
        text.replace(sentences[1], full.replace("circle", "star")),  # unknown shape
        text.replace(". ", ".  ", 1),  # spacing caption() never writes
    ]
    for text in bad:
        with pytest.raises(ValueError):
            parse_caption(text, WITH_EMPTIES)


@pytest.mark.parametrize("cfg", [DEFAULT, WorldConfig(empty_prob=0.5)], ids=["default", "half-empty"])
def test_caption_is_well_over_77_tokens_and_truncation_drops_the_last_cell(cfg, count):
    for scene in scenes(cfg, 100, seed=2):
        text, sentences = caption(scene, cfg), cell_sentences(scene, cfg)
        # CLIP splits on whitespace before BPE, so the caption's count is the sum of its
        # sentences' counts and a sentence's first token index is the count before it.
        assert count(text) == count(preamble(cfg)) + sum(count(s) for s in sentences)
        assert count(text) >= 104
        before_last = count(" ".join([preamble(cfg), *sentences[:-1]]))
        assert before_last >= 75 + 10  # the last sentence starts well past the 75 word tokens kept
        before_third = count(" ".join([preamble(cfg), *sentences[:2]]))
        assert before_third < 75 < before_last  # the third sentence is cut in the middle
    assert count(preamble(DEFAULT)) == 28


@pytest.mark.parametrize("cfg", [WITH_EMPTIES, GRID3], ids=["2x2", "3x3"])
def test_every_sentence_is_its_own_segment(cfg, count):
    for scene in scenes(cfg, 50, seed=3):
        expected = [preamble(cfg)] + cell_sentences(scene, cfg)
        assert split_sentences(caption(scene, cfg)) == expected
        assert split_segments(caption(scene, cfg), count) == expected  # none over 75 tokens


# ---- checker -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, n", [(WITH_EMPTIES, 500), (DEFAULT, 200), (GRID3, 100)], ids=["empties", "default", "grid3"]
)
def test_checker_agrees_with_generator_on_clean_renders(cfg, n):
    for image, text, scene in make_dataset(cfg, n, seed=5):
        results = check(image, text, cfg)
        assert len(results) == cfg.grid**2 and all(r.ok for r in results), [r for r in results if not r.ok]
        assert [(r.seen_colour, r.seen_shape) for r in results] == [(c.colour, c.shape) for c in scene.cells]
        assert [r.sentence for r in results] == cell_sentences(scene, cfg)


def test_checker_fails_exactly_the_perturbed_sentence():
    cfg, seen = WITH_EMPTIES, {"colour": 0, "shape": 0, "added": 0, "removed": 0}
    colours = [name for name, _ in cfg.colours]
    for scene in scenes(cfg, 40, seed=6):
        for i, cell in enumerate(scene.cells):
            if cell.empty:
                image = render(with_cell(scene, i, shape="square", colour="red"), cfg)
                assert_only_sentence_fails(check(image, scene, cfg), i, colour_ok=False, shape_ok=False)
                seen["added"] += 1
                continue
            other_colour = colours[(colours.index(cell.colour) + 1) % len(colours)]
            image = render(with_cell(scene, i, colour=other_colour), cfg)
            assert_only_sentence_fails(check(image, scene, cfg), i, colour_ok=False, shape_ok=True)
            other_shape = SHAPES[(SHAPES.index(cell.shape) + 1) % len(SHAPES)]
            image = render(with_cell(scene, i, shape=other_shape), cfg)
            assert_only_sentence_fails(check(image, scene, cfg), i, colour_ok=True, shape_ok=False)
            image = render(with_cell(scene, i, shape=None, colour=None), cfg)
            assert_only_sentence_fails(check(image, scene, cfg), i, colour_ok=False, shape_ok=False)
            seen["colour"] += 1
            seen["shape"] += 1
            seen["removed"] += 1
    assert min(seen.values()) >= 10, seen


def test_checker_tolerates_mild_noise_and_off_colours():
    rng = np.random.default_rng(7)
    for image, text, _ in make_dataset(WITH_EMPTIES, 200, seed=7):
        noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).round().astype(np.uint8)
        assert all(r.ok for r in check(noisy, text, WITH_EMPTIES))
        # Washed-out colours as a generator might paint them: red (255, 0, 0) -> (218, 40, 40), plus noise.
        dull = torch.clamp(to_tensor(image) * 0.7 + 40 / 255 + 0.04 * torch.randn(3, 32, 32), 0, 1)
        assert all(r.ok for r in check(dull, text, WITH_EMPTIES))


def test_a_stray_speck_does_not_change_the_reading():
    cfg = DEFAULT
    scene = Scene(tuple(Cell(r, c, "circle", "red") for r in range(2) for c in range(2)))
    image = render(scene, cfg)
    image[1:3, 1:3] = cfg.rgb("red")  # a 2 x 2 speck in the top left cell's corner, apart from its circle
    image[17:19, 29:31] = cfg.rgb("blue")  # and one of another colour in the bottom right cell
    # The speck is inside the checked area and would stretch the circle's bounding box to
    # a triangle's fill ratio; only the largest blob is read.
    assert all(r.ok for r in check(image, scene, cfg))


def test_heavy_corruption_of_a_cell_fails_that_sentence_only():
    cfg, rng = WITH_EMPTIES, np.random.default_rng(8)
    for image, _, scene in make_dataset(cfg, 40, seed=8):
        for i in range(len(scene.cells)):
            noisy = image.copy()
            rows, cols = cell_slice(cfg, i)
            noisy[rows, cols] = rng.integers(0, 256, noisy[rows, cols].shape)
            results = check(noisy, scene, cfg)
            assert not results[i].ok and not results[i].shape_ok, results[i]
            assert all(r.ok for r in results if r.index != i)


def test_accuracy_by_position():
    cfg = DEFAULT
    data = make_dataset(cfg, 8, seed=9)
    scenes_, captions = [s for _, _, s in data], [t for _, t, _ in data]
    colours = [name for name, _ in cfg.colours]
    images = []
    for k, scene in enumerate(scenes_):  # the last cell's colour wrong in the first half
        if k < 4:
            last = scene.cells[-1]
            scene = with_cell(scene, 3, colour=colours[(colours.index(last.colour) + 1) % len(colours)])
        images.append(render(scene, cfg))
    expected = {
        "colour": [1, 1, 1, 0.5],
        "shape": [1, 1, 1, 1],
        "sentence": [1, 1, 1, 0.5],
    }
    acc = accuracy_by_position(images, captions, cfg)
    assert {k: v.tolist() for k, v in acc.items()} == expected
    batch = torch.stack([to_tensor(image) for image in images])  # a [B, 3, H, W] batch and Scenes
    assert {k: v.tolist() for k, v in accuracy_by_position(batch, scenes_, cfg).items()} == expected


def test_check_rejects_mismatched_inputs():
    image, text, _ = make_dataset(DEFAULT, 1, 0)[0]
    with pytest.raises(ValueError, match="px"):
        check(np.zeros((48, 48, 3), np.uint8), text, DEFAULT)
    with pytest.raises(ValueError, match="cell sentences"):
        check(np.zeros((48, 48, 3), np.uint8), text, GRID3)  # a 2 x 2 caption against a 3 x 3 config
    with pytest.raises(ValueError):
        accuracy_by_position([image], [], DEFAULT)


def test_samples_to_reach_interpolates_between_evaluations():
    from shapesworld.pg_compare import samples_to_reach

    curve = [(0, 0.60), (100, 0.64), (200, 0.70), (300, 0.66)]
    assert samples_to_reach(curve, 0.62) == pytest.approx(50)
    assert samples_to_reach(curve, 0.67) == pytest.approx(150)
    assert samples_to_reach(curve, 0.60) == 0
    assert samples_to_reach(curve, 0.71) is None


def test_the_regularisers_table_has_three_seeds_per_condition_and_averages_them():
    from shapesworld.guard_compare import REGULARISERS, regulariser_report

    assert len({name for name, *_ in REGULARISERS}) == len(REGULARISERS)
    seeds: dict = {}
    for _, seed, reward, w, override in REGULARISERS:
        seeds.setdefault((reward, w, override), []).append(seed)
    assert all(sorted(s) == [0, 1, 2] for s in seeds.values()) and len(seeds) == 4

    def held(colour: float, shape1: float) -> dict:
        return {"colour": [colour] * 4, "shape": [shape1, colour, colour, colour]}

    runs = [{"name": f"kl_s{seed}", "seed": seed, "reward": "shapes_pref", "w": 1.0, "override": "algorithm.kl_weight=10.0",
             "held_out": {"12": held(0.8 + 0.1 * seed, 0.5)}, "metrics": [{"reward": 0.1, "kl": 0.002 * (seed + 1)}]}
            for seed in range(2)]
    table = regulariser_report({"runs": runs}).splitlines()
    assert len(table) == 3 and table[2].startswith("| shapes_pref, w = 1 | `algorithm.kl_weight=10.0` | 0, 1 | ")
    # accuracy: the mean of 4 colours and 4 shapes, 6.1 / 8 and 6.8 / 8 -> 0.806 ± 0.044; kl 0.002, 0.004
    assert "0.806 ± 0.044, 0.500 ± 0.000" in table[2] and table[2].endswith("| 0.003 ± 0.001 |")
