"""Direct calls of the value-typed linear ops (``csr_linear``, ``bitmap_linear``,
``nm_linear``, ``bsr_linear``, ``fanin_linear``) on fp32, bf16 and int8 weights, and their
float64 reference: shared by the kernel tests (``test_kernels_*.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsekit.engine.formats import FORMATS
from sparsekit.quantize import dequantize_int8, quantize_int8

OPS = ("csr16", "bitmap", "nm", "bsr", "fanin")
VALUE_DTYPES = ("fp32", "bf16", "int8")


@dataclass
class Case:
    """One weight of a format with values of one dtype: ``call(x, bias, threads)`` runs the
    op; ``reference`` is the exact (dequantized) weight in float64."""

    call: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]
    reference: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor | None


def weight(
    name: str, rows: int, cols: int, sparsity: float = 0.7, seed: int = 0,
    nm: tuple[int, int] = (2, 4),
) -> torch.Tensor:
    """A random fp32 weight that format ``name`` holds (N:M ``nm`` for ``nm``; 4 x 8 blocks,
    ragged at the edges, for ``bsr``; the same fan-in in every row but an empty one for
    ``fanin``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if name == "nm":
        n, m = nm
        keep = torch.rand(rows, -(-cols // m), m, generator=g).argsort(-1)[..., :n]
        mask = torch.zeros(rows, -(-cols // m), m).scatter_(-1, keep, 1.0)
        return w * mask.view(rows, -1)[:, :cols]
    if name == "bsr":
        keep = torch.rand(-(-rows // 4), -(-cols // 8), generator=g) >= sparsity
        return w * keep.repeat_interleave(4, 0).repeat_interleave(8, 1)[:rows, :cols]
    if name == "fanin":
        k = max(1, round(cols * (1 - sparsity)))
        w = w * (torch.rand(rows, cols, generator=g).argsort(1) < k)
        w[rows // 2] = 0  # an ablated neuron: not stored, its output is the bias
        return w
    return w * (torch.rand(rows, cols, generator=g) >= sparsity)


def case(name: str, dtype: str, w: torch.Tensor) -> Case:
    """The op of format ``name`` on ``w`` stored with ``dtype`` values."""
    scales, keep = None, w != 0
    if dtype == "int8":
        codes, scales = quantize_int8(w)
        exact = dequantize_int8(codes, scales)
        w = codes.to(torch.float32)  # compress the codes: the same nonzeros and positions
    elif dtype == "bf16":
        w = exact = w.to(torch.bfloat16).to(torch.float32)
    else:
        exact = w
    value_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[dtype]
    in_features = w.shape[1]
    ops = torch.ops.sparsekit
    if name == "csr16":
        rowptr, col, values = FORMATS["csr16"].compress(w)
        values = values.to(value_dtype)

        def call(x, bias, threads):  # type: ignore[no-untyped-def]
            return ops.csr_linear(values, col, rowptr, x, bias, in_features, threads, scales)
    elif name == "bitmap":
        values, bitmap, rowptr = FORMATS["bitmap"].compress(w)
        values = values.to(value_dtype)

        def call(x, bias, threads):  # type: ignore[no-untyped-def]
            return ops.bitmap_linear(values, bitmap, rowptr, x, bias, in_features, threads, scales)
    elif name == "nm":
        values, indices, pattern = FORMATS["nm"].compress(w)
        values = values.to(value_dtype)
        n, m = pattern.tolist()

        def call(x, bias, threads):  # type: ignore[no-untyped-def]
            return ops.nm_linear(values, indices, x, bias, n, m, in_features, threads, scales)
    else:
        parts = FORMATS[name].compress(w, **({"keep": keep} if name == "fanin" else {}))
        values, col, rows = parts
        values, out_features = values.to(value_dtype), w.shape[0]
        op = ops.bsr_linear if name == "bsr" else ops.fanin_linear

        def call(x, bias, threads):  # type: ignore[no-untyped-def]
            return op(values, col, rows, x, bias, out_features, in_features, threads, scales)
    return Case(call, exact.to(torch.float64), values, scales)


def assert_matches(y: torch.Tensor, c: Case, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``y`` equals the float64 product up to fp32 summation order (and one rounding to
    ``y``'s dtype, which is ``x``'s)."""
    ref = x.to(torch.float64) @ c.reference.T
    if bias is not None:
        ref = ref + bias.to(torch.float64)
    assert y.dtype == x.dtype and y.shape == ref.shape
    atol = 1e-5 * (1.0 + float(ref.abs().max()))
    if y.dtype == torch.bfloat16:
        torch.testing.assert_close(y.double(), ref.to(torch.bfloat16).double(), rtol=2**-7,
                                   atol=atol)
    else:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=atol)


def reloaded(compiled: torch.nn.Module, model: torch.nn.Module, path) -> torch.nn.Module:
    """``compiled`` saved to ``path`` and loaded into float32 bitmap layers compiled from
    ``model``: the load must bring back every tensor (names, dtypes, bits) of ``compiled``."""
    import sparsekit
    from sparsekit.engine import compile

    sparsekit.save(compiled, path)
    like = compile(model, formats="bitmap", rows=(1,))  # float32 bitmap layers
    sparsekit.load(like, path)
    state, loaded = compiled.state_dict(), like.state_dict()
    assert list(state) == list(loaded)
    assert all(state[k].dtype == loaded[k].dtype and torch.equal(state[k], loaded[k])
               for k in state)
    return like
