"""FLAP's bias compensation: what removed channels carried on average goes into a bias.

A removed channel ``j`` no longer adds ``W[:, j]·x_j`` to its readers' outputs. FLAP (An et
al. 2024) puts its expected value back: each reader's bias grows by
``Σ_j W[:, j]·mean(x_j)`` over its removed input channels, the mean taken over calibration
data on the model before the channels go. Channels that barely fluctuate (what the
``"flap"`` criterion removes first) then cost almost nothing. A reader without a bias gets
one. For a convolution the channel's mean is spread over every kernel position, exact
away from zero padding.

This is the one intended change of outputs in :func:`~sparsekit.shrink`
(``compensate=data``) and :func:`sparsekit.llm.prune_structured` (``method="flap"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_materialized
from sparsekit.scores.flap import input_moments
from sparsekit.structured.dependency import Group, Slice, check_removed

__all__ = ["fold_means", "reader_means", "with_biases"]

Removed = Sequence[tuple[Group, torch.Tensor]]


def reader_means(model: nn.Module, removed: Removed, data: Any, param: str = "data"
                 ) -> dict[str, torch.Tensor]:
    """The mean of every input channel of each reader (a Linear/Conv weight slice of role
    ``"in"``) of a group in ``removed`` that loses channels, over ``model`` run on
    ``data`` (named ``param`` in errors); keyed by the reader's weight name. The model is
    left as found."""
    layers = {}
    for group, gone in check_removed(removed):
        for s in _readers(model, group) if gone.numel() else ():
            layers[s.name] = model.get_submodule(s.name.rpartition(".")[0])
    if not layers:
        return {}
    return {n: m.mean() for n, m in input_moments(model, layers, data, param).items()}


@torch.no_grad()
def fold_means(model: nn.Module, removed: Removed, means: Mapping[str, torch.Tensor]
               ) -> set[str]:
    """In place: add the mean contribution of each group's removed channels ``gone`` to
    the biases of the readers in ``means`` (``{reader weight name: mean per input
    channel}``), before the channels are cut. Returns the names of the layers that had no
    bias and got one (see :func:`with_biases`). ``means`` must be a mapping: a list of
    tensors named no reader, and nothing was folded, silently."""
    if not isinstance(means, Mapping):
        raise ArgumentTypeError(f"means must be a mapping of reader weight name to its input "
                                f"means, got {type(means).__name__}")
    shifts: dict[str, torch.Tensor] = {}  # every shift first: a bad one changes nothing
    for group, gone in check_removed(removed):
        for s in _readers(model, group) if gone.numel() else ():
            if s.name not in means:
                continue
            owner = s.name.rpartition(".")[0]
            layer = model.get_submodule(owner)
            mean = means[s.name]
            width = layer.weight.shape[1] * (getattr(layer, "groups", 1) or 1)
            if not isinstance(mean, torch.Tensor) or mean.shape != (width,):
                got = tuple(mean.shape) if isinstance(mean, torch.Tensor) else repr(mean)
                raise ValueError(f"means[{s.name!r}] must be a tensor of shape ({width},) "
                                 f"(one mean per input channel of {owner!r}), got {got}")
            check_materialized(f"means[{s.name!r}]", mean)
            idx = s.indices(gone).to(layer.weight.device)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= layer.weight.shape[1]):
                raise ValueError(f"removed channels of group {group.name!r} do not fit "
                                 f"{s.name!r}: indices must lie in [0, "
                                 f"{layer.weight.shape[1]}), got {gone.tolist()}")
            cols = layer.weight.detach().index_select(1, idx).double()
            if cols.dim() > 2:  # a convolution: every kernel position sees the mean
                cols = cols.flatten(2).sum(2)
            shift = cols @ mean.to(cols.device).double().index_select(0, idx)
            shift = shifts[owner] + shift if owner in shifts else shift
            if not bool(torch.isfinite(shift).all()):
                raise ValueError(f"the bias compensation of {owner!r} is not finite (the "
                                 f"calibration means of its removed inputs hold NaN/inf, or "
                                 f"overflow); the model was not changed")
            shifts[owner] = shift
    for owner, shift in shifts.items():
        layer = model.get_submodule(owner)
        base = 0.0 if layer.bias is None else layer.bias.detach().double().to(shift.device)
        dtype = layer.weight.dtype if layer.bias is None else layer.bias.dtype
        if dtype.is_floating_point and \
                float((base + shift).abs().max()) > torch.finfo(dtype).max:
            raise ValueError(f"the bias compensation of {owner!r} overflows its {dtype} bias "
                             f"(|bias| up to {float((base + shift).abs().max()):.3g}); the "
                             "model was not changed")
    added = set()
    for owner, shift in shifts.items():
        layer = model.get_submodule(owner)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0],
                                                  dtype=layer.weight.dtype,
                                                  device=layer.weight.device),
                                      requires_grad=layer.weight.requires_grad)
            added.add(owner)
        layer.bias.add_(shift.to(device=layer.bias.device, dtype=layer.bias.dtype))
    return added


def with_biases(group: Group, layers: Iterable[str]) -> Group:
    """``group`` with a bias slice for every layer of ``layers`` whose weight rows it
    holds (a bias :func:`fold_means` added shrinks with its layer's output channels).
    ``layers`` is a collection of names: one name alone was read as its characters."""
    if isinstance(layers, str) or not isinstance(layers, Iterable):
        raise ArgumentTypeError(f"layers must be a collection of layer names (the set "
                                f"fold_means returns), got {layers!r}")
    layers = set(layers)
    extra = tuple(dataclasses.replace(s, name=f"{s.name.rpartition('.')[0]}.bias")
                  for s in group.slices
                  if s.role == "out" and s.dim == 0 and s.name.endswith(".weight")
                  and s.name.rpartition(".")[0] in layers)
    return dataclasses.replace(group, slices=group.slices + extra) if extra else group


_READERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layers whose biases take a removed channel's mean contribution (their weights
``(out, in, …)``: a column per input channel)."""


def _readers(model: nn.Module, group: Group) -> list[Slice]:
    """The slices of ``group`` that are input columns of a Linear or Conv weight."""
    out = []
    for s in group.slices:
        owner, _, attr = s.name.rpartition(".")
        if s.role == "in" and attr == "weight" and isinstance(model.get_submodule(owner),
                                                               _READERS):
            out.append(s)
    return out
