"""The driver's console (issue 12): progress from metrics.jsonl, the workers' warnings, where
the outputs are."""

import io
import json

from longalign_rl.config import load_config
from longalign_rl.console import WARNINGS_LOG, Progress, format_values, outputs


def record(step, **extra):
    return {"step": step, "reward": 0.25 + 0.01 * step, "loss": 0.4, "gt/shape/1": 0.5, "gt/shape/2": 1.0,
            "gt/colour/1": 1.0, "segment_score/1": 0.3, "time/step": 2.0, "lr": 1e-3, **extra}


def append(run_dir, name, lines):
    with (run_dir / name).open("a") as f:
        f.writelines(line + "\n" for line in lines)


def test_plain_lines_off_a_terminal_with_eta_and_the_metric_hooks(tmp_path):
    cfg = load_config("configs/default.yaml", ["train.steps=4"])
    out = io.StringIO()
    with Progress(tmp_path, cfg, stream=out, tty=False, interval=0.01) as progress:
        append(tmp_path, "metrics.jsonl", [json.dumps(record(1)), json.dumps(record(2))])
        progress.poll()
        append(tmp_path, WARNINGS_LOG, ["rank 1: sampler actor failed (RayActorError); using actor 0"])
        append(tmp_path, "metrics.jsonl", [json.dumps(record(3))])
        with (tmp_path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record(4))[:10])  # step 4 half-written: waits for its end
        progress.poll()
        with (tmp_path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record(4))[10:] + "\n")
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/4  reward 0.26  loss 0.4  gt/colour 1  gt/shape 0.75  ETA 0m06s"
    assert lines[1].startswith("step 2/4  reward 0.27") and lines[1].endswith("ETA 0m04s")
    assert lines[2] == "warning: rank 1: sampler actor failed (RayActorError); using actor 0"
    assert lines[3].startswith("step 3/4")
    assert lines[4].startswith("step 4/4") and "ETA" not in lines[4]  # the last line, read on exit
    assert "segment_score" not in out.getvalue() and len(lines) == 5


def test_long_runs_print_about_fifty_lines_and_a_resume_starts_at_its_checkpoint(tmp_path):
    cfg = load_config("configs/default.yaml", ["train.steps=500"])
    append(tmp_path, "metrics.jsonl", [json.dumps(record(s)) for s in range(1, 201)])  # before the resume
    out = io.StringIO()
    with Progress(tmp_path, cfg, start_step=200, stream=out, tty=False, interval=0.01):
        append(tmp_path, "metrics.jsonl", [json.dumps(record(s)) for s in range(201, 501)])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 210/500") and lines[-1].startswith("step 500/500")
    assert len(lines) == 30  # every 10th step of the 300 after the checkpoint


def test_a_terminal_gets_one_bar(tmp_path):
    cfg = load_config("configs/default.yaml", ["algorithm.name=grpo", "train.steps=3"])
    out = io.StringIO()
    with Progress(tmp_path, cfg, stream=out, tty=True, interval=0.01):
        append(tmp_path, "metrics.jsonl", [json.dumps(record(s, advantage_zero=0.5)) for s in (1, 2, 3)])
    text = out.getvalue()
    assert "3/3" in text and "advantage_zero 0.5" in text and "\r" in text
    assert "loss" not in text.rsplit("\r", 1)[-1]  # a policy-gradient run shows its own health instead


def test_format_values_and_outputs(tmp_path):
    stage1 = load_config("configs/tiny_stage1.yaml")
    assert format_values(stage1, {"step": 1, "epoch": 1, "loss": 0.123456}) == "epoch 1  loss 0.123"
    cfg = load_config("configs/default.yaml")
    (tmp_path / "lora").mkdir()
    rows = outputs(tmp_path, cfg, str(tmp_path / "checkpoint_x"))
    assert rows[0].startswith("LoRA for diffusers") and rows[0].endswith(str(tmp_path / "lora"))
    assert any(r.startswith("last checkpoint") and r.endswith("checkpoint_x") for r in rows)
