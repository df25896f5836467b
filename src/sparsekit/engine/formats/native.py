"""Shared base of the formats run by sparsekit's own compiled kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekit._checks import check_int
from sparsekit.engine import kernels
from sparsekit.engine.formats.base import Format, masked

__all__ = ["NativeFormat"]


class NativeFormat(Format):
    """A float32 CPU format multiplied by a compiled kernel over ``threads`` OpenMP threads.

    Where the kernels are missing (a model loaded on another machine) :meth:`_fallback_mm`
    multiplies with the dense weight, rebuilt once and kept until the buffers move.
    ``threads=None`` follows ``torch.get_num_threads()`` (one thread for small layers).
    """

    threaded = True
    dtypes = (torch.float32,)
    device = "cpu"

    def __init__(
        self, tensors: Sequence[torch.Tensor], shape: tuple[int, int], threads: int | None = None
    ) -> None:
        if threads is not None:
            check_int("threads", threads, minimum=1)
        super().__init__(tensors, shape)
        self.threads = threads
        self._stored = max(t.numel() for t in tensors)  # work per input row, for _threads

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """float32 CPU weights, where the compiled kernels are available."""
        return super().supports(weight) and kernels.available()

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        threads: int | None = None,
        **options: object,
    ) -> NativeFormat:
        """Compress the float32 ``weight * mask`` (see :meth:`compress` for ``options``)."""
        cls._check_float32(weight, cls.__name__)
        weight = masked(weight, mask)
        return cls(cls.compress(weight, **options), tuple(weight.shape), threads)

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The format's tensors (in :attr:`buffer_names` order) for a float32 ``weight``
        whose zeros are the pruned weights."""
        raise NotImplementedError

    @staticmethod
    def _check_float32(weight: torch.Tensor, name: str) -> None:
        if weight.dtype != torch.float32:
            raise TypeError(f"{name} needs a float32 weight, got {weight.dtype}")

    def _threads(self, batch: int) -> int:
        if self.threads is not None:
            return self.threads
        work = (self._stored + self.out_features) * batch  # nnz may cost a pass
        return max(1, min(torch.get_num_threads(), work // 16384))  # a fork costs a few µs

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if kernels.load() is None:  # e.g. a checkpoint loaded where the kernels cannot be built
            return self._fallback_mm(x, bias)
        if x.dtype != torch.float32 or not x.is_contiguous():  # µs count at batch 1
            x = x.to(torch.float32).contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.to(torch.float32).contiguous()
        return self._kernel(x, bias, self._threads(x.shape[0]))

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
        """The compiled product for a contiguous float32 ``x`` (and ``bias``)."""
        raise NotImplementedError

    def _fallback_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` with the dense weight, rebuilt only when the buffers moved."""
        return F.linear(x.to(torch.float32), self.derived(self.to_dense), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threads={self.threads}"
