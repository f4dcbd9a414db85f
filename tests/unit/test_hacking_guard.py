"""The guard against reward hacking (longalign_rl/guard.py, issue 27): the judges' config,
the verdict after each validation (selection, divergence, early stop), best/ and the
summary's selection section. The runs themselves: tests/e2e/test_guard_run.py."""

import json
import math

import numpy as np
import pytest
import torch

from longalign_rl import guard
from longalign_rl.config import ConfigError, from_dict, load_config, to_dict
from longalign_rl.summary import format_markdown, format_summary
from tests import REPO


def config(**run):
    """The default run (configs/default.yaml: ShapesWorld, tiny models) with `run` keys."""
    data = to_dict(load_config(REPO / "configs" / "default.yaml"))
    data["run"].update(run)
    return from_dict(data)


def record(step: int, **values: list[float]) -> dict:
    return {"step": step, "prompts": len(next(iter(values.values()))),
            "means": {k: float(np.mean(v)) for k, v in values.items()},
            "values": {k: [float(x) for x in v] for k, v in values.items()}}


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("entry, message", [
    ("shapes_clip", "run.judge[0]: expected a mapping"),
    ({"reward": "shapes_clip", "metric": "a.b:c"}, "run.judge[0]: needs exactly one of 'reward' or 'metric'"),
    ({"reward": "shapes_clip", "weight": 2}, "run.judge[0]: needs exactly one of"),
    ({"metric": "not a path"}, "run.judge[0].metric: must be an import path"),
    ({"metric": "a.b:c", "kwargs": {"x": 1}}, "run.judge[0]: a metric hook takes no kwargs"),
    ({"reward": "shapes_clip", "kwargs": [1]}, "run.judge[0].kwargs: expected a mapping"),
    ({"reward": "shapes_clip", "name": "a/b"}, "run.judge[0].name: 'a/b' cannot be a key"),
    ({"reward": ""}, "run.judge[0].reward: expected a name"),
])
def test_a_bad_judge_is_named_by_its_index(entry, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config(judge=[entry])


def test_two_judges_of_one_name_need_their_own_names():
    with pytest.raises(ConfigError, match=r"run.judge\[1\]: a second judge named 'shapes_clip'"):
        config(judge=[{"reward": "shapes_clip"}, {"reward": "shapes_clip", "kwargs": {"text_irrelevant_weight": 1.0}}])
    cfg = config(judge=[{"reward": "shapes_clip"},
                        {"reward": "shapes_clip", "name": "clip_w1", "kwargs": {"text_irrelevant_weight": 1.0}}])
    assert [e.name for e in guard.judge_entries(cfg.run.judge)] == ["shapes_clip", "clip_w1"]


def test_the_guard_needs_validation_and_early_stopping_needs_a_key():
    with pytest.raises(ConfigError, match="run.judge: works on the validation prompts, but run.validation_size is 0"):
        config(judge=[{"reward": "shapes_clip"}], validation_size=0)
    with pytest.raises(ConfigError, match="run.select_by.key: works on the validation prompts"):
        config(select_by={"key": "reward"}, validation_size=0)
    with pytest.raises(ConfigError, match="run.early_stop: needs a key to watch"):
        config(early_stop={"on_drop": True})
    with pytest.raises(ConfigError, match="run.early_stop.patience: must be >= 0"):
        config(early_stop={"patience": -1}, select_by={"key": "reward"})
    with pytest.raises(ConfigError, match=r"run.select_by.within: must be >= 0 standard errors"):
        config(select_by={"within": -1.0}, **JUDGED)
    with pytest.raises(ConfigError, match="unknown config key 'run.select_by.mode'"):
        config(select_by={"key": "reward", "mode": "max"})


def test_the_selecting_key_is_the_first_judges_unless_named():
    assert guard.selection_key(config().run) is None  # no guard: lora/ is the last step's, as before
    assert guard.selection_key(config(judge=[{"reward": "tests.plugins.my_reward:MyReward"}]).run) == "judge/MyReward"
    assert guard.selection_key(config(judge=[{"metric": "shapesworld.plugin:ground_truth"}]).run) == guard.JUDGE
    named = config(judge=[{"reward": "shapes_clip"}], select_by={"key": "gt/shape", "higher_is_better": True})
    assert guard.selection_key(named.run) == "gt/shape"
    # a metric judge's key is its first value, found in the record
    r = record(0, reward=[0.1, 0.2], **{"judge/gt/colour": [1.0, 0.0], "judge/gt/shape": [0.5, 0.5]})
    assert guard.resolve_key(guard.JUDGE, r) == "judge/gt/colour"
    with pytest.raises(ConfigError, match=r"run.select_by.key: the validation at step 0 has no 'judge/x'; its keys: "
                                          r"reward, judge/gt/colour, judge/gt/shape"):
        guard.resolve_key("judge/x", r)


# ------------------------------------------------------------------ the verdict

JUDGED = dict(judge=[{"reward": "tests.plugins.my_reward:MyReward", "name": "j"}])


def hacked_records():
    """The reward rises at every validation; the judge rises to step 2, then falls on every prompt."""
    judge = [[0.50, 0.52, 0.48, 0.50], [0.60, 0.61, 0.59, 0.62], [0.70, 0.72, 0.69, 0.71],
             [0.60, 0.61, 0.58, 0.60], [0.40, 0.42, 0.41, 0.39]]
    return [record(s, reward=[0.1 * s + d for d in (0.0, 0.01, 0.02, 0.0)], **{"judge/j": judge[s]})
            for s in range(5)]


def test_the_best_validation_is_selected_and_a_fall_under_a_rising_reward_is_divergence():
    run = config(**JUDGED).run
    verdicts = guard.history(run, hacked_records())
    assert [v.best_step for v in verdicts] == [0, 1, 2, 2, 2]
    assert [v.selected_step for v in verdicts] == [0, 1, 2, 2, 2]  # the falls are beyond the uncertainty
    assert [v.since_best for v in verdicts] == [0, 0, 0, 1, 2]
    assert [v.diverging for v in verdicts] == [False, False, False, True, True]
    last = verdicts[-1]
    assert last.change == pytest.approx(np.mean([0.40, 0.42, 0.41, 0.39]) - np.mean([0.70, 0.72, 0.69, 0.71]))
    assert last.uncertainty is not None and last.change < -last.uncertainty
    assert last.reward_change == pytest.approx(0.2) and last.stop is None  # no early stop asked for
    lines = guard.format_verdict(last)
    assert lines[0].startswith("selection: step 2, judge/j 0.705; now 0.405 (-0.3")
    assert lines[1].startswith("warning: the reward and judge/j diverge since step 2: reward +0.2")


def test_a_fall_with_the_reward_is_not_divergence_and_noise_is_not_a_fall():
    run = config(**JUDGED).run
    both_fall = [record(0, reward=[0.5, 0.5, 0.6], **{"judge/j": [0.5, 0.6, 0.7]}),
                 record(1, reward=[0.2, 0.3, 0.2], **{"judge/j": [0.3, 0.4, 0.5]})]
    v = guard.assess(run, both_fall)
    assert v.best_step == 0 and v.change == pytest.approx(-0.2) and not v.diverging
    noisy = [record(0, reward=[0.5, 0.5, 0.5], **{"judge/j": [0.5, 0.6, 0.7]}),
             record(1, reward=[0.6, 0.6, 0.6], **{"judge/j": [0.6, 0.4, 0.75]})]
    v = guard.assess(run, noisy)
    assert v.change < 0 and -v.change < v.uncertainty and not v.diverging


def test_early_stop_on_a_drop_or_after_patience_and_ties_go_to_the_later_validation():
    records = hacked_records()
    on_drop = config(**JUDGED, early_stop={"on_drop": True}).run
    stops = [v.stop for v in guard.history(on_drop, records)]
    assert stops[:3] == [None, None, None] and stops[3].startswith("judge/j fell from 0.705 (step 2) to 0.5975")
    patience = config(**JUDGED, early_stop={"patience": 2}).run
    assert [v.stop is not None for v in guard.history(patience, records)] == [False, False, False, False, True]
    flat = [record(s, reward=[0.1, 0.2], **{"judge/j": [0.5, 0.5]}) for s in range(3)]
    assert guard.assess(patience, flat).best_step == 2  # equal: the later, trained longer
    lower = config(select_by={"key": "ink", "higher_is_better": False}).run
    inks = [record(s, ink=[x, x]) for s, x in enumerate([0.3, 0.1, 0.2])]
    v = guard.assess(lower, inks)
    assert (v.best_step, v.since_best, v.reward_change, v.diverging) == (1, 1, None, False)


def test_the_latest_validation_within_the_uncertainty_of_the_best_is_selected():
    """A run still improving, measured on a few noisy prompts: the best validation is an early
    one by chance, and the later ones are within its uncertainty; the latest of them is
    selected. A fall beyond the uncertainty sends the selection back to the latest before it."""
    run = config(**JUDGED, early_stop={"patience": 5}).run
    judge = [[0.3, 0.5, 0.4, 0.6], [0.9, 0.5, 0.8, 0.6], [0.6, 0.8, 0.5, 0.8], [0.8, 0.5, 0.7, 0.7],
             [0.2, 0.3, 0.2, 0.1]]
    records = [record(s, reward=[0.1 * s] * 4, **{"judge/j": judge[s]}) for s in range(5)]
    verdicts = guard.history(run, records)
    assert [v.best_step for v in verdicts] == [0, 1, 1, 1, 1]
    assert [v.selected_step for v in verdicts] == [0, 1, 2, 3, 3]
    assert verdicts[3].selected_value == pytest.approx(0.675) and verdicts[3].since_best == 2
    assert guard.format_verdict(verdicts[3])[0].startswith(
        "selection: step 3, judge/j 0.675, within run.select_by.within of the best (step 1, 0.7)")
    assert guard.tracked(verdicts[4])["guard/selected_step"] == 3.0
    # within 0 standard errors: the best itself; within 4, step 4's fall (-0.5, 4 SE 0.43) is still too far
    assert guard.assess(config(**JUDGED, select_by={"within": 0.0}).run, records).selected_step == 1
    assert guard.assess(config(**JUDGED, select_by={"within": 4.0}).run, records).selected_step == 3


@pytest.mark.parametrize("seed", range(20))
def test_the_final_selection_was_selected_at_its_own_validation(seed):
    """The worker keeps a validation's weights only when it is selected as it is made; on any
    history, what it kept last is the selection at the end."""
    rng = np.random.default_rng(seed)
    run = config(**JUDGED).run
    level = np.cumsum(rng.normal(0.0, 0.05, 12))
    records = [record(s, reward=[0.0] * 6, **{"judge/j": list(level[s] + rng.normal(0.0, 0.1, 6))}) for s in range(12)]
    kept = None
    for i in range(len(records)):
        v = guard.assess(run, records[: i + 1])
        if v.selected_step == records[i]["step"]:
            kept = v.selected_step
        assert kept == v.selected_step


def test_non_finite_values_are_never_selected():
    run = config(**JUDGED).run
    records = [record(0, reward=[0.1, 0.1], **{"judge/j": [math.nan, math.nan]}),
               record(1, reward=[0.2, 0.2], **{"judge/j": [0.3, 0.4]})]
    assert guard.assess(run, records[:1]).best_step is None
    assert guard.format_verdict(guard.assess(run, records[:1])) == ["selection: judge/j has no finite value yet"]
    assert guard.assess(run, records).best_step == 1


# ------------------------------------------------------------------ the judges and best/


def test_judges_score_with_rewards_and_metric_hooks_under_their_own_keys():
    run = config(judge=[{"reward": "tests.plugins.my_reward:MyReward", "kwargs": {"scale": -1.0}, "name": "dark"},
                        {"metric": "shapesworld.plugin:ground_truth"}]).run
    judges = guard.build_judges(run, "cpu")
    images = torch.rand(2, 3, 32, 32)
    from shapesworld.plugin import captions

    values = judges.values(images, captions()[:2])
    assert torch.allclose(values["judge/dark"], -images.mean(dim=(1, 2, 3)))
    assert torch.allclose(values["judge/dark/brightness"], images.mean(dim=(1, 2, 3)))
    assert any(k.startswith("judge/gt/") for k in values) and all(v.shape == (2,) for v in values.values())
    bad = config(judge=[{"reward": "tests.plugins.my_reward:MyReward", "kwargs": {"shade": 2}}]).run
    with pytest.raises(ConfigError, match=r"run.judge\[0\]: reward 'tests.plugins.my_reward:MyReward' could not be "
                                          r"built"):
        guard.build_judges(bad, "cpu")


def test_best_holds_one_validations_weights_whole(tmp_path):
    run = config(**JUDGED).run
    verdict = guard.assess(run, hacked_records()[:3])
    assert guard.held_step(tmp_path) is None
    guard.save_best(tmp_path, 1, {"w": torch.ones(2)}, verdict)
    guard.save_best(tmp_path, 2, {"w": torch.full((2,), 2.0)}, verdict)
    assert guard.held_step(tmp_path) == 2 and torch.equal(guard.load_best(tmp_path)["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no partial or old folder left


def test_the_summary_shows_the_reward_beside_the_key_and_what_was_exported(tmp_path):
    run = config(**JUDGED, early_stop={"on_drop": True}).run
    records = hacked_records()[:4]
    selection = guard.selection_record(run, records, ended_early=True, exported_step=2)
    assert json.loads(json.dumps(selection))["diverged_at"] == [3]
    summary = {"rows": [], "selection": selection}
    text = format_summary(summary)
    assert "selection: lora/ (unet/, model/) holds step 2's weights: the best judge/j 0.705 of 4 validations" in text
    assert "diverged at step(s) 3" in text and "stopped early at step 3: judge/j fell" in text
    md = format_markdown(summary, tmp_path)
    assert "| validation step | reward (trained on) | judge/j | |" in md
    assert "| 2 | 0.2075 | 0.7050 | selected |" in md and "| 3 | 0.3075 | 0.5975 | diverging |" in md


@pytest.mark.parametrize("entry, message", [
    ({"reward": "tests.plugins.my_reward:broken", "kwargs": {"how": "raises"}},
     r"run.judge\[1\]: failed on two test images: RuntimeError: .*model weights missing"),
    ({"reward": "tests.plugins.my_reward:broken", "kwargs": {"how": "nan"}},
     r"run.judge\[1\]: non-finite values on two test images: judge/broken"),
    ({"reward": "no_such_reward"}, r"run.judge\[1\]: reward 'no_such_reward' could not be built"),
    ({"metric": "tests.plugins.my_reward:no_such_hook"}, r"run.judge\[1\].metric"),
])
def test_the_driver_builds_and_probes_every_judge_before_the_run(entry, message):
    from longalign_rl import preflight

    fine = {"reward": "tests.plugins.my_reward:MyReward"}
    preflight.check_inputs(config(judge=[fine]))
    with pytest.raises((ConfigError, ValueError), match=message):
        preflight.check_inputs(config(judge=[fine, entry]))


def test_the_header_says_what_the_guard_watches(tmp_path):
    from longalign_rl.preflight import describe

    assert "guard" not in describe(config(), tmp_path)
    line = describe(config(**JUDGED, early_stop={"patience": 3, "on_drop": True}), tmp_path).splitlines()[-1]
    assert line == ("guard              judges: judge/j; selects by judge/j (higher is better) every 12 steps; "
                    "early stop: after 3 validations without a new best or at a drop beyond the uncertainty")


# ------------------------------------------------------------------ drift alarms


def test_image_statistics_measure_what_they_name():
    grey = torch.full((1, 3, 16, 16), 0.5)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().expand(1, 3, 16, 16)
    ramp = torch.linspace(0, 1, 16)[None, :].expand(16, 16).expand(1, 3, 16, 16)
    s = guard.image_statistics(torch.cat([grey, red, checker, ramp]))
    assert s["drift/brightness"].tolist() == pytest.approx([0.5, 0.299, 0.5, 0.5], abs=1e-5)
    assert s["drift/saturation"].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-6)
    assert s["drift/contrast"][0] == 0 and s["drift/contrast"][2] > s["drift/contrast"][3] > 0
    assert s["drift/high_frequency"][2] == pytest.approx(1.0) and s["drift/high_frequency"][3] < 0.1
    # grey, the checker and the ramp share the mean colour (0.5, 0.5, 0.5); the set's is (0.625, 0.375, 0.375)
    assert s["drift/colour_spread"].tolist() == pytest.approx([0.125 * 3 ** 0.5, 0.375 * 3 ** 0.5]
                                                              + [0.125 * 3 ** 0.5] * 2, abs=1e-6)


def test_step_0s_images_are_read_back_as_saved_and_a_tower_measures_feature_distance(tmp_path):
    from longalign_rl.validation import ValidationSet, save

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert guard.first_images(tmp_path) is None
    vset = ValidationSet(["a", "b", "c"], [0, 1, 2])
    first = guard.drift_values(tmp_path, images, embed=lambda x: x.flatten(1))
    assert first["drift/feature_distance"].abs().max() < 1e-6  # step 0 against itself
    save(tmp_path, 0, images, vset, first)
    assert torch.equal(guard.first_images(tmp_path), guard.quantized(images))
    later = images.clone()
    later[0] = 1 - later[0]
    values = guard.drift_values(tmp_path, later, embed=lambda x: x.flatten(1))
    assert values["drift/feature_distance"][0] > 0.1 and values["drift/feature_distance"][1:].abs().max() < 1e-6
    assert "drift/feature_distance" not in guard.drift_values(tmp_path, later)  # no tower: not measured


def test_an_alarm_fires_once_beyond_its_threshold_and_its_uncertainty():
    drift = config().run.drift

    def at(step, brightness, saturation):
        return record(step, **{"drift/brightness": brightness, "drift/saturation": saturation})

    records = [at(0, [0.4, 0.5, 0.6, 0.5], [0.3, 0.3, 0.3, 0.3]),
               at(12, [0.45, 0.55, 0.65, 0.55], [0.3, 0.5, 0.1, 0.3]),   # +0.05: under the threshold
               at(24, [0.55, 0.66, 0.74, 0.65], [0.3, 0.7, -0.1, 0.3]),  # +0.15: an alarm
               at(36, [0.6, 0.7, 0.8, 0.7], [0.8, 0.0, 0.4, 0.0])]       # saturation: inside its noise
    alarms = guard.drift_alarms(drift, records)
    assert [(a.statistic, a.step) for a in alarms] == [("brightness", 24)]
    assert alarms[0].change == pytest.approx(0.15) and alarms[0].threshold == 0.1
    assert alarms[0].message().startswith("alarm: brightness moved +0.15 ± ")
    off = config(drift={"brightness": 0.0}).run.drift
    assert guard.drift_alarms(off, records) == []
    with pytest.raises(ConfigError, match="run.drift.contrast: must be >= 0"):
        config(drift={"contrast": -1.0})


def test_shapesworld_validation_captions_are_in_no_training_pool_and_not_the_evaluations():
    from shapesworld.plugin import captions, heldout_captions, validation_captions

    held, pool, val = set(heldout_captions()), set(captions()), validation_captions()
    assert len(val) == 64 and not set(val) & held and not set(val) & pool


def test_the_driver_names_a_select_by_key_no_validation_gives():
    from longalign_rl import preflight

    preflight.check_inputs(config(select_by={"key": "gt/shape/1"}))  # a metric hook's (run.metrics)
    preflight.check_inputs(config(select_by={"key": "text_relevant"}))  # a part of the reward
    preflight.check_inputs(config(select_by={"key": "drift/brightness", "higher_is_better": False}))
    with pytest.raises(ConfigError, match=r"run.select_by.key: 'gt/shape/5' is not a validation key of this run; "
                                          r"it has: reward, text_relevant, .*gt/shape/4, .*drift/feature_distance"):
        preflight.check_inputs(config(select_by={"key": "gt/shape/5"}))


def test_a_resume_drops_best_weights_from_a_future_it_cut_and_finds_the_selected_ones_in_their_checkpoint(tmp_path):
    """training/worker.reconcile_best, as a resume calls it once validation.jsonl is cut back."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from longalign_rl.training.worker import reconcile_best

    cfg = config(**JUDGED)
    now = {"w": torch.full((2,), 6.0)}
    ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, trainable_weights=lambda: now)
    judge = [[0.5, 0.5], [0.7, 0.8], [0.6, 0.6]]
    records = [record(s, reward=[0.1, 0.2], **{"judge/j": judge[i]}) for i, s in enumerate((0, 6, 12))]

    def write(recs):
        (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    # killed after best/ took step 12's weights, resumed from step 6 (its validation the best)
    write(records[:2])
    guard.save_best(tmp_path, 12, {"w": torch.full((2,), 12.0)}, guard.assess(cfg.run, records[:2]))
    reconcile_best(ctx, 6)
    assert guard.held_step(tmp_path) == 6 and torch.equal(guard.load_best(tmp_path)["w"], now["w"])
    # best/ lost, resumed at step 12: the selected step 6's weights come from checkpoint_000006
    write(records)
    import shutil

    shutil.rmtree(tmp_path / guard.BEST)
    folder = tmp_path / "checkpoint_000006"
    folder.mkdir()
    save_file({"w": torch.full((2,), 66.0)}, str(folder / "weights.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": 6}))
    reconcile_best(ctx, 12)
    assert guard.held_step(tmp_path) == 6 and torch.equal(guard.load_best(tmp_path)["w"], torch.full((2,), 66.0))
    # kept as it is when it holds the selected step already
    reconcile_best(ctx, 12)
    assert torch.equal(guard.load_best(tmp_path)["w"], torch.full((2,), 66.0))
