"""Fake (meta) implementations of the ``torch.ops.sparsekit`` kernels.

They give each op's output shape and dtype without computing it, so that
``torch.compile`` and ``torch.export`` can trace models that call the kernels (the ops are
opaque to the tracer; only these shapes are seen). A linear kernel's output has the
dtype of its input ``x``. The schemas are in ``library.cpp``.
"""

from __future__ import annotations

import torch

__all__ = ["register"]

_registered = False


def _linear(x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"x must have in_features={in_features} columns, got {tuple(x.shape)}")
    return x.new_empty(*x.shape[:-1], out_features)


def _like(op: object):  # type: ignore[no-untyped-def]
    """A fake implementation that is ``op``'s (called on fake tensors, it runs op's fake)."""
    def same(*args, **kwargs):  # type: ignore[no-untyped-def]
        return op(*args, **kwargs)  # type: ignore[operator]
    return same


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
        return _linear(x, in_features, rowptr.shape[0] - 1)

    @fake("sparsekit::bitmap_linear")
    def _(values, bitmap, rowptr, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        return _linear(x, in_features, bitmap.shape[0])

    @fake("sparsekit::nm_linear")
    def _(values, indices, x, bias, n, m, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        return _linear(x, in_features, values.shape[0])

    @fake("sparsekit::bsr_linear")
    def _(values, col_indices, rowptr, x, bias, out_features, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        return _linear(x, in_features, out_features)

    @fake("sparsekit::fanin_linear")
    def _(values, col_indices, rows, x, bias, out_features, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        return _linear(x, in_features, out_features)

    @fake("sparsekit::dense_linear")
    def _(weight, x, bias, in_features, threads, scales=None):  # type: ignore[no-untyped-def]
        return _linear(x, in_features, weight.shape[0])

    # The W8A8 ops take their float op's arguments and give its shapes: its fake answers.
    for family in ("dense", "bitmap", "nm"):
        float_op = getattr(torch.ops.sparsekit, f"{family}_linear")
        fake(f"sparsekit::{family}_qlinear")(_like(float_op))

    @fake("sparsekit::act_gemv")
    def _(wt, x, threshold, bias, threads, scales=None):  # type: ignore[no-untyped-def]
        return x.new_empty(wt.shape[1])

    @fake("sparsekit::act_threshold")
    def _(x, threshold):  # type: ignore[no-untyped-def]
        return torch.empty_like(x)

    @fake("sparsekit::act_threshold.out")
    def _(x, threshold, *, out):  # type: ignore[no-untyped-def]
        return out

    @fake("sparsekit::act_sparse_gemv")
    def _(values, rows, colptr, x, threshold, bias, out_features, block, threads, scales=None):  # type: ignore[no-untyped-def]
        return x.new_empty(out_features)

    @fake("sparsekit::act_bitmap_gemv")
    def _(values, bitmap, offsets, x, threshold, bias, out_features, block, threads, scales=None):  # type: ignore[no-untyped-def]
        return x.new_empty(out_features)

    @fake("sparsekit::act_bitmap_qgemv")
    def _(values, bitmap, offsets, x, threshold, bias, out_features, block, threads, scales):  # type: ignore[no-untyped-def]
        return x.new_empty(out_features)

    @fake("sparsekit::spmm_rows")
    def _(rowptr, col, values, perm, xt, bias, in_features, threads):  # type: ignore[no-untyped-def]
        return xt.new_empty(rowptr.shape[0] - 1, xt.shape[1])

    @fake("sparsekit::sddmm")
    def _(rowptr, col, a, b, in_features, threads):  # type: ignore[no-untyped-def]
        return a.new_empty(col.shape[0])

    @fake("sparsekit::block_sparse_attention")
    def _(q, k, v, block_mask, causal, block_size, scale, threads):  # type: ignore[no-untyped-def]
        torch._check(q.dim() == 4, lambda: f"q must be 4-D, got {tuple(q.shape)}")
        return q.new_empty(q.shape)
