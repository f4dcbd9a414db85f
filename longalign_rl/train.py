"""`python -m longalign_rl.train [--config FILE] [--resume RUN_DIR] [key.path=value ...]`

With no arguments: the CPU demo (configs/default.yaml), local Ray, a few minutes.
On a cluster: `ray job submit -- python -m longalign_rl.train --config configs/sd15_longalign.yaml`
(Ray sets RAY_ADDRESS for the job, and this joins that cluster instead of starting one).
`stage: 1` in the config (configs/sd15_stage1.yaml, configs/tiny_stage1.yaml) runs the
supervised long-text fine-tuning on `data` instead of the reward fine-tuning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from longalign_rl import launch, preflight, resume
from longalign_rl.config import Config, ConfigError, load_config, to_dict, to_yaml
from longalign_rl.console import outputs, quiet_libraries
from longalign_rl.outputs import CONFIG, STOPPED, write_atomic
from longalign_rl.summary import read_summary

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m longalign_rl.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML file of overrides (default: {DEFAULT_CONFIG.name}, the demo on CPU)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its last checkpoint, with its saved config (overrides still apply)")
    parser.add_argument("--print-config", action="store_true",
                        help="print every config key (type, default, this config's value, meaning) and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. train.steps=10")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config of this run and its directory (nothing is written yet)."""
    if args.resume:
        if args.config:
            raise ConfigError(f"--config {args.config} with --resume: a resume continues with the run's own "
                              "config.yaml; give what changes as key=value")
        run_dir = Path(args.resume).resolve()
        saved = resume.read_run_config(run_dir)
        # The run's location is where it is now, whatever the saved config says.
        cfg = load_config(run_dir / CONFIG, args.overrides + [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])
        resume.check_resume(saved, cfg, run_dir)
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = (Path(cfg.run.output_dir) / name).resolve()
        resume.check_new_run_dir(run_dir)
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides + [f"run.name={name}"])
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        from longalign_rl.config_docs import describe_keys

        try:
            if args.resume:  # the run's own values, with what a resume would change
                if args.config:
                    raise ConfigError(f"--config {args.config} with --resume: a run's config is its config.yaml")
                resume.read_run_config(Path(args.resume).resolve())
                cfg = load_config(Path(args.resume) / CONFIG, args.overrides)
            else:
                cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
            print(describe_keys(cfg), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    lock = rewards = samplers = None
    try:
        cfg, run_dir = resolve(args)
        if args.resume:  # the run exists: refused at once while another driver runs in it
            lock = resume.RunLock(run_dir)
        setup_logging(cfg.run.verbose)
        pairs = preflight.check_inputs(cfg)  # a bad prompt file or data source fails here, naming its lines
        preflight.check_trackers(cfg)
        resume.check_output_dir(run_dir)
        ray_line = launch.connect(cfg)
        launch.check_shared_storage(run_dir)  # every node of a cluster writes into it
        rewards = launch.start_reward_actors(cfg, run_dir)  # a reward that lives in actors is probed there
        samplers = launch.start_sampler_actors(cfg, run_dir)  # built where they run: the model, LoRA, T5 branch
    except (ConfigError, ValueError, TypeError, RuntimeError) as e:
        if lock is not None:
            lock.release()
        launch.shutdown(rewards, samplers)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # every check passed: a new run's directory is made and this driver becomes its owner
        created = not run_dir.exists()
        if lock is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = resume.RunLock(run_dir)
    except (ConfigError, OSError) as e:
        launch.shutdown(rewards, samplers)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return started(args, cfg, run_dir, pairs, (rewards, samplers), ray_line, created)
    finally:
        lock.release()


def started(args: argparse.Namespace, cfg: Config, run_dir: Path, pairs, actors: tuple, ray_line: str,
            created: bool) -> int:
    """main, once this driver holds the run directory's lock: a new run writes its
    config.yaml and opens its trackers, or leaves nothing behind; then the run. `actors`:
    the reward and sampler actor pools (or None) main started and probed."""
    from longalign_rl.trackers import TrackerError, open_trackers

    rewards, samplers = actors
    try:
        if args.resume:  # the junk of a killed run can go (its config.yaml is rewritten by worker.py)
            resume.check_checkpoint_index(run_dir)
            resume.remove_unregistered_checkpoints(run_dir)
            changes = resume.keep_original_config(run_dir, cfg)
            if changes:
                print(f"resuming with changes ({run_dir / 'config.original.yaml'} keeps the first config): "
                      + "; ".join(changes), flush=True)
        else:
            resume.check_new_run_dir(run_dir)  # again, under the lock: another run may have started and ended meanwhile
            write_atomic(run_dir / CONFIG, to_yaml(cfg))
        trackers = open_trackers(cfg.run.report_to, run_dir, to_dict(cfg))
    except (ConfigError, TrackerError, OSError) as e:
        if not args.resume:  # a start that failed leaves no directory to block the name
            resume.clear_failed_start(run_dir, created)
        launch.shutdown(rewards, samplers)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(preflight.describe(cfg, run_dir, pairs) + f"\nray                {ray_line}", flush=True)
    if trackers:
        print(f"trackers           {', '.join(cfg.run.report_to)}"
              + (f" (tensorboard --logdir {run_dir / 'tensorboard'})" if "tensorboard" in cfg.run.report_to else ""),
              flush=True)
    start = time.perf_counter()
    try:
        with launch.stop_on_signal(run_dir), closing_all(trackers):
            result = launch.run(cfg, run_dir, pairs, rewards, trackers, samplers)
    except KeyboardInterrupt:
        print(f"stopped at once; continue from the last checkpoint with: python -m longalign_rl.train --resume {run_dir}",
              file=sys.stderr)
        return 130
    except Exception as e:  # the cause, whatever Ray cut of its text, and where its whole traceback is
        from longalign_rl.training import failures

        print(f"{run_dir} keeps every checkpoint written before; after fixing the cause continue with --resume "
              f"{run_dir}\nerror: {failures.describe(e, cfg.run.max_failures, run_dir)}", file=sys.stderr)
        return 1
    stopped = run_dir / STOPPED
    if stopped.is_file():
        info = json.loads(stopped.read_text())
        if info["cause"] == "interrupt":
            print(f"{info['message']}; continue with: python -m longalign_rl.train --resume {run_dir}")
            return 130
        print(f"error: run stopped: {info['message']} ({run_dir})", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    print("\n".join(outputs(run_dir, cfg, result.checkpoint.path if result.checkpoint else None)))
    summary = read_summary(run_dir)
    if summary:
        print(summary)
    return 0


@contextlib.contextmanager
def closing_all(trackers: list):
    try:
        yield
    finally:
        for tracker in trackers:
            with contextlib.suppress(Exception):
                tracker.close()


def setup_logging(verbose: bool) -> None:
    """The driver's logging: its own warnings, plainly; everything with timestamps when verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    quiet_libraries(verbose)


if __name__ == "__main__":
    sys.exit(main())
