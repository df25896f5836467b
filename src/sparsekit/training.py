"""A plain training loop for the reference experiments (demo, studies, benchmarks).

Deliberately ordinary PyTorch: a user's own loop works with sparsekit the same way —
the only sparsity-specific line is ``masks.attach(optimizer)``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_int,
    check_materialized,
    check_module,
    check_seed,
    model_errors,
)
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
    """Raise naming ``data`` unless it holds an example and its inputs and labels are
    finite (NaN or inf inputs make the loss, every trained weight and every prediction
    garbage; so does a NaN among probability labels, and a NaN class index never matches)."""
    if len(data) == 0:
        raise ValueError(f"data holds no examples; {caller} needs at least one")
    for what, t in zip(("inputs", "labels"), data.tensors):
        # counting its non-finite values was a raw "Tensor.item() cannot be called on meta
        # tensors"
        check_materialized(f"data's {what}", t)
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"data's {what} hold {bad} non-finite value"
                                 f"{'' if bad == 1 else 's'} (NaN or inf); accepted: finite "
                                 f"{what}")


def _check_alone(model: nn.Module, data: TensorDataset, batch_size: int) -> None:
    """Raise naming ``batch_size`` when a minibatch would hold one example and a BatchNorm
    layer of ``model`` sees one value per channel in it (as it does on one example in eval
    mode, run here with the model left as found): training mode refuses such a batch, and
    the last one failed with a raw "Expected more than 1 value per channel" after the
    batches before it had changed the weights."""
    if len(data) % batch_size != 1 and batch_size != 1:
        return
    alone: list[str] = []

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            if args and args[0].shape[2:].numel() == 1:  # (1, C) or (1, C, 1, …)
                alone.append(name)
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not hooks:
        return
    try:
        with inference(model), model_errors("data", "the model cannot train on its examples"):
            model(data.tensors[0][:1])
    except ValueError:
        if not alone:  # not the BatchNorm (one without running statistics fails in eval too)
            raise
    finally:
        for hook in hooks:
            hook.remove()
    if alone:
        raise ValueError(
            f"batch_size={batch_size} leaves a minibatch of one example (of {len(data)}), on "
            f"which BatchNorm layer {alone[0]!r} cannot train (it needs more than one value "
            "per channel); accepted: a batch_size that leaves no example alone"
        )


def _check_trains(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise naming ``optimizer`` unless its learning rates are finite and it holds a
    parameter of ``model`` that requires gradients: one built on another model's
    parameters (or on frozen ones only) stepped nothing of this model, and the epoch
    returned its losses as if it had trained."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        scalar = isinstance(lr, numbers.Real) or (isinstance(lr, torch.Tensor)
                                                  and lr.numel() == 1)
        if scalar and not math.isfinite(float(lr)):
            # torch takes lr=nan (nan < 0 is False): the first step made every weight NaN
            raise ValueError(f"optimizer.param_groups[{i}]['lr'] must be a finite learning "
                             f"rate, got {float(lr)}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters() if p.requires_grad):
        raise ValueError(
            "optimizer holds none of the trainable parameters of model (built on another "
            "model's parameters, or on frozen ones only), so train_epoch would train "
            "nothing; accepted: an optimizer built from this model's parameters, e.g. "
            "torch.optim.SGD(model.parameters(), lr=0.1)")


def _check_labels(model: nn.Module, data: TensorDataset, batch_size: int) -> None:
    """Raise naming ``data`` unless the model runs on its inputs and its labels fit the
    model's outputs, checked in eval mode (the model left as found) on the first two
    examples, or one where ``batch_size`` is 1: a batch as training sees it (a BatchNorm
    without running statistics refuses a single example in eval mode too, and a model
    that trains on larger batches was refused). A label out of range in a late batch was
    an ``IndexError`` after the batches before it had trained. Class indices must lie in
    [0, outputs) or be -100 (``cross_entropy``'s ignored label), class probabilities be
    ≥ 0."""
    x, y = data.tensors
    n = min(2, batch_size)
    with inference(model), model_errors("data", "the model cannot train on its examples"):
        logits = model(x[:n])
        F.cross_entropy(logits, y[:n])  # the dtype and the shape of the labels
    if y.is_floating_point():  # probabilities: a negative one makes the loss unbounded
        negative = int((y < 0).sum())  # below, and training drove the logits to infinity
        if negative:
            raise ValueError(f"data: labels given as class probabilities must be ≥ 0, got "
                             f"{negative} negative (the smallest {y.min().item()})")
        return
    if logits.dim() != 2:
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
    and finite labels the model's outputs can score (class indices, or a probability per
    class); ``optimizer`` a ``torch.optim.Optimizer``, ``batch_size`` an int ≥ 1; ``seed``
    (an int in [0, 2**63 - 1]) draws the order of the batches; ``on_step``, if given, is
    called after each step; ``optimizer`` must hold a trainable parameter of ``model``,
    at finite learning rates. All are checked before the model is put in training mode
    (so is a minibatch of one example that a BatchNorm layer cannot train on): each failed
    only in the loop, after some steps had changed the weights (or gave NaN weights, or a
    mean loss of 0.0 over no examples, or trained nothing)."""
    check_module("model", model)
    check_int("batch_size", batch_size, minimum=1)
    check_seed("seed", seed)
    _check_data(data)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(f"optimizer must be a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}")
    if on_step is not None and not callable(on_step):
        raise ArgumentTypeError(f"on_step must be None or a function called after each "
                                f"step, got {type(on_step).__name__}")
    _check_trains(model, optimizer)
    _check_examples(data, "train_epoch")
    _check_alone(model, data, batch_size)
    _check_labels(model, data, batch_size)
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
    predictions by broadcasting) in [0, classes) (one outside was never predicted, and
    counted wrong), and ``batch_size`` is an int ≥ 1. A model that cannot run
    on the inputs, or whose outputs are no ``(examples, classes)`` logits, is a
    ``ValueError`` naming ``data`` (it was PyTorch's bare ``RuntimeError`` or
    ``IndexError``)."""
    check_module("model", model)  # inference() named it "models[0]"
    check_int("batch_size", batch_size, minimum=1)
    _check_data(data)
    _check_examples(data, "accuracy")
    labels = data.tensors[1]
    if labels.dim() != 1:  # one-hot labels broadcast against the predictions
        raise ValueError(f"data's labels must be class indices (one per example), got a "
                         f"tensor of shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        # compared with the predicted indices as numbers: 1.5 was never predicted and
        # counted wrong, True counted as class 1
        raise ValueError(f"data's labels must be integer class indices (torch.long), got "
                         f"{labels.dtype}")
    correct = 0
    with inference(model):
        for x, y in minibatches(data, batch_size):
            with model_errors("data", "the model cannot score its examples"):
                logits = model(x)
            if logits.dim() != 2 or logits.shape[0] != len(x):
                raise ValueError(f"data: the model's outputs must be logits of shape "
                                 f"(examples, classes) = ({len(x)}, classes), got "
                                 f"{tuple(logits.shape)}")
            bad = y[(y < 0) | (y >= logits.shape[1])]
            if bad.numel():  # never predicted: counted wrong without a word
                raise ValueError(f"data: labels must be class indices in [0, "
                                 f"{logits.shape[1]}) for the model's {logits.shape[1]} "
                                 f"outputs, got {bad[0].item()} ({bad.numel()} such in this "
                                 "batch)")
            correct += int((logits.argmax(1) == y).sum())
    return correct / len(data)


def __getattr__(name: str) -> Any:
    if name == "batches":  # renamed: two unrelated functions were both called ``batches``
        warnings.warn("sparsekit.training.batches is deprecated; use "
                      "sparsekit.training.minibatches", DeprecationWarning, stacklevel=2)
        return minibatches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
