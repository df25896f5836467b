"""Side-by-side timing shared by the benchmarks: interleaved, best-of blocks."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable


def time_rounds(
    fns: dict[str, Callable[[], object]],
    budget_s: float,
    *,
    block_s: float | None = None,
    max_reps: int = 2000,
    min_rounds: int = 3,
    max_rounds: int = 20,
    rewarm: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Milliseconds per call of each function in every round, timed round-robin in
    ~``block_s`` blocks.

    Functions take turns, so a change in machine load hits all of them alike: round ``i``
    of two functions was measured side by side. With ``rewarm`` each block starts with
    one untimed call (the function's data back in cache). ``clock`` reads the time (e.g.
    ``time.thread_time``: the calling thread's CPU time, blind to other processes' load).
    ``block_s`` defaults to 20 ms, or a quarter of ``budget_s`` if that is less: a small
    budget (a smoke run) still times its rounds in about the budget.
    """
    if block_s is None:
        block_s = min(0.02, budget_s / 4)
    reps = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        reps[name] = max(1, min(max_reps, int(block_s / max(time.perf_counter() - start, 1e-7))))
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for rnd in range(max_rounds):
        for name, fn in fns.items():
            if rewarm:
                fn()
            t0 = clock()
            for _ in range(reps[name]):
                fn()
            rounds[name].append((clock() - t0) / reps[name] * 1e3)
        if rnd >= min_rounds - 1 and time.perf_counter() - start > budget_s:
            break
    return rounds


def time_ms(fns: dict[str, Callable[[], object]], budget_s: float, **kwargs: object
            ) -> dict[str, float]:
    """Best milliseconds per call of each function over :func:`time_rounds` (same
    keyword arguments)."""
    return {k: min(v, default=math.inf) for k, v in time_rounds(fns, budget_s, **kwargs).items()}


def median_ratios(rounds: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Per function, the median over rounds of ``baseline``'s time over its own in the same
    round: a speed-up that load moving between rounds does not bias."""
    base = rounds[baseline]
    return {k: statistics.median(b / t for b, t in zip(base, v)) for k, v in rounds.items()}
