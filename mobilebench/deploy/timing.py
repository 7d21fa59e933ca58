"""Wall-clock latency of several runners measured side by side.

The runners take turns in rounds (A B C, A B C, ...), each turn a chunk of calls, so a burst of load
from another process slows all of them alike and the ratios between them stay meaningful on a shared
machine. Turns are chunks rather than single calls because PyTorch's OpenMP threads and
onnxruntime's thread pool both spin for a while after finishing: alternating call by call makes
each runner compete with the other's spinning threads, which on 2 cores inflated PyTorch's batch-32
latency tenfold. The first call of every turn is untimed for the same reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def time_interleaved(runners: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each runner: `warmup` untimed calls each, then `repeats` timed calls in `rounds` turns."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    rounds = max(1, min(rounds, repeats))
    chunk = math.ceil(repeats / rounds)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run()  # settles this runner's thread pool after the previous runner's turn
            for _ in range(min(chunk, repeats - len(times[name]))):
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
