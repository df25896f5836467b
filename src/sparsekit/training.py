"""A plain training loop for the reference experiments (demo, studies, benchmarks).

Deliberately ordinary PyTorch: a user's own loop works with sparsekit the same way —
the only sparsity-specific line is ``masks.attach(optimizer)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sparsekit._checks import ArgumentTypeError, check_int, check_seed
from sparsekit.observe import inference

__all__ = ["accuracy", "inference", "minibatches", "train_epoch"]


def minibatches(
    data: TensorDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slice a TensorDataset into minibatches without per-sample collation (fast on CPU).

    (Not to be confused with :func:`sparsekit.observe.batches`, which normalises the
    accepted ``data`` forms.) ``batch_size`` is an int ≥ 1 (a negative one gave no batches,
    0 a bare ``range()`` error) and ``seed`` (an int in [0, 2**63 - 1]) draws the shuffled
    order; both are checked when this is called, not at the first batch.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_seed("seed", seed)
    _check_data(data)
    return _minibatches(data, batch_size, shuffle, seed)


def _check_data(data: object) -> None:
    """Raise naming ``data`` unless it is a ``TensorDataset`` of inputs and labels (two
    tensors of one length): a list of batches failed at its first use with a bare
    ``AttributeError``, after :func:`train_epoch` had put the model in training mode."""
    if not isinstance(data, TensorDataset):
        raise ArgumentTypeError(f"data must be a torch.utils.data.TensorDataset of (inputs, "
                                f"labels), got {type(data).__name__}")
    if len(data.tensors) != 2:
        raise ValueError(f"data must hold two tensors (inputs, labels), got "
                         f"{len(data.tensors)}")


def _minibatches(
    data: TensorDataset, batch_size: int, shuffle: bool, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data.tensors
    order = (
        torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        if shuffle else torch.arange(len(x))
    )
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def train_epoch(
    model: nn.Module,
    data: TensorDataset,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int = 128,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> float:
    """One epoch of cross-entropy training; returns the mean loss. ``data`` is a
    ``TensorDataset`` of (inputs, labels), ``optimizer`` a ``torch.optim.Optimizer``,
    ``batch_size`` an int ≥ 1; ``seed`` (an int in [0, 2**63 - 1]) draws the order of the
    batches. All are checked before the model is put in training mode."""
    check_int("batch_size", batch_size, minimum=1)
    check_seed("seed", seed)
    _check_data(data)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}")
    model.train()
    total, count = 0.0, 0
    for x, y in minibatches(data, batch_size, shuffle=True, seed=seed):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
        if on_step is not None:
            on_step()
    return total / max(count, 1)


def accuracy(model: nn.Module, data: TensorDataset, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, restored afterwards); ``data``
    holds at least one example and ``batch_size`` is an int ≥ 1."""
    check_int("batch_size", batch_size, minimum=1)
    _check_data(data)
    if len(data) == 0:
        raise ValueError("data holds no examples; accuracy needs at least one")
    correct = 0
    with inference(model):
        for x, y in minibatches(data, batch_size):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data)


def __getattr__(name: str) -> Any:
    if name == "batches":  # renamed: two unrelated functions were both called ``batches``
        warnings.warn("sparsekit.training.batches is deprecated; use "
                      "sparsekit.training.minibatches", DeprecationWarning, stacklevel=2)
        return minibatches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
