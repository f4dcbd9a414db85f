"""The guard against reward hacking through a real run (issue 27; guard.py): a reward that
the training raises (brightness) judged by one that the same change lowers (darkness). The
judge peaks early and falls while the reward rises: the console says they diverge, a
resume keeps the selected step's weights in best/, and run.early_stop.on_drop ends the
resumed run at its first validation, exporting the selected weights as lora/ and the
last step's as lora_last/. Two sampler actors, two DeepSpeed workers, the tiny model."""


import pytest
import torch
from safetensors.torch import load_file

from longalign_rl import guard, train, validation
from longalign_rl.config import load_config
from longalign_rl.outputs import read_metrics
from longalign_rl.pipeline import _run_weights

pytestmark = pytest.mark.filterwarnings("ignore")

JUDGED = ("train.batch_size=2", "run.validation_size=4", "run.eval_every=1", "run.checkpoint_every=2",
          "reward.name=tests.plugins.my_reward:MyReward", "reward.kwargs={scale: 1.0}",
          "run.judge=[{reward: 'tests.plugins.my_reward:MyReward', kwargs: {scale: -1.0}, name: darkness}]")


def lora_tensors(folder):
    return [v for _, v in sorted(load_file(folder / "pytorch_lora_weights.safetensors").items())]


@pytest.mark.slow  # two runs (100-145 s): CI time. The default tier holds the verdicts, best/, the resume rule and the
# driver's checks in unit/test_hacking_guard.py, and the drift statistics of a real run in e2e/test_end_to_end.py
def test_a_judge_that_falls_under_a_rising_reward_stops_the_run_and_its_best_weights_are_kept(
        ray_local, tmp_path, capsys):
    assert train.main([*JUDGED, "train.steps=4", f"run.output_dir={tmp_path}", "run.name=judged"]) == 0
    first = capsys.readouterr().out
    run_dir = tmp_path / "judged"
    records = validation.read(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # the reward's brightness went up and the judge's darkness down, prompt by prompt
    assert records[-1]["means"]["reward"] > records[0]["means"]["reward"]
    assert records[-1]["means"]["judge/darkness"] < records[0]["means"]["judge/darkness"]
    verdict = guard.assess(load_config(run_dir / "config.yaml").run, records)
    assert verdict.key == "judge/darkness" and verdict.selected_step < 4 and verdict.diverging
    assert "warning: the reward and judge/darkness diverge" in first and "selection: step" in first
    kept = {k: v.clone() for k, v in guard.load_best(run_dir).items()}
    assert guard.held_step(run_dir) == verdict.selected_step
    selected = guard.read_selection(run_dir)
    assert selected["exported_step"] == verdict.selected_step and not selected["ended_early"]

    # resumed with early stopping: its first validation (step 5) is below the best beyond its uncertainty
    assert train.main(["--resume", str(run_dir), "train.steps=8", "run.early_stop.on_drop=true"]) == 0
    out = capsys.readouterr().out
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    selected = guard.read_selection(run_dir)
    assert selected["ended_early"] and selected["last_step"] == 5
    assert selected["selected_step"] == selected["exported_step"] == verdict.selected_step
    assert "early stop: judge/darkness fell from" in out and "stopped early at step 5" in out
    # best/ kept the selected step's weights through the resume; lora/ holds them, lora_last/ step 5's
    best = guard.load_best(run_dir)
    assert best.keys() == kept.keys() and all(torch.equal(best[k], kept[k]) for k in kept)
    exported, last = lora_tensors(run_dir / "lora"), lora_tensors(run_dir / "lora_last")
    assert [tuple(t.shape) for t in exported] == [tuple(t.shape) for t in last]
    assert any(not torch.equal(a, b) for a, b in zip(exported, last))
    by_name = sorted(best.items())
    assert len(by_name) == len(exported) and all(torch.equal(v, e) for (_, v), e in zip(by_name, exported))
    cfg = load_config(run_dir / "config.yaml")
    assert _run_weights(run_dir, cfg, None)[0] == ("lora", run_dir / "lora")
    assert _run_weights(run_dir, cfg, None, last=True)[0] == ("lora", run_dir / "lora_last")
    summary = (run_dir / "summary.md").read_text()
    assert "## Selection (run.select_by)" in summary and "| diverging |" in summary and "| selected |" in summary
    # a reward that rewards brightness is made drift: the brightness alarm fires (the default run's stays quiet:
    # test_end_to_end.py), once, in guard.json, summary.md and on the console
    alarms = {a["statistic"]: a for a in guard.read_report(run_dir)["alarms"]}
    assert alarms["brightness"]["change"] > alarms["brightness"]["threshold"] == 0.1
    assert "| brightness |" in summary and (first + out).count("alarm: brightness moved +") == 1
