"""The whole pipeline on tiny models: two sampler actors, two DeepSpeed ZeRO-2 trainer
workers on local Ray, a few steps, a checkpoint, a resume, the exported LoRA, and
third-party rewards from an entry point and from an import path.

One Ray instance serves every test of this module (starting Ray costs ~10 s)."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from longalign_rl import train
from longalign_rl.prompts import load_prompts

pytestmark = pytest.mark.filterwarnings("ignore")

PLUGIN = '''
import torch
from longalign_rl.registry import Reward, RewardOutput


class Redness(Reward):
    """Mean red minus mean green: differentiable and prompt-blind."""

    differentiable = True

    def forward(self, images, prompts):
        total = images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))
        return RewardOutput(total=total, components={"red": images[:, 0].mean(dim=(1, 2)).detach()})


class Darkness(Reward):
    differentiable = True

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, images, prompts):
        total = self.weight * (1 - images.mean(dim=(1, 2, 3)))
        return RewardOutput(total=total, components={})
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """A third-party package on the path, with one reward declared as an entry point."""
    root = tmp_path_factory.mktemp("site")
    (root / "thirdparty_rewards.py").write_text(textwrap.dedent(PLUGIN))
    dist = root / "thirdparty_rewards-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-rewards\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[longalign_rl.rewards]\nredness = thirdparty_rewards:Redness\n")
    return root


@pytest.fixture(scope="module")
def ray_local(plugin_dir):
    """Local Ray whose workers see the plugin package (as `runtime_env` would on a cluster)."""
    import ray

    from longalign_rl import registry

    sys.path.insert(0, str(plugin_dir))
    registry._reset()
    repo = Path(__file__).resolve().parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(repo), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
    sys.path.remove(str(plugin_dir))
    registry._reset()


def run_main(tmp_path, *args):
    code = train.main([*args, f"run.output_dir={tmp_path}"] if "--resume" not in args else list(args))
    assert code == 0


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    """4 steps with a checkpoint every 2, then --resume to 6 steps."""
    out = tmp_path_factory.mktemp("runs")
    run_main(out, "train.steps=4", "run.checkpoint_every=2", "run.image_every=2", "run.name=tiny")
    run_dir = out / "tiny"
    first = read_metrics(run_dir)
    run_main(out, "--resume", str(run_dir), "train.steps=6")
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
        # the exact checker's verdicts per cell sentence (run.ground_truth=shapesworld)
        assert all(0 <= m[f"gt/{a}/{i}"] <= 1 for a in ("colour", "shape") for i in range(1, 5))
        assert 0 <= m["gt/background"] <= 1
        # reward = relevant + 0.3 * irrelevant, as means over both workers' samples
        assert m["reward"] == pytest.approx(m["text_relevant"] + 0.3 * m["text_irrelevant"], abs=1e-6)
    assert first[0]["policy_lag"] == 0 and first[0]["replay_error"] < 1e-4  # on-policy at the start
    assert (run_dir / "images" / "step_000001.png").is_file()
    assert (run_dir / "images" / "step_000002.txt").read_text().startswith("0: ")
    assert "pretrained: shapesworld" in (run_dir / "config.yaml").read_text()
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 3  # steps 2, 4, 6
    newest = checkpoints[-1]
    assert json.loads((newest / "state.json").read_text())["step"] == 6
    assert (newest / "weights.safetensors").is_file()
    assert {p.name for p in (newest / "rng").iterdir()} == {"rank0.pt", "rank1.pt"}
    optim = list((newest / "deepspeed").rglob("*optim_states.pt"))
    assert len(optim) == 2, optim  # one ZeRO-2 partition per worker


def test_workers_hold_identical_weights_every_step(tiny_run):
    run_dir, _ = tiny_run
    spreads = [m["weights_spread"] for m in read_metrics(run_dir)]
    assert len(spreads) == 6 and all(s == 0.0 for s in spreads)


def test_resume_continues_the_step_count(tiny_run):
    run_dir, first = tiny_run
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[:4] == first  # nothing before the checkpoint was redone or lost
    assert metrics[-1]["lr"] == pytest.approx(1e-3)


def test_exported_lora_loads_into_a_diffusers_pipeline(tiny_run):
    """Every trained LoRA layer loads into StableDiffusionPipeline and changes its output."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from longalign_rl.encoding import SegmentEncoder
    from longalign_rl.models import load_components, make_scheduler

    run_dir, _ = tiny_run
    trained = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")

    def generate(lora: bool):
        parts = load_components("shapesworld")
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
        cond = encoder([load_prompts("shapesworld")[0]])
        return pipe(prompt_embeds=cond, negative_prompt_embeds=encoder.uncond(1), num_inference_steps=4,
                    height=32, width=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    base, tuned = generate(False), generate(True)
    assert base.shape == tuned.shape == (1, 3, 32, 32)
    assert (base - tuned).abs().max() > 1e-4


@pytest.mark.parametrize("reward", ["redness", "thirdparty_rewards:Darkness"])
def test_third_party_reward_plugins_drive_a_run(ray_local, tmp_path, reward):
    """An entry-point plugin and an import-path plugin, each used for a real (short) run."""
    kwargs = ["reward.kwargs={weight: 2.0}"] if ":" in reward else ["reward.kwargs={}"]
    run_main(tmp_path, "train.steps=2", "run.checkpoint_every=2", f"reward.name={reward}", *kwargs, "run.name=p")
    metrics = read_metrics(tmp_path / "p")
    assert [m["step"] for m in metrics] == [1, 2]
    if reward == "redness":
        assert "red" in metrics[0]
    else:  # weight 2: reward = 2 * (1 - brightness) lies in [0, 2] and above 1 for dark images
        assert 0.0 <= metrics[0]["reward"] <= 2.0


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


def test_a_stale_or_restarted_sampler_actor_is_resynced(ray_local):
    """A rollout that lags more than max_policy_lag is not used: its actor gets the
    trainer's weights and samples again. A killed actor restarts and the same happens."""
    import ray

    from longalign_rl.config import load_config
    from longalign_rl.prompts import PromptOrder, load_prompts
    from longalign_rl.sampling.actor import start_sampler_actors
    from longalign_rl.training.loop import RolloutClient

    cfg = load_config(train.DEFAULT_CONFIG, ["sampler.num_actors=1", "train.max_policy_lag=1"])
    (actor,) = start_sampler_actors(cfg)
    client = RolloutClient([actor], PromptOrder(load_prompts("demo"), seed=0, shuffle=True), cfg, rank=0, world=1)
    calls = []

    def weights():
        calls.append(1)
        return {}  # LoRA weights not needed to test the version bookkeeping

    assert client.get(0, version=1, weights_fn=weights).policy_version == 0  # lag 1: usable
    assert client.get(1, version=5, weights_fn=weights).policy_version == 5  # lag 5: resynced
    assert len(calls) == 1

    ray.kill(actor, no_restart=False)  # dies; Ray restarts it at version 0
    rollout = client.get(2, version=5, weights_fn=weights)
    assert rollout.policy_version == 5 and len(calls) == 2
    ray.kill(actor)


def test_a_worker_moves_on_when_its_sampler_actor_is_gone_for_good(ray_local):
    """A node that goes away takes its actor with it: the run goes on with fewer samplers."""
    import ray

    from longalign_rl.config import load_config
    from longalign_rl.prompts import PromptOrder, load_prompts
    from longalign_rl.sampling.actor import start_sampler_actors
    from longalign_rl.training.loop import RolloutClient

    cfg = load_config(train.DEFAULT_CONFIG, ["sampler.num_actors=2"])
    actors = start_sampler_actors(cfg)
    client = RolloutClient(actors, PromptOrder(load_prompts("demo"), seed=0, shuffle=True), cfg, rank=1, world=2)
    assert client.actor == actors[1]
    client.request(0)  # in flight when the actor dies
    ray.kill(actors[1], no_restart=True)
    rollout = client.get(0, version=0, weights_fn=dict)
    assert client.actor == actors[0] and len(rollout) == cfg.train.batch_size
    ray.kill(actors[0])


def test_the_run_joins_the_cluster_named_by_ray_address(monkeypatch, tmp_path):
    """`ray job submit` sets RAY_ADDRESS; the entry point must join it, not start its own."""
    import ray

    seen = {}

    class Joined(Exception):
        pass

    def fake_init(address=None, **kwargs):
        seen["address"] = address
        raise Joined

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(Joined):
        train.main([f"run.output_dir={tmp_path}", "run.name=joined"])
    assert seen["address"] == "127.0.0.1:6379"
    assert (tmp_path / "joined" / "config.yaml").is_file()


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
