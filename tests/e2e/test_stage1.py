"""Stage 1 (supervised long-text fine-tuning) end to end on local Ray: two DeepSpeed ZeRO-2
workers train on ShapesWorld pairs, checkpoint, resume, end with the epochs, and
write the LoRA and a merged diffusers model that stage 2 loads.

One Ray instance (conftest.ray_local) serves every test of this module: starting Ray costs ~10 s."""

import json

import pytest
import torch
from PIL import Image

from longalign_rl import preflight, train
from tests import REPO
from longalign_rl.outputs import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG = str(REPO / "configs" / "tiny_stage1.yaml")
# 32 pairs / (2 workers x 2 pairs x 2 accumulated) = 4 steps per epoch, 8 in the 2 epochs.
SMALL = ["data.kwargs.n=32", "run.checkpoint_every=2", "train.warmup_steps=4"]


# The same global batch of 8 on one worker: 1 x 4 pairs x 2 accumulated.
ONE_WORKER = ["train.num_workers=1", "train.batch_size=4"]


@pytest.fixture(scope="module")
def stage1_run(ray_local, tmp_path_factory):
    """3 steps on 2 workers (checkpoints at 2 and 3), then --resume on one worker with no
    step cap: the epochs end it."""
    out = tmp_path_factory.mktemp("runs")
    assert train.main(["--config", CONFIG, *SMALL, "train.steps=3", f"run.output_dir={out}", "run.name=s1"]) == 0
    run_dir = out / "s1"
    first = read_metrics(run_dir)
    assert train.main(["--resume", str(run_dir), "train.steps=100", *ONE_WORKER]) == 0
    return run_dir, first


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """The same run on 2 workers from start to end."""
    out = tmp_path_factory.mktemp("runs")
    assert train.main(["--config", CONFIG, *SMALL, "train.steps=100", f"run.output_dir={out}", "run.name=s1"]) == 0
    return out / "s1"


def test_stage1_writes_finite_metrics_and_checkpoints(stage1_run):
    run_dir, first = stage1_run
    assert [m["step"] for m in first] == [1, 2, 3]
    for m in read_metrics(run_dir):
        assert m["loss"] == m["loss"] and 0 < m["loss"] < 10  # finite
        assert m["grad_norm"] > 0 and m["samples_per_s"] > 0
        assert 0 <= m["timestep"] < 1000
        assert m["weights_spread"] == 0.0  # both workers hold the same weights
    assert "stage: 1" in (run_dir / "config.yaml").read_text()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 3  # steps 4, 6, 8 (keep_checkpoints = 3)
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state == {"step": 8, "prompt_position": 0, "epoch": 1, "samples_in_epoch": 32, "algorithm": {},
                     "sampler_version": None}
    # saved by the one worker of the resumed run, with the optimiser state whole beside ZeRO's partition
    assert {p.name for p in (checkpoints[-1] / "rng").iterdir()} == {"rank0.safetensors", "rank0.json"}
    assert json.loads((checkpoints[-1] / "optimizer.json").read_text()) == {"workers": 1, "adam_step": 8}
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_stage1_validates_and_its_merged_model_redraws_the_last_validation(stage1_run):
    """Rank 0 draws the validation prompts with its own UNet at step 0, at the first run's
    end (3), every 4 steps after the resume, and when the epochs end it (8); the inference
    helper, loading model/ (the LoRA merged), draws the same images."""
    import numpy as np

    from longalign_rl import guard, validation
    from longalign_rl.pipeline import load
    from longalign_rl.prompts import demo_prompts

    run_dir, _ = stage1_run
    records = validation.read(run_dir)
    assert [r["step"] for r in records] == [0, 3, 4, 8] and all(r["prompts"] == 4 for r in records)
    # no metric hooks here, and no reward: the images and their drift statistics only (guard.py; no image
    # tower to measure feature_distance in)
    assert set(records[0]["values"]) == {f"drift/{name}" for name in guard.STATISTICS if name != "feature_distance"}
    assert (run_dir / "validation" / "step_000008.png").is_file()
    pipe = load(run_dir, device="cpu")
    assert pipe.longalign["weights"] == "merged"
    drawn = pipe.generate(demo_prompts()[:4], [0, 1, 2, 3], output_type="pt")
    saved = torch.stack([torch.from_numpy(np.array(Image.open(run_dir / "validation" / "step_000008" / f"{i:03d}.png")))
                         for i in range(4)]).permute(0, 3, 1, 2).float() / 255
    assert (drawn - saved).abs().max() <= 2 / 255


def test_resume_continues_the_step_count_and_the_epochs_end_the_run(stage1_run):
    run_dir, first = stage1_run
    metrics = read_metrics(run_dir)
    # 8 steps, not 100: the second epoch ended it. The resumed run skipped the 3 steps of
    # epoch 1 already done (6 micro-batches per worker), or it would have run past 8.
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert [m["epoch"] for m in metrics] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert metrics[:3] == first  # nothing before the checkpoint was redone or lost
    # warm-up over 4 steps, resumed with the scheduler (lr after each step)
    assert [m["lr"] for m in metrics[:4]] == pytest.approx([5e-4, 7.5e-4, 1e-3, 1e-3]) and metrics[-1]["lr"] == 1e-3


def test_a_run_resumed_on_another_worker_count_goes_on_as_the_uninterrupted_run(stage1_run, uninterrupted):
    """Checkpointed by 2 ZeRO-2 workers at step 3, resumed on 1 with the same global batch: the
    same pairs, draws and optimiser state, so the same metrics and weights as the run that
    stayed on 2 workers, up to the order of float32 sums (issue 24, docs/scaling.md)."""
    from safetensors.torch import load_file

    run_dir, _ = stage1_run
    resumed, reference = read_metrics(run_dir), read_metrics(uninterrupted)
    assert [m["step"] for m in reference] == [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(resumed, reference):
        assert a["timestep"] == b["timestep"]  # each pair's own draws, whichever worker had it
        for key in ("loss", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)
    final, same = (load_file(str(d / "checkpoint_000008" / "weights.safetensors")) for d in (run_dir, uninterrupted))
    start = load_file(str(uninterrupted / "checkpoint_000004" / "weights.safetensors"))

    def l2(x, y):
        return sum(float(((x[k] - y[k]) ** 2).sum()) for k in x) ** 0.5

    assert final.keys() == same.keys()
    assert l2(final, same) <= 0.01 * l2(same, start)  # apart by < 1 % of what steps 4 -> 8 moved them


def test_merged_model_loads_for_stage_2_and_carries_the_lora(stage1_run):
    from longalign_rl.models import load_components

    run_dir, _ = stage1_run
    merged = load_components(str(run_dir / "model"))  # what model.pretrained=<run_dir>/model loads
    base = load_components("tiny")
    assert len(merged.tokenizer) == len(base.tokenizer)
    assert merged.tokenizer("A red cube.").input_ids == base.tokenizer("A red cube.").input_ids
    assert merged.scheduler_config["num_train_timesteps"] == 1000
    assert merged.scheduler_config["prediction_type"] == "epsilon"
    for name in ("vae", "text_encoder"):  # frozen parts: saved unchanged
        a, b = getattr(merged, name).state_dict(), getattr(base, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unet, base_unet = merged.unet.state_dict(), base.unet.state_dict()
    assert unet.keys() == base_unet.keys()  # a plain UNet: the LoRA is merged, not attached
    assert any(not torch.equal(unet[k], base_unet[k]) for k in unet)

    # the merged UNet computes what the base UNet with the trained LoRA (the last checkpoint's
    # weights, attached by peft) computes
    from safetensors.torch import load_file

    from longalign_rl.config import load_config
    from longalign_rl.lora import load_trainable_state_dict, make_trainable

    cfg = load_config(run_dir / "config.yaml")
    newest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    adapted = base.unet
    make_trainable(adapted, cfg.lora)
    load_trainable_state_dict(adapted, load_file(str(newest / "weights.safetensors")), cfg.lora)
    g = torch.Generator().manual_seed(0)
    x, cond, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 240, 32, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        with_lora = adapted.eval()(x, t, encoder_hidden_states=cond).sample
        folded = merged.unet(x, t, encoder_hidden_states=cond).sample
        plain = load_components("tiny").unet(x, t, encoder_hidden_states=cond).sample
    assert not torch.allclose(with_lora, plain, atol=1e-4)
    assert torch.allclose(folded, with_lora, atol=1e-5)


def test_stage1_input_errors_fail_before_anything_is_written(tmp_path, capsys):
    assert train.main(["--config", CONFIG, "data.source=", f"run.output_dir={tmp_path}"]) == 2
    assert "data.source" in capsys.readouterr().err
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"image": "missing.png", "caption": "gone"}\n')
    assert train.main(["--config", CONFIG, f"data.source={bad}", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl" in err and "line 1" in err and "missing.png" in err
    assert train.main(["--config", CONFIG, "data.kwargs.grid=9", f"run.output_dir={tmp_path}"]) == 2
    assert "grid" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]  # no run directory was made


def test_resume_with_a_bad_source_keeps_the_run_as_it_was(stage1_run, tmp_path, capsys):
    run_dir, _ = stage1_run
    config, metrics = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    assert train.main(["--resume", str(run_dir), f"data.source={tmp_path / 'gone.csv'}"]) == 2
    assert "gone.csv" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == config and (run_dir / "metrics.jsonl").read_text() == metrics


def test_describe_shows_the_stage_1_plan(tmp_path):
    from longalign_rl.config import load_config
    from longalign_rl.data import Pair

    cfg = load_config(CONFIG)
    text = preflight.describe(cfg, tmp_path, [Pair("x.png", "c")] * 100)
    assert "stage 1" in text and "8 pairs per step" in text
    assert "100 pairs -> 12 steps per epoch" in text  # 100 // 2 workers // 2 per batch // 2 accumulated
    assert "after 2 epoch(s) or 8 steps" in text


@pytest.mark.slow
def test_full_fine_tuning_stage1_writes_a_changed_unet(ray_local, tmp_path):
    from longalign_rl.models import load_components

    assert train.main(["--config", CONFIG, *SMALL, "train.steps=2", "lora.enabled=false",
                       f"run.output_dir={tmp_path}", "run.name=full"]) == 0
    run_dir = tmp_path / "full"
    assert [m["weights_spread"] for m in read_metrics(run_dir)] == [0.0, 0.0]
    merged, base = load_components(str(run_dir / "model")).unet, load_components("tiny").unet
    assert (run_dir / "unet" / "config.json").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
