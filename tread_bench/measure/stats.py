"""Summaries over seeds: mean with a two-sided Student-t confidence interval.

With n seeds the interval is mean +- t_{1-(1-c)/2, n-1} * s / sqrt(n), s the sample standard deviation
(ddof=1). It assumes the seed-to-seed values are roughly normal; with 3 seeds the t quantile is large
(4.303 at 95%), so the intervals are honest about how little three runs say.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy import stats


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the t interval, n) over the finite values; half-width NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(float(v))], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, n
    t = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    return mean, t * float(x.std(ddof=1)) / math.sqrt(n), n


def summarise(prefix: str, values: Iterable[float], confidence: float = 0.95) -> dict:
    """{prefix: mean, prefix_ci95: half-width, prefix_n: n} for a table row."""
    mean, half, n = mean_ci(values, confidence)
    tag = f"ci{round(100 * confidence)}"
    return {prefix: mean, f"{prefix}_{tag}": half, f"{prefix}_n": n}


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "–"
    if not math.isfinite(half):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {half:.2g}"
