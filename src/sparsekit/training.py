"""A plain training loop for the reference experiments (demo, studies, benchmarks).

Deliberately ordinary PyTorch: a user's own loop works with sparsekit the same way —
the only sparsity-specific line is ``masks.attach(optimizer)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@contextmanager
def inference(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for ``models``; every module's own mode is restored after
    (submodules may differ from their root)."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


def batches(
    data: TensorDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slice a TensorDataset into batches without per-sample collation (fast on CPU)."""
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
    """One epoch of cross-entropy training; returns the mean loss."""
    model.train()
    total, count = 0.0, 0
    for x, y in batches(data, batch_size, shuffle=True, seed=seed):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
        if on_step is not None:
            on_step()
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in batches(data, batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data)
