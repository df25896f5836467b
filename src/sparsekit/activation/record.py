"""Run a model on data and observe the inputs of chosen layers through forward pre-hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from sparsekit.scores._context import batches, preserved

__all__ = ["forward_all", "observe", "record_inputs"]

Observer = Callable[[str, torch.Tensor], None]


@contextlib.contextmanager
def observe(layers: dict[str, nn.Module], observer: Observer) -> Iterator[None]:
    """Call ``observer(name, x)`` with every input ``x`` (``(rows, in)``) of each layer."""

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            observer(name, args[0].detach().reshape(-1, args[0].shape[-1]))

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def forward_all(model: nn.Module, data: Any, param: str) -> None:
    """``model(inputs)`` for every batch of ``data`` in eval mode, without gradients."""
    seen = 0
    with preserved(model, train=False), torch.no_grad():
        for inputs, _ in batches(data):
            if isinstance(inputs, torch.Tensor) and inputs.numel() == 0:
                continue
            model(inputs)
            seen += 1
    if seen == 0:
        raise ValueError(f"{param} holds no (non-empty) batches; pass a tensor of inputs "
                         "or a list of them")


def record_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    data: Any,
    *,
    max_rows: int,
    generator: torch.Generator,
    param: str = "calibration",
) -> dict[str, torch.Tensor]:
    """Up to ``max_rows`` input rows (float32, sampled uniformly) of each layer on ``data``."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name: str, x: torch.Tensor) -> None:
        rows[name].append(_sample(x.float(), max_rows, generator))

    with observe(layers, keep):
        forward_all(model, data, param)
    return {n: _sample(torch.cat(r), max_rows, generator) for n, r in rows.items() if r}


def _sample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:n].to(x.device)]
