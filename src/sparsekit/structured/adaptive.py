"""FLAP's adaptive structure search: how many channels each group keeps, across layers and
unit kinds at once.

Raw importance scores are not comparable across layers (activations grow with depth) nor
between a block's attention heads and its FFN neurons, so FLAP (An et al. 2024)
*standardises* each group's scores — zero mean and unit standard deviation over the
entries the criterion ranks (for FLAP the input columns of ``o_proj`` / ``down_proj``) —
before ranking everything in one list. A channel's score is the mean standardised score of
its entries. The cut-off is then placed where the kept channels hold ``1 − amount`` of the
parameters of all groups together: a head weighs as much as the parameters it takes along
(:func:`channel_cost`), so layers and modules that matter less give up more ("AL-AM" in the
paper's terms).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

from sparsekit._checks import check_fraction, check_materialized, check_module
from sparsekit.structured.dependency import Group, check_group, check_groups
from sparsekit.structured.importance import check_scoring, powered, score_part

__all__ = ["adaptive_counts", "channel_cost", "standardized_importance"]


def standardized_importance(group: Group, scores: Mapping[str, torch.Tensor], *,
                            readers_only: bool = False, power: float = 1.0
                            ) -> torch.Tensor | None:
    """Per channel of ``group``, the mean z-score of its entries (``None``: none scored).

    An entry is one index of a scored slice along its dimension — a writer's row or a
    reader's column — scored by the mean of its weights' scores, raised to ``power``; the
    z-scores are taken over all entries of the group together. ``readers_only`` reads the
    reader columns alone (FLAP's fluctuation metric ranks those). FLAP squares the
    metric of its attention heads' columns before standardising (``power=2``): the
    heavier tail keeps the few columns that carry a head from being averaged away by
    its quiet ones. ``power`` must be a positive finite number (NaN made every z-score
    NaN). ``group`` is checked as by :func:`~sparsekit.structured.importance.group_importance`."""
    check_group("group", group)
    check_scoring(scores, readers_only, power)
    parts = []
    for s in group.slices:
        if s.name not in scores or (readers_only and s.role != "in"):
            continue
        part = score_part(group, s, scores[s.name])  # float64: powers and sums stay finite
        width = math.prod(part.shape[1:])
        parts.append(powered(s.name, part.reshape(group.channels, s.repeat, width).mean(2),
                             power))
    if not parts:
        return None
    flat = torch.cat([p.flatten() for p in parts])
    mean, std = flat.mean(), flat.std() if flat.numel() > 1 else flat.new_tensor(0.0)
    std = std if std > 0 else flat.new_tensor(1.0)  # a constant group: every z-score 0
    total = sum(((p - mean) / std).sum(1) for p in parts)
    return (total / sum(p.shape[1] for p in parts)).float()  # z-scores: float32 is plenty


def channel_cost(model: nn.Module, group: Group) -> int:
    """Parameters (and buffer entries) one channel of ``group`` takes with it: for every
    slice, ``repeat`` indices along its dimension of a tensor of that shape. ``ValueError``
    for a group that does not fit ``model`` (see
    :func:`~sparsekit.structured.dependency.check_groups`), once a raw ``AttributeError``;
    :class:`~sparsekit._checks.ArgumentTypeError` for a ``model`` that is no module."""
    check_module("model", model)
    check_groups([group], model, "group")
    cost = 0
    for s in group.slices:
        owner, _, attr = s.name.rpartition(".")
        shape = getattr(model.get_submodule(owner), attr).shape
        cost += s.repeat * shape.numel() // shape[s.dim]
    return cost


def adaptive_counts(importance: Mapping[str, torch.Tensor], costs: Mapping[str, float],
                    amount: float) -> dict[str, int]:
    """How many channels each group keeps: the top channels of one ranking of all
    ``importance`` values (standardised per group, see :func:`standardized_importance`),
    as many as hold ``1 − amount`` of the total cost (``costs``: per channel of each
    group), the count whose cumulative cost comes closest."""
    check_fraction("amount", amount)
    if not isinstance(importance, Mapping) or not importance:
        raise ValueError(f"importance must map at least one group name to its channels' "
                         f"importance, got {importance!r}")
    names = list(importance)
    for n in names:
        imp = importance[n]
        if not isinstance(imp, torch.Tensor) or not imp.is_floating_point() \
                or imp.dim() != 1 or not imp.numel():
            got = (f"shape {tuple(imp.shape)}" if isinstance(imp, torch.Tensor)
                   and imp.is_floating_point() else imp if imp is None else type(imp).__name__)
            raise ValueError(f"importance[{n!r}] must be a 1-D float tensor (one value per "
                             f"channel, at least one; None: the group has no scored weight), "
                             f"got {got}")
        check_materialized(f"importance[{n!r}]", imp)
        if not bool(torch.isfinite(imp).all()):
            raise ValueError(f"importance[{n!r}] holds NaN or inf; accepted: finite values "
                             "(a NaN ranks channels arbitrarily)")
        cost = costs.get(n) if isinstance(costs, Mapping) else None
        if isinstance(cost, bool) or not isinstance(cost, numbers.Real) \
                or not math.isfinite(cost) or cost <= 0:
            raise ValueError(f"costs[{n!r}] must be a positive finite number (parameters per "
                             f"channel), got {cost!r}")
    values = torch.cat([importance[n].double() for n in names])
    owner = torch.cat([torch.full((importance[n].numel(),), i) for i, n in enumerate(names)])
    weight = torch.cat([torch.full((importance[n].numel(),), float(costs[n]), dtype=torch.float64)
                        for n in names])
    weight /= weight.max()  # only ratios count: costs near float's max summed to inf
    order = torch.argsort(values, descending=True, stable=True)
    kept_cost = weight[order].cumsum(0)
    target = (1.0 - amount) * float(weight.sum())
    n_keep = int(torch.argmin((kept_cost - target).abs())) + 1
    counts = torch.bincount(owner[order[:n_keep]], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}
