"""Small statistics: percentiles, latency summaries, medians over repetitions, a linear fit."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``xs`` (sorted or not); NaN when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return s[k]


def latency(
    lat_s: Sequence[float], wall_s: float | None = None, n: int | None = None
) -> dict[str, Any]:
    """p50/p99/max in microseconds and, given the wall time, pairs per second."""
    s = sorted(lat_s)
    out: dict[str, Any] = {
        "n": len(s),
        "p50_us": pct(s, 50) * 1e6,
        "p99_us": pct(s, 99) * 1e6,
        "max_us": (s[-1] * 1e6) if s else math.nan,
    }
    if wall_s:
        out["per_s"] = (n if n is not None else len(s)) / wall_s
    return out


def median(values: Sequence[float | None]) -> float:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(xs) if xs else math.nan


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares y = a + b x, with R^2 (how linear recovery time is in the lease count)."""
    n = len(xs)
    if n < 2:
        return {"intercept": math.nan, "slope": math.nan, "r2": math.nan}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx if sxx else math.nan
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"intercept": a, "slope": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}
