"""StructureSet: the masks of a model's SparseLinear layers, changed through set_structure.

It is :class:`~sparsekit.MaskSet`'s counterpart for truly sparse layers (both are
:class:`~sparsekit.masks.Masks`), and presents each
:class:`SparseLinear` to mask-based code (the drop/grow rules of
:class:`~sparsekit.DynamicSparsity`) as a dense weight view, a boolean mask and — when
captured — a dense gradient, under the name its ``nn.Linear`` weight would have
(``"<layer>.weight"``). New masks are applied with :meth:`SparseLinear.set_structure`, so
surviving weights keep their values and optimizer state and regrown ones start at zero.

Under ``DistributedDataParallel`` the layers must start with the same structure on every
rank (checked), the captured dense gradients are averaged over the ranks like DDP averages
the values' gradients, and a change that resizes a layer (SNFS, SRigL) gives DDP a new
gradient reducer (:func:`sparsekit.distributed.rebuild_reducer`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsekit._checks import ArgumentTypeError, check_bool, check_optimizer
from sparsekit.distributed import all_reduce_sum, check_same_on_ranks, rebuild_reducer, world_size
from sparsekit.engine.sparse_linear import SparseLinear

__all__ = ["StructureSet", "sparse_layers"]


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The ``SparseLinear`` layers of ``model``, keyed ``"<layer>.weight"``."""
    return {f"{n}.weight" if n else "weight": m for n, m in model.named_modules()
            if isinstance(m, SparseLinear)}


class _DenseWeights(Mapping):
    """Read-only dense weights of the layers, built on access (``to_dense`` is cheap)."""

    def __init__(self, layers: dict[str, SparseLinear]) -> None:
        self._layers = layers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._layers[name].to_dense()

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


class StructureSet:
    """Masks of the ``SparseLinear`` layers of ``model``; ``True`` where a weight is stored."""

    pattern = "unstructured"

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(
                f"model must be a torch.nn.Module holding SparseLinear layers, got "
                f"{type(model).__name__}"
            )
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ValueError("model has no SparseLinear layers")
        self.masks: dict[str, torch.Tensor] = {n: m.mask for n, m in self.layers.items()}
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        if self._ddp is not None:
            check_same_on_ranks(self.masks, "SparseLinear structures")
        self.params: Mapping[str, torch.Tensor] = _DenseWeights(self.layers)
        self._optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> StructureSet:
        """Carry ``optimizer``'s per-weight state through every structure change."""
        optimizer = check_optimizer(optimizer)
        self._optimizer = optimizer
        return self

    def update(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Give the named layers these masks (regrown weights and their state start at 0)."""
        self._check(masks)
        resized = False
        for n, mask in masks.items():
            if not torch.equal(mask.to(self.masks[n].device, torch.bool), self.masks[n]):
                nnz = self.layers[n].nnz
                self.layers[n].set_structure(mask, self._optimizer)
                self.masks[n] = self.layers[n].mask
                resized |= self.layers[n].nnz != nnz
        if resized and self._ddp is not None:
            rebuild_reducer(self._ddp)

    def capture(self, on: bool) -> None:
        """Start (or stop) capturing the dense gradients of the next backward passes."""
        check_bool("on", on)
        for layer in self.layers.values():
            layer.capture_dense_grad = on
            layer.dense_grad = None

    def dense_grads(self) -> dict[str, torch.Tensor | None]:
        """The captured dense gradients, averaged over DDP ranks; consumed by reading."""
        grads = {}
        for n, layer in self.layers.items():
            g, layer.dense_grad = layer.dense_grad, None
            if g is not None and world_size() > 1:
                all_reduce_sum(g)  # DDP averages the gradients of values; do the same here
                g /= world_size()
            grads[n] = g
        return grads

    def sparsity(self) -> float:
        """Fraction of unstored entries over all layers."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total if total else 0.0

    def state_dict(self) -> dict[str, object]:
        return {"pattern": self.pattern, "masks": {n: m.clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Give the layers the saved masks (a no-op after loading the model's own state)."""
        if not isinstance(state, Mapping) or "masks" not in state:
            raise ValueError(
                "state must be a dict from StructureSet.state_dict() with a 'masks' entry"
            )
        masks = state["masks"]
        if not isinstance(masks, Mapping):
            raise ArgumentTypeError(
                "state['masks'] must be a dict from layer names ('<layer>.weight') to bool "
                f"mask tensors, as StructureSet.state_dict() saves it; got {type(masks).__name__}"
            )
        if set(masks) != set(self.layers):
            raise ValueError(
                f"state masks are for {sorted(masks)}, the model's SparseLinear layers are "
                f"{sorted(self.layers)}"
            )
        self.masks = {n: layer.mask for n, layer in self.layers.items()}  # as loaded
        self.update(masks)

    def remove(self) -> None:
        """Stop carrying optimizer state and capturing gradients (the layers stay as they are)."""
        self.capture(False)
        self._optimizer = None

    def _check(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Raise unless every mask fits its layer: all are checked before any layer changes."""
        if not isinstance(masks, Mapping):
            raise ArgumentTypeError(
                "masks must be a dict from layer names ('<layer>.weight') to bool mask "
                f"tensors, got {type(masks).__name__}"
            )
        for n, m in masks.items():
            if n not in self.layers:
                raise ValueError(f"masks has an entry {n!r} that is not a SparseLinear layer; "
                                 f"layers: {', '.join(self.layers)}")
            self.layers[n].check_mask(m, f"masks[{n!r}]")

    def __repr__(self) -> str:
        return f"StructureSet({len(self.masks)} layers, sparsity={self.sparsity():.4f})"
