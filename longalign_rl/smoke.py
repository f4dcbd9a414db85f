"""`longalign-rl smoke [--config FILE] [--size tiny|real] [key=value ...]`: a config run as
shipped, for two steps on this machine's CPUs, with only its sizes swapped.

A config written for six GPUs and SD v1.5 is tried before the GPU hours are spent: every key
that says *how* to train (dropout, activation checkpointing, precision, sampler.train_mode,
the T5 branch, splits, crops, the algorithm, the schedule, ZeRO) stays as the file says; what
says *how big* is swapped:

- the model for a stand-in of the same family and classes without a download: size "tiny"
  -> the family's tiny random model at 64 px ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux";
  a model's own T5 window to 64 tokens); size "real" -> its real architecture with random
  weights ("sd15-random", "sdxl-random", "sd35-medium-random", "flux-dev-random") at 256 px. Models that
  need no download (the shipped ShapesWorld ones, a local folder, a loader) are kept, at
  their resolution;
- the T5 encoder likewise (tiny; or T5-large's architecture with random weights, written
  to a folder), and an adapter that no longer fits it starts random;
- a reward that needs a download for the stand-in its module declares (`factory.stand_in`:
  a tiny model of the same class; or the real architecture with random weights), every
  other reward argument kept (text_irrelevant_weight, direction, split, crop, ...);
- stage 1's data, when its file does not exist here: a handful of generated image-caption
  pairs, in a manifest of the same kind; prompt files that do not exist here: the demo prompts;
- workers, actors and their resources: 2 trainer workers ("real": 1), one sampler actor and
  at most one reward actor, on the CPU, train.steps 2, train.batch_size 2 ("real": 1; an
  algorithm that draws each prompt several times, grpo: one group), at most 10 DDIM steps (the gradient steps kept, up to 10) and 2 validation prompts.

It runs `python -m longalign_rl.train` itself (train.main, in this process), prints the
overrides it used, so that the same run can be repeated by hand, and the peak memory of each
process of the run (the driver, the trainer workers, the sampler and reward actors).
The README's test command runs every file in configs/ this way (tests/e2e/test_configs.py),
but for the tiny ones that other e2e tests run as shipped (its RUN_ELSEWHERE).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from longalign_rl.config import Config, ConfigError, load_config, to_dict
from longalign_rl.registry import algorithm_of

SIZES = ("tiny", "real")
# Every key a smoke run may change (`shrink`): the sizes. Every other key runs as the file says.
SWAPPED = ("model.pretrained", "t5.encoder", "t5.adapter", "reward.name", "reward.kwargs", "data.source",
           "prompts.source", "run.validation", "sampler.resolution", "data.resolution", "train.steps",
           "train.use_gpu", "train.num_workers", "train.cpus_per_worker", "train.batch_size", "sampler.num_actors",
           "sampler.num_gpus", "sampler.num_cpus", "sampler.num_steps", "sampler.num_grad_steps",
           "prompts.t5_max_tokens",
           "run.validation_size", "reward.num_actors", "reward.num_gpus", "reward.num_cpus")
# The CPUs a smoke run shares out among its processes: the smallest machine it is meant for.
CPUS = 2
# The resolution a stand-in model of each size runs at (the model: its family's, `_model`).
RESOLUTION = {"tiny": 64, "real": 256}
# The T5 window of a tiny stand-in of a family with its own T5 (SD3, FLUX): a test-sized T5
# needs no 256 or 512 tokens (the tiny configs' own value).
TINY_T5_TOKENS = 64


def _exists(value: str, names=None) -> bool:
    """Whether a model / T5 / data / prompt value names something here that needs no download."""
    from longalign_rl.registry import IMPORT_PATH

    return bool(value) and (IMPORT_PATH.match(value) is not None or Path(value).exists()
                            or (names is not None and value in names))


def _family(cfg: Config):
    """The family of model.pretrained: model.family, else what its model_index.json says when
    that can be read here (a hub id in the cache), else SD 1.x."""
    from longalign_rl.families import default_family, find_family
    from longalign_rl.models import declared_family

    if cfg.model.family:
        return find_family(cfg.model.family)
    try:
        return declared_family(cfg.model.pretrained, cfg.model.revision, download=False) or default_family()
    except (OSError, ValueError):  # a model that does not exist here: SD 1.x's stand-in, as before families
        return default_family()


def _model(cfg: Config, size: str) -> str | None:
    """The stand-in for model.pretrained (its family's built-in of `size`), or None to keep it."""
    from longalign_rl.models import MODELS

    value, family = cfg.model.pretrained, _family(cfg)
    stand_in = family.tiny if size == "tiny" else family.real_size
    if value == family.real_size and size == "tiny":
        return stand_in
    return None if _exists(value, MODELS) else stand_in


def _t5(cfg: Config, size: str, folder: Path) -> str | None:
    """The stand-in for t5.encoder, or None to keep it."""
    encoder = cfg.t5.encoder
    if not encoder or encoder == "tiny":
        return None
    if size == "tiny":
        return "tiny"
    return None if Path(encoder).exists() else str(random_t5_large(folder))


def random_t5_large(folder: Path) -> Path:
    """A T5EncoderModel of T5-large's architecture (google-t5/t5-large: 24 layers of width
    1024) with random weights and the tiny T5's offline tokenizer, as a local folder."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    from longalign_rl.encoding.t5 import CONFIG_DIR

    path = folder / "t5-large-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16,
                          feed_forward_proj="relu", dropout_rate=0.1, pad_token_id=0, eos_token_id=1)
        T5EncoderModel(config).save_pretrained(path, safe_serialization=True)
        AutoTokenizer.from_pretrained(CONFIG_DIR / "tiny" / "t5_tokenizer").save_pretrained(path)
    return path


def _reward(cfg: Config, size: str, folder: Path) -> tuple[str, dict] | None:
    """(name, kwargs) of the reward's stand-in, or None to keep it."""
    from longalign_rl.registry import find_reward

    try:
        factory = find_reward(cfg.reward.name)
    except Exception:  # only in the reward actors' runtime_env: they build it as it is
        return None
    stand_in = getattr(factory, "stand_in", None)
    return None if stand_in is None else stand_in(size, folder, dict(cfg.reward.kwargs))


def write_pairs(source: str, folder: Path, n: int, resolution: int) -> Path:
    """`n` generated image-caption pairs (coloured blocks; the demo prompts as captions) in
    the form `source` has: a .jsonl or .csv manifest, or a folder of images with .txt captions."""
    import csv

    import numpy as np
    from PIL import Image

    from longalign_rl.prompts import load_prompts

    captions = load_prompts("demo")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = np.zeros((resolution, resolution, 3), dtype=np.uint8)
        cells = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image[:] = np.kron(cells, np.ones((resolution // 4, resolution // 4, 1), dtype=np.uint8))
        name = f"{i:04d}.png"
        Image.fromarray(image).save(folder / name)
        rows.append({"image": name, "caption": captions[i % len(captions)]})
    suffix = Path(source).suffix.lower()
    if suffix == ".jsonl":
        path = folder / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path
    if suffix == ".csv":
        path = folder / "pairs.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows(rows)
        return path
    for r in rows:
        (folder / r["image"]).with_suffix(".txt").write_text(r["caption"])
    return folder


def shrink(cfg: Config, size: str, folder: Path) -> dict:
    """What a smoke run of `size` changes in `cfg` (module docstring): {dotted key: value},
    only the keys whose value changes; files the stand-ins need are written under `folder`."""
    if size not in SIZES:
        raise ConfigError(f"--size: must be one of {', '.join(SIZES)}, got {size!r}")
    s, t, r = cfg.sampler, cfg.train, cfg.reward
    real = size == "real"
    workers = 1 if real else 2
    actors, reward_actors = min(s.num_actors, 1), min(r.num_actors, 1)  # every worker draws from actor 0
    # Every process an equal share of CPUS (in quarters), or less where the config asks for
    # less; in stage 1 the generator's task, which renders the pairs, counts as one more.
    share = math.floor(CPUS / (workers + (actors + reward_actors if cfg.stage == 2 else 1)) * 4) / 4
    # one prompt per worker (grpo: one group of algorithm.group_size samples)
    repeats = algorithm_of(cfg).group_size(cfg) if cfg.stage == 2 else 1
    batch = repeats if repeats > 1 else (1 if real else 2)
    new = {"train.steps": min(t.steps, 2), "train.use_gpu": False, "train.num_workers": workers,
           "train.cpus_per_worker": min(t.cpus_per_worker, share), "train.batch_size": batch}
    if cfg.stage == 2:  # stage 1 has no actors
        new.update({"sampler.num_actors": actors, "sampler.num_gpus": 0.0, "sampler.num_cpus": min(s.num_cpus, share)})
    if reward_actors:
        new.update({"reward.num_actors": reward_actors, "reward.num_gpus": 0.0,
                    "reward.num_cpus": min(r.num_cpus, share)})
    steps = min(s.num_steps, 10)
    new.update({"sampler.num_steps": steps, "sampler.num_grad_steps": min(s.num_grad_steps, steps),
                "run.validation_size": min(cfg.run.validation_size, 2)})
    model = _model(cfg, size)
    t5 = _t5(cfg, size, folder)
    if model is not None:
        new.update({"model.pretrained": model, "sampler.resolution": RESOLUTION[size],
                    "data.resolution": RESOLUTION[size]})
        if size == "tiny" and hasattr(_family(cfg), "t5_default_tokens"):  # a tiny T5 stand-in (SD3, FLUX)
            new["prompts.t5_max_tokens"] = TINY_T5_TOKENS
    if t5 is not None:
        new["t5.encoder"] = t5
    if cfg.t5.adapter and (model is not None or t5 is not None or not Path(cfg.t5.adapter).exists()):
        new["t5.adapter"] = ""  # sized for the models it was trained with: random here
    reward = _reward(cfg, size, folder) if cfg.stage == 2 else None
    if reward is not None:
        new.update({"reward.name": reward[0], "reward.kwargs": reward[1]})
    if not _exists(cfg.prompts.source) and cfg.prompts.source != "demo":
        new["prompts.source"] = "demo"
    if cfg.run.validation and not _exists(cfg.run.validation):
        new["run.validation"] = ""
    if cfg.stage == 1 and not _exists(cfg.data.source):
        pairs = workers * batch * t.grad_accum * new["train.steps"]
        new["data.source"] = str(write_pairs(cfg.data.source, folder / "pairs", pairs,
                                             new.get("data.resolution", cfg.data.resolution)))
    old = to_dict(cfg)
    # reward.kwargs belong to reward.name: an override naming another reward starts from none
    return {k: v for k, v in new.items() if _get(old, k) != v or (k == "reward.kwargs" and "reward.name" in new)}


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def as_overrides(changes: dict) -> list[str]:
    """{key: value} as command-line overrides (JSON is YAML: they parse it as any value)."""
    return [f"{k}={v}" if isinstance(v, str) else f"{k}={json.dumps(v)}" for k, v in changes.items()]


# ---------------------------------------------------------------- peak memory per process


def _peak_rss(pid: int) -> int | None:
    """The process's peak resident memory in bytes (Linux: VmHWM), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# Ray worker processes by the actor class in their title ("ray::SamplerActor.sample"); the
# others are Ray's own (Ray Train's controller, a stage-1 generator's task, ...).
ROLES = {"RayTrainWorker": "trainer worker", "SamplerActor": "sampler actor", "RewardActor": "reward actor"}


def _role(cmdline: list[str]) -> str | None:
    """What a Ray worker process is (ROLES, else "other Ray process"), None when it is idle
    or not a Ray worker."""
    first = cmdline[0] if cmdline else ""
    if not first.startswith("ray::"):
        return None
    name = first[len("ray::"):].split(".")[0].split(" ")[0]
    return None if name in ("IDLE", "") else ROLES.get(name, "other Ray process")


@dataclass
class PeakMemory:
    """Polls the peak resident memory of this process and every Ray worker process below it
    (a local Ray instance's workers are its grandchildren) while a run lasts. A process that
    already had a role when the measuring began belongs to an earlier run on the same Ray
    instance (an actor of a finished run can take a moment to exit) and is not counted."""

    interval: float = 0.5
    peaks: dict = field(default_factory=dict)  # pid -> [role, peak bytes]
    earlier: set = field(default_factory=set)  # pids of an earlier run's actors

    def _children(self):
        """(pid, role) of the Ray worker processes below this one."""
        import os

        import psutil

        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                yield child.pid, _role(child.cmdline())
            except psutil.Error:
                continue

    def poll(self) -> None:
        import os

        self._record(os.getpid(), "driver")
        for pid, role in self._children():
            if pid not in self.earlier and (role is not None or pid in self.peaks):
                self._record(pid, role)

    def _record(self, pid: int, role: str | None) -> None:
        peak = _peak_rss(pid)
        if peak is None:
            return
        entry = self.peaks.setdefault(pid, [role, 0])
        entry[0] = role or entry[0]
        entry[1] = max(entry[1], peak)

    def __enter__(self):
        self.earlier = {pid for pid, role in self._children() if role is not None}
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval):
                self.poll()

        self.poll()
        self._thread = threading.Thread(target=loop, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()

    def by_role(self) -> dict[str, tuple[int, float]]:
        """role -> (processes, the largest peak among them in GB)."""
        out: dict[str, tuple[int, float]] = {}
        for role, peak in self.peaks.values():
            if role is None:
                continue
            count, top = out.get(role, (0, 0.0))
            out[role] = (count + 1, max(top, peak / 2**30))
        return out


def _shrink_in_child(cfg: Config, size: str, folder: Path) -> dict:
    """`shrink` in a child process, for size "real": its stand-ins are gigabytes of random
    weights (a ViT-H-14 reward, T5-large) that the driver would otherwise keep through the
    run, since freed tensors' memory stays with the allocator (measured under pytest during
    step 2: 8.0 GB of the driver's RSS, and the sampler actor killed for memory on a 24 GiB
    machine; 2.8 GB with the child)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as child:
        return child.submit(shrink, cfg, size, folder).result()


def run(config: str | Path | None, size: str = "tiny", overrides: list[str] | None = None,
        output_dir: str | Path = "runs", name: str | None = None, work: str | Path | None = None):
    """The smoke run of `config` (None: the defaults of longalign_rl/config.py, no file):
    returns (train.main's exit code, the run directory, PeakMemory, the overrides used).
    Stand-in files go to `work` (a temporary folder by default; a real-size one is large)."""
    from longalign_rl import train

    overrides = list(overrides or [])
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        if config is None:
            config = tmp / "defaults.yaml"
            config.write_text("{}\n")
        cfg = load_config(config, overrides)
        name = name or f"smoke-{Path(config).stem}-{size}-{time.strftime('%Y%m%d-%H%M%S')}"
        changes = _shrink_in_child(cfg, size, tmp) if size == "real" else shrink(cfg, size, tmp)
        used = as_overrides(changes) + overrides + [f"run.output_dir={output_dir}", f"run.name={name}"]
        print(f"smoke run ({size}): python -m longalign_rl.train --config {config} "
              + " ".join(f"'{o}'" if " " in o or "{" in o else o for o in used), flush=True)
        with PeakMemory() as memory:
            code = train.main(["--config", str(config), *used])
    return code, Path(output_dir).resolve() / name, memory, used


def memory_lines(memory: PeakMemory) -> list[str]:
    return [f"  {role:<20} {count} process{'es' if count > 1 else ''}, peak {gb:.2f} GB"
            for role, (count, gb) in sorted(memory.by_role().items())]


def main(argv: list[str] | None = None, prog: str = "python -m longalign_rl.smoke") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog="The sizes it swaps: see the module's docstring (longalign_rl/smoke.py).")
    parser.add_argument("--config", help="the YAML file to try (default: the defaults of longalign_rl/config.py)")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: the tiny stand-ins, 2 workers (about a minute); real: SD v1.5's architecture "
                             "with random weights at 256 px, 1 worker and 1 actor (4 to 6 minutes on 2 cores; 21 GB of "
                             "memory in use at most: BENCHMARKS.md)")
    parser.add_argument("--output-dir", default="runs")
    parser.add_argument("--work", help="where the stand-ins' files go while it runs (default: the system's temp)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    try:
        code, run_dir, memory, _ = run(args.config, args.size, args.overrides, args.output_dir, work=args.work)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"peak memory per process ({'passed' if code == 0 else f'exit {code}'}; {run_dir}):")
    print("\n".join(memory_lines(memory)))
    return code


if __name__ == "__main__":
    sys.exit(main())
