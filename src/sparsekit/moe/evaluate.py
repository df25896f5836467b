"""How well the routers of a routed model choose: recall of the needed units, output error.

For each :class:`~sparsekit.moe.RoutedFFN` the rows it receives on ``data`` are recorded;
on them, the *oracle* choice is the ``k`` units with the largest activation mass
(:func:`~sparsekit.moe.routed.unit_mass`, what the router was trained to predict).
``recall`` is the fraction of the oracle's units the layer chose (its router's choice, or
the oracle's own under :func:`~sparsekit.moe.set_oracle`); as both choose ``k`` units, it
is also the precision. ``error`` is the relative output error ``||y - y_dense|| /
||y_dense||`` of the routed FFN over the rows as it runs, ``oracle_error`` the same with the
oracle's choice: the part of the error that is the router's and the part that is the
sparsity's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit._checks import check_finite, check_int, check_seed, seeded
from sparsekit.activation.record import record_inputs
from sparsekit.moe.routed import RoutedFFN, check_model, routed_layers, unit_mass

__all__ = ["evaluate"]


def evaluate(model: nn.Module, data: Any, *, max_rows: int = 2048, seed: int = 0
             ) -> dict[str, dict[str, float]]:
    """``{"recall", "precision", "error", "oracle_error", "kept"}`` of every RoutedFFN of
    ``model`` (by module name) on at most ``max_rows`` of its input rows on ``data``."""
    check_model("model", model)
    check_int("max_rows", max_rows, minimum=1)
    check_seed("seed", seed)
    routed_layers(model)  # raises without RoutedFFN modules
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RoutedFFN)}
    generator = seeded(seed)
    inputs = record_inputs(model, layers, data, max_rows=max_rows, generator=generator,
                           param="data")
    for name, x in inputs.items():  # else every error was NaN, and recall a guess
        check_finite(f"data: the model's inputs to {name!r} on it", x,
                     hint="no score would mean anything")
    return {n: _quality(layers[n], x) for n, x in inputs.items()}


@torch.no_grad()
def _quality(layer: RoutedFFN, x: torch.Tensor) -> dict[str, float]:
    x = x.to(layer.w_in.dtype)
    h = layer.hidden(x).float()
    w_out = layer.reader_weight()
    dense = h @ w_out.t()  # the FFN's output is this plus the reader's bias
    bias = layer.w_out.bias
    size = torch.linalg.vector_norm(dense if bias is None else dense + bias.float())
    metrics = {"kept": layer.kept}
    if not layer.units:
        return metrics | {"recall": 1.0, "precision": 1.0, "error": 0.0, "oracle_error": 0.0}
    oracle = unit_mass(h, layer.norms, layer.hot, layer.unit_size).topk(layer.k, dim=1).indices
    chosen = layer.chosen(x, h)  # what the layer runs: its router's, or set_oracle's
    hits = (chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean()

    def error(units: torch.Tensor) -> float:
        mask = torch.zeros(h.shape[0], layer.units).scatter_(1, units, 1.0)
        kept = torch.cat([torch.ones(h.shape[0], layer.hot),
                          mask.repeat_interleave(layer.unit_size, dim=1)], dim=1)
        diff = (h * kept) @ w_out.t() - dense
        return float(torch.linalg.vector_norm(diff) / size)

    return metrics | {"recall": float(hits), "precision": float(hits),
                      "error": error(chosen), "oracle_error": error(oracle)}
