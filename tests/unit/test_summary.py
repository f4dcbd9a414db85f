"""The end-of-run summary: first vs last window, with an uncertainty that separates a real
change from step-to-step noise."""

import json

import numpy as np
import pytest

from longalign_rl.summary import format_summary, read_summary, summarize, window_size, write_summary


def records(values: dict[str, list[float]]):
    n = len(next(iter(values.values())))
    return [{"step": i + 1, **{k: v[i] for k, v in values.items()}} for i in range(n)]


def test_windows_are_the_first_and_last_quarter():
    assert [window_size(n) for n in (1, 3, 4, 24, 48)] == [1, 1, 1, 6, 12]
    s = summarize(records({"reward": list(range(8))}), ["reward"], samples_per_step=16)
    assert s["first_steps"] == [1, 2] and s["last_steps"] == [7, 8] and s["samples_per_window"] == 32
    row = s["rows"][0]
    assert (row["first"], row["last"], row["change"]) == (0.5, 6.5, 6.0)


def test_uncertainty_is_two_standard_errors_of_the_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 10), rng.normal(0, 1, 10)
    row = summarize(records({"x": [*a, *b]}), ["x"], 1)["rows"][0]
    se = np.sqrt(a[:5].var(ddof=1) / 5 + b[5:].var(ddof=1) / 5)
    assert row["uncertainty"] == pytest.approx(2 * se)


def test_a_trend_is_reported_and_noise_is_not():
    rng = np.random.default_rng(1)
    steps = 40
    rising = np.linspace(0.5, 0.8, steps) + rng.normal(0, 0.02, steps)
    flat = 0.5 + rng.normal(0, 0.05, steps)
    text = format_summary(summarize(records({"gt/shape/4": rising, "reward": flat}), ["gt/shape/4", "reward"], 16))
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert lines["gt/shape/4"].endswith("up")
    assert lines["reward"].endswith("within noise")


def test_missing_keys_and_nans_are_skipped():
    recs = records({"reward": [1.0, float("nan"), 2.0, 3.0]})
    s = summarize(recs, ["reward", "gt/absent"], 1)
    assert [r["key"] for r in s["rows"]] == ["reward"]
    assert s["rows"][0]["uncertainty"] is None  # one step per window
    assert "no uncertainty" in format_summary(s)


def test_written_next_to_the_metrics_and_read_back(tmp_path):
    recs = records({"reward": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert read_summary(tmp_path) is None
    write_summary(tmp_path, ["reward"], 16)
    text = read_summary(tmp_path)
    assert "steps 1-2 vs 7-8" in text and "0.150" in text and "0.750" in text
    assert format_summary(summarize([], ["reward"], 16)) == "summary: no steps were logged"


def test_the_one_uncertainty_formula_against_numpy():
    """mean ± 2 standard errors (ddof 1), of one sample and of a difference of two; non-finite
    values left out; one value has no spread."""
    import math

    import numpy as np

    from longalign_rl.uncertainty import difference_and_error, mean_and_error

    x = np.array([1.0, 2.0, 4.0, np.nan])
    mean, err = mean_and_error(x)
    assert mean == pytest.approx(7 / 3) and err == pytest.approx(2 * np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert mean_and_error([5.0]) == (5.0, None) and math.isnan(mean_and_error([math.inf])[0])
    change, err = difference_and_error([1.0, 3.0], [2.0, 6.0, 7.0])
    assert change == pytest.approx(5.0 - 2.0)
    assert err == pytest.approx(2 * math.sqrt(np.var([1, 3], ddof=1) / 2 + np.var([2, 6, 7], ddof=1) / 3))
    assert difference_and_error([1.0], [2.0, 3.0]) == (1.5, None)
