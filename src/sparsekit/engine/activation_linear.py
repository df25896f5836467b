"""ActivationSparseLinear: an ``nn.Linear`` that skips the weight columns of small inputs.

At batch 1 a linear layer is memory-bound: every weight is read once for one multiply-add.
If input feature ``j`` is zero, column ``W[:, j]`` need not be read at all. This module keeps
``W.T`` (so each column is one contiguous row), zeroes inputs with ``|x_j| < threshold_j``
and, for a single input row, reads only the columns of the inputs that are left (the
``act_gemv`` kernel, or an ``index_select`` + ``mv`` fallback in PyTorch). Several rows are
multiplied densely: their union of nonzero inputs is rarely sparse.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit._checks import check_int
from sparsekit.engine import kernels
from sparsekit.engine.compiled_linear import dense_linear

__all__ = ["ActivationSparseLinear", "sparsify_input"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # act_gemv accumulates both in float32


def sparsify_input(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with the entries ``|x_j| < threshold_j`` set to zero (compared in ``x.dtype``).

    Each row is decided on its own, so the result does not depend on the batch.
    """
    return x.masked_fill(x.abs() < threshold.to(x.dtype), 0)


class ActivationSparseLinear(nn.Module):
    """``y = sparsify_input(x, threshold) @ W.T + bias``, reading only the columns it needs.

    ``threshold`` is a scalar or one value per input feature (``in_features``). Inputs have
    shape ``(..., in_features)``; a single row of the weight's dtype (float32 or bfloat16,
    summed in float32) runs the compiled kernel with ``threads`` OpenMP threads (default
    ``torch.get_num_threads()``). Inference only: the weight is a buffer.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        threshold: torch.Tensor | float,
        *,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        threshold = torch.as_tensor(threshold, dtype=torch.float32).detach()
        if threshold.numel() not in (1, self.in_features):
            raise ValueError(
                f"threshold must be a scalar or have in_features={self.in_features} values, "
                f"got shape {tuple(threshold.shape)}"
            )
        if threads is not None:
            check_int("threads", threads, minimum=1)
        self.threads = threads
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer(
            "threshold", threshold.expand(self.in_features).to(weight.dtype).contiguous()
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: torch.Tensor | float, *, threads: int | None = None
    ) -> ActivationSparseLinear:
        """The activation-sparse equivalent of ``linear`` with the given input threshold."""
        return cls(linear.weight, linear.bias, threshold, threads=threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (..., in_features={self.in_features}), got shape "
                f"{tuple(x.shape)}"
            )
        if x.numel() == self.in_features:  # decode step
            return self._gemv(x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        self._check_torch_input(x)
        y = sparsify_input(x, self.threshold) @ self.weight_t.to(x.dtype)  # several rows: dense
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        """One row: only the weight rows of kept inputs are read.

        The hot path of batch-1 decoding: no allocation or validation before the op.
        """
        if x.dtype is self.weight_t.dtype and x.dtype in _KERNEL_DTYPES and x.is_cpu \
                and kernels.available():
            return torch.ops.sparsekit.act_gemv(
                self.weight_t, x.contiguous(), self.threshold, self.bias,
                self.threads or kernels.num_threads(),
            )
        self._check_torch_input(x)
        kept = (sparsify_input(x, self.threshold) != 0).nonzero().squeeze(1)
        weight = self.weight_t.index_select(0, kept).to(x.dtype)
        y = weight.t().mv(x.index_select(0, kept))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _check_torch_input(self, x: torch.Tensor) -> None:
        """Before the PyTorch path (the weight converted to ``x.dtype``): ``TypeError``
        unless ``x`` is floating, ``ValueError`` unless it is on the weight's device."""
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != self.weight_t.device:
            raise ValueError(
                f"x must be on the weight's device {self.weight_t.device}, got {x.device}"
            )

    def to_module(self) -> nn.Linear:
        """The ``nn.Linear`` this layer was built from (without the input thresholds)."""
        return dense_linear(self.weight_t.t(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
