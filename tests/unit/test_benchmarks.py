"""The benchmark scripts run (at tiny size, on the CPU) and report what they promise.

The GPU benchmark must stay ready for the day a GPU is available: it runs here on the
tiny model with the same code paths (our sampler vs diffusers' pipeline, LoRA and full
trainer steps, FLOP counting)."""

import json
import runpy
import sys

import pytest

from tests import REPO

BENCHMARKS = REPO / "benchmarks"


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_gpu_benchmark_runs_at_tiny_size_on_cpu(tmp_path, monkeypatch, model):
    """...for each model family, and without Ray or DeepSpeed, which the GPU machine cannot install."""
    for module in ("ray", "deepspeed"):
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, module, None)  # `import ray` now raises ImportError
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(sys, "argv", [
        "gpu_benchmark.py", "--model", model, "--resolution", "32", "--steps", "2", "--grad-steps", "1",
        "--batch", "1", "--train-batch", "1", "--reward", "tiny", "--dtype", "fp32", "--rounds", "1", "--out", str(out)])
    runpy.run_path(str(BENCHMARKS / "gpu_benchmark.py"), run_name="__main__")
    results = json.loads(out.read_text())
    assert results["sampling"]["images_per_s"]["ours"] > 0 and results["sampling"]["images_per_s"]["diffusers"] > 0
    for name in ("train_lora_r32", "train_full"):
        assert results[name]["seconds"] > 0 and results[name]["tflop"] > 0
    assert results["train_full"]["trainable_params"] > results["train_lora_r32"]["trainable_params"] > 0


def test_run_summary_reports_throughput_and_time_split(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    record = {"samples_per_s": 4.0, "time/step": 1.0, "time/sample_wait": 0.1, "time/train": 0.6,
              "time/sync": 0.3, "time/sync_load": 0.05, "time/sample_actor": 0.9}
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({**record, "step": i}) for i in range(1, 4)) + "\n")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from run_summary import summarise
    finally:
        sys.path.remove(str(BENCHMARKS))
    text = summarise(run, skip=1)
    assert "2 steps" in text and "4.00" in text and "60.0%" in text


def test_flop_estimate_counts_each_familys_real_size_model_on_the_meta_device():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from flop_estimate import count, inspect
    finally:
        sys.path.remove(str(BENCHMARKS))
    flops = count()
    # SD v1.5's UNet is ~0.8 TFLOP per 512 px image and step: one guided step is two images.
    assert 1.4e12 < flops["unet_guided_step"] < 1.9e12
    assert flops["vae_decode"] > flops["reward_image"] > 0
    # configs/sdxl_longalign.yaml: SDXL base at 1024 px, 240 segment tokens of both encoders
    # plus the row of time ids and pooled embedding; a guided step costs ~9x SD 1.5's
    sdxl = inspect(REPO / "configs" / "sdxl_longalign.yaml")
    assert sdxl["family"] == "sdxl" and sdxl["cond_shape"] == [1, 241, 2048]
    assert 2.56e9 < sdxl["unet_params"] < 2.57e9 and sdxl["lora_layers"] > 0 and sdxl["lora_params"] > 0
    assert 7 * flops["unet_guided_step"] < sdxl["unet_guided_step"] < 12 * flops["unet_guided_step"]
    # the flow-matching transformers (issue 26): SD3.5 medium's 240 CLIP + 256 T5 tokens and the
    # pooled row, its T5's encoding counted; FLUX.1-dev's 512 T5 tokens, one call per guided step
    sd3 = inspect(REPO / "configs" / "sd35_medium_longalign.yaml")
    assert sd3["family"] == "sd3" and sd3["cond_shape"] == [1, 240 + 256 + 1, 4096]
    assert 2.2e9 < sd3["unet_params"] < 2.3e9 and sd3["lora_layers"] == 285
    assert sd3["text_encode"] > 50 * flops["text_encode"] and sd3["policy_gradient"] is None
    flux = inspect(REPO / "configs" / "flux_dev_longalign.yaml")
    assert flux["family"] == "flux" and flux["cond_shape"] == [1, 513, 4096]
    assert 11.8e9 < flux["unet_params"] < 12e9 and flux["lora_layers"] == 342
    assert flux["policy_gradient"] == {"trained_steps": 6, "kl": True, "inner_epochs": 1}  # Flow-GRPO's recipe


def test_algorithm_throughput_times_both_algorithms_side_by_side(tmp_path, monkeypatch, capsys):
    out = tmp_path / "throughput.json"
    monkeypatch.setattr(sys, "argv", [
        "algorithm_throughput.py", "--model", "tiny", "--prompts", "demo", "--reward", "tiny_clip", "--batch", "4",
        "--resolution", "32", "--steps", "2", "--grad-steps", "1", "--fractions", "0.5", "1.0", "--rounds", "1",
        "--max-tokens", "240", "--out", str(out)])
    runpy.run_path(str(BENCHMARKS / "algorithm_throughput.py"), run_name="__main__")
    setups = json.loads(out.read_text())["setups"]
    assert set(setups) == {"reward_backprop", "grpo (fraction 0.5)", "grpo (fraction 1)"}
    assert setups["reward_backprop"]["step_ratio"] == 1.0
    for name, s in setups.items():
        assert s["sample"] > 0 and s["update"] > 0 and s["samples_per_s"] > 0, name
        assert s["step"] == pytest.approx(s["sample"] + s["score"] + s["update"], rel=0.5)
    assert setups["grpo (fraction 1)"]["score"] > 0  # grpo scores separately, without gradient
    assert "step / rb" in capsys.readouterr().out


def test_replay_error_benchmark_separates_the_causes(monkeypatch, capsys):
    """With the same weights the replay is exact (fp32, bf16, dropout as sampled); dropout
    drawn afresh and one optimiser step are not."""
    monkeypatch.setattr(sys, "argv", ["replay_error.py", "--model", "tiny", "--resolution", "32", "--steps", "4",
                                      "--batch", "1", "--lr", "1e-3"])  # the smallest size: CI time
    runpy.run_path(str(BENCHMARKS / "replay_error.py"), run_name="__main__")
    out = capsys.readouterr().out
    result = json.loads(out[: out.index("\n}\n") + 2])
    for floor in ("floor_fp32_train_mode", "floor_fp32_eval", "floor_bf16"):
        assert result[floor] <= 1e-5, floor
    assert result["dropout_unseeded"] > 1e-3 and result["lag_one_step"] > 1e-4
    assert "x lag" in out
