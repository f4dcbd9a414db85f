"""Reward actors (reward.num_actors > 0, grpo / ddpo): the reward lives in a pool of Ray
actors of its own instead of in every trainer worker.

    driver          pool = RewardPool(cfg, run_dir)    start the actors (reward.num_cpus / num_gpus /
                    pool.check(prompts)                runtime_env), build and probe the reward in them
                    ... TorchTrainer(train_loop_config={"rewards": pool, ...}).fit()
                    pool.shutdown()
    every worker    client = pool.client(rank)
                    ref = client.submit(images, prompts)   images may be an ObjectRef: a sampler
                    scored = client.get(ref)              actor's output, scored as soon as it exists

A sampler actor decodes its trajectory's final latents and returns the images as a second
object (SamplerActor.sample_images); the worker passes that object's ref straight to
`submit`, so scoring starts when sampling ends, without a round trip through the worker,
and overlaps with the next batch's sampling. Neither the driver nor the workers build or
import the reward: it may need a GPU of its own, or packages only its runtime_env has.

A reward actor whose process dies is restarted by Ray, at most reward.max_restarts times;
meanwhile the worker sends the same images to the next actor of the pool. When every actor
is gone, or no score came within reward.timeout_s (a reward call that blocks), the step
fails with the cause and the key. An exception raised by the reward itself (sys.exit
included) fails the step, as it would in the worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from longalign_rl.actor_pool import ActorPool, backoff
from longalign_rl.config import Config, from_dict, to_dict
from longalign_rl.console import WARNINGS_LOG, actor_cause, log_warnings_to
from longalign_rl.registry import get_reward, probe_reward
from longalign_rl.scoring import batch_statistics, score
from longalign_rl.types import RewardOutput

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """A reward actor's answer: the reward (on the CPU, no graph) and the seconds it took."""

    output: RewardOutput
    seconds: float


@ray.remote
class RewardActor:
    def __init__(self, config: dict, run_dir: str | None = None, index: int = 0):
        self.cfg = from_dict(config)
        if run_dir:
            log_warnings_to(Path(run_dir) / WARNINGS_LOG, f"reward actor {index}")
        r = self.cfg.reward
        torch.set_num_threads(max(1, int(r.num_cpus)))
        self.device = torch.device("cuda" if r.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        reward = get_reward(r.name, **r.kwargs)
        self.reward = reward.to(self.device) if hasattr(reward, "to") else reward
        self._statistics: tuple = (None, None)  # (a step's prompts, their batch statistics)

    def check(self, prompts: list[str], resolution: int) -> None:
        """The driver's probe (registry.probe_reward), run where the reward lives."""
        probe_reward(self.reward, self.cfg.reward.name, prompts, resolution)

    def statistics(self, batch_prompts: list[str] | None):
        """`batch_statistics` of a step's prompts, kept for the step's other batches."""
        if batch_prompts is None:
            return None
        key = tuple(batch_prompts)
        if self._statistics[0] != key:
            self._statistics = (key, batch_statistics(self.reward, batch_prompts))
        return self._statistics[1]

    def score(self, images: torch.Tensor, prompts: list[str], batch_prompts: list[str] | None = None) -> Scored:
        """The reward of `images`; `batch_prompts`: every prompt of the step's global batch,
        whose batch statistics (scoring.batch_statistics) the reward then uses, as the
        trainer workers do, whatever share of the batch this call scores."""
        start = time.perf_counter()
        statistics = self.statistics(batch_prompts)
        with torch.no_grad():
            out, _ = score(self.reward, images.to(self.device), prompts, statistics)
        cpu = RewardOutput(total=out.total.detach().float().cpu(),
                           components={k: v.detach().float().cpu() for k, v in out.components.items()})
        return Scored(cpu, time.perf_counter() - start)


class RewardPool(ActorPool):
    """cfg.reward.num_actors reward actors (an actor_pool.ActorPool: made on the driver,
    pickled into every trainer worker), each restarted reward.max_restarts times."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None):
        r = cfg.reward
        self.cfg = cfg
        super().__init__(RewardActor, r.num_actors, (to_dict(cfg), str(run_dir) if run_dir else None),
                         num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=r.resources, max_restarts=r.max_restarts,
                         runtime_env=r.runtime_env)

    def check(self, prompts: list[str]) -> None:
        """Every actor builds the reward and passes the probe, or ConfigError naming the reward
        (and the runtime_env it was built in)."""
        r = self.cfg.reward
        where = f"in a reward actor (runtime_env {r.runtime_env})" if r.runtime_env else "in a reward actor"
        self.wait_built(lambda actor: actor.check.remote(prompts, self.cfg.sampler.resolution),
                        f"reward: {r.name!r} {where}", errors=(ray.exceptions.RayError, TypeError, ValueError))

    def client(self, rank: int) -> "RewardClient":
        r = self.cfg.reward
        return RewardClient(self.actors, rank, timeout_s=r.timeout_s, max_deaths=len(self.actors) * (r.max_restarts + 1))


class RewardClient:
    """One worker's view of the pool: batches go round-robin from actor rank % num_actors,
    so several workers share the actors evenly; a batch whose actor died goes to the next,
    until `max_deaths` deaths (every actor's restarts spent) or `timeout_s` seconds."""

    def __init__(self, actors: list, rank: int, timeout_s: float = 600.0, max_deaths: int = 4):
        self.actors, self.rank = actors, rank
        self.timeout_s, self.max_deaths = timeout_s, max_deaths
        self.next = rank % len(actors)
        self.sent: dict[ray.ObjectRef, tuple] = {}  # score ref -> (images, prompts, actor): to resend

    def submit(self, images, prompts: list[str], batch_prompts: list[str] | None = None) -> ray.ObjectRef:
        """Score `images` (a tensor or the ObjectRef of one) of `prompts`, with the batch
        statistics of `batch_prompts` (RewardActor.score); returns at once."""
        actor = self.actors[self.next]
        ref = actor.score.remote(images, prompts, batch_prompts)
        self.next = (self.next + 1) % len(self.actors)
        self.sent[ref] = (images, prompts, batch_prompts, actor)
        return ref

    def forget(self, ref: ray.ObjectRef) -> None:
        """A score that will not be asked for (its samples were drawn again)."""
        self.sent.pop(ref, None)

    def get(self, ref: ray.ObjectRef) -> Scored:
        deadline, deaths = time.monotonic() + self.timeout_s, 0
        while True:
            images, prompts, batch_prompts, actor = self.sent.pop(ref)
            try:
                return ray.get(ref, timeout=max(deadline - time.monotonic(), 0.001))
            except ray.exceptions.GetTimeoutError:
                ray.kill(actor, no_restart=False)  # stuck in the call: restarted (reward.max_restarts), fresh for a retry
                raise RuntimeError(f"reward.timeout_s: no reward actor returned the scores of a batch within "
                                   f"{self.timeout_s:g} s (rank {self.rank}); the reward call blocks, or raise "
                                   "reward.timeout_s for a slow reward") from None
            except ray.exceptions.RayActorError as e:
                deaths += 1
                if deaths >= self.max_deaths:
                    raise RuntimeError(f"reward actors died {deaths} times scoring one batch (reward.max_restarts: "
                                       f"each actor is restarted that often): {actor_cause(e)}") from None
                log.warning("rank %d: reward actor failed (%s); sending the batch to the next one", self.rank,
                            actor_cause(e))
                backoff(deaths, deadline)
                ref = self.submit(images, prompts, batch_prompts)
