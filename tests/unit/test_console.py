"""The driver's console (issue 12): progress from metrics.jsonl, the workers' warnings, where
the outputs are."""

import io
import json
import logging

from longalign_rl.config import load_config
from longalign_rl.console import WARNINGS_LOG, Progress, format_values, log_warnings_to, outputs


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


def test_a_process_writes_each_warning_once_and_at_most_limit_of_them(tmp_path):
    """What a sampler actor says about an over-long prompt every epoch reaches warnings.log
    once; a process that warns without end cannot fill it; nothing is written (or raised)
    before the run directory exists."""
    logger = logging.getLogger("longalign_rl.sampling.test")
    handlers = list(logging.getLogger("longalign_rl").handlers)
    run_dir = tmp_path / "run"
    try:
        log_warnings_to(run_dir / WARNINGS_LOG, "sampler actor 1", limit=3)
        log_warnings_to(run_dir / WARNINGS_LOG, "sampler actor 1", limit=3)  # a restarted loop: still one handler
        logger.warning("before the run directory exists")
        run_dir.mkdir()
        logger.info("not a warning")
        for i in (1, 1, 2, 1, 3, 4, 5):
            logger.warning("prompt %r was cut", f"p{i}")
    finally:
        logging.getLogger("longalign_rl").handlers = handlers
    assert (run_dir / WARNINGS_LOG).read_text().splitlines() == [
        "sampler actor 1: prompt 'p1' was cut",
        "sampler actor 1: prompt 'p2' was cut",
        "sampler actor 1: prompt 'p3' was cut",
        "sampler actor 1: more than 3 different warnings: the rest are only in this process's Ray log",
    ]
