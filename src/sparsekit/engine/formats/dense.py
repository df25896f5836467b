"""The dense baseline format: ``F.linear`` on the (masked) weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekit.engine.formats.base import Format, masked

__all__ = ["DenseFormat"]


class DenseFormat(Format):
    """The dense baseline (``F.linear``); always a candidate."""

    name = "dense"
    buffer_names = ("weight",)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> DenseFormat:
        weight = masked(weight, mask)
        return cls([weight.clone(memory_format=torch.contiguous_format)], tuple(weight.shape))

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        (weight,) = tensors
        if tuple(weight.shape) != tuple(shape) or not weight.is_floating_point():
            raise ValueError(
                f"dense weight must be a floating {tuple(shape)} tensor, got "
                f"{tuple(weight.shape)} {weight.dtype}"
            )

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape  # F.linear takes any (..., in_features)
        if not shape or shape[-1] != self.in_features:
            self.check_input(x)
        return F.linear(x, self.weight, bias)

    def to_dense(self) -> torch.Tensor:
        return self.weight.clone()

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.weight))
