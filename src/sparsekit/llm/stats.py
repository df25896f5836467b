"""Running statistics of the inputs of linear layers, gathered with forward hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from sparsekit.llm.blocks import Layer


class InputStats:
    """Per-feature sum of squares of a layer's inputs and, optionally, the Gram matrix XᵀX.

    Only these sums are kept, never the activations themselves.
    """

    def __init__(self, features: int, *, gram: bool, device: torch.device) -> None:
        self.sq = torch.zeros(features, device=device)
        self.gram = torch.zeros(features, features, device=device) if gram else None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.sq.numel()).float()
        self.sq += (x * x).sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ of every input feature j over all tokens seen (Wanda's activation norm)."""
        return self.sq.sqrt()

    def hessian(self) -> torch.Tensor:
        """H = 2XᵀX / tokens, the Hessian of the layer-wise reconstruction error."""
        if self.gram is None:
            raise RuntimeError("InputStats was created with gram=False")
        return self.gram * (2.0 / max(self.rows, 1))


@contextlib.contextmanager
def record(layers: Sequence[Layer], *, gram: bool) -> Iterator[dict[str, InputStats]]:
    """Accumulate :class:`InputStats` of each layer's inputs while the block runs."""
    stats = {
        layer.name: InputStats(layer.shape[1], gram=gram, device=layer.module.weight.device)
        for layer in layers
    }
    handles = [
        layer.module.register_forward_hook(lambda _m, a, _o, s=stats[layer.name]: s.add(a[0]))
        for layer in layers
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
