"""The run directory and what a resume reads (issue 22, item 4): one owner at a time, names
that stay inside run.output_dir, a resume that applies every change it accepts or refuses
it in one line, and damaged files that are named (or fall back) before anything starts.
The resumes that run (a changed lr, a deleted or unloadable checkpoint, a damaged Ray
record) are in tests/e2e/test_end_to_end.py."""

import json

import pytest
import yaml

from longalign_rl import cli, resume, train
from longalign_rl.config import ConfigError, load_config, to_yaml
from longalign_rl.outputs import read_jsonl, write_atomic


def fake_run(tmp_path, step=12, overrides=()):
    """A run directory as a run leaves it: config.yaml, metrics.jsonl, a checkpoint at `step`."""
    run_dir = tmp_path / "run"
    (run_dir / f"checkpoint_{step:06d}").mkdir(parents=True)
    (run_dir / f"checkpoint_{step:06d}" / "state.json").write_text(json.dumps({"step": step}))
    (run_dir / "config.yaml").write_text(to_yaml(load_config(train.DEFAULT_CONFIG, [f"train.steps={step}", *overrides])))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(1, step + 1)))
    return run_dir


def error_of(capsys, argv) -> str:
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_resume_refuses_what_it_cannot_apply(tmp_path, capsys):
    run_dir = fake_run(tmp_path)
    saved = (run_dir / "config.yaml").read_text()
    assert "the run is at step 12 already" in error_of(capsys, ["--resume", str(run_dir), "train.steps=5"])
    assert "--config configs/tiny.yaml with --resume" in error_of(
        capsys, ["--resume", str(run_dir), "--config", "configs/tiny.yaml", "train.steps=20"])
    # (model.pretrained: an SD 1.x run's LoRA and optimiser state resumed on SDXL)
    for key, value in [("train.seed", "7"), ("train.precision", "bf16"), ("train.zero_stage", "1"),
                       ("model.pretrained", "tiny-sdxl")]:
        assert f"other values of {key}" in error_of(capsys, ["--resume", str(run_dir), "train.steps=20", f"{key}={value}"])
    # a checkpoint that holds its ZeRO optimiser state only as one partition per worker (from
    # before the whole state was saved beside them): said on the driver, not after every
    # checkpoint failed to load in the workers
    other_count = ["--resume", str(run_dir), "train.steps=20", "train.num_workers=1", "train.batch_size=16",
                   "sampler.num_actors=1"]
    assert ("train.num_workers: checkpoint checkpoint_000012 holds its optimiser state only as 2 ZeRO partitions"
            in error_of(capsys, other_count))
    assert (run_dir / "config.yaml").read_text() == saved and not (run_dir / "config.original.yaml").exists()
    # with the whole state saved, another worker count resumes (tests/e2e/test_stage1.py runs one)
    (run_dir / "checkpoint_000012" / "optimizer.json").write_text(json.dumps({"workers": 2, "adam_step": 12}))
    cfg = load_config(train.DEFAULT_CONFIG, ["train.steps=20", "train.num_workers=1", "train.batch_size=16",
                                             "sampler.num_actors=1"])
    resume.check_resume(yaml.safe_load(saved), cfg, run_dir)
    # stage 0 in 16 bits keeps no whole copy: its own count only
    stage0 = yaml.safe_load(saved)
    stage0["train"].update(zero_stage=0, precision="bf16")
    with pytest.raises(ConfigError, match="train.num_workers: a ZeRO stage 0 bf16 run resumes on its own worker count"):
        resume.check_resume(stage0, load_config(train.DEFAULT_CONFIG, [
            "train.steps=20", "train.num_workers=1", "train.batch_size=16", "sampler.num_actors=1",
            "train.zero_stage=0", "train.precision=bf16"]), run_dir)


def test_config_resume_shows_the_runs_values(tmp_path, capsys):
    run_dir = fake_run(tmp_path, overrides=["lora.rank=3"])
    assert cli.main(["config", "--resume", str(run_dir), "train.lr=5e-4"]) == 0
    shown = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines() if ": " in line}
    assert shown["lora.rank"].endswith("(this config: 3)") and shown["train.lr"].endswith("(this config: 0.0005)")


def test_run_names_stay_inside_the_output_dir(tmp_path, capsys):
    for name in ("../../x", "a/b", "..", "~x"):
        assert "run.name: must be a folder name inside run.output_dir" in error_of(
            capsys, [f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("train: {steps: [\n", "is not valid YAML"),
    ("- a list\n", "is not a mapping of sections"),
])
def test_a_damaged_config_yaml_is_named(tmp_path, capsys, content, message):
    run_dir = fake_run(tmp_path)
    (run_dir / "config.yaml").write_text(content)
    err = error_of(capsys, ["--resume", str(run_dir), "train.steps=20"])
    assert f"{run_dir / 'config.yaml'} {message}" in err


def test_a_start_that_wrote_an_empty_config_does_not_block_the_name(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("")  # a full disk at start, before this version wrote atomically
    resume.check_new_run_dir(run_dir)  # no error: nothing of a run is there
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        resume.check_new_run_dir(run_dir)


def test_a_damaged_metrics_line_is_named_and_a_cut_last_line_is_left_out(tmp_path, capsys):
    run_dir = fake_run(tmp_path)
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:7])  # killed mid-line
    assert [r["step"] for r in read_jsonl(path)] == list(range(1, 12))
    lines[4] = lines[4][:-3]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl: line 5 is not a JSON record"):
        read_jsonl(path)
    assert "metrics.jsonl: line 5 is not a JSON record" in error_of(capsys, ["--resume", str(run_dir), "train.steps=20"])


def test_a_run_directory_has_one_owner_and_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    run_dir = fake_run(tmp_path)
    lock = resume.RunLock(run_dir)
    with pytest.raises(ConfigError, match=r"in use by another run \(pid \d+ on "):
        resume.RunLock(run_dir)
    assert "is in use by another run" in error_of(capsys, ["--resume", str(run_dir), "train.steps=20"])
    lock.release()  # as the kernel does when the owner dies, however it dies
    resume.RunLock(run_dir).release()


def test_config_yaml_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")

    def full_disk(self, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, "new: 2\n")
    monkeypatch.undo()
    assert path.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_stale_ray_address_ends_in_bounded_time(tmp_path, capsys, monkeypatch):
    """Issue 22: with RAY_ADDRESS naming no cluster, ray.init retried for ever."""
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    start = time.monotonic()
    err = error_of(capsys, [f"run.output_dir={tmp_path}", "run.name=r", "run.connect_timeout_s=2"])
    assert f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there within run.connect_timeout_s=2 s" in err
    assert time.monotonic() - start < 60 and not (tmp_path / "r").exists()
