"""The W8A8 ops (``dense_qlinear``, ``bitmap_qlinear``, ``nm_qlinear``) on every instruction
set this CPU runs equal an exact integer reference: the input rows quantized in Python on
the grid of :mod:`sparsekit.quantize` (per row, symmetric, half to even), int64 sums, then
the two scales — for every batch size, thread count and an odd ``in_features``; the
extreme codes (127 × -127, 127 × -128) do not saturate; hostile arguments raise before
anything is written."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsekit.engine import kernels
from sparsekit.engine.formats import Bitmap, DenseLowPrecision, PackedNM
from sparsekit.quantize import quantize_int8


def _isas() -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.isas()


pytestmark = pytest.mark.skipif(not _isas(), reason="compiled kernels unavailable")

_KINDS = ("dense", "bitmap", "nm2:4", "nm1:4", "nm4:8")


def _pruned(kind: str, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A random ``rows x cols`` weight with the sparsity ``kind`` names."""
    w = torch.randn(rows, cols, generator=g)
    if kind == "dense":
        return w
    if kind == "bitmap":
        return w * (torch.rand(rows, cols, generator=g) < 0.5)
    n, m = (int(v) for v in kind.removeprefix("nm").split(":"))
    padded = torch.nn.functional.pad(w, (0, -cols % m)).view(rows, -1, m)
    keep = torch.rand(padded.shape, generator=g).argsort(-1)[..., :n]
    kept = torch.zeros_like(padded).scatter_(-1, keep, 1.0) * padded
    return kept.view(rows, -1)[:, :cols].contiguous()


def _format(kind: str, weight: torch.Tensor):  # type: ignore[no-untyped-def]
    cls = {"dense": DenseLowPrecision, "bitmap": Bitmap}.get(kind, PackedNM)
    return cls.from_dense(weight, value_dtype=torch.int8)


def _call(fmt, x, bias, threads):  # type: ignore[no-untyped-def]
    """The W8A8 op of ``fmt`` called directly."""
    ops, cols = torch.ops.sparsekit, fmt.in_features
    if isinstance(fmt, DenseLowPrecision):
        return ops.dense_qlinear(fmt.lowp_weight, x, bias, cols, threads, fmt.scales)
    if isinstance(fmt, Bitmap):
        return ops.bitmap_qlinear(fmt.bitmap_values, fmt.bitmap_mask, fmt.bitmap_rowptr, x, bias,
                                  cols, threads, fmt.scales)
    return ops.nm_qlinear(fmt.nm_values, fmt.nm_indices, x, bias, fmt.n, fmt.m, cols, threads,
                          fmt.scales)


def _reference(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """sx[b] * scales[r] * (int64 sums of the codes) (+ bias), in float64."""
    qx, sx = quantize_int8(x.float())
    sums = qx.to(torch.int64) @ codes.to(torch.int64).T
    y = sums.double() * sx.double()[:, None] * scales.double()[None, :]
    return y if bias is None else y + bias.double()


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal to fp32 rounding: a few ulp of the largest output."""
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("threads", [1, 2])
# around the 8-row passes and the 8-row groups of the interleaved path (AVX-512), with
# partial last groups of 1 and 4 rows
@pytest.mark.parametrize("batch", [1, 2, 5, 8, 12, 16, 17, 28, 64])
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kind", _KINDS)
def test_qlinear_equals_the_exact_integer_reference(kind, isa, batch, threads):
    g = torch.Generator().manual_seed(batch * 7 + threads)
    fmt = _format(kind, _pruned(kind, 37, 517, g))  # odd in_features: every tail path
    x, bias = torch.randn(batch, 517, generator=g), torch.randn(37, generator=g)
    with kernels.use_isa(isa):
        y = _call(fmt, x, bias, threads)
    assert y.dtype == torch.float32 and y.shape == (batch, 37)
    _assert_matches(y, _reference(fmt.stored_dense(), fmt.scales, x, bias))


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kind", _KINDS)
def test_qlinear_on_a_wide_layer_and_bf16_inputs(kind, isa):
    g = torch.Generator().manual_seed(1)
    fmt = _format(kind, _pruned(kind, 19, 1029, g))
    x = torch.randn(3, 1029, generator=g).to(torch.bfloat16)
    with kernels.use_isa(isa):
        y = _call(fmt, x, None, 2)
    assert y.dtype == torch.bfloat16
    ref = _reference(fmt.stored_dense(), fmt.scales, x, None)
    torch.testing.assert_close(y.double(), ref.to(torch.bfloat16).double(), rtol=1e-2,
                               atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("expansion", kernels.bitmap_expansions() if _isas() else ())
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("cols", [1, 16, 63, 64, 65, 100, 130, 1000])
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 9])
def test_bitmap_qlinear_at_every_width_with_empty_and_full_rows(isa, cols, batch, expansion):
    # in_features around multiples of 64 (4 bitmap words per AVX-512 step), rows with no, one
    # and all nonzeros, and a last row whose codes end the array (whole loads must stop);
    # every bitmap expansion (vpermb by ranks, vpexpandb: by 256-bit halves at batch 1-2 on
    # AMD Zen 4), batches over 8 expanded per tile
    g = torch.Generator().manual_seed(cols)
    w = torch.randn(24, cols, generator=g)
    keep = torch.rand(24, cols, generator=g) >= torch.linspace(0.3, 0.95, 24)[:, None]
    keep[0], keep[1], keep[2], keep[-1] = False, True, False, True
    keep[2, -1] = True
    fmt = _format("bitmap", w * keep)
    x = torch.randn(batch, cols, generator=g)
    bias = torch.randn(24, generator=g)
    with kernels.use_isa(isa), kernels.use_bitmap_expansion(expansion):
        y = _call(fmt, x, bias, 2)
    codes, scales = quantize_int8(w * keep)
    _assert_matches(y, _reference(codes, scales, x, bias))


@pytest.mark.parametrize("code", [-127, -128])
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kind", ["dense", "bitmap", "nm2:4"])
def test_extreme_codes_do_not_saturate(kind, isa, code):
    """Input code 127 (stored as 255 where the codes are biased) times weight code -127 or
    -128 in every position: the largest products there are, summed over 4099 inputs."""
    cols = 4099
    weight = _pruned(kind, 3, cols, torch.Generator().manual_seed(0)) != 0
    fmt = _format(kind, weight.float())  # codes 127 where kept
    codes = fmt.stored_dense().to(torch.int64)
    values = fmt.lowp_weight if kind == "dense" else (
        fmt.bitmap_values if kind == "bitmap" else fmt.nm_values)
    with torch.no_grad():
        values.copy_(torch.where(values != 0, code, 0).to(torch.int8))
    fmt.scales.fill_(1.0)
    x = torch.full((16, cols), 0.5)  # 16 rows: the row dots and the interleaved path
    x[1::2] = -0.25  # both signs: qx = +127 and -127
    with kernels.use_isa(isa):
        y = _call(fmt, x, None, 1)
        y_rows = _call(fmt, x[:2], None, 1)
    kept = (codes != 0).sum(1).double()  # y = code * (+-127) * kept * (|x| / 127)
    expected = torch.stack([code * kept * 0.5, code * kept * -0.25]).repeat(8, 1)
    torch.testing.assert_close(y_rows.double(), expected[:2], rtol=1e-6, atol=0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("isa", _isas())
def test_an_all_zero_input_row_gives_the_bias(isa):
    fmt = _format("bitmap", _pruned("bitmap", 5, 70, torch.Generator().manual_seed(0)))
    bias = torch.arange(5.0)
    with kernels.use_isa(isa):
        y = _call(fmt, torch.zeros(2, 70), bias, 1)
    assert torch.equal(y, bias.expand(2, 5))


def _dense_args() -> dict[str, object]:
    fmt = _format("dense", torch.randn(4, 20))
    return {"weight": fmt.lowp_weight, "x": torch.randn(2, 20), "bias": None,
            "in_features": 20, "threads": 1, "scales": fmt.scales}


def _dense(**changes: object) -> torch.Tensor:
    a = {**_dense_args(), **changes}
    return torch.ops.sparsekit.dense_qlinear(a["weight"], a["x"], a["bias"], a["in_features"],
                                             a["threads"], a["scales"])


@pytest.mark.parametrize(("changes", "match"), [
    ({"weight": torch.randn(4, 20)}, "weight must be Char"),
    ({"weight": torch.zeros(4, 21, dtype=torch.int8)}, "weight.size"),
    ({"scales": None}, "scales"),
    ({"scales": torch.ones(5)}, "scales.size"),
    ({"scales": torch.ones(4, dtype=torch.float64)}, "scales must be Float"),
    ({"x": torch.randn(2, 21)}, "in_features=20"),
    ({"x": torch.randn(2, 20, dtype=torch.float64)}, "x must be"),
    ({"x": torch.randn(20, 2).T}, "not contiguous"),
    ({"bias": torch.ones(3)}, "bias.size"),
    ({"threads": 0}, "threads"),
    ({"x": torch.randn(1, 65537), "in_features": 65537,
      "weight": torch.zeros(4, 65537, dtype=torch.int8)}, "at most 65536"),
])
def test_dense_qlinear_rejects_hostile_arguments(changes, match):
    with pytest.raises(RuntimeError, match=match):
        _dense(**changes)


def test_bitmap_and_nm_qlinear_reject_float_values_and_bad_patterns():
    g = torch.Generator().manual_seed(0)
    b = Bitmap.from_dense(_pruned("bitmap", 4, 40, g))  # float32 values
    x = torch.randn(1, 40)
    with pytest.raises(RuntimeError, match="values must be Char"):
        torch.ops.sparsekit.bitmap_qlinear(b.bitmap_values, b.bitmap_mask, b.bitmap_rowptr, x,
                                           None, 40, 1, torch.ones(4))
    q = _format("bitmap", _pruned("bitmap", 4, 40, g))
    with pytest.raises(RuntimeError, match="rowptr"):
        torch.ops.sparsekit.bitmap_qlinear(q.bitmap_values, q.bitmap_mask,
                                           q.bitmap_rowptr[:-1], x, None, 40, 1, q.scales)
    nm = _format("nm2:4", _pruned("nm2:4", 4, 40, g))
    with pytest.raises(RuntimeError, match="unsupported N:M 3:4"):
        torch.ops.sparsekit.nm_qlinear(nm.nm_values, nm.nm_indices, x, None, 3, 4, 40, 1,
                                       nm.scales)
    with pytest.raises(RuntimeError, match="indices"):
        torch.ops.sparsekit.nm_qlinear(nm.nm_values, nm.nm_indices[:2], x, None, 2, 4, 40, 1,
                                       nm.scales)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("cols", [1, 8, 63, 64, 65, 100, 1000])
@pytest.mark.parametrize("batch", [8, 13, 24])
def test_dense_qlinear_interleaved_at_every_width(isa, cols, batch):
    # the interleaved path broadcasts 8 weights at a time from W's own rows: a last block
    # that ends inside a row is copied out zero-padded (no read past the weight), and the
    # rows of a tile past the last row are never written
    g = torch.Generator().manual_seed(cols + batch)
    fmt = _format("dense", _pruned("dense", 21, cols, g))
    x, bias = torch.randn(batch, cols, generator=g), torch.randn(21, generator=g)
    with kernels.use_isa(isa):
        y = _call(fmt, x, bias, 2)
    _assert_matches(y, _reference(fmt.stored_dense(), fmt.scales, x, bias))
