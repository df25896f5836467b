"""int8 values (with per-row float32 scales) in the csr, bitmap, N:M, BSR and fan-in ops,
next to fp32 and bf16: every op x value dtype x batch (GEMV and SpMM paths) x threads equals
the dequantized float64 reference, and the ops reject scales that do not fit their values."""

from __future__ import annotations

import pytest
import torch
from _kernels import kernels_ok
from kernel_cases import OPS, VALUE_DTYPES, assert_matches, case, weight

from sparsekit.engine.formats import FORMATS

pytestmark = pytest.mark.skipif(not kernels_ok(), reason="compiled kernels unavailable")

ROWS = 24


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("cols", [37, 100])
@pytest.mark.parametrize("batch", [1, 2, 5, 17])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_equals_dequantized_reference(name, dtype, cols, batch, threads, with_bias):
    c = case(name, dtype, weight(name, ROWS, cols))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cols, generator=g)
    bias = torch.randn(ROWS, generator=g) if with_bias else None
    assert_matches(c.call(x, bias, threads), c, x, bias)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("batch", [1, 5])
def test_int8_op_takes_bf16_inputs(name, batch):
    c = case(name, "int8", weight(name, ROWS, 100))
    x = torch.randn(batch, 100).to(torch.bfloat16)
    assert_matches(c.call(x, None, 2), c, x, None)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize(
    ("dtype", "scales", "message"),
    [
        ("int8", None, "scales .*required with int8"),
        ("int8", torch.ones(ROWS, dtype=torch.float64), "scales must be Float"),
        ("int8", torch.ones(ROWS + 1), r"scales.size\(0\) must be 24"),
        # (rows, groups): bitmap (whole 16-input words), nm (whole words of fields), bsr
        # (whole blocks, 4 inputs wide here), csr16, fanin and dense_lowp (any) take groups
        ("int8", torch.ones(ROWS, 3), "scales must be a contiguous 1-D|groups dividing "
                                      "in_features=64"),
        ("int8", torch.ones(ROWS, 32), "scales must be a contiguous 1-D|groups of 2 inputs; "
                                       "the (bitmap|2:4|BSR) kernel takes groups of (a "
                                       "multiple of (16|32)|whole blocks)"),
        ("int8", torch.ones(2 * ROWS)[::2], "scales must be a contiguous 1-D"),
        ("fp32", torch.ones(ROWS), "scales must be None for Float values"),
        ("bf16", torch.ones(ROWS), "scales must be None for BFloat16 values"),
    ],
)
def test_op_rejects_scales_that_do_not_fit(name, dtype, scales, message):
    args = _op_args(name, dtype, torch.randn(2, 64))
    if name in ("csr16", "fanin") and scales is not None and scales.dim() == 2 \
            and 64 % scales.shape[1] == 0:  # groups of any size: these fit
        assert _op(name)(*args, scales).shape == (2, ROWS)
        return
    with pytest.raises(RuntimeError, match=message):
        _op(name)(*args, scales)


def _op(name: str):  # type: ignore[no-untyped-def]
    ops = torch.ops.sparsekit
    return {"csr16": ops.csr_linear, "bitmap": ops.bitmap_linear, "nm": ops.nm_linear,
            "bsr": ops.bsr_linear, "fanin": ops.fanin_linear}[name]


def _op_args(name: str, dtype: str, x: torch.Tensor) -> tuple:
    """The arguments of ``name``'s op before ``scales`` (no bias, two threads)."""
    value_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[dtype]
    w = weight(name, ROWS, x.shape[1])
    keep = {"keep": w != 0} if name == "fanin" else {}  # weights that round to 0 stay stored
    parts = list(FORMATS[name].compress(w.round().clamp(-100, 100), **keep))
    if name == "csr16":
        rowptr, col, values = parts
        return values.to(value_dtype), col, rowptr, x, None, x.shape[1], 2
    if name == "bitmap":
        values, bitmap, rowptr = parts
        return values.to(value_dtype), bitmap, rowptr, x, None, x.shape[1], 2
    if name in ("bsr", "fanin"):
        values, col, rows = parts
        return values.to(value_dtype), col, rows, x, None, ROWS, x.shape[1], 2
    values, indices, pattern = parts
    n, m = pattern.tolist()
    return values.to(value_dtype), indices, x, None, n, m, x.shape[1], 2


def test_fake_ops_accept_scales():
    """torch.compile traces an int8 call: the fake implementation takes ``scales``."""
    c = case("csr16", "int8", weight("csr16", ROWS, 64))
    x = torch.randn(3, 64)
    traced = torch.compile(lambda x: c.call(x, None, 1), fullgraph=True, backend="eager")
    assert_matches(traced(x), c, x, None)
