"""The measured break-even of sparse attention: dense SDPA or a pattern's sparse path, per call.

Sparsity pays only past a sequence length that depends on the CPU, its threads, the head
shape and the pattern: ``benchmarks/results/attention.md`` measured the default pattern
beating SDPA from 2k keys on an Intel Xeon whose SDPA runs MKL at ~70 % of its peak, and
only from 8k on a Zen 5 before the kernel's last fixes. No constant holds on every machine,
so :class:`BreakEven` times both paths on a call's own queries and keys the first time a
call of its class arrives, keeps the winner's output and runs the winner from then on.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

from sparsekit._checks import ArgumentTypeError, check_fraction

__all__ = ["BreakEven", "call_class"]

Output = TypeVar("Output")


def call_class(query: torch.Tensor, key: torch.Tensor, *, causal: bool,
               block_size: int) -> tuple[Hashable, ...]:
    """What decides which path is faster for attention of ``query`` over ``key`` (both
    ``(batch, heads, seq, head_dim)``): the octaves of the query and key lengths
    (``bit_length``: 1 is a decode step; a doubling of the keys is a new class), batch,
    query and key/value heads, head dim, dtype, causality, tile edge and torch's threads."""
    batch, heads, q_len, head_dim = query.shape
    return (q_len.bit_length(), key.shape[2].bit_length(), batch, heads, key.shape[1],
            head_dim, query.dtype, causal, block_size, torch.get_num_threads())


class BreakEven:
    """Chooses dense or sparse attention per call class from a timing of both.

    The first call of a class (:func:`call_class`) runs both paths on its real inputs and
    returns the output of the faster one; later calls of the class run only that one. The
    sparse path must be faster by ``margin`` (it takes at most ``1 - margin`` of the dense
    time), so that timing noise does not move a model onto a path that is not clearly
    faster. One instance serves every layer it is shared with: the first layer to see a
    class decides for all. Under ``torch.compile`` or ``torch.export`` nothing is timed:
    a class measured by an eager call keeps its winner, an unmeasured one runs dense.

    Args:
        margin: the fraction of the dense time the sparse path must save, in ``[0, 1)``.
        clock: seconds, read around each path (``time.perf_counter``; a test may inject one).
    """

    def __init__(self, margin: float = 0.1, *,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        check_fraction("margin", margin)
        if not callable(clock):  # else the first timed call fails far from here
            raise ArgumentTypeError(
                f"clock must be a callable returning seconds (like time.perf_counter), got "
                f"{clock!r}"
            )
        self.margin = margin
        self._clock = clock
        self._sparse_wins: dict[Hashable, bool] = {}

    def _read(self) -> float:
        """The clock once the GPU's queued work is done: CUDA runs kernels asynchronously,
        so a path timed without waiting for them counted their launch alone (and the next
        reading after a synchronising op counted the other path's work too)."""
        if torch.cuda.is_initialized():  # every device: the model's need not be the current
            for device in range(torch.cuda.device_count()):
                torch.cuda.synchronize(device)
        return self._clock()

    @property
    def decisions(self) -> dict[Hashable, bool]:
        """Per measured call class, whether the sparse path won (a copy)."""
        return dict(self._sparse_wins)

    def run(self, call: Hashable, dense: Callable[[], Output],
            sparse: Callable[[], Output]) -> Output:
        """The output of the path that wins for call class ``call`` (hashable: the key the
        decision is remembered under, like :func:`call_class`'s tuple): measured now (both
        run) if the class is new, else the remembered winner alone."""
        try:
            hash(call)
        except TypeError:  # a list, or a tuple holding one: a raw error of the dict
            raise ArgumentTypeError(
                f"call must be a hashable call class (like the tuple call_class returns), got "
                f"{call!r}"
            ) from None
        won = self._sparse_wins.get(call)
        if won is not None or torch.compiler.is_compiling():
            # a trace (torch.compile, export) cannot time: it takes what eager calls measured
            return sparse() if won else dense()
        start = self._read()
        dense_out = dense()
        middle = self._read()
        sparse_out = sparse()
        end = self._read()
        for reading in (start, middle, end):  # a str or NaN failed or decided silently
            if isinstance(reading, bool) or not isinstance(reading, numbers.Real) \
                    or not math.isfinite(reading):
                raise ArgumentTypeError(f"clock must return seconds as a finite real number "
                                        f"(like time.perf_counter), got {reading!r}")
        won = end - middle <= (1.0 - self.margin) * (middle - start)
        self._sparse_wins[call] = won
        return sparse_out if won else dense_out
