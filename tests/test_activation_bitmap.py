"""act_bitmap_gemv: the weight-sparse × activation-sparse GEMV on bitmap columns, on every
instruction set this CPU runs, and the offset checks it shares with act_sparse_gemv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import kernels_ok, needs_kernels
from torch import nn

from sparsekit.engine import kernels
from sparsekit.engine.activation_linear import (
    BITMAP_BLOCK,
    ActivationSparseLinear,
    sparsify_input,
)
from sparsekit.quantize import dequantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")


_ISAS = kernels.isas() if kernels_ok() else ()


def _pruned(out: int, cols: int, dtype: torch.dtype, density: float = 0.5,
            seed: int = 0) -> nn.Linear:
    """A pruned linear layer with an empty column and a fully kept one."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, out)
    with torch.no_grad():
        linear.weight[torch.rand(out, cols, generator=g) >= density] = 0
        linear.weight[:, 0] = 0
        linear.weight[:, -1] = torch.randn(out, generator=g)
    return linear.to(dtype)


def _layer(linear: nn.Linear, threshold: torch.Tensor, values: str,
           threads: int = 1) -> ActivationSparseLinear:
    return ActivationSparseLinear.from_linear(
        linear, threshold, threads=threads, kernel="act_bitmap_gemv",
        value_dtype=torch.int8 if values == "int8" else None)


def _reference(layer: ActivationSparseLinear, x: torch.Tensor) -> torch.Tensor:
    """The masked product in float64 with the layer's stored (dequantized) weight."""
    weight = layer.to_dense().double()
    if layer.scales is not None:
        weight = dequantize_int8(layer.to_dense(), layer.scales).double()
    kept = sparsify_input(x, layer.threshold).double()
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(kept, weight, bias)


_SHAPES = [(1, 1), (7, 3), (70, 300), (BITMAP_BLOCK + 1, 33), (2 * BITMAP_BLOCK + 77, 257),
           (1000, 64)]
_VALUES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("values", list(_VALUES))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("keep", ["none", "some", "all", "equal"])
def test_act_bitmap_gemv_equals_the_masked_dense_product(isa, values, threads, shape, keep):
    out, cols = shape
    dtype = _VALUES[values]
    linear = _pruned(out, cols, dtype, seed=out + cols)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cols, generator=g).to(dtype)
    threshold = {"none": torch.full((cols,), float("inf")), "all": torch.zeros(cols),
                 "some": torch.rand(cols, generator=g),
                 "equal": x.float().abs()}[keep]  # |x_j| >= threshold_j keeps every input
    layer = _layer(linear, threshold, values, threads)
    with kernels.use_isa(isa):
        y = layer(x)
    assert y.dtype == dtype and y.shape == (out,)
    expected = _reference(layer, x)
    if keep == "equal":
        torch.testing.assert_close(expected, _reference(_layer(linear, 0.0, values), x))
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2,
                                                                         "atol": 5e-2}
    torch.testing.assert_close(y.double(), expected, **tol)
    if keep == "none":  # only the bias is left
        torch.testing.assert_close(y, linear.bias.detach())


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("values", list(_VALUES))
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_share_the_kept_columns_over_several_tiles(isa, values, threads):
    """Each thread adds its share of the kept columns into its own sums and writes its share
    of every tile's outputs from all of them: 16684 outputs are a whole tile of 16384 and a
    tail of two blocks (three threads: one writes none of the tail), enough stored weights for
    every thread, and a bias."""
    out, cols = 16384 + 300, 64
    dtype = _VALUES[values]
    linear = _pruned(out, cols, dtype, seed=5)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(3)).to(dtype)
    layer = _layer(linear, torch.full((cols,), 0.5), values, threads)
    with kernels.use_isa(isa):
        y = layer(x)
        one = _layer(linear, torch.full((cols,), 0.5), values, 1)(x)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2,
                                                                         "atol": 5e-2}
    torch.testing.assert_close(y.double(), _reference(layer, x), **tol)
    torch.testing.assert_close(y, one, **tol)  # the same sums, regrouped


@needs_kernels
@pytest.mark.parametrize("expansion", kernels.bitmap_expansions() if kernels_ok() else ())
@pytest.mark.parametrize("values", list(_VALUES))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [*_SHAPES, (4 * BITMAP_BLOCK, 512)], ids=str)
def test_every_bitmap_expansion_adds_the_same_products(expansion, values, threads, shape):
    """The best instruction set expands the bitmap words by tables or, where the bitmap
    expansion is "vpexpand", by VBMI2 expand-loads (bf16 two words at a time into even and
    odd sums, int8 codes 2^24 times too large against x 2^-24 times): the same products
    added in the same order, so the same bits, on the vector and the bounded blocks."""
    out, cols = shape
    dtype = _VALUES[values]
    linear = _pruned(out, cols, dtype, seed=out + cols)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(2)).to(dtype)
    layer = _layer(linear, torch.full((cols,), 0.3), values, threads)
    with kernels.use_isa(_ISAS[-1]):
        with kernels.use_bitmap_expansion("tables"):
            expected = layer(x)
        with kernels.use_bitmap_expansion(expansion):
            y = layer(x)
    assert torch.equal(y, expected)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2,
                                                                         "atol": 5e-2}
    torch.testing.assert_close(y.double(), _reference(layer, x), **tol)


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("expansion", kernels.bitmap_expansions() if kernels_ok() else ())
@pytest.mark.parametrize("values", list(_VALUES))
def test_a_column_at_the_end_of_the_values_adds_what_it_adds_anywhere(isa, expansion, values):
    """A kept column's pointer moves from block to block by its bits alone where every
    block of its run may hold a full block of values before the end of ``values``; the
    last columns of the values read each block from its offset instead, never past the
    next one. Sixteen equal columns: the first and the last, each kept alone, give the
    same bits (and so do the first and the last eight, kept together)."""
    out, cols = 2 * BITMAP_BLOCK + 77, 16
    dtype = _VALUES[values]
    g = torch.Generator().manual_seed(4)
    column = torch.randn(out, generator=g) * (torch.rand(out, generator=g) < 0.5)
    linear = nn.Linear(cols, out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(column[:, None].expand(out, cols))
    layer = _layer(linear.to(dtype), torch.full((cols,), 0.5), values)
    stored = layer.values.numel()
    assert layer.offsets[-1, 0] > stored - 3 * BITMAP_BLOCK  # a block by block column
    assert layer.offsets[0, 0] <= stored - 4 * BITMAP_BLOCK  # and one that runs on
    x = torch.zeros(cols).to(dtype)

    def kept(columns: slice) -> torch.Tensor:
        row = x.clone()
        row[columns] = 1.5
        with kernels.use_isa(isa), kernels.use_bitmap_expansion(expansion):
            return layer(row)

    assert torch.equal(kept(slice(0, 1)), kept(slice(-1, None)))
    assert torch.equal(kept(slice(0, 8)), kept(slice(-8, None)))
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-2,
                                                                         "atol": 5e-2}
    row = x.clone()
    row[-8:] = 1.5
    torch.testing.assert_close(kept(slice(-8, None)).double(), _reference(layer, row), **tol)


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_all_zero_inputs_and_any_density(isa, density):
    linear = _pruned(3 * BITMAP_BLOCK, 40, torch.float32, density=density)
    layer = _layer(linear, 0.0, "float32", threads=2)
    x = torch.randn(40)
    with kernels.use_isa(isa):
        torch.testing.assert_close(layer(torch.zeros(40)), linear.bias.detach())
        torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmap_columns_round_trip_the_weight(dtype):
    linear = _pruned(2 * BITMAP_BLOCK + 3, 17, dtype)
    layer = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_gemv")
    assert layer.values.numel() == int(linear.weight.count_nonzero())
    assert layer.bitmap.shape == (17, 3, BITMAP_BLOCK // 16)
    assert layer.bitmap.dtype == torch.int16 and layer.offsets.shape == (17, 4)
    assert int(layer.offsets[0, 0]) == 0 and int(layer.offsets[-1, -1]) == layer.values.numel()
    assert torch.equal(layer.offsets[1:, 0], layer.offsets[:-1, -1])
    assert torch.equal(layer.to_dense(), linear.weight)
    back = layer.to_module()
    assert type(back) is nn.Linear and torch.equal(back.weight, linear.weight)


def test_nbytes_counts_the_bitmap_and_a_prefill_copy():
    from sparsekit.engine.compiled_linear import CompiledLinear

    linear = _pruned(BITMAP_BLOCK, 64, torch.bfloat16)
    layer = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_gemv")
    nnz = int(linear.weight.count_nonzero())
    storage = 2 * nnz + BITMAP_BLOCK * 64 // 8 + 4 * 64 * 2
    assert layer.nbytes == storage + 2 * BITMAP_BLOCK + 2 * 64  # and bias, thresholds
    assert layer.prefill_nbytes == 0
    prefill = CompiledLinear.from_linear(linear.float(), "dense")
    with_prefill = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_gemv",
                                                      prefill=prefill)
    assert with_prefill.prefill_nbytes >= 4 * BITMAP_BLOCK * 64


def _op_args(dtype: torch.dtype = torch.float32) -> dict[str, object]:
    layer = ActivationSparseLinear.from_linear(_pruned(300, 30, dtype), 0.1,
                                               kernel="act_bitmap_gemv")
    return {"values": layer.values, "bitmap": layer.bitmap, "offsets": layer.offsets,
            "x": torch.randn(30).to(dtype), "threshold": layer.threshold, "bias": layer.bias,
            "out_features": 300, "block": BITMAP_BLOCK, "threads": 1}


@needs_kernels
def test_act_bitmap_gemv_rejects_hostile_arguments():
    args = _op_args()
    torch.ops.sparsekit.act_bitmap_gemv(**args)  # the good call runs
    v, b, o, x = args["values"], args["bitmap"], args["offsets"], args["x"]
    falling = o.clone()
    falling[0, 1] = v.numel()  # rises to the end, then falls: columns past the values
    cases = [
        ({"values": v.double()}, "values"), ({"values": v[:-1]}, "offsets"),
        ({"values": torch.stack([v, v])}, "values"), ({"bitmap": b.int()}, "bitmap"),
        ({"bitmap": b[:, :-1]}, "bitmap"), ({"bitmap": b[:1]}, "bitmap"),
        ({"bitmap": b[:, :, :-1]}, "bitmap"),
        ({"offsets": o.long()}, "offsets"), ({"offsets": o[:, :-1]}, "offsets"),
        ({"offsets": o + 1}, "offsets"), ({"offsets": falling}, "offsets"),
        ({"x": x[:-1]}, "threshold"), ({"x": x.bfloat16()}, "x"),
        ({"threshold": args["threshold"][:-1]}, "threshold"),
        ({"bias": torch.randn(301)}, "bias"), ({"bias": args["bias"].bfloat16()}, "bias"),
        ({"out_features": -1}, "out_features"), ({"out_features": 3 * BITMAP_BLOCK}, "bitmap"),
        ({"block": 0}, "block"), ({"block": 96}, "block"), ({"block": 8192}, "block"),
        ({"threads": 0}, "threads"), ({"scales": torch.ones(300)}, "scales"),
    ]
    for case, name in cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparsekit.act_bitmap_gemv(**(args | case))


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("expansion", kernels.bitmap_expansions() if kernels_ok() else ())
def test_a_forged_bitmap_reads_only_inside_the_values(isa, expansion):
    """Offsets are checked per call; bits are not (a full pass would cost the product
    itself): bits set beyond a column's values read its neighbours' or, at the end, stop at
    the offsets, never outside the values."""
    args = _op_args()
    args["bitmap"] = torch.full_like(args["bitmap"], -1)  # every output stored everywhere
    args["threshold"] = torch.zeros(30)
    y = torch.ops.sparsekit.act_bitmap_gemv(**args)
    with kernels.use_isa(isa), kernels.use_bitmap_expansion(expansion):
        assert torch.equal(torch.ops.sparsekit.act_bitmap_gemv(**args).isfinite(),
                           y.isfinite())


@needs_kernels
def test_a_fall_anywhere_in_the_offsets_is_refused():
    """The offsets are checked in one vectorized pass: a fall at any position (the first,
    inside a vector, in the remainder after the last whole vector) is refused, the ends
    kept right."""
    args = _op_args()
    offsets = args["offsets"]
    n = offsets.numel()
    for at in (1, 2, n // 2, n - 3, n - 2):
        falling = offsets.clone().view(-1)
        falling[at] = falling[at - 1] - 1 if falling[at - 1] > 0 else -1
        with pytest.raises(RuntimeError, match="offsets must rise from 0 to .* with a fall"):
            torch.ops.sparsekit.act_bitmap_gemv(**{**args, "offsets": falling.view_as(offsets)})


@needs_kernels
def test_act_sparse_gemv_rejects_a_falling_colptr():
    """The old kernel checked only the ends of colptr: a colptr rising to the end and falling
    back read (and scattered) values past the end of the array."""
    layer = ActivationSparseLinear.from_linear(_pruned(70, 30, torch.float32), 0.0,
                                               kernel="act_sparse_gemv")
    colptr = layer.colptr.clone()
    colptr[0, 1] = layer.values.numel()
    with pytest.raises(RuntimeError, match="colptr must rise from 0 to .* without falling"):
        torch.ops.sparsekit.act_sparse_gemv(
            layer.values, layer.row_indices, colptr, torch.randn(30), layer.threshold,
            layer.bias, 70, layer.block, 1)


def test_report_shows_the_bytes_of_a_second_format():
    from sparsekit.engine.compiled_linear import CompiledLinear
    from sparsekit.engine.report import report

    linear = _pruned(BITMAP_BLOCK, 64, torch.float32)
    prefill = CompiledLinear.from_linear(linear, "dense")
    layer = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_gemv",
                                               prefill=prefill)
    row = {r.name: r for r in report(nn.Sequential(layer), torch.randn(2, 64)).rows}["0"]
    assert row.extra == {"format": "activation", "values": "float32", "bytes": layer.nbytes,
                         "prefill bytes": layer.prefill_nbytes}
    assert layer.prefill_nbytes >= 4 * BITMAP_BLOCK * 64
    w8a8 = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_qgemv",
                                              value_dtype=torch.int8)
    row = {r.name: r for r in report(nn.Sequential(w8a8), torch.randn(2, 64)).rows}["0"]
    assert row.extra == {"format": "activation", "values": "int8 (W8A8)"}
