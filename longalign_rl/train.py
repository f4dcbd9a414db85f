"""`python -m longalign_rl.train [--config FILE] [--resume RUN_DIR] [key.path=value ...]`

With no arguments: the tiny default (configs/tiny.yaml), local Ray, CPU, a few minutes.
On a cluster: `ray job submit -- python -m longalign_rl.train --config configs/sd15_longalign.yaml`
(Ray sets RAY_ADDRESS for the job, and this joins that cluster instead of starting one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from longalign_rl.config import Config, ConfigError, load_config, to_yaml
from longalign_rl.prompts import load_prompts

log = logging.getLogger("longalign_rl")
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m longalign_rl.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file of overrides (default: {DEFAULT_CONFIG.name}, the tiny CPU run)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its last checkpoint, with its saved config (overrides still apply)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. train.steps=10")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config of this run and its directory (nothing is written yet)."""
    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there, not a run directory")
        # The run's location is where it is now, whatever the saved config says.
        cfg = load_config(run_dir / "config.yaml", args.overrides + [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = (Path(cfg.run.output_dir) / name).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run.name: {run_dir} already holds a run; pass --resume {run_dir} to continue it")
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides + [f"run.name={name}"])
    return cfg, run_dir


def check_reward(cfg: Config) -> None:
    """Fail on the driver, before any worker starts, for a reward that cannot be used."""
    from longalign_rl.registry import find_reward

    factory = find_reward(cfg.reward.name)  # unknown name / bad import path -> clear error here
    if getattr(factory, "differentiable", True) is False:
        raise ConfigError(f"reward.name: reward {cfg.reward.name!r} is not differentiable; "
                          "reward backpropagation needs gradients from the reward to the image")


def describe(cfg: Config, run_dir: Path) -> str:
    s, t = cfg.sampler, cfg.train
    return (
        f"run directory      {run_dir}\n"
        f"model              {cfg.model.pretrained}   reward {cfg.reward.name} {cfg.reward.kwargs}\n"
        f"samplers           {s.num_actors} actors, {s.num_steps} DDIM steps ({s.num_grad_steps} with gradient), "
        f"guidance {s.guidance_scale}, {s.resolution} px\n"
        f"trainers           {t.num_workers} workers x {t.batch_size} prompts x {t.grad_accum} accumulation "
        f"= {cfg.global_batch} samples per step, ZeRO-{t.zero_stage}, {t.precision}\n"
        f"steps              {t.steps} -> {t.steps * cfg.global_batch} samples; weights to samplers every "
        f"{t.sync_every} step(s), policy lag <= {t.max_policy_lag}"
    )


def run(cfg: Config, run_dir: Path):
    """Start (or join) Ray, the sampler actors and the trainer workers; block until done."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from longalign_rl.config import to_dict
    from longalign_rl.sampling.actor import start_sampler_actors
    from longalign_rl.training.loop import train_func

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING)
    log.info("Ray: %s", f"joined the cluster at {address}" if address else "started a local instance")

    actors = start_sampler_actors(cfg)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": to_dict(cfg), "actors": actors, "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
        ),
    )
    try:
        return trainer.fit()
    finally:
        for actor in actors:
            ray.kill(actor)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg, run_dir = resolve(args)
        check_reward(cfg)
        load_prompts(cfg.prompts.source)  # a bad prompt file fails here, with its line numbers
    except (ConfigError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(describe(cfg, run_dir), flush=True)
    start = time.perf_counter()
    result = run(cfg, run_dir)
    print(f"done in {time.perf_counter() - start:.1f} s; last checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
