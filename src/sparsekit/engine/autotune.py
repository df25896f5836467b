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
no single format wins at every row count, ``choose(..., split=True)`` may pick two: one
for the row counts up to a threshold and one above it, each passing the rule on the row
counts it serves. When the caller excludes dense (forced formats) the fastest allowed
format is taken; dense is still timed, as the reference of the evidence. The reference
need not be dense: a fused group of projections is timed against its separate layers, with
``choose(..., tolerant=True)``: there "no slower" means the reference did not *win* by the
rule above. Both paths have already passed the rule against dense at every row count (each
separate layer on its own, the stacked layer as one), and at the prompt's row counts they do
the same work, so a strict comparison of their medians there is a coin flip that a group
had to win on top of its decode timing: in one compile of a 4-layer LLaMA (hidden 2048,
50 % int8, two threads, Intel Xeon) a q/k/v group timed 1.12x faster for one row stayed
separate on a 1.8 % difference at 128 rows (a spread of 43 % between rounds). (Timed again
on a quiet machine, fusing those groups gained nothing at one row there either.)

Inside :func:`cold_cache` (which :func:`~sparsekit.engine.compile` enters when the model's
weights do not fit in the cache, :func:`effective_cache_bytes`, and keeps when its caller
entered it), row counts up to :data:`COLD_ROWS` are timed *cold*: before every timed call
:data:`TOUCH_BYTES` of other data are read and the timed layer's own tensors evicted
(:func:`~sparsekit.engine.kernels.flush_cache`), as in batch-1 decode of such a model,
where each layer's weights come from memory after the other layers'. Timed warm,
a layer that fits in the cache on its own would favour the format with the least decoding
work over the one with the fewest bytes, which is the wrong choice for the model it
belongs to.

The cache that counts is the one a working set can hold, not the one the CPU reports: a
virtual machine on a large server sees the whole socket's last-level cache (480 MiB on one
Intel Xeon here) while other tenants keep most of it, and a 200 MB int8 model that
"fits" was then timed warm, where dense int8 wins, and decoded from memory, where the
sparse formats would have won. :func:`effective_cache_bytes` measures it once per process.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import numbers
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_bool, check_int
from sparsekit.engine import kernels

__all__ = ["COLD_ROWS", "MARGIN", "MAX_ROWS", "Samples", "available_cpus", "check_rows", "choose",
           "cold_cache", "effective_cache_bytes", "last_level_cache_bytes", "measure",
           "warn_oversubscribed"]

MARGIN = 0.05
"""How much faster than dense (5 %) a format must be, in the median and in most rounds."""

MAX_ROWS = 2**20
"""The most rows a layer is timed at (``rows``). Each layer is timed on random inputs of
every row count, so a row count costs memory in proportion: 2**20 rows of a 4096-wide
float32 layer are 16 GiB of input, and more than any batch × sequence one call serves."""

Samples = dict[int, dict[str, list[float]]]
"""Milliseconds per call: row count → format → one time per round."""

_BLOCK_S = 2e-3  # one timed block: enough calls to make timer resolution negligible
_ROUND_BUDGET_S = 0.04  # per format and row count; big layers still get _MIN_ROUNDS
_MIN_ROUNDS, _MAX_ROUNDS = 5, 15
_COLD_REPS = 3  # calls per cold round (2 for calls over 1/3 of a block), the fastest counts
_PARTS = 3  # a warm block is timed in this many parts: the fastest counts

COLD_ROWS = 8
"""Row counts up to this one are timed with a cold cache inside :func:`cold_cache`."""

_cold = False
_flush: torch.Tensor | None = None  # read by _evict; released when cold_cache ends
TOUCH_BYTES = 64 << 20
"""A cold call follows a read of this many bytes of other data, then a flush of the timed
layer (:func:`_evict`)."""
FLUSH_FACTOR = 4
"""Where nothing can be flushed, a cold call follows a read of this many times
:func:`effective_cache_bytes` instead."""
_WAKE_GRAIN = 32768  # elements per thread of a parallel elementwise op (torch's grain)


@contextlib.contextmanager
def cold_cache(enabled: bool = True) -> Iterator[None]:
    """Time row counts up to :data:`COLD_ROWS` with the cache flushed before every call
    (``enabled``) inside the block; the previous setting is restored after it."""
    global _cold, _flush
    check_bool("enabled", enabled)
    before, _cold = _cold, enabled
    try:
        yield
    finally:
        _cold = before
        if not before:
            _flush = None  # several times the cache: not kept beyond the timing


def cold() -> bool:
    """Whether :func:`measure` times small row counts cold now (:func:`cold_cache`)."""
    return _cold


@functools.cache
def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine in bytes, as the CPU reports it (from sysfs;
    32 MiB where unknown)."""
    return max(_cache_sizes(), default=32 << 20)


def _cache_sizes() -> list[int]:
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return sizes


CACHE_SPEEDUP = 1.5
"""A working set counts as cached while one thread reads it no more than this much slower
than one twice the next-to-last cache (which the last-level cache surely holds)."""


def effective_cache_bytes() -> int:
    """How large a working set this machine's caches hold, in bytes: the largest of the
    sizes 2^k times twice the next-to-last cache, up to the reported last-level cache,
    that one thread reads at least 1 / :data:`CACHE_SPEEDUP` as fast as the smallest
    (``torch.sum`` of a warm float32 buffer, best of a few passes; measured once per
    process, well under a second where the cache is small)."""
    llc = last_level_cache_bytes()
    below = max((s for s in _cache_sizes() if s < llc), default=llc // 16)
    return _measured_cache(llc, max(2 * below, 1 << 20))


@functools.cache
def _measured_cache(llc: int, smallest: int) -> int:
    if smallest >= llc:
        return llc
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cached = _read_rate(smallest)
        fits, size = smallest, 2 * smallest
        while size <= llc and CACHE_SPEEDUP * _read_rate(size) >= cached:
            fits, size = size, 2 * size
        return llc if size > llc else fits
    finally:
        torch.set_num_threads(threads)


def _read_rate(size: int) -> float:
    """Bytes per second one thread reads from a warm buffer of ``size`` bytes (best pass)."""
    buffer = torch.ones(max(size // 4, 1), dtype=torch.float32)
    buffer.sum()
    best = math.inf
    for _ in range(max(3, min(16, (256 << 20) // size))):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return size / max(best, 1e-9)


def _evict(module: nn.Module) -> None:
    """Push what the last call of ``module`` left in the caches out to memory, then wake the
    threads: the next call starts as a layer of a decode step does, its weights in memory
    and the OpenMP threads running (the layers before it kept them busy).

    ``module``'s own tensors are flushed (:func:`~sparsekit.engine.kernels.flush_cache`)
    after a read of :data:`TOUCH_BYTES` of other data, which stands for the layers before it:
    it evicts the private caches and the address translations, as their weights do. A read
    alone did not evict a layer reliably from a large last-level cache, which keeps lines it
    sees reused (a 5632 x 2048 dense int8 product timed 0.43 ms after it in one process and
    0.24 ms in the next on an Intel Xeon with a 300 MiB L3; 0.41-0.43 ms in both with the
    flush). With the flush the read need not cover the cache: on that Xeon the cold calls of
    seven formats of that layer (fp32 to W8A8, dense to 90 % CSR) took within 3 % of their
    times after reading four times its 300 MiB (40 ms a call, 76-87 % of a cold compile of a
    4-layer 2048/5632 LLaMA), 2-10 % less with no read at all.

    Where nothing can be flushed (no kernels, or a CPU without a flush instruction) the read
    covers :data:`FLUSH_FACTOR` times the cache a working set can hold
    (:func:`effective_cache_bytes`) instead. Twice that, written, left part of a layer in the
    last-level cache, which keeps lines used again and again past one scan: on an AMD Zen 4
    (32 MiB L3, 16 MiB effective) a 5632 x 2048 dense int8 product then took 0.17-0.30 ms
    cold against 0.39-0.44 ms among other layers' products, as in a model, and compile took
    it over a bitmap that ran 0.23 ms there; four times, read, gave 0.41 (the bitmap 0.25).
    The wake is one tiny parallel op: after the flush, a kernel's first parallel region
    waited for its sleeping second thread (0.28 ms cold against 0.23 with the wake, two
    threads)."""
    global _flush
    tensors = [t for t in itertools.chain(module.parameters(), module.buffers())
               if t.device.type == "cpu" and t.layout == torch.strided]
    if _flush is None:
        flushes = kernels.flush_cache(tensors[:0])  # whether this machine can flush at all
        size = TOUCH_BYTES if flushes else FLUSH_FACTOR * effective_cache_bytes()
        _flush = torch.ones(size // 4, dtype=torch.float32)
    _flush.sum()
    kernels.flush_cache(tensors)
    torch.zeros(_WAKE_GRAIN * torch.get_num_threads()).add_(1.0)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as ``taskset`` or a container's
    cpuset limit it; ``os.cpu_count()`` where the platform has no affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def warn_oversubscribed(threads: int | None, stacklevel: int = 2) -> None:
    """Warn when kernels of ``threads`` threads (``None``: ``torch.get_num_threads()``)
    would be timed on fewer CPUs than threads. OpenMP threads that wait at a barrier for one
    without a CPU stall the whole call: on 2 CPUs, 2-thread kernels timed beside other busy
    processes ran 10-40x slower and in erratic order, and the formats chosen from such
    timings are noise. ``stacklevel`` is :func:`warnings.warn`'s, counted from the caller."""
    wanted = torch.get_num_threads() if threads is None else threads
    cpus = available_cpus()
    if wanted > cpus:
        warnings.warn(f"threads={wanted} exceed the {cpus} CPU(s) this process may run on: "
                      "the kernels are timed (and would run) oversubscribed, and the formats "
                      f"chosen from those timings are noise; pass threads={cpus} or fewer (or "
                      "torch.set_num_threads)", UserWarning, stacklevel=stacklevel + 1)


def measure(
    modules: Mapping[str, nn.Module],
    in_shape: tuple[int, ...],
    rows: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    inputs: torch.Tensor | None = None,
    *,
    reference: str = "dense",
    every_round: bool = False,
) -> Samples:
    """Milliseconds per call of each of ``modules`` (by format name) for inputs of shape
    ``(r, *in_shape)``, ``r`` in ``rows``, one time per interleaved round: random normal
    ones, or the first ``r`` of ``inputs`` (``(n, *in_shape)``, repeated as needed) where
    the time depends on the values (e.g. an activation-sparse layer). ``every_round`` runs
    all :data:`_MAX_ROUNDS` rounds at every row count, for a comparison of two close times
    that neither the time budget nor :func:`_settled` may cut short.

    ``reference`` (one of ``modules``, :func:`choose`'s) is the format the others must beat:
    a row count's rounds stop early once each of them has beaten it by :data:`MARGIN` in
    every round or in none (:func:`_settled`)."""
    if not isinstance(modules, Mapping):
        raise ArgumentTypeError(f"modules must be a dict from format name to module, got "
                                f"{type(modules).__name__}")
    if reference not in modules:
        raise ValueError(f"reference must be one of the modules {sorted(modules)}, got "
                         f"{reference!r}")
    rows = check_rows(rows)
    # checked here: a bad one was a raw error of torch.randn or of the first timed call
    if isinstance(in_shape, (str, bytes)) or not isinstance(in_shape, Sequence):
        raise ArgumentTypeError(f"in_shape must be a tuple of ints ≥ 0 (one input's shape), "
                                f"got {in_shape!r}")
    for size in in_shape:
        check_int("in_shape", size, minimum=0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentTypeError(f"dtype must be a floating torch.dtype (the inputs'), got "
                                f"{dtype!r}")
    if inputs is not None and (not isinstance(inputs, torch.Tensor) or inputs.dim() == 0
                               or inputs.shape[0] == 0
                               or tuple(inputs.shape[1:]) != tuple(in_shape)):
        got = (f"shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor)
               else type(inputs).__name__)
        error = ValueError if isinstance(inputs, torch.Tensor) else ArgumentTypeError
        raise error(f"inputs must be None or a tensor of at least one input, (n, *in_shape) "
                    f"with n ≥ 1 and in_shape={tuple(in_shape)}, got {got}")
    if inputs is not None and inputs.device.type != torch.device(device).type:
        # a meta one failed inside the first timed call, as the layer's x
        raise ValueError(f"inputs must be on the modules' device {torch.device(device)}, got "
                         f"{inputs.device}")
    check_bool("every_round", every_round)
    samples: Samples = {}
    names = list(modules)
    for r in rows:
        x = (torch.randn(r, *in_shape, dtype=dtype, device=device) if inputs is None
             else inputs[torch.arange(r, device=inputs.device) % inputs.shape[0]].to(dtype))
        cold_rows = _cold and r <= COLD_ROWS
        reps = {n: _calls_per_block(modules[n], x) for n in names}
        if cold_rows:  # each call pays a flush: two at least, for the fastest to count
            reps = {n: max(2, min(k, _COLD_REPS)) for n, k in reps.items()}
        times: dict[str, list[float]] = {n: [] for n in names}
        spent = 0.0
        for i in range(_MAX_ROUNDS):
            for n in names[i % len(names):] + names[: i % len(names)]:  # rotating order
                if cold_rows:
                    seconds = _time_cold(modules[n], x, reps[n])
                else:
                    modules[n](x)  # bring this format's weight back into cache
                    seconds = _time_block(modules[n], x, reps[n])
                times[n].append(seconds * 1e3)
                spent += seconds * reps[n]
            if not every_round and i + 1 >= _MIN_ROUNDS and (
                spent > _ROUND_BUDGET_S * len(names) or _settled(times, reference)
            ):
                break
        samples[r] = times
    return samples


def choose(
    samples: Samples,
    allowed: Sequence[str],
    *,
    dense_allowed: bool = True,
    split: bool = False,
    reference: str = "dense",
    tolerant: bool = False,
) -> tuple[str, dict[str, object]]:
    """The format to use among ``allowed`` (all timed in ``samples``, as is ``reference``)
    and the record of the choice.

    With ``split``, the layer may hold two formats, one for the row counts up to some
    served row count and another for the larger ones (e.g. a sparse format for decoding,
    dense for the prompt); each must pass the rule of this module on its own row counts,
    so every path is no slower than the reference wherever it serves. A split is taken
    only when it beats every single format in the geometric mean over all row counts.
    With ``tolerant``, a format is slower than the reference at a row count only where the
    reference beats it by the margin (in the median and in most rounds), not wherever its
    median is higher: for two paths that each passed the rule against dense already (see
    the module docstring).

    The record holds ``format`` (the format for the fewest rows, the one returned),
    ``format_large`` and ``split`` (the format for more than ``split`` rows; both ``None``
    without a split), ``rows``, ``ms_dense`` and ``ms_chosen`` (median times summed over
    the row counts; "dense" is the ``reference``), ``speedup``, ``times_ms`` (format →
    row count → median), ``evidence`` (row count → ``format`` serving it, ``ms_dense``,
    ``ms_chosen``, ``ratio``, ``rounds``, ``wins``: rounds in which that format beat the
    reference by the margin, ``spread``: the larger relative range (max − min) / median
    of the two formats' round times), ``margin``, ``forced`` and ``reference``.

    A bad argument (no row counts, a format timed at some row counts only, ``allowed``
    naming an untimed format or given as one string, empty or non-finite times, a forced
    choice with no format but the reference) is a ``ValueError`` naming it.
    """
    allowed = _check_choice(samples, allowed, dense_allowed, split, reference)
    check_bool("tolerant", tolerant)
    timed = next(iter(samples.values()))  # every format timed, the reference among them
    medians = {
        n: {r: statistics.median(per_format[n]) for r, per_format in samples.items()}
        for n in timed
    }
    ratios = {n: {r: t[r] / max(medians[reference][r], 1e-12) for r in t}
              for n, t in medians.items()}
    rows = sorted(samples)
    if dense_allowed:
        plans = [(n, n, None) for n in _eligible(samples, allowed, rows, reference, tolerant)]
        for s in range(1, len(rows)) if split else ():
            plans += [(small, large, rows[s - 1])
                      for small in _eligible(samples, allowed, rows[:s], reference, tolerant)
                      for large in _eligible(samples, allowed, rows[s:], reference, tolerant)
                      if small != large]
    else:
        plans = [(n, n, None) for n in allowed if n != reference]

    def serving(plan: tuple[str, str, int | None], r: int) -> str:
        return plan[0] if plan[2] is None or r <= plan[2] else plan[1]

    best = min(plans, key=lambda p: _geomean([ratios[serving(p, r)][r] for r in rows]))
    chosen = {r: serving(best, r) for r in samples}
    evidence = {
        r: {
            "format": chosen[r],
            "ms_dense": medians[reference][r],
            "ms_chosen": medians[chosen[r]][r],
            "ratio": ratios[chosen[r]][r],
            "rounds": len(per_format[chosen[r]]),
            "wins": _wins(per_format[chosen[r]], per_format[reference]),
            "spread": max(_spread(per_format[chosen[r]]), _spread(per_format[reference])),
        }
        for r, per_format in samples.items()
    }
    ms_dense = sum(medians[reference].values())
    ms_chosen = sum(medians[chosen[r]][r] for r in samples)
    return best[0], {
        "format": best[0],
        "format_large": None if best[2] is None else best[1],
        "split": best[2],
        "rows": list(samples),
        "ms_dense": ms_dense,
        "ms_chosen": ms_chosen,
        "speedup": ms_dense / ms_chosen if ms_chosen > 0 else 1.0,
        "times_ms": medians,
        "evidence": evidence,
        "margin": MARGIN,
        "forced": not dense_allowed,
        "reference": reference,
    }


def check_rows(rows: object) -> list[int]:
    """The distinct row counts of ``rows``, a sequence of ints in
    [1, :data:`MAX_ROWS`], as plain ints in their order: the row counts every timing of
    :func:`measure`, :func:`sparsekit.compile` and
    :meth:`~sparsekit.engine.activation_linear.ActivationSparseLinear.tuned` serves. A
    larger one failed allocating its timing inputs (a raw out-of-memory ``RuntimeError``);
    a NumPy int was a raw ``TypeError`` in the JSON keys of the decision cache."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise ArgumentTypeError(f"rows must be a sequence of row counts (ints ≥ 1), got "
                                f"{rows!r:.80}")
    values = list(rows)
    for r in values:
        check_int("rows", r, minimum=1)
        if r > MAX_ROWS:
            raise ValueError(
                f"rows must be ints in [1, {MAX_ROWS}] (MAX_ROWS: each layer is timed on "
                f"random inputs of every row count, so more rows would exhaust the memory), "
                f"got {r}"
            )
    return list(dict.fromkeys(int(r) for r in values))


def _check_choice(samples: object, allowed: object, dense_allowed: object, split: object,
                  reference: object) -> list[str]:
    """``allowed`` as a list, once :func:`choose`'s arguments are checked."""
    accepted = ("a non-empty dict: row count → format → milliseconds per call, one per round "
                "(what measure returns)")
    if not isinstance(samples, Mapping):
        raise ArgumentTypeError(f"samples must be {accepted}, got {type(samples).__name__}")
    if not samples:
        raise ValueError(f"samples must be {accepted}, got an empty one")
    first: list[str] | None = None
    for r, per_format in samples.items():
        check_int("samples' row counts", r, minimum=1)
        if not isinstance(per_format, Mapping):
            raise ArgumentTypeError(f"samples[{r!r}] must be a dict: format → times, got "
                                    f"{type(per_format).__name__}")
        if first is None:
            first = sorted(per_format, key=str)
            if reference not in per_format:
                raise ValueError(f"reference {reference!r} was not timed: samples[{r!r}] times "
                                 f"{first}; accepted: a reference timed in samples, one of "
                                 f"{first}")
        elif sorted(per_format, key=str) != first:
            raise ValueError(f"samples must time the same formats at every row count: "
                             f"samples[{r!r}] times {sorted(per_format, key=str)}, the first "
                             f"row count {first}")
        rounds = None
        for name, times in per_format.items():
            where = f"samples[{r!r}][{name!r}]"
            if isinstance(times, (str, bytes)) or not isinstance(times, Sequence):
                raise ArgumentTypeError(f"{where} must be a list of times (ms, one per round), "
                                        f"got {type(times).__name__}")
            if not times:
                raise ValueError(f"{where} must hold at least one time (ms), got none")
            for t in times:
                if isinstance(t, bool) or not isinstance(t, numbers.Real):
                    raise ArgumentTypeError(f"{where} must hold times in ms (floats), got "
                                            f"{t!r}")
                if not 0 <= t < math.inf:  # also NaN
                    raise ValueError(f"{where} must hold finite times ≥ 0 (ms), got {t!r}")
            if rounds is not None and len(times) != rounds:
                raise ValueError(f"samples[{r!r}] must hold as many rounds for every format: "
                                 f"{where} has {len(times)}, another {rounds}")
            rounds = len(times)
    if isinstance(allowed, (str, bytes)) or not isinstance(allowed, Iterable):
        raise ArgumentTypeError(f"allowed must be a sequence of format names (a list, not one "
                                f"string), got {allowed!r}")
    allowed = list(allowed)
    for name in allowed:
        if name not in first:
            raise ValueError(f"allowed names {name!r}, which samples did not time; accepted: "
                             f"formats timed in samples, {first}")
    check_bool("dense_allowed", dense_allowed)
    check_bool("split", split)
    if not dense_allowed and all(n == reference for n in allowed):
        raise ValueError(f"dense_allowed=False needs a format other than the reference "
                         f"{reference!r} in allowed, got {allowed}")
    return allowed


def _eligible(
    samples: Samples, allowed: Sequence[str], rows: Sequence[int], reference: str,
    tolerant: bool = False,
) -> list[str]:
    """The reference and the formats of ``allowed`` that may replace it at ``rows``."""
    served = {r: samples[r] for r in rows}
    return [reference, *(n for n in allowed
                         if n != reference and _replaces(served, n, reference, tolerant))]


def _replaces(samples: Samples, name: str, reference: str = "dense",
              tolerant: bool = False) -> bool:
    """No slower than the reference at every row count (in the median; ``tolerant``: not
    beaten by it), and a win at one at least."""
    won = False
    for per_format in samples.values():
        mine, dense = per_format[name], per_format[reference]
        if (_beats(dense, mine) if tolerant
                else statistics.median(mine) > statistics.median(dense)):
            return False
        won = won or _beats(mine, dense)
    return won


def _beats(mine: list[float], other: list[float]) -> bool:
    """Whether ``mine`` is faster than ``other`` by the margin in the median and in most
    rounds (a win)."""
    return (statistics.median(mine) <= (1 - MARGIN) * statistics.median(other)
            and 2 * _wins(mine, other) > len(mine))


def _wins(mine: list[float], dense: list[float]) -> int:
    """Rounds in which ``mine`` was faster than dense by the margin."""
    return sum(m <= (1 - MARGIN) * d for m, d in zip(mine, dense, strict=True))


def _settled(times: Mapping[str, list[float]], reference: str) -> bool:
    """Whether the rounds so far agree on every format against ``reference``: faster than it
    by :data:`MARGIN` in every round or in none, and it faster than the format by the margin
    in every round or in none. To turn :func:`choose`'s verdict (a median that much faster
    *and* a majority of winning rounds), most of ten more rounds would have to contradict
    all five, i.e. the machine would have to change under them, so :func:`measure` stops
    at :data:`_MIN_ROUNDS`: five unanimous rounds are a sign test at 1/32. The formats that
    pass are then ranked by their medians, which needs no such test. A layer whose formats
    are far from dense (most of them: a sparse format at the wrong size) is timed in 5
    rounds instead of 15; where noise or a close call splits the rounds, all of them are
    still run."""
    ref = times[reference]
    return all(_wins(t, ref) in (0, len(t)) and _wins(ref, t) in (0, len(t))
               for name, t in times.items() if name != reference)


def _spread(times: list[float]) -> float:
    median = statistics.median(times)
    return (max(times) - min(times)) / median if median > 0 else 0.0


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))


def _calls_per_block(module: nn.Module, x: torch.Tensor) -> int:
    module(x)  # warm-up: first-call allocations, lazy CSR construction, kernel workspace
    once = _time_block(module, x, 1)
    return max(1, min(1000, int(_BLOCK_S / max(once, 1e-7))))


def _time_cold(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``module(x)``, the caches flushed before
    each (the flushes are not timed).

    The fastest, not the mean: every call starts from the same flushed cache, so the calls
    differ only by what the machine did meanwhile, and that only ever adds time. On a
    2-vCPU AMD EPYC with other processes running (load average 8), a two-thread kernel's
    call waited for its descheduled second thread now and then (a 5632 x 2048 W8A8 bitmap
    product: median 0.17 ms, slowest of 200 calls 20 ms); with the mean of three calls,
    such stalls put bitmap at 4-15 ms against 0.2 ms for dense int8 in most rounds, and
    compile kept layers dense that the sparse formats beat 1.5x."""
    fastest = math.inf
    for _ in range(reps):
        _evict(module)
        fastest = min(fastest, _time_block(module, x, 1))
    return fastest


def _time_block(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Seconds per call of ``module(x)`` over ``reps`` calls, timed as up to
    :data:`_PARTS` consecutive parts of the block of which the fastest counts (the one
    clock tests replace): as in a cold round, a stall only adds time, and a part it hit
    does not make the format look slow."""
    cuda = x.device.type == "cuda"
    parts = min(reps, _PARTS)
    fastest = math.inf
    for part in range(parts):
        calls = reps // parts + (part < reps % parts)
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        if cuda:
            torch.cuda.synchronize(x.device)
        fastest = min(fastest, (time.perf_counter() - start) / calls)
    return fastest
