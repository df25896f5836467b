"""How much of attention a block mask keeps: its density and the softmax mass it recalls.

Both are measured over the (query, key) pairs attention may use at all — with ``causal``
the pairs on or below the diagonal aligned at the end (query ``i`` sees keys up to
``kv_len - q_len + i``, as :func:`~sparsekit.attention.block_sparse_attention` does), so a
causal mask that keeps every tile has density 1. Neither ever builds a ``(q_len, kv_len)``
matrix for a whole sequence: density is counted per tile in closed form, recall is summed
over chunks of query rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_fits_memory,
    check_int,
    check_materialized,
    check_positive,
)

__all__ = ["Coverage", "bounded_block_size", "density", "mass_recall", "tile_mass",
           "visible_pairs"]

_CHUNK_ELEMENTS = 1 << 24  # scores held at once by tile_mass (64 MiB of float32)


@dataclass(frozen=True)
class Coverage:
    """What a block mask keeps of attention on given queries and keys.

    Attributes:
        density: fraction of the attendable (query, key) pairs inside kept tiles — the
            share of dense attention's work the sparse kernel does.
        recall: fraction of the softmax mass that falls on kept pairs, averaged over
            query rows (1.0 means the sparse output equals the dense one).
    """

    density: float
    recall: float

    @classmethod
    def of(
        cls, q: torch.Tensor, k: torch.Tensor, block_mask: torch.Tensor, *, block_size: int,
        causal: bool = True, mass: torch.Tensor | None = None,
    ) -> Coverage:
        """The :func:`density` and :func:`mass_recall` of ``block_mask`` on ``q``, ``k``
        (``mass``: as :func:`mass_recall` takes it)."""
        return cls(
            density=density(block_mask, q.shape[2], k.shape[2], block_size=block_size,
                            causal=causal),
            recall=mass_recall(q, k, block_mask, block_size=block_size, causal=causal,
                               mass=mass),
        )


def blocks(length: int, block_size: int) -> int:
    """Number of ``block_size`` tiles covering ``length`` tokens (the last may be ragged)."""
    return -(-length // block_size)


def bounded_block_size(q_len: int, kv_len: int, block_size: int) -> int:
    """``block_size`` capped at the longer of the two sequences: every larger size tiles
    them alike (one tile each way), but the tiles are padded to whole ``block_size`` rows
    (2**31 asked for ~100 GB) and placed at ``block · block_size`` (2**63 overflowed int64:
    an empty dense mask)."""
    return min(block_size, max(q_len, kv_len, 1))


@torch.compiler.disable  # of the lengths alone; traced, inductor failed on its int64 series
def visible_pairs(q_len: int, kv_len: int, *, block_size: int, causal: bool) -> torch.Tensor:
    """Attendable (query, key) pairs in each tile: int64 ``(q_blocks, kv_blocks)``.

    Without ``causal`` that is the tile's area; with it, the pairs on or below the diagonal
    aligned at the end, counted per tile by arithmetic series. A table larger than this
    machine's memory (very long sequences in tiny tiles) is a ``ValueError`` stating its
    size, not the allocator's raw ``RuntimeError``; so are lengths whose pairs overflow
    int64 (counted as 0 or negative: a density of NaN, without a sign of it).
    """
    check_int("q_len", q_len, minimum=1)
    check_int("kv_len", kv_len, minimum=1)
    check_int("block_size", block_size, minimum=1)
    check_bool("causal", causal)
    if q_len * kv_len > torch.iinfo(torch.int64).max:  # 2**32 each way: one tile wrapped
        raise ValueError(f"q_len * kv_len must fit int64 (the pairs are counted in it), "
                         f"got q_len={q_len}, kv_len={kv_len}; accepted: shorter sequences")
    block_size = bounded_block_size(q_len, kv_len, block_size)
    qb, kb = blocks(q_len, block_size), blocks(kv_len, block_size)
    check_fits_memory(qb * kb * 8, f"q_len={q_len}, kv_len={kv_len} in tiles of "
                      f"block_size={block_size} make {qb:,} x {kb:,} tiles, an int64 table of",
                      "accepted: a larger block_size or shorter sequences")
    offset = kv_len - q_len
    first = torch.arange(qb) * block_size  # query rows of each query tile: [first, last]
    last = torch.clamp(first + block_size, max=q_len) - 1
    start = torch.arange(kb) * block_size  # keys of each key tile: [start, stop]
    stop = torch.clamp(start + block_size, max=kv_len) - 1
    width = (stop - start + 1)[None, :]
    if not causal:
        return (last - first + 1)[:, None] * width
    a, e = (first + offset)[:, None], (last + offset)[:, None]  # positions in key coordinates
    s, t = start[None, :], stop[None, :]
    lo, hi = torch.maximum(a, s), torch.minimum(e, t)  # rows seeing part of the tile
    partial = (hi - lo + 1).clamp(min=0)
    ramp = partial * ((lo - s + 1) + (hi - s + 1)) // 2  # row r sees r - s + 1 of its keys
    full = (e - torch.maximum(a, t + 1) + 1).clamp(min=0)  # rows seeing the whole tile
    return ramp + full * width


def density(
    block_mask: torch.Tensor, q_len: int, kv_len: int, *, block_size: int, causal: bool
) -> float:
    """Fraction of the attendable (query, key) pairs that ``block_mask`` keeps.

    ``block_mask`` is bool ``(batch or 1, heads or 1, q_blocks, kv_blocks)``; the fraction
    is averaged over its batch and head entries.
    """
    check_int("q_len", q_len, minimum=1)
    check_int("kv_len", kv_len, minimum=1)
    check_int("block_size", block_size, minimum=1)
    check_bool("causal", causal)
    # the mask's shape first: the pairs of lengths it does not fit were allocated in full
    # (2**20 tokens in tiles of 8: 137 GB) before it was compared with them
    bounded = bounded_block_size(q_len, kv_len, block_size)
    _check_mask(block_mask, (blocks(q_len, bounded), blocks(kv_len, bounded)),
                block_size=block_size)
    check_materialized("block_mask", block_mask)  # its density is a number read from it
    pairs = visible_pairs(q_len, kv_len, block_size=block_size, causal=causal)
    pairs = pairs.to(block_mask.device, torch.float64)
    kept = (block_mask.to(torch.float64) * pairs).sum((-2, -1))
    return (kept / pairs.sum()).mean().item()


def tile_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """The softmax mass of ``softmax(q kᵀ · scale)`` in each (query block, key block)
    tile, summed over the tile's query rows: float64 ``(batch, heads, q_blocks,
    kv_blocks)``. A query block's tiles add up to the number of its rows that see a key.

    Args:
        q: ``(batch, heads, q_len, head_dim)``.
        k: ``(batch, kv_heads, kv_len, head_dim)``; ``heads`` a multiple of ``kv_heads``.
        block_size: tile edge in tokens.
        causal: scores of keys after each query (aligned at the end) are not attention's.
        scale: softmax scale, ``1 / sqrt(head_dim)`` by default.

    Scores are computed in float32 for a chunk of query rows at a time; a score that
    overflows float32 (a huge ``scale``, or huge ``q``, ``k``) raises ``ValueError``: its
    softmax would be NaN, and the mass of its row lost without a sign of it. So does a
    tile mass larger than this machine's memory (long sequences in tiny tiles: the
    allocator's raw ``RuntimeError``).
    """
    check_int("block_size", block_size, minimum=1)
    check_bool("causal", causal)
    check_positive("scale", scale, optional=True)
    _check_qk(q, k, finite=True)
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    block_size = bounded_block_size(q_len, kv_len, block_size)
    qb, kb = blocks(q_len, block_size), blocks(kv_len, block_size)
    check_fits_memory(batch * heads * qb * kb * 8, f"q_len={q_len}, kv_len={kv_len} in tiles "
                      f"of block_size={block_size} over {batch} x {heads} batch entries and "
                      "heads make a float64 tile mass of",
                      "accepted: a larger block_size or shorter sequences")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    keys = repeat_kv(k, heads).float()
    offset = kv_len - q_len
    # an empty batch holds no scores at all: any chunk does (it divided by zero)
    rows = max(1, _CHUNK_ELEMENTS // max(batch * heads * kv_len, 1) // block_size) * block_size
    mass = torch.zeros(batch, heads, qb, kb, dtype=torch.float64, device=q.device)
    for begin in range(0, q_len, rows):
        end = min(begin + rows, q_len)
        scores = q[:, :, begin:end].float() @ keys.transpose(-1, -2) * scale
        _check_scores(scores, "the scores q · kᵀ · scale",
                      f"scale or the magnitudes of q and k are too large (scale={scale!r}); "
                      "accepted: a smaller scale, or q and k rescaled")
        if causal:
            pos = torch.arange(begin, end, device=q.device)[:, None] + offset
            later = torch.arange(kv_len, device=q.device)[None, :] > pos
            scores = scores.masked_fill(later, -math.inf)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # NaN: a row that sees nothing
        probs = torch.nn.functional.pad(probs, (0, kb * block_size - kv_len))
        per_key_block = probs.unflatten(-1, (kb, block_size)).sum(-1, dtype=torch.float64)
        first = begin // block_size
        last = blocks(end, block_size)
        padded = torch.nn.functional.pad(per_key_block, (0, 0, 0, (last - first) * block_size
                                                         - (end - begin)))
        mass[:, :, first:last] += padded.unflatten(2, (last - first, block_size)).sum(3)
    return mass


def mass_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    mass: torch.Tensor | None = None,
) -> float:
    """Fraction of the softmax mass of ``softmax(q kᵀ · scale)`` on the tiles ``block_mask``
    keeps, averaged over every query row of every batch entry and head.

    Args:
        q: ``(batch, heads, q_len, head_dim)``.
        k: ``(batch, kv_heads, kv_len, head_dim)``; ``heads`` a multiple of ``kv_heads``.
        block_mask: bool ``(batch or 1, heads or 1, q_blocks, kv_blocks)``.
        block_size: tile edge in tokens.
        causal: scores of keys after each query (aligned at the end) are not attention's.
        scale: softmax scale, ``1 / sqrt(head_dim)`` by default.
        mass: the :func:`tile_mass` of ``q``, ``k`` (with this ``block_size`` and
            ``causal``, and the scale it was computed with instead of ``scale``) when it is
            at hand: several masks of the same queries and keys then read every score once,
            not once per mask (computing it reads more than dense attention does). Float32
            or float64 (a float16 or bfloat16 mass is refused: rounded, a recall passed 1).
            Nothing in it tells which ``causal`` it was computed with: a mass of the other
            one gives a wrong recall without an error.

    The masses come from :func:`tile_mass`. Rows that see no key at all (causal with
    ``q_len > kv_len``) are left out of the average.
    """
    check_int("block_size", block_size, minimum=1)
    check_bool("causal", causal)
    _check_qk(q, k)  # and finite, by tile_mass, where the masses are computed from them
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    tiles = (blocks(q_len, block_size), blocks(kv_len, block_size))
    _check_mask(block_mask, tiles, block_size=block_size, batch=batch, heads=heads)
    _check_device(q, block_mask=block_mask)  # the recall is read from mass * block_mask
    if mass is None:
        mass = tile_mass(q, k, block_size=block_size, causal=causal, scale=scale)
    elif scale is not None:
        raise ValueError(f"pass scale or mass, not both (mass was computed with its own "
                         f"scale), got scale={scale!r}")
    elif (not isinstance(mass, torch.Tensor) or mass.dtype not in (torch.float32, torch.float64)
          or tuple(mass.shape) != (batch, heads, *tiles)):
        got = (f"{mass.dtype} {tuple(mass.shape)}" if isinstance(mass, torch.Tensor)
               else type(mass).__name__)
        raise ValueError(f"mass must be the float32 or float64 tile_mass of q and k, shape "
                         f"({batch}, {heads}, {tiles[0]}, {tiles[1]}), got {got}")
    else:
        _check_device(q, mass=mass)
        check_materialized("mass", mass)
        _check_mass_values(mass, q_len, block_size)
    seen = batch * heads * (min(q_len, kv_len) if causal else q_len)
    # summed in float64: a float32 sum of many rows' masses would round
    return ((mass.to(torch.float64) * block_mask).sum() / max(seen, 1)).item()


def _check_scores(scores: torch.Tensor, what: str, remedy: str) -> None:
    """Raise unless every entry of ``scores`` (``what``: which scores, for the message) is
    finite in float32, ``q`` and ``k`` being finite: an overflowed score makes its row's
    softmax NaN, whose mass would silently count as zero (or ranks tiles at random), so a
    recall or a chosen mask would be wrong without a sign of it. ``remedy`` says what is
    accepted. Meta scores hold no values to check."""
    if not scores.is_meta and not bool(scores.isfinite().all()):
        raise ValueError(f"{what} overflow float32 (largest finite is "
                         f"{torch.finfo(torch.float32).max:.3g}): {remedy}")


def _check_mass_values(mass: torch.Tensor, q_len: int, block_size: int) -> None:
    """Raise unless every entry of a caller's ``mass`` is finite and ≥ 0, and the tiles of
    each query block add up to at most its rows (each row's softmax sums to 1), as
    :func:`tile_mass` computes it: a negative or NaN one, or masses of other scores (not
    normalised, of other queries), gave a recall outside [0, 1] without a sign of it."""
    bad = ~mass.isfinite() | (mass < 0)
    if bool(bad.any()):
        first = mass[bad].flatten()[0].item()
        raise ValueError(
            f"mass must hold finite values ≥ 0 (softmax masses, as tile_mass computes), got "
            f"{int(bad.sum())} other ones (e.g. {first!r})"
        )
    starts = torch.arange(mass.shape[2], device=mass.device) * block_size
    rows = torch.clamp(q_len - starts, max=block_size).to(torch.float64)
    totals = mass.to(torch.float64).sum(-1)  # (batch, heads, q_blocks)
    over = totals > rows * (1 + 1e-3)  # float32 softmax rows sum to 1 within far less
    if bool(over.any()):
        b, h, i = (int(x) for x in over.nonzero()[0])
        raise ValueError(
            f"mass must hold the softmax masses of q and k (tile_mass): a query block's tiles "
            f"add up to at most its rows, got {totals[b, h, i].item():.6g} in query block {i} "
            f"(batch {b}, head {h}) of {int(rows[i])} rows"
        )


def repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys (or values) with each of their heads repeated for the query heads sharing it."""
    groups = heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1) if groups > 1 else k


def _check_qk(q: torch.Tensor, k: torch.Tensor, *, finite: bool = False) -> None:
    """Raise unless ``q``, ``k`` are floating ``(batch, heads, seq, head_dim)`` tensors on one
    device that attention can pair (:func:`_check_heads`); with ``finite``, unless their
    values are finite too — a mask or a mass computed from NaN or infinite scores is wrong
    without a sign of it."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(
                f"{name} must be a floating 4-D tensor (batch, heads, seq, head_dim), got {got}"
            )
        if t.layout != torch.strided:  # a raw NotImplementedError of the first product
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                             "convert with `.to_dense()`")
    _check_device(q, k=k)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k must be (batch={q.shape[0]}, kv_heads dividing {q.shape[1]}, kv_len, "
            f"head_dim={q.shape[3]}), got {tuple(k.shape)}"
        )
    _check_heads(q, k)
    if finite:
        for name, t in (("q", q), ("k", k)):
            check_materialized(name, t)  # its values choose the mask: it must have some
            bad = int(t.numel() - t.isfinite().sum())
            if bad:
                raise ValueError(
                    f"{name} must hold finite values (the scores q · k are computed from "
                    f"it), got {bad} NaN or infinite ones"
                )


def _check_device(q: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raise unless every one of ``tensors`` is on ``q``'s device (a kernel given pointers
    from another device would read garbage)."""
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise unless ``q`` and ``k`` (of one ``head_dim``) have at least one head and
    ``head_dim`` ≥ 1, and the query heads are a multiple of the key/value heads (grouped-query
    attention shares each key/value head among as many query heads)."""
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] < 1 or t.shape[3] < 1:
            raise ValueError(
                f"{name} must have heads ≥ 1 and head_dim ≥ 1, got shape {tuple(t.shape)}"
            )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the query heads ({q.shape[1]}) must be a multiple of the key/value heads "
            f"({k.shape[1]}) (grouped-query attention)"
        )


def _check_mask(
    block_mask: torch.Tensor, tiles: tuple[int, int], *, block_size: int,
    batch: int | None = None, heads: int | None = None, name: str = "block_mask",
) -> None:
    """Raise unless ``block_mask`` is a dense bool ``(batch or 1, heads or 1, *tiles)``
    tensor, its first two sizes checked where ``batch`` and ``heads`` are known (any other
    would broadcast against the queries into a mask, or a mass, of the wrong shape); the
    error names it ``name``, the argument the caller gave it as. A sparse one failed in
    PyTorch with a raw ``NotImplementedError`` (``RuntimeError`` on the kernel path). A
    wrong type (no tensor, not bool, not strided) is an :class:`ArgumentTypeError`, as in
    every mask check; a wrong shape a ``ValueError``."""
    wrong_type = (not isinstance(block_mask, torch.Tensor) or block_mask.layout != torch.strided
                  or block_mask.dtype != torch.bool)
    if (
        wrong_type
        or block_mask.dim() != 4
        or tuple(block_mask.shape[2:]) != tiles
        or any(n is not None and size not in (1, n)
               for size, n in zip(block_mask.shape[:2], (batch, heads)))
    ):
        got = (f"{block_mask.dtype} {tuple(block_mask.shape)}{_layout(block_mask)}"
               if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__)
        raise (ArgumentTypeError if wrong_type else ValueError)(
            f"{name} must be a bool tensor (1 or {'batch' if batch is None else batch}, "
            f"1 or {'heads' if heads is None else heads}, {tiles[0]}, {tiles[1]}) for "
            f"block_size={block_size}, got {got}"
        )


def _layout(mask: torch.Tensor) -> str:
    """What a refusal adds about ``mask``'s layout: nothing for a dense (strided) one."""
    return ("" if mask.layout == torch.strided else
            f" of layout {mask.layout}; accepted: a dense (strided) one, `.to_dense()`")
