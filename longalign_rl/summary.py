"""Did the run help? The first and the last window of a run's metrics, side by side.

At the end of a run, rank 0 writes `summary.json` from metrics.jsonl and the driver prints
it: for the reward, its two parts and every metric hook (a world's ground truth), the mean
over the first and over the last quarter of the steps, the change, and the change's
uncertainty (two standard errors, from the step-to-step spread within each window). A
change inside its uncertainty is reported as noise, not as progress. Pure: no ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FILE = "summary.json"


def window_size(steps: int) -> int:
    """A quarter of the run, at least one step."""
    return max(1, steps // 4)


def summarize(records: list[dict], keys: list[str] | tuple[str, ...], samples_per_step: int) -> dict:
    """First vs last window of each key present in `records` (one dict per step)."""
    n = window_size(len(records))
    first, last = records[:n], records[-n:]
    rows = []
    for key in keys:
        a = np.array([r[key] for r in first if isinstance(r.get(key), (int, float))], dtype=float)
        b = np.array([r[key] for r in last if isinstance(r.get(key), (int, float))], dtype=float)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) == 0 or len(b) == 0:
            continue
        spread = (2 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
                  if len(a) > 1 and len(b) > 1 else None)
        rows.append({"key": key, "first": float(a.mean()), "last": float(b.mean()),
                     "change": float(b.mean() - a.mean()), "uncertainty": spread})
    return {"steps": len(records), "window": n, "samples_per_window": n * samples_per_step,
            "first_steps": [first[0]["step"], first[-1]["step"]] if first else [],
            "last_steps": [last[0]["step"], last[-1]["step"]] if last else [], "rows": rows}


def verdict(row: dict) -> str:
    if row["uncertainty"] is None:
        return "(one step per window: no uncertainty)"
    if abs(row["change"]) <= row["uncertainty"]:
        return "within noise"
    return "up" if row["change"] > 0 else "down"


def format_summary(summary: dict) -> str:
    if not summary["rows"]:
        return "summary: no steps were logged"
    f, l = summary["first_steps"], summary["last_steps"]
    width = max(len(r["key"]) for r in summary["rows"])
    lines = [f"first vs last window: steps {f[0]}-{f[1]} vs {l[0]}-{l[1]} "
             f"({summary['samples_per_window']} samples each); change ± 2 standard errors"]
    for r in summary["rows"]:
        change = f"{r['change']:+.3f}" + (f" ± {r['uncertainty']:.3f}" if r["uncertainty"] is not None else "")
        lines.append(f"  {r['key']:<{width}}  {r['first']:8.3f} -> {r['last']:8.3f}   {change:<18} {verdict(r)}")
    return "\n".join(lines)


def write_summary(run_dir: str | Path, keys: list[str] | tuple[str, ...], samples_per_step: int) -> dict:
    """summary.json from run_dir/metrics.jsonl (the whole run, resumed parts included)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    summary = summarize(records, keys, samples_per_step)
    (run_dir / FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def read_summary(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / FILE
    return format_summary(json.loads(path.read_text())) if path.is_file() else None
