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
    """A CPU format multiplied by a compiled kernel over ``threads`` OpenMP threads.

    Its values keep the weight's dtype, one of :attr:`dtypes` (float32; formats whose
    kernels also read bfloat16 values add it): products and sums are float32 either way.
    Inputs in one of :attr:`dtypes` are passed as they are and the output takes their
    dtype; other inputs are computed in float32.

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
        """CPU weights of one of :attr:`dtypes`, where the compiled kernels are available."""
        return super().supports(weight) and kernels.available()

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        threads: int | None = None,
        **options: object,
    ) -> NativeFormat:
        """Compress ``weight * mask``, values in ``weight``'s dtype (one of :attr:`dtypes`;
        see :meth:`compress` for ``options``)."""
        cls._check_dtype(weight)
        weight = masked(weight, mask)
        return cls(cls.compress(weight, **options), tuple(weight.shape), threads)

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The format's tensors (in :attr:`buffer_names` order) for a ``weight`` (of one of
        :attr:`dtypes`) whose zeros are the pruned weights."""
        raise NotImplementedError

    @classmethod
    def _check_dtype(cls, weight: torch.Tensor) -> None:
        if weight.dtype not in cls.dtypes:
            raise TypeError(f"{cls.__name__} needs a weight of dtype {cls.dtypes}, "
                            f"got {weight.dtype}")

    @classmethod
    def check_values(cls, name: str, values: torch.Tensor) -> None:
        """Raise ``ValueError`` unless the stored ``values`` (buffer ``name``) have one of
        :attr:`dtypes`."""
        if values.dtype not in cls.dtypes:
            raise ValueError(f"{name} must be of a dtype in {cls.dtypes}, got {values.dtype}")

    def _threads(self, batch: int) -> int:
        if self.threads is not None:
            return self.threads
        work = (self._stored + self.out_features) * batch  # nnz may cost a pass
        return max(1, min(kernels.num_threads(), work // 16384))  # a fork costs a few µs

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype not in self.dtypes:  # µs count at batch 1: convert only what must be
            if not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
            x = x.to(torch.float32)
        if not x.is_contiguous():
            x = x.contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.to(torch.float32).contiguous()
        if kernels.load() is None:  # e.g. a checkpoint loaded where the kernels cannot be built
            return self._fallback_mm(x.to(torch.float32), bias).to(x.dtype)
        if not x.is_cpu:
            raise ValueError(f"x must be on the CPU for the {self.name} kernel, got {x.device}")
        return self._kernel(x, bias, self._threads(x.shape[0]))

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
        """The compiled product for a contiguous CPU ``x`` of one of :attr:`dtypes` and
        ``in_features`` columns (and a float32 ``bias``), in ``x``'s dtype; the op checks
        every size again."""
        raise NotImplementedError

    def _fallback_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` in float32 for a float32 ``x`` with the dense weight, rebuilt only
        when the buffers moved."""
        return F.linear(x, self.derived(lambda: self.to_dense().to(torch.float32)), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threads={self.threads}"
