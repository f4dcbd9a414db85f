"""Means with their uncertainty, as every comparison in the project reports them: the mean
and two standard errors (about a 95 % interval for the mean of many samples). One home for
the formula that summary.json (first vs last window), validation (paired per-prompt
changes) and `longalign-rl evaluate` print. Pure numpy."""

from __future__ import annotations

import math

import numpy as np


def mean_and_error(values) -> tuple[float, float | None]:
    """The mean of the finite `values` and two standard errors of it (None with fewer than two
    values: no spread to measure); NaN and None for no finite value."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, None
    return float(v.mean()), (2 * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else None)


def difference_and_error(before, after) -> tuple[float, float | None]:
    """mean(after) - mean(before) of two independent samples (finite values only), and two
    standard errors of that difference; None where either has fewer than two values."""
    a, b = (np.asarray(x, dtype=float) for x in (before, after))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        return math.nan, None
    spread = 2 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) if len(a) > 1 and len(b) > 1 else None
    return float(b.mean() - a.mean()), spread
