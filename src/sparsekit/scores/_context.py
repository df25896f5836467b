"""What a criterion gets to see, and helpers to use the model without changing it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.targets import Target

Batch = tuple[Any, torch.Tensor | None]


@dataclass
class ScoreContext:
    """Inputs to a criterion: the model, its targets and optional calibration data.

    ``data`` is a tensor of inputs, an ``(inputs, labels)`` pair, or an iterable of
    either (a ``DataLoader``). ``loss_fn(outputs, labels)`` defaults to cross-entropy.
    """

    model: nn.Module
    targets: list[Target]
    data: Any = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None

    def require_data(self, criterion: str, *, labels: bool) -> list[Batch]:
        """The calibration batches, or a ``ValueError`` naming what is missing."""
        if self.data is None:
            raise ValueError(
                f"criterion {criterion!r} needs data=: pass a tensor of inputs, an "
                "(inputs, labels) pair or a DataLoader"
            )
        out = list(batches(self.data))
        if not out:
            raise ValueError(f"data for criterion {criterion!r} holds no batches")
        if labels and any(y is None for _, y in out):
            raise ValueError(
                f"criterion {criterion!r} needs labels: pass data as (inputs, labels) batches"
            )
        return out

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fn = self.loss_fn or F.cross_entropy
        return fn(outputs, labels)


def batches(data: Any) -> Iterator[Batch]:
    """Normalise the accepted ``data`` forms into ``(inputs, labels_or_None)`` batches."""
    if isinstance(data, torch.Tensor):
        yield data, None
        return
    if isinstance(data, tuple) and _is_pair(data):  # a list is a list of batches
        yield data[0], data[1]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "data must be a tensor, an (inputs, labels) pair or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    for item in data:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and len(item) == 1:  # DataLoader(TensorDataset(x))
            yield item[0], None
        elif _is_pair(item):
            yield item[0], item[1]
        else:
            raise TypeError(
                f"each batch in data must be a tensor or an (inputs, labels) pair, got "
                f"{type(item).__name__}"
            )


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[1], torch.Tensor)


@contextlib.contextmanager
def preserved(model: nn.Module, *, train: bool | None = None) -> Iterator[None]:
    """Run a block against ``model`` and restore its mode, buffers and ``.grad`` fields."""
    modes = {m: m.training for m in model.modules()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    if train is not None:
        model.train(train)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        for n, p in model.named_parameters():
            p.grad = grads[n]
