"""A bounded sample of the input rows of chosen layers, taken while the model runs on data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit.observe import run, watch

__all__ = ["record_inputs"]


def record_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: Any,
    *,
    max_rows: int,
    generator: torch.Generator,
    param: str = "calibration",
) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` input rows (float32, sampled uniformly) of each layer on ``data``.

    A row is one input vector (``x.reshape(-1, in_features)``); layers that never ran are
    absent.
    """
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name: str, x: torch.Tensor, _out: Any) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        rows[name].append(_sample(x.float(), max_rows, generator))

    with watch(layers, keep):
        run(model, data, param)
    return {n: _sample(torch.cat(r), max_rows, generator) for n, r in rows.items() if r}


def _sample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:n].to(x.device)]
