"""Wall-clock latency of several runners measured side by side.

The runners are called round-robin (one call each per round) rather than one after another, so a
burst of load from another process slows all of them alike and the ratios between them stay
meaningful on a shared machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def time_interleaved(runners: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each runner: `warmup` untimed calls each, then `repeats` timed rounds."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(seconds: list[float], batch_size: int) -> dict[str, float]:
    """Median and p90 milliseconds per batch, plus the fastest call and throughput at the median."""
    ms = np.asarray(seconds) * 1000.0
    median = float(np.median(ms))
    return {"median_ms": round(median, 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "min_ms": round(float(ms.min()), 3), "images_per_s": round(batch_size / median * 1000.0, 1),
            "repeats": len(ms)}
