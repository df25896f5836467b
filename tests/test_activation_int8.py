"""int8 activation-sparse layers: both single-row kernels (``act_gemv``, ``act_sparse_gemv``)
with int8 codes and per-output float32 scales, on every instruction set this CPU runs, every
input dtype and thread count, equal the dequantized reference; the ops check scales before
writing, and the layer falls back to PyTorch without kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import kernels_ok
from test_activation_engine import KERNELS, _pruned
from torch import nn

from sparsekit.engine import kernels
from sparsekit.engine.activation_linear import (
    BLOCK,
    ActivationSparseLinear,
    sparsify_input,
)
from sparsekit.quantize import attach_scales, dequantize_int8, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")


def _isas() -> tuple[str, ...]:
    return kernels.isas() if kernels_ok() else ()


def _reference(layer: ActivationSparseLinear, x: torch.Tensor) -> torch.Tensor:
    """Sparsify in x's dtype, then the dequantized masked product in float64."""
    kept = sparsify_input(x, layer.threshold).double()
    weight = dequantize_int8(layer.to_dense(), layer.scales).double()
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(kept, weight, bias)


def _assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    if y.dtype == torch.bfloat16:  # one rounding of the float32 result
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", _isas() or [pytest.param("none", marks=pytest.mark.skip)])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1), (37, 301), (2 * BLOCK + 77, 65)], ids=str)
@pytest.mark.parametrize("keep", ["none", "some", "all"])
def test_int8_kernels_equal_the_dequantized_reference(isa, kernel, x_dtype, threads, shape,
                                                      keep):
    out, cols = shape
    linear = _pruned(out, cols, x_dtype)
    g = torch.Generator().manual_seed(1)
    threshold = {"none": torch.full((cols,), float("inf")), "all": torch.zeros(cols),
                 "some": torch.rand(cols, generator=g)}[keep]
    layer = ActivationSparseLinear.from_linear(linear, threshold, threads=threads,
                                               kernel=kernel, value_dtype=torch.int8)
    assert layer.scales is not None and layer.dtype == x_dtype
    assert (layer.weight_t if kernel == "act_gemv" else layer.values).dtype == torch.int8
    x = torch.randn(cols, generator=g).to(x_dtype)
    with kernels.use_isa(isa):
        y = layer(x)
    assert y.dtype == x_dtype and y.shape == (out,)
    _assert_close(y, _reference(layer, x))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("use_kernel", [True, False])
def test_every_row_count_of_an_int8_layer_equals_the_reference(kernel, use_kernel, monkeypatch):
    if use_kernel and not _isas():
        pytest.skip("compiled kernels unavailable")
    if not use_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    layer = ActivationSparseLinear.from_linear(_pruned(BLOCK + 9, 40), 0.3, kernel=kernel,
                                               value_dtype=torch.int8)
    for shape in [(40,), (1, 40), (3, 40), (2, 5, 40)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        y = layer(x)
        assert y.shape == (*shape[:-1], BLOCK + 9)
        _assert_close(y, _reference(layer, x))


def test_attached_scales_are_kept_and_the_module_round_trips():
    linear = _pruned(70, 30)
    codes, scales = quantize_int8(linear.weight.detach())
    with torch.no_grad():
        linear.weight.copy_(dequantize_int8(codes, scales))
    attach_scales(linear, scales)
    for kernel in KERNELS:
        layer = ActivationSparseLinear.from_linear(linear, 0.1, kernel=kernel)  # None: int8
        assert torch.equal(layer.scales, scales) and torch.equal(layer.to_dense(), codes)
        back = layer.to_module()
        torch.testing.assert_close(back.weight, linear.weight)
        assert torch.equal(back.weight_scale, scales)
        assert "values=int8" in repr(layer)


def test_bad_storage_arguments_name_the_parameter():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 weight needs float scales"):
        ActivationSparseLinear(codes, None, 0.1)
    with pytest.raises(ValueError, match="int8 weight needs float scales of shape"):
        ActivationSparseLinear(codes, None, 0.1, scales=torch.ones(5))
    with pytest.raises(ValueError, match="scales are for int8 weights only"):
        ActivationSparseLinear(torch.randn(4, 8), None, 0.1, scales=torch.ones(4))
    with pytest.raises(ValueError, match="dtype must be"):
        ActivationSparseLinear(torch.randn(4, 8), None, 0.1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="value_dtype must be None or torch.int8"):
        ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.1, value_dtype=torch.float16)


def _stored(layer: ActivationSparseLinear) -> tuple[torch.Tensor, ...]:
    """The stored-weight tensors a weight-sparse kernel takes first."""
    if layer.kernel == "act_sparse_gemv":
        return layer.values, layer.row_indices, layer.colptr
    return layer.values, layer.bitmap, layer.offsets


@pytest.mark.skipif(not _isas(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_ops_reject_hostile_scales_and_inputs(kernel):
    layer = ActivationSparseLinear.from_linear(_pruned(70, 30), 0.1, kernel=kernel,
                                               value_dtype=torch.int8)
    op = getattr(torch.ops.sparsekit, kernel)
    x, s, t, b = torch.randn(30), layer.scales, layer.threshold, layer.bias
    if kernel == "act_gemv":
        def call(x=x, t=t, b=b, s=s):
            return op(layer.weight_t, x, t, b, 1, s)
    else:
        def call(x=x, t=t, b=b, s=s):
            return op(*_stored(layer), x, t, b, 70, layer.block, 1, s)
    call()  # the good call runs
    assert call(x=x.bfloat16(), t=t.bfloat16(), b=b.bfloat16()).dtype == torch.bfloat16
    cases = [({"s": None}, "scales"), ({"s": s[:-1]}, "scales"), ({"s": s.double()}, "scales"),
             ({"s": s.bfloat16()}, "scales"), ({"x": x.double()}, "x"),
             ({"x": x.bfloat16()}, "threshold"), ({"b": b.bfloat16()}, "bias"),
             ({"x": x.to(torch.int8)}, "x")]
    for case, name in cases:
        with pytest.raises(RuntimeError, match=name):
            call(**case)
    float_layer = ActivationSparseLinear.from_linear(_pruned(70, 30), 0.1, kernel=kernel)
    stored = float_layer.weight_t if kernel == "act_gemv" else float_layer.values
    with pytest.raises(RuntimeError, match="scales must be None"):
        if kernel == "act_gemv":
            op(stored, x, t, b, 1, s)
        else:
            op(*_stored(float_layer), x, t, b, 70, float_layer.block, 1, s)


@pytest.mark.skipif(not _isas(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("kernel", KERNELS)
def test_one_int8_row_traces_whole(kernel):
    layer = ActivationSparseLinear.from_linear(_pruned(70, 30), 0.1, kernel=kernel,
                                               threads=1, value_dtype=torch.int8)
    x = torch.randn(1, 30)
    program = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert f"sparsekit.{kernel}.default" in targets, targets
    torch.testing.assert_close(program.module()(x), layer(x))
