"""Hostile inputs, round 16: int8 scales per row and group of inputs.

- a direct ``bitmap_linear`` / ``dense_linear`` call with groups of 0 inputs (a layer without
  inputs and ``(rows, 1)`` scales) is a ``RuntimeError``, never an integer division by zero
  that killed the process; the Python checks refuse such a grid too;
- scales on the meta device are named, not a raw ``Tensor.item()`` error;
- the stored scales of a (resealed) file must be positive, as ``from_dense`` and
  ``weight_scale`` already require: a zero or negative one loaded and zeroed or flipped its
  group silently;
- ``llm.prune`` of a model already quantized (per row or per group, onto either grid) keeps
  the new grid: its buffers were restored to the old scales (weights off their grid) or, of
  another shape, failed to restore with a raw ``RuntimeError`` after the weights changed;
- ``compile`` of a layer whose groups are not whole bitmap words keeps it off bitmap
  instead of failing;
- ``prune_layer`` checks ``group_size`` before pruning.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _kernels import needs_kernels
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear
from sparsekit.engine.formats import FORMATS
from sparsekit.llm.methods import METHODS, prune_layer
from sparsekit.patterns import parse_pattern
from sparsekit.quantize import (
    attach_scales,
    attached_scales,
    dequantize_int8,
    group_size_of,
    int8_scales,
    quantize_int8,
)

transformers = pytest.importorskip("transformers")

from test_llm import build, layers_of, tokens  # noqa: E402

IDS = tokens(1, 16)
CALIBRATION = tokens(4, 16)


def _on_grid(layer: nn.Module) -> bool:
    scales = attached_scales(layer)
    group = group_size_of(layer.weight, scales)
    codes, _ = quantize_int8(layer.weight, scales, group)
    return torch.equal(dequantize_int8(codes, scales, group), layer.weight.float())


# -- groups of no inputs ----------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 20])
def test_the_ops_refuse_groups_of_zero_inputs(dtype, batch):
    x = torch.randn(batch, 0).to(dtype)
    empty = (torch.zeros(0, dtype=torch.int8), torch.zeros(4, 0, dtype=torch.int16),
             torch.zeros(5, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"in_features=0 \(groups of at least one input\)"):
        torch.ops.sparsekit.bitmap_linear(*empty, x, None, 0, 1, torch.ones(4, 1))
    with pytest.raises(RuntimeError, match=r"in_features=0 \(groups of at least one input\)"):
        torch.ops.sparsekit.dense_linear(torch.zeros(4, 0, dtype=torch.int8), x, None, 0, 1,
                                         torch.ones(4, 1))
    # one scale per row still takes a layer without inputs: its outputs are the bias
    y = torch.ops.sparsekit.bitmap_linear(*empty, x, torch.ones(4), 0, 1, torch.ones(4))
    assert torch.equal(y.float(), torch.ones(batch, 4))


@pytest.mark.parametrize("name", ["dense_lowp", "bitmap"])
def test_a_grid_of_groups_of_zero_inputs_is_refused(name):
    with pytest.raises(ValueError, match=r"\(4,\) or \(4, groups\) with groups dividing 0"):
        FORMATS[name].from_dense(torch.zeros(4, 0), scales=torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"scales of shape \(4, 1\) do not divide the 0 inputs"):
        group_size_of(torch.zeros(4, 0), torch.ones(4, 1))
    layer = nn.Linear(0, 4)
    with pytest.raises(ValueError, match=r"do not divide the 0 inputs"):
        attach_scales(layer, torch.ones(4, 1))
    assert attached_scales(layer) is None


# -- scale values ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dense_lowp", "bitmap"])
@pytest.mark.parametrize("shape", [(4,), (4, 2)])
def test_meta_scales_are_named(name, shape):
    with pytest.raises(ValueError, match=r"buffer 'scales' is on the meta device"):
        FORMATS[name].from_dense(torch.randn(4, 32), scales=torch.ones(shape, device="meta"))


@pytest.mark.parametrize("name", ["dense_lowp", "bitmap"])
@pytest.mark.parametrize("value", [0.0, -0.5])
def test_stored_scales_must_be_positive(name, value):
    weight = torch.randn(4, 32)
    scales = int8_scales(weight, 16)
    state = dict(FORMATS[name].from_dense(weight, scales=scales).state_dict())
    bad = scales.clone()
    bad[2, 1] = value
    with pytest.raises(ValueError, match=r"scales must be positive and finite .* got "
                                         r"buffer 'scales'\[\[2, 1\]\]"):
        FORMATS[name].from_state({**state, "scales": bad}, (4, 32))


@needs_kernels
def test_a_file_with_a_negative_group_scale_is_refused_whole(tmp_path):
    model = build()
    sparsekit.llm.prune(model, CALIBRATION, quantize="int8", group_size=16)
    compiled = sparsekit.compile(model, IDS, cache=False, formats=["dense_lowp"])
    fmt = compiled.get_submodule("model.layers.0.mlp.down_proj").format
    fmt._buffers["scales"] = -fmt._buffers["scales"]  # what a resealed file may hold
    sparsekit.save(compiled, tmp_path / "flipped.safetensors")
    skeleton = sparsekit.compile(build(), IDS, cache=False, formats=["dense_lowp"],
                                 weight_dtype="int8")
    before = snapshot(skeleton)
    with pytest.raises(ValueError, match=r"down_proj.*scales must be positive and finite"):
        sparsekit.load(skeleton, tmp_path / "flipped.safetensors")
    assert unchanged(skeleton, before)


# -- pruning a quantized model again -----------------------------------------------------


@pytest.mark.parametrize("first", [None, 16])
@pytest.mark.parametrize(("again", "groups"), [
    ({"quantize": "int8"}, None),
    ({"quantize": "int8", "group_size": 32}, 1),
    ({"quantize": "int8", "group_size": 16, "method": "sparsegpt"}, 2),
])
def test_pruning_a_quantized_model_again_keeps_the_new_grid(first, again, groups):
    model = build()
    sparsekit.llm.prune(model, CALIBRATION, quantize="int8", group_size=first)
    masks = sparsekit.llm.prune(model, CALIBRATION, sparsity=0.6, **again)
    for layer in (x.module for x in layers_of(model)):
        scales = attached_scales(layer)
        expected = ((layer.out_features,) if groups is None
                    else (layer.out_features, groups * layer.in_features // 32))
        assert scales.shape == expected
        assert _on_grid(layer)  # the weight lies on the grid it carries
    assert masks.sparsity() > 0.55


# -- compile -----------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("formats", ["auto", ["bitmap", "dense_lowp"], ["bitmap"]])
def test_groups_of_less_than_a_bitmap_word_compile_off_bitmap(formats):
    model = build()
    sparsekit.llm.prune(model, CALIBRATION, quantize="int8", group_size=8)
    compiled = sparsekit.compile(model, IDS, cache=False, formats=formats)
    for x in layers_of(model):
        name = next(n for n, m in model.named_modules() if m is x.module)
        got = compiled.get_submodule(name)
        linear = got.group.linear if hasattr(got, "group") else got
        assert isinstance(linear, CompiledLinear)
        assert linear.format.name != "bitmap", name
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits, rtol=1e-4,
                                   atol=1e-4)


# -- prune_layer -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize(("group_size", "quantize"), [(5, "int8"), (16, None)])
def test_prune_layer_checks_group_size_before_pruning(method, group_size, quantize):
    def refuse(*_: object) -> None:
        pytest.fail("pruned before group_size was checked")

    spec = dataclasses.replace(METHODS.get(method), prune=refuse)
    with pytest.raises(ValueError, match=rf"group_size must divide W's 32 inputs and needs "
                                         rf"quantize='int8'.*got group_size={group_size}"):
        prune_layer(spec, torch.randn(8, 32), None, 0.5, parse_pattern("unstructured"),
                    quantize, group_size)


def test_blocks_pruned_before_an_error_keep_their_new_grids():
    """Block 0 is pruned and rounded, then block 1's inputs overflow: block 0's layers carry
    the grid their weights lie on (attached after preserved() restores the buffers, also
    when the prune stops with an error)."""
    from test_llm import llama, tokens

    from sparsekit import llm
    from sparsekit.blocks import find_blocks
    from sparsekit.quantize import attached_scales, dequantize_int8, quantize_int8

    model = llama()
    block = find_blocks(model)[0]
    block.register_forward_hook(
        lambda _m, _a, out: (out[0] * float("inf"), *out[1:]) if isinstance(out, tuple)
        else out * float("inf"))
    with pytest.raises(ValueError, match="blocks 0 to 0 were already pruned"):
        llm.prune(model, tokens(), method="wanda", quantize="int8", group_size=16)
    proj = model.model.layers[0].mlp.down_proj
    scales = attached_scales(proj)
    assert scales is not None and scales.shape == (32, 4)
    codes, _ = quantize_int8(proj.weight, scales, 16)
    assert torch.equal(dequantize_int8(codes, scales, 16), proj.weight)
    assert attached_scales(model.model.layers[1].mlp.down_proj) is None  # never pruned
