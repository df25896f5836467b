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

from sparsekit._checks import ArgumentTypeError, check_bool, check_int, check_seed, model_errors
from sparsekit.observe import inference

__all__ = ["accuracy", "inference", "minibatches", "train_epoch"]


def minibatches(
    data: TensorDataset, batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slice a TensorDataset into minibatches without per-sample collation (fast on CPU).

    (Not to be confused with :func:`sparsekit.observe.batches`, which normalises the
    accepted ``data`` forms.) ``batch_size`` is an int ≥ 1 (a negative one gave no batches,
    0 a bare ``range()`` error), ``shuffle`` a bool (``"False"`` shuffled, being truthy) and
    ``seed`` (an int in [0, 2**63 - 1]) draws the shuffled order; all are checked when this
    is called, not at the first batch.
    """
    check_int("batch_size", batch_size, minimum=1)
    check_bool("shuffle", shuffle)
    check_seed("seed", seed)
    _check_data(data)
    # a NumPy int passes check_seed, but torch's manual_seed takes Python ints only (a raw
    # "an integer is required" at the first batch)
    return _minibatches(data, batch_size, shuffle, int(seed))


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


def _check_examples(data: TensorDataset, caller: str) -> None:
    """Raise naming ``data`` unless it holds an example and its inputs are finite (NaN or
    inf inputs make the loss, every trained weight and every prediction garbage)."""
    if len(data) == 0:
        raise ValueError(f"data holds no examples; {caller} needs at least one")
    x = data.tensors[0]
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"data's inputs hold {bad} non-finite value"
                             f"{'' if bad == 1 else 's'} (NaN or inf); accepted: finite "
                             "inputs")


def _check_labels(model: nn.Module, data: TensorDataset) -> None:
    """Raise naming ``data`` unless the model runs on its inputs and its labels fit the
    model's outputs, checked on one example in eval mode (the model left as found): a
    label out of range in a late batch was an ``IndexError`` after the batches before it
    had trained. Class indices must lie in [0, outputs) or be -100 (``cross_entropy``'s
    ignored label)."""
    x, y = data.tensors
    with inference(model), model_errors("data", "the model cannot train on its examples"):
        logits = model(x[:1])
        F.cross_entropy(logits, y[:1])  # the dtype and the shape of the labels
    if y.is_floating_point() or logits.dim() != 2:
        return
    classes = logits.shape[1]
    bad = y[((y < 0) | (y >= classes)) & (y != -100)]
    if bad.numel():
        raise ValueError(f"data: labels must be class indices in [0, {classes}) (or -100, "
                         f"ignored) for the model's {classes} outputs, got {int(bad[0])} "
                         f"({bad.numel()} such)")


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
    ``TensorDataset`` of (inputs, labels) holding at least one example, with finite inputs
    and labels the model's outputs can score (class indices, or a probability per class);
    ``optimizer`` a ``torch.optim.Optimizer``, ``batch_size`` an int ≥ 1; ``seed`` (an int
    in [0, 2**63 - 1]) draws the order of the batches; ``on_step``, if given, is called
    after each step. All are checked before the model is put in training mode: each failed
    only in the loop, after some steps had changed the weights (or gave NaN weights, or a
    mean loss of 0.0 over no examples)."""
    check_int("batch_size", batch_size, minimum=1)
    check_seed("seed", seed)
    _check_data(data)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}")
    if on_step is not None and not callable(on_step):
        raise ArgumentTypeError(f"on_step must be None or a function called after each "
                                f"step, got {type(on_step).__name__}")
    _check_examples(data, "train_epoch")
    _check_labels(model, data)
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
    holds at least one example, with finite inputs (a NaN one was predicted as the argmax
    of NaN logits) and a class index per example (one-hot labels were compared with the
    predictions by broadcasting), and ``batch_size`` is an int ≥ 1. A model that cannot run
    on the inputs, or whose outputs are no ``(examples, classes)`` logits, is a
    ``ValueError`` naming ``data`` (it was PyTorch's bare ``RuntimeError`` or
    ``IndexError``)."""
    check_int("batch_size", batch_size, minimum=1)
    _check_data(data)
    _check_examples(data, "accuracy")
    labels = data.tensors[1]
    if labels.dim() != 1:  # one-hot labels broadcast against the predictions
        raise ValueError(f"data's labels must be class indices (one per example), got a "
                         f"tensor of shape {tuple(labels.shape)}")
    correct = 0
    with inference(model):
        for x, y in minibatches(data, batch_size):
            with model_errors("data", "the model cannot score its examples"):
                logits = model(x)
            if logits.dim() != 2 or logits.shape[0] != len(x):
                raise ValueError(f"data: the model's outputs must be logits of shape "
                                 f"(examples, classes) = ({len(x)}, classes), got "
                                 f"{tuple(logits.shape)}")
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(data)


def __getattr__(name: str) -> Any:
    if name == "batches":  # renamed: two unrelated functions were both called ``batches``
        warnings.warn("sparsekit.training.batches is deprecated; use "
                      "sparsekit.training.minibatches", DeprecationWarning, stacklevel=2)
        return minibatches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
