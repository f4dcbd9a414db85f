"""Rewards for policy-gradient training (issue 11, item 4): the exact ShapesWorld checker as a
non-differentiable reward, and a weighted sum of rewards with every part logged. Reward
backpropagation refuses a non-differentiable reward on the driver."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longalign_rl import preflight, train
from longalign_rl.registry import get_reward, probe_reward
from shapesworld import Cell, Scene, WorldConfig, caption, render, to_tensor

SCENE = Scene((Cell(0, 0, "square", "red"), Cell(0, 1, "circle", "green"),
               Cell(1, 0, "triangle", "blue"), Cell(1, 1, "circle", "white")))


def with_cell(scene: Scene, index: int, **change) -> Scene:
    cells = list(scene.cells)
    cells[index] = replace(cells[index], **change)
    return Scene(tuple(cells))


def images(*scenes):
    return torch.stack([to_tensor(render(s, WorldConfig())) for s in scenes])


def test_the_exact_checker_scores_the_fraction_of_sentences_drawn_right():
    reward = get_reward("shapes_exact")
    assert reward.differentiable is False
    text = caption(SCENE, WorldConfig())
    out = reward(images(SCENE, with_cell(SCENE, 2, colour="yellow"), with_cell(SCENE, 3, shape="square")), [text] * 3)
    assert out.total.tolist() == [1.0, 0.75, 0.75]
    assert out.components["exact/colour"].tolist() == [1.0, 0.75, 1.0]
    assert out.components["exact/shape"].tolist() == [1.0, 1.0, 0.75]
    assert out.components["exact/background"].tolist() == [1.0, 1.0, 1.0]
    probe_reward(reward, "shapes_exact", [text], 32)  # non-differentiable: no gradient is asked for


def test_a_weighted_sum_adds_its_parts_and_logs_each():
    text = caption(SCENE, WorldConfig())
    x = images(SCENE, with_cell(SCENE, 0, colour="blue"))
    summed = get_reward("weighted_sum", rewards=[{"name": "shapes_exact", "weight": 2.0},
                                                 {"name": "shapes_checker", "weight": 0.5},
                                                 {"name": "shapes_exact", "weight": -1.0}])
    out = summed(x, [text] * 2)
    exact, soft = get_reward("shapes_exact")(x, [text] * 2), get_reward("shapes_checker")(x, [text] * 2)
    torch.testing.assert_close(out.total, 2.0 * exact.total + 0.5 * soft.total - exact.total)
    assert {"shapes_exact", "shapes_checker", "shapes_exact#2", "shapes_exact/exact/colour",
            "shapes_checker/colour"} <= set(out.components)
    assert summed.differentiable is False  # one part is not
    assert get_reward("weighted_sum", rewards=[{"name": "shapes_checker"}]).differentiable is True


@pytest.mark.parametrize("rewards, message", [
    ([], "non-empty list"),
    ([{"name": "shapes_exact", "wieght": 1}], r"rewards\[0\] must be a mapping with name, weight"),
    ([{"name": "shapes_exact", "weight": "1"}], r"rewards\[0\].weight must be a number"),
    ([{"name": "no_such_reward"}], "unknown reward 'no_such_reward'"),
])
def test_a_bad_weighted_sum_names_the_part(rewards, message):
    with pytest.raises(ValueError, match=message):
        get_reward("weighted_sum", rewards=rewards)


def test_reward_backprop_refuses_a_non_differentiable_reward_on_the_driver(tmp_path, capsys):
    code = train.main(["reward.name=shapes_exact", "reward.kwargs={}", f"run.output_dir={tmp_path}", "run.name=r"])
    err = capsys.readouterr().err
    assert code == 2 and "reward 'shapes_exact' is not differentiable" in err, err
    assert not (tmp_path / "r").exists()
    assert "algorithm.name: ddpo or grpo optimises any reward" in err  # and says what would take it


def test_policy_gradients_accept_a_non_differentiable_reward_on_the_driver():
    """check_reward builds and probes shapes_exact for grpo without asking for a gradient, and the
    driver's description names the algorithm."""
    from longalign_rl.config import load_config
    from longalign_rl.prompts import load_prompts

    cfg = load_config(train.DEFAULT_CONFIG, ["algorithm.name=grpo", "reward.name=shapes_exact", "reward.kwargs={}"])
    preflight.check_reward(cfg, load_prompts(cfg.prompts.source)[:2])
    text = preflight.describe(cfg, Path("/tmp/r"))
    assert "grpo: 4 samples per prompt" in text and "eta 1.0, 10 trained" in text
    rb = load_config(train.DEFAULT_CONFIG, [])
    assert "reward backpropagation" in preflight.describe(rb, Path("/tmp/r"))
    # on a flow model sampler.eta is Flow-GRPO's noise level, and the header calls it that
    flow = load_config(Path(train.DEFAULT_CONFIG).parent / "tiny_sd3.yaml",
                       ["algorithm.name=grpo", "algorithm.group_size=2", "sampler.eta=0.7"])
    text = preflight.describe(flow, Path("/tmp/r"))
    assert "flow-matching Euler steps (SDE noise level 0.7" in text and "eta" not in text, text


def test_the_exact_reward_can_count_only_some_sentence_positions():
    from shapesworld.checker import check
    from shapesworld.world import WorldConfig, render, sample_scene, caption
    import numpy as np

    cfg = WorldConfig()
    scene = sample_scene(cfg, np.random.default_rng(3))
    text = caption(scene, cfg)
    image = torch.from_numpy(render(scene, cfg)).permute(2, 0, 1).float() / 255
    wrong = image.clone()
    size = cfg.image_size // cfg.grid
    wrong[:, :size, :size] = 1.0 - wrong[:, :size, :size]  # spoil cell 1 only
    assert [r.colour_ok and r.shape_ok for r in check(wrong, text, cfg)][0] is False
    whole = get_reward("shapes_exact")(torch.stack([image, wrong]), [text] * 2).total
    late = get_reward("shapes_exact", positions=[3, 4])(torch.stack([image, wrong]), [text] * 2).total
    assert whole[0] == 1.0 and whole[1] < 1.0 and late.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="positions"):
        get_reward("shapes_exact", positions=[0])
