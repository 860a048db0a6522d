"""Timing and machine description shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


def interleaved_ratio(numerator: Callable[[], object], denominator: Callable[[], object], repeats: int = 7) -> tuple:
    """Median times of two jobs measured alternately (so machine noise hits both), and their ratio."""
    numerator(), denominator()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((numerator, a), (denominator, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    ma, mb = statistics.median(a), statistics.median(b)
    return ma, mb, ma / mb


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "cpu": cpu, "ram_gb": round(ram, 1), "python": platform.python_version()}
