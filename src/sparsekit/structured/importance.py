"""Which channels go: group importance from per-weight scores, then a whole-group mask.

A criterion scores every weight (``magnitude`` is ‖W‖₁ per channel here, ``wanda`` is
Wanda-SP's ‖W‖·‖X‖, ``snip`` first-order Taylor …); a channel's importance is the mean
score over every scored weight of its group — writer rows and reader columns on all
branches — so groups of different sizes compare on one scale for ``allocation="global"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from sparsekit.select import top_k
from sparsekit.structured.dependency import Group, Slice, dependency_groups
from sparsekit.targets import DEFAULT_TYPES, Target

__all__ = ["channel_masks", "group_importance"]

Allocate = Callable[[dict[str, torch.Tensor], float], dict[str, int]]


def group_importance(group: Group, scores: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean score per channel over the scored weights of ``group`` (``None``: none scored)."""
    total = torch.zeros(group.channels)
    count = 0
    for s in group.slices:
        if s.name not in scores:
            continue
        part = scores[s.name].detach().float().movedim(s.dim, 0)
        part = part[s.offset: s.offset + group.channels * s.repeat].reshape(group.channels, -1)
        total += part.sum(1).cpu()
        count += part.shape[1]
    return total / count if count else None


def channel_masks(
    model: nn.Module,
    targets: list[Target],
    scores: Mapping[str, torch.Tensor],
    allocate: Allocate,
    sparsity: float,
    groups: Sequence[Group] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks of ``targets`` that remove the least important ``sparsity`` of the channels
    of every group whose Linear/Conv weights — writers and readers — are all targets (how
    many per group is ``allocate``'s answer; each group keeps at least one). ``groups``
    defaults to :func:`~sparsekit.structured.dependency_groups` of ``model``.

    A removed channel loses its writer rows and, above all, its reader columns: nothing
    reads it any more, so the masked model computes exactly what
    :func:`~sparsekit.shrink` hands back (biases and BatchNorm entries of the channel are
    left as they are; ``shrink`` removes them with it).
    """
    chosen = {t.name for t in targets}
    ranked: dict[str, tuple[Group, torch.Tensor]] = {}
    for group in dependency_groups(model) if groups is None else groups:
        if not all(s.name in chosen for s in _layer_weights(model, group)):
            continue
        importance = group_importance(group, scores)
        if importance is not None:
            ranked[f"{group.name}#{len(ranked)}"] = (group, importance)
    keep = allocate({k: imp for k, (_, imp) in ranked.items()}, sparsity)
    masks = {t.name: t.param.detach() != 0 for t in targets}
    for key, (group, importance) in ranked.items():
        gone = torch.nonzero(~top_k(importance, max(keep[key], 1))).flatten()
        for s in group.slices:
            if s.name in masks and gone.numel():
                masks[s.name].index_fill_(s.dim, s.indices(gone).to(masks[s.name].device), False)
    return masks


def _layer_weights(model: nn.Module, group: Group) -> list[Slice]:
    """The slices of Linear/Conv weights in ``group`` (writers, depthwise filters, readers)."""
    out = []
    for s in group.slices:
        owner, _, attr = s.name.rpartition(".")
        if attr == "weight" and isinstance(model.get_submodule(owner), DEFAULT_TYPES):
            out.append(s)
    return out
