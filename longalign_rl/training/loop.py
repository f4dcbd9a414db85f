"""The per-worker training function that Ray Train's TorchTrainer runs on every worker.

`TorchTrainer.fit()` blocks for the whole run, so the RL loop lives here. One step reads:

    SAMPLE   get this worker's rollouts from its sampler actor (requested one step ahead
             when the lag bound allows it, so sampling overlaps training)
    UPDATE   replay the gradient steps, decode, score with the reward, DeepSpeed step
    SYNC     every sync_every steps rank 0 publishes its trainable weights to the actors
    LOG      rank 0 appends the all-worker means to metrics.jsonl; image grids
    CKPT     every checkpoint_every steps every worker reports to Ray Train

Each piece of maths is a call into a pure module (algorithms/, sampling/, rewards/).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from longalign_rl.algorithms.reward_backprop import decode, reward_backprop_step
from longalign_rl.config import Config, from_dict
from longalign_rl.lora import export_for_diffusers, trainable_state_dict
from longalign_rl.models import DTYPES, load_components
from longalign_rl.prompts import PromptOrder, load_prompts
from longalign_rl.registry import get_reward
from longalign_rl.training import checkpoint
from longalign_rl.training.outputs import MetricsLog, save_image_grid
from longalign_rl.training.worker import (
    all_means, grad_norm, make_engine, prepare_unet, require_run_dir, weights_spread,
)
from longalign_rl.types import Rollout

log = logging.getLogger(__name__)


# How long a worker keeps asking sampler actors before the run fails (a restarted actor
# rebuilds its model: seconds for the tiny model, minutes for SD v1.5 on a new node).
ACTOR_WAIT_S = 600


class RolloutClient:
    """This worker's view of the sampler actors: requests by micro-step, lag check, failover.

    Worker `rank` draws from actor rank % num_actors. When a call to it fails (the actor
    died; Ray restarts it where resources allow), the worker moves on to the next actor, so
    the run goes on with fewer samplers. A micro-step's prompts and noise seed are pure
    functions of (micro-step, rank) and of where the run (re)started, so a resumed run asks
    for exactly what the killed run would have asked for, even with another worker count.
    """

    def __init__(self, actors: list, order: PromptOrder, cfg: Config, rank: int, world: int,
                 start_micro: int = 0, start_position: int = 0):
        self.actors, self.choice = actors, rank % len(actors)
        self.order, self.cfg, self.rank, self.world = order, cfg, rank, world
        self.start_micro, self.start_position = start_micro, start_position
        self.pending: dict[int, ray.ObjectRef] = {}

    @property
    def actor(self):
        return self.actors[self.choice]

    def prompt_position(self, micro: int) -> int:
        """Prompts handed out to all workers before micro-step `micro`."""
        return self.start_position + (micro - self.start_micro) * self.world * self.cfg.train.batch_size

    def request(self, micro: int) -> None:
        if micro not in self.pending:
            b = self.cfg.train.batch_size
            prompts = self.order.batch(self.prompt_position(micro) + self.rank * b, b)
            seed = (self.cfg.train.seed * 1_000_003 + micro) * 1_009 + self.rank
            self.pending[micro] = self.actor.sample.remote(prompts, seed)

    def get(self, micro: int, version: int, weights_fn) -> Rollout:
        """The rollout of `micro`, resampled with fresh weights if it lags too far."""
        deadline, failures, resyncs = time.monotonic() + ACTOR_WAIT_S, 0, 0
        while True:
            self.request(micro)
            try:
                rollout = ray.get(self.pending.pop(micro))
            except ray.exceptions.RayActorError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {self.rank}: no sampler actor answered for {ACTOR_WAIT_S} s") from e
                self.choice = (self.choice + 1) % len(self.actors)
                failures += 1
                log.warning("rank %d: sampler actor failed (%s); using actor %d", self.rank,
                            type(e).__name__, self.choice)
                time.sleep(min(2.0 ** failures, 10.0))  # a restart rebuilds the model
                continue
            lag = version - rollout.policy_version
            if lag <= self.cfg.train.max_policy_lag:
                return rollout
            if resyncs == 2:
                raise RuntimeError(f"rank {self.rank}: rollouts still lag {lag} steps after resyncing the actor")
            # A restarted actor is back at version 0: give it our (identical) weights.
            log.warning("rank %d: rollout lags %d steps (bound %d); resyncing its actor",
                        self.rank, lag, self.cfg.train.max_policy_lag)
            ray.get(self.actor.set_weights.remote(ray.put(weights_fn()), version))
            resyncs += 1


def build_engine(cfg: Config, device: torch.device):
    """UNet with its trainable part in a DeepSpeed engine, the frozen VAE and the reward."""
    torch.manual_seed(cfg.train.seed)  # same LoRA init on every worker
    parts = load_components(cfg.model.pretrained, seed=cfg.model.random_seed, revision=cfg.model.revision)
    del parts.text_encoder  # prompts arrive encoded in the rollouts
    params = prepare_unet(cfg, parts.unet, device)
    vae = parts.vae.to(device, DTYPES[cfg.train.precision])
    reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    if not reward.differentiable:
        raise ValueError(f"reward {cfg.reward.name!r} is not differentiable; reward backpropagation "
                         "needs gradients from the reward to the image")
    reward = reward.to(device) if hasattr(reward, "to") else reward
    engine, schedule = make_engine(cfg, parts.unet, params)
    return engine, vae, reward, schedule


def update(engine, vae, reward, rollout: Rollout, guidance_scale: float) -> dict[str, torch.Tensor]:
    """One micro-step of reward backpropagation through the DeepSpeed engine."""
    loss, stats = reward_backprop_step(engine, vae, reward, rollout, guidance_scale)
    engine.backward(loss)
    engine.step()
    stats["loss"] = loss.detach().reshape(1).float()
    return stats


def ground_truth(vae, rollout: Rollout, device) -> dict[str, torch.Tensor]:
    """The exact checker's verdicts on the rollout's images (run.ground_truth=shapesworld)."""
    from longalign_rl.shapesworld.evaluate import ground_truth as shapesworld_truth
    from longalign_rl.shapesworld.world import WorldConfig

    with torch.no_grad():
        images = decode(vae, rollout.final_latents.to(device))
    return shapesworld_truth(images, rollout.prompts, WorldConfig())


def train_func(loop_config: dict) -> None:
    cfg: Config = from_dict(loop_config["config"])
    actors, run_dir = loop_config["actors"], Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    require_run_dir(run_dir, rank)

    # ------------------------------------------------------------------ models
    engine, vae, reward, schedule = build_engine(cfg, device)

    def weights() -> dict:
        return trainable_state_dict(engine.module, cfg.lora)

    # ------------------------------------------------------------------ resume
    state = checkpoint.TrainerState()
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = checkpoint.load(Path(d), engine, rank)
        log.info("rank %d: resumed at step %d", rank, state.step)
    metrics_log = MetricsLog(run_dir)
    if rank == 0:
        metrics_log.truncate_after(state.step)

    order = PromptOrder(load_prompts(cfg.prompts.source), seed=cfg.train.seed, shuffle=cfg.prompts.shuffle)
    accum = cfg.train.grad_accum
    client = RolloutClient(actors, order, cfg, rank, world,
                           start_micro=state.step * accum, start_position=state.prompt_position)
    prefetch = cfg.train.max_policy_lag >= cfg.train.sync_every  # overlap sampling with training

    def publish(version: int) -> float:
        """Rank 0 sends its weights to every actor; returns the slowest actor's load time.

        An actor that fails here is restarting or gone: its next rollout lags, and the
        worker that gets it resyncs it (RolloutClient.get)."""
        ref = ray.put(weights())
        seconds = [0.0]
        for actor, call in [(a, a.set_weights.remote(ref, version)) for a in actors]:
            try:
                seconds.append(ray.get(call))
            except ray.exceptions.RayActorError as e:
                log.warning("weight sync to a sampler actor failed (%s)", type(e).__name__)
        return max(seconds)

    # The actors start from the base weights: bring them to this run's version first.
    if rank == 0:
        publish(state.step)
    dist.barrier()

    for step in range(state.step, cfg.train.steps):
        t0 = time.perf_counter()
        stats: dict[str, list[torch.Tensor]] = {}
        sample_wait = train_time = actor_seconds = 0.0
        lags = []
        for j in range(accum):
            # SAMPLE
            micro = step * accum + j
            t = time.perf_counter()
            rollout = client.get(micro, step, weights)
            if prefetch and step + 1 < cfg.train.steps:
                client.request(micro + accum)
            sample_wait += time.perf_counter() - t
            actor_seconds += rollout.seconds
            lags.append(step - rollout.policy_version)

            # UPDATE
            t = time.perf_counter()
            step_stats = update(engine, vae, reward, rollout, cfg.sampler.guidance_scale)
            train_time += time.perf_counter() - t
            if cfg.run.ground_truth:
                step_stats.update(ground_truth(vae, rollout, device))
            for k, v in step_stats.items():
                stats.setdefault(k, []).append(v)

            if rank == 0 and (step == 0 or (step + 1) % cfg.run.image_every == 0) and j == 0:
                with torch.no_grad():
                    images = decode(vae, rollout.final_latents.to(device))
                save_image_grid(images, rollout.prompts, run_dir / "images" / f"step_{step + 1:06d}.png")

        # SYNC
        t = time.perf_counter()
        sync_load = 0.0
        if (step + 1) % cfg.train.sync_every == 0:
            if rank == 0:
                sync_load = publish(step + 1)
            dist.barrier()  # no worker requests new rollouts before the actors hold step + 1
        sync_wait = time.perf_counter() - t

        # LOG
        replay_error = float(torch.cat(stats.pop("replay_error")).max())
        means = all_means(stats, device)
        spread = weights_spread(engine.module)
        elapsed = time.perf_counter() - t0
        record = {
            "step": step + 1,
            **means,
            "replay_error": replay_error,  # this worker's max |replayed - recorded x0|
            "grad_norm": grad_norm(engine),
            "lr": schedule.get_last_lr()[0],
            "policy_lag": max(lags),
            "weights_spread": spread,  # must stay 0: every worker holds the same weights
            "samples_per_s": cfg.global_batch / elapsed,
            "time/step": elapsed,
            "time/sample_wait": sample_wait,     # trainer blocked on rollouts
            "time/sample_actor": actor_seconds,  # actor time spent sampling them
            "time/train": train_time,
            "time/sync": sync_wait,              # put + slowest actor load + barrier
            "time/sync_load": sync_load,
        }
        if rank == 0:
            metrics_log.write(record)
            log.info("step %d: reward %.4f loss %.4f (%.2fs)", step + 1, record["reward"], record["loss"], elapsed)

        # CKPT
        last = step + 1 == cfg.train.steps
        if (step + 1) % cfg.run.checkpoint_every == 0 or last:
            state = checkpoint.TrainerState(step=step + 1, prompt_position=client.prompt_position((step + 1) * accum))
            with tempfile.TemporaryDirectory() as d:
                checkpoint.save(Path(d), engine, weights() if rank == 0 else {}, state, rank)
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))

    if rank == 0:
        export_for_diffusers(engine.module, cfg.lora, run_dir / ("lora" if cfg.lora.enabled else "unet"))
