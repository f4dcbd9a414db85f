"""The paper-exact mode end to end at tiny size (issue 13): the paper-exact stage 1
(configs/tiny_reference_stage1.yaml: the reference's split and LoRA layers, the tiny T5
branch's adapter trained beside the LoRA at its own learning rate), then the paper-exact
stage 2 from its model/ (configs/tiny_reference.yaml: the adapter frozen, pred_x0 decoding,
sampling with the LoRA's dropout on, the reference's reward crop and split, on-policy),
then the inference helper on both runs. Two sampler actors and two DeepSpeed workers.

One Ray instance (conftest.ray_local) serves every test of this module."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from longalign_rl import train
from longalign_rl.config import load_config
from longalign_rl.encoding.t5 import TextAdapter, load_adapter
from tests import REPO
from longalign_rl.outputs import read_metrics

pytestmark = pytest.mark.filterwarnings("ignore")

STAGE1 = str(REPO / "configs" / "tiny_reference_stage1.yaml")
STAGE2 = str(REPO / "configs" / "tiny_reference.yaml")


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert train.main(["--config", STAGE1, f"run.output_dir={out}", "run.name=ref1"]) == 0
    assert train.main(["--config", STAGE2, f"model.pretrained={out / 'ref1' / 'model'}", f"run.output_dir={out}",
                       "run.name=ref2"]) == 0
    return out / "ref1", out / "ref2"


def test_stage1_trains_the_t5_adapter_beside_the_lora(runs):
    stage1, _ = runs
    cfg = load_config(stage1 / "config.yaml")
    assert cfg.t5.encoder == "tiny" and cfg.prompts.split == "reference"
    start = load_adapter(None, in_dim=32, out_dim=32, int_dim=cfg.t5.adapter_dim, seed=cfg.model.random_seed)
    trained = TextAdapter.from_pretrained(stage1 / "text_adapter")
    merged = TextAdapter.from_pretrained(stage1 / "model" / "text_adapter")
    for (name, p0), p1, p2 in zip(start.state_dict().items(), trained.state_dict().values(), merged.state_dict().values()):
        assert torch.equal(p1, p2), name  # model/ carries the trained adapter
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(start.state_dict().values(), trained.state_dict().values()))
    checkpoint = sorted(p for p in stage1.glob("checkpoint_*") if p.is_dir())[-1]
    weights = load_file(checkpoint / "weights.safetensors")
    assert any(k.startswith("text_adapter.") for k in weights) and any("lora_A" in k for k in weights)
    assert not any(k.startswith("text_adapter.") for k in load_file(stage1 / "lora" / "pytorch_lora_weights.safetensors"))
    metrics = read_metrics(stage1)
    for m in metrics:
        assert m["weights_spread"] == 0.0 and 0 < m["loss"] < 10
    # the adapter's own learning rate (3e-3 against the LoRA's 1e-3), warmed up alike
    assert metrics[-1]["lr"] == pytest.approx(1e-3) and metrics[-1]["lr/t5_adapter"] == pytest.approx(3e-3)
    assert metrics[0]["lr/t5_adapter"] == pytest.approx(3 * metrics[0]["lr"])


def test_stage2_replays_exactly_with_dropout_on_and_on_policy(runs):
    _, stage2 = runs
    cfg = load_config(stage2 / "config.yaml")
    assert (cfg.sampler.final, cfg.sampler.train_mode, cfg.train.max_policy_lag) == ("pred_x0", True, 0)
    assert cfg.lora.dropout == 0.1 and cfg.reward.kwargs["crop"] == "reference"
    metrics = read_metrics(stage2)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        # the samplers' dropout masks are drawn again by the trainers; lag 0: nothing is left
        assert m["policy_lag"] == 0 and m["replay_error"] <= 1e-5
        assert m["weights_spread"] == 0.0 and np.isfinite(m["reward"]) and m["grad_norm"] > 0
    assert not (stage2 / "text_adapter").exists()  # frozen in stage 2: nothing new to export


def test_the_inference_helper_redraws_the_t5_runs_validation(runs):
    """Stage 2's pipeline: its LoRA on stage 1's model, stage 1's trained adapter, 128 CLIP +
    128 T5 tokens; it draws the run's last validation images again."""
    from longalign_rl import validation
    from longalign_rl.pipeline import load

    stage1, stage2 = runs
    pipe = load(stage2, device="cpu")
    assert pipe.longalign["weights"] == "lora" and pipe.longalign["t5_tokens"] == 128
    trained = TextAdapter.from_pretrained(stage1 / "text_adapter")
    for a, b in zip(pipe.segment_encoder.t5.adapter.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    embeds, _ = pipe.encode_prompt(["A red cube. A blue ball?"], "cpu", 1, True)
    assert embeds.shape[1] == 128 + 128
    record = validation.read(stage2)[-1]
    vset = validation.validation_set(load_config(stage2 / "config.yaml"))
    drawn = pipe.generate(vset.prompts, vset.seeds, output_type="pt")
    step_dir = stage2 / "validation" / f"step_{record['step']:06d}"
    saved = torch.stack([torch.from_numpy(np.array(Image.open(step_dir / f"{i:03d}.png")))
                         for i in range(len(vset.prompts))])
    assert (drawn - saved.permute(0, 3, 1, 2).float() / 255).abs().max() <= 2 / 255

    pipe1 = load(stage1, device="cpu")  # stage 1's own run: the merged model and its trained adapter
    assert pipe1.longalign["weights"] == "merged" and pipe1.longalign["t5"] == "tiny"
    for a, b in zip(pipe1.segment_encoder.t5.adapter.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)


def test_evaluate_compares_the_t5_run_with_its_base_encoded_alike(runs, tmp_path):
    """`evaluate --against base`: the base is stage 1's model folder (with its adapter); it
    takes the run's T5 encoder, as it takes its sampling settings. A model folder with a T5
    branch alone needs --t5."""
    from longalign_rl import evaluate, generate

    stage1, stage2 = runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red cube on the left. A blue ball? Two green squares.\nOne yellow circle.\n")
    assert evaluate.main([str(stage2), "--prompts", str(prompts), "--against", "base", "--out", str(tmp_path / "ev"),
                          "--no-reward", "--metrics", "tests.unit.test_hooks:brightness"]) == 0
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert [m["weights"] for m in result["models"]] == ["lora", "base"]
    assert generate.main([str(stage1 / "model"), "a red cube.", "--out", str(tmp_path / "g"), "--steps", "2"]) == 2
    assert generate.main([str(stage1 / "model"), "a red cube.", "--out", str(tmp_path / "g"), "--steps", "2",
                          "--t5", "tiny"]) == 0
    assert (tmp_path / "g" / "000.png").is_file()
