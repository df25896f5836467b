"""Which shapes a mask may take: unstructured, N:M, blocks, whole rows, constant fan-in and
whole channels.

A pattern turns a layer's scores and a number of weights to keep into a boolean mask
of that shape. Every pattern works on the weight's 2-D view ``(out, in · kernel)``: the
input dimension is the flattened (input channel × kernel position) axis, which is the
axis sparse kernels and N:M hardware compress along. ``"channel"`` and ``"head"`` span
layers: they mask whole dependency groups (see :mod:`sparsekit.structured`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int
from sparsekit.registry import Registry
from sparsekit.select import check_real, top_k
from sparsekit.targets import Target

if TYPE_CHECKING:
    from sparsekit.structured.dependency import Group

PATTERNS: Registry = Registry("pattern")

_ACCEPTED = ("'unstructured', 'N:M' (e.g. '2:4'), 'block:RxC' (e.g. 'block:4x4'), 'row', "
             "'fanin', 'channel' or 'head' (kept counts rounded to multiples of 8: 'channel:8')")


class Pattern:
    """Base class: ``mask(scores, keep)`` plus shape checks and the highest density."""

    spec: str
    grouped = False
    """Whether the pattern masks dependency groups across layers (``select``) rather than
    one layer at a time (``mask``)."""

    def check(self, shape: torch.Size, name: str) -> None:
        """Raise ``ValueError`` when ``shape`` cannot carry this pattern."""

    def max_density(self) -> float:
        return 1.0

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        raise NotImplementedError

    def is_valid(self, mask: torch.Tensor) -> bool:
        """Whether ``mask`` obeys the pattern."""
        return True

    def __str__(self) -> str:
        return self.spec


def parse_pattern(spec: str | Pattern) -> Pattern:
    """Resolve ``"unstructured"``, ``"2:4"``, ``"block:4x4"``, ``"row"``, ``"fanin"``,
    ``"channel"`` or ``"head"`` to a :class:`Pattern`."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str):
        raise ArgumentTypeError(
            f"pattern must be a string ({_ACCEPTED}), got {type(spec).__name__}")
    family = spec.split(":")[0]
    if ":" in spec and family not in ("block", "channel", "head"):
        family = "nm"
    if family not in PATTERNS or spec == "nm":
        raise ValueError(f"unknown pattern {spec!r}; accepted: {_ACCEPTED}")
    parsed = PATTERNS.get(family)(spec)
    if not isinstance(parsed, Pattern):  # a registered factory's bug failed at first use
        raise TypeError(f"the pattern factory registered as {family!r} must return a Pattern "
                        f"for {spec!r}, got {type(parsed).__name__}")
    return parsed


@dataclass(frozen=True)
class Unstructured(Pattern):
    spec: str = "unstructured"

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        _check_mask_args(scores, keep)
        return top_k(scores, keep)


def _check_mask_args(scores: object, keep: object) -> None:
    """Raise unless ``scores`` is a real tensor (:func:`~sparsekit.select.check_real`) and
    ``keep`` an int ≥ 0, the arguments of :meth:`Pattern.mask`: rows, blocks and fan-in took
    a ``keep`` of ``-1`` or ``True`` (rows and blocks ``1.5`` too) and gave a mask, and a list
    of scores failed with an ``AttributeError``."""
    check_real(scores, "scores")
    check_int("keep", keep, minimum=0)


def _check_rows(spec: str, shape: torch.Size, name: str) -> None:
    """Raise ``ValueError`` when ``shape`` has no rows to group by (a 0-d parameter, which
    failed with an IndexError from inside the pattern)."""
    if len(shape) == 0:
        raise ValueError(f"pattern {spec!r} keeps or prunes whole rows (or tiles of them), "
                         f"but {name!r} is a scalar (shape ()); use 'unstructured' or exclude "
                         "it")


def _view2d(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(out, in · kernel)``; unlike ``reshape(out, -1)`` also for a weight of no
    elements (a zero-width layer), whose rows are then empty."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


@PATTERNS.register("unstructured")
def _unstructured(spec: str) -> Pattern:
    return Unstructured()


@dataclass(frozen=True)
class NM(Pattern):
    """At most ``n`` nonzeros in every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"

    def check(self, shape: torch.Size, name: str) -> None:
        cols = math.prod(shape[1:])
        if len(shape) < 2 or cols % self.m:
            raise ValueError(
                f"pattern {self.spec!r} needs the input dimension of {name!r} to be a multiple "
                f"of {self.m}; its weight has shape {tuple(shape)} ({cols} inputs)"
            )

    def max_density(self) -> float:
        return self.n / self.m

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """The ``n`` highest ``scores`` of every group of ``m`` inputs (ties to the lower
        index, as :func:`~sparsekit.select.top_k`), thinned to ``keep`` overall. A width
        that is no multiple of ``m`` is a ``ValueError`` (:meth:`check`): its groups had
        run across rows, keeping 2 and 4 of the 6 inputs of two rows under ``"2:4"``."""
        _check_mask_args(scores, keep)
        self.check(scores.shape, "scores")
        groups = scores.reshape(-1, self.m)
        nm = top_k(groups, self.n, dim=1)
        if keep < int(nm.sum()):  # sparser than N:M: thin out within the N:M mask
            nm = top_k(groups.masked_fill(~nm, float("-inf")), keep)
        return nm.reshape(scores.shape)

    def is_valid(self, mask: torch.Tensor) -> bool:
        if mask.dim() < 2 or math.prod(mask.shape[1:]) % self.m:
            return False  # groups would run across rows
        return bool((mask.reshape(-1, self.m).sum(1) <= self.n).all())


@PATTERNS.register("nm")
def _nm(spec: str) -> Pattern:
    match = re.fullmatch(r"([0-9]+):([0-9]+)", spec)  # \d: any script's digits
    if not match:
        raise ValueError(f"malformed N:M pattern {spec!r}; expected integers like '2:4'")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"pattern {spec!r} needs 0 < N < M (e.g. '2:4', '1:4', '4:8')")
    return NM(n, m)


@dataclass(frozen=True)
class Block(Pattern):
    """Whole ``r × c`` tiles of the 2-D weight view are kept or pruned together."""

    r: int
    c: int

    @property
    def spec(self) -> str:
        return f"block:{self.r}x{self.c}"

    def check(self, shape: torch.Size, name: str) -> None:
        _check_rows(self.spec, shape, name)
        rows, cols = shape[0], math.prod(shape[1:])
        if rows % self.r or cols % self.c:
            raise ValueError(
                f"pattern {self.spec!r} does not divide {name!r}: its 2-D view is "
                f"{rows}x{cols}; use a block shape whose sides divide it"
            )

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Keep the ``keep / (r·c)`` tiles of the highest summed scores; ``-inf`` entries
        (weights already pruned) add nothing to a tile's sum, and a tile of nothing else is
        never kept (one such entry summed a whole tile to ``-inf``, ranked below every other)."""
        _check_mask_args(scores, keep)
        tiles = self._tiles(_view2d(scores))
        dead = torch.isneginf(tiles)
        kept = top_k(tiles.masked_fill(dead, 0).sum((1, 3)), round(keep / (self.r * self.c)),
                     allowed=~dead.all(3).all(1))
        rows, cols = kept.shape
        full = kept[:, None, :, None].expand(rows, self.r, cols, self.c)
        return full.reshape(scores.shape)

    def is_valid(self, mask: torch.Tensor) -> bool:
        tiles = self._tiles(_view2d(mask)).sum((1, 3))
        return bool(((tiles == 0) | (tiles == self.r * self.c)).all())

    def _tiles(self, w2d: torch.Tensor) -> torch.Tensor:
        rows, cols = w2d.shape
        return w2d.reshape(rows // self.r, self.r, cols // self.c, self.c)


@PATTERNS.register("block")
def _block(spec: str) -> Pattern:
    match = re.fullmatch(r"block:([0-9]+)x([0-9]+)", spec)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"malformed block pattern {spec!r}; expected 'block:RxC' like 'block:4x4'")
    return Block(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class Row(Pattern):
    """Whole output neurons (or conv filters) are kept or pruned."""

    spec: str = "row"

    def check(self, shape: torch.Size, name: str) -> None:
        _check_rows(self.spec, shape, name)

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Keep the ``keep / width`` rows of the highest summed scores; ``-inf`` entries
        (weights already pruned) add nothing to a row's sum, and a row of nothing else is
        never kept (one such entry summed a whole row to ``-inf``, ranked below every other)."""
        _check_mask_args(scores, keep)
        rows = _view2d(scores)
        dead = torch.isneginf(rows)
        kept = top_k(rows.masked_fill(dead, 0).sum(1), round(keep / max(rows.shape[1], 1)),
                     allowed=~dead.all(1))
        return kept[:, None].expand_as(rows).reshape(scores.shape)

    def is_valid(self, mask: torch.Tensor) -> bool:
        rows = _view2d(mask)
        return bool((rows.all(1) | ~rows.any(1)).all())


@PATTERNS.register("row")
def _row(spec: str) -> Pattern:
    if spec != "row":
        raise ValueError(f"unknown pattern {spec!r}; accepted: {_ACCEPTED}")
    return Row()


@dataclass(frozen=True)
class FanIn(Pattern):
    """Constant fan-in: every output neuron keeps the same number of inputs (SRigL's shape).

    The live rows share ``keep`` equally, ``keep // rows`` inputs each (at most the row
    width), so the mask never holds more than ``keep``; it holds exactly ``keep`` when the
    rows divide it. A row with no finite score (a dead neuron: every weight already pruned,
    or ablated by SRigL) keeps nothing and its share goes to the others. When ``keep`` is
    smaller than the number of live rows, the ``keep`` rows with the highest top score keep
    one input each and the others none (SRigL ablates neurons rather than a whole layer):
    the mask then holds exactly ``keep``, and cuts a layer off only when ``keep`` is 0.
    Stored condensed by the ``fanin`` execution format.
    """

    spec: str = "fanin"

    def check(self, shape: torch.Size, name: str) -> None:
        _check_rows(self.spec, shape, name)

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        _check_mask_args(scores, keep)
        rows = _view2d(scores)
        if rows.shape[1] == 0:  # a zero-width layer: nothing to keep, no top score per row
            return torch.zeros_like(scores, dtype=torch.bool)
        live = ~torch.isneginf(rows).all(1)
        kept_rows, per_row = fan_in_split(keep, int(live.sum()), rows.shape[1])
        chosen = top_k(rows.amax(1), kept_rows, allowed=live)  # all live rows unless fan-in 1
        return (top_k(rows, per_row, dim=1) & chosen[:, None]).reshape(scores.shape)

    def is_valid(self, mask: torch.Tensor) -> bool:
        return fan_in(_view2d(mask)) is not None


def fan_in_split(keep: int, rows: int, width: int) -> tuple[int, int]:
    """How constant fan-in spends ``keep`` weights on ``rows`` live rows of ``width`` inputs:
    ``(rows kept, inputs per kept row)``.

    Each row gets ``keep // rows`` inputs (at most ``width``); when that is 0, ``keep`` rows
    get one input each and the rest are ablated, so a layer with a budget is never cut off.
    """
    if min(keep, rows, width) <= 0:
        return 0, 0
    per_row = min(max(keep // rows, 1), width)
    return min(rows, keep // per_row), per_row


def fan_in(mask: torch.Tensor) -> int | None:
    """The common nonzero count of the nonempty rows of a 2-D ``mask`` (0 if all are empty),
    or ``None`` when two nonempty rows differ."""
    counts = torch.count_nonzero(mask, dim=1)
    counts = counts[counts > 0]
    if counts.numel() == 0:
        return 0
    k = int(counts[0])
    return k if bool((counts == k).all()) else None


@PATTERNS.register("fanin")
def _fanin(spec: str) -> Pattern:
    return FanIn()


class GroupPattern(Pattern):
    """Base of the patterns that mask whole dependency groups across layers: a subclass
    names its groups; which channels of each go is decided by
    :func:`sparsekit.structured.importance.channel_masks`."""

    grouped = True

    def groups(self, model: nn.Module) -> list[Group]:
        raise NotImplementedError

    def mask(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        raise ValueError(f"pattern {self.spec!r} masks whole groups across layers: use "
                         f"prune(..., pattern={self.spec!r}) or compute_masks, not Pattern.mask")

    round_to: int = 1
    """Kept channel counts are multiples of this (see
    :func:`~sparsekit.structured.importance.round_count`); ``"channel:8"`` sets it."""

    def __post_init__(self) -> None:
        from sparsekit.structured.importance import check_round_to

        check_round_to(self.round_to)

    def select(self, model: nn.Module, targets: list[Target], scores: dict[str, torch.Tensor],
               allocate: Callable[[dict[str, torch.Tensor], float], dict[str, int]],
               sparsity: float, *, readers_only: bool = False, strict: bool = False
               ) -> dict[str, torch.Tensor]:
        """The target masks that remove each group's least important channels
        (``readers_only``: rank them by their reader columns, for criteria such as FLAP;
        ``strict``: a ``ValueError`` when none goes, see
        :func:`~sparsekit.structured.importance.channel_masks`)."""
        from sparsekit.structured.importance import channel_masks

        return channel_masks(model, targets, scores, allocate, sparsity, self.groups(model),
                             readers_only=readers_only, round_to=self.round_to, strict=strict)

    def __str__(self) -> str:
        return self.spec if self.round_to == 1 else f"{self.spec}:{self.round_to}"


def _group_spec(spec: str) -> int:
    """The ``round_to`` of ``"channel"`` / ``"channel:8"`` (``"head:…"`` alike)."""
    family, colon, count = spec.partition(":")
    if not colon:
        return 1
    # not str.isdigit: it passes '²' (which int() refuses, unnamed) and '٣' (read as 3)
    if not re.fullmatch(r"[0-9]+", count) or int(count) < 1:
        raise ValueError(f"pattern {spec!r}: the count after {family!r} rounds kept channels "
                         f"and must be an int ≥ 1 in ASCII digits (e.g. '{family}:8')")
    return int(count)


@dataclass(frozen=True)
class Channel(GroupPattern):
    """Whole channels of dependency groups: a conv's filters with their BatchNorm entries,
    every residual branch added to them and the input columns of every reader, so that
    :func:`~sparsekit.shrink` can hand back a smaller dense model with the same outputs.
    ``sparsity`` is the fraction of channels removed (per group with ``"uniform"``,
    across groups with ``"global"``); each group keeps at least one channel.
    ``"channel:8"`` (``round_to=8``) keeps counts that are multiples of 8."""

    spec: str = "channel"
    round_to: int = 1

    def groups(self, model: nn.Module) -> list[Group]:
        from sparsekit.structured.dependency import dependency_groups  # traces with torch.fx

        return dependency_groups(model)


@PATTERNS.register("channel")
def _channel(spec: str) -> Pattern:
    return Channel(round_to=_group_spec(spec))


@dataclass(frozen=True)
class Head(GroupPattern):
    """Whole attention heads of a Hugging Face transformer (LLaMA/Mistral/Qwen2, BERT): the
    q/k/v rows and o columns of a key/value head and the query heads that read it. Pass
    the same groups to :func:`~sparsekit.shrink` (``groups=transformer_groups(model,
    "heads")``); :func:`sparsekit.llm.prune_structured` also updates the config."""

    spec: str = "head"
    round_to: int = 1

    def groups(self, model: nn.Module) -> list[Group]:
        from sparsekit.structured.transformer import transformer_groups

        return transformer_groups(model, "heads")


@PATTERNS.register("head")
def _head(spec: str) -> Pattern:
    return Head(round_to=_group_spec(spec))
