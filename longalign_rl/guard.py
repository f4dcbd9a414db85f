"""The guard against reward hacking: judges, the selected weights and early stopping.

A reward that is being hacked keeps rising (or holds) while what it stands for gets worse;
the run exits 0 and exports its last, worst weights. The guard watches the validations
(validation.py: the same prompts from the same noise every run.eval_every steps):

- judges (`run.judge`): scorers run only on the validation images and never trained on, a
  reward by name or import path with its kwargs, or a metric hook. Their values are the
  validation keys `judge/<name>` (a reward's total; its parts `judge/<name>/<part>`) and
  `judge/<metric's names>`;
- selection (`run.select_by`): of the validations whose value of one key (the first
  judge's by default) is within `within` standard errors of the best one's (the
  one-standard-error rule), the latest picks the weights that lora/ (or unet/, model/)
  holds: a validation set's noise does not send a run that is still improving back to an
  early lucky draw. lora_last/ holds the last step's; best/ keeps the selected weights
  whatever keep_checkpoints prunes;
- drift alarms (`run.drift`), judge or not: statistics of the validation images against
  step 0's (brightness, saturation, contrast, high-frequency energy, colour spread across
  prompts, distance in the reward's image tower), one alarm per statistic beyond its
  threshold and its uncertainty;
- divergence: the training reward on the validation prompts not down since the best
  validation while the key fell beyond its uncertainty (two standard errors of the paired
  per-prompt changes): said on the console, to the trackers and in summary.md;
- early stopping (`run.early_stop`): after `patience` validations without a new best, or
  at the first drop beyond the uncertainty.

Everything here is a function of validation.jsonl's records, so the driver's console, the
workers' decisions and summary.md agree, and a resumed run, whose records are cut back to
its checkpoint, recomputes the state the killed run had. Pure: no ray, no deepspeed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from longalign_rl.typed_yaml import ConfigError
from longalign_rl.uncertainty import mean_and_error

JUDGE = "judge/"
BEST = "best"  # run_dir/best/: the selected validation's weights (weights.safetensors, state.json)
REPORT = "guard.json"  # run_dir/guard.json, written at the export: the selection and the drift alarms


@dataclass(frozen=True)
class JudgeEntry:
    kind: str  # "reward" | "metric"
    target: str  # the reward's name or import path; the metric hook's import path
    kwargs: dict
    name: str  # the reward's key under judge/ (metrics keep their own names)


def judge_entries(raw) -> list[JudgeEntry]:
    """run.judge's mappings, checked; a ConfigError names run.judge[i] and what is wrong."""
    from longalign_rl.registry import IMPORT_PATH

    entries, names = [], set()
    for i, item in enumerate(raw):
        key = f"run.judge[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{key}: expected a mapping {{reward: name, kwargs: {{...}}}} or {{metric: "
                              f"'pkg.module:function'}}, got {item!r}")
        kinds = [k for k in ("reward", "metric") if k in item]
        unknown = sorted(set(item) - {"reward", "metric", "kwargs", "name"})
        if len(kinds) != 1 or unknown:
            raise ConfigError(f"{key}: needs exactly one of 'reward' or 'metric' (and optionally 'kwargs', 'name'), "
                              f"got keys {sorted(item)}")
        kind, target = kinds[0], item[kinds[0]]
        if not isinstance(target, str) or not target.strip():
            raise ConfigError(f"{key}.{kind}: expected a name or import path, got {target!r}")
        if kind == "metric":
            if not IMPORT_PATH.match(target):
                raise ConfigError(f"{key}.metric: must be an import path 'package.module:function', got {target!r}")
            if "kwargs" in item or "name" in item:
                raise ConfigError(f"{key}: a metric hook takes no kwargs or name (its values keep their own names)")
        kwargs = item.get("kwargs", {}) or {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{key}.kwargs: expected a mapping, got {kwargs!r}")
        name = str(item.get("name") or target.rsplit(":", 1)[-1])
        if kind == "reward":
            if "/" in name or not name.strip():
                raise ConfigError(f"{key}.name: {name!r} cannot be a key (no '/', not empty)")
            if name in names:
                raise ConfigError(f"{key}: a second judge named {name!r}; give one of them its own 'name'")
            names.add(name)
        entries.append(JudgeEntry(kind, target, dict(kwargs), name))
    return entries


def selection_key(run) -> str | None:
    """The key that selects the weights (run.select_by.key; else the first judge's: a
    reward's `judge/<name>`, or JUDGE alone for a metric, which means its first value), or
    None: no selection."""
    if run.select_by.key:
        return run.select_by.key
    entries = judge_entries(run.judge)
    if not entries:
        return None
    return JUDGE + entries[0].name if entries[0].kind == "reward" else JUDGE


def resolve_key(key: str, record: dict) -> str:
    """`key` as found in a validation record (JUDGE alone: the record's first judge key); a
    key the record lacks is a ConfigError naming run.select_by.key and the keys it has."""
    means = record["means"]
    if key == JUDGE:
        found = [k for k in means if k.startswith(JUDGE)]
        if found:
            return found[0]
    elif key in means:
        return key
    raise ConfigError(f"run.select_by.key: the validation at step {record['step']} has no {key!r}; its keys: "
                      f"{', '.join(means) or '(none)'}")


# ------------------------------------------------------------------ the judges


class Judges:
    """run.judge built: `values(images, prompts)` -> {judge/...: Tensor[B]}."""

    def __init__(self, entries: list[JudgeEntry], device):
        from longalign_rl.registry import get_reward, import_path

        self.judges = []  # (index in run.judge, kind, name (a reward's key) or path (a hook's), reward or function)
        for i, e in enumerate(entries):
            if e.kind == "metric":
                fn = import_path(e.target, f"run.judge[{i}].metric")
                if not callable(fn):
                    raise ConfigError(f"run.judge[{i}].metric: {e.target!r} is not a function")
                self.judges.append((i, "metric", e.target, fn))
                continue
            try:
                reward = get_reward(e.target, **e.kwargs)
            except Exception as error:
                raise ConfigError(f"run.judge[{i}]: reward {e.target!r} could not be built "
                                  f"({type(error).__name__}: {error})") from error
            self.judges.append((i, "reward", e.name, reward.to(device) if hasattr(reward, "to") else reward))

    @property
    def scorers(self) -> list:
        """The judge rewards (image_tower looks among them)."""
        return [obj for _, kind, _, obj in self.judges if kind == "reward"]

    @staticmethod
    def _values_of(kind: str, name: str, obj, images, prompts: list[str], every_prompt: list[str] | None,
                   reserved) -> dict:
        """One judge's values of one batch, [B] each on the CPU."""
        import torch

        from longalign_rl.hooks import run_metric_hooks
        from longalign_rl.scoring import batch_statistics, score

        with torch.no_grad():
            if kind == "metric":
                return {JUDGE + k: v for k, v in run_metric_hooks([(name, obj)], images, prompts, reserved).items()}
            scored, _ = score(obj, images, prompts, batch_statistics(obj, every_prompt or prompts))
        return {JUDGE + name: scored.total.detach().float().cpu(),
                **{f"{JUDGE}{name}/{k}": v.detach().float().cpu() for k, v in scored.components.items()}}

    def values(self, images, prompts: list[str], every_prompt: list[str] | None = None) -> dict:
        """Every judge's values of one batch, [B] each on the CPU. `every_prompt`: the whole
        validation set's prompts, whose batch statistics a reward uses (scoring.py), so that a
        value does not depend on the batch it was scored in. Two metric judges may not log one name."""
        out = {}
        for _, kind, name, obj in self.judges:
            reserved = [k[len(JUDGE):] for k in out]
            out.update(self._values_of(kind, name, obj, images, prompts, every_prompt, reserved))
        return out

    def probe(self, prompts: list[str], resolution: int) -> list[str]:
        """On the driver, before the run: each judge once on two random images with the run's
        first prompts; a ConfigError names run.judge[i] unless it returns finite values of
        the right shapes. Returns the keys the judges give."""
        import torch

        images = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
        prompts = (list(prompts) * 2)[:2]
        keys = []
        for i, kind, name, obj in self.judges:
            try:
                values = self._values_of(kind, name, obj, images, prompts, None, [k[len(JUDGE):] for k in keys])
            except Exception as e:
                raise ConfigError(f"run.judge[{i}]: failed on two test images: {type(e).__name__}: {e}") from e
            bad = [k for k, v in values.items() if not bool(torch.isfinite(v).all())]
            if bad:
                raise ConfigError(f"run.judge[{i}]: non-finite values on two test images: {', '.join(bad)}")
            keys += list(values)
        return keys


def build_judges(run, device) -> Judges | None:
    entries = judge_entries(run.judge)
    return Judges(entries, device) if entries else None


# ------------------------------------------------------------------ the verdict


@dataclass(frozen=True)
class Verdict:
    """What the guard says after the validations so far."""

    key: str | None  # the selecting key as recorded (None: no selection)
    higher_is_better: bool
    best_step: int | None  # the validation with the best value of the key
    best_value: float
    selected_step: int | None  # the latest validation within run.select_by.within of the best: its weights are kept
    selected_value: float
    last_step: int
    last_value: float
    since_best: int  # validations after the best one
    change: float  # last - best of the key, paired per prompt (0 at the best)
    uncertainty: float | None  # two standard errors of that change
    reward_change: float | None  # the same for the training reward ("reward"), when recorded
    reward_uncertainty: float | None
    diverging: bool  # the key fell beyond its uncertainty while the reward did not fall
    stop: str | None  # why the run stops early at the last validation, or None


def paired_change(before: dict, after: dict, key: str) -> tuple[float, float | None]:
    """after - before of `key`, prompt by prompt (the same prompts and noise): the mean
    change and two standard errors."""
    a, b = before["values"].get(key), after["values"].get(key)
    if a is None or b is None or len(a) != len(b):
        return math.nan, None
    return mean_and_error(np.asarray(b, dtype=float) - np.asarray(a, dtype=float))


def _worse(change: float, uncertainty: float | None, higher_is_better: bool) -> bool:
    """A change for the worse beyond its uncertainty (with no measurable spread, any change)."""
    worse = -change if higher_is_better else change
    return math.isfinite(worse) and worse > (uncertainty or 0.0)


def _within(best: dict, record: dict, key: str, higher_is_better: bool, errors: float) -> bool:
    """`record`'s value of `key` is not worse than `best`'s by more than `errors` standard
    errors of their paired change (without per-prompt values, not worse at all)."""
    value = record["means"].get(key, math.nan)
    if not math.isfinite(value):
        return False
    change, error = paired_change(best, record, key)
    if not math.isfinite(change):
        change, error = value - best["means"][key], None
    return not _worse(change, None if error is None else error / 2 * errors, higher_is_better)  # error: 2 SE


def assess(run, records: list[dict]) -> Verdict | None:
    """The guard's verdict after `records` (validation.jsonl, in step order); None when the
    run selects nothing or has no validation yet. Ties go to the later validation.

    The selected validation is the latest one not worse than the best by more than
    run.select_by.within standard errors of their paired change. It was the selected one at
    its own validation too (the best then was the best now, and the later ones are worse
    than it beyond that width), so the worker, keeping the weights of each validation
    selected when it is made, holds the final selection's."""
    key = selection_key(run)
    if key is None or not records:
        return None
    key = resolve_key(key, records[0])
    higher = run.select_by.higher_is_better
    best, since = None, 0
    for r in records:
        value = r["means"].get(key, math.nan)
        if not math.isfinite(value):
            since += 1
            continue
        if best is None or (value >= best["means"][key] if higher else value <= best["means"][key]):
            best, since = r, 0
        else:
            since += 1
    last = records[-1]
    if best is None:  # never finite: nothing to select
        return Verdict(key, higher, None, math.nan, None, math.nan, last["step"], last["means"].get(key, math.nan),
                       since, math.nan, None, None, None, False, None)
    within = run.select_by.within
    selected = next(r for r in reversed(records) if r is best or _within(best, r, key, higher, within))
    change, error = paired_change(best, last, key)
    reward_change, reward_error = (paired_change(best, last, "reward") if "reward" in last["values"]
                                   else (None, None))
    fell = last is not best and _worse(change, error, higher)
    reward_held = reward_change is not None and math.isfinite(reward_change) and not _worse(
        reward_change, reward_error, True)
    stop = None
    e = run.early_stop
    if e.on_drop and fell:
        stop = (f"{key} fell from {best['means'][key]:.4g} (step {best['step']}) to {last['means'][key]:.4g}: "
                f"{change:+.4g} ± {error or 0:.2g}, beyond its uncertainty (run.early_stop.on_drop)")
    elif e.patience and since >= e.patience:
        stop = (f"no new best of {key} in {since} validations since step {best['step']} "
                f"(run.early_stop.patience={e.patience})")
    return Verdict(key, higher, best["step"], best["means"][key], selected["step"], selected["means"][key],
                   last["step"], last["means"].get(key, math.nan), since, change if last is not best else 0.0,
                   error if last is not best else None, reward_change, reward_error, fell and reward_held, stop)


def format_verdict(v: Verdict) -> list[str]:
    """The console's lines after a validation: the selection, and a warning when the reward
    and the key diverge."""
    if v.best_step is None:
        return [f"selection: {v.key} has no finite value yet"]
    if v.best_step == v.last_step:
        lines = [f"selection: step {v.best_step}, {v.key} {v.best_value:.4g} (the best so far)"]
    else:
        shown = f"{v.change:+.3g}" + (f" ± {v.uncertainty:.2g}" if v.uncertainty is not None else "")
        chosen = (f"step {v.selected_step}, {v.key} {v.selected_value:.4g}, within run.select_by.within of the best "
                  f"(step {v.best_step}, {v.best_value:.4g})" if v.selected_step != v.best_step
                  else f"step {v.best_step}, {v.key} {v.best_value:.4g}")
        lines = [f"selection: {chosen}; now {v.last_value:.4g} ({shown} from the best), "
                 f"{v.since_best} validation(s) without a new best"]
    if v.diverging:
        reward = f"{v.reward_change:+.3g}" + (f" ± {v.reward_uncertainty:.2g}" if v.reward_uncertainty is not None
                                              else "")
        lines.append(f"warning: the reward and {v.key} diverge since step {v.best_step}: reward {reward}, "
                     f"{v.key} {v.change:+.3g} ± {v.uncertainty or 0:.2g} (beyond its uncertainty): the reward may "
                     f"be hacked; the selected weights stay step {v.selected_step}'s")
    if v.stop:
        lines.append(f"early stop: {v.stop}")
    return lines


def tracked(v: Verdict) -> dict[str, float]:
    """The verdict's numbers for the trackers."""
    return {"guard/selected_step": float(v.selected_step) if v.selected_step is not None else math.nan,
            "guard/since_best": float(v.since_best), "guard/diverging": float(v.diverging),
            "guard/early_stop": float(v.stop is not None)}


# ------------------------------------------------------------------ best/: the selected weights


def save_best(run_dir, step: int, weights: dict, verdict: Verdict) -> None:
    """run_dir/best/ holds `weights` (the trainable weights the validation at `step` sampled
    with) and state.json; written beside it and swapped in, so a kill leaves the old or the
    new whole."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    best = Path(run_dir) / BEST
    partial = best.with_name(f".{BEST}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(partial / "weights.safetensors"))
    (partial / "state.json").write_text(json.dumps({"step": step, "key": verdict.key, "value": verdict.selected_value},
                                                   allow_nan=True) + "\n")
    old = best.with_name(f".{BEST}.old")
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    partial.rename(best)
    shutil.rmtree(old, ignore_errors=True)


def held_step(run_dir) -> int | None:
    """The step whose weights run_dir/best/ holds (None: none)."""
    import json
    from pathlib import Path

    state = Path(run_dir) / BEST / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else None


def load_best(run_dir) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / BEST / "weights.safetensors"))


def read_report(run_dir) -> dict:
    """run_dir/guard.json: {"selection": selection_record or None, "alarms": [Alarm fields]};
    empty for a run without one."""
    import json
    from pathlib import Path

    path = Path(run_dir) / REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def read_selection(run_dir) -> dict | None:
    """What the export selected (guard.json's "selection"), or None."""
    return read_report(run_dir).get("selection")


def history(run, records: list[dict]) -> list[Verdict]:
    """The verdict after each validation in turn (what the console said as the run went)."""
    verdicts = [assess(run, records[: i + 1]) for i in range(len(records))]
    return [v for v in verdicts if v is not None]


def selection_record(run, records: list[dict], ended_early: bool, exported_step: int) -> dict:
    """guard.json's selection: the last verdict, the validations it diverged at, and which step's
    weights lora/ (unet/, model/) hold."""
    verdicts = history(run, records)
    last = verdicts[-1]
    table = [{"step": r["step"], "reward": r["means"].get("reward"), "key": r["means"].get(last.key)}
             for r in records]
    return {**asdict(last), "ended_early": ended_early, "exported_step": exported_step,
            "diverged_at": [v.last_step for v in verdicts if v.diverging], "validations": table}


def format_selection(s: dict) -> list[str]:
    """The summary's lines on the selection (console and summary.md)."""
    lines = []
    if s["best_step"] is None:
        return [f"selection: {s['key']} never had a finite value; lora/ holds the last step's weights"]
    where = "lora/ (unet/, model/)"
    selected = s["selected_step"]
    held = (f"{where} holds step {s['exported_step']}'s weights: the best {s['key']} {s['best_value']:.4g} of "
            f"{len(s['validations'])} validations")
    if selected != s["best_step"]:
        held = (f"{where} holds step {selected}'s weights: {s['key']} {s['selected_value']:.4g}, the latest within "
                f"run.select_by.within of the best ({s['best_value']:.4g}, step {s['best_step']}) of "
                f"{len(s['validations'])} validations")
    if s["exported_step"] != selected:
        held = (f"{where} holds the last step's weights ({s['exported_step']}): the selected step "
                f"{selected}'s were lost with a resume")
    lines.append("selection: " + held + (f"; the last validation (step {s['last_step']}) "
                                          f"{s['last_value']:.4g}" if s["last_step"] != selected else ""))
    if s["diverged_at"]:
        lines.append(f"  the reward and {s['key']} diverged at step(s) {', '.join(map(str, s['diverged_at']))}: "
                     "the reward held or rose while the key fell beyond its uncertainty")
    if s["ended_early"]:
        lines.append(f"  stopped early at step {s['last_step']}: {s['stop']}")
    return lines


# ------------------------------------------------------------------ drift alarms (no judge needed)

DRIFT = "drift/"
# The statistics, each a value per validation image (validation keys drift/<name>):
#   brightness        mean luma (Rec. 601) in [0, 1]
#   saturation        mean HSV saturation in [0, 1]
#   contrast          standard deviation of the luma within the image
#   high_frequency    share of the luma's spectral power (its mean removed) above half the
#                     Nyquist frequency: grids, speckle and over-sharpening raise it, blur lowers it
#   colour_spread     distance of the image's mean colour from the validation set's mean
#                     colour: its mean is the colour diversity across prompts
#   feature_distance  1 - cosine of the image's embedding and its step-0 image's, in the
#                     reward's own image tower (a reward with image_embeddings, else a judge's)
STATISTICS = ("brightness", "saturation", "contrast", "high_frequency", "colour_spread", "feature_distance")


def quantized(images):
    """Images as their PNGs hold them (outputs.to_uint8, what save_images writes), so that
    step 0's, read back from validation/step_000000/, and a later validation's are measured
    alike."""
    import torch

    from longalign_rl.outputs import to_uint8

    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255


def image_statistics(images) -> dict:
    """drift/<statistic> [B] of images [B, 3, H, W] in [0, 1] (all but feature_distance)."""
    import torch

    x = images.float().clamp(0, 1)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    high, low = x.max(dim=1).values, x.min(dim=1).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-8), torch.zeros_like(high))
    centred = luma - luma.mean(dim=(1, 2), keepdim=True)
    power = torch.fft.fft2(centred).abs() ** 2
    h, w = luma.shape[1:]
    radius = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2)
    total = power.sum(dim=(1, 2))
    share = torch.where(total > 0, power[:, radius > 0.25].sum(dim=1) / total.clamp_min(1e-12), torch.zeros_like(total))
    colours = x.mean(dim=(2, 3))
    return {DRIFT + "brightness": luma.mean(dim=(1, 2)), DRIFT + "saturation": saturation.mean(dim=(1, 2)),
            DRIFT + "contrast": luma.flatten(1).std(dim=1), DRIFT + "high_frequency": share,
            DRIFT + "colour_spread": (colours - colours.mean(dim=0)).norm(dim=1)}


def first_images(run_dir):
    """The step-0 validation images as saved (validation/step_000000/NNN.png), or None."""
    from pathlib import Path

    import numpy as np
    import torch
    from PIL import Image

    folder = Path(run_dir) / "validation" / "step_000000"
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not paths:
        return None
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def image_tower(*scorers):
    """The first scorer's `image_embeddings(images [B,3,H,W] in [0,1]) -> [B, D]` (the
    CLIP-type rewards have one), or None."""
    return next((s.image_embeddings for s in scorers if callable(getattr(s, "image_embeddings", None))), None)


def drift_values(run_dir, images, embed=None, device="cpu") -> dict:
    """A validation's drift/<statistic> values [B] (the whole set at once: colour_spread is
    relative to the set), against step 0's images read back from run_dir (none yet: these
    are step 0's). `embed`: an image tower (image_tower) on `device`, for feature_distance."""
    import torch

    images = quantized(images)
    values = image_statistics(images)
    if embed is not None:
        first = first_images(run_dir)
        first = images if first is None or first.shape != images.shape else first
        with torch.no_grad():
            a = torch.nn.functional.normalize(embed(images.to(device)).float(), dim=-1)
            b = torch.nn.functional.normalize(embed(first.to(device)).float(), dim=-1)
        values[DRIFT + "feature_distance"] = (1 - (a * b).sum(dim=-1)).clamp_min(0).cpu()
    return values


@dataclass(frozen=True)
class Alarm:
    statistic: str
    step: int  # the validation it fired at
    change: float  # since step 0, paired per prompt
    uncertainty: float | None
    threshold: float

    def message(self) -> str:
        spread = f" ± {self.uncertainty:.2g}" if self.uncertainty is not None else ""
        return (f"alarm: {self.statistic} moved {self.change:+.3g}{spread} since step 0 (run.drift.{self.statistic} = "
                f"{self.threshold:g}) at step {self.step}: the validation images drift; see "
                f"validation/step_{self.step:06d}.png")


def drift_alarms(drift, records: list[dict]) -> list[Alarm]:
    """Each statistic's first validation whose paired change since the first validation (step
    0) is beyond its threshold (run.drift.<statistic>; 0 = off) and beyond its uncertainty."""
    alarms = []
    if not records:
        return alarms
    first = records[0]
    for name in STATISTICS:
        threshold = getattr(drift, name)
        if threshold <= 0:
            continue
        for r in records[1:]:
            change, error = paired_change(first, r, DRIFT + name)
            if math.isfinite(change) and abs(change) > threshold and abs(change) > (error or 0.0):
                alarms.append(Alarm(name, r["step"], change, error, threshold))
                break
    return alarms
