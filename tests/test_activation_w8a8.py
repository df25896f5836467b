"""act_bitmap_qgemv: the W8A8 weight-sparse × activation-sparse GEMV on bitmap columns (the
kept inputs quantized to int8 codes, exact integer sums), on every instruction set and
bitmap expansion this CPU runs, and the ActivationSparseLinear kernel built on it."""

from __future__ import annotations

import pytest
import torch
from _kernels import kernels_ok, needs_kernels
from test_activation_engine import _Thresholds
from test_pretrained import _kernel_clock
from torch import nn

import sparsekit
from sparsekit.engine import autotune, kernels
from sparsekit.engine.activation_linear import (
    BITMAP_BLOCK,
    ActivationSparseLinear,
    sparsify_input,
)
from sparsekit.engine.compiled_linear import CompiledLinear
from sparsekit.quantize import quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")

_ISAS = kernels.isas() if kernels_ok() else ()
_EXPANSIONS = kernels.bitmap_expansions() if kernels_ok() else ()
_SHAPES = [(1, 1), (7, 3), (70, 300), (BITMAP_BLOCK + 1, 33), (2 * BITMAP_BLOCK + 77, 257),
           (1000, 64)]


def _pruned(out: int, cols: int, density: float = 0.5, seed: int = 0,
            bias: bool = True) -> nn.Linear:
    """A pruned float32 layer with an empty column and a fully kept one."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, out, bias=bias)
    with torch.no_grad():
        linear.weight[torch.rand(out, cols, generator=g) >= density] = 0
        linear.weight[:, 0] = 0
        linear.weight[:, -1] = torch.randn(out, generator=g)
    return linear


def _layer(linear: nn.Linear, threshold: torch.Tensor | float,
           threads: int = 1) -> ActivationSparseLinear:
    return ActivationSparseLinear.from_linear(linear, threshold, threads=threads,
                                              kernel="act_bitmap_qgemv",
                                              value_dtype=torch.int8)


def _reference(layer: ActivationSparseLinear, x: torch.Tensor) -> torch.Tensor:
    """W8A8 from first principles: the thresholded row on its int8 grid (sparsekit.quantize),
    the integer sums exact in float64, then sum * sx * scale (+ bias) in float32."""
    codes, sx = quantize_int8(sparsify_input(x, layer.threshold).float()[None])
    sums = layer.to_dense().double() @ codes[0].double()
    y = sums.float() * sx[0] * layer.scales
    return y if layer.bias is None else y + layer.bias


def _threshold(kind: str, x: torch.Tensor) -> torch.Tensor:
    cols = x.numel()
    g = torch.Generator().manual_seed(1)
    return {"none": torch.full((cols,), float("inf")), "all": torch.zeros(cols),
            "some": torch.rand(cols, generator=g), "equal": x.abs()}[kind]


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("keep", ["none", "some", "all", "equal"])
def test_act_bitmap_qgemv_equals_the_integer_reference(isa, threads, shape, keep):
    out, cols = shape
    linear = _pruned(out, cols, seed=out + cols)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(2))
    layer = _layer(linear, _threshold(keep, x), threads)
    with kernels.use_isa(isa):
        y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (out,)
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-6, atol=1e-6)
    unbiased = _layer(_pruned(out, cols, seed=out + cols, bias=False), layer.threshold, threads)
    with kernels.use_isa(isa):
        assert torch.equal(unbiased(x), _reference(unbiased, x))  # exact sums, same rounding
    if keep == "none":  # only the bias is left
        torch.testing.assert_close(y, linear.bias.detach())


@needs_kernels
@pytest.mark.parametrize("shape", [*_SHAPES, (4 * BITMAP_BLOCK, 512), (9 * BITMAP_BLOCK + 77, 90)],
                         ids=str)
def test_every_isa_expansion_and_thread_count_gives_the_same_bits(shape):
    """The integer sums are exact, so every path rounds the same numbers: the VNNI groups of
    four columns (and the padding columns of the last group), the bounded blocks, the
    scalar loops (without a bias, which the vector instruction sets add fused)."""
    out, cols = shape
    linear = _pruned(out, cols, seed=3, bias=False)
    x = torch.randn(cols, generator=torch.Generator().manual_seed(4))
    layer = _layer(linear, 0.3)
    results = []
    for isa in _ISAS:
        for expansion in _EXPANSIONS:
            for threads in (1, 2, 3):
                layer.threads = threads
                with kernels.use_isa(isa), kernels.use_bitmap_expansion(expansion):
                    results.append(layer(x))
    assert all(torch.equal(r, results[0]) for r in results)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_is_the_w8a8_bitmap_format_on_the_thresholded_row(dtype):
    """The same numbers as compile's W8A8 bitmap format (bitmap_qlinear) fed the thresholded
    row: one grid for the whole row, exact sums (up to the fused bias add)."""
    linear = _pruned(600, 200, seed=5).to(dtype)
    x = torch.randn(200, generator=torch.Generator().manual_seed(6)).to(dtype)
    layer = _layer(linear, 0.5)
    fmt = CompiledLinear.from_linear(linear, "bitmap", value_dtype=torch.int8,
                                     activation_dtype=torch.int8, threads=1)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, fmt(sparsify_input(x, layer.threshold)[None])[0],
                               rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("position", [0, 37])
def test_a_non_finite_input_gives_a_nan_row(isa, bad, position):
    """As the W8A8 formats: a row with a NaN or infinite input has no int8 grid. A NaN that
    the threshold would drop (|NaN| >= t is false) poisons the row too."""
    layer = _layer(_pruned(300, 40), 0.5)
    x = torch.randn(40)
    x[position] = bad
    with kernels.use_isa(isa):
        assert layer(x).isnan().all()
    assert layer._w8a8_gemv(x).isnan().all()  # the PyTorch path agrees


def _op_args() -> dict[str, object]:
    layer = _layer(_pruned(300, 30), 0.1)
    return {"values": layer.values, "bitmap": layer.bitmap, "offsets": layer.offsets,
            "x": torch.randn(30), "threshold": layer.threshold, "bias": layer.bias,
            "out_features": 300, "block": BITMAP_BLOCK, "threads": 1, "scales": layer.scales}


@needs_kernels
def test_act_bitmap_qgemv_rejects_hostile_arguments():
    args = _op_args()
    torch.ops.sparsekit.act_bitmap_qgemv(**args)  # the good call runs
    v, o = args["values"], args["offsets"]
    wide = torch.zeros(65537)
    cases = [
        ({"values": v.float()}, "values must be int8"), ({"values": v[:-1]}, "offsets"),
        ({"offsets": o + 1}, "offsets"), ({"scales": args["scales"][:-1]}, "scales"),
        ({"x": args["x"][:-1]}, "threshold"), ({"bitmap": args["bitmap"][:1]}, "bitmap"),
        ({"x": wide, "threshold": wide}, "in_features must be at most 65536"),
        ({"threads": 0}, "threads"), ({"block": 96}, "block"),
    ]
    for case, message in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.sparsekit.act_bitmap_qgemv(**(args | case))
    with pytest.raises(RuntimeError, match="scales"):  # required: W8A8 has int8 values only
        torch.ops.sparsekit.act_bitmap_qgemv(**(args | {"scales": None}))


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("expansion", _EXPANSIONS)
def test_a_forged_bitmap_reads_only_inside_the_values(isa, expansion):
    """Offsets are checked per call, bits are not: bits set beyond a column's codes read
    its neighbours' or, near the end of the values, stop at the offsets."""
    args = _op_args()
    args["bitmap"] = torch.full_like(args["bitmap"], -1)  # every output stored everywhere
    args["threshold"] = torch.zeros(30)
    with kernels.use_isa(isa), kernels.use_bitmap_expansion(expansion):
        y = torch.ops.sparsekit.act_bitmap_qgemv(**args)
    assert y.shape == (300,) and y.isfinite().all()


@needs_kernels
@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("expansion", _EXPANSIONS)
@pytest.mark.parametrize("out", [300, 5 * BITMAP_BLOCK + 77])
def test_a_forged_bitmap_never_reads_past_the_values(isa, expansion, out):
    """The values end inside a larger buffer whose tail differs between two calls: with
    every bit set (each block's bits promising a whole block of codes, whatever the offsets
    count) the kernel reads the same bytes, so it gives the same bits, in the spans of
    blocks the vector paths add at once as in the blocks the bounded loop adds."""
    layer = _layer(_pruned(out, 40), 0.0)
    stored = layer.values.numel()
    buffer = torch.zeros(stored + 8 * out, dtype=torch.int8)
    buffer[:stored] = layer.values
    args = {"values": buffer[:stored], "bitmap": torch.full_like(layer.bitmap, -1),
            "offsets": layer.offsets, "x": torch.randn(40), "threshold": layer.threshold,
            "bias": None, "out_features": out, "block": BITMAP_BLOCK, "threads": 1,
            "scales": layer.scales}
    results = []
    for tail in (0, 127):
        buffer[stored:] = tail
        with kernels.use_isa(isa), kernels.use_bitmap_expansion(expansion):
            results.append(torch.ops.sparsekit.act_bitmap_qgemv(**args))
    assert results[0].isfinite().all() and torch.equal(results[0], results[1])


def test_the_kernel_needs_int8_codes():
    linear = _pruned(70, 30)
    with pytest.raises(ValueError, match="act_bitmap_qgemv.*int8 weight codes.*float32"):
        ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_qgemv")
    with pytest.raises(ValueError, match="activation_dtype=torch.int8 needs value_dtype"):
        ActivationSparseLinear.tuned(linear, 0.1, activation_dtype=torch.int8)
    with pytest.raises(ValueError, match="activation_dtype must be None or torch.int8"):
        ActivationSparseLinear.tuned(linear, 0.1, value_dtype=torch.int8,
                                     activation_dtype=torch.bfloat16)


def test_without_kernels_the_pytorch_path_gives_the_same_numbers(monkeypatch):
    layer = _layer(_pruned(300, 70), 0.4)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(7))
    expected = torch.stack([_reference(layer, row) for row in x])
    y = layer(x)  # several rows without a prefill: one W8A8 GEMV per row
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert layer.to_module().weight.shape == (300, 70)


@needs_kernels
def test_compile_w8a8_offers_the_kernel_to_activation_sparse_layers(monkeypatch):
    monkeypatch.setattr(autotune, "_time_block", _kernel_clock("act_bitmap_qgemv"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 16))
    sparsekit.prune(model, 0.5)
    act = _Thresholds({"0": torch.full((24,), 0.5), "2": torch.full((64,), 0.1)})
    prompt = torch.randn(6, 24)
    compiled = sparsekit.compile(model, prompt, activation_sparsity=act, weight_dtype="int8",
                                 activation_dtype="int8", cache=False)
    for name in act.thresholds:
        layer = compiled.get_submodule(name)
        assert isinstance(layer, ActivationSparseLinear) and layer.kernel == "act_bitmap_qgemv"
        record = compiled.sparsekit_choices[name]
        assert record["decode"]["format"] == "act_bitmap_qgemv"
    without = sparsekit.compile(model, prompt, activation_sparsity=act, weight_dtype="int8",
                                cache=False)  # float inputs: not a candidate
    assert {without.get_submodule(n).kernel for n in act.thresholds} <= {
        "act_gemv", "act_sparse_gemv", "act_bitmap_gemv"}


def test_from_linear_refuses_a_weight_that_outgrew_its_grid():
    # quantize_int8 clamped it to ±127 steps of the stale weight_scale, without a word
    from sparsekit.quantize import attach_scales, int8_scales
    linear = nn.Linear(32, 16, bias=False)
    attach_scales(linear, int8_scales(linear.weight.detach()) / 3)
    with pytest.raises(ValueError, match=r"linear: the weight lies beyond its int8 grid"):
        ActivationSparseLinear.from_linear(linear, 0.1)
