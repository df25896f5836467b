"""Autotuning: time a layer's formats against dense and choose one that noise cannot fake.

:func:`measure` times the compiled modules themselves (wrapper and kernel launch included)
at every row count the layer will serve. The timing is interleaved: in each round every
format runs one block of calls, starting warm, in an order that rotates from round to
round, so a change in machine load hits all formats alike; each format keeps one time per
round. :func:`choose` then applies the rule below and returns the choice with its evidence.

A sparse format replaces dense only if, at **every** served row count, its median time is
no slower than dense's, and at one row count at least it **wins**: its median is at least
:data:`MARGIN` below dense's *and* it was that much faster than dense in a majority of the
rounds (each round compared with dense's time of the same round). A single lucky block, or
a few percent that the machine's noise can produce, never replaces dense. Among the
formats that qualify, the one with the lowest geometric mean of its time ratio to dense
over the row counts wins, so decode (1 row) counts as much as prefill (many rows). When
the caller excludes dense (forced formats) the fastest allowed format is taken; dense is
still timed, as the reference of the evidence.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["MARGIN", "Samples", "choose", "measure"]

MARGIN = 0.05
"""How much faster than dense (5 %) a format must be, in the median and in most rounds."""

Samples = dict[int, dict[str, list[float]]]
"""Milliseconds per call: row count → format → one time per round."""

_BLOCK_S = 2e-3  # one timed block: enough calls to make timer resolution negligible
_ROUND_BUDGET_S = 0.04  # per format and row count; big layers still get _MIN_ROUNDS
_MIN_ROUNDS, _MAX_ROUNDS = 5, 15


def measure(
    modules: Mapping[str, nn.Module],
    in_shape: tuple[int, ...],
    rows: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> Samples:
    """Milliseconds per call of each of ``modules`` (by format name) for inputs of shape
    ``(r, *in_shape)``, ``r`` in ``rows``, one time per interleaved round."""
    samples: Samples = {}
    names = list(modules)
    for r in rows:
        x = torch.randn(r, *in_shape, dtype=dtype, device=device)
        reps = {n: _calls_per_block(modules[n], x) for n in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        spent = 0.0
        for i in range(_MAX_ROUNDS):
            for n in names[i % len(names):] + names[: i % len(names)]:  # rotating order
                modules[n](x)  # bring this format's weight back into cache: the others evicted it
                seconds = _time_block(modules[n], x, reps[n])
                times[n].append(seconds * 1e3)
                spent += seconds * reps[n]
            if i + 1 >= _MIN_ROUNDS and spent > _ROUND_BUDGET_S * len(names):
                break
        samples[r] = times
    return samples


def choose(
    samples: Samples, allowed: Sequence[str], *, dense_allowed: bool = True
) -> tuple[str, dict[str, object]]:
    """The format to use among ``allowed`` (all timed in ``samples``, as is ``"dense"``) and
    the record of the choice.

    The record holds ``format``, ``rows``, ``ms_dense`` and ``ms_chosen`` (median times
    summed over the row counts), ``speedup``, ``times_ms`` (format → row count → median),
    ``evidence`` (row count → ``ms_dense``, ``ms_chosen``, ``rounds``, ``wins``: rounds in
    which the chosen format beat dense by the margin, ``spread``: the larger relative range
    (max − min) / median of the two formats' round times), ``margin`` and ``forced``.
    """
    timed = next(iter(samples.values()))  # every format timed, "dense" among them
    medians = {
        n: {r: statistics.median(per_format[n]) for r, per_format in samples.items()}
        for n in timed
    }
    ratio = {n: _geomean([t[r] / max(medians["dense"][r], 1e-12) for r in t])
             for n, t in medians.items()}
    if dense_allowed:
        eligible = [n for n in allowed if n == "dense" or _replaces_dense(samples, n)]
        eligible = eligible or ["dense"]
    else:
        eligible = [n for n in allowed if n != "dense"]
    best = min(eligible, key=ratio.__getitem__)
    total = {n: sum(medians[n].values()) for n in ("dense", best)}
    evidence = {
        r: {
            "ms_dense": medians["dense"][r],
            "ms_chosen": medians[best][r],
            "rounds": len(per_format[best]),
            "wins": _wins(per_format[best], per_format["dense"]),
            "spread": max(_spread(per_format[best]), _spread(per_format["dense"])),
        }
        for r, per_format in samples.items()
    }
    return best, {
        "format": best,
        "rows": list(samples),
        "ms_dense": total["dense"],
        "ms_chosen": total[best],
        "speedup": total["dense"] / total[best] if total[best] > 0 else 1.0,
        "times_ms": medians,
        "evidence": evidence,
        "margin": MARGIN,
        "forced": not dense_allowed,
    }


def _replaces_dense(samples: Samples, name: str) -> bool:
    """No slower than dense in the median at every row count, and a win at one at least."""
    won = False
    for per_format in samples.values():
        mine, dense = per_format[name], per_format["dense"]
        if statistics.median(mine) > statistics.median(dense):
            return False
        won = won or (
            statistics.median(mine) <= (1 - MARGIN) * statistics.median(dense)
            and 2 * _wins(mine, dense) > len(mine)
        )
    return won


def _wins(mine: list[float], dense: list[float]) -> int:
    """Rounds in which ``mine`` was faster than dense by the margin."""
    return sum(m <= (1 - MARGIN) * d for m, d in zip(mine, dense, strict=True))


def _spread(times: list[float]) -> float:
    median = statistics.median(times)
    return (max(times) - min(times)) / median if median > 0 else 0.0


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))


def _calls_per_block(module: nn.Module, x: torch.Tensor) -> int:
    module(x)  # warm-up: first-call allocations, lazy CSR construction, kernel workspace
    once = _time_block(module, x, 1)
    return max(1, min(1000, int(_BLOCK_S / max(once, 1e-7))))


def _time_block(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Seconds per call of ``module(x)``, over ``reps`` calls (the one clock tests replace)."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    for _ in range(reps):
        module(x)
    if cuda:
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) / reps
