"""Dense formats: the baseline (``F.linear`` on the masked weight) and the low-precision
one (bf16 or int8 values, sparsekit's own kernel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sparsekit._checks import ArgumentTypeError, check_materialized
from sparsekit.engine.formats.base import Format, masked
from sparsekit.engine.formats.native import INT8_INPUTS, SCALES, NativeFormat, Operands
from sparsekit.quantize import check_scale_values

__all__ = ["DenseFormat", "DenseLowPrecision"]


class DenseFormat(Format):
    """The dense baseline (``F.linear``); always a candidate.

    A weight that lies on an int8 grid (a layer carrying ``weight_scale``,
    :func:`sparsekit.quantize.attach_scales`) keeps that grid as the optional buffer
    :data:`~sparsekit.engine.formats.native.SCALES` (float32 ``(out,)`` or ``(out, groups)``):
    the product never reads it (the weight is float), but the layer given back
    (:meth:`~sparsekit.engine.compiled_linear.CompiledLinear.to_linear`, ``decompile``)
    carries it again, so that compiling that layer stores the same int8 codes. Without it a
    layer compile left dense lost its grid.
    """

    name = "dense"
    buffer_names = ("weight",)
    optional_buffers = (SCALES,)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
    ) -> DenseFormat:
        """Hold ``weight * mask``; ``scales``: the int8 grid ``weight`` lies on (a layer's
        ``weight_scale``), kept in float32 (see :meth:`check_state`)."""
        weight = masked(weight, mask)
        cls._check_dtype(weight)
        tensors = [weight.clone(memory_format=torch.contiguous_format)]
        if scales is not None:
            if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
                got = scales.dtype if isinstance(scales, torch.Tensor) else type(scales).__name__
                raise ArgumentTypeError(f"scales must be None or a floating tensor, got {got}")
            # float32, as the int8 formats store them (a model cast to bfloat16 casts its
            # weight_scale too)
            tensors.append(scales.detach().to(torch.float32, memory_format=torch.contiguous_format,
                                              copy=True))
        cls.check_state(tensors, tuple(weight.shape))
        return cls(tensors, tuple(weight.shape))

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless ``tensors`` are a floating ``shape`` weight and
        perhaps its int8 grid: float32 scales of shape ``(rows,)`` or ``(rows, groups)``
        with ``groups`` dividing the inputs, positive and finite (what ``weight_scale``
        holds)."""
        weight, *grid = tensors
        if tuple(weight.shape) != tuple(shape) or not weight.is_floating_point():
            raise ValueError(
                f"dense weight must be a floating {tuple(shape)} tensor, got "
                f"{tuple(weight.shape)} {weight.dtype}"
            )
        if not grid:
            return
        (scales,) = grid
        rows, cols = shape
        groups = scales.shape[1] if scales.dim() == 2 else 1
        if (scales.dtype != torch.float32 or scales.dim() not in (1, 2)
                or scales.shape[0] != rows or not 1 <= groups <= cols or cols % groups):
            raise ValueError(
                f"buffer {SCALES!r} of the dense format (its weight's int8 grid) must be "
                f"float32 of shape ({rows},) or ({rows}, groups) with groups dividing {cols}, "
                f"got {scales.dtype} {tuple(scales.shape)}"
            )
        check_materialized(f"buffer {SCALES!r}", scales)
        check_scale_values(scales, f"buffer {SCALES!r}")

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None:
            self.check_bias(bias)  # F.linear would broadcast a (1,) bias
        if isinstance(x, torch.Tensor):
            self._check_input_dtype(x)
        return self._linear(x, bias)

    def trusted_matmul(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        return self._linear  # a bias check costs ~5 % of a small layer's call (the MARGIN)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape  # F.linear takes any (..., in_features)
        if not shape or shape[-1] != self.in_features:
            self.check_input(x)
        try:
            return F.linear(x, self._buffers["weight"], bias)
        except RuntimeError:  # named only when it failed: the hot path checks nothing first
            self._check_input_dtype(x)
            raise

    def _check_input_dtype(self, x: torch.Tensor) -> None:
        """Raise :class:`~sparsekit._checks.ArgumentTypeError` unless ``x`` has the weight's
        dtype (``F.linear``'s raw "mat1 and mat2 must have the same dtype" otherwise)."""
        weight = self._buffers["weight"]
        if x.dtype != weight.dtype:
            raise ArgumentTypeError(
                f"x must have the weight's dtype {weight.dtype} for this {self.out_features}x"
                f"{self.in_features} {self.name} weight, got {x.dtype}")

    def to_dense(self) -> torch.Tensor:
        return self.weight.clone()

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.weight))


class DenseLowPrecision(NativeFormat):
    """A dense weight stored in bfloat16 (2 bytes per weight) or as int8 codes with one
    float32 scale per row (1 byte), or one per row and group of inputs (a layer pruned with
    ``sparsekit.llm.prune(..., quantize="int8", group_size=128)``; float inputs only),
    multiplied by sparsekit's ``dense_linear`` kernel with float32 sums.

    Where sparsity does not pay (a layer below the sparse break-even) the weight can still
    move 2× or 4× fewer bytes than float32: decoding is bandwidth-bound, so that is the
    gain. One format whose :attr:`value_dtype` is a parameter, like every native format's,
    rather than one name per dtype: ``compile(weight_dtype=...)`` picks the dtype and the
    autotuner the layout.
    """

    name = "dense_lowp"
    buffer_names = ("lowp_weight",)
    optional_buffers = (SCALES, INT8_INPUTS)
    dtypes = (torch.float32, torch.bfloat16)
    value_dtypes = (torch.bfloat16, torch.int8)
    activation_dtypes = (torch.int8,)  # W8A8: the dense_qlinear op
    group_scales = True

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (weight.contiguous(),)

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        (weight,) = tensors
        cls.check_values("lowp_weight", weight)
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"lowp_weight must be of shape {tuple(shape)}, got "
                             f"{tuple(weight.shape)}")

    def _operands(self) -> Operands:
        ops = torch.ops.sparsekit
        return (ops.dense_qlinear if self.quantizes_inputs else ops.dense_linear,
                (self._buffers["lowp_weight"],), (self.in_features,))

    def stored_dense(self) -> torch.Tensor:
        return self.lowp_weight.clone()

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.lowp_weight))
