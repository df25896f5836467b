"""CSR formats: torch's sparse CSR (int32 indices) and CSR16 (16-bit indices, own kernels)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from sparsekit._checks import ArgumentTypeError, check_materialized
from sparsekit.engine.formats.base import Format, masked
from sparsekit.engine.formats.index16 import narrow_index, unsigned_index
from sparsekit.engine.formats.native import SCALES, NativeFormat, Operands

__all__ = ["CSR16", "TorchCSR", "check_csr", "csr_parts", "entry_rows"]


class TorchCSR(Format):
    """``torch.sparse_csr_tensor`` with int32 indices, called in its fastest form.

    Batch 1 runs ``W_csr @ x`` on a 1-D vector and larger batches ``(W_csr @ x.T).T``
    (sparse operand on the left); int64 indices would be converted on every call.
    """

    name = "torch_csr"
    buffer_names = ("crow_indices", "col_indices", "values")
    values_name = "values"
    dtypes = (torch.float32, torch.float64)  # on CPU (MKL has no bf16/fp16 addmv or addmm)

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """Any weight on a GPU; float32/float64 ones on the CPU."""
        return weight.device.type != "cpu" or super().supports(weight)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> TorchCSR:
        weight = masked(weight, mask, materialized=True)
        if weight.is_cpu:  # see dtypes
            cls._check_dtype(weight)
        return cls(csr_parts(weight), tuple(weight.shape))

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless ``tensors`` form a valid CSR ``shape`` weight of
        floating values, none on the meta device (their indices are read)."""
        for name, tensor in zip(cls.buffer_names, tensors, strict=True):
            check_materialized(f"buffer {name!r}", tensor)
        check_csr(*tensors, shape, (torch.int32,))
        if not tensors[2].is_floating_point():
            raise ValueError(f"values must be floating, got {tensors[2].dtype}")

    def csr(self) -> torch.Tensor:
        """The sparse CSR tensor, rebuilt only when the buffers moved (``.to()``, load)."""
        return self.derived(
            lambda: _sparse_csr(self.crow_indices, self.col_indices, self.values, self)
        )

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The product, for an ``x`` of the values' dtype and device (and a ``bias`` on it):
        torch's sparse product converts neither (a float16 or meta ``x`` failed inside it
        with a raw error)."""
        values = self.values
        if x.dtype != values.dtype:
            raise ArgumentTypeError(
                f"x must have the values' dtype {values.dtype} for this {self.out_features}x"
                f"{self.in_features} {self.name} weight, got {x.dtype}")
        for name, t in (("x", x), ("bias", bias)):
            if t is not None and t.device != values.device:
                raise ValueError(f"{name} must be on the values' device {values.device} for "
                                 f"this {self.name} weight, got {t.device}")
        if x.is_meta:  # torch's sparse product has no meta kernel: a raw NotImplementedError
            raise ValueError(f"x must hold data for this {self.name} weight (torch's sparse "
                             "product runs on real tensors), got a tensor on the meta device")
        return _csr_mm(self.csr(), x, bias)

    def to_dense(self) -> torch.Tensor:
        return self.csr().to_dense()

    @property
    def nnz(self) -> int:
        return self.values.numel()


class CSR16(NativeFormat):
    """CSR with 16-bit column indices run by the compiled OpenMP kernels.

    fp32 values + uint16 column indices move 6 bytes per nonzero instead of torch CSR's 8
    (bf16 values: 4); layers wider than 65535 inputs fall back to int32 indices. Needs
    float32 or bfloat16 weights (values keep that dtype, sums are fp32) and the compiled
    kernels (see :mod:`sparsekit.engine.kernels`); where they are missing (a model loaded on
    another machine) it multiplies with torch CSR in float32 instead. int8 values (1 byte,
    3 per nonzero with the index) come with ``scales`` per row or per row and group of
    inputs (any group size: a row's columns rise, so each group's nonzeros are one run,
    summed and then scaled). ``threads=None`` follows ``torch.get_num_threads()`` (one
    thread for layers too small to split).
    """

    name = "csr16"
    buffer_names = ("rowptr", "col_indices", "values")
    optional_buffers = (SCALES,)
    values_name = "values"
    dtypes = (torch.float32, torch.bfloat16)
    value_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    group_scales = True

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        crow, col, values = csr_parts(weight)
        return crow, narrow_index(col, weight.shape[1]), values

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        rowptr, col, values = tensors
        check_csr(rowptr, col, values, shape, (torch.int16, torch.int32))
        cls.check_values("values", values)
        if col.dtype == torch.int16 and shape[1] > 65536:
            raise ValueError(f"16-bit column indices cannot address {shape[1]} inputs")

    def _operands(self) -> Operands:
        b = self._buffers
        return (torch.ops.sparsekit.csr_linear, (b["values"], b["col_indices"], b["rowptr"]),
                (self.in_features,))

    def _fallback_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Torch CSR in float32 on the same indices (e.g. a checkpoint loaded where the
        kernels cannot be built)."""
        def build() -> torch.Tensor:
            cols = unsigned_index(self.col_indices)
            values = self._float_values(self.values, self._rows(), cols)
            return _sparse_csr(self.rowptr, cols.to(torch.int32), values, self)

        return _csr_mm(self.derived(build), x, bias)

    def stored_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype)
        dense[self._rows(), unsigned_index(self.col_indices)] = self.values
        return dense

    def _rows(self) -> torch.Tensor:
        """The row of every stored value."""
        counts = torch.diff(self.rowptr.to(torch.int64))
        return torch.repeat_interleave(torch.arange(self.out_features), counts)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def extra_repr(self) -> str:
        bits = 16 if self.col_indices.dtype == torch.int16 else 32
        return f"{super().extra_repr()}, index_bits={bits}"


def _sparse_csr(
    rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, fmt: Format
) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            rowptr, col, values, (fmt.out_features, fmt.in_features), check_invariants=False
        )


def _csr_mm(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for a sparse CSR ``w``, in the fastest call form per batch."""
    y = (w @ x[0]).unsqueeze(0) if x.shape[0] == 1 else (w @ x.T).T
    return y if bias is None else y + bias


def check_csr(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int],
    col_dtypes: tuple[torch.dtype, ...],
) -> None:
    """Raise ``ValueError`` unless the three tensors form a valid CSR ``shape`` weight, its
    column indices increasing within each row (the values' dtype is the format's to
    check)."""
    out_features, in_features = shape
    if rowptr.dtype != torch.int32 or tuple(rowptr.shape) != (out_features + 1,):
        raise ValueError(
            f"row pointers must be int32 of shape ({out_features + 1},), got "
            f"{rowptr.dtype} {tuple(rowptr.shape)}"
        )
    if col.dtype not in col_dtypes or col.dim() != 1:
        raise ValueError(f"column indices must be 1-D {col_dtypes}, got {col.dtype} {col.dim()}-D")
    if values.dim() != 1 or values.numel() != col.numel():
        raise ValueError(
            f"values must be 1-D with one entry per column index ({col.numel()}), got "
            f"{values.dtype} {tuple(values.shape)}"
        )
    entry_rows(rowptr, col, values.numel(), in_features)


def entry_rows(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    count: int,
    width: int,
    *,
    pointers: str = "row pointers",
    indices: str = "column indices",
    entries: str = "values",
    row: str = "row",
    entry: str = "column",
) -> torch.Tensor:
    """The row of each of the ``count`` entries of a CSR layout (of values, or of BSR's
    blocks), raising ``ValueError`` unless the int32 ``rowptr`` (of the right shape: the
    caller's check) rises from 0 to ``count`` and the ``col`` indices lie in ``[0, width)``
    and increase within each row: an index twice in a row had the kernels add both values,
    where ``to_dense`` kept one. The messages name the caller's ``pointers``, ``indices``,
    ``entries``, a ``row`` and an ``entry``."""
    steps = torch.diff(rowptr.to(torch.int64))
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != count or bool((steps < 0).any()):
        raise ValueError(f"{pointers} must rise from 0 to the number of {entries}")
    cols = unsigned_index(col)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= width):
        raise ValueError(f"{indices} must lie in [0, {width})")
    rows = torch.repeat_interleave(torch.arange(rowptr.numel() - 1), steps)
    key = rows * width + cols
    if bool((key[1:] <= key[:-1]).any()):
        raise ValueError(f"{indices} must increase within each {row} (no {entry} twice)")
    return rows


def csr_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 row pointers, int32 column indices and values of the nonzeros of ``weight``."""
    keep = weight != 0
    rowptr = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    rowptr[1:] = keep.sum(dim=1).cumsum(0)
    col = keep.nonzero()[:, 1]
    return rowptr.to(torch.int32), col.to(torch.int32), weight[keep].contiguous()
