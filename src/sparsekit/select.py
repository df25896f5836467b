"""Top-k selection: the one way every stage picks "the k highest scores".

Patterns keep the best weights of a layer, allocations rank weights across layers, the
dynamic-sparsity rules drop and grow, LLM methods keep the best of each row — all through
:func:`top_k`, so they agree on ties: equal scores are taken in order of position, exactly
as a stable descending sort would take them. :func:`top_k_counts` makes the same choice
across many tensors at once (a global ranking over layers) without concatenating them.

Large selections are made in chunks by an exact radix select: the k-th largest float32
value is found digit by digit from histograms of the scores' bits, so their memory is a
chunk, not a multiple of the scores (a sort or ``topk`` of n scores needs several n).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence

import torch

from sparsekit._checks import ArgumentTypeError, check_int, check_materialized, is_float8

_CHUNK = 1 << 20
"""Entries per step of a chunked selection: its memory, however many scores there are."""
_DIGITS = (11, 11, 10)
"""Bits of the 32-bit key resolved per pass, high to low: three reads, 2048 bins at most."""
_SIGN_BIT = 1 << 31
_SIGN = -_SIGN_BIT  # the sign bit as an int32
_RADIX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Score dtypes that float32 holds exactly, so a float32 key ranks them exactly."""


def top_k(
    scores: torch.Tensor,
    k: int,
    *,
    allowed: torch.Tensor | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """Boolean mask of the ``k`` highest ``scores``, ties broken towards the lower index.

    ``dim=None`` ranks all entries together; with ``dim`` every slice along that dimension
    keeps its own ``k`` (``dim=1`` on a 2-D score: ``k`` per row). Only entries where
    ``allowed`` is true are chosen, at most as many as there are. NaN ranks as ``+inf``.

    A selection, not a sort: every score above the k-th largest, then the first ones equal
    to it, so n scores cost O(n) however large k is. ``scores`` is a real tensor (bool and
    integer scores rank as numbers), ``allowed`` a bool tensor of its shape and ``dim`` one
    of its dimensions; each is checked first.
    """
    k = _check_k(k)
    _check_scores(scores, allowed, dim)
    k = min(k, scores.numel())  # k past 2**63 was a raw RuntimeError (an int64 overflow)
    if dim is None and scores.numel() > _CHUNK and scores.dtype in _RADIX_DTYPES:
        return _top_k_chunked(scores, k, allowed)
    if dim is None:
        values, ok = scores.reshape(1, -1), None if allowed is None else allowed.reshape(1, -1)
    else:
        values = scores.movedim(dim, -1)
        ok = None if allowed is None else allowed.movedim(dim, -1)
    if values.dtype == torch.int64:
        # ranked as they are, exactly: a double rounds them past 2**53, which took 2**53
        # over 2**53 + 1
        lowest: float | int = torch.iinfo(torch.int64).min
    else:
        if not torch.is_floating_point(values):
            values = values.double()  # bools and narrower ints: exact in a double
        elif is_float8(values.dtype):  # exact in a float (nan_to_num takes none)
            values = values.float()
        values = values.nan_to_num(nan=float("inf"), posinf=float("inf"),
                                   neginf=float("-inf"))
        lowest = float("-inf")
    if ok is not None:
        values = values.masked_fill(~ok, lowest)
    size = values.shape[-1]
    if min(k, size) == 0 or values.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = values.topk(min(k, size), dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above, equal = values > kth, values == kth
    if ok is not None:
        above, equal = above & ok, equal & ok
        budget = ok.sum(-1, keepdim=True).clamp(max=k)
    else:
        budget = min(k, size)
    need = budget - above.sum(-1, keepdim=True)
    if bool((equal.sum(-1, keepdim=True) > need).any()):  # more ties than room: first ones
        equal &= equal.cumsum(-1) <= need
    kept = above | equal
    return kept.reshape(scores.shape) if dim is None else kept.movedim(-1, dim)


def top_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of ``k`` of the 2-D ``scores`` spread evenly over their rows: each row
    keeps its own ``k // rows`` highest, and the ``k % rows`` rows whose next score is
    highest keep one more (ties towards the lower index, as :func:`top_k`). Wanda's
    comparison group, "per output": ranked across the whole layer, rows that read larger
    inputs took the slots of others, down to none."""
    k = _check_k(k)
    check_real(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (rows, columns), got shape {tuple(scores.shape)}")
    rows = scores.shape[0]
    if rows == 0 or scores.shape[1] == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    base, extra = divmod(min(k, scores.numel()), rows)
    kept = top_k(scores, base, dim=1)
    if extra:
        rest = scores.float().nan_to_num(nan=float("inf")).masked_fill(kept, float("-inf"))
        more = top_k(rest.amax(1), extra)  # the rows whose next score is highest
        kept |= top_k(rest, 1, dim=1) & more[:, None]
    return kept


def top_k_counts(
    parts: Sequence[torch.Tensor], k: int, *, finite_only: bool = False
) -> list[int]:
    """How many of the ``k`` highest scores of all ``parts`` together fall in each part.

    The choice :func:`top_k` makes on the parts flattened and concatenated (ties go to
    the earlier part, then to the lower position), made without the concatenation: each
    part is read three times in chunks, so the memory is a chunk and a small histogram
    per part however large the parts are. ``parts`` may compute its items on access
    (LAMP scores, derived per layer). Scores rank as float32 values, NaN as ``+inf``.
    With ``finite_only`` at most as many scores as are finite are counted (allocations:
    ``-inf`` marks weights that are already pruned).
    """
    k = _check_k(k)
    if isinstance(parts, torch.Tensor) or not isinstance(parts, Sequence):
        raise ArgumentTypeError(f"parts must be a sequence (a list) of real tensors, got "
                                f"{type(parts).__name__}")
    found = _kth_largest(parts, k, None, finite_only=finite_only)
    if found is None:
        return [0] * len(parts)
    _, k, above, equal = found
    need, counts = k - sum(above), []
    for a, e in zip(above, equal):  # ties at the k-th value: earlier parts first
        take = min(e, need)
        counts.append(a + take)
        need -= take
    return counts


def _check_scores(scores: torch.Tensor, allowed: torch.Tensor | None, dim: int | None) -> None:
    """Raise unless ``scores`` is a real tensor, ``allowed`` ``None`` or a bool tensor of
    its shape and ``dim`` ``None`` or one of its dimensions: a list of scores failed with
    an ``AttributeError``, a float or integer ``allowed`` deep inside with a bare
    ``TypeError`` or ``RuntimeError``, ``dim=5`` with an ``IndexError``."""
    check_real(scores, "scores")
    if allowed is not None:
        if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool:
            got = allowed.dtype if isinstance(allowed, torch.Tensor) else type(allowed).__name__
            raise ArgumentTypeError(
                f"allowed must be None or a bool tensor (True: may be chosen), got {got}"
            )
        if allowed.shape != scores.shape:
            raise ValueError(
                f"allowed must have the shape of scores {tuple(scores.shape)}, "
                f"got {tuple(allowed.shape)}"
            )
        if allowed.device != scores.device:  # was a raw RuntimeError deep inside
            raise ValueError(f"allowed must be on the device of scores ({scores.device}), "
                             f"got {allowed.device}")
    if dim is not None:
        check_int("dim", dim)
        ndim = scores.dim()
        if not -ndim <= dim < ndim:
            within = f", in [{-ndim}, {ndim - 1}]" if ndim else ""
            raise ValueError(
                f"dim must be None or a dimension of the {ndim}-D scores{within}, got {dim}"
            )


def check_real(scores: object, name: str) -> None:
    """Raise unless ``scores`` (the argument ``name``) is a dense real tensor with values:
    a list was a raw ``AttributeError``, a complex tensor lost its imaginary part, and a
    sparse one or one on the meta device failed inside PyTorch."""
    if not isinstance(scores, torch.Tensor) or scores.is_complex():
        got = scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ArgumentTypeError(f"{name} must be a real tensor, got {got}")
    if scores.layout != torch.strided:
        raise ArgumentTypeError(f"{name} must be a dense (strided) real tensor, got layout "
                                f"{scores.layout}; convert with `.to_dense()`")
    check_materialized(name, scores)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise ArgumentTypeError(f"k must be an int, got {type(k).__name__}")
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    return k


def _top_k_chunked(
    scores: torch.Tensor, k: int, allowed: torch.Tensor | None
) -> torch.Tensor:
    """:func:`top_k` over all entries, in chunks: the k-th value by radix select, then the
    entries above it and the first ones equal to it."""
    flat = scores.reshape(-1)
    ok = None if allowed is None else allowed.reshape(-1)
    kept = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    found = _kth_largest([flat], k, None if ok is None else [ok])
    if found is None:
        return kept.reshape(scores.shape)
    kth, k, above, _ = found
    need = k - above[0]
    for (start, chunk), (_, ok_chunk) in zip(_chunks(flat), _chunks(ok)):
        values = _ranked(chunk)
        equal = values == kth
        chosen = values > kth
        if ok_chunk is not None:
            equal &= ok_chunk
            chosen &= ok_chunk
        ties = int(equal.sum())
        if ties > need:  # more ties than room: the first ones
            equal &= equal.cumsum(0) <= need
        need -= min(ties, need)
        kept[start:start + chunk.numel()] = chosen | equal
    return kept.reshape(scores.shape)


def _kth_largest(
    parts: Sequence[torch.Tensor],
    k: int,
    allowed: Sequence[torch.Tensor] | None,
    *,
    finite_only: bool = False,
) -> tuple[torch.Tensor, int, list[int], list[int]] | None:
    """Radix select over ``parts``: ``(k-th largest value, k, counts above it per part,
    counts equal to it per part)``, with k capped at the number of (allowed, with
    ``finite_only`` finite) entries; ``None`` when nothing is chosen.

    Each pass histograms the next digit of the order-preserving keys of the entries whose
    higher digits match the ones chosen so far, then picks the digit holding the k-th.
    """
    above = torch.zeros(len(parts), dtype=torch.long)
    prefix, done, rank = 0, 0, k
    live = [True] * len(parts)  # parts with entries under the digits chosen so far
    for bits in _DIGITS:
        hist, finite = torch.zeros(len(parts), 1 << bits, dtype=torch.long), 0
        for i in range(len(parts)):  # one part at a time: a computed part is let go at once
            if not live[i]:
                continue
            ok = None if allowed is None else allowed[i].reshape(-1)
            part = parts[i]
            check_real(part, f"parts[{i}]")
            hist[i], n_finite = _histogram(part, ok, prefix, done, bits)
            finite += n_finite
        if not done:
            rank = min(k, int(hist.sum()), finite if finite_only else k)
            if rank == 0:
                return None
            k = rank
        total = hist.sum(0)
        from_top = total.flip(0).cumsum(0)  # entries in this digit or a higher one
        index = int(torch.searchsorted(from_top, rank))
        digit = (1 << bits) - 1 - index
        rank -= int(from_top[index] - total[digit])
        above += hist[:, digit + 1:].sum(1)
        live = (hist[:, digit] > 0).tolist()
        prefix, done = (prefix << bits) | digit, done + bits
    return _value(prefix), k, above.tolist(), hist[:, digit].tolist()


def _histogram(
    part: torch.Tensor, ok: torch.Tensor | None, prefix: int, done: int, bits: int
) -> tuple[torch.Tensor, int]:
    """Counts of the next ``bits``-bit digit of the keys of ``part`` (its ``ok`` entries)
    whose first ``done`` bits are ``prefix``, and the number of finite entries read."""
    counts = torch.zeros(1 << bits, dtype=torch.long, device=part.device)
    finite = 0
    for (_, chunk), (_, ok_chunk) in zip(_chunks(part.reshape(-1)), _chunks(ok)):
        values = _ranked(chunk)
        if ok_chunk is not None:
            values = values[ok_chunk]
        if not done:
            finite += int(torch.isfinite(values).sum())
        key = _key(values)
        if done:  # the digits chosen so far (masked: >> extends the sign)
            key = key[((key >> (32 - done)) & ((1 << done) - 1)) == prefix]
        counts += torch.bincount((key >> (32 - done - bits)) & ((1 << bits) - 1),
                                 minlength=1 << bits)
    return counts.cpu(), finite


def _chunks(flat: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor | None]]:
    if flat is None:
        while True:
            yield 0, None
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start:start + _CHUNK]


def _ranked(chunk: torch.Tensor) -> torch.Tensor:
    """The float32 values a selection compares: NaN as ``+inf`` and ``-0.0`` as ``0.0``."""
    inf = math.inf
    return chunk.float().nan_to_num(nan=inf, posinf=inf, neginf=-inf).add_(0.0)


def _key(values: torch.Tensor) -> torch.Tensor:
    """int32 keys whose bits, read as unsigned, order like the float32 ``values`` (NaN-free,
    no -0.0): the sign bit of a positive value is set, a negative one has all bits flipped."""
    bits = values.view(torch.int32)
    return bits ^ ((bits >> 31) | _SIGN)


def _value(key: int) -> torch.Tensor:
    """The float32 value of an unsigned key (the inverse of :func:`_key`)."""
    bits = key ^ _SIGN_BIT if key & _SIGN_BIT else ~key & 0xFFFFFFFF
    signed = bits - (1 << 32) if bits & _SIGN_BIT else bits
    return torch.tensor([signed], dtype=torch.int32).view(torch.float32)[0]
