"""The whole pipeline on tiny models: two sampler actors, two DeepSpeed ZeRO-2 trainer
workers on local Ray, a few steps, a checkpoint, a resume, the exported LoRA, and
third-party rewards from an entry point and from an import path.

One Ray instance (conftest.ray_local, with the plugin package on its workers' path) serves
every test of this module: starting Ray costs ~10 s."""

import json

import pytest
import torch

from longalign_rl import train
from longalign_rl.prompts import load_prompts
from longalign_rl.outputs import read_metrics
from tests import LIGHT

pytestmark = pytest.mark.filterwarnings("ignore")


def run_main(tmp_path, *args):
    code = train.main([*args, f"run.output_dir={tmp_path}"] if "--resume" not in args else list(args))
    assert code == 0


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    """4 steps with a checkpoint every 2, then --resume to 6 steps with one every step, 4 kept:
    the checkpoints at 2, 4, 5 and 6 give the damaged-resume test below three to damage."""
    out = tmp_path_factory.mktemp("runs")
    run_main(out, "train.steps=4", "run.checkpoint_every=2", "run.image_every=2", "run.eval_every=2", "run.name=tiny")
    run_dir = out / "tiny"
    first = read_metrics(run_dir)
    (run_dir / "validation_before_resume.jsonl").write_text((run_dir / "validation.jsonl").read_text())
    run_main(out, "--resume", str(run_dir), "train.steps=6", "run.checkpoint_every=1", "run.keep_checkpoints=4")
    return run_dir, first


def test_run_writes_metrics_images_config_and_checkpoints(tiny_run):
    run_dir, first = tiny_run
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    for m in first:
        for key in ("reward", "text_relevant", "text_irrelevant", "loss", "grad_norm", "policy_lag",
                    "samples_per_s", "time/sample_wait", "time/train", "time/sync"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert m["policy_lag"] <= 1
        assert m["grad_norm"] > 0
        # per-sentence scores by position: every ShapesWorld caption has 5 sentences
        assert all(-1 <= m[f"segment_score/{i}"] <= 1 for i in range(1, 6))
        # the exact checker's verdicts per cell sentence (run.metrics: shapesworld.plugin:ground_truth)
        assert all(0 <= m[f"gt/{a}/{i}"] <= 1 for a in ("colour", "shape") for i in range(1, 5))
        assert 0 <= m["gt/background"] <= 1
        # reward = relevant + 0.3 * irrelevant, as means over both workers' samples
        assert m["reward"] == pytest.approx(m["text_relevant"] + 0.3 * m["text_irrelevant"], abs=1e-6)
    assert first[0]["policy_lag"] == 0 and first[0]["replay_error"] < 1e-4  # on-policy at the start
    assert (run_dir / "images" / "step_000001.png").is_file()
    assert (run_dir / "images" / "step_000002.txt").read_text().startswith("0: ")
    assert "pretrained: shapesworld-partial" in (run_dir / "config.yaml").read_text()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in checkpoints] == ["checkpoint_000002", "checkpoint_000004", "checkpoint_000005",
                                             "checkpoint_000006"]
    newest = checkpoints[-1]
    assert json.loads((newest / "state.json").read_text())["step"] == 6
    assert (newest / "weights.safetensors").is_file()
    assert {p.name for p in (newest / "rng").iterdir()} == {"rank0.safetensors", "rank0.json", "rank1.safetensors", "rank1.json"}
    optim = list((newest / "deepspeed").rglob("*optim_states.pt"))
    assert len(optim) == 2, optim  # one ZeRO-2 partition per worker


def test_workers_hold_identical_weights_every_step(tiny_run):
    run_dir, _ = tiny_run
    spreads = [m["weights_spread"] for m in read_metrics(run_dir)]
    assert len(spreads) == 6 and all(s == 0.0 for s in spreads)


# What "the same run" means across splits of one global batch (docs/scaling.md): the same
# samples, summed in another order (fp32; a bigger batch blocks its matrix products otherwise).
# Measured: BENCHMARKS.md, "Topology"; asserted with room to spare.
SPLIT_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
TIMING = ("time/", "samples_per_s", "weights_spread", "workers")  # what a split may change


def test_one_worker_and_one_actor_repeat_the_run_of_two_of_each(tiny_run, tmp_path):
    """Issue 24: the module's run (2 workers x 8 samples, 2 sampler actors), again with 1
    worker x 16 samples and 1 actor for 2 steps, then resumed on 2 workers x 8 and 2 actors:
    every step's record and every validation, and the weights at the step-4 checkpoint, agree
    with the uninterrupted run to the order of floating-point sums. So the split does not
    change the run (before, which noise and prompts a sample got depended on its rank: the
    rewards differed from step 1), and neither does a resume on another worker count (the
    ZeRO optimiser state repartitioned; step 3 drawn, as in the uninterrupted run, with the
    step-1 weights the actors held while step 2 trained)."""
    from safetensors.torch import load_file

    run_dir, two_by_eight = tiny_run
    run_main(tmp_path, "train.steps=2", "run.checkpoint_every=2", "run.image_every=2", "run.eval_every=2",
             "run.name=one", "train.num_workers=1", "train.batch_size=16", "sampler.num_actors=1")
    run_main(tmp_path, "--resume", str(tmp_path / "one"), "train.steps=4", "train.num_workers=2", "train.batch_size=8",
             "sampler.num_actors=2")
    one_by_sixteen = read_metrics(tmp_path / "one")
    assert [m["workers"] for m in one_by_sixteen] == [1, 1, 2, 2]
    assert [m["step"] for m in one_by_sixteen] == [m["step"] for m in two_by_eight] == [1, 2, 3, 4]
    for mine, theirs in zip(one_by_sixteen, two_by_eight):
        keys = {k for k in theirs if not k.startswith(TIMING)}
        assert keys <= set(mine)
        for k in sorted(keys):
            assert mine[k] == pytest.approx(theirs[k], rel=SPLIT_TOLERANCE["rtol"], abs=SPLIT_TOLERANCE["atol"]), (
                mine["step"], k)
    validations = [[json.loads(line) for line in (d / name).read_text().splitlines()]
                   for d, name in ((tmp_path / "one", "validation.jsonl"), (run_dir, "validation_before_resume.jsonl"))]
    assert [v["step"] for v in validations[0]] == [v["step"] for v in validations[1]] == [0, 2, 4]
    for mine, theirs in zip(*validations):
        for k, values in theirs["values"].items():
            # the drift statistics (guard.py) measure the images as their 8-bit PNGs hold them: a pixel that a sum's
            # rounding puts on the other side of a level moves them by about 1e-3
            tolerance = {"rtol": 1e-2, "atol": 1e-2} if k.startswith("drift/") else SPLIT_TOLERANCE
            torch.testing.assert_close(torch.tensor(mine["values"][k]), torch.tensor(values), **tolerance)
    # The weights: Adam scales each gradient element to about lr, so an element whose gradient is
    # about 0 may step either way (measured: at most 0.25 lr apart); as a whole they agree to
    # 0.15 % of how far they moved from step 2 to step 4 (asserted: 1 %).
    import math

    (one, two), before = [load_file(d / "checkpoint_000004" / "weights.safetensors") for d in (tmp_path / "one", run_dir)], \
        load_file(run_dir / "checkpoint_000002" / "weights.safetensors")
    assert one.keys() == two.keys()
    lr = yaml_lr(run_dir)
    assert max(float((one[n] - two[n]).abs().max()) for n in two) <= lr
    apart = math.sqrt(sum(float(((one[n] - two[n]) ** 2).sum()) for n in two))
    moved = math.sqrt(sum(float(((two[n] - before[n]) ** 2).sum()) for n in two))
    assert apart <= 0.01 * moved, (apart, moved)


def yaml_lr(run_dir) -> float:
    import yaml

    return float(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"])


def test_tensorboard_gets_every_step_and_the_image_grids_across_the_resume(tiny_run):
    """run.report_to's default: the driver logs metrics.jsonl and images/ to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    rewards = {e.step: e.value for e in events.Scalars("reward")}
    assert sorted(rewards) == [1, 2, 3, 4, 5, 6]
    assert rewards[6] == pytest.approx(read_metrics(run_dir)[-1]["reward"])
    assert {"gt/shape/4", "grad_norm", "time/train"} <= set(events.Tags()["scalars"])
    assert sorted({e.step for e in events.Images("samples")}) == [1, 2, 4, 6]


def test_resume_continues_the_step_count(tiny_run):
    run_dir, first = tiny_run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[:4] == first  # nothing before the checkpoint was redone or lost
    assert metrics[-1]["lr"] == pytest.approx(3e-3)
    # the resume's new value is the run's config now; the one it started with is kept beside it
    assert "steps: 6" in (run_dir / "config.yaml").read_text()
    assert "steps: 4" in (run_dir / "config.original.yaml").read_text()


def test_the_run_ends_with_a_first_vs_last_window_summary(tiny_run):
    """summary.json covers the whole resumed run: steps 1 vs 6 (a quarter of 6 steps is one)."""
    run_dir, _ = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_metrics(run_dir)
    assert summary["first_steps"] == [1, 1] and summary["last_steps"] == [6, 6]
    rows = {r["key"]: r for r in summary["rows"]}
    # the reward's parts and every metric hook's names (the ground truth) are compared
    assert {"reward", "text_relevant", "text_irrelevant", "gt/shape/4", "gt/background"} <= set(rows)
    assert rows["reward"]["first"] == pytest.approx(metrics[0]["reward"])
    assert rows["gt/shape/4"]["last"] == pytest.approx(metrics[-1]["gt/shape/4"])


def test_validation_draws_the_same_held_out_prompts_and_noise_at_step_0_every_eval_every_steps_and_the_end(tiny_run):
    """default.yaml: 16 held-out captions, scored by the reward and the exact checker; a
    resume keeps the earlier validations and adds the later ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from longalign_rl import validation
    from shapesworld.plugin import heldout_captions

    run_dir, _ = tiny_run
    records = validation.read(run_dir)
    before = [json.loads(line) for line in (run_dir / "validation_before_resume.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before] == [0, 2, 4] and [r["step"] for r in records] == [0, 2, 4, 6]
    assert records[:3] == before  # not redone by the resume
    for r in records:
        assert {"reward", "text_relevant", "text_irrelevant", "gt/shape/4", "gt/background"} <= set(r["values"])
        assert all(len(v) == 16 for v in r["values"].values()) and r["prompts"] == 16
        assert len(list((run_dir / "validation" / f"step_{r['step']:06d}").glob("*.png"))) == 16
        assert (run_dir / "validation" / f"step_{r['step']:06d}.png").is_file()
    listed = (run_dir / "validation" / "prompts.txt").read_text().splitlines()
    assert [line.split("\t")[2] for line in listed] == heldout_captions()[:16]
    summary = json.loads((run_dir / "summary.json").read_text())["validation"]
    assert summary["first_step"] == 0 and summary["last_step"] == 6
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["reward"]["last"] == pytest.approx(records[-1]["means"]["reward"])
    assert "## Validation" in (run_dir / "summary.md").read_text()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/reward")] == [0, 2, 4, 6]
    assert sorted({e.step for e in events.Images("validation")}) == [0, 2, 4, 6]


def test_the_default_run_records_drift_raises_no_alarm_and_selects_nothing(tiny_run):
    """Without a judge nothing is selected (lora/ is the last step's, no lora_last/); the drift
    statistics are recorded at every validation and none moved beyond run.drift's defaults."""
    from longalign_rl import guard, validation

    run_dir, _ = tiny_run
    report = guard.read_report(run_dir)
    assert report["selection"] is None and report["alarms"] == []
    assert not (run_dir / "lora_last").exists() and not (run_dir / guard.BEST).exists()
    for record in validation.read(run_dir):
        assert {f"drift/{name}" for name in guard.STATISTICS} <= set(record["values"])
        assert len(record["values"]["drift/brightness"]) == record["prompts"]


def test_the_inference_helper_redraws_the_last_validation(tiny_run):
    """pipeline.load(run_dir) (base model + lora/, the run's scheduler, max_tokens, steps and
    guidance) draws the training-time sampler's images from the same seeds, to PNG rounding."""
    import numpy as np
    from PIL import Image

    from longalign_rl.pipeline import load

    run_dir, _ = tiny_run
    listed = [line.split("\t") for line in (run_dir / "validation" / "prompts.txt").read_text().splitlines()]
    prompts, seeds = [p for _, _, p in listed], [int(s.split()[1]) for _, s, _ in listed]
    pipe = load(run_dir, device="cpu")
    assert pipe.longalign["weights"] == "lora" and pipe.longalign["max_tokens"] == 120
    drawn = pipe.generate(prompts, seeds, output_type="pt")
    saved = torch.stack([torch.from_numpy(np.array(Image.open(run_dir / "validation" / "step_000006" / f"{i:03d}.png")))
                         for i in range(len(prompts))]).permute(0, 3, 1, 2).float() / 255
    assert (drawn - saved).abs().max() <= 1 / 255


def test_exported_lora_loads_into_a_diffusers_pipeline(tiny_run):
    """Every trained LoRA layer loads into StableDiffusionPipeline and changes its output."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from longalign_rl.encoding import SegmentEncoder
    from longalign_rl.models import load_components, make_scheduler

    run_dir, _ = tiny_run
    trained = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")

    def generate(lora: bool):
        parts = load_components("shapesworld-partial")
        pipe = StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
            scheduler=make_scheduler(parts.scheduler_config, timestep_spacing="trailing"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        if lora:
            pipe.load_lora_weights(run_dir / "lora")
            loaded = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
            assert len(loaded) == len(trained) > 0  # attention layers included
        encoder = SegmentEncoder(parts.tokenizer, parts.text_encoder, max_tokens=120)
        cond = encoder([load_prompts("shapesworld.plugin:captions")[0]])
        return pipe(prompt_embeds=cond, negative_prompt_embeds=encoder.uncond(1), num_inference_steps=4,
                    height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    base, tuned = generate(False), generate(True)
    assert base.shape == tuned.shape == (1, 3, 32, 32)
    assert (base - tuned).abs().max() > 1e-4


def test_a_third_party_algorithm_trains_on_third_party_rewards(ray_local, tmp_path, capsys):
    """Plug-ins of both kinds drive one real (short) run, with no line of longalign_rl/ changed:
    - the algorithm tests/plugins/best_of_group.py (reward-ranked fine-tuning on the best of
      each prompt's group, its own record and body), by import path;
    - an entry-point reward and an import-path reward, as the two parts of the built-in
      weighted_sum (one run for all three: CI time)."""
    parts = "[{name: redness}, {name: 'thirdparty_rewards:Darkness', weight: 0.5, kwargs: {weight: 2.0}}]"
    run_main(tmp_path, "train.steps=2", "run.checkpoint_every=2", "reward.name=weighted_sum",
             f"reward.kwargs={{rewards: {parts}}}", "run.name=p", "algorithm.name=tests.plugins.best_of_group:BEST_OF_GROUP",
             "algorithm.kwargs={group_size: 2}", "train.batch_size=4", "run.validation_size=2")
    out = capsys.readouterr().out
    assert "algorithm          best_of_group: denoising loss on the best of 2 samples per prompt" in out, out
    assert "best_reward" in out  # the progress line shows the algorithm's own keys
    metrics = read_metrics(tmp_path / "p")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert "redness/red" in m  # the entry-point plugin's own component
        # weight 2: darkness = 2 * (1 - brightness) lies in [0, 2]
        assert 0.0 <= m["thirdparty_rewards:Darkness"] <= 2.0
        assert m["reward"] == pytest.approx(m["redness"] + 0.5 * m["thirdparty_rewards:Darkness"], abs=1e-6)
        # the best of each group is at least the mean of all; the update moved the weights
        assert m["best_reward"] >= m["reward"] - 1e-6 and m["best_reward"] > m["reward"] - 1.0
        assert m["loss"] > 0 and m["grad_norm"] > 0 and m["weights_spread"] == 0.0
    assert (tmp_path / "p" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_bad_config_fails_before_starting_anything(tmp_path, capsys):
    assert train.main(["train.lrr=1", f"run.output_dir={tmp_path}"]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert train.main(["reward.name=no_such_reward", f"run.output_dir={tmp_path}"]) == 2
    assert "no_such_reward" in capsys.readouterr().err
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a red cube"}\nnot json\n')
    assert train.main([f"prompts.source={bad}", f"run.output_dir={tmp_path}"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]  # no run directory was made


def test_a_reward_that_turns_nan_stops_the_run_keeping_the_last_finite_checkpoint(ray_local, tmp_path, capsys):
    """Step 1 is finite and checkpointed; steps 2 and 3 have NaN rewards everywhere: with
    run.max_nonfinite_steps=1 the run stops at step 3, exports nothing and exits 1."""
    code = train.main(["train.steps=6", "run.checkpoint_every=1", "run.max_nonfinite_steps=1", "train.batch_size=2",
                       "reward.name=tests.plugins.my_reward:broken", "reward.kwargs={how: nan_after, after: 1}",
                       "run.validation_size=0",  # its reward calls count the workers' only
                       f"run.output_dir={tmp_path}", "run.name=nan"])
    err = capsys.readouterr().err
    run_dir = tmp_path / "nan"
    assert code == 1 and "error: run stopped: reward not finite for 2 steps in a row" in err, err
    stopped = json.loads((run_dir / "stopped.json").read_text())
    assert stopped["step"] == 3 and stopped["last_checkpoint"] == 1
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert read_metrics(run_dir)[1]["reward_nonfinite"] == 1.0
    states = [json.loads((p / "state.json").read_text())["step"] for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert states == [1]
    assert not (run_dir / "lora").exists() and not (run_dir / "summary.json").exists()


def test_a_resume_applies_its_changes_and_gets_past_every_damaged_file(tiny_run, tmp_path, capsys, caplog):
    """Issue 22: each of these needed hand repair (or was silently wrong, or ran a stranger's
    code) before. The module's run (checkpoints at 2, 4, 5, 6), copied elsewhere: a moved run
    resumes where it is now. Damaged, newest first:
    - checkpoint 6's folder deleted (Ray Train's record still names it): the record is moved aside;
    - checkpoint 5's optimiser state truncated: its manifest no longer verifies;
    - checkpoint 4's optimiser state a crafted pickle with its manifest updated: it verifies,
      and DeepSpeed's weights-only load refuses it;
    - a folder Ray Train never registered, holding a crafted pickle: its code is never run
      (with the record moved aside nothing says it is unregistered, so it stays and fails
      verification; the removal with a record: unit/test_checkpoint_safety.py);
    - metrics.jsonl's last line cut.
    `--resume train.steps=7 train.lr=5e-4` falls back to step 2, runs steps 3-7 at the new lr
    (no metric row lost or doubled) and leaves the original run untouched. (One resume for all
    of them: each resume is half a minute of the test command.)"""
    import hashlib
    import pickle
    import shutil

    run_dir = tmp_path / "damaged"
    shutil.copytree(tiny_run[0], run_dir)
    by_step = {json.loads((p / "state.json").read_text())["step"]: p for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    assert sorted(by_step) == [2, 4, 5, 6]
    marker = tmp_path / "marker"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shutil.rmtree(by_step[6])
    truncated = next((by_step[5] / "deepspeed").rglob("*optim_states.pt"))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    crafted = next((by_step[4] / "deepspeed").rglob("*optim_states.pt"))
    crafted.write_bytes(pickle.dumps({"optimizer_state_dict": Exploit()}))
    name = str(crafted.relative_to(by_step[4]))
    for manifest in (by_step[4] / "manifest").glob("rank*.json"):
        data = json.loads(manifest.read_text())
        if name in data["files"]:
            data["files"][name] = {"bytes": crafted.stat().st_size, "sha256": hashlib.sha256(crafted.read_bytes()).hexdigest()}
            manifest.write_text(json.dumps(data))
    partial = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    (partial / "rng").mkdir(parents=True)
    (partial / "rng" / "rank0.pt").write_bytes(pickle.dumps(Exploit()))
    metrics = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(metrics[: metrics.rstrip().rfind("\n") + 30])  # step 6's line, cut

    run_main(tmp_path, "--resume", str(run_dir), "train.steps=7", "train.lr=5e-4", "run.checkpoint_every=10")
    console = capsys.readouterr()
    assert "names checkpoint_000006, which is gone; moved aside" in caplog.text  # the driver's warning
    for step in (5, 4):  # rank 0's, via warnings.log
        assert f"checkpoint checkpoint_00000{step} cannot be resumed" in console.out + console.err, step
    assert (run_dir / "checkpoint_manager_snapshot.json.damaged").is_file()
    assert partial.exists() and not marker.exists()
    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [m["lr"] for m in records[2:]] == pytest.approx([5e-4] * 5)  # applied, not the checkpoint's 3e-3
    assert "lr: 0.0005" in (run_dir / "config.yaml").read_text()
    newest = max((p for p in run_dir.glob("checkpoint_*") if (p / "state.json").is_file()),
                 key=lambda p: json.loads((p / "state.json").read_text())["step"])
    assert json.loads((newest / "state.json").read_text())["step"] == 7
    assert (newest / "manifest" / "rank0.json").is_file() and (newest / "manifest" / "rank1.json").is_file()
    assert len(read_metrics(tiny_run[0])) == 6  # the original run was not touched


def test_a_second_run_of_the_same_name_and_a_tracker_that_cannot_start_leave_nothing(ray_local, tmp_path, capsys,
                                                                                       monkeypatch):
    """Issue 22: two runs started with one run.name a few seconds apart both ran, into one
    directory; a W&B without an API key ended in a raw traceback and left a directory that
    blocked the name. Now the second run is refused by the first one's lock, and a tracker
    that cannot start is one line, exit 2, with nothing left."""
    from longalign_rl.resume import RunLock

    (tmp_path / "same").mkdir()
    first = RunLock(tmp_path / "same")  # the first run, still starting
    try:
        assert train.main([f"run.output_dir={tmp_path}", "run.name=same"]) == 2
        assert "is in use by another run (pid " in capsys.readouterr().err
    finally:
        first.release()
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B has no key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    assert train.main([f"run.output_dir={tmp_path}", "run.name=tracked", "run.report_to=[wandb]"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the actors' logs (this Ray shows them)
    assert last.startswith("error: run.report_to: wandb could not start: UsageError: ") and "WANDB_MODE=offline" in last
    assert not (tmp_path / "tracked").exists()


def test_a_sampler_actor_that_cannot_be_built_is_named_before_the_run_starts(ray_local, tmp_path, capsys):
    """Issue 22: a T5 adapter that passes the driver's file checks but does not fit the UNet
    killed every sampler actor at construction; the run ended, after its retries, with
    `validation: no sampler actor answered (ActorDiedError, ActorDiedError)`. The actors are
    now built and waited for before the run directory exists: exit 2 with their own error."""
    from longalign_rl.encoding.t5 import TextAdapter

    TextAdapter(in_dim=32, int_dim=8, out_dim=7).save_pretrained(tmp_path / "adapter")  # the tiny T5 is 32 wide
    code = train.main([f"run.output_dir={tmp_path}", "run.name=t5", "t5.encoder=tiny", f"t5.adapter={tmp_path / 'adapter'}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the actors' logs (this Ray shows them)
    assert code == 2
    assert last.startswith("error: sampler: a sampler actor could not be built: ValueError: t5.adapter: ")
    assert "maps 32 -> 7" in last and not (tmp_path / "t5").exists()


def test_a_reward_that_fails_mid_run_ends_with_one_clear_line(ray_local, tmp_path, capsys):
    """The probe passes, the reward raises at its second call in the workers: exit 1 with the
    worker's error and how to continue, and the step-1 checkpoint kept."""
    code = train.main(["train.steps=4", "run.checkpoint_every=1", "run.max_failures=0", "train.batch_size=2",
                       "reward.name=tests.plugins.my_reward:broken", "reward.kwargs={how: raise_after, after: 1}",
                       "run.validation_size=0",  # its reward calls count the workers' only
                       f"run.output_dir={tmp_path}", "run.name=raises"])
    err = capsys.readouterr().err
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the run failed after run.max_failures=0 retries: RuntimeError: the reward server "
                           "went away (rank "), err[-2000:]
    rank = int(last.split("(rank ")[1].split(",")[0])
    assert f"step 2; full traceback in {tmp_path / 'raises' / 'errors' / f'rank{rank}.txt'})" in last
    assert "in forward" in (tmp_path / "raises" / "errors" / f"rank{rank}.txt").read_text()  # the plugin's frame
    assert f"--resume {tmp_path / 'raises'}" in err
    states = [json.loads((p / "state.json").read_text())["step"] for p in (tmp_path / "raises").glob("checkpoint_*")
              if p.is_dir()]
    assert states == [1]


def test_an_error_that_a_retry_would_repeat_is_not_retried(ray_local, tmp_path, capsys):
    """Rank 0's reward raises at its second call: validation at step 0 is its first, so it
    fails in step 1, before finishing a step. A retry would start from the same place and
    fail the same way: the run ends at once, not after run.max_failures=3 restarts, and the
    console's last line is the cause (whatever Ray cut of its text) with its traceback file."""
    code = train.main(["train.steps=4", "run.max_failures=3", *LIGHT,
                       "reward.name=tests.plugins.my_reward:broken", "reward.kwargs={how: raise_after, after: 1}",
                       f"run.output_dir={tmp_path}", "run.name=first"])
    err = capsys.readouterr().err
    assert code == 1
    errors = tmp_path / "first" / "errors" / "rank0.txt"
    assert err.strip().splitlines()[-1] == (
        "error: the run failed, not retried (raised before rank 0 finished a step; a retry from the same checkpoint "
        "would repeat the same computation): RuntimeError: the reward server went away (rank 0, step 1; full "
        f"traceback in {errors})"), err[-2000:]
    assert errors.read_text().count("=== ") == 1  # one attempt: no restart
    assert "the reward server went away" in errors.read_text()


def test_a_killed_trainer_worker_is_recovered_from_the_last_checkpoint(ray_local, tmp_path):
    """SIGKILL one Ray Train worker after the step-2 checkpoint: Ray Train restarts the group
    (run.max_failures=1), the run resumes from its checkpoint and ends with every step logged
    exactly once."""
    import os
    import signal
    import threading
    import time

    from pathlib import Path

    run_dir = tmp_path / "killed"
    killed = {}

    def train_worker_pids() -> list[int]:
        """Ray titles each actor's process "ray::<class>...": the trainer workers' are RayTrainWorker."""
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and b"ray::RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        return sorted(pids)

    def kill_a_worker():
        deadline = time.time() + 300
        while time.time() < deadline:
            done = len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
            if done >= 3:
                workers = train_worker_pids()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed["after_step"] = done
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    run_main(tmp_path, "train.steps=8", "run.checkpoint_every=2", "run.max_failures=1", "run.name=killed", *LIGHT)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 9))  # none lost, none doubled
    assert (run_dir / "lora").is_dir() and (run_dir / "summary.json").is_file()


def test_a_run_the_local_instance_can_never_place_exits_2(ray_local, tmp_path, capsys):
    """4 workers x 0.5 CPU + 2 actors x 0.5 on 2 CPUs: Ray Train would wait forever."""
    assert train.main(["train.num_workers=4", f"run.output_dir={tmp_path}", "run.name=big"]) == 2
    err = capsys.readouterr().err
    assert "resources: the run needs 3 CPUs (has 2)" in err and "can never place it" in err, err
    assert not (tmp_path / "big").exists()


def test_a_stale_or_restarted_sampler_actor_is_resynced(ray_local):
    """A rollout that lags more than max_policy_lag is not used: its actor gets the
    trainer's weights and samples again. A killed actor restarts and the same happens."""
    import ray

    from longalign_rl.config import load_config
    from longalign_rl.sampling.group import SamplerGroup

    cfg = load_config(train.DEFAULT_CONFIG, ["sampler.num_actors=1", "train.max_policy_lag=1"])
    group = SamplerGroup(cfg)
    client = group.client(rank=0)
    prompts = load_prompts("demo")[:2]
    calls = []

    def weights():
        calls.append(1)
        return {}  # LoRA weights not needed to test the version bookkeeping

    client.request(0, prompts, seed=0)
    assert client.get(0, version=1, weights_fn=weights).policy_version == 0  # lag 1: usable
    client.request(1, prompts, seed=1)
    assert client.get(1, version=5, weights_fn=weights).policy_version == 5  # lag 5: resynced
    assert len(calls) == 1

    ray.kill(group.actors[0], no_restart=False)  # dies; Ray restarts it at version 0
    client.request(2, prompts, seed=2)
    rollout = client.get(2, version=5, weights_fn=weights)
    assert rollout.policy_version == 5 and len(calls) == 2
    assert rollout.prompts == prompts and rollout.seed == 2  # the same request, asked again
    group.shutdown()


def test_a_worker_moves_on_when_its_sampler_actor_is_gone_for_good(ray_local):
    """A node that goes away takes its actor with it: the run goes on with fewer samplers."""
    import ray

    from longalign_rl.config import load_config
    from longalign_rl.sampling.group import SamplerGroup

    cfg = load_config(train.DEFAULT_CONFIG, ["sampler.num_actors=2"])
    group = SamplerGroup(cfg)
    client = group.client(rank=1)
    assert client.actor == group.actors[1]
    prompts = load_prompts("demo")[: cfg.train.batch_size]
    client.request(0, prompts, seed=7)  # in flight when the actor dies
    ray.kill(group.actors[1], no_restart=True)
    rollout = client.get(0, version=0, weights_fn=dict)
    assert client.actor == group.actors[0] and rollout.prompts == prompts and rollout.seed == 7
    assert group.publish({}, version=3) >= 0.0  # the dead actor is skipped, the live one updated
    assert ray.get(group.actors[0].get_version.remote()) == 3
    group.shutdown()


def test_the_run_joins_the_cluster_named_by_ray_address(monkeypatch, tmp_path):
    """`ray job submit` sets RAY_ADDRESS; the entry point must join it, not start its own."""
    import ray

    seen = {}

    class Joined(Exception):
        pass

    def fake_init(address=None, **kwargs):
        seen["address"] = address
        raise Joined

    import socket

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with socket.socket() as head:  # something answers there (the driver checks before ray.init)
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = f"127.0.0.1:{head.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(Joined):
            train.main([f"run.output_dir={tmp_path}", "run.name=joined"])
    assert seen["address"] == address
    assert not (tmp_path / "joined").exists()  # the run directory is made once Ray is there and the run fits


@pytest.mark.slow
def test_full_fine_tuning_run_exports_a_diffusers_unet(ray_local, tmp_path):
    from diffusers import UNet2DConditionModel

    from longalign_rl.models import load_components

    run_main(tmp_path, "train.steps=2", "run.checkpoint_every=2", "lora.enabled=false", "run.name=full")
    run_dir = tmp_path / "full"
    assert [m["weights_spread"] for m in read_metrics(run_dir)] == [0.0, 0.0]
    tuned = UNet2DConditionModel.from_pretrained(run_dir / "unet")
    base = load_components("tiny").unet
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
