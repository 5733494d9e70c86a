"""Wall-clock timing of a callable: the median of repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(run: Callable[[], object], repeat: int, warmup: int = 2,
              min_seconds: float = 0.0) -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeat`` runs after ``warmup``,
    continued until the runs have taken ``min_seconds`` in all: a few runs of a short call
    measure a moment of a shared machine, not its speed."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    while len(times) < repeat or sum(times) < min_seconds:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
