"""compile(weight_dtype="int8", activation_dtype="int8") (W8A8): the int8 formats with
integer kernels quantize their inputs, the others keep float inputs; the mode is in the
format's state, so it saves, loads and traces; the quantization error includes the input
rounding; the Python fallback rounds the inputs the same way."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _kernels import needs_kernels
from kernel_cases import reloaded
from torch import nn

import sparsekit
from sparsekit.engine import compile
from sparsekit.engine.formats import CSR16, Bitmap, DenseLowPrecision, format_from_state
from sparsekit.quantize import dequantize_int8, quantize_int8

pytestmark = needs_kernels


def _model(seed: int = 0) -> nn.Sequential:
    """Two 2:4-pruned layers (every native format can hold them)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))
    sparsekit.prune(model, 0.5, pattern="2:4")
    return model.eval()


def _w8a8(model: nn.Module, x: torch.Tensor, formats: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return compile(model, x, formats=formats, weight_dtype="int8", activation_dtype="int8",
                       cache=False)


def _quantized_rows(x: torch.Tensor) -> torch.Tensor:
    return dequantize_int8(*quantize_int8(x))


@pytest.mark.parametrize("name", ["bitmap", "nm", "dense_lowp"])
def test_int8_formats_quantize_their_inputs(name, one_thread):
    model, x = _model(), torch.randn(5, 128)
    compiled = _w8a8(model, x, [name])
    layer = compiled[0]
    assert layer.format.name == name and layer.format.activation_dtype == torch.int8
    assert "inputs=int8" in repr(layer.format)
    # layer 0 alone: F.linear of the rounded inputs and the dequantized weights
    expected = F.linear(_quantized_rows(x), layer.to_dense(), model[0].bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_formats_without_integer_kernels_keep_float_inputs(one_thread):
    model, x = _model(), torch.randn(5, 128)
    compiled = _w8a8(model, x, ["csr16"])
    assert compiled[0].format.value_dtype == torch.int8
    assert compiled[0].format.activation_dtype is None


def test_quantization_error_includes_the_input_rounding(one_thread):
    model, x = _model(), torch.randn(64, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w8 = compile(model, x, formats=["bitmap"], weight_dtype="int8", cache=False)
    w8a8 = _w8a8(model, x, ["bitmap"])
    weights_only = w8.sparsekit_choices["0"]["quantization_error"]
    both = w8a8.sparsekit_choices["0"]["quantization_error"]
    assert 0 < weights_only < both < 0.05


def test_activation_dtype_is_validated():
    model = _model()
    with pytest.raises(ValueError, match="activation_dtype must be None or one of"):
        compile(model, activation_dtype="fp8")
    with pytest.raises(ValueError, match="weight_dtype must be 'int8'"):
        compile(model, weight_dtype="bf16", activation_dtype="int8")


def test_from_dense_refuses_w8a8_where_there_is_no_kernel_or_no_int8():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="activation_dtype must be None or one of"):
        CSR16.from_dense(w, value_dtype=torch.int8, activation_dtype=torch.int8)
    with pytest.raises(ValueError, match="needs int8 values"):
        DenseLowPrecision.from_dense(w, value_dtype=torch.bfloat16, activation_dtype=torch.int8)


def test_the_mode_is_in_the_format_state_and_checked():
    fmt = Bitmap.from_dense(torch.randn(8, 32), value_dtype=torch.int8,
                            activation_dtype=torch.int8)
    state = fmt.state_dict()
    assert state["int8_inputs"].dtype == torch.bool and bool(state["int8_inputs"])
    again = format_from_state(state, (8, 32))
    assert isinstance(again, Bitmap) and again.activation_dtype == torch.int8
    x = torch.randn(3, 32)
    assert torch.equal(again.matmul(x), fmt.matmul(x))
    with pytest.raises(ValueError, match="0-d bool tensor holding True"):
        format_from_state({**state, "int8_inputs": torch.tensor(1)}, (8, 32))
    csr = CSR16.from_dense(torch.randn(8, 32), value_dtype=torch.int8).state_dict()
    with pytest.raises(ValueError, match="int8_inputs"):
        format_from_state({**csr, "int8_inputs": torch.tensor(True)}, (8, 32))


def test_fallback_rounds_the_inputs_like_the_kernel():
    fmt = Bitmap.from_dense(torch.randn(16, 70), value_dtype=torch.int8,
                            activation_dtype=torch.int8)
    x, bias = torch.randn(4, 70), torch.randn(16)
    torch.testing.assert_close(fmt._fallback_mm(x, bias), fmt.matmul(x, bias), rtol=1e-5,
                               atol=1e-5)


def test_compiled_w8a8_model_reloads_bit_identically(tmp_path, one_thread):
    model, x = _model(), torch.randn(4, 128)
    compiled = _w8a8(model, x, ["bitmap", "dense_lowp"])
    like = reloaded(compiled, model, tmp_path / "w8a8.safetensors")
    assert like[0].format.activation_dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(compiled(x), like(x))


@pytest.mark.parametrize("name", ["bitmap", "nm", "dense_lowp"])
def test_export_and_fullgraph_compile_trace_the_q_ops(name, one_thread):
    model, x = _model(), torch.randn(4, 128)
    compiled = _w8a8(model, x, [name])
    op = {"bitmap": "bitmap", "nm": "nm", "dense_lowp": "dense"}[name]
    program = torch.export.export(compiled, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert f"sparsekit.{op}_qlinear.default" in targets, targets
    torch.testing.assert_close(program.module()(x), compiled(x))
    torch._dynamo.reset()
    traced = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), compiled(x))
