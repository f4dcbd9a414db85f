"""The sampler actors of a run, as one object: create, publish weights with a version,
hand out rollouts (or policy-gradient trajectories) with failover and resync, shut down. The Ray shell around `Sampler`.

    driver          group = SamplerGroup(cfg, run_dir) start cfg.sampler.num_actors actors (their
                                                       warnings go to run_dir/warnings.log)
                    ... TorchTrainer(train_loop_config={"samplers": group, ...}).fit()
                    group.shutdown()
    rank 0          group.publish(weights, version)    every actor loads the trainer's weights
    every worker    client = group.client(rank)        this worker's view of the actors
                    client.request(micro, prompts, seed); client.get(micro, version, weights_fn)

Each actor builds its own frozen copy of the model parts, adds the same trainable
structure as the trainer (LoRA or full UNet), and loads the trainer's weights when rank 0
publishes them. Actors restart when they die (max_restarts); a restarted actor is back at
version 0, which the worker that gets its next rollout sees and repairs (resync).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch

from longalign_rl.actor_pool import ActorPool, backoff
from longalign_rl.config import Config, from_dict, to_dict
from longalign_rl.console import WARNINGS_LOG, actor_cause, log_warnings_to
from longalign_rl.encoding.encode import CUT_PROMPTS_LOGGER
from longalign_rl.lora import load_trainable_state_dict, make_trainable
from longalign_rl.models import DTYPES, load_model
from longalign_rl.registry import algorithm_of
from longalign_rl.sampling.sampler import build_sampler, generate_latents
from longalign_rl.types import Rollout, Trajectory
from longalign_rl.vae import decode, placed

if TYPE_CHECKING:
    from longalign_rl.reward_actors import RewardClient, Scored

log = logging.getLogger(__name__)

@ray.remote
class SamplerActor:
    def __init__(self, config: dict, run_dir: str | None = None, index: int = 0):
        self.cfg = from_dict(config)
        if run_dir:  # prompts cut at max_tokens: said once by the driver, which measured them all
            log_warnings_to(Path(run_dir) / WARNINGS_LOG, f"sampler actor {index}", skip=(CUT_PROMPTS_LOGGER,))
        torch.set_num_threads(max(1, int(self.cfg.sampler.num_cpus)))
        device = torch.device("cuda" if self.cfg.sampler.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        parts = load_model(self.cfg)
        make_trainable(parts.unet, self.cfg.lora, family=parts.family)
        self.sampler = build_sampler(self.cfg.sampler, parts, prompts=self.cfg.prompts, device=device)
        self.sampler.unet.eval().requires_grad_(False)
        # With reward actors the images leave from here (sample_images), decoded in the sampler's precision.
        self.vae = (placed(parts.vae, device, DTYPES[self.cfg.sampler.precision], parts.family.vae_fp16_overflows)
                    if self.cfg.reward.num_actors else None)
        self.version = 0  # optimiser steps behind the weights held now
        self.algorithm = algorithm_of(self.cfg)

    def sample(self, prompts: list[str], seed: int, seeds: list[int] | None = None) -> Rollout | Trajectory:
        """What the run's algorithm asks for (registry.Algorithm.sample): a Rollout of
        deterministic DDIM, or a Trajectory of stochastic DDIM with log-probabilities.
        `seed`: the step's; `seeds`: each sample's own."""
        return self.algorithm.sample(self.sampler, prompts, seed, self.cfg, self.version, seeds=seeds)

    @ray.method(num_returns=2)
    def sample_images(self, prompts: list[str], seed: int, seeds: list[int] | None = None
                      ) -> tuple[Trajectory, torch.Tensor]:
        """`sample`, and its final latents decoded: two objects, so that the images' ref can
        go to a reward actor (reward_actors.py) before the worker fetches either."""
        trajectory = self.sample(prompts, seed, seeds)
        start = time.perf_counter()
        with torch.no_grad():
            images = decode(self.vae, trajectory.final_latents.to(self.sampler.device)).cpu()
        return dataclasses.replace(trajectory, seconds=trajectory.seconds + time.perf_counter() - start), images

    def generate(self, prompts: list[str], seeds: list[int], batch_size: int) -> tuple[torch.Tensor, int]:
        """Validation: deterministic DDIM of each prompt from its own seed, `batch_size` at a
        time; the final latents and the weights' version that drew them."""
        latents = [generate_latents(self.sampler, prompts[i:i + batch_size], seeds[i:i + batch_size])
                   for i in range(0, len(prompts), batch_size)]
        return torch.cat(latents), self.version

    def set_weights(self, state: dict, version: int) -> float:
        """Load the trainer's trainable weights (an object-store ref, resolved by Ray).

        Returns the seconds spent loading, so the trainer can log the cost of a sync.
        """
        start = time.perf_counter()
        unet = self.sampler.unet
        dtype = next(unet.parameters()).dtype
        load_trainable_state_dict(unet, {k: v.to(dtype) for k, v in state.items()}, self.cfg.lora)
        # Always taken, even when older: a trainer restarted from a checkpoint goes back.
        self.version = version
        return time.perf_counter() - start

    def get_version(self) -> int:
        return self.version


class SamplerGroup(ActorPool):
    """cfg.sampler.num_actors sampler actors with the resources the config asks for (an
    actor_pool.ActorPool: made on the driver, pickled into every trainer worker). Ray
    restarts a dead one for ever; a worker waits for its rollout sampler.timeout_s at most."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None):
        self.cfg = cfg
        s = cfg.sampler
        super().__init__(SamplerActor, s.num_actors, (to_dict(cfg), str(run_dir) if run_dir else None),
                         num_cpus=s.num_cpus, num_gpus=s.num_gpus, resources=s.resources, max_restarts=-1)

    def check(self) -> None:
        """Wait until every actor is built (the model, the LoRA, the T5 branch: where they
        will run), or ConfigError with the actor's own exception: a model or T5 folder that
        passed the driver's file checks but does not load, an adapter of the wrong width,
        a package missing on a node."""
        self.wait_built(lambda actor: actor.get_version.remote(), "sampler: a sampler actor could not be built")

    def publish(self, weights: dict, version: int) -> float:
        """Send the trainer's weights to every actor (rank 0); returns the slowest actor's
        load time. An actor that fails here is restarting or gone: its next rollout lags,
        and the worker that gets it resyncs it (RolloutClient.get)."""
        ref = ray.put(weights)
        seconds = [0.0]
        for call in [actor.set_weights.remote(ref, version) for actor in self.actors]:
            try:
                seconds.append(ray.get(call))
            except ray.exceptions.RayActorError as e:
                log.warning("weight sync to a sampler actor failed (%s)", type(e).__name__)
        return max(seconds)

    def generate(self, prompts: list[str], seeds: list[int], version: int, weights_fn) -> torch.Tensor:
        """Validation latents drawn by the weights of `version` (rank 0, after a sync). The
        first actor that answers draws them; one that restarted (back at version 0) gets
        `weights_fn()` first."""
        errors = []
        for actor in self.actors:
            try:
                latents, drawn = ray.get(actor.generate.remote(prompts, seeds, self.cfg.train.batch_size))
                if drawn != version:
                    ray.get(actor.set_weights.remote(ray.put(weights_fn()), version))
                    latents, _ = ray.get(actor.generate.remote(prompts, seeds, self.cfg.train.batch_size))
                return latents
            except ray.exceptions.RayActorError as e:
                errors.append(actor_cause(e))
                log.warning("validation: a sampler actor failed (%s); asking the next one", errors[-1])
        raise RuntimeError(f"validation: no sampler actor answered ({'; '.join(errors)})")

    def client(self, rank: int, rewards: "RewardClient | None" = None) -> "RolloutClient":
        return RolloutClient(self.actors, self.cfg.train.max_policy_lag, rank, rewards, self.cfg.sampler.timeout_s)


class RolloutClient:
    """One worker's view of the sampler actors: requests by micro-step, lag check, failover.

    Worker `rank` draws from actor rank % num_actors. When a call to it fails (the actor
    died; Ray restarts it where resources allow), the worker moves on to the next actor and
    asks it the same, so the run goes on with fewer samplers. What to ask (prompts, seed)
    is the caller's: a pure function of the micro-step, so a resumed run asks the same.

    With `rewards` (reward actors), every request also sends the sampler's images to the
    reward pool as soon as they exist; `scores(micro)` returns them scored.
    """

    def __init__(self, actors: list, max_policy_lag: int, rank: int, rewards: "RewardClient | None" = None,
                 timeout_s: float = 600.0):
        self.actors, self.max_policy_lag, self.rank, self.rewards = actors, max_policy_lag, rank, rewards
        self.timeout_s = timeout_s
        self.choice = rank % len(actors)
        self.asked: dict[int, tuple] = {}  # micro -> (prompts, seed, seeds, batch_prompts)
        self.pending: dict[int, ray.ObjectRef] = {}
        self.scoring: dict[int, tuple[ray.ObjectRef, ray.ObjectRef]] = {}  # micro -> (images, their score)

    @property
    def actor(self):
        return self.actors[self.choice]

    def request(self, micro: int, prompts: list[str], seed: int, seeds: list[int] | None = None,
                batch_prompts: list[str] | None = None) -> None:
        """Ask for micro-step `micro`'s rollout now (a no-op if it is already asked for):
        `seed` the step's, `seeds` each sample's (SamplerActor.sample); with reward actors,
        `batch_prompts` the step's global batch, for the reward's batch statistics."""
        if micro not in self.pending:
            self.asked[micro] = (prompts, seed, seeds, batch_prompts)
            if self.rewards is None:
                self.pending[micro] = self.actor.sample.remote(prompts, seed, seeds)
            else:
                if micro in self.scoring:  # resampled: the earlier images' score is not wanted
                    self.rewards.forget(self.scoring.pop(micro)[1])
                self.pending[micro], images = self.actor.sample_images.remote(prompts, seed, seeds)
                self.scoring[micro] = (images, self.rewards.submit(images, prompts, batch_prompts))

    def scores(self, micro: int) -> tuple["Scored", ray.ObjectRef]:
        """The reward actors' score of `micro`'s samples (after `get(micro)`), and the ref of
        the images they scored (for the metric hooks and image grids)."""
        images, ref = self.scoring.pop(micro)
        return self.rewards.get(ref), images

    def get(self, micro: int, version: int, weights_fn) -> Rollout:
        """The rollout of `micro` (requested before), resampled with the trainer's weights
        (`weights_fn()`, at `version`) if it lags more than max_policy_lag steps."""
        deadline, failures, resyncs = time.monotonic() + self.timeout_s, 0, 0
        while True:
            self.request(micro, *self.asked[micro])
            try:
                rollout = ray.get(self.pending.pop(micro))
            except ray.exceptions.RayActorError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {self.rank}: no sampler actor returned a rollout within "
                                       f"sampler.timeout_s={self.timeout_s:g} s; the last failure: {actor_cause(e)}") from e
                self.choice = (self.choice + 1) % len(self.actors)
                failures += 1
                log.warning("rank %d: sampler actor failed (%s); using actor %d", self.rank, actor_cause(e), self.choice)
                backoff(failures)
                continue
            lag = version - rollout.policy_version
            if lag <= self.max_policy_lag:
                del self.asked[micro]
                return rollout
            if resyncs == 2:
                raise RuntimeError(f"rank {self.rank}: rollouts still lag {lag} steps after resyncing the actor")
            # A restarted actor is back at version 0: give it our (identical) weights.
            log.warning("rank %d: rollout lags %d steps (bound %d); resyncing its actor",
                        self.rank, lag, self.max_policy_lag)
            ray.get(self.actor.set_weights.remote(ray.put(weights_fn()), version))
            resyncs += 1
