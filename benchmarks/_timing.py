"""Side-by-side timing shared by the benchmarks: interleaved, best-of blocks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def time_ms(
    fns: dict[str, Callable[[], object]],
    budget_s: float,
    *,
    block_s: float = 0.02,
    max_reps: int = 2000,
    min_rounds: int = 3,
    max_rounds: int = 20,
    rewarm: bool = False,
) -> dict[str, float]:
    """Best milliseconds per call of each function, timed round-robin in ~``block_s`` blocks.

    Functions take turns, so a change in machine load hits all of them alike. With
    ``rewarm`` each block starts with one untimed call (the function's data back in cache).
    """
    reps = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        reps[name] = max(1, min(max_reps, int(block_s / max(time.perf_counter() - start, 1e-7))))
    best = dict.fromkeys(fns, math.inf)
    start = time.perf_counter()
    for rnd in range(max_rounds):
        for name, fn in fns.items():
            if rewarm:
                fn()
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / reps[name])
        if rnd >= min_rounds - 1 and time.perf_counter() - start > budget_s:
            break
    return {k: v * 1e3 for k, v in best.items()}
