"""Timing helpers shared by the benchmarks (each benchmark runs as a script from this folder)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

__all__ = ["best", "best_of"]


def best(fn: Callable[[], object], repeat: int = 7, number: int = 1) -> float:
    """The best time of ``repeat`` runs of ``number`` calls, per call."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times)


async def best_of(n: int, fn: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """The best and the median time of ``n`` awaits of ``fn()``."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)
