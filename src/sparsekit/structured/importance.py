"""Which channels go: group importance from per-weight scores, then a whole-group mask.

A criterion scores every weight (``magnitude`` is ‖W‖₁ per channel here, ``wanda`` is
Wanda-SP's ‖W‖·‖X‖, ``snip`` first-order Taylor …); a channel's importance is the mean
score over every scored weight of its group — writer rows and reader columns on all
branches, and the channel's BatchNorm scales where the criterion scores them
(``magnitude``: Torch-Pruning's group magnitude counts γ too) — so groups of different
sizes compare on one scale for ``allocation="global"``.
A criterion that ranks input columns (``readers_only``: FLAP) is read from the reader
columns alone.

``round_to`` makes every kept count a multiple the dense kernels like (8, 16 …): see
:func:`round_count`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_int,
    check_materialized,
    check_positive,
)
from sparsekit.allocation import ALLOCATIONS
from sparsekit.select import top_k
from sparsekit.structured.dependency import Group, Slice, check_group, dependency_groups
from sparsekit.targets import DEFAULT_TYPES, Target

__all__ = ["channel_masks", "check_round_to", "check_scoring", "group_importance", "powered",
           "round_count", "rounding_step", "score_part"]

Allocate = Callable[[dict[str, torch.Tensor], float], dict[str, int]]


def group_importance(group: Group, scores: Mapping[str, torch.Tensor], *,
                     readers_only: bool = False, power: float = 1.0) -> torch.Tensor | None:
    """Mean score per channel over the scored weights of ``group`` (``None``: none scored);
    with ``readers_only`` over the columns that read the channels only. With ``power``
    each entry (a row or column of a slice) counts as its mean score raised to it, once
    per weight it holds (FLAP squares its heads' column metric, see
    :func:`~sparsekit.structured.adaptive.standardized_importance`). Computed in float64
    (finite scores never overflow to a tie of infs) and returned in float32, or float64
    where ``power`` takes a mean beyond float32's range; NaN/inf scores are a
    ``ValueError``, and so is a ``power`` that is not a positive finite number (NaN or a
    negative power of a zero score ranked every channel as a tie). ``group`` is checked
    (:func:`~sparsekit.structured.dependency.check_group`): anything else, or a negative
    offset, failed with a raw ``AttributeError`` or ``RuntimeError``."""
    check_group("group", group)
    check_scoring(scores, readers_only, power)
    total = torch.zeros(group.channels, dtype=torch.float64)
    count = 0
    for s in group.slices:
        if s.name not in scores or (readers_only and s.role != "in"):
            continue
        # float64: sums (and powers) of finite float32 scores stay finite
        part = score_part(group, s, scores[s.name])
        if power != 1:
            entries = part.reshape(group.channels * s.repeat, math.prod(part.shape[1:]))
            part = powered(s.name, entries.mean(1, keepdim=True), power).expand_as(entries)
        part = part.reshape(group.channels, s.repeat * math.prod(part.shape[1:]))
        total += part.sum(1).cpu()
        count += part.shape[1]
    if not count:
        return None
    mean = total / count
    small = mean.float()  # float32, unless a power took the means past its range
    return small if bool(torch.isfinite(small).all()) else mean


def check_scoring(scores: object, readers_only: object, power: object) -> None:
    """Raise unless ``scores`` is a mapping (a list of tensors scored nothing, silently),
    ``readers_only`` a bool and ``power`` a positive finite number."""
    if not isinstance(scores, Mapping):
        raise ArgumentTypeError(f"scores must be a mapping of parameter name to score tensor, "
                                f"got {type(scores).__name__}")
    check_bool("readers_only", readers_only)
    check_positive("power", power)


def powered(name: str, means: torch.Tensor, power: float) -> torch.Tensor:
    """``means`` (the mean scores of the entries of ``scores[name]``) raised to ``power``;
    ``ValueError`` where a negative mean meets a power that is no integer: its root is NaN,
    and every importance of the group (all its z-scores) came back NaN without a sign."""
    if power != int(power) and bool((means < 0).any()):
        raise ValueError(f"scores[{name!r}] has negative mean scores (down to "
                         f"{float(means.min()):.3g}), which power={power!r} turns into NaN; "
                         "accepted: scores ≥ 0 (magnitudes) with a fractional power, or an "
                         "integer power")
    return means ** power


def score_part(group: Group, s: Slice, score: object) -> torch.Tensor:
    """The entries of ``score`` (the score of ``s.name``) that ``s`` gives ``group``'s
    channels, along dimension 0, in float64; ``ValueError`` when ``score`` is not a
    real tensor that holds them or holds NaN/inf (a ranking of NaN is arbitrary; a complex
    one lost its imaginary part; a bool mask ranked channels by their kept counts); a
    sparse one is read densely, a meta one is refused."""
    extent = s.offset + group.channels * s.repeat
    if not isinstance(score, torch.Tensor) or not -score.dim() <= s.dim < score.dim() \
            or score.shape[s.dim] < extent:
        found = (f"a {type(score).__name__}" if not isinstance(score, torch.Tensor)
                 else f"shape {tuple(score.shape)}")
        raise ValueError(f"scores[{s.name!r}] does not fit group {group.name!r}: it needs "
                         f"{extent} entries along dim {s.dim}, got {found}")
    if score.is_complex() or score.dtype == torch.bool:  # a bool mask ranked as 0s and 1s
        raise ValueError(f"scores[{s.name!r}] must be a real tensor, got dtype {score.dtype}; "
                         "accepted: float or int scores (a keep-mask is no score)")
    check_materialized(f"scores[{s.name!r}]", score)
    if score.layout != torch.strided:
        score = score.to_dense()
    part = score.detach().to(torch.float64).movedim(s.dim, 0)[s.offset: extent].cpu()
    if part.numel() and not bool(torch.isfinite(part).all()):
        bad = float(part[~torch.isfinite(part)][0])
        raise ValueError(f"scores[{s.name!r}] holds {bad} for channels of group "
                         f"{group.name!r}; accepted: finite scores (NaN/inf weights or "
                         "calibration activations that overflow?)")
    return part


def channel_masks(
    model: nn.Module,
    targets: list[Target],
    scores: Mapping[str, torch.Tensor],
    allocate: Allocate,
    sparsity: float,
    groups: Sequence[Group] | None = None,
    *,
    readers_only: bool = False,
    round_to: int = 1,
    strict: bool = False,
) -> dict[str, torch.Tensor]:
    """Masks of ``targets`` that remove the least important ``sparsity`` of the channels
    of every group whose Linear/Conv weights — writers and readers — are all targets (how
    many per group is ``allocate``'s answer; each group keeps at least one). ``groups``
    defaults to :func:`~sparsekit.structured.dependency_groups` of ``model``.
    ``readers_only`` ranks channels by their reader columns alone (see
    :func:`group_importance`); ``round_to`` rounds each kept count (:func:`round_count`).
    With ``strict`` (a one-shot :func:`~sparsekit.prune`), a ``sparsity`` above 0 that
    removes no channel of any group is a ``ValueError`` saying why (no group within the
    targets, groups of one channel, counts that round to all channels): the masks removed
    nothing, silently. Without it such masks are returned (a schedule's early, small
    sparsities remove none).

    A removed channel loses its writer rows and, above all, its reader columns: nothing
    reads it any more, so the masked model computes exactly what
    :func:`~sparsekit.shrink` hands back (biases and BatchNorm entries of the channel are
    left as they are; ``shrink`` removes them with it).
    """
    check_round_to(round_to)
    check_bool("strict", strict)
    chosen = {t.name for t in targets}
    groups = dependency_groups(model) if groups is None else groups
    ranked: dict[str, tuple[Group, torch.Tensor]] = {}
    for group in groups:
        if not all(s.name in chosen for s in _layer_weights(model, group)):
            continue
        importance = group_importance(group, scores, readers_only=readers_only)
        if importance is not None:
            ranked[f"{group.name}#{len(ranked)}"] = (group, importance)
    keep = allocate({k: imp for k, (_, imp) in ranked.items()}, sparsity)
    uniform = allocate is ALLOCATIONS.get("uniform")  # its counts stand for width × (1 − s)
    cuts = []
    for key, (group, importance) in ranked.items():
        kept = round_count(max(keep[key], 1), group, round_to,
                           near=group.channels * (1 - sparsity) if uniform else None)
        gone = torch.nonzero(~top_k(importance, kept)).flatten()
        if gone.numel():
            cuts.append((group, gone))
    if strict and sparsity > 0 and not cuts:
        raise ValueError(_removes_nothing(sparsity, [g for g, _ in ranked.values()],
                                          len(groups), round_to))
    masks = {t.name: t.param.detach() != 0 for t in targets}
    for group, gone in cuts:
        for s in group.slices:
            if s.name in masks:
                masks[s.name].index_fill_(s.dim, s.indices(gone).to(masks[s.name].device), False)
    return masks


def _removes_nothing(sparsity: float, ranked: list[Group], found: int, round_to: int) -> str:
    """Why ``sparsity`` removes no channel of the ``ranked`` groups (those within the
    targets, of the ``found`` groups of the model)."""
    if not found:
        why = ("the model has no dependency group whose channels can be removed (each "
               "needs layers that write and read the channels, joined only by operations the "
               "tracing follows: see sparsekit.structured.dependency)")
    elif not ranked:
        why = (f"none of the model's {found} dependency group(s) has all of its layers among "
               "the targets; a channel goes from every layer that writes or reads it, so "
               "targets and exclude must take each group's layers all or none")
    elif all(g.channels == 1 for g in ranked):
        why = ("every group has a single channel (for pattern 'head': a single key/value "
               "head, multi-query attention), which each group keeps, so no sparsity "
               "removes one")
    else:
        rounding = f" with round_to={round_to}" if round_to > 1 else ""
        why = (f"every group's kept count rounds to all of its channels{rounding}; use a "
               f"larger sparsity{' or a smaller round_to' if rounding else ''}")
    return f"sparsity={sparsity} removes no channel of any group: {why}; the model was not changed"


def check_round_to(round_to: object) -> None:
    """Raise unless ``round_to`` is an int ≥ 1."""
    check_int("round_to", round_to, minimum=1)


def rounding_step(group: Group, round_to: int) -> int:
    """How many channels of ``group`` make a multiple of ``round_to`` in every tensor: a
    channel spans ``repeat`` entries of each slice (a head spans ``head_dim`` rows), so
    the narrowest slice sets the step (``round_to=8`` with 64-wide heads: any count)."""
    unit = min((s.repeat for s in group.slices), default=1)
    return round_to // math.gcd(round_to, unit)


def round_count(keep: int, group: Group, round_to: int, *, near: float | None = None) -> int:
    """``keep`` channels of ``group`` rounded to the nearest multiple of its
    :func:`rounding_step` (ties keep more), at least one step; the group's full width is
    always allowed (a group narrower than one step keeps every channel).

    ``near`` is the unrounded count ``keep`` may stand for (``"uniform"``: the group's
    width × (1 − sparsity)). A ``keep`` less than one channel from it is that count
    rounded to whole channels — by largest remainder, so groups of one width get either
    side — and ``near`` itself is rounded instead, so every group of one width keeps one
    count (of whole channels: 90 and 89 of 128 for 89.6 gave a Hugging Face model blocks of
    two widths, which plain ``from_pretrained`` cannot load): rounding twice would put
    those groups a whole step apart (40 and 39 of 64, for 39.55, go to 48 and 32 with
    ``round_to=16``; 39.55 goes to 32)."""
    step = rounding_step(group, round_to)
    target = near if near is not None and abs(keep - near) < 1 else keep
    if target >= group.channels:
        return group.channels
    if step <= 1:  # whole channels: 89 and 90 of 128 for 89.6 had given two widths
        return max(math.floor(target + 0.5), 1)
    allowed = [*range(step, group.channels + 1, step), group.channels]
    return min(allowed, key=lambda n: (abs(n - target), -n))


def _layer_weights(model: nn.Module, group: Group) -> list[Slice]:
    """The slices of Linear/Conv weights in ``group`` (writers, depthwise filters, readers)."""
    out = []
    for s in group.slices:
        owner, _, attr = s.name.rpartition(".")
        if attr == "weight" and isinstance(model.get_submodule(owner), DEFAULT_TYPES):
            out.append(s)
    return out
