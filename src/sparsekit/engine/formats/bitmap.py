"""Bitmap rows: one bit per weight plus the packed fp32, bf16 or int8 values of the kept
ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsekit.engine.formats.csr import csr_parts
from sparsekit.engine.formats.native import INT8_INPUTS, SCALES, NativeFormat, Operands

__all__ = ["Bitmap"]

_WORD = 16  # bits per bitmap word: one AVX-512 expand-load of 16 values


class Bitmap(NativeFormat):
    """Per row a bitmap of ``in_features`` bits (int16 words, zero-padded per row), the kept
    values packed row by row (fp32 or bf16, the weight's dtype, or int8 with ``scales`` per
    row or per row and group of a multiple of 16 inputs) and int32 row pointers into them.

    It moves 4 bytes per nonzero + 1 bit per weight (2.125 B/weight at 50% sparsity, vs 3 for
    CSR16 and 4 for dense; in bf16 1.125 vs 2 for dense), and the kernel streams it like a
    dense row: the sweet spot is moderate sparsity. Any mask fits;
    :func:`~sparsekit.engine.compile` decides by timing.

    On AVX-512 CPUs with VNNI, one float input row against int8 values (per-row scales, at
    least 2^20 weight positions, at most 65536 inputs) runs as three int8 slices through
    integer dot products, faster than widening the codes: its error is at most
    ``max|x| / (2 * 127 * 254**2)`` per input, the row in block floating point
    (``kernels/qlinear_core.h``, ``split_row``).
    """

    name = "bitmap"
    buffer_names = ("bitmap_values", "bitmap_mask", "bitmap_rowptr")
    optional_buffers = (SCALES, INT8_INPUTS)
    dtypes = (torch.float32, torch.bfloat16)
    value_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    activation_dtypes = (torch.int8,)  # W8A8: the bitmap_qlinear op
    group_scales = True  # int8 codes times float inputs: a span of whole words per group
    group_multiple = 16

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, cols = weight.shape
        words = _words(cols)
        keep = torch.zeros(rows, words * _WORD, dtype=torch.int32)
        keep[:, :cols] = weight != 0
        bits = (keep.view(rows, words, _WORD) << torch.arange(_WORD, dtype=torch.int32)).sum(-1)
        bitmap = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
        rowptr, _, values = csr_parts(weight)
        return values, bitmap, rowptr

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        values, bitmap, rowptr = tensors
        rows, cols = shape
        cls.check_values("bitmap_values", values)
        if values.dim() != 1:
            raise ValueError(f"bitmap_values must be 1-D, got shape {tuple(values.shape)}")
        if bitmap.dtype != torch.int16 or tuple(bitmap.shape) != (rows, _words(cols)):
            raise ValueError(f"bitmap_mask must be int16 of shape {(rows, _words(cols))}, got "
                             f"{bitmap.dtype} {tuple(bitmap.shape)}")
        if rowptr.dtype != torch.int32 or tuple(rowptr.shape) != (rows + 1,):
            raise ValueError(f"bitmap_rowptr must be int32 of shape ({rows + 1},), got "
                             f"{rowptr.dtype} {tuple(rowptr.shape)}")
        keep = _unpack(bitmap)
        if bool(keep[:, cols:].any()):
            raise ValueError(f"bitmap_mask has bits set beyond the {cols} inputs")
        counts = torch.zeros(rows + 1, dtype=torch.int64)
        counts[1:] = keep.sum(1).cumsum(0)
        if not torch.equal(counts, rowptr.to(torch.int64)) or int(counts[-1]) != values.numel():
            raise ValueError("bitmap_rowptr must count the set bits of bitmap_mask up to the "
                             f"{values.numel()} bitmap_values")

    def _operands(self) -> Operands:
        b, ops = self._buffers, torch.ops.sparsekit
        return (ops.bitmap_qlinear if self.quantizes_inputs else ops.bitmap_linear,
                (b["bitmap_values"], b["bitmap_mask"], b["bitmap_rowptr"]), (self.in_features,))

    def stored_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.bitmap_values.dtype)
        dense[_unpack(self.bitmap_mask)[:, : self.in_features]] = self.bitmap_values
        return dense

    @property
    def nnz(self) -> int:
        return self.bitmap_values.numel()


def _words(cols: int) -> int:
    return -(-cols // _WORD)


def _unpack(bitmap: torch.Tensor) -> torch.Tensor:
    """The ``(rows, words * 16)`` bool mask of an int16 ``(rows, words)`` bitmap."""
    bits = bitmap.to(torch.int32).unsqueeze(-1) >> torch.arange(_WORD, dtype=torch.int32)
    return (bits & 1).bool().flatten(1)
