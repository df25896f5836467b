"""What a criterion gets to see.

``batches`` and ``preserved`` (using the model without changing it) live in
:mod:`sparsekit.observe` and are re-exported here for the criteria.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import ArgumentTypeError, model_errors
from sparsekit.distributed import check_same_on_ranks, rank_slice, world_size
from sparsekit.observe import Batch, batches, preserved
from sparsekit.targets import Target, default_types

__all__ = ["Batch", "ScoreContext", "batches", "preserved"]


@dataclass
class ScoreContext:
    """Inputs to a criterion: the model, its targets and optional calibration data.

    ``data`` is a tensor of inputs, an ``(inputs, labels)`` pair, or an iterable of
    either (a ``DataLoader``). ``loss_fn(outputs, labels)`` defaults to cross-entropy.
    ``scales`` are the BatchNorm scales of a channel pattern's groups
    (:func:`~sparsekit.targets.batchnorm_scales`; empty for other patterns): a criterion
    that reads only a weight's value (``magnitude``) scores them too, so that a channel's
    group importance counts its γ; the others leave them unscored.
    """

    model: nn.Module
    targets: list[Target]
    data: Any = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    scales: Sequence[Target] = ()

    def require_data(self, criterion: str, *, labels: bool) -> list[Batch]:
        """The calibration batches that hold rows, or a ``ValueError`` naming what is
        missing.

        Batches of empty input tensors (0 rows) are left out, as :func:`~sparsekit.observe.run`
        leaves them out: they add nothing to a gradient or a statistic but would count in
        its mean. Data with no rows at all is an error: the gradient criteria scored every
        entry 0 on it, so the mask kept the first entries by position.
        """
        if self.data is None:
            raise ValueError(
                f"criterion {criterion!r} needs data=: pass a tensor of inputs, an "
                "(inputs, labels) pair or a DataLoader"
            )
        given = list(batches(self.data))
        if not given:
            raise ValueError(f"data for criterion {criterion!r} holds no batches")
        out = [(x, y) for x, y in given if not (isinstance(x, torch.Tensor) and x.numel() == 0)]
        if not out:
            raise ValueError(
                f"data for criterion {criterion!r} holds no rows: its {len(given)} batch(es) "
                "of inputs are all empty; pass at least one input"
            )
        if labels and any(y is None for _, y in out):
            raise ValueError(
                f"criterion {criterion!r} needs labels: pass data as (inputs, labels) batches"
            )
        return out

    def rank_share(self, data: list[Batch]) -> list[Batch]:
        """This rank's contiguous share of the calibration batches ``data`` under
        ``torchrun`` (all of them in one process); the criterion sums its statistics over
        the share, then over the ranks (:func:`sparsekit.distributed.all_reduce_sum`), and
        divides by ``len(data)``, so every rank scores on all of ``data`` (up to the order
        of the sums) and builds the same masks. Every rank must pass the same batches to
        the same model (both checked) and their number must be a multiple of the ranks."""
        if world_size() == 1:
            return data
        check_same_on_ranks(
            {f"batch {i} {part}": t for i, batch in enumerate(data)
             for part, t in zip(("inputs", "labels"), batch) if isinstance(t, torch.Tensor)},
            "calibration batches", "pass every rank the same data= (each takes its share)",
        )
        check_same_on_ranks({t.name: t.param for t in self.targets}, "the targets' weights",
                            "load the same model on every rank")
        return data[rank_slice(len(data), "data", "batches", "len(data)")]

    def require_layer_weights(self, criterion: str) -> None:
        """Raise unless every target is the weight of a Linear, GPT-2 Conv1D or Conv layer
        (criteria that observe a layer's inputs; they score a Conv1D on its weight seen as
        ``(out, in)``, :meth:`~sparsekit.targets.Target.out_in`)."""
        for t in self.targets:
            if not isinstance(t.module, default_types()) or t.param is not t.module.weight:
                raise ValueError(f"criterion {criterion!r} scores Linear/Conv1D/Conv weights "
                                 f"only; target {t.name!r} is not one")

    def require_grad(self, criterion: str) -> None:
        """Raise unless every target takes a gradient (``requires_grad=True``): gradient
        criteria differentiate the loss with respect to the targets."""
        frozen = [t.name for t in self.targets if not t.param.requires_grad]
        if frozen:
            raise ValueError(
                f"criterion {criterion!r} differentiates the loss with respect to every "
                f"target, but {frozen} have requires_grad=False; unfreeze them while "
                "pruning (param.requires_grad_(True)), leave them out (exclude=), or use a "
                "criterion that needs no gradient ('magnitude', 'wanda', 'synflow')"
            )

    def outputs(self, inputs: Any) -> Any:
        """``model(inputs)`` for one batch of ``data``; inputs the model cannot take are a
        clear error naming ``data``."""
        with model_errors("data", "the model cannot run on the inputs of a batch"):
            return self.model(inputs)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``loss_fn(outputs, labels)``, checked to be a one-element tensor (the gradient
        criteria differentiate it; anything else failed deep in autograd).

        An error raised inside the call names what failed: ``loss_fn`` when the caller
        passed one (its own error, or labels it cannot take), else ``data`` (labels that do
        not fit the outputs for the default cross-entropy: wrong length, wrong dtype).
        """
        if self.loss_fn is None:
            with model_errors("data", "cross-entropy (the default loss_fn) cannot compare the "
                                      "model's outputs with the labels of a batch"):
                return F.cross_entropy(outputs, labels)
        with model_errors("loss_fn", "it failed on the model's outputs and the labels of a "
                                     "batch"):
            loss = self.loss_fn(outputs, labels)
        if not isinstance(loss, torch.Tensor):
            raise ArgumentTypeError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor (reduce it, e.g. with .mean()), got "
                f"one of shape {tuple(loss.shape)}"
            )
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn must return a loss computed from the model's outputs, which the "
                "criterion differentiates; got a scalar that does not require grad "
                "(detached, a constant or computed under torch.no_grad())"
            )
        return loss

    def grad(self, loss: torch.Tensor, params: Sequence[torch.Tensor], *,
             create_graph: bool = False) -> tuple[torch.Tensor, ...]:
        """``torch.autograd.grad(loss, params)``; an error of the backward pass (labels
        that do not fit the outputs, raised only there) names what failed as
        :meth:`loss` does, not a raw autograd ``RuntimeError``."""
        param = "data" if self.loss_fn is None else "loss_fn"
        with model_errors(param, "differentiating the loss on a batch failed"):
            return torch.autograd.grad(loss, params, create_graph=create_graph)
