"""Wall-clock timing of a callable: the median of repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(run: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeat`` runs, after ``warmup``."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
