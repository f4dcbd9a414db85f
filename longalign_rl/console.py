"""The driver's console: what a run prints, and nothing else unless `run.verbose` asks.

    quiet_libraries(verbose)   transformers / diffusers / DeepSpeed / Ray chatter off on the driver
    log_warnings_to(path, who) a worker's or actor's warnings, also appended to warnings.log
    Progress(run_dir, cfg)     a thread that follows metrics.jsonl (rank 0 appends a record per
                               step), validation.jsonl and warnings.log (the warnings of every
                               worker and actor): a progress bar on a terminal, plain lines
                               otherwise (under `ray job submit`)
    outputs(run_dir, cfg)      where the run's results are, for the last lines

The workers' and actors' own output (model loading, DeepSpeed, Ray Train's reports) is not
forwarded to the driver (ray.init(log_to_driver=False), train.py) unless run.verbose; it
stays in Ray's logs, and their warnings reach the console through warnings.log. Plain
Python and tqdm: no ray, no deepspeed.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import statistics
import sys
import threading
from pathlib import Path

from longalign_rl import guard, validation
from longalign_rl.config import Config, ConfigError
from longalign_rl.outputs import LORA, METRICS, UNET
from longalign_rl.registry import algorithm_of
from longalign_rl.trackers import numbers

WARNINGS_LOG = "warnings.log"
# CUT_PROMPTS_LOGGER (encoding/encode.py) says that a prompt was cut at max_tokens: the
# driver measures the prompts it knows before the run (preflight.warn_cut_prompts), once for
# the whole file, so the workers' and actors' warnings.log leave it out.

# Shown on the progress line, when a record has them: stage 1's epoch and loss; in stage 2
# the algorithm's progress_keys (registry.Algorithm).
STAGE1_KEYS = ("epoch", "loss")
# Families of per-position metrics ("gt/shape/1".."gt/shape/4") are shown as their mean
# ("gt/shape"), except these (per-sentence diagnostics, not the run's question).
NOT_SHOWN = ("segment_score", "time", "ratio", "advantage")
FAMILY = re.compile(r"^(?P<family>.+)/\d+$")


class _WarningsFile(logging.FileHandler):
    """warnings.log for one process: each distinct message once (a sampler that meets the
    same over-long prompt every epoch says so once), at most `limit` of them, then one line
    that says where the rest are. Nothing is written before the run directory exists (a
    reward actor starts before it)."""

    def __init__(self, path: Path, who: str, limit: int, skip: tuple[str, ...]):
        super().__init__(path, delay=True)
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter(f"{who}: %(message)s"))
        self.limit, self.skip, self.seen = limit, skip, set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.skip):
            return
        message = record.getMessage()
        if message in self.seen or len(self.seen) > self.limit or not Path(self.baseFilename).parent.is_dir():
            return
        self.seen.add(message)
        if len(self.seen) > self.limit:
            record = logging.makeLogRecord({"msg": f"more than {self.limit} different warnings: the rest are only "
                                                   "in this process's Ray log", "levelno": logging.WARNING})
        super().emit(record)


def log_warnings_to(path: Path, who: str, limit: int = 100, skip: tuple[str, ...] = ()) -> None:
    """This process's warnings (longalign_rl's loggers) are also appended to the run's
    warnings.log as "WHO: message", which `Progress` prints on the driver's console: the
    output of Ray workers and actors reaches the driver only with run.verbose. Called by
    every trainer worker ("rank 0") and every sampler and reward actor ("sampler actor 1").
    `skip`: loggers whose warnings stay in the Ray log (the driver said it already: prompts
    cut at prompts.max_tokens, `CUT_PROMPTS_LOGGER`)."""
    logger = logging.getLogger("longalign_rl")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # the process's info lines still go to its Ray log
    if any(getattr(h, "baseFilename", None) == str(Path(path).absolute()) for h in logger.handlers):
        return  # a restarted loop in the same process
    logger.addHandler(_WarningsFile(path, who, limit, tuple(skip)))


def quiet_libraries(verbose: bool) -> None:
    """Library logging on the driver: warnings and errors only (progress bars off), unless verbose."""
    if verbose:
        return
    import transformers.utils.logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("ray", "ray.train", "ray.data", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def shown_keys(cfg: Config, record: dict) -> list[tuple[str, list[str]]]:
    """(label, record keys averaged into it) for the progress line."""
    base = algorithm_of(cfg).progress_keys if cfg.stage == 2 else STAGE1_KEYS
    shown = [(k, [k]) for k in base if k in record]
    families: dict[str, list[str]] = {}
    for key in record:
        match = FAMILY.match(key)
        if match and not match.group("family").startswith(NOT_SHOWN):
            families.setdefault(match.group("family"), []).append(key)
    return shown + sorted(families.items())


def format_values(cfg: Config, record: dict) -> str:
    parts = []
    for label, keys in shown_keys(cfg, record):
        values = [record[k] for k in keys if isinstance(record.get(k), (int, float))]
        if values:
            value = sum(values) / len(values)
            parts.append(f"{label} {value}" if isinstance(value, int) else f"{label} {value:.3g}")
    return "  ".join(parts)


def format_validation(cfg: Config, record: dict, first: dict | None) -> str:
    """One validation's means (families averaged, as on the progress line), each with the
    first validation's value beside it."""
    means = record["means"]
    parts = []
    judged = [(k, [k]) for k in means if k.startswith(guard.JUDGE) and k.count("/") == 1]  # a judge reward's total
    for label, keys in [*shown_keys(cfg, {"reward": 0, **means}), *judged]:
        if not all(k in means for k in keys):
            continue
        value = sum(means[k] for k in keys) / len(keys)
        text = f"{label} {value:.3g}"
        if first is not None and first is not record and all(k in first["means"] for k in keys):
            text += f" (step {first['step']}: {sum(first['means'][k] for k in keys) / len(keys):.3g})"
        parts.append(text)
    shown = "  ".join(parts) or f"images only (no reward or metric hooks): {validation.FOLDER}/step_{record['step']:06d}.png"
    return f"validation at step {record['step']} ({record['prompts']} prompts): {shown}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Follows a run's metrics.jsonl and warnings.log from the driver while it trains.

    On a terminal: one tqdm bar (step k/N, rate, ETA, the run's numbers), warnings printed
    above it. Elsewhere: a plain line every `every` steps (at most about 50 lines) and at
    the last step, each with its ETA."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int = 0, stream=None, tty: bool | None = None,
                 interval: float = 0.5, trackers: list | None = None):
        self.run_dir, self.cfg, self.total = Path(run_dir), cfg, cfg.train.steps
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.every = max(1, self.total // 50)
        self.step = start_step
        self.start_step = start_step
        self.seconds: collections.deque[float] = collections.deque(maxlen=20)  # the ETA's recent steps
        self.offsets = {METRICS: 0, WARNINGS_LOG: 0, validation.FILE: 0}
        self.validated: dict[int, dict] = {}  # step -> validation record seen
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self.bar = None
        self.trackers = list(trackers or [])  # trackers.py: given every record and image grid
        self.images_seen: set[str] = set()

    def __enter__(self) -> "Progress":
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.start_step, unit="step", file=self.stream,
                            dynamic_ncols=True, desc="training")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self.poll()  # what the last interval left
        if self.bar is not None:
            self.bar.close()

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.poll()

    def _new_lines(self, name: str) -> list[str]:
        """Complete lines appended to run_dir/name since the last call (from the start again
        when the file shrank: a resume cuts metrics.jsonl back to its checkpoint)."""
        path = self.run_dir / name
        if not path.is_file():
            return []
        size = path.stat().st_size
        if size < self.offsets[name]:
            self.offsets[name] = 0
        with path.open("rb") as f:
            f.seek(self.offsets[name])
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written waits for the next poll
        self.offsets[name] += end
        return data[:end].decode("utf-8", "replace").splitlines()

    def poll(self) -> None:
        for line in self._new_lines(WARNINGS_LOG):
            self._write(f"warning: {line}")
        for line in self._new_lines(METRICS):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= self.step:
                continue  # seen before a resume cut the file back
            self._track("scalars", record["step"], numbers(record))
            self._show(record)
        for line in self._new_lines(validation.FILE):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = record["step"]
            if step in self.validated or (step <= self.start_step and self.start_step > 0):
                self.validated.setdefault(step, record)
                continue  # logged before the resume
            self.validated[step] = record
            self._track("scalars", step, {f"val/{k}": v for k, v in numbers(record["means"]).items()})
            grid = self.run_dir / validation.FOLDER / f"step_{step:06d}.png"
            if grid.is_file():
                self._track("image", step, "validation", grid)
            self._write(format_validation(self.cfg, record, self.validated[min(self.validated)]))
            self._guard(step)
        images = self.run_dir / "images"
        for path in sorted(images.glob("step_*.png")) if self.trackers and images.is_dir() else []:
            step = int(path.stem.split("_")[1])
            if path.name not in self.images_seen and step > self.start_step:  # a resume's earlier grids are logged
                self.images_seen.add(path.name)
                self._track("image", step, "samples", path)

    def _guard(self, step: int) -> None:
        """The guard's verdict after the validation at `step` (guard.py): the selection, a
        divergence of the reward and the judge, an early stop; to the trackers as guard/..."""
        records = [self.validated[s] for s in sorted(self.validated)]
        for alarm in guard.drift_alarms(self.cfg.run.drift, records):
            if alarm.step == step:  # each statistic's alarm once, at the validation it fired at
                self._track("scalars", step, {f"alarm/{alarm.statistic}": alarm.change})
                self._write(alarm.message())
        try:
            verdict = guard.assess(self.cfg.run, records)
        except ConfigError as e:  # a select_by key the validations lack: the workers stop on it too
            self._write(f"warning: {e}")
            return
        if verdict is None:
            return
        self._track("scalars", step, guard.tracked(verdict))
        for line in guard.format_verdict(verdict):
            self._write(line if line.startswith("warning") else f"  {line}")

    def _track(self, method: str, *args) -> None:
        """A tracker that fails (a network down, a full disk) is reported and dropped; the
        training goes on, with metrics.jsonl complete."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                self.trackers.remove(tracker)
                self._write(f"warning: tracker {type(tracker).__name__} failed and is off for the rest of the "
                            f"run ({type(e).__name__}: {e}); metrics.jsonl has every step")

    def _show(self, record: dict) -> None:
        advanced, self.step = record["step"] - self.step, record["step"]
        if isinstance(record.get("time/step"), (int, float)):
            self.seconds.append(float(record["time/step"]))
        values = format_values(self.cfg, record)
        if self.bar is not None:
            self.bar.set_postfix_str(values, refresh=False)
            self.bar.update(advanced)
            return
        if self.step % self.every and self.step != self.total:
            return
        recent = self.seconds
        eta = f"  ETA {_duration(statistics.median(recent) * (self.total - self.step))}" if recent else ""
        width = len(str(self.total))
        self._write(f"step {self.step:>{width}}/{self.total}  {values}{eta if self.step < self.total else ''}")

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def outputs(run_dir: Path, cfg: Config, last_checkpoint: str | None) -> list[str]:
    """Where the run's results are: the exported weights, the last checkpoint, the logs."""
    run_dir = Path(run_dir)
    rows = []
    selected = guard.read_selection(run_dir)
    chosen = f" of step {selected['exported_step']} (selected)" if selected else ""
    for name, what in ((LORA, f"LoRA for diffusers{chosen} (pipe.load_lora_weights)"),
                       (UNET, f"fine-tuned UNet{chosen}"),
                       (LORA + "_last", "LoRA of the last step"), (UNET + "_last", "fine-tuned UNet of the last step"),
                       ("text_adapter", "trained T5 adapter (TextAdapter)"),
                       ("model", f"the whole pipeline{chosen} (from_pretrained)")):
        if (run_dir / name).is_dir():
            rows.append(f"{what:<44} {run_dir / name}")
    if last_checkpoint:
        rows.append(f"{'last checkpoint (continue with --resume RUN)':<44} {last_checkpoint}")
    rows.append(f"{'metrics (one JSON record per step)':<44} {run_dir / 'metrics.jsonl'}")
    if (run_dir / "images").is_dir():
        rows.append(f"{'image grids':<44} {run_dir / 'images'}")
    if (run_dir / validation.FOLDER).is_dir():
        rows.append(f"{'validation (same prompts and seeds)':<44} {run_dir / validation.FOLDER}")
    if (run_dir / "summary.md").is_file():
        rows.append(f"{'summary':<44} {run_dir / 'summary.md'}")
    return rows


def actor_cause(error: BaseException, limit: int = 300) -> str:
    """Why an actor call failed, in one line: the last 'SomeError: message' line of Ray's
    text, which carries the actor's own traceback (an exception in its constructor, a
    process killed for memory, an exit code); else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\w*: ", line)]
    text = found[-1] if found else (lines[0] if lines else "")
    text = f"{type(error).__name__}: {text}" if text and not found else (text or type(error).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."
