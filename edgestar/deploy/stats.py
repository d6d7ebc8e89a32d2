"""Latency statistics, and speed-ups measured the way a noisy machine allows.

Absolute milliseconds move with everything else a machine does; the ratio of two models timed
in the same round (side by side, within milliseconds of each other) does not. So a speed-up is
the median of per-round ratios, with the 10th-90th percentile of those ratios as its spread.
"""
from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def latency_stats(samples_ms: list[float]) -> dict:
    """count, mean, median, p90, min, max and standard deviation in milliseconds. The standard
    deviation is the population one (divide by n), as TFLite's benchmark_model prints it."""
    if not samples_ms:
        raise ValueError("no samples")
    return {
        "count": len(samples_ms),
        "mean_ms": round(statistics.fmean(samples_ms), 4),
        "median_ms": round(statistics.median(samples_ms), 4),
        "p90_ms": round(percentile(samples_ms, 90), 4),
        "min_ms": round(min(samples_ms), 4),
        "max_ms": round(max(samples_ms), 4),
        "std_ms": round(statistics.pstdev(samples_ms), 4),
    }


def speedup(reference_ms: list[float], model_ms: list[float]) -> dict | None:
    """How many times faster ``model`` ran than ``reference``, from per-round pairs
    (``reference_ms[i]`` and ``model_ms[i]`` were timed in the same round): the median of
    ``reference/model`` and its 10th-90th percentile. None without pairs."""
    ratios = [r / m for r, m in zip(reference_ms, model_ms) if m > 0]
    if not ratios:
        return None
    return {"median": round(statistics.median(ratios), 4),
            "p10": round(percentile(ratios, 10), 4),
            "p90": round(percentile(ratios, 90), 4),
            "rounds": len(ratios)}


def format_speedup(s: dict | None) -> str:
    if not s:
        return "-"
    return f"x{s['median']:.2f} ({s['p10']:.2f}-{s['p90']:.2f})"
