"""A bounded sample of the input rows of chosen layers, taken while the model runs on data."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int
from sparsekit.observe import check_layer_inputs_materialized, run, watch

__all__ = ["record_inputs"]

_M32 = 0xFFFFFFFF


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
    absent. The sample is a bottom-``max_rows`` sample: row ``i`` of a layer (counted over
    every call, in order) gets a pseudo-random key that depends only on ``i`` and a seed drawn
    once from ``generator``, and the rows with the smallest keys are kept while streaming.
    Every row is equally likely to be kept, whatever the batch sizes, and the same rows come
    out whether ``data`` is one batch or the same rows split into several; memory stays
    bounded by ``max_rows`` rows plus one batch.

    Inputs on the meta device are refused naming ``param`` (:func:`~sparsekit.observe.run`),
    layer inputs on the meta device (a model whose weights were never loaded) naming
    ``model``: both hold no values, and the rows recorded from them were numbers made up.
    """
    check_int("max_rows", max_rows, minimum=1)  # 0 kept no row: "layers saw no rows"
    if not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator, got "
                                f"{type(generator).__name__}")
    seed = [int(s) for s in torch.randint(0, 2**32, (3,), generator=generator)]
    pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seen = {n: 0 for n in layers}
    meta: list[str] = []  # layers whose inputs were on the meta device

    def keep(name: str, x: torch.Tensor, _out: Any) -> None:
        if x.is_meta:  # refused after the run: an error here would blame the data
            meta.append(name)
            return
        # rows spelled out: -1 is ambiguous for the no-feature input of an nn.Linear(0, n)
        x = x.detach().reshape(math.prod(x.shape[:-1]), x.shape[-1])
        start, n = seen[name], x.shape[0]
        seen[name] = start + n
        keys = _row_keys(torch.arange(start, start + n, device=x.device), seed)
        if name in pools:
            kept, kept_keys = pools[name]
            keys = torch.cat([kept_keys, keys.to(kept_keys.device)])
            x = torch.cat([kept, x.float().to(kept.device)])
        if x.shape[0] > max_rows:  # keys are distinct: the smallest ones are one set
            order = torch.topk(keys, max_rows, largest=False, sorted=True).indices
            x, keys = x[order], keys[order]
        pools[name] = (x.float(), keys)

    with watch(layers, keep):
        run(model, data, param)
    check_layer_inputs_materialized(sorted(set(meta)))
    out = {}
    for name, (x, keys) in pools.items():
        out[name] = x[torch.argsort(keys)]  # a batching-independent (random) order
    return out


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``x`` in [0, 2**32) without int64 overflow."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c) & 0xFFFF) * 65536) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (Wellons' lowbias32) of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _row_keys(index: torch.Tensor, seed: list[int]) -> torch.Tensor:
    """Distinct pseudo-random int64 keys in [0, 2**63) of row indices (below 2**32 rows;
    beyond, ties are improbable and broken arbitrarily)."""
    high = _hash32(_hash32((index & _M32) ^ seed[0]) ^ ((index >> 32) & _M32) ^ seed[1])
    low = _hash32(high ^ seed[2])
    return (high << 31) | (low >> 1)
