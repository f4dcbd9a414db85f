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
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from longalign_rl.config import Config, ConfigError, load_config, to_dict, to_yaml
from longalign_rl.console import Progress, outputs, quiet_libraries
from longalign_rl.data import Pair, check_source
from longalign_rl.hooks import load_metric_hooks, probe_metric_hooks
from longalign_rl.outputs import CONFIG, METRICS, STOPPED, STOP_REQUEST, write_atomic
from longalign_rl.prompts import load_prompts
from longalign_rl.registry import algorithm_of
from longalign_rl.summary import read_summary
from longalign_rl.validation import validation_set

log = logging.getLogger("longalign_rl")
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
        saved = read_run_config(run_dir)
        # The run's location is where it is now, whatever the saved config says.
        cfg = load_config(run_dir / CONFIG, args.overrides + [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"])
        check_resume(saved, cfg, run_dir)
    else:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = (Path(cfg.run.output_dir) / name).resolve()
        check_new_run_dir(run_dir)
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides + [f"run.name={name}"])
    return cfg, run_dir


def read_run_config(run_dir: Path) -> dict:
    """The saved config.yaml of the run to resume, or ConfigError naming what is wrong; its
    metrics.jsonl and validation.jsonl are read too (a damaged line is named here, before
    anything starts; a cut last line is left out by the worker)."""
    from longalign_rl.outputs import read_jsonl
    from longalign_rl.validation import FILE as VALIDATION_FILE

    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there, not a run directory")
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        saved, why = None, f"not valid YAML ({' '.join(str(e).split())[:200]})"
    else:
        why = "empty" if saved is None else "not a mapping of sections"
    if not isinstance(saved, dict):
        from longalign_rl.training.checkpoint import on_disk

        if not on_disk(run_dir):
            hint = "the run never checkpointed: start it again with the same run.name"
        elif (run_dir / "config.original.yaml").is_file():
            hint = f"{run_dir / 'config.original.yaml'} holds the config the run started with"
        else:
            hint = ("its checkpoints keep the weights but not the config: write the config the run started with "
                    "back to config.yaml to resume it")
        raise ConfigError(f"--resume: {path} is {why}; {hint}")
    for name in (METRICS, VALIDATION_FILE):
        try:
            read_jsonl(run_dir / name)
        except ValueError as e:
            raise ConfigError(f"--resume: {e}") from None
    return saved


def check_new_run_dir(run_dir: Path) -> None:
    """A new run's directory is new, or empty, or what a start that failed before its first
    step left (no config.yaml worth keeping, no metrics, no checkpoint)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    from longalign_rl.training.checkpoint import on_disk

    config = run_dir / CONFIG
    started = (config.is_file() and config.read_text().strip()) or on_disk(run_dir) or \
        ((run_dir / METRICS).is_file() and (run_dir / METRICS).read_text().strip())
    if started:
        raise ConfigError(f"run.name: {run_dir} already holds a run; pass --resume {run_dir} to continue it")


class RunLock:
    """run_dir/run.lock, held (an exclusive flock) by the driver while it runs in the run
    directory: a second run with the same run.name, or a second --resume, is refused while
    the first lives. The kernel releases it when its process ends, however it ends, so the
    resume of a killed run takes it over. The file names its holder."""

    FILE = "run.lock"

    def __init__(self, run_dir: Path):
        import fcntl
        import socket

        self.path = run_dir / self.FILE
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip()
            self.file.close()
            raise ConfigError(f"run.name: {run_dir} is in use by another run ({holder or 'a running driver'}); "
                              "wait for it to end, or choose another run.name") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the descriptor releases the flock


def check_checkpoint_index(run_dir: Path) -> None:
    """Ray Train's record of the run's checkpoints (checkpoint_manager_snapshot.json), read
    by Ray when the run restarts: damaged, or naming a checkpoint folder that is gone, it
    stops Ray's controller with a raw traceback. It is moved aside (kept, with a warning),
    and the workers resume from the newest checkpoint folder on disk that verifies
    (worker._resume)."""
    path = run_dir / "checkpoint_manager_snapshot.json"
    if not path.is_file():
        return
    try:
        snapshot = json.loads(path.read_text())
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
        latest = snapshot.get("latest_checkpoint_result")
        names += [latest["checkpoint_dir_name"]] if latest else []
        gone = sorted({n for n in names if not (run_dir / n).is_dir()})
        problem = f"it names {', '.join(gone)}, which is gone" if gone else None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"it is damaged ({type(e).__name__}: {e})"
    if problem:
        aside = path.with_name(f"{path.name}.damaged")
        path.replace(aside)
        log.warning("%s: %s; moved aside to %s, and the run resumes from the newest checkpoint folder that "
                    "verifies", path.name, problem, aside.name)


def check_reward(cfg: Config, prompts: list[str]) -> None:
    """Fail on the driver, before any worker starts, for a reward that cannot be used: it is
    built with reward.kwargs and called once on two random images with the run's first
    prompts (registry.probe_reward: shapes, finite values, a gradient when it claims one)."""
    from transformers.utils import logging as transformers_logging

    from longalign_rl.registry import (ALGORITHMS, check_reward_kwargs, find_algorithm, find_reward, get_reward,
                                       probe_reward)

    transformers_logging.disable_progress_bar()  # the driver's console says what matters only
    try:
        factory = find_reward(cfg.reward.name)
    except Exception as e:
        if cfg.reward.num_actors:
            return  # it may exist only in the reward actors' runtime_env: probed there (start_reward_actors)
        raise ConfigError(f"reward: {e}") from e
    try:  # a misspelt keyword, named before anything is built
        check_reward_kwargs(cfg.reward.name, cfg.reward.kwargs, factory)
    except TypeError as e:
        raise ConfigError(str(e)) from None
    if cfg.reward.num_actors:
        return  # built and probed in the reward actors (start_reward_actors), never here
    try:
        reward = get_reward(cfg.reward.name, **cfg.reward.kwargs)
    except Exception as e:  # a plugin's factory may raise anything: name the key and the plugin
        message = str(e) if str(e).startswith("reward ") else f"reward {cfg.reward.name!r}: {type(e).__name__}: {e}"
        raise ConfigError(f"reward: {message}") from e
    if not reward.differentiable and algorithm_of(cfg).differentiable_reward:
        others = [name for name in ALGORITHMS.names() if not find_algorithm(name).differentiable_reward]
        raise ConfigError(f"reward.name: reward {cfg.reward.name!r} is not differentiable; algorithm "
                          f"{cfg.algorithm.name} needs gradients from the reward to the image "
                          f"(algorithm.name: {' or '.join(others) or 'another algorithm'} optimises any reward)")
    try:
        probe_reward(reward, cfg.reward.name, prompts, cfg.sampler.resolution)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward: {e}") from e


def check_model(cfg: Config) -> None:
    """model.pretrained names something that exists; a local folder holds complete files."""
    from longalign_rl.hub import check_hub_model
    from longalign_rl.models import MODELS, check_model_folder
    from longalign_rl.registry import resolve_source

    source = resolve_source(cfg.model.pretrained, key="model.pretrained", names=MODELS,
                            path_kind="diffusers folder", hub_ids=True)
    if source.kind == "path":
        check_model_folder(Path(cfg.model.pretrained))
    elif source.kind == "hub":
        check_hub_model(cfg.model.pretrained, cfg.model.revision)
        log.info("model.pretrained %r is a hub id: every process downloads it or reads the hub cache",
                 cfg.model.pretrained)


def check_t5(cfg: Config) -> None:
    """The T5 branch's encoder and adapter exist and are complete (config.json valid JSON,
    weights complete and finite), and the adapter takes the encoder's width; a random
    adapter is said. The sampler actors build the branch before the run starts too
    (start_sampler_actors), for what only loading shows."""
    from longalign_rl.arguments import check_json_file, check_weights_file
    from longalign_rl.encoding.t5 import ADAPTER_FOLDER, CONFIG_DIR
    from longalign_rl.hub import check_hub_model

    t5 = cfg.t5
    if not t5.encoder:
        return
    width = None
    try:
        if t5.encoder == "tiny":
            width = json.loads((CONFIG_DIR / "tiny" / "t5_encoder.json").read_text())["d_model"]
        elif Path(t5.encoder).exists():
            folder = Path(t5.encoder)
            if not (folder / "config.json").is_file():
                raise ConfigError(f"t5.encoder: {t5.encoder!r} is a path without config.json: not a T5 encoder folder")
            width = check_json_file(folder / "config.json", "t5.encoder").get("d_model")
            weights = sorted(folder.glob("*.safetensors"))
            if not weights and not list(folder.glob("*.bin")):
                raise ConfigError(f"t5.encoder: {folder} has no weights (*.safetensors or *.bin)")
            for file in weights:
                check_weights_file(file, "t5.encoder")
        else:
            check_hub_model(t5.encoder, None, key="t5.encoder", filename="config.json")
        if t5.adapter:
            if not (Path(t5.adapter) / "config.json").is_file():
                raise ConfigError(f"t5.adapter: {t5.adapter!r} holds no config.json of a TextAdapter "
                                  "(a folder saved by TextAdapter.save_pretrained)")
            adapter = check_json_file(Path(t5.adapter) / "config.json", "t5.adapter")
            if width is not None and adapter.get("in_dim") != width:
                raise ConfigError(f"t5.adapter: {t5.adapter!r} takes {adapter.get('in_dim')}-wide inputs, but the T5 "
                                  f"encoder {t5.encoder!r} gives {width}")
            for file in sorted(Path(t5.adapter).glob("*.safetensors")):
                check_weights_file(file, "t5.adapter")
        elif not (Path(cfg.model.pretrained) / ADAPTER_FOLDER / "config.json").is_file():
            log.warning("t5: no adapter weights (t5.adapter is empty and model.pretrained has no %s/): the TextAdapter "
                        "starts random%s", ADAPTER_FOLDER,
                        "; stage 2 keeps it frozen, so train it in stage 1 first" if cfg.stage == 2 else "")
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # a file check's message names the file
        raise ConfigError(str(e)) from None


def check_inputs(cfg: Config) -> list[Pair] | None:
    """Fail on the driver, before a run directory or a worker exists, for inputs that cannot
    be used. Both stages: the model, its T5 branch, the validation prompts and the metric hooks. Stage 1:
    the data source (returns the pairs of a folder or manifest). Stage 2: the reward and
    the prompt source (bad lines are reported with their numbers)."""
    check_model(cfg)
    check_t5(cfg)
    validation = validation_set(cfg)  # the validation prompts: a bad run.validation fails here
    hooks = load_metric_hooks(cfg.run.metrics)
    if cfg.stage == 1:
        pairs = check_source(cfg.data)
        captions = [p.caption for p in pairs or []]
        prompts = validation.prompts if validation else captions
        if captions:
            warn_cut_prompts(cfg, "data.source", captions, "captions")
    else:
        pairs, prompts = None, load_prompts(cfg.prompts.source)
        check_reward(cfg, prompts)
        warn_cut_prompts(cfg, "prompts.source", prompts)
    if validation and (cfg.run.validation or cfg.stage == 1):  # stage 2's default: prompts.source's first ones
        warn_cut_prompts(cfg, "run.validation" if cfg.run.validation else "prompts.source", validation.prompts,
                         "validation prompts")
    if hooks and prompts:  # on prompts of the run: a world's checker parses them
        probe_metric_hooks(hooks, prompts, cfg.sampler.resolution)
    return pairs


def warn_cut_prompts(cfg: Config, key: str, prompts: list[str], what: str = "prompts", limit: int = 20_000) -> None:
    """One warning on the driver for the prompts of `key` that are longer than
    prompts.max_tokens encoded states, which are cut where they are encoded (as the reference
    cuts its own): instead of a line for every cut prompt from every sampler and worker,
    whose warnings.log leaves them out (console.CUT_PROMPTS_LOGGER). Measured with CLIP's
    tokenizer (SD v1.5's), on the first `limit` prompts."""
    from longalign_rl.encoding import build_clip_tokenizer
    from longalign_rl.encoding.encode import encoded_lengths

    p = cfg.prompts
    measured = prompts[:limit]
    lengths = encoded_lengths(measured, build_clip_tokenizer(), pack_segments=p.pack_segments, split=p.split,
                              clean_text=p.clean_text)
    cut = sum(n > p.max_tokens for n in lengths)
    if not cut:
        return
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    start = measured[longest] if len(measured[longest]) <= 50 else measured[longest][:47] + "..."
    log.warning("%s: %d of %s%d %s are longer than prompts.max_tokens=%d encoded states and are cut to it "
                "(the longest, number %d, has %d: %r); raise prompts.max_tokens to keep them whole",
                key, cut, "the first " if len(prompts) > limit else "", len(measured), what, p.max_tokens,
                longest + 1, lengths[longest], start)


def check_trackers(cfg: Config) -> None:
    from longalign_rl.trackers import missing_packages

    missing = missing_packages(cfg.run.report_to)
    if missing:
        raise ConfigError("; ".join(missing))


def describe(cfg: Config, run_dir: Path, pairs: list[Pair] | None = None) -> str:
    s, t = cfg.sampler, cfg.train
    trains = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "the whole UNet"
    algorithm = algorithm_of(cfg)
    if cfg.stage == 1:
        d = cfg.data
        if pairs is None:
            per_epoch = "pairs per epoch: as many as the generator gives"
        else:
            micro = len(pairs) // t.num_workers // t.batch_size  # per worker, full batches only
            per_epoch = f"{len(pairs)} pairs -> {micro // t.grad_accum} steps per epoch"
        return (
            f"run directory      {run_dir}\n"
            f"stage 1            supervised long-text fine-tuning (denoising loss) of {cfg.model.pretrained}, "
            f"{trains}\n"
            f"data               {d.source} {d.kwargs or ''}, {d.resolution} px, captions segment-encoded to "
            f"{cfg.prompts.max_tokens} tokens, dropout {d.caption_dropout}; {per_epoch}\n"
            f"trainers           {t.num_workers} workers x {t.batch_size} pairs x {t.grad_accum} accumulation "
            f"= {cfg.global_batch} pairs per step, ZeRO-{t.zero_stage}, {t.precision}, lr {t.lr} "
            f"({t.warmup_steps} warm-up steps)\n"
            f"end                after {d.epochs} epoch(s) or {t.steps} steps, whichever comes first"
        )
    return (
        f"run directory      {run_dir}\n"
        f"model              {cfg.model.pretrained}   reward {cfg.reward.name} {cfg.reward.kwargs}"
        + (f", scored by {cfg.reward.num_actors} reward actors ({cfg.reward.num_cpus:g} CPU, "
           f"{cfg.reward.num_gpus:g} GPU each)" if cfg.reward.num_actors else "") + "\n"
        f"algorithm          {algorithm.describe(cfg)}\n"
        f"samplers           {s.num_actors} actors, {s.num_steps} DDIM steps ({algorithm.describe_sampling(cfg)}), "
        f"guidance {s.guidance_scale}, {s.resolution} px\n"
        f"trainers           {t.num_workers} workers x {t.batch_size} prompts x {t.grad_accum} accumulation "
        f"= {cfg.global_batch} samples per step, ZeRO-{t.zero_stage}, {t.precision}\n"
        f"steps              {t.steps} -> {t.steps * cfg.global_batch} samples; weights to samplers every "
        f"{t.sync_every} step(s), policy lag <= {t.max_policy_lag}"
    )


# What a resume may not change: what the checkpoint's weights, optimiser state or random
# streams mean. Every other key may change and takes effect (docs/reliability.md): the
# workers run on the resumed config, and worker.py applies its optimiser settings over the
# checkpoint's.
FIXED_ON_RESUME = ("stage", "model.pretrained", "model.revision", "model.random_seed", "lora.enabled", "lora.rank",
                   "lora.alpha", "lora.target_modules", "train.seed", "train.zero_stage", "train.precision",
                   "t5.encoder", "t5.adapter", "t5.adapter_dim", "t5.max_tokens")


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_resume(saved: dict, cfg: Config, run_dir: Path | None = None) -> None:
    """A resume keeps what the checkpoint's state means (FIXED_ON_RESUME), and has steps left."""
    new = to_dict(cfg)
    defaults = to_dict(Config())  # a key the saved config lacks (an older version) had its default
    changed = [f"{k} ({_get(saved, k)!r} -> {_get(new, k)!r})" for k in FIXED_ON_RESUME
               if (_get(saved, k) if _has(saved, k) else _get(defaults, k)) != _get(new, k)]
    if changed:
        raise ConfigError(f"--resume: the checkpoint was trained with other values of {', '.join(changed)}; "
                          "start a new run to change them")
    if run_dir is not None:
        from longalign_rl.training.checkpoint import on_disk, step_of

        done = max((step_of(p) or 0 for p in on_disk(run_dir)), default=0)
        if cfg.train.steps <= done:
            raise ConfigError(f"train.steps: the run is at step {done} already (its newest checkpoint); a resume "
                              f"with train.steps={cfg.train.steps} has nothing to do: raise it above {done}")


def _has(data: dict, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data.get(part) if isinstance(data, dict) else None
    return isinstance(data, dict) and last in data


def config_changes(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two resolved configs."""
    out = []
    for key in sorted(set(saved) | set(new)):
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not key.endswith("kwargs"):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def keep_original_config(run_dir: Path, cfg: Config) -> list[str]:
    """Before a resume with other values rewrites config.yaml, the config the run started
    with is kept as config.original.yaml (once: later resumes keep the first). Returns the
    changes."""
    saved = yaml.safe_load((run_dir / CONFIG).read_text())
    changes = config_changes(saved, to_dict(cfg))
    original = run_dir / "config.original.yaml"
    if changes and not original.exists():
        write_atomic(original, (run_dir / CONFIG).read_text())
    return changes


def remove_unregistered_checkpoints(run_dir: Path) -> None:
    """Checkpoint folders a killed run began but Ray Train never registered are deleted (only
    when Ray's record of the registered ones exists, so nothing is guessed)."""
    import shutil

    from longalign_rl.training.checkpoint import registered

    if not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        return
    kept = {p.name for p in registered(run_dir)}
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and folder.name not in kept:
            log.warning("removing %s: a checkpoint that was never completed", folder.name)
            shutil.rmtree(folder)


def check_output_dir(run_dir: Path) -> None:
    """The run directory's parent can be created and written (the run directory itself is
    made only once every check has passed)."""
    target = run_dir if run_dir.is_dir() else run_dir.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write_probe"):
            pass
    except OSError as e:
        raise ConfigError(f"run.output_dir: cannot write runs to {target}: {e.strerror or e}") from None


def required_resources(cfg: Config) -> dict[str, float]:
    """What the trainer workers (and stage 2's sampler actors) reserve, all together."""
    t, s = cfg.train, cfg.sampler
    need = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": float(t.num_workers if t.use_gpu else 0)}
    if cfg.stage == 2:
        r = cfg.reward
        need["CPU"] += s.num_actors * s.num_cpus + r.num_actors * r.num_cpus
        need["GPU"] += s.num_actors * s.num_gpus + r.num_actors * r.num_gpus
    return need


def resource_shortfall(cfg: Config, total: dict[str, float]) -> str | None:
    """A message naming the keys, if the cluster's `total` resources cannot hold the run."""
    need = required_resources(cfg)
    short = [f"{need[r]:g} {r}s (has {total.get(r, 0.0):g})" for r in ("CPU", "GPU") if need[r] > total.get(r, 0.0) + 1e-9]
    if not short:
        return None
    return (f"the run needs {' and '.join(short)}: train.num_workers x train.cpus_per_worker (use_gpu: 1 GPU each)"
            + (" + sampler.num_actors x sampler.num_cpus / num_gpus" if cfg.stage == 2 else "")
            + (" + reward.num_actors x reward.num_cpus / num_gpus" if cfg.stage == 2 and cfg.reward.num_actors else ""))


def connect(cfg: Config) -> str:
    """Start or join Ray, and check that the run fits: on a local instance a run that can never
    be placed is an error (Ray Train would retry forever); on a cluster the autoscaler may
    still add nodes, so it is a warning. Returns a line for the header: where Ray runs and
    its dashboard. The workers' output reaches this console only with run.verbose."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    dashboard = None
    if not ray.is_initialized():
        if address:
            check_reachable(address, cfg.run.connect_timeout_s)
        # the dashboard's Train view (Ray Train's run and worker states) needs this switch
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
        context = ray.init(address=address, log_to_driver=cfg.run.verbose,
                           logging_level=logging.INFO if cfg.run.verbose else logging.ERROR)
        dashboard = getattr(context, "dashboard_url", None)
    shortfall = resource_shortfall(cfg, ray.cluster_resources())
    if shortfall and not address:
        raise ConfigError(f"resources: {shortfall}; this local Ray instance can never place it")
    if shortfall:
        log.warning("resources: %s; waiting for the autoscaler to add nodes", shortfall)
    where = f"joined the cluster at {address}" if address else "a local instance"
    return where + (f", dashboard http://{dashboard}" if dashboard else "")


def check_reachable(address: str, timeout_s: float) -> None:
    """ConfigError unless something answers at RAY_ADDRESS's host and port within
    `timeout_s` (run.connect_timeout_s): ray.init retries a cluster that is not there for
    ever. 'auto' and 'local' are Ray's to resolve."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if parts.hostname is None or parts.port is None:
        raise ConfigError(f"RAY_ADDRESS={address!r}: expected host:port (or ray://host:port, or auto)")
    deadline, error = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((parts.hostname, parts.port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            error = e
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
    raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there within run.connect_timeout_s="
                      f"{timeout_s:g} s ({error.strerror if isinstance(error, OSError) and error.strerror else error}); "
                      "start the cluster (ray start --head), or unset RAY_ADDRESS to run on a local instance")


def start_reward_actors(cfg: Config, run_dir: Path | None = None):
    """The run's reward actors (reward.num_actors > 0), with the reward built and probed in
    each (ConfigError if it cannot be); None without them. Their warnings go to
    `run_dir`/warnings.log once it exists."""
    if cfg.stage != 2 or not cfg.reward.num_actors:
        return None
    from longalign_rl.reward_actors import RewardPool

    pool = RewardPool(cfg, run_dir)
    try:
        pool.check(load_prompts(cfg.prompts.source)[:2])
    except BaseException:
        pool.shutdown()
        raise
    log.info("reward %r: %d reward actors ready", cfg.reward.name, cfg.reward.num_actors)
    return pool


def start_sampler_actors(cfg: Config, run_dir: Path):
    """Stage 2's sampler actors, each built where it runs and waited for (ConfigError with
    the actor's own exception if one cannot be); None in stage 1."""
    if cfg.stage != 2:
        return None
    from longalign_rl.sampling.group import SamplerGroup

    group = SamplerGroup(cfg, run_dir)
    try:
        group.check()
    except BaseException:
        group.shutdown()
        raise
    return group


def shutdown(*pools) -> None:
    """The actor pools a driver started (reward, sampler), when the run will not start."""
    for pool in pools:
        if pool is not None:
            pool.shutdown()


def fit(trainer):
    """trainer.fit() in a helper thread, so that the main thread keeps our signal handlers
    (stop_on_signal) instead of Ray Train's, which abort the run without a checkpoint."""
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="trainer-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: signals are handled between them
    if "error" in box:
        raise box["error"]
    return box["result"]


def run(cfg: Config, run_dir: Path, pairs: list[Pair] | None = None, rewards=None, trackers: list | None = None,
        samplers=None):
    """Start (or join) Ray and the trainer workers (stage 2: and the sampler and reward
    actors, unless `samplers` and `rewards` hold them already); block until done. `pairs`:
    check_inputs' result, so a stage-1 manifest is not read twice."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from longalign_rl.training import checkpoint
    from longalign_rl.training.failures import FailFast
    from longalign_rl.training.worker import train_func

    if not ray.is_initialized():
        connect(cfg)

    start_step = max((checkpoint.step_of(p) or 0 for p in checkpoint.on_disk(run_dir)), default=0)
    common = dict(
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[FailFast()],  # a failure that would only happen again is not retried
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
        ),
    )
    if cfg.stage == 1:
        from ray.train import DataConfig as IngestConfig

        from longalign_rl.training import denoising

        if not cfg.run.verbose:
            ray.data.DataContext.get_current().enable_progress_bars = False
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "body": denoising.BODY},
            datasets={"train": denoising.build_dataset(cfg.data, cfg.train.seed, pairs)},
            dataset_config=IngestConfig(datasets_to_split=["train"]),  # an equal shard per worker
            **common,
        )
        with Progress(run_dir, cfg, start_step, trackers=trackers):
            return fit(trainer)

    from longalign_rl.sampling.group import SamplerGroup

    if rewards is None:
        rewards = start_reward_actors(cfg, run_dir)
    if samplers is None:
        samplers = SamplerGroup(cfg, run_dir)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": to_dict(cfg), "samplers": samplers, "rewards": rewards, "run_dir": str(run_dir),
                           "body": algorithm_of(cfg).body},
        **common,
    )
    try:
        with Progress(run_dir, cfg, start_step, trackers=trackers):
            return fit(trainer)
    finally:
        samplers.shutdown()
        if rewards is not None:
            rewards.shutdown()


@contextlib.contextmanager
def stop_on_signal(run_dir: Path):
    """The first SIGINT/SIGTERM asks the workers to checkpoint after the current step and stop
    (they look for run_dir/stop_requested); a second one stops at once. A request left by an
    earlier interrupted run is cleared first."""
    (run_dir / STOP_REQUEST).unlink(missing_ok=True)
    signals = [signal.SIGINT, signal.SIGTERM]
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        request = run_dir / STOP_REQUEST
        if request.exists():
            print("second interrupt: stopping now, without a checkpoint of the current step", flush=True)
            raise KeyboardInterrupt
        request.touch()
        print(f"{signal.Signals(signum).name}: finishing the current step, checkpointing it and stopping "
              "(interrupt again to stop at once)", flush=True)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in signals:
            signal.signal(s, previous[s])
        (run_dir / STOP_REQUEST).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        from longalign_rl.config import describe_keys

        try:
            if args.resume:  # the run's own values, with what a resume would change
                if args.config:
                    raise ConfigError(f"--config {args.config} with --resume: a run's config is its config.yaml")
                read_run_config(Path(args.resume).resolve())
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
            lock = RunLock(run_dir)
        setup_logging(cfg.run.verbose)
        pairs = check_inputs(cfg)  # a bad prompt file or data source fails here, naming its lines
        check_trackers(cfg)
        check_output_dir(run_dir)
        ray_line = connect(cfg)
        rewards = start_reward_actors(cfg, run_dir)  # a reward that lives in actors is probed there
        samplers = start_sampler_actors(cfg, run_dir)  # built where they run: the model, LoRA, T5 branch
    except (ConfigError, ValueError, TypeError, RuntimeError) as e:
        if lock is not None:
            lock.release()
        shutdown(rewards, samplers)
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # every check passed: a new run's directory is made and this driver becomes its owner
        created = not run_dir.exists()
        if lock is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
    except (ConfigError, OSError) as e:
        shutdown(rewards, samplers)
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
            check_checkpoint_index(run_dir)
            remove_unregistered_checkpoints(run_dir)
            changes = keep_original_config(run_dir, cfg)
            if changes:
                print(f"resuming with changes ({run_dir / 'config.original.yaml'} keeps the first config): "
                      + "; ".join(changes), flush=True)
        else:
            check_new_run_dir(run_dir)  # again, under the lock: another run may have started and ended meanwhile
            write_atomic(run_dir / CONFIG, to_yaml(cfg))
        trackers = open_trackers(cfg.run.report_to, run_dir, to_dict(cfg))
    except (ConfigError, TrackerError, OSError) as e:
        if not args.resume:  # a start that failed leaves no directory to block the name
            clear_failed_start(run_dir, created)
        shutdown(rewards, samplers)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(cfg, run_dir, pairs) + f"\nray                {ray_line}", flush=True)
    if trackers:
        print(f"trackers           {', '.join(cfg.run.report_to)}"
              + (f" (tensorboard --logdir {run_dir / 'tensorboard'})" if "tensorboard" in cfg.run.report_to else ""),
              flush=True)
    start = time.perf_counter()
    try:
        with stop_on_signal(run_dir), closing_all(trackers):
            result = run(cfg, run_dir, pairs, rewards, trackers, samplers)
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


def clear_failed_start(run_dir: Path, created: bool) -> None:
    """What a new run wrote before it failed to start (its lock file stays until released)."""
    import shutil

    for child in run_dir.iterdir():
        if child.name == RunLock.FILE:
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)  # the lock's descriptor stays valid until released


def setup_logging(verbose: bool) -> None:
    """The driver's logging: its own warnings, plainly; everything with timestamps when verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    quiet_libraries(verbose)


if __name__ == "__main__":
    sys.exit(main())
