"""FLAP's fluctuation metric (An et al. 2024, "Fluctuation-based Adaptive Structured
Pruning for Large Language Models").

An input channel ``j`` of a layer is cheap to remove when what it carries barely
fluctuates: its contribution ``W[:, j]·x_j`` is then close to the constant
``W[:, j]·mean(x_j)``, which a bias can carry instead (the bias compensation of
:func:`~sparsekit.structured.compensate.fold_means`). The score of weight ``W_ij`` is
``Var(x_j)·W_ij²``, so a channel's summed score is the metric of the paper,
``Var(x_j)·‖W[:, j]‖²`` — the sample variance of the channel over the calibration data
times the squared norm of the column that reads it.

It ranks the *columns* that read a channel, so under ``pattern="channel"`` a group's
importance comes from its readers alone (``readers_only=True`` in the criterion's
metadata); for a transformer those are the output projections (``down_proj``,
``o_proj``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsekit.distributed import all_reduce_sum
from sparsekit.observe import run, watch
from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext
from sparsekit.targets import default_types, stores_transposed

__all__ = ["Moments", "check_rows", "fluctuation_scores", "input_moments"]


class Moments:
    """Per input channel sums of a layer's inputs over every row seen (float64): enough
    for the mean and the sample variance, never the activations themselves.

    A channel is the last axis of a Linear input and axis 1 of a convolution input (its
    spatial positions are rows).
    """

    def __init__(self, channels: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sq = torch.zeros(channels, dtype=torch.float64, device=device)
        self.rows = 0

    def observe(self, module: nn.Module, x: torch.Tensor) -> None:
        """Add one input ``x`` of ``module``."""
        x = x.detach()
        if isinstance(module, nn.modules.conv._ConvNd):
            x = x.movedim(x.dim() - len(module.kernel_size) - 1, -1)  # batched or not
        # rows counted from the leading axes: a layer of no input channels has inputs of
        # no elements, whose row count ``reshape(-1, 0)`` cannot infer
        x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).double()
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        self.rows += x.shape[0]

    def all_reduce(self) -> Moments:
        """Sum the moments over every rank (each saw its share of the data), in place;
        nothing happens in one process. Returns ``self``."""
        rows = torch.tensor([self.rows], dtype=torch.int64)
        all_reduce_sum(self.sum, self.sq, rows)
        self.rows = int(rows)
        return self

    def mean(self) -> torch.Tensor:
        """Mean of every channel (float32)."""
        return (self.sum / max(self.rows, 1)).float()

    def variance(self) -> torch.Tensor:
        """Sample variance of every channel (float32).

        Raises ``ValueError`` with fewer than two rows (no variance: every channel would tie
        and units would be removed by position) and when a variance is finite in float64
        but beyond float32's range (inputs of magnitude above about 1.8e19)."""
        if self.rows < 2:
            raise ValueError(f"FLAP needs at least 2 calibration rows (input vectors) per "
                             f"layer to measure a variance, got {self.rows}; pass more "
                             "calibration samples or tokens")
        var = (self.sq - self.sum * self.sum / self.rows) / (self.rows - 1)
        var = var.clamp_min(0)
        if var.numel() and bool(torch.isfinite(var).all()) \
                and float(var.max()) > torch.finfo(torch.float32).max:
            raise ValueError(f"the calibration inputs are finite but their variance "
                             f"({float(var.max()):.3g}) overflows float32 (inputs of magnitude "
                             "above about 1.8e19); rescale the calibration data")
        return var.float()


def input_moments(model: nn.Module, layers: Mapping[str, nn.Module], data: Any,
                  param: str = "data") -> dict[str, Moments]:
    """The :class:`Moments` of each layer's input channels over ``model`` run on ``data``
    (see :func:`~sparsekit.observe.run`; the model is left as found). Accepted layers:
    ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Conv1d/2d/3d``. Errors about ``data`` name
    it ``param`` (the caller's argument), among them the ``ValueError`` naming the layers
    it never reached."""
    for name, m in layers.items():
        if not isinstance(m, default_types()):  # GPT-2's Conv1D reads its last axis too
            raise TypeError(f"layers[{name!r}] must be a Linear, GPT-2 Conv1D or Conv layer, "
                            f"got {type(m).__name__}")
    stats = {n: Moments(_input_channels(m), m.weight.device) for n, m in layers.items()}
    with watch(layers, lambda n, x, _out: stats[n].observe(layers[n], x)):
        run(model, data, param)
    missing = [n for n, s in stats.items() if s.rows == 0]
    if missing:
        raise ValueError(f"{param} never reached these layers during the forward pass: "
                         f"{missing}")
    return stats


def _input_channels(layer: nn.Module) -> int:
    """The input channels of a Linear, GPT-2 Conv1D (weight ``(in, out)``) or Conv layer."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels
    return layer.weight.shape[0] if stores_transposed(layer) else layer.in_features


def check_rows(moments: Mapping[str, Moments]) -> None:
    """Raise ``ValueError`` unless every layer saw at least 2 rows (FLAP's variance)."""
    few = {n: m.rows for n, m in moments.items() if m.rows < 2}
    if few:
        raise ValueError(f"FLAP needs at least 2 calibration rows (input vectors) per layer "
                         f"to measure a variance; these layers saw fewer: {few}; pass more "
                         "calibration samples or tokens (the model was not changed)")


def fluctuation_scores(weight: torch.Tensor, moments: Moments) -> torch.Tensor:
    """``Var(x_j)·W_ij²`` in float32, shaped like ``weight`` (a Linear's ``(out, in)`` or a
    convolution's ``(out, in/groups, *kernel)``: every kernel position of input channel
    ``j`` gets its variance)."""
    w2 = weight.detach().float() ** 2
    var = moments.variance().to(weight.device)
    if weight.dim() == 2:
        return w2 * var
    per_group = weight.shape[1]
    groups = var.numel() // per_group
    var = var.view(groups, per_group).repeat_interleave(weight.shape[0] // groups, dim=0)
    return w2 * var.reshape(*var.shape, *[1] * (weight.dim() - 2))


@CRITERIA.register("flap", data_driven=True, readers_only=True)
def flap(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Var(x_j)·W_ij²: the fluctuation of input channel j over the calibration data times
    the squared weight that reads it (FLAP). Under ``pattern="channel"`` a channel's
    importance is ``Var·‖W[:, j]‖²`` over the layers that read it; pair it with
    ``shrink(..., compensate=data)`` for FLAP's bias compensation."""
    ctx.require_layer_weights("flap")
    data = ctx.require_data("flap", labels=False)
    moments = input_moments(ctx.model, {t.name: t.module for t in ctx.targets},
                            ctx.rank_share(data))
    for m in moments.values():
        m.all_reduce()
    check_rows(moments)
    return {t.name: t.out_in(fluctuation_scores(t.out_in(t.param), moments[t.name]))
            for t in ctx.targets}
