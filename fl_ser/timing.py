"""Timing a call on a busy machine: the best of several medians (the benchmarks and the device's own --time)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def best_median_seconds(fn: Callable[[], object], calls: int = 21, repeats: int = 5, warmup: int = 3) -> float:
    """The best of ``repeats`` medians, each over ``calls`` timed runs of ``fn`` (after ``warmup`` untimed runs):
    the median ignores a repeat's outliers, the best repeat the minutes when other work held the core."""
    for _ in range(warmup):
        fn()
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians)
