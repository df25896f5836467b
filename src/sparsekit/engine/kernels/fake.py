"""Fake (meta) implementations of the ``torch.ops.sparsekit`` kernels.

They give each op's output shape and dtype without computing it, so that
``torch.compile`` and ``torch.export`` can trace models that call the kernels (the ops are
opaque to the tracer; only these shapes are seen). A linear kernel's output has the
dtype of its input ``x``. The schemas are in ``library.cpp``.

Each one first refuses (``RuntimeError``, naming the argument) what the op's C++ checks
refuse from sizes, dtypes and contiguity alone (``common.h``, ``act_inputs.h``): a traced
call the real op would refuse (an ``x`` of float64, a bias of the wrong length, threads=0)
used to trace into a graph of the wrong dtype or shape. Only what needs the tensors' values
(the ends of row pointers, rising offsets) is left to the op.
"""

from __future__ import annotations

import math

import torch

__all__ = ["register"]

_registered = False


_FLOAT = (torch.float32, torch.bfloat16)  # inputs of the linear and attention ops
_VALUES = (torch.float32, torch.bfloat16, torch.int8)  # stored values (check_values)
_INDEX = (torch.int16, torch.int32)  # column indices (check_index)
_TRAIN = (torch.float32, torch.float64)  # the training ops' dense operands
_MAX_THREADS = 65536
_MAX_Q_IN_FEATURES = 65536  # the W8A8 ops: exact int32 sums (qlinear.cpp)


def _tensor(t: torch.Tensor, name: str, dim: int,
            dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """check_tensor of common.h: ``t`` contiguous, ``dim``-D, of one of ``dtypes``."""
    torch._check(t.dim() == dim and t.is_contiguous(), lambda: f"{name} must be a contiguous "
                 f"{dim}-D tensor, got shape {tuple(t.shape)}"
                 f"{'' if t.is_contiguous() else ' (not contiguous)'}")
    if dtypes is not None:
        torch._check(t.dtype in dtypes, lambda: f"{name} must be one of {dtypes}, got {t.dtype}")


def _size(t: torch.Tensor, name: str, d: int, expected: int) -> None:
    """check_size of common.h."""
    torch._check(t.shape[d] == expected, lambda: f"{name}.size({d}) must be {expected}, got "
                 f"{t.shape[d]} ({name} has shape {tuple(t.shape)})")


def _threads(threads: int) -> None:
    torch._check(1 <= threads <= _MAX_THREADS,
                 lambda: f"threads must be in [1, {_MAX_THREADS}], got {threads}")


def _input(x: torch.Tensor, in_features: int) -> None:
    """check_input_or_bf16: x (..., in_features) of float32 or bfloat16, contiguous."""
    torch._check(x.dim() >= 1 and x.is_contiguous(), lambda: "x must be a contiguous tensor of "
                 f"shape (..., in_features), got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOAT, lambda: f"x must be one of {_FLOAT}, got {x.dtype}")
    torch._check(in_features >= 0, lambda: f"in_features must be non-negative, got {in_features}")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x must have in_features={in_features} columns, got {tuple(x.shape)}")


def _scales(scales: torch.Tensor | None, values: torch.Tensor, rows: int, cols: int,
            group_multiple: int | None) -> None:
    """scales_data / group_scales: float32 ``(rows,)`` with int8 values and none with others;
    where the op takes groups (``group_multiple``: their sizes' multiple), ``(rows, groups)``
    with groups dividing ``cols`` into groups of a multiple of ``group_multiple`` inputs."""
    if values.dtype != torch.int8:
        torch._check(scales is None, lambda: f"scales must be None for {values.dtype} values "
                     "(only int8 values are scaled)")
        return
    torch._check(scales is not None,
                 lambda: f"scales (float32 of shape ({rows},)) are required with int8 values")
    assert scales is not None
    if group_multiple is not None and scales.dim() == 2:
        _tensor(scales, "scales", 2, (torch.float32,))
        _size(scales, "scales", 0, rows)
        groups = scales.shape[1]
        torch._check(1 <= groups <= cols and cols % groups == 0
                     and (cols // groups) % group_multiple == 0,
                     lambda: f"scales of shape {tuple(scales.shape)} must hold one scale per "
                     f"row and group, their number of groups dividing in_features={cols} "
                     f"into groups of a multiple of {group_multiple} inputs")
        return
    _tensor(scales, "scales", 1, (torch.float32,))
    _size(scales, "scales", 0, rows)


def _bias(bias: torch.Tensor | None, rows: int, dtype: torch.dtype = torch.float32) -> None:
    if bias is not None:
        _tensor(bias, "bias", 1, (dtype,))
        _size(bias, "bias", 0, rows)


def _linear(x: torch.Tensor, in_features: int, out_features: int, values: torch.Tensor,
            bias: torch.Tensor | None, threads: int, scales: torch.Tensor | None,
            group_multiple: int | None = None) -> torch.Tensor:
    """The output (..., out_features) of a linear op, once its x, scales, bias and threads
    pass the op's checks (its own tensors are the caller's to check, first)."""
    _scales(scales, values, out_features, in_features, group_multiple)
    _bias(bias, out_features)
    _threads(threads)
    return x.new_empty(*x.shape[:-1], out_features)


def _rowptr(rowptr: torch.Tensor, rows: int) -> None:
    """check_rowptr's sizes: int32 (rows + 1,); its ends hold data, which the op checks."""
    _tensor(rowptr, "rowptr", 1, (torch.int32,))
    _size(rowptr, "rowptr", 0, rows + 1)


def _nm(values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int) -> int:
    """The N:M ops' checks of values (rows, width) and indices (nm.cpp); the group multiple
    of their scales."""
    torch._check((n, m) in ((1, 4), (2, 4), (4, 8)), lambda: f"unsupported N:M {n}:{m}")
    _tensor(values, "values", 2, _VALUES)
    _tensor(indices, "indices", 2, (torch.int32,))
    fbits, width = (2 if m == 4 else 4), (in_features + m - 1) // m * n
    _size(values, "values", 1, width)
    _size(indices, "indices", 0, values.shape[0])
    _size(indices, "indices", 1, (width + 15) // 16 * fbits // 2)
    return 16 // n * m


def _q(x: torch.Tensor, in_features: int, codes: torch.Tensor, name: str, dim: int) -> None:
    """check_q of qlinear.cpp: the W8A8 ops' x and int8 codes."""
    _input(x, in_features)
    torch._check(in_features <= _MAX_Q_IN_FEATURES, lambda: f"in_features must be at most "
                 f"{_MAX_Q_IN_FEATURES} (int32 sums of int8 products), got {in_features}")
    _tensor(codes, name, dim, (torch.int8,))


def _act(values: torch.Tensor, name: str, x: torch.Tensor, threshold: torch.Tensor, in_: int,
         bias: torch.Tensor | None, scales: torch.Tensor | None, out: int, threads: int,
         groups: bool = False) -> None:
    """check_act_inputs and check_act_outputs of act_inputs.h (``groups``: the op takes int8
    scales per group of inputs and output, ``(groups, out)``)."""
    torch._check(values.dtype in _VALUES,
                 lambda: f"{name} must be one of {_VALUES}, got {values.dtype}")
    _tensor(x, "x", 1, _FLOAT if values.dtype == torch.int8 else (values.dtype,))
    _size(x, "x", 0, in_)
    _tensor(threshold, "threshold", 1, (x.dtype,))
    _size(threshold, "threshold", 0, in_)
    _bias(bias, out, x.dtype)
    if groups and values.dtype == torch.int8 and scales is not None and scales.dim() == 2:
        _tensor(scales, "scales", 2, (torch.float32,))
        _size(scales, "scales", 1, out)
        torch._check(1 <= scales.shape[0] <= in_ and in_ % scales.shape[0] == 0,
                     lambda: f"scales of shape {tuple(scales.shape)} must hold one scale per "
                     "group of inputs and output (groups, out_features), their number of "
                     f"groups dividing in_features={in_} (groups of at least one input)")
    else:
        _scales(scales, values, out, in_, None)
    _threads(threads)


def _act_bitmap(values: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                x: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor | None,
                out_features: int, block: int, threads: int,
                scales: torch.Tensor | None, groups: bool) -> torch.Tensor:
    """checked_args of act_bitmap_gemv.cpp, and the output."""
    _tensor(values, "values", 1)
    torch._check(x.dim() == 1, lambda: f"x must be 1-D, got shape {tuple(x.shape)}")
    in_ = x.shape[0]
    torch._check(out_features >= 0,
                 lambda: f"out_features must be non-negative, got {out_features}")
    torch._check(64 <= block <= 4096 and block % 64 == 0,
                 lambda: f"block must be a multiple of 64 in [64, 4096], got {block}")
    blocks = (out_features + block - 1) // block
    _tensor(bitmap, "bitmap", 3, (torch.int16,))
    for d, size in enumerate((in_, blocks, block // 16)):
        _size(bitmap, "bitmap", d, size)
    _tensor(offsets, "offsets", 2, (torch.int32,))
    _size(offsets, "offsets", 0, in_)
    _size(offsets, "offsets", 1, blocks + 1)
    _act(values, "values", x, threshold, in_, bias, scales, out_features, threads, groups)
    return x.new_empty(out_features)


def _on_one_device(name: str):  # type: ignore[no-untyped-def]
    """``torch.library.register_fake(name)`` for an implementation that first checks that
    every tensor argument is on one device. A call mixing CPU and meta tensors (e.g. a
    ``k`` moved to ``meta``) dispatches to this fake as the meta kernel; without the check it
    returned uninitialised memory as the result."""
    def register(fn):  # type: ignore[no-untyped-def]
        def checked(*args, **kwargs):  # type: ignore[no-untyped-def]
            devices = {t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
            torch._check(len(devices) <= 1, lambda: f"{name}: every tensor argument must be on "
                         f"one device, got {sorted(map(str, devices))}")
            return fn(*args, **kwargs)
        return torch.library.register_fake(name)(checked)
    return register


def register() -> None:
    """Register every fake implementation (once per process; the ops must be loaded)."""
    global _registered
    if _registered:
        return
    _registered = True
    fake = _on_one_device

    @fake("sparsekit::csr_linear")
    def _(values, col_indices, rowptr, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _input(x, in_features)
        _tensor(values, "values", 1, _VALUES)
        _tensor(col_indices, "col_indices", 1, _INDEX)
        _size(col_indices, "col_indices", 0, values.shape[0])
        torch._check(rowptr.dim() == 1 and rowptr.shape[0] >= 1, lambda: "rowptr must be 1-D "
                     f"with rows + 1 >= 1 entries, got shape {tuple(rowptr.shape)}")
        _rowptr(rowptr, rowptr.shape[0] - 1)
        return _linear(x, in_features, rowptr.shape[0] - 1, values, bias, threads, scales, 1)

    def bitmap_rows(bitmap, rowptr, in_features):  # type: ignore[no-untyped-def]
        _tensor(bitmap, "bitmap", 2, (torch.int16,))
        _size(bitmap, "bitmap", 1, (in_features + 15) // 16)
        _rowptr(rowptr, bitmap.shape[0])
        return bitmap.shape[0]

    @fake("sparsekit::bitmap_linear")
    def _(values, bitmap, rowptr, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _input(x, in_features)
        _tensor(values, "values", 1, _VALUES)
        rows = bitmap_rows(bitmap, rowptr, in_features)
        return _linear(x, in_features, rows, values, bias, threads, scales, 16)

    @fake("sparsekit::bitmap_qlinear")
    def _(values, bitmap, rowptr, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _q(x, in_features, values, "values", 1)
        rows = bitmap_rows(bitmap, rowptr, in_features)
        return _linear(x, in_features, rows, values, bias, threads, scales)

    @fake("sparsekit::nm_linear")
    def _(values, indices, x, bias, n, m, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _input(x, in_features)
        multiple = _nm(values, indices, n, m, in_features)
        return _linear(x, in_features, values.shape[0], values, bias, threads, scales, multiple)

    @fake("sparsekit::nm_qlinear")
    def _(values, indices, x, bias, n, m, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _q(x, in_features, values, "values", 2)
        _nm(values, indices, n, m, in_features)
        return _linear(x, in_features, values.shape[0], values, bias, threads, scales)

    @fake("sparsekit::bsr_linear")
    def _(values, col_indices, rowptr, x, bias, out_features, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _input(x, in_features)
        _tensor(values, "values", 3, _VALUES)
        r, c = values.shape[1], values.shape[2]
        torch._check(1 <= r <= 64 and c >= 4 and c % 4 == 0, lambda: "block rows must lie in "
                     f"[1, 64] and block columns be a multiple of 4, got {r}x{c}")
        torch._check(out_features >= 0,
                     lambda: f"out_features must be non-negative, got {out_features}")
        _tensor(col_indices, "col_indices", 1, _INDEX)
        _size(col_indices, "col_indices", 0, values.shape[0])
        _rowptr(rowptr, (out_features + r - 1) // r)
        return _linear(x, in_features, out_features, values, bias, threads, scales,
                       group_multiple=c)

    @fake("sparsekit::fanin_linear")
    def _(values, col_indices, rows, x, bias, out_features, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _input(x, in_features)
        _tensor(values, "values", 2, _VALUES)
        _tensor(col_indices, "col_indices", 2, _INDEX)
        torch._check(col_indices.shape == values.shape, lambda: "col_indices must have the "
                     f"shape of values {tuple(values.shape)}, got {tuple(col_indices.shape)}")
        _tensor(rows, "rows", 1, (torch.int32,))
        _size(rows, "rows", 0, values.shape[0])
        torch._check(out_features >= values.shape[0], lambda: "out_features must be at least "
                     f"the {values.shape[0]} stored rows, got {out_features}")
        return _linear(x, in_features, out_features, values, bias, threads, scales, 1)

    @fake("sparsekit::dense_linear")
    def _(weight, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _input(x, in_features)
        _tensor(weight, "weight", 2, (torch.int8, torch.bfloat16))
        _size(weight, "weight", 1, in_features)
        return _linear(x, in_features, weight.shape[0], weight, bias, threads, scales, 1)

    @fake("sparsekit::dense_qlinear")
    def _(weight, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        _q(x, in_features, weight, "weight", 2)
        _size(weight, "weight", 1, in_features)
        return _linear(x, in_features, weight.shape[0], weight, bias, threads, scales)

    @fake("sparsekit::act_gemv")
    def _(wt, x, threshold, bias, threads, scales=None):  # type: ignore[no-untyped-def]
        _tensor(wt, "wt", 2)
        _act(wt, "wt", x, threshold, wt.shape[0], bias, scales, wt.shape[1], threads, True)
        return x.new_empty(wt.shape[1])

    def threshold_args(x, threshold):  # type: ignore[no-untyped-def]
        torch._check(x.dtype in _FLOAT, lambda: f"x must be one of {_FLOAT}, got {x.dtype}")
        torch._check(x.dim() >= 1 and x.is_contiguous(), lambda: "x must be a contiguous tensor "
                     f"of at least one dimension, got shape {tuple(x.shape)}")
        _tensor(threshold, "threshold", 1, (x.dtype,))
        _size(threshold, "threshold", 0, x.shape[-1])

    @fake("sparsekit::act_threshold")
    def _(x, threshold):  # type: ignore[no-untyped-def]
        threshold_args(x, threshold)
        return torch.empty_like(x)

    @fake("sparsekit::act_threshold.out")
    def _(x, threshold, *, out):  # type: ignore[no-untyped-def]
        threshold_args(x, threshold)
        torch._check(out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous(),
                     lambda: f"out must be a contiguous tensor of x's shape {tuple(x.shape)} and "
                     f"dtype {x.dtype}, got shape {tuple(out.shape)} and dtype {out.dtype}")
        return out

    @fake("sparsekit::act_sparse_gemv")
    def _(values, rows, colptr, x, threshold, bias, out_features, block, threads, scales=None):  # type: ignore[no-untyped-def]
        _tensor(values, "values", 1)
        _tensor(rows, "rows", 1, (torch.int16,))
        _size(rows, "rows", 0, values.shape[0])
        _tensor(x, "x", 1)
        torch._check(out_features >= 0,
                     lambda: f"out_features must be non-negative, got {out_features}")
        torch._check(1 <= block <= 65536, lambda: f"block must be in [1, 65536], got {block}")
        _tensor(colptr, "colptr", 2, (torch.int32,))
        _size(colptr, "colptr", 0, (out_features + block - 1) // block)
        _size(colptr, "colptr", 1, x.shape[0] + 1)
        _act(values, "values", x, threshold, x.shape[0], bias, scales, out_features, threads,
             True)
        return x.new_empty(out_features)

    @fake("sparsekit::act_bitmap_gemv")
    def _(values, bitmap, offsets, x, threshold, bias, out_features, block, threads, scales=None):  # type: ignore[no-untyped-def]
        return _act_bitmap(values, bitmap, offsets, x, threshold, bias, out_features, block,
                           threads, scales, True)

    @fake("sparsekit::act_bitmap_qgemv")
    def _(values, bitmap, offsets, x, threshold, bias, out_features, block, threads, scales):  # type: ignore[no-untyped-def]
        torch._check(values.dtype == torch.int8,
                     lambda: f"values must be int8 codes, got {values.dtype}")
        torch._check(x.dim() != 1 or x.shape[0] <= _MAX_Q_IN_FEATURES, lambda: "in_features "
                     f"must be at most {_MAX_Q_IN_FEATURES} (int32 sums of int8 products), got "
                     f"{x.shape[0]}")
        return _act_bitmap(values, bitmap, offsets, x, threshold, bias, out_features, block,
                           threads, scales, False)

    def structure(rowptr, col, rows):  # type: ignore[no-untyped-def]
        _tensor(col, "col", 1, (torch.int32,))
        _rowptr(rowptr, rows)

    @fake("sparsekit::spmm_rows")
    def _(rowptr, col, values, perm, xt, bias, in_features, threads):  # type: ignore[no-untyped-def]
        _tensor(xt, "xt", 2, _TRAIN)
        _size(xt, "xt", 0, in_features)
        torch._check(rowptr.dim() == 1 and rowptr.shape[0] >= 1, lambda: "rowptr must be 1-D "
                     f"with rows + 1 >= 1 entries, got shape {tuple(rowptr.shape)}")
        rows = rowptr.shape[0] - 1
        structure(rowptr, col, rows)
        _tensor(values, "values", 1, (xt.dtype,))
        _size(values, "values", 0, col.shape[0])
        if perm is not None:
            _tensor(perm, "perm", 1, (torch.int64,))
            _size(perm, "perm", 0, col.shape[0])
        _bias(bias, rows, xt.dtype)
        _threads(threads)
        return xt.new_empty(rows, xt.shape[1])

    @fake("sparsekit::sddmm")
    def _(rowptr, col, a, b, in_features, threads):  # type: ignore[no-untyped-def]
        _tensor(a, "a", 2, _TRAIN)
        _tensor(b, "b", 2, _TRAIN)
        structure(rowptr, col, a.shape[0])
        _size(b, "b", 0, in_features)
        torch._check(a.dtype == b.dtype and a.shape[1] == b.shape[1], lambda: "a and b must "
                     f"share dtype and batch size, got {a.dtype} {tuple(a.shape)} and {b.dtype} "
                     f"{tuple(b.shape)}")
        _threads(threads)
        return a.new_empty(col.shape[0])

    @fake("sparsekit::block_sparse_attention")
    def _(q, k, v, block_mask, causal, block_size, scale, threads):  # type: ignore[no-untyped-def]
        _tensor(q, "q", 4, _FLOAT)
        _tensor(k, "k", 4, (q.dtype,))
        _tensor(v, "v", 4, (q.dtype,))
        batch, heads, q_len, dim = q.shape
        torch._check(heads >= 1 and dim >= 1, lambda: "q must have heads >= 1 and head_dim >= 1, "
                     f"got shape {tuple(q.shape)}")
        _size(k, "k", 0, batch)
        _size(k, "k", 3, dim)
        torch._check(v.shape == k.shape, lambda: f"v must have the shape of k {tuple(k.shape)}, "
                     f"got {tuple(v.shape)}")
        kv_heads, kv_len = k.shape[1], k.shape[2]
        torch._check(kv_heads >= 1 and heads % kv_heads == 0, lambda: "k must have a number of "
                     f"heads ({kv_heads}) that divides the query heads ({heads})")
        torch._check(block_size >= 1, lambda: f"block_size must be at least 1, got {block_size}")
        q_blocks = (q_len + block_size - 1) // block_size
        k_blocks = (kv_len + block_size - 1) // block_size
        _tensor(block_mask, "block_mask", 4, (torch.bool,))
        mb, mh = block_mask.shape[0], block_mask.shape[1]
        torch._check((mb == 1 or mb == batch) and (mh == 1 or mh == heads)
                     and block_mask.shape[2] == q_blocks and block_mask.shape[3] == k_blocks,
                     lambda: f"block_mask must have shape (1 or {batch}, 1 or {heads}, "
                     f"{q_blocks}, {k_blocks}) for block_size={block_size}, got "
                     f"{tuple(block_mask.shape)}")
        torch._check(math.isfinite(scale) and scale > 0,
                     lambda: f"scale must be a positive finite float, got {scale}")
        _threads(threads)
        return q.new_empty(q.shape)
