"""Did the run help? The first and the last window of a run's metrics, side by side.

At the end of a run, rank 0 writes `summary.json` and `summary.md` from metrics.jsonl and
validation.jsonl, and the driver prints it: for the reward, its two parts and every metric
hook (a world's ground truth), the mean over the first and over the last quarter of the
steps, the change, and the change's uncertainty (two standard errors, from the
step-to-step spread within each window); and the last validation against the first,
prompt by prompt (validation.py). A change inside its uncertainty is reported as noise,
not as progress. Pure: no ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longalign_rl.outputs import METRICS, read_jsonl
from longalign_rl.uncertainty import difference_and_error

FILE = "summary.json"
MARKDOWN = "summary.md"


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
        change, spread = difference_and_error(a, b)
        rows.append({"key": key, "first": float(a.mean()), "last": float(b.mean()), "change": change,
                     "uncertainty": spread})
    return {"steps": len(records), "window": n, "samples_per_window": n * samples_per_step,
            "first_steps": [first[0]["step"], first[-1]["step"]] if first else [],
            "last_steps": [last[0]["step"], last[-1]["step"]] if last else [], "rows": rows}


def verdict(row: dict) -> str:
    if row["uncertainty"] is None:
        return "(one step per window: no uncertainty)"
    if abs(row["change"]) <= row["uncertainty"]:
        return "within noise"
    return "up" if row["change"] > 0 else "down"


def _change(r: dict) -> str:
    return f"{r['change']:+.3f}" + (f" ± {r['uncertainty']:.3f}" if r["uncertainty"] is not None else "")


def format_summary(summary: dict) -> str:
    lines = []
    if summary["rows"]:
        f, l = summary["first_steps"], summary["last_steps"]
        width = max(len(r["key"]) for r in summary["rows"])
        lines.append(f"first vs last window: steps {f[0]}-{f[1]} vs {l[0]}-{l[1]} "
                     f"({summary['samples_per_window']} samples each); change ± 2 standard errors")
        for r in summary["rows"]:
            lines.append(f"  {r['key']:<{width}}  {r['first']:8.3f} -> {r['last']:8.3f}   {_change(r):<18} {verdict(r)}")
    v = summary.get("validation")
    if v and v["rows"]:
        width = max(len(r["key"]) for r in v["rows"])
        lines.append(f"validation: the same {v['prompts']} prompts and seeds at step {v['first_step']} vs step "
                     f"{v['last_step']}; change ± 2 standard errors of the per-prompt changes")
        for r in v["rows"]:
            lines.append(f"  {r['key']:<{width}}  {r['first']:8.3f} -> {r['last']:8.3f}   {_change(r):<18} {verdict(r)}")
    if summary.get("selection"):
        from longalign_rl.guard import format_selection

        lines += format_selection(summary["selection"])
    lines += [_alarm_line(a) for a in summary.get("alarms", [])]
    return "\n".join(lines) or "summary: no steps were logged"


def _alarm_line(a: dict) -> str:
    spread = f" ± {a['uncertainty']:.2g}" if a["uncertainty"] is not None else ""
    return (f"drift alarm: {a['statistic']} {a['change']:+.3g}{spread} since step 0 at step {a['step']} "
            f"(threshold {a['threshold']:g})")


def format_markdown(summary: dict, run_dir: Path) -> str:
    """summary.md: the same tables for a reader, with the last validation grid."""
    lines = [f"# Run `{run_dir.name}`", ""]
    if summary["rows"]:
        f, l = summary["first_steps"], summary["last_steps"]
        lines += [f"{summary['steps']} steps. Training batches, first vs last quarter: steps {f[0]}-{f[1]} vs "
                  f"{l[0]}-{l[1]} ({summary['samples_per_window']} samples each; ± 2 standard errors of the "
                  "step-to-step spread).", "",
                  "| metric | first | last | change | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r['key']} | {r['first']:.4f} | {r['last']:.4f} | {_change(r)} | {verdict(r)} |"
                  for r in summary["rows"]]
    else:
        lines.append("No steps were logged.")
    v = summary.get("validation")
    if v and v["rows"]:
        grid = f"validation/step_{v['last_step']:06d}.png"
        lines += ["", f"## Validation: the same {v['prompts']} prompts and seeds, step {v['first_step']} vs step "
                  f"{v['last_step']}", "",
                  "± 2 standard errors of the per-prompt changes (validation.jsonl has every value).", "",
                  "| metric | step {} | step {} | change | verdict |".format(v["first_step"], v["last_step"]),
                  "|---|---|---|---|---|"]
        lines += [f"| {r['key']} | {r['first']:.4f} | {r['last']:.4f} | {_change(r)} | {verdict(r)} |"
                  for r in v["rows"]]
        if (run_dir / grid).is_file():
            lines += ["", f"![each prompt at step {v['first_step']} (left) and step {v['last_step']} (right)]({grid})",
                      "", "Prompts: `validation/prompts.txt`."]
    if summary.get("selection"):
        lines += ["", *selection_markdown(summary["selection"])]
    if summary.get("alarms"):
        lines += ["", "## Drift alarms (run.drift)", "",
                  "Statistics of the validation images against step 0's, the same prompts and noise; each fires once, "
                  "at the first validation beyond its threshold and its uncertainty (± 2 standard errors of the "
                  "per-prompt changes).", "", "| statistic | step | change since step 0 | threshold |",
                  "|---|---|---|---|"]
        lines += [f"| {a['statistic']} | {a['step']} | {a['change']:+.4f}"
                  + (f" ± {a['uncertainty']:.4f}" if a["uncertainty"] is not None else "")
                  + f" | {a['threshold']:g} |" for a in summary["alarms"]]
    return "\n".join(lines) + "\n"


def selection_markdown(s: dict) -> list[str]:
    """summary.md's guard section: what was selected, and the training reward beside the
    selecting key at every validation."""
    from longalign_rl.guard import format_selection

    lines = ["## Selection (run.select_by)", "", *[line.strip() for line in format_selection(s)], "",
             f"| validation step | reward (trained on) | {s['key']} | |", "|---|---|---|---|"]
    diverged = set(s["diverged_at"])
    for row in s["validations"]:
        mark = "selected" if row["step"] == s["exported_step"] else ("diverging" if row["step"] in diverged else "")
        reward = f"{row['reward']:.4f}" if isinstance(row["reward"], (int, float)) else ""
        key = f"{row['key']:.4f}" if isinstance(row["key"], (int, float)) else ""
        lines.append(f"| {row['step']} | {reward} | {key} | {mark} |")
    return lines


def write_summary(run_dir: str | Path, keys: list[str] | tuple[str, ...], samples_per_step: int) -> dict:
    """summary.json and summary.md from run_dir/metrics.jsonl (the whole run, resumed parts
    included) and validation.jsonl (first vs last validation)."""
    from longalign_rl.validation import compare, read

    run_dir = Path(run_dir)
    path = run_dir / METRICS
    records = read_jsonl(path)  # a cut last line is left out
    summary = summarize(records, keys, samples_per_step)
    validation = compare(read(run_dir))
    if validation:
        summary["validation"] = validation
    from longalign_rl.guard import read_report

    report = read_report(run_dir)  # guard.json, written by the export just before (guard.py)
    if report.get("selection"):
        summary["selection"] = report["selection"]
    if report.get("alarms"):
        summary["alarms"] = report["alarms"]
    (run_dir / FILE).write_text(json.dumps(summary, indent=1) + "\n")
    (run_dir / MARKDOWN).write_text(format_markdown(summary, run_dir))
    return summary


def read_summary(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / FILE
    return format_summary(json.loads(path.read_text())) if path.is_file() else None
