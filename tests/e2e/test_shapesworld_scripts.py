"""The ShapesWorld scripts at their quick sizes: the pretraining that makes the shipped
models, and the experiment end to end. (They train in-process: seconds to a minute.)"""

import json

import pytest
import torch
import yaml

from longalign_rl.models import load_components, vae_scale_factor


def test_quick_pretraining_writes_loadable_models(tmp_path):
    from shapesworld import pretrain

    assert pretrain.main(["--quick", "--out", str(tmp_path), "--eval", "2", "--threads", "1"]) == 0
    base = load_components(str(tmp_path / "shapesworld"))  # a plain diffusers folder without tokenizer/
    assert vae_scale_factor(base.vae) == 4 and len(base.tokenizer) == 49408
    assert (tmp_path / "shapesworld-stage1" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    report = json.loads((tmp_path / "shapesworld" / "report.json").read_text())
    assert report["quick"] is True
    assert set(report["eval"]["shapesworld"]) == {"truncated", "segment"}


def test_quick_flow_pretraining_writes_an_sd3_folder_without_t5(tmp_path):
    """The flow model's script: an SD3 transformer on the base's VAE (with a shift factor)
    and text encoder (as both CLIPs), no T5, a complete folder that diffusers' pipeline and
    the framework load, trained on the plain 77-token encoding."""
    from diffusers import StableDiffusion3Pipeline

    from shapesworld import pretrain_flow

    assert pretrain_flow.main(["--quick", "--out", str(tmp_path), "--eval", "2", "--threads", "1"]) == 0
    folder = tmp_path / "shapesworld-flow"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    assert pipe.transformer.config.joint_attention_dim == 2 * pipe.text_encoder.config.hidden_size
    parts = load_components(str(folder))
    assert parts.family.name == "sd3" and parts.text_encoder_3 is None and vae_scale_factor(parts.vae) == 4
    assert all(p.dtype == torch.float32 for p in parts.unet.parameters())
    report = json.loads((folder / "report.json").read_text())
    assert report["quick"] is True and "split none" in report["conditioning"]
    assert set(report["eval"]) >= {"truncated", "segment"} and len(report["eval"]["segment"]["shape"]) == 4

    # ship_model ships a stage-1 run's transformer beside the base it started from
    import shutil

    from shapesworld import ship_model

    run = tmp_path / "run"
    shutil.copytree(folder / "transformer", run / "model" / "transformer")
    (run / "config.yaml").write_text("stage: 1\nmodel:\n  pretrained: shapesworld-flow\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n')
    assert ship_model.main([str(run), "--name", "mine", "--eval", "2", "--out", str(tmp_path)]) == 0
    shipped = tmp_path / "mine"
    assert not (shipped / "transformer").is_symlink() and (shipped / "text_encoder_2").is_symlink()
    assert StableDiffusion3Pipeline.from_pretrained(shipped, text_encoder_3=None, tokenizer_3=None).text_encoder_3 is None
    assert json.loads((shipped / "report.json").read_text())["run_config"]["model"]["pretrained"] == "shapesworld-flow"


def test_quick_experiment_end_to_end(tmp_path):
    from shapesworld import experiment

    assert experiment.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for condition in ("base, truncated", "base, segment", "stage 1, truncated", "stage 1, segment"):
        assert f"| {condition} |" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["jobs"]) == 4 * len(results["settings"]["seeds"])
    assert all(len(j["result"]["shape"]) == 4 for j in results["jobs"])
    for name in ("accuracy_by_position.png", "grids/shapesworld-stage1_segment.png"):
        assert (tmp_path / name).stat().st_size > 0
    # the report can be redrawn from results.json alone
    (tmp_path / "report.md").unlink()
    assert experiment.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "| stage 1, segment |" in (tmp_path / "report.md").read_text()


def test_quick_preference_training_writes_a_loadable_reward_and_its_decomposition(tmp_path):
    from longalign_rl.registry import get_reward
    from shapesworld import pref_train

    assert pref_train.main(["--out", str(tmp_path), "--quick", "--threads", "1"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train"]["pairs"] > 0 and len(metrics["train"]["history"]) >= 1
    for name in ("shapes_clip", "shapes_pref"):
        d = metrics["decomposition"][name]
        # the two parts add up to the score, as decomposed_score defines them
        assert abs(d["text_relevant"]["mean"] + d["text_irrelevant"]["mean"] - d["score"]["mean"]) < 1e-5
    reward = get_reward("shapes_pref", weights=str(tmp_path))
    assert reward.differentiable


def test_ship_model_stores_a_run_unet_in_fp16_with_its_report(tmp_path):
    """ship_model on a stage-1 run directory (here faked from the shipped partial UNet)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from shapesworld import ship_model
    from shapesworld.plugin import WEIGHTS_DIR

    run = tmp_path / "run"
    shutil.copytree(WEIGHTS_DIR / "shapesworld-partial" / "unet", run / "model" / "unet")
    (run / "config.yaml").write_text("stage: 1\nlora:\n  enabled: true\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n')
    assert ship_model.main([str(run), "--name", "mine", "--eval", "2", "--out", str(tmp_path / "shipped")]) == 0
    weights = load_file(tmp_path / "shipped" / "mine" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(w.dtype == torch.float16 for w in weights.values())
    report = json.loads((tmp_path / "shipped" / "mine" / "report.json").read_text())
    assert report["run_config"]["stage"] == 1 and len(report["eval"]["segment"]["colour"]) == 4
    # a complete diffusers folder: the parts it does not ship link to the base's
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "shipped" / "mine", safety_checker=None)
    assert (tmp_path / "shipped" / "mine" / "vae").is_symlink() and pipe.tokenizer is not None


@pytest.mark.slow  # CI time (150 s, four runs): the research script; its runs are `train.main`, tested throughout
def test_quick_sweep_runs_every_condition_through_the_product(tmp_path):
    """Each stage-2 run of the sweep is `python -m longalign_rl.train` (its own config.yaml,
    metrics.jsonl and checkpoints), and every checkpoint gets a held-out evaluation."""
    from shapesworld import sweep

    assert sweep.main(["--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["reward"], r["w"]) for r in results["runs"]] == [("shapes_pref", 1.0), ("shapes_clip", 0.3)]
    for run in results["runs"]:
        run_dir = tmp_path / "runs" / sweep.run_name(run["reward"], run["w"], run["seed"])
        assert f"name: {run['reward']}" in (run_dir / "config.yaml").read_text()
        assert [m["step"] for m in run["metrics"]] == [1, 2]
        assert {"reward", "text_relevant", "text_irrelevant", "gt/shape/3"} <= set(run["metrics"][0])
        assert sorted(run["held_out"]) == ["1", "2"]
        assert all(len(h["shape"]) == 4 and 0 <= h["ink"] <= 1 for h in run["held_out"].values())
    report = (tmp_path / "report.md").read_text()
    assert "| start | 0 |" in report and "shapes_pref, w = 1 | 2 |" in report
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "grids.png").is_file()
    assert {p.name for p in (tmp_path / "grids").glob("*.png")} == {
        "start.png", "shapes_pref_w1_step2.png", "shapes_clip_w0.3_step2.png"}
    # a rerun keeps the finished runs (the sweep resumes) and evaluates them again
    trained = (tmp_path / "runs" / "shapes_pref_w1_s0" / "metrics.jsonl").stat().st_mtime_ns
    assert sweep.main(["--out", str(tmp_path), "--quick"]) == 0
    assert (tmp_path / "runs" / "shapes_pref_w1_s0" / "metrics.jsonl").stat().st_mtime_ns == trained
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["held_out"] == results["runs"][0]["held_out"]


@pytest.mark.slow  # two subprocess runs (2 min): CI time; GRPO and DDPO runs are in test_policy_gradient_run.py
def test_quick_policy_gradient_comparison_runs_both_methods_through_the_product(tmp_path):
    """Reward backpropagation and GRPO (the exact checker on sentence positions 3-4 as its
    reward, stochastic only in the first half of the chain), each `python -m
    longalign_rl.train`, every checkpoint evaluated on held-out captions."""
    from shapesworld import pg_compare

    assert pg_compare.main(["--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["reward_backprop", "grpo"]
    rb, grpo = results["runs"]
    assert "name: shapes_clip" in (tmp_path / "runs" / "reward_backprop_s0" / "config.yaml").read_text()
    config = (tmp_path / "runs" / "grpo_s0" / "config.yaml").read_text()
    assert "name: shapes_exact" in config and "name: grpo" in config
    cfg = yaml.safe_load(config)
    assert cfg["reward"]["kwargs"] == {"positions": [3, 4]} and cfg["algorithm"]["sde_window"] == [0, 0.5]
    for run in results["runs"]:
        assert [m["step"] for m in run["metrics"]] == [1, 2] and sorted(run["held_out"]) == ["1", "2"]
    assert "exact/shape" in grpo["metrics"][0] and "advantage_zero" in grpo["metrics"][0]
    assert grpo["held_out_stochastic"] == rb["held_out_stochastic"] == {}  # both judged by deterministic DDIM
    report = (tmp_path / "report.md").read_text()
    assert "| start | 0 | 0 |" in report and "| grpo | 2 |" in report and "Samples needed" in report
    assert (tmp_path / "curves.png").stat().st_size > 5_000


@pytest.mark.slow  # three subprocess runs (2-3 min): CI time; the flow configs' runs are test_configs.py's smokes
def test_quick_flow_comparison_runs_stage1_and_both_stage2_methods_through_the_product(tmp_path):
    """The flow model's evidence: stage 1 from shapesworld-flow (its merged model evaluated
    with the segment encoding, the base with both), then reward backpropagation and Flow-GRPO from
    shapesworld-flow-partial, each `python -m longalign_rl.train`, every checkpoint
    evaluated on held-out captions."""
    from shapesworld import flow_compare

    assert flow_compare.main(["--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (stage1,) = results["stage1"]
    assert set(stage1["held_out"]) == {"segment"} and set(results["base"]) == {"truncated", "segment"}
    assert yaml.safe_load((tmp_path / "runs" / "stage1_s0" / "config.yaml").read_text())["model"]["pretrained"] \
        == "shapesworld-flow"
    assert [r["method"] for r in results["runs"]] == ["reward_backprop", "flow_grpo"]
    for run in results["runs"]:
        cfg = yaml.safe_load((tmp_path / "runs" / f"{run['method']}_s0" / "config.yaml").read_text())
        assert cfg["model"]["pretrained"] == "shapesworld-flow-partial" and cfg["prompts"]["t5_max_tokens"] == 1
        assert [m["step"] for m in run["metrics"]] == [1, 2] and sorted(run["held_out"]) == ["1", "2"]
    grpo = yaml.safe_load((tmp_path / "runs" / "flow_grpo_s0" / "config.yaml").read_text())
    assert grpo["algorithm"]["name"] == "grpo" and grpo["reward"]["name"] == "shapes_exact"
    report = (tmp_path / "report.md").read_text()
    assert "| stage 1, segment |" in report and "| flow_grpo | 2 |" in report and "Samples needed" in report


@pytest.mark.slow  # one subprocess run (about a minute): CI time; the guard's own run is test_guard_run.py's
def test_quick_guard_comparison_selects_judged_weights_and_evaluates_them_held_out(tmp_path):
    """The guard's evidence: a run of the product with the exact checker as its judge, early
    stopping on a drop, its selected and last weights evaluated on held-out captions."""
    from shapesworld import guard_compare

    assert guard_compare.main(["--out", str(tmp_path), "--quick"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    cfg = yaml.safe_load((tmp_path / "runs" / "shapes_pref_w1_s0" / "config.yaml").read_text())
    assert cfg["run"]["judge"] == [{"reward": "shapes_exact"}] and cfg["run"]["early_stop"]["on_drop"] is True
    assert cfg["run"]["validation"] == "shapesworld.plugin:validation_captions"
    selection = run["selection"]
    assert selection["key"] == "judge/shapes_exact" and selection["exported_step"] in {v["step"] for v in
                                                                                      run["validations"]}
    assert [v["step"] for v in run["validations"]][0] == 0 and set(run["selected"]) >= {"colour", "shape"}
    report = (tmp_path / "report.md").read_text()
    assert "| shapes_pref, w = 1 |" in report and "Drift statistics" in report


def test_quick_gradient_check_compares_the_policy_gradient_with_the_pathwise_one():
    from shapesworld import pg_gradient_check

    result = pg_gradient_check.main(["--quick"])
    cosines = [v for k, v in result.items() if k.startswith("cos(")]
    assert len(cosines) == 5 and all(-1.0 <= c <= 1.0 for c in cosines)
    assert result["samples_per_estimate"] == 4
