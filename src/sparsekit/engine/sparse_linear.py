"""CompiledLinear: an inference-only ``nn.Linear`` whose weight lives in a compressed format."""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.engine.formats import FORMATS, Format

__all__ = ["CompiledLinear"]


class CompiledLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held in one :class:`~sparsekit.engine.formats.Format`.

    Built by :func:`sparsekit.engine.compile`; accepts inputs of shape ``(..., in_features)``
    like ``nn.Linear``. It is for inference: the compressed weight is a buffer, not a
    parameter. :meth:`to_dense` recovers the (masked) dense weight, :meth:`to_linear` an
    equivalent ``nn.Linear``.
    """

    def __init__(self, fmt: Format, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(fmt, Format):
            raise TypeError(f"fmt must be a sparsekit Format, got {type(fmt).__name__}")
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        self.format = fmt
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, format: str = "dense", **kwargs: object
    ) -> CompiledLinear:
        """Compress ``linear`` (its zero weights are the pruned ones) into ``format``."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        fmt = FORMATS[format].from_dense(linear.weight.detach(), None, **kwargs)
        return cls(fmt, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.matmul(x, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, zeros where pruned."""
        return self.format.to_dense()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (e.g. to fine-tune again)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format.name!r}"
        )
