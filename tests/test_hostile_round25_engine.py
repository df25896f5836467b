"""Hostile inputs, round 25: compiled layers of every value dtype.

- ``model.half()`` / ``.double()`` (and ``.bfloat16()`` on int8 layers) cast the values of
  every native format and the float32 scales of every int8 one: the cast succeeded and
  every product after it failed with a raw ``RuntimeError`` ("values must be Float,
  BFloat16 or Char, got Half", "scales must be Float"). Values now take a cast only to a
  dtype their format stores, scales never, and the layer converts at its boundary, so a
  cast model takes and returns its new dtype;
- W8A8 on a layer of more than 65536 inputs: ``compile`` died inside autotuning with the
  kernel's raw ``RuntimeError`` and ``from_dense`` built a format whose every product
  failed; the formats refuse it by name and ``compile`` keeps float inputs there;
- a NaN or infinite weight compiled silently where the values stay float (the sparse
  kernels skip the pruned zeros, so the compiled model spread it to fewer outputs than
  the model did, and the output check passed); ``compile`` refuses it, naming the layer;
- ``compile`` of a compiled model kept its formats and ignored ``formats=`` and the dtypes
  silently; it names the compiled layer and the way back (``decompile``).
"""

from __future__ import annotations

import pytest
import torch
from _kernels import needs_kernels
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear
from sparsekit.engine.formats import FORMATS, format_from_state
from sparsekit.engine.formats.native import INT8_INPUTS, MAX_INT8_INPUTS

pytestmark = [needs_kernels, pytest.mark.usefixtures("one_thread")]


def _pruned(out_features: int = 48, in_features: int = 64) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight[:, 1::2] = 0  # every row half pruned: bitmap, csr16, bsr, fan-in
    return layer


FORMATS_AND_VALUES = [(f, v) for f in ("bitmap", "csr16", "fanin", "dense_lowp")
                      for v in (torch.float32, torch.bfloat16, torch.int8)
                      if v in FORMATS[f].value_dtypes]


@pytest.mark.parametrize("cast", [torch.float16, torch.float64, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "values"), FORMATS_AND_VALUES,
                         ids=[f"{f}-{str(v)[6:]}" for f, v in FORMATS_AND_VALUES])
def test_a_compiled_layer_cast_to_any_float_dtype_takes_and_returns_it(name, values, cast):
    """After ``layer.to(cast)`` the values keep their dtype where their format stores no
    ``cast`` values (float16, float64: the product converts at the layer's boundary) and
    take it where it does (bfloat16, float32 values); int8 codes and their float32 scales
    never change."""
    linear = _pruned()
    layer = CompiledLinear.from_linear(linear, name, value_dtype=values)
    before = {k: v.clone() for k, v in layer.format.state_dict().items()}
    x = torch.randn(3, 64)
    reference = layer(x)
    layer.to(cast)
    for key, tensor in layer.format.state_dict().items():
        stored = key == (layer.format.values_name or layer.format.buffer_names[0])
        if stored and values.is_floating_point and cast in FORMATS[name].value_dtypes:
            assert tensor.dtype == cast
            assert torch.equal(tensor, before[key].to(cast))
        else:
            assert torch.equal(tensor, before[key]), key  # unrounded, in its dtype
    y = layer(x.to(cast))
    assert y.dtype == cast and y.shape == (3, 48)
    # within the rounding of the new dtype (of the values, where they took it, and of x)
    tolerance = {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(cast, 1e-5)
    if cast == torch.bfloat16 and values == torch.float32:
        tolerance = 5e-2
    assert torch.allclose(y.float(), reference.float(), rtol=tolerance, atol=tolerance)


def test_a_compiled_model_cast_with_half_still_runs_and_decompiles():
    """The whole model: ``model.half()`` after ``compile`` (the raw ``RuntimeError`` of the
    first product), then ``decompile`` gives float16 layers."""
    torch.manual_seed(0)
    model = nn.Sequential(_pruned(48, 64), nn.ReLU(), _pruned(16, 48)).eval()
    x = torch.randn(4, 64)
    compiled = sparsekit.compile(model, x, formats=["bitmap"], weight_dtype="int8",
                                 cache=False)
    expected = compiled(x)
    compiled.half()
    with torch.no_grad():
        y = compiled(x.half())
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2)
    back = sparsekit.engine.decompile(compiled)
    assert back[0].weight.dtype == torch.float16


# -- W8A8 on layers wider than its int32 sums allow -----------------------------------------


def _wide() -> nn.Linear:
    layer = _pruned(4, MAX_INT8_INPUTS + 4464)  # 70000 inputs
    return layer.eval()


def test_w8a8_formats_refuse_a_layer_wider_than_exact_int32_sums():
    """``from_dense(..., activation_dtype=torch.int8)`` built a 70000-input layer whose every
    product failed with the kernel's raw ``RuntimeError``; a saved state with the W8A8 mark
    loaded as well."""
    weight = _wide().weight.detach()
    for name in ("bitmap", "dense_lowp", "nm"):
        with pytest.raises(ValueError, match=r"at most 65536 inputs .* in_features=70000"):
            FORMATS[name].from_dense(weight, value_dtype=torch.int8,
                                     activation_dtype=torch.int8)
    state = FORMATS["bitmap"].from_dense(weight, value_dtype=torch.int8).state_dict()
    state[INT8_INPUTS] = torch.tensor(True)
    with pytest.raises(ValueError, match=r"at most 65536 inputs .* in_features=70000"):
        format_from_state(state, tuple(weight.shape))


def test_w8a8_compile_keeps_float_inputs_on_a_layer_wider_than_exact_int32_sums():
    """``compile(..., activation_dtype="int8")`` died inside autotuning with the kernel's
    raw ``RuntimeError``; such a layer now keeps float inputs, like a layer of grouped
    scales, and the narrow one beside it is W8A8."""
    model = nn.Sequential(_wide(), nn.ReLU(), _pruned(8, 4)).eval()
    x = torch.randn(2, MAX_INT8_INPUTS + 4464)
    compiled = sparsekit.compile(model, x, formats=["bitmap"], weight_dtype="int8",
                                 activation_dtype="int8", cache=False)
    assert compiled[0].format.activation_dtype is None
    assert compiled[2].format.activation_dtype == torch.int8
    with torch.no_grad():
        reference = sparsekit.engine.decompile(compiled)(x)
        assert torch.allclose(compiled(x), reference, rtol=1e-2, atol=1e-2)


# -- non-finite weights ----------------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", [None, "bf16", "int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_compile_refuses_a_non_finite_weight_by_name(weight_dtype, bad):
    """A NaN weight compiled silently with float values: the sparse kernels skip the pruned
    zeros, so the compiled model was NaN in 60 of 128 outputs where the model was NaN in
    all (its output check passed); int8 refused without naming the layer."""
    model = nn.Sequential(_pruned(48, 64), nn.ReLU(), _pruned(16, 48)).eval()
    with torch.no_grad():
        model[2].weight[3, 0] = bad
    state = snapshot(model)
    with pytest.raises(ValueError, match=r"model: 2\.weight must be finite, got 1 NaN or inf"):
        sparsekit.compile(model, torch.randn(4, 64), formats=["csr16"],
                          weight_dtype=weight_dtype, cache=False)
    assert unchanged(model, state)


def test_compile_refuses_a_compiled_model_and_takes_it_decompiled():
    """Compiling a compiled model kept its formats and ignored ``formats=`` and the dtypes
    without a word (and recorded no choice)."""
    model = nn.Sequential(_pruned(48, 64), nn.ReLU(), _pruned(16, 48)).eval()
    x = torch.randn(4, 64)
    compiled = sparsekit.compile(model, x, formats=["csr16"], cache=False)
    state = snapshot(compiled)
    with pytest.raises(ValueError, match=r"model: 0 is already compiled \(CompiledLinear\).*"
                                         r"decompile\(model\)"):
        sparsekit.compile(compiled, x, formats=["bitmap"], weight_dtype="int8", cache=False)
    assert unchanged(compiled, state)
    again = sparsekit.compile(sparsekit.engine.decompile(compiled), x, formats=["bitmap"],
                              weight_dtype="int8", cache=False)
    assert again[0].format.name == "bitmap" and again[0].format.value_dtype == torch.int8
