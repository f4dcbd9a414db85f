"""Reward actors (reward.num_actors, issue 11): the reward scored in a pool of Ray actors with
their own resources and runtime environment, fed straight from the sampler actors."""

import importlib
import textwrap
import time

import pytest
import ray
import torch

from longalign_rl.config import ConfigError, load_config
from longalign_rl.reward_actors import RewardPool
from longalign_rl.sampling.group import SamplerGroup
from longalign_rl.vae import decode
from tests.plugins.my_reward import BrightPixels

pytestmark = pytest.mark.filterwarnings("ignore")

BRIGHT = ["algorithm.name=grpo", "reward.name=tests.plugins.my_reward:BrightPixels", "reward.kwargs={threshold: 0.4}",
          "reward.num_cpus=0"]

# A reward package that exists only where runtime_env's py_modules puts it: in the reward actors.
ACTOR_ONLY = '''
import torch
from longalign_rl.registry import Reward, RewardOutput


class MeanGreen(Reward):
    differentiable = False

    def forward(self, images, prompts):
        green = images[:, 1].mean(dim=(1, 2))
        return RewardOutput(total=green, components={"green": green.clone()})
'''


def config(*overrides):
    return load_config("configs/default.yaml", [*BRIGHT, *overrides])


def test_config_refuses_reward_actors_for_reward_backpropagation():
    with pytest.raises(ConfigError, match="reward.num_actors: reward actors score without a gradient"):
        load_config("configs/default.yaml", ["reward.num_actors=1"])
    for key in ("reward.num_actors=-1", "reward.num_cpus=-1", "reward.num_gpus=-0.5"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            config(key)


def test_pool_scores_as_the_reward_does_in_process(ray_local):
    cfg = config("reward.num_actors=2")
    pool = RewardPool(cfg)
    try:
        pool.check(["a prompt"])
        client = pool.client(rank=1)
        images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        prompts = ["p"] * 4
        refs = [client.submit(images[i:i + 2], prompts[:2]) for i in (0, 2)]  # round robin over both actors
        scored = [client.get(ref) for ref in refs]
        expected = BrightPixels(threshold=0.4)(images, prompts)
        assert torch.equal(torch.cat([s.output.total for s in scored]), expected.total)
        assert torch.equal(torch.cat([s.output.components["bright_fraction"] for s in scored]),
                           expected.components["bright_fraction"])
        assert all(s.seconds >= 0 for s in scored)
        assert not client.sent  # nothing left to resend
    finally:
        pool.shutdown()


def test_a_dead_reward_actor_hands_its_batch_to_the_next(ray_local):
    pool = RewardPool(config("reward.num_actors=2"))
    try:
        pool.check(["a prompt"])
        client = pool.client(rank=0)
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        ray.kill(pool.actors[0], no_restart=True)  # the actor rank 0 would send its first batch to
        scored = client.get(client.submit(images, ["p", "q"]))
        assert torch.equal(scored.output.total, BrightPixels(threshold=0.4)(images, ["p", "q"]).total)
    finally:
        pool.shutdown()


CRASHING = "reward.name=tests.plugins.my_reward:Crashing"


@pytest.mark.parametrize("how, expected", [
    # the process dies on every call: restarted reward.max_restarts times, then the cause
    ("die", r"reward actors died 2 times scoring one batch \(reward.max_restarts: each actor is restarted that often\): \w+"),
    # the call never returns: the key that bounds it
    ("block", r"reward.timeout_s: no reward actor returned the scores of a batch within 8 s"),
    # sys.exit in the reward: its own error, not an actor death that Ray would restart
    ("exit", r"reward tests.plugins.my_reward.Crashing called sys.exit\(3\)"),
])
def test_a_reward_actor_that_dies_blocks_or_exits_fails_the_batch_in_bounded_time(ray_local, how, expected):
    """Issue 22: these hung the run (the actors were restarted for ever, a blocked call was
    waited on for ever); now each fails the worker's get() with its cause within
    reward.timeout_s."""
    cfg = config(CRASHING, f"reward.kwargs={{how: {how}, after: 0}}", "reward.num_actors=1",
                 "reward.max_restarts=1", "reward.timeout_s=8")
    pool = RewardPool(cfg)
    try:
        client = pool.client(rank=0)
        start = time.monotonic()
        with pytest.raises((RuntimeError, ray.exceptions.RayTaskError), match=expected):
            client.get(client.submit(torch.rand(2, 3, 32, 32), ["p", "q"]))
        assert time.monotonic() - start < 30
    finally:
        pool.shutdown()


def test_a_reward_that_exits_in_its_actor_ends_the_run_with_its_own_error(ray_local, tmp_path, capsys):
    """The issue's hang: the probe passes, then the reward ends its actor's process at its first
    score. The run ends (exit 1) in bounded time, its last line naming the reward's error."""
    from longalign_rl import train

    start = time.monotonic()
    code = train.main(["algorithm.name=grpo", CRASHING, "reward.kwargs={how: exit, after: 1}", "reward.num_actors=1",
                       "reward.num_cpus=0", "train.steps=2", "run.validation_size=0", f"run.output_dir={tmp_path}",
                       "run.name=exits"])
    err = capsys.readouterr().err
    assert code == 1
    assert "RuntimeError: reward tests.plugins.my_reward.Crashing called sys.exit(3)" in err.strip().splitlines()[-1]
    assert time.monotonic() - start < 240


def test_the_reward_may_live_only_in_the_actors_runtime_env(ray_local, tmp_path):
    package = tmp_path / "actor_only_rewards"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(ACTOR_ONLY))
    with pytest.raises(ImportError):
        importlib.import_module("actor_only_rewards")  # not here, nor in the trainer workers
    cfg = load_config("configs/default.yaml", [
        "algorithm.name=grpo", "reward.name=actor_only_rewards:MeanGreen", "reward.num_actors=1", "reward.num_cpus=0",
        # local://: a folder that exists on every node, put on the actors' path as it is
        f"reward.runtime_env={{py_modules: ['local://{tmp_path}']}}"])
    pool = RewardPool(cfg)
    try:
        pool.check(["a prompt"])
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        client = pool.client(rank=0)
        scored = client.get(client.submit(images, ["p", "q"]))
        assert torch.allclose(scored.output.total, images[:, 1].mean(dim=(1, 2)))
    finally:
        pool.shutdown()


def test_a_reward_that_cannot_be_built_in_the_actors_is_a_config_error(ray_local):
    cfg = load_config("configs/default.yaml", ["algorithm.name=grpo", "reward.name=no_such_package.rewards:Nothing",
                                               "reward.num_actors=1", "reward.num_cpus=0"])
    pool = RewardPool(cfg)
    try:
        with pytest.raises(ConfigError, match=r"reward: 'no_such_package.rewards:Nothing' in a reward actor: .*no_such_package"):
            pool.check(["a prompt"])
    finally:
        pool.shutdown()


def test_samplers_send_their_images_to_the_reward_actors(ray_local, tmp_path):
    """A worker's request: the sampler actor returns the trajectory and, as a second object,
    its final latents decoded, which go to a reward actor before the worker asks for either.
    The actor's warnings reach warnings.log."""
    cfg = config("reward.num_actors=1", "sampler.num_actors=1", "sampler.num_steps=4",
                 "algorithm.group_size=2", "algorithm.timestep_fraction=0.5", "prompts.max_tokens=12")
    pool, samplers = RewardPool(cfg, tmp_path), SamplerGroup(cfg, tmp_path)
    try:
        client = samplers.client(rank=0, rewards=pool.client(rank=0))
        prompts = ["A picture with a grid of four cells. The first cell holds a red circle."] * 2
        client.request(0, prompts, seed=7)
        trajectory = client.get(0, version=0, weights_fn=None)
        scored, images_ref = client.scores(0)
        images = ray.get(images_ref)
        assert images.shape == (2, 3, 32, 32) and trajectory.prompts == prompts
        assert torch.equal(scored.output.total, BrightPixels(threshold=0.4)(images, prompts).total)
        from longalign_rl.models import load_components

        vae = load_components(cfg.model.pretrained).vae
        assert torch.allclose(images, decode(vae, trajectory.final_latents), atol=1e-5)
        # the actor's warnings reach the run's warnings.log (the console), but not the prompt it cut:
        # the driver measured every prompt and said so once (preflight.warn_cut_prompts)
        import logging

        def warn(actor, message):
            logging.getLogger("longalign_rl.sampling.sampler").warning(message)

        assert not (tmp_path / "warnings.log").exists()
        ray.get(samplers.actors[0].__ray_call__.remote(warn, "weights are stale"))
        assert (tmp_path / "warnings.log").read_text().splitlines() == ["sampler actor 0: weights are stale"]
    finally:
        samplers.shutdown()
        pool.shutdown()


def test_train_exits_2_naming_a_reward_its_actors_cannot_build(ray_local, tmp_path, capsys):
    """The driver never imports the reward (it may exist only in the actors' runtime_env): the
    probe runs in the actors, before any run directory or trainer worker exists."""
    from longalign_rl import train

    code = train.main(["algorithm.name=grpo", "reward.name=no_such_package.rewards:Nothing", "reward.num_actors=1",
                       "reward.num_cpus=0", f"run.output_dir={tmp_path}", "run.name=bad"])
    assert code == 2
    assert "reward: 'no_such_package.rewards:Nothing' in a reward actor" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
