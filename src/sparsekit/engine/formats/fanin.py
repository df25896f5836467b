"""Condensed constant fan-in: every stored row keeps the same number k of weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsekit.engine.formats.base import masked
from sparsekit.engine.formats.index16 import narrow_index, unsigned_index
from sparsekit.engine.formats.native import SCALES, NativeFormat, Operands
from sparsekit.patterns import fan_in

__all__ = ["ConstantFanIn", "fan_in"]

_GATHER_ELEMENTS = 1 << 22  # largest gathered input block of the torch fallback (16 MiB)


class ConstantFanIn(NativeFormat):
    """Dense ``(rows, k)`` values and column indices for SRigL-style constant fan-in masks.

    Buffers: ``fanin_values`` (float32 or bfloat16 weights keep their dtype; int8 values
    come with ``scales`` per row or per row and group of inputs; sums are fp32),
    ``fanin_col_indices`` (int16 read as uint16, int32 for layers wider than 65536 inputs)
    and ``fanin_rows`` (int32 output row of each stored row). Rows without nonzeros
    (ablated neurons) are not stored, so they cost nothing but their bias. Runs on the
    compiled kernels, else on torch (same numbers). ``threads=None`` follows
    ``torch.get_num_threads()``.
    """

    name = "fanin"
    buffer_names = ("fanin_values", "fanin_col_indices", "fanin_rows")
    optional_buffers = (SCALES,)
    values_name = "fanin_values"
    dtypes = (torch.float32, torch.bfloat16)
    value_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    group_scales = True  # any group size: a row's columns rise (see CSR16)

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """float32 or bfloat16 CPU weights whose nonempty rows share one fan-in below
        ``in_features``."""
        if weight.dim() != 2 or not super().supports(weight):
            return False
        k = fan_in(weight != 0)
        return k is not None and k < weight.shape[1]

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
        threads: int | None = None, **options: object,
    ) -> ConstantFanIn:
        """:meth:`NativeFormat.from_dense` that keeps the fan-in of ``weight * mask``: an
        int8 code that rounds to 0 is stored as a 0, not dropped (which would leave its row
        one input short of the others)."""
        keep = masked(weight, mask, materialized=True) != 0
        return super().from_dense(weight, mask, threads, keep=keep, **options)

    @classmethod
    def compress(
        cls, weight: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Values, columns and rows of the positions ``keep`` (default: the nonzeros)."""
        keep = weight != 0 if keep is None else keep
        k = fan_in(keep)
        if k is None:
            counts = sorted(set(keep.sum(dim=1).tolist()))
            raise ValueError(
                f"weight must have the same number of nonzeros in every nonempty row, got "
                f"row counts {counts[:8]}"
            )
        rows = keep.any(dim=1).nonzero()[:, 0]
        col = keep[rows].nonzero()[:, 1].reshape(rows.numel(), k)
        values = weight[rows].gather(1, col).contiguous()
        return values, narrow_index(col, weight.shape[1]), rows.to(torch.int32)

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        cls.check_values("fanin_values", tensors[0])
        _check_fanin(*tensors, shape)

    def _operands(self) -> Operands:
        b = self._buffers
        return (torch.ops.sparsekit.fanin_linear,
                (b["fanin_values"], b["fanin_col_indices"], b["fanin_rows"]),
                (self.out_features, self.in_features))

    def _fallback_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The same product with torch ops: gather the inputs of each stored row (int8
        values dequantized first)."""
        x = x.to(torch.float32)
        y = x.new_zeros(x.shape[0], self.out_features)
        cols, rows = unsigned_index(self.fanin_col_indices), self.fanin_rows.long()
        values = self._float_values(self.fanin_values, rows.unsqueeze(1), cols)
        step = max(1, _GATHER_ELEMENTS // max(1, x.shape[0] * cols.shape[1]))
        for start in range(0, rows.numel(), step):  # bounded (batch, rows, k) temporaries
            sl = slice(start, start + step)
            y[:, rows[sl]] = (x[:, cols[sl]] * values[sl]).sum(dim=-1)
        return y if bias is None else y + bias

    def stored_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.fanin_values.dtype)
        rows = self.fanin_rows.long()[:, None].expand_as(self.fanin_values)
        dense[rows, unsigned_index(self.fanin_col_indices)] = self.fanin_values
        return dense

    @property
    def nnz(self) -> int:
        return self.fanin_values.numel()

    def extra_repr(self) -> str:
        k, rows = self.fanin_values.shape[1], self.fanin_rows.numel()
        return f"{super().extra_repr()}, k={k}, rows={rows}, threads={self.threads}"


def _check_fanin(
    values: torch.Tensor, col: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]
) -> None:
    """Raise ``ValueError`` unless the three tensors form a valid fan-in ``shape`` weight, its
    columns increasing within each row (a column twice: the kernel added both values,
    to_dense kept one)."""
    out_features, in_features = shape
    if values.dim() != 2:
        raise ValueError(f"fanin_values must be (rows, k), got shape {tuple(values.shape)}")
    if col.dtype not in (torch.int16, torch.int32) or col.shape != values.shape:
        raise ValueError(
            f"fanin_col_indices must be int16 or int32 of shape {tuple(values.shape)}, got "
            f"{col.dtype} {tuple(col.shape)}"
        )
    if col.dtype == torch.int16 and in_features > 65536:
        raise ValueError(f"16-bit fanin_col_indices cannot address {in_features} inputs")
    if rows.dtype != torch.int32 or tuple(rows.shape) != (values.shape[0],):
        raise ValueError(
            f"fanin_rows must be int32 of shape ({values.shape[0]},), got {rows.dtype} "
            f"{tuple(rows.shape)}"
        )
    r = rows.to(torch.int64)
    if r.numel() and (int(r.min()) < 0 or int(r.max()) >= out_features
                      or r.unique().numel() != r.numel()):
        raise ValueError(f"fanin_rows must be distinct and lie in [0, {out_features})")
    cols = unsigned_index(col)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= in_features):
        raise ValueError(f"fanin_col_indices must lie in [0, {in_features})")
    if bool((cols[:, 1:] <= cols[:, :-1]).any()):
        raise ValueError("fanin_col_indices must increase within each row (no column twice)")
