"""A step's global batch does not depend on how it is split (issue 24, item 1): which
prompts, which noise and which trained steps each sample gets come from (train.seed, step,
the sample's place in the global batch), never from a rank, a micro-step or an actor; the
reward's batch statistics are the whole global batch's. Here the pieces, on the tiny
model: the samplers draw the same samples in one batch or in several, and every split of a
global batch over workers and micro-steps asks the actors for the same (prompt, seed)
pairs. tests/e2e/test_topology.py runs the product with different splits."""

import copy
import types

import pytest
import torch

from longalign_rl.config import SamplerConfig, load_config
from longalign_rl.prompts import PromptOrder, load_prompts
from longalign_rl.sampling.sampler import build_sampler, sample_trajectory
from longalign_rl.scoring import batch_statistics
from longalign_rl.training.stage2 import SamplerFed
from longalign_rl.training.worker import sample_seed

PROMPTS = ["a red cube. a blue ball on the left.", "two green squares.", "a yellow triangle. a red disc.",
           "a blue cube above a green ball."]
SEEDS = [101, 202, 303, 404]
# A batch of 4 and two of 2 sum in another order inside the UNet's matrix products (fp32:
# measured up to 8e-5 after 6 steps); bf16 rounds those differences up to 6e-2.
FP32 = {"rtol": 1e-3, "atol": 5e-4}


@pytest.fixture(scope="module")
def sampler(tiny_parts):
    cfg = SamplerConfig(num_steps=6, num_grad_steps=2, guidance_scale=5.0, resolution=32, precision="fp32")
    return build_sampler(cfg, copy.deepcopy(tiny_parts))


def test_a_rollout_is_the_same_drawn_in_one_batch_or_two(sampler):
    whole = sampler.sample(PROMPTS, seed=7, seeds=SEEDS)
    halves = [sampler.sample(PROMPTS[i:i + 2], seed=7, seeds=SEEDS[i:i + 2]) for i in (0, 2)]
    assert whole.grad_indices == halves[0].grad_indices == halves[1].grad_indices  # the step's choice
    for field in ("final_latents", "grad_latents", "grad_eps", "cond"):  # up to the order of fp32 sums
        torch.testing.assert_close(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]), **FP32)
    # each sample's own seed, not its place in the batch, gives its noise
    swapped = sampler.sample(PROMPTS[:2], seed=7, seeds=SEEDS[:2][::-1])
    assert not torch.allclose(swapped.final_latents[0], halves[0].final_latents[0])


def test_a_stochastic_trajectory_is_the_same_drawn_in_one_batch_or_two(sampler):
    """GRPO: groups of 2 share their start; the steps' noise is each sample's own."""
    prompts = [p for p in PROMPTS[:2] for _ in range(2)]
    whole = sample_trajectory(sampler, prompts, 9, eta=1.0, num_recorded=2, shared_start=2, seeds=SEEDS)
    halves = [sample_trajectory(sampler, prompts[i:i + 2], 9, eta=1.0, num_recorded=2, shared_start=2,
                                seeds=SEEDS[i:i + 2]) for i in (0, 2)]
    assert whole.indices == halves[0].indices == halves[1].indices
    for field in ("final_latents", "latents", "next_latents", "log_probs"):
        torch.testing.assert_close(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]), **FP32)
    assert not torch.allclose(whole.final_latents[0], whole.final_latents[1])  # a group's samples differ


class Recorder:
    """A sampler client that keeps what a worker asks for."""

    def __init__(self):
        self.asked = []

    def request(self, micro, prompts, seed, seeds, batch_prompts):
        self.asked.append((micro, prompts, seed, seeds, batch_prompts))


def tiny(*overrides):
    return load_config("configs/tiny.yaml", ["sampler.num_actors=1", *overrides])


def requests(cfg, world: int, steps: int, start_step: int = 0, reward=None) -> dict:
    """What every worker of a `world`-worker run asks the actors for in `steps` steps: sample
    index -> (prompt, its seed, the step's seed), per step; and every worker's statistics."""
    order = PromptOrder(load_prompts(cfg.prompts.source), seed=cfg.train.seed, shuffle=cfg.prompts.shuffle)
    per_step: dict = {}
    statistics = []
    for rank in range(world):
        fed = object.__new__(SamplerFed)  # the body's request logic, without the models
        fed.cfg, fed.ctx, fed.order, fed.client, fed.reward = cfg, types.SimpleNamespace(rank=rank, world=world, device=torch.device("cpu")), \
            order, Recorder(), reward
        fed.prompts_per_batch, fed.repeats = cfg.prompts_per_batch, fed_repeats(cfg)
        fed.start_micro = start_step * cfg.train.grad_accum
        fed.start_position = start_step * cfg.global_batch // fed.repeats  # prompts handed out before it
        fed._step_prompts, fed._statistics = {}, {}
        for step in range(start_step, start_step + steps):
            for j in range(cfg.train.grad_accum):
                fed.request(step * cfg.train.grad_accum + j)
            statistics.append((step, fed.reward_statistics(step)))
        for micro, prompts, seed, seeds, _ in fed.client.asked:
            step, chunk = divmod(micro, cfg.train.grad_accum)[0], fed.chunk(micro)[1]
            for i, (p, s) in enumerate(zip(prompts, seeds)):
                per_step.setdefault(step, {})[chunk * len(prompts) + i] = (p, s, seed)
    return {"samples": per_step, "statistics": statistics}


def fed_repeats(cfg):
    from longalign_rl.registry import algorithm_of

    return algorithm_of(cfg).group_size(cfg)


SPLITS = [(1, 4, 1), (2, 2, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]  # workers x batch x accumulation


@pytest.mark.parametrize("algorithm", ["reward_backprop", "grpo"])
def test_every_split_of_a_global_batch_asks_for_the_same_samples(algorithm):
    extra = ["algorithm.name=grpo", "algorithm.group_size=2"] if algorithm == "grpo" else []
    seen = []
    for workers, batch, accum in SPLITS:
        if algorithm == "grpo" and batch < 2:
            continue  # a worker's batch holds whole groups
        cfg = tiny(f"train.num_workers={workers}", f"train.batch_size={batch}", f"train.grad_accum={accum}", *extra)
        assert cfg.global_batch == 4
        seen.append(((workers, batch, accum), requests(cfg, workers, steps=3)["samples"]))
    (_, first), *others = seen
    assert sorted(first) == [0, 1, 2] and all(sorted(first[s]) == [0, 1, 2, 3] for s in first)
    for split, samples in others:
        assert samples == first, split
    seeds = [s for step in first.values() for _, s, _ in step.values()]
    assert len(set(seeds)) == len(seeds)  # no two samples share their noise
    assert len({seed for step in first.values() for _, _, seed in step.values()}) == 3  # one step seed per step
    if algorithm == "grpo":  # a group: one prompt twice, side by side
        assert all(step[0][0] == step[1][0] and step[2][0] == step[3][0] for step in first.values())


def test_a_resumed_run_asks_for_what_the_uninterrupted_one_did_with_another_worker_count():
    whole = requests(tiny("train.num_workers=2", "train.batch_size=2"), 2, steps=4)
    resumed = requests(tiny("train.num_workers=1", "train.batch_size=4"), 1, steps=2,
                       start_step=2)
    assert resumed["samples"] == {s: whole["samples"][s] for s in (2, 3)}


def test_the_batch_statistics_are_the_global_batchs_on_every_worker(tiny_parts):
    """The decomposed reward's batch direction: every worker computes the sums of the whole
    step's prompts, so they agree with each other and with any other split, and need no
    collective."""
    from longalign_rl.registry import get_reward

    reward = get_reward("tiny_clip", direction="batch")
    results = []
    for workers, batch, accum in [(1, 4, 1), (2, 2, 1), (2, 1, 2)]:
        cfg = tiny(f"train.num_workers={workers}", f"train.batch_size={batch}", f"train.grad_accum={accum}")
        results.append(requests(cfg, workers, steps=2, reward=reward)["statistics"])
    reference = dict(results[0])  # step -> the one worker's statistics
    for result in results[1:]:
        for step, stats in result:  # every worker of every split, bit for bit
            torch.testing.assert_close(stats["text_sum"], reference[step]["text_sum"], rtol=0, atol=0)
    samples = requests(tiny(), 2, steps=1)["samples"][0]
    expected = batch_statistics(reward, [samples[i][0] for i in sorted(samples)])["text_sum"]
    torch.testing.assert_close(reference[0]["text_sum"], expected, rtol=0, atol=0)


def test_sample_seeds_differ_by_step_index_and_run_seed():
    cfg = tiny()
    other = tiny("train.seed=1")
    seeds = {sample_seed(cfg, step, i) for step in range(50) for i in range(-1, 64)}
    assert len(seeds) == 50 * 65
    assert sample_seed(cfg, 3, 5) != sample_seed(other, 3, 5)


def test_a_stage1_micro_step_draws_the_same_for_each_pair_in_one_batch_or_two(tiny_parts):
    """Stage 1: a pair's VAE draw, caption dropout, timestep and noise come from its own
    generator, so the loss of a batch of 4 is the mean of its two halves' losses."""
    from diffusers import DDPMScheduler

    from longalign_rl.algorithms.denoising import caption_dropout, denoising_loss
    from longalign_rl.vae import encode

    parts = copy.deepcopy(tiny_parts)
    scheduler = DDPMScheduler.from_config(parts.scheduler_config)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(4, 240, parts.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros_like(cond)

    def loss(i, j):
        gens = [torch.Generator().manual_seed(s) for s in SEEDS[i:j]]
        with torch.no_grad():
            latents = encode(parts.vae, images[i:j], gens)
            c = caption_dropout(cond[i:j], uncond[i:j], 0.5, gens)
            value, stats = denoising_loss(parts.unet, scheduler, latents, c, gens)
        return value, stats["timestep"], c

    whole, t, c = loss(0, 4)
    (a, ta, ca), (b, tb, cb) = loss(0, 2), loss(2, 4)
    assert torch.equal(t, torch.cat([ta, tb])) and torch.equal(c, torch.cat([ca, cb]))
    torch.testing.assert_close(whole, (a + b) / 2, **FP32)
    assert not torch.equal(t, loss(0, 4)[1].flip(0))  # each pair its own draws, not one shared
    with pytest.raises(ValueError, match="3 generators for a batch of 4"):
        caption_dropout(cond, uncond, 0.5, [torch.Generator()] * 3)


def test_an_elastic_run_keeps_its_global_batch_on_every_worker_count_it_allows():
    """train.min_workers: Ray Train may run any count from min_workers to num_workers; each
    keeps the global batch by accumulating (config.with_workers), and a count that cannot is
    refused on the driver, naming the key."""
    from longalign_rl import launch
    from longalign_rl.config import ConfigError

    cfg = load_config(None, ["train.num_workers=4", "train.batch_size=1", "train.grad_accum=3", "train.min_workers=2",
                             "sampler.num_actors=2", "train.use_gpu=false"])
    for world, accum in [(4, 3), (3, 4), (2, 6)]:
        smaller = cfg.with_workers(world)
        assert (smaller.train.num_workers, smaller.train.grad_accum) == (world, accum)
        assert smaller.global_batch == cfg.global_batch == 12
    assert cfg.with_workers(4) is cfg
    from pathlib import Path

    from longalign_rl import preflight

    assert "4 workers (elastic: 2 at least, the global batch kept) x 1 prompts x 3 accumulation" in (
        preflight.describe(cfg, Path("runs/x")))
    assert launch.required_resources(cfg)["CPU"] == 2 * cfg.train.cpus_per_worker + 2 * cfg.sampler.num_cpus
    with pytest.raises(ConfigError, match=r"train.min_workers: 3 workers x train.batch_size 1 cannot hold the global "
                                          r"batch of 8"):
        load_config(None, ["train.num_workers=4", "train.batch_size=1", "train.grad_accum=2", "train.min_workers=2",
                           "sampler.num_actors=2"])
    with pytest.raises(ConfigError, match="train.min_workers: must be 0 .fixed. or between 1 and"):
        load_config(None, ["train.num_workers=2", "train.min_workers=3", "sampler.num_actors=2"])
