"""Validation (issue 12): fixed prompts and seeds, records, grids beside step 0's, the
paired first-vs-last comparison in summary.json / summary.md, and the console and trackers
following validation.jsonl. The runs themselves are in tests/e2e (test_end_to_end, test_stage1)."""

import io
import json
import math

import pytest
import torch
from PIL import Image

from longalign_rl import validation
from longalign_rl.config import load_config
from longalign_rl.console import Progress
from longalign_rl.prompts import PromptFileError, demo_prompts
from longalign_rl.summary import read_summary, write_summary
from longalign_rl.types import RewardOutput


def test_the_set_is_the_first_prompts_of_its_source_each_with_its_own_seed(tmp_path):
    cfg = load_config(None, ["run.validation_size=3", "run.validation_seed=10"])
    vset = validation.validation_set(cfg)
    assert vset.prompts == demo_prompts()[:3] and vset.seeds == [10, 11, 12]
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("first prompt.\nsecond prompt.\n")
    vset = validation.validation_set(load_config(None, [f"run.validation={held_out}", "run.validation_size=8"]))
    assert vset.prompts == ["first prompt.", "second prompt."] and vset.seeds == [0, 1]  # fewer than asked: all
    assert validation.validation_set(load_config(None, ["run.validation_size=0"])) is None
    with pytest.raises(PromptFileError, match="run.validation"):
        validation.validation_set(load_config(None, [f"run.validation={tmp_path / 'missing.txt'}"]))


def test_due_at_step_0_every_eval_every_steps_and_at_the_end():
    cfg = load_config(None, ["run.eval_every=4", "train.steps=10"])
    assert [s for s in range(11) if validation.due(cfg, s)] == [0, 4, 8, 10]
    assert not any(validation.due(load_config(None, ["run.validation_size=0"]), s) for s in range(3))


def images(n, value):
    return torch.full((n, 3, 16, 16), value)


def test_records_images_and_grids_beside_step_0(tmp_path):
    vset = validation.ValidationSet(["a red square.", "a blue circle.", "green."], [0, 1, 2])
    first = validation.save(tmp_path, 0, images(3, 0.2), vset,
                            {"reward": torch.tensor([0.1, 0.2, float("nan")]), "gt/shape/1": torch.tensor([0.0, 1.0, 1.0])})
    assert first["prompts"] == 3 and first["means"]["reward"] == pytest.approx(0.15)  # NaN left out of the mean
    assert (tmp_path / "validation" / "prompts.txt").read_text().splitlines()[1] == "001\tseed 1\ta blue circle."
    validation.save(tmp_path, 4, images(3, 0.8), vset, {"reward": torch.tensor([0.3, 0.3, 0.3]),
                                                         "gt/shape/1": torch.tensor([1.0, 1.0, 1.0])})
    assert [r["step"] for r in validation.read(tmp_path)] == [0, 4]
    saved = Image.open(tmp_path / "validation" / "step_000004" / "002.png")
    assert saved.size == (16, 16) and saved.getpixel((0, 0)) == (204, 204, 204)
    # the grid: each prompt's step-0 image left of its step-4 image, enlarged to 128 px
    grid = Image.open(tmp_path / "validation" / "step_000004.png").convert("RGB")
    cols = math.ceil(math.sqrt(3))
    assert grid.size == (cols * (2 * validation.CELL + 4), 2 * (validation.CELL + 16) + 16)
    assert grid.getpixel((10, 30)) == (51, 51, 51) and grid.getpixel((validation.CELL + 10, 30)) == (204, 204, 204)
    # a resumed run that validates step 4 again replaces its record; truncation drops later ones
    validation.save(tmp_path, 4, images(3, 0.8), vset, {"reward": torch.tensor([0.5, 0.5, 0.5])})
    assert [r["step"] for r in validation.read(tmp_path)] == [0, 4]
    assert validation.read(tmp_path)[-1]["means"]["reward"] == pytest.approx(0.5)
    validation.truncate_after(tmp_path, 3)
    assert [r["step"] for r in validation.read(tmp_path)] == [0]


def test_the_grid_is_complete_before_its_record_appears(tmp_path, monkeypatch):
    """The console hands a validation's grid to the trackers as soon as its record is in
    validation.jsonl: the grid must be whole by then (a half-written PNG dropped TensorBoard)."""
    seen = []
    write_grid = validation.save_grid

    def checked(run_dir, step, records):
        seen.append([r["step"] for r in validation.read(run_dir)])
        out = write_grid(run_dir, step, records)
        assert not list((tmp_path / "validation").glob(".*partial"))  # renamed into place
        return out

    monkeypatch.setattr(validation, "save_grid", checked)
    vset = validation.ValidationSet(["a."], [0])
    validation.save(tmp_path, 0, images(1, 0.5), vset, {"reward": torch.tensor([0.1])})
    validation.save(tmp_path, 2, images(1, 0.5), vset, {"reward": torch.tensor([0.2])})
    assert seen == [[], [0]]  # step k's grid was written while its record was not there yet


def test_compare_pairs_each_prompt_with_itself():
    before = {"step": 0, "prompts": 4, "values": {"reward": [0.1, 0.2, 0.3, 0.4], "only_first": [1.0] * 4}}
    after = {"step": 8, "prompts": 4, "values": {"reward": [0.2, 0.4, 0.3, float("nan")]}}
    assert validation.compare([before]) is None
    result = validation.compare([before, after])
    assert result["first_step"] == 0 and result["last_step"] == 8 and result["prompts"] == 4
    (row,) = result["rows"]  # only keys both have; the NaN prompt's pair is left out
    diffs = torch.tensor([0.1, 0.2, 0.0], dtype=torch.float64)
    assert row["key"] == "reward" and row["change"] == pytest.approx(float(diffs.mean()))
    assert row["first"] == pytest.approx(0.2) and row["last"] == pytest.approx(0.3)
    assert row["uncertainty"] == pytest.approx(2 * float(diffs.std()) / math.sqrt(3))


class Brightness(torch.nn.Module):
    def forward(self, images, prompts):
        return RewardOutput(total=images.mean((1, 2, 3)), components={"part": images.amax((1, 2, 3))})


def test_rank_0_scores_the_reward_and_the_hooks():
    """A reward is a pure function (scoring.py): rank 0 calls it alone, with no flag to flip."""
    inner = Brightness()

    def hook(imgs, prompts):
        return {"gt/brightness": imgs.mean((1, 2, 3)) * 2}

    values = validation.score_images(inner, [("hook", hook)], images(2, 0.25), ["a", "b"])
    assert set(values) == {"reward", "part", "gt/brightness"}
    assert values["gt/brightness"].tolist() == pytest.approx([0.5, 0.5])
    assert set(validation.score_images(None, [("hook", hook)], images(2, 0.25), ["a", "b"])) == {"gt/brightness"}
    with pytest.raises(ValueError, match="also logged"):
        validation.score_images(inner, [("hook", lambda i, p: {"part": i.mean((1, 2, 3))})], images(2, 0.5), ["a", "b"])


def test_summary_json_and_md_compare_the_first_and_last_validation(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s}) + "\n" for s in range(1, 9)))
    vset = validation.ValidationSet(["p0", "p1", "p2"], [0, 1, 2])
    validation.save(tmp_path, 0, images(3, 0.1), vset, {"reward": torch.tensor([0.1, 0.2, 0.3])})
    validation.save(tmp_path, 8, images(3, 0.9), vset, {"reward": torch.tensor([0.5, 0.6, 0.8])})
    summary = write_summary(tmp_path, ["reward"], samples_per_step=4)
    (row,) = summary["validation"]["rows"]
    assert row["change"] == pytest.approx(0.4333333) and row["uncertainty"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["validation"] == summary["validation"]
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith(f"# Run `{tmp_path.name}`")
    assert "| reward | 0.2000 | 0.6333 | +0.433 ±" in md and "(validation/step_000008.png)" in md
    printed = read_summary(tmp_path)
    assert "validation: the same 3 prompts and seeds at step 0 vs step 8" in printed
    assert printed.splitlines()[-1].split()[:4] == ["reward", "0.200", "->", "0.633"]


def test_the_console_and_the_trackers_follow_validation_jsonl(tmp_path):
    class Tracker:
        def __init__(self):
            self.calls = []

        def scalars(self, step, values):
            self.calls.append(("scalars", step, values))

        def image(self, step, tag, path):
            self.calls.append(("image", step, tag, path.name))

    cfg = load_config("configs/default.yaml", ["train.steps=8"])
    vset = validation.ValidationSet(["p0", "p1"], [0, 1])
    out, tracker = io.StringIO(), Tracker()
    with Progress(tmp_path, cfg, stream=out, tty=False, interval=0.01, trackers=[tracker]) as progress:
        validation.save(tmp_path, 0, images(2, 0.1), vset, {"reward": torch.tensor([0.2, 0.4]),
                                                            "gt/shape/1": torch.tensor([0.0, 1.0]),
                                                            "gt/shape/2": torch.tensor([0.0, 0.0])})
        progress.poll()
        validation.save(tmp_path, 8, images(2, 0.9), vset, {"reward": torch.tensor([0.5, 0.5]),
                                                            "gt/shape/1": torch.tensor([1.0, 1.0]),
                                                            "gt/shape/2": torch.tensor([1.0, 0.0])})
    lines = out.getvalue().splitlines()
    assert lines == ["validation at step 0 (2 prompts): reward 0.3  gt/shape 0.25",
                     "validation at step 8 (2 prompts): reward 0.5 (step 0: 0.3)  gt/shape 0.75 (step 0: 0.25)"]
    scalars = [c for c in tracker.calls if c[0] == "scalars"]
    assert [(c[1], c[2]["val/reward"]) for c in scalars] == [(0, pytest.approx(0.3)), (8, pytest.approx(0.5))]
    assert ("image", 8, "validation", "step_000008.png") in tracker.calls
