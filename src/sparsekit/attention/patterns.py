"""Training-free attention patterns: which (query block, key block) tiles to compute.

A pattern looks at the queries and keys of one attention call and returns the block mask
:func:`~sparsekit.attention.block_sparse_attention` runs on. Static patterns depend only
on positions; adaptive ones estimate where the softmax mass lies from a cheap proxy of
the scores and keep the fewest tiles that hold a ``threshold`` of it:

=================  =====================================================================
``sink_window``    attention sinks plus a sliding window (StreamingLLM)
``vertical_slash`` key columns and diagonals that carry the mass of the last queries
                   (MInference's online estimate), adaptive
``antidiagonal``   tiles scored by strided antidiagonal sums, kept up to a cumulative
                   mass threshold per query block (XAttention), adaptive
``top_k``          the highest-scoring tiles by mean-pooled ``q · k`` per query block
``exact``          the fewest tiles per query block holding ``threshold`` of the true
                   softmax mass: what the adaptive ones estimate, at more than the cost
                   of dense attention — a yardstick, not a speed-up
``dense``          every tile attention may use (the reference the others are measured by)
``mask``           a block mask the caller built (:class:`UserMask`)
=================  =====================================================================

Every pattern keeps, in each query block, the key blocks holding its rows' own positions
(two where the offset ``kv_len - q_len`` is no multiple of the block size), so no row loses
its nearest keys, and never keeps a tile causal attention cannot
use. :meth:`AttentionPattern.coverage` reports the density and the softmax mass a pattern
keeps (:mod:`sparsekit.attention.coverage`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_fits_memory,
    check_fraction,
    check_int,
    check_materialized,
)
from sparsekit.attention.coverage import (
    Coverage,
    _check_mask,
    _check_qk,
    _check_scores,
    _layout,
    blocks,
    bounded_block_size,
    repeat_kv,
    tile_mass,
    visible_pairs,
)
from sparsekit.registry import Registry

__all__ = [
    "ATTENTION_PATTERNS",
    "Antidiagonal",
    "AttentionPattern",
    "Dense",
    "Exact",
    "SinkWindow",
    "TopKBlocks",
    "UserMask",
    "VerticalSlash",
    "resolve_pattern",
]

_ESTIMATE_CHUNKS = 8  # query chunks of Antidiagonal's estimate (causal: fewer keys each)

ATTENTION_PATTERNS: Registry = Registry("pattern", meta={"adaptive": False})
"""Attention patterns by name; ``adaptive`` entries estimate where the softmax mass lies
and keep tiles up to a threshold of it."""


class AttentionPattern:
    """Base class: a pattern turns queries and keys into a block mask.

    Subclasses implement :meth:`tiles`; the base validates the arguments, keeps only
    tiles attention may use and adds each query block's local tile.
    """

    name: ClassVar[str]
    scored: ClassVar[bool] = False
    """Whether the mask is chosen from the values of ``q`` and ``k`` (then they must be
    finite: NaN or infinite scores would choose a wrong mask without a sign of it)."""

    def block_mask(
        self, q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, causal: bool = True
    ) -> torch.Tensor:
        """The bool block mask ``(batch or 1, heads or 1, q_blocks, kv_blocks)`` for ``q``
        ``(batch, heads, q_len, head_dim)`` and ``k`` ``(batch, kv_heads, kv_len, head_dim)``."""
        check_int("block_size", block_size, minimum=1)
        check_bool("causal", causal)
        _check_qk(q, k, finite=self.scored)
        self.check(block_size)
        block_size = _bounded(q, k, block_size)
        if not q.shape[2] or not k.shape[2]:  # no (query, key) pair: no tile to keep, as
            # block_sparse_attention takes it (was "q_len must be ≥ 1", a name never passed)
            return torch.zeros(1, 1, blocks(q.shape[2], block_size),
                               blocks(k.shape[2], block_size), dtype=torch.bool, device=q.device)
        visible = _visible(q, k, block_size, causal)
        if self.scored:  # its estimate holds a float32 table of every head's tiles
            check_fits_memory(
                4 * q.shape[0] * q.shape[1] * visible.numel(),
                f"pattern {self.name!r}: {visible.shape[0]} x {visible.shape[1]} tiles of "
                f"block_size={block_size} for {q.shape[0]} x {q.shape[1]} batch entries and "
                "heads make float32 score tables of",
                "accepted: a larger block_size, shorter sequences or fewer heads per call")
        mask = self.tiles(q, k, block_size=block_size, causal=causal, visible=visible)
        return _completed(mask, visible, q, k, block_size)

    def coverage(
        self, q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, causal: bool = True
    ) -> Coverage:
        """The density and the softmax mass recall of this pattern's mask on ``q``, ``k``
        (both of at least one position: the fractions of no pairs are not defined)."""
        _check_lengths(q, k)
        mask = self.block_mask(q, k, block_size=block_size, causal=causal)
        return Coverage.of(q, k, mask, block_size=_bounded(q, k, block_size), causal=causal)

    def check(self, block_size: int) -> None:
        """Raise ``ValueError`` when the pattern cannot tile with ``block_size``."""

    def tiles(
        self, q: torch.Tensor, k: torch.Tensor, *, block_size: int, causal: bool,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """The tiles this pattern chooses (the base intersects them with ``visible``, the
        ``(q_blocks, kv_blocks)`` tiles attention may use)."""
        raise NotImplementedError


def resolve_pattern(
    pattern: str | AttentionPattern | torch.Tensor, **options: Any
) -> AttentionPattern:
    """The pattern ``pattern`` names (built with ``options``), a pattern as is, or a bool
    block mask wrapped as :class:`UserMask`."""
    if isinstance(pattern, AttentionPattern):
        if options:
            raise TypeError(f"options {sorted(options)} apply to a pattern name, not to {pattern}")
        return pattern
    tensor = isinstance(pattern, torch.Tensor)
    if tensor:  # named as given: "mask" named a parameter the caller never passed
        _check_user_mask("pattern", pattern)
    cls = UserMask if tensor else ATTENTION_PATTERNS.get(pattern)
    accepted = [f.name for f in dataclasses.fields(cls)
                if f.init and not (tensor and f.name == "mask")]  # a tensor is the mask
    unknown = sorted(set(options) - set(accepted))
    if unknown:  # was "__init__() got an unexpected keyword argument", naming no pattern
        raise ArgumentTypeError(f"options {unknown} are not options of pattern {cls.name!r}; "
                                f"accepted: {accepted}")
    if not tensor:
        return cls(**options)
    made = UserMask(pattern, **options)
    object.__setattr__(made, "argument", "pattern")  # a mask that fails a call is this one
    return made


@ATTENTION_PATTERNS.register("dense")
@dataclass(frozen=True)
class Dense(AttentionPattern):
    """Every tile attention may use: the sparse kernel computes dense attention."""

    name: ClassVar[str] = "dense"

    def tiles(self, q, k, *, block_size, causal, visible):
        return visible[None, None]


@ATTENTION_PATTERNS.register("sink_window")
@dataclass(frozen=True)
class SinkWindow(AttentionPattern):
    """The first ``sinks`` tokens and a sliding ``window`` of tokens before each query
    (StreamingLLM: the first tokens soak up attention that has nowhere else to go).

    Tiles holding any sink or any key within ``window`` positions of a query in the
    block are kept (without ``causal`` the window extends as far after the query).
    """

    name: ClassVar[str] = "sink_window"
    sinks: int = 64
    window: int = 1024

    def __post_init__(self) -> None:
        check_int("sinks", self.sinks, minimum=0)
        check_int("window", self.window, minimum=1)

    def tiles(self, q, k, *, block_size, causal, visible):
        q_len, kv_len = q.shape[2], k.shape[2]
        first, last = _query_positions(q_len, kv_len, block_size, q.device)
        window = min(self.window, q_len + kv_len)  # as wide as any: no int64 overflow
        lo = first - window + 1
        hi = last if causal else last + window - 1
        start = torch.arange(blocks(kv_len, block_size), device=q.device) * block_size
        stop = start + block_size - 1
        near = (start[None, :] <= hi[:, None]) & (stop[None, :] >= lo[:, None])
        return (near | (start < min(self.sinks, kv_len))[None, :])[None, None]


@ATTENTION_PATTERNS.register("top_k")
@dataclass(frozen=True)
class TopKBlocks(AttentionPattern):
    """In each query block, the ``density`` share of its usable key blocks (at least one)
    with the highest mean-pooled score ``mean(q) · mean(k)``, per batch entry and head."""

    name: ClassVar[str] = "top_k"
    scored: ClassVar[bool] = True
    density: float = 0.1

    def __post_init__(self) -> None:
        check_fraction("density", self.density, zero=False, one=True)

    def tiles(self, q, k, *, block_size, causal, visible):
        scores = _pool(q, block_size) @ repeat_kv(_pool(k, block_size), q.shape[1]).mT
        _check_estimate(self.name, scores)
        scores = scores.masked_fill(~visible, -math.inf)
        keep = (visible.sum(-1) * self.density).ceil().clamp(min=1).long()  # (q_blocks,)
        ranks = scores.argsort(-1, descending=True).argsort(-1)
        return ranks < keep[:, None]


@dataclass(frozen=True)
class _MassThreshold(AttentionPattern):
    """Base of the patterns that keep the fewest tiles holding ``threshold`` (in (0, 1]) of
    the softmax mass: estimated from a proxy (the adaptive ones) or exact."""

    scored: ClassVar[bool] = True
    threshold: float = 0.95

    def __post_init__(self) -> None:
        check_fraction("threshold", self.threshold, zero=False, one=True)


@ATTENTION_PATTERNS.register("vertical_slash", adaptive=True)
@dataclass(frozen=True)
class VerticalSlash(_MassThreshold):
    """Key columns and diagonals holding ``threshold`` of the last queries' softmax mass
    (MInference's vertical-slash pattern, estimated online per batch entry and head).

    The softmax of the last ``last_queries`` queries over all keys is summed down each
    key column (verticals: tokens every query attends to) and along each diagonal
    (slashes: a fixed distance back). Ranked together by mass, the fewest columns and
    diagonals that cover ``threshold`` of the last queries' mass are kept (a key a kept
    column and a kept diagonal both cross counts once), each as the tiles it crosses;
    diagonals, being relative, carry over from the last queries to all of them.
    """

    name: ClassVar[str] = "vertical_slash"
    last_queries: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("last_queries", self.last_queries, minimum=1)

    def tiles(self, q, k, *, block_size, causal, visible):
        batch, heads, q_len, dim = q.shape
        kv_len = k.shape[2]
        n = min(self.last_queries, q_len)
        keys = repeat_kv(k, heads).float()
        scores = q[:, :, q_len - n:].float() @ keys.mT / math.sqrt(dim)
        _check_estimate(self.name, scores)
        dev = q.device
        rows = torch.arange(q_len - n, q_len, device=dev) + (kv_len - q_len)  # key positions
        back = rows[:, None] - torch.arange(kv_len, device=dev)[None, :]  # back to each key
        if causal:
            scores = scores.masked_fill(back < 0, -math.inf)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        slash = torch.zeros(batch, heads, kv_len + n - 1, device=dev)  # bin back + n - 1
        # sizes spelled out: -1 is ambiguous for an empty batch
        slash.scatter_add_(2, (back + n - 1).expand_as(probs).reshape(batch, heads, n * kv_len),
                           probs.reshape(batch, heads, n * kv_len))
        keep = _fewest_covering(probs, slash, back + n - 1, self.threshold)
        vertical, slash = keep[..., :kv_len], keep[..., kv_len:]

        kb, qb = blocks(kv_len, block_size), visible.shape[0]
        columns = torch.zeros(batch, heads, kb * block_size, dtype=torch.bool, device=dev)
        columns[..., :kv_len] = vertical
        columns = columns.view(batch, heads, kb, block_size).any(-1)[:, :, None, :]
        # A diagonal ``back`` keys behind the queries meets, in query block i, the key
        # blocks i + floor((offset - back) / B) and i + floor((offset - back + B - 1) / B):
        # two block diagonals, the same for every query block.
        back = torch.arange(1 - n, kv_len, device=dev)
        offset = kv_len - q_len
        lowest = (offset - kv_len + 1) // block_size
        diagonals = torch.zeros(batch, heads, (offset + n + block_size - 2) // block_size
                                - lowest + 1, device=dev)
        for edge in (offset - back, offset - back + block_size - 1):
            at = (edge.div(block_size, rounding_mode="floor") - lowest).expand_as(slash)
            diagonals.scatter_add_(2, at, slash.float())
        relative = (torch.arange(kb, device=dev)[None, :]
                    - torch.arange(qb, device=dev)[:, None] - lowest)
        inside = (relative >= 0) & (relative < diagonals.shape[2])
        bands = (diagonals > 0)[..., relative.clamp(0, diagonals.shape[2] - 1)] & inside
        return columns | bands


@ATTENTION_PATTERNS.register("antidiagonal", adaptive=True)
@dataclass(frozen=True)
class Antidiagonal(_MassThreshold):
    """Tiles scored by strided antidiagonal sums, the fewest per query block holding
    ``threshold`` of the estimated mass (XAttention), per batch entry and head.

    Every ``stride`` consecutive queries are read as one reversed long vector and every
    ``stride`` keys as one long vector, so one product sums a ``stride``-long antidiagonal
    of the score matrix; each antidiagonal crosses every row and column of its
    ``stride``-square once, so a softmax over them estimates the mass of each tile at
    ``1 / stride`` of the cost of the scores.
    """

    name: ClassVar[str] = "antidiagonal"
    stride: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("stride", self.stride, minimum=1)

    def check(self, block_size: int) -> None:
        if block_size % self.stride:
            raise ValueError(
                f"block_size must be a multiple of stride={self.stride}, got {block_size}"
            )

    def tiles(self, q, k, *, block_size, causal, visible):
        batch, heads, q_len, dim = q.shape
        kv_len, stride = k.shape[2], self.stride
        qb, kb = visible.shape
        if qb == kb == 1:  # the one tile is each query block's local one, kept regardless (a
            return visible.expand(batch, heads, 1, 1)  # stride past q, k: block_size bounded)
        per = block_size // stride
        long_q = _padded(q, qb * block_size).unflatten(2, (-1, stride)).flip(3).flatten(3)
        long_k = _padded(repeat_kv(k, heads), kb * block_size).unflatten(2, (-1, stride))
        long_k = long_k.flatten(3)
        q_first = torch.arange(qb * per, device=q.device) * stride  # first query of a stride
        k_first = torch.arange(kb * per, device=q.device) * stride
        offset = kv_len - q_len
        mass = torch.zeros(batch, heads, qb, kb, device=q.device)
        step = -(-qb // _ESTIMATE_CHUNKS)
        for b0 in range(0, qb, step):  # causal: a chunk of query blocks scores only the keys
            b1 = min(qb, b0 + step)    # up to its last query, about half of them in all
            last = (b1 * block_size - 1 + offset) // block_size  # key block of its last query
            end = min(kb, max(1, last + 1)) if causal else kb
            rows, keys = q_first[b0 * per: b1 * per], k_first[: end * per]
            scores = long_q[:, :, b0 * per: b1 * per] @ long_k[:, :, : end * per].mT
            usable = keys[None, :] < kv_len
            if causal:
                usable = usable & (keys[None, :] <= rows[:, None] + stride - 1 + offset)
            _check_estimate(self.name, scores.div_(math.sqrt(dim) * stride))
            scores = scores.masked_fill_(~usable, -math.inf)
            probs = torch.softmax(scores, -1).nan_to_num_(0.0) * (rows < q_len)[:, None].float()
            mass[:, :, b0:b1, :end] = probs.view(batch, heads, b1 - b0, per, end, per).sum((3, 5))
        return _fewest(mass, self.threshold)


@ATTENTION_PATTERNS.register("exact")
@dataclass(frozen=True)
class Exact(_MassThreshold):
    """The fewest tiles per query block holding ``threshold`` of its true softmax mass
    (:func:`~sparsekit.attention.coverage.tile_mass`), per batch entry and head.

    The adaptive patterns estimate this mask from a cheap proxy; computing it reads every
    score, more work than dense attention. Its density is the least any block mask needs
    for ``threshold`` of the mass in every query block, so it bounds what they can gain.
    """

    name: ClassVar[str] = "exact"

    def tiles(self, q, k, *, block_size, causal, visible):
        return _fewest(tile_mass(q, k, block_size=block_size, causal=causal), self.threshold)

    def coverage(
        self, q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, causal: bool = True
    ) -> Coverage:
        """As every pattern's, reading the scores once: the tile masses that choose the
        tiles also measure what they keep."""
        check_int("block_size", block_size, minimum=1)
        _check_qk(q, k, finite=True)
        _check_lengths(q, k)
        block_size = _bounded(q, k, block_size)
        mass = tile_mass(q, k, block_size=block_size, causal=causal)  # checks the rest
        visible = _visible(q, k, block_size, causal)
        mask = _completed(_fewest(mass, self.threshold), visible, q, k, block_size)
        return Coverage.of(q, k, mask, block_size=block_size, causal=causal, mass=mass)


@ATTENTION_PATTERNS.register("mask")
@dataclass(frozen=True, eq=False)
class UserMask(AttentionPattern):
    """A block mask the caller chose: a bool tensor ``(batch or 1, heads or 1, q_blocks,
    kv_blocks)``, or a function ``(q_len, kv_len, block_size) -> tensor`` for masks that
    follow the sequence length."""

    name: ClassVar[str] = "mask"
    mask: torch.Tensor | Callable[[int, int, int], torch.Tensor]
    argument: str = dataclasses.field(default="mask", init=False, repr=False)
    """The argument the caller gave the tensor as, which a call's refusal names: ``mask``,
    or ``pattern`` where :func:`resolve_pattern` (``sparsekit.attention.apply``) wrapped it
    (a mask that did not fit a call named ``mask``, a parameter never passed)."""

    def __post_init__(self) -> None:
        if not callable(self.mask) and not isinstance(self.mask, torch.Tensor):
            raise TypeError(
                "mask must be a bool tensor or a function (q_len, kv_len, block_size) -> "
                f"tensor, got {type(self.mask).__name__}"
            )
        if isinstance(self.mask, torch.Tensor):
            _check_user_mask("mask", self.mask)

    def tiles(self, q, k, *, block_size, causal, visible):
        mask, name = self.mask, self.argument
        if not isinstance(mask, torch.Tensor):  # its errors name the call that made it
            name = f"mask({q.shape[2]}, {k.shape[2]}, {block_size})"
            mask = mask(q.shape[2], k.shape[2], block_size)
        _check_mask(mask, tuple(visible.shape), block_size=block_size, batch=q.shape[0],
                    heads=q.shape[1], name=name)
        if not q.is_meta:  # a meta mask has no tiles to copy to q's device
            check_materialized(name, mask)
        return mask.to(q.device)  # the block mask is on q's device, as every pattern's


def _check_user_mask(name: str, mask: torch.Tensor) -> None:
    """Raise unless ``mask``, the tensor of a :class:`UserMask` given as ``name`` (``mask``,
    or ``pattern`` to :func:`resolve_pattern`), is a dense 4-D bool tensor (its sizes are
    checked against each call's queries and keys); a sparse one failed in every call with a
    raw ``NotImplementedError``. A wrong dtype or layout is an
    :class:`~sparsekit._checks.ArgumentTypeError`, a wrong number of dimensions a
    ``ValueError``, as in every block-mask check."""
    wrong_type = mask.dtype != torch.bool or mask.layout != torch.strided
    if wrong_type or mask.dim() != 4:
        raise (ArgumentTypeError if wrong_type else ValueError)(
            f"{name} must be a bool tensor (batch or 1, heads or 1, q_blocks, kv_blocks), "
            f"got {mask.dtype} {tuple(mask.shape)}{_layout(mask)}"
        )


def _check_estimate(pattern: str, scores: torch.Tensor) -> None:
    """Raise unless every score a scored pattern estimated from ``q`` and ``k`` (finite, as
    checked) is finite in float32 (:func:`~sparsekit.attention.coverage._check_scores`)."""
    _check_scores(scores, f"pattern {pattern!r}: the scores it estimates from q and k",
                  "the magnitudes of q and k are too large; accepted: q and k whose products "
                  "fit float32 (rescale them)")


def _check_lengths(q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise unless ``q`` and ``k`` hold at least one position each: a coverage is a
    fraction of their attendable pairs (the check of ``q_len`` named an argument no caller
    of a pattern passes)."""
    if not q.shape[2] or not k.shape[2]:
        raise ValueError(f"q and k must have seq ≥ 1 for a coverage (a fraction of the "
                         f"attendable pairs), got q {tuple(q.shape)} and k {tuple(k.shape)}")


def _bounded(q: torch.Tensor, k: torch.Tensor, block_size: int) -> int:
    """:func:`~sparsekit.attention.coverage.bounded_block_size` of ``q`` and ``k``."""
    return bounded_block_size(q.shape[2], k.shape[2], block_size)


def _query_positions(q_len: int, kv_len: int, block_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-coordinate positions of the first and last query of each query block (on
    ``device``: q's)."""
    first = torch.arange(blocks(q_len, block_size), device=device) * block_size
    last = torch.clamp(first + block_size, max=q_len) - 1
    return first + kv_len - q_len, last + kv_len - q_len


def _visible(q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool) -> torch.Tensor:
    """The tiles of ``q``, ``k`` that attention may use (a visible pair inside): bool
    ``(q_blocks, kv_blocks)`` on ``q``'s device (a mask built elsewhere would leave the
    pattern's block mask on the CPU, or fail to combine with q's tensors)."""
    pairs = visible_pairs(q.shape[2], k.shape[2], block_size=block_size, causal=causal)
    return (pairs > 0).to(q.device)


def _completed(tiles: torch.Tensor, visible: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               block_size: int) -> torch.Tensor:
    """A pattern's ``tiles`` with each query block's local tile added, limited to the
    ``visible`` ones (:func:`_visible`): the block mask."""
    return (tiles | _local(q.shape[2], k.shape[2], block_size, q.device)) & visible


def _local(q_len: int, kv_len: int, block_size: int, device: torch.device) -> torch.Tensor:
    """The key blocks holding the positions of each query block's rows (its diagonal):
    ``(q_blocks, kv_blocks)`` on ``device``. Where ``kv_len - q_len`` is no multiple of the
    block size a query block's rows lie in two key blocks: with the last row's alone, the
    earlier rows lost their nearest keys (a causal row all of them: an output of 0)."""
    first, last = _query_positions(q_len, kv_len, block_size, device)
    kb = blocks(kv_len, block_size)
    cols = torch.arange(kb, device=device)[None, :]
    lo = (first.clamp(min=0) // block_size).clamp(max=kb - 1)[:, None]
    return (cols >= lo) & (cols <= (last // block_size).clamp(0, kb - 1)[:, None])


def _fewest(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """Along the last dim, the fewest largest entries whose sum reaches ``threshold`` of
    the total (at least one)."""
    ordered, order = mass.sort(-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the larger entries
    keep = before < threshold * mass.sum(-1, keepdim=True)
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _fewest_covering(probs: torch.Tensor, slash: torch.Tensor, diagonal: torch.Tensor,
                     threshold: float) -> torch.Tensor:
    """The fewest of ``kv_len`` columns and ``slash.shape[-1]`` diagonals, taken in order of
    their mass (columns ``probs.sum(2)``, diagonals ``slash``), whose union covers
    ``threshold`` of ``probs`` ``(batch, heads, n, kv_len)``; ``diagonal`` ``(n, kv_len)``
    is each entry's diagonal. Counted item by item, each key a column and a diagonal both
    held counted twice: one decoded query, whose every key is a column and a diagonal of
    equal mass, kept 0.63 of the mass for a threshold of 0.9.

    An entry is covered from the first of its two items in the ranking on, so the mass
    covered by the first ``m`` items is the cumulative sum of the entries' mass binned by
    that first rank."""
    kv_len = probs.shape[-1]
    mass = torch.cat([probs.sum(2), slash], -1)
    order = mass.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(mass.shape[-1], device=mass.device).expand_as(order))
    first = torch.minimum(  # each entry's first item: its column or its diagonal
        rank[..., None, :kv_len],
        rank[..., kv_len:].gather(-1, diagonal.flatten().expand(*rank.shape[:-1], -1))
        .unflatten(-1, diagonal.shape))
    covered = torch.zeros_like(mass).scatter_add_(-1, first.flatten(2), probs.flatten(2))
    before = covered.cumsum(-1) - covered
    count = (before < threshold * probs.sum((2, 3))[..., None]).sum(-1, keepdim=True)
    return rank < count.clamp(min=1)


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` in float32 with zeros appended along the sequence up to ``length``."""
    x = x.float()
    return torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


def _pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each block of tokens: ``(batch, heads, blocks, head_dim)`` in float32."""
    n = x.shape[2]
    nb = blocks(n, block_size)
    sums = _padded(x, nb * block_size).unflatten(2, (nb, block_size)).sum(3)
    sizes = torch.clamp(n - torch.arange(nb, device=x.device) * block_size, max=block_size)
    return sums / sizes[:, None]
