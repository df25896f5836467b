"""Hostile inputs, round 22: the compiled-model engine's Python surface.

Fused projections (``shared_inputs``, ``FusedProjections.output``, ``placeholder``,
``groups``, ``conform``), :class:`ActivationSparseLinear` attribute assignment and state
arguments, the decision cache (symbolic links and directories at an entry's name, meta
layers) and :func:`sparsekit.engine.report.report` (meta layers, malformed records).
Each case failed with a raw error from deep inside, or silently did the wrong thing.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.engine import decisions
from sparsekit.engine.activation_linear import (
    ActivationSparseLinear,
    check_bitmap_index,
    check_column_index,
    sparsify_input,
    thresholded_layers,
)
from sparsekit.engine.compiled_linear import CompiledLinear
from sparsekit.engine.fused import (
    FusedLinear,
    FusedProjections,
    conform,
    groups,
    placeholder,
    shared_inputs,
    stack,
)
from sparsekit.engine.persist import decompile
from sparsekit.engine.report import report


def _layer(kernel: str = "act_gemv", bias: bool = True) -> ActivationSparseLinear:
    torch.manual_seed(0)
    return ActivationSparseLinear.from_linear(nn.Linear(8, 4, bias=bias), 0.1, kernel=kernel)


def _buffers(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


# -- ActivationSparseLinear: attributes the kernels read -----------------------------------


@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
@pytest.mark.parametrize(("value", "error", "match"), [
    (torch.zeros(4), ValueError, r"threshold must have in_features=8 values, got 4"),
    (torch.zeros(8, dtype=torch.float64), ValueError,
     r"threshold must be of the layer's dtype torch.float32, got torch.float64"),
    (torch.full((8,), float("nan")), ValueError, r"threshold must hold thresholds ≥ 0"),
    (torch.full((8,), -1.0), ValueError, r"threshold must hold thresholds ≥ 0"),
    (torch.zeros(8, device="meta"), ValueError, r"threshold is on the meta device"),
    (torch.zeros(8, dtype=torch.int64), ValueError, r"threshold must be a 1-D float tensor"),
    (None, ArgumentTypeError,
     r"threshold must be a 1-D float tensor of in_features=8 .*got NoneType"),
    (0.5, ArgumentTypeError, r"threshold must be a 1-D float tensor .*got float"),
])
def test_assigned_threshold_is_checked(kernel, value, error, match):
    # before: a raw RuntimeError in the next product ("threshold.size(0) must be 8",
    # "threshold must be Float, got Double", "tensor does not have a device"), and a NaN
    # threshold zeroed every input without a word
    layer = _layer(kernel)
    before = _buffers(layer)
    with pytest.raises(error, match=match):
        layer.threshold = value
    assert all(torch.equal(t, before[k]) for k, t in layer.state_dict().items())
    layer(torch.randn(1, 8))


def test_assigned_threshold_noncontiguous_is_made_contiguous():
    # before: "threshold must be a contiguous 1-D CPU tensor" from the kernel
    layer = _layer()
    x = torch.randn(1, 8)
    layer.threshold = torch.zeros(16)[::2]
    assert layer.threshold.is_contiguous()
    torch.testing.assert_close(layer(x), layer.to_module()(x))
    torch.testing.assert_close(layer(x.expand(3, 8)), layer.to_module()(x.expand(3, 8)))


@pytest.mark.parametrize(("value", "error", "match"), [
    (torch.zeros(3), ValueError, r"bias must be None or of shape \(out_features=4,\)"),
    (torch.zeros(4, dtype=torch.float64), ValueError,
     r"bias must be of the layer's dtype torch.float32, got torch.float64"),
    (torch.zeros(4, dtype=torch.int64), ArgumentTypeError, r"bias must be None or a floating"),
    ("zeros", ArgumentTypeError, r"bias must be None or a floating.*got str"),
])
def test_assigned_bias_is_checked(value, error, match):
    # before: a raw RuntimeError at one row ("bias must be Float, got Double") while three
    # rows ran with the float64 bias
    layer = _layer()
    with pytest.raises(error, match=match):
        layer.bias = value
    assert layer.bias.dtype == torch.float32 and layer.bias.shape == (4,)


def test_assigned_bias_may_be_removed_or_added():
    layer = _layer(bias=False)
    layer.bias = torch.ones(4)
    x = torch.randn(1, 8)
    torch.testing.assert_close(layer(x), layer.to_module()(x))
    layer.bias = None
    torch.testing.assert_close(layer(x), layer.to_module()(x))


@pytest.mark.parametrize(("value", "error", "match"), [
    (torch.ones(3), ValueError, r"scales must be torch.float32 of shape \(4,\) like the buffer"),
    (torch.ones(4, dtype=torch.float64), ValueError, r"scales must be torch.float32 of shape"),
    (torch.ones(4, 2), ValueError, r"scales must be torch.float32 of shape \(4,\)"),
    (torch.full((4,), float("nan")), ValueError, r"scales must be positive and finite"),
    (torch.zeros(4), ValueError, r"scales must be positive and finite"),
    (None, ValueError, r"scales must be a tensor for a layer of int8 values"),
    ([1.0] * 4, ArgumentTypeError, r"scales must be a float32 tensor of shape \(4,\)"),
])
def test_assigned_scales_are_checked(value, error, match):
    # before: NaN outputs (a NaN scale), a raw RuntimeError at one row while several rows
    # ran on unscaled codes (None), and (4, 2) scales read as groups without a word
    layer = ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.1, value_dtype=torch.int8)
    before = layer.scales.clone()
    with pytest.raises(error, match=match):
        layer.scales = value
    assert torch.equal(layer.scales, before)
    layer.scales = before * 2  # a valid one is taken
    x = torch.randn(1, 8).sign() * 2  # no input under the threshold, which to_module drops
    torch.testing.assert_close(layer(x), layer.to_module()(x), rtol=1e-4, atol=1e-4)


def test_float_layer_takes_no_scales():
    layer = _layer()
    with pytest.raises(ValueError, match=r"scales must be None for a layer of float values"):
        layer.scales = torch.ones(4)
    layer.scales = None


@pytest.mark.parametrize(("value", "error", "match"), [
    (-5, ValueError, r"threads must be an int ≥ 1, got -5"),
    (10**6, ValueError, r"threads must be an int in \[1, \d+\]"),
    ("2", ArgumentTypeError, r"threads must be an int ≥ 1, got '2'"),
    (2.5, ArgumentTypeError, r"threads must be an int ≥ 1, got 2.5"),
    (True, ArgumentTypeError, r"threads must be an int ≥ 1, got True"),
])
def test_assigned_threads_is_checked(value, error, match):
    # before: a raw RuntimeError from the op at one row ("threads must be in [1, 65536]",
    # "Expected a value of type 'int'"), while several rows ignored it
    layer = _layer()
    with pytest.raises(error, match=match):
        layer.threads = value
    assert layer.threads is None
    layer.threads = 1
    layer(torch.randn(1, 8))


def test_kernel_and_dtype_are_fixed_by_the_buffers():
    # before: a raw KeyError 'values' (kernel) and "x must be Float like wt" (dtype)
    layer = _layer()
    with pytest.raises(ValueError, match=r"kernel is fixed when the layer is built"):
        layer.kernel = "act_sparse_gemv"
    with pytest.raises(ValueError, match=r"dtype is that of the layer's buffers"):
        layer.dtype = torch.bfloat16
    assert layer.kernel == "act_gemv" and layer.dtype == torch.float32
    layer.to(torch.bfloat16)  # the way to change it
    assert layer.dtype == torch.bfloat16
    assert layer(torch.randn(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_assigned_prefill_of_another_width_is_refused():
    # before: several rows ran the wrong module and came out 5 wide
    layer = _layer()
    with pytest.raises(ValueError, match=r"prefill must compute this layer's product"):
        layer.prefill = nn.Linear(8, 5)
    with pytest.raises(ArgumentTypeError, match=r"prefill must be an nn.Module or None"):
        layer.prefill = "dense"
    layer.prefill = CompiledLinear.from_linear(layer.to_module())
    assert layer(torch.randn(3, 8)).shape == (3, 4)


def test_prefill_holding_the_layer_itself_is_refused():
    # before: several rows called the layer from itself until a RecursionError
    layer = _layer()
    with pytest.raises(ValueError, match=r"prefill must be another module than this layer"):
        layer.prefill = layer
    with pytest.raises(ValueError, match=r"prefill must be another module than this layer"):
        layer.prefill = nn.Sequential(layer)
    assert layer.prefill is None and layer(torch.randn(3, 8)).shape == (3, 4)


def test_load_state_dict_assign_still_works():
    layer, other = _layer(), _layer()
    other.threshold = torch.full((8,), 0.5)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    state["threshold"] = torch.full((16,), 0.5)[::2]  # not contiguous
    layer.load_state_dict(state, assign=True)
    assert layer.threshold.is_contiguous()
    x = torch.randn(1, 8)
    torch.testing.assert_close(layer(x), other(x))


def test_load_into_inference_buffers_changes_nothing():
    # before: copy_ wrote each inference buffer, then raised; torch went on, so every
    # buffer had changed under the RuntimeError
    with torch.inference_mode():
        layer = _layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.2).state_dict()
    with pytest.raises(RuntimeError, match=r"layer: weight_t is an inference tensor"):
        layer.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    with torch.inference_mode():
        layer.load_state_dict(state)  # inside inference mode it loads
    layer.load_state_dict(state, assign=True)  # and by assignment outside
    assert torch.equal(layer.threshold, state["threshold"])


@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv",
                                    "act_bitmap_qgemv"])
def test_meta_layer_gives_back_a_meta_weight(kernel):
    # before: "cannot repeat_interleave a meta tensor" (act_sparse_gemv) and "Tensor on
    # device cpu is not on the expected device meta!" (bitmap kernels); act_gemv gave one
    int8 = {"value_dtype": torch.int8} if kernel == "act_bitmap_qgemv" else {}
    layer = ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.1, kernel=kernel,
                                               **int8).to("meta")
    weight = layer.to_dense()
    assert weight.is_meta and weight.shape == (4, 8)
    if int8:  # int8 codes are dequantized: their check names them
        with pytest.raises(ValueError, match=r"codes is on the meta device"):
            layer.to_module()
    else:
        assert layer.to_module().weight.is_meta


@pytest.mark.parametrize("x", [[1.0] * 8, None, 3.0])
def test_forward_of_no_tensor(x):
    # before: AttributeError: 'list' object has no attribute 'dim'
    with pytest.raises(ArgumentTypeError, match=r"x must be a tensor of shape \(\.\.\., "
                                                r"in_features=8\), got"):
        _layer()(x)


def test_state_arguments_are_checked():
    # before: expected_state([...]) returned None (no entries), load_errors(None) and a
    # non-str prefix raised raw AttributeErrors
    layer = _layer()
    with pytest.raises(ArgumentTypeError, match=r"state must be a mapping .*got list"):
        layer.expected_state([1, 2])
    with pytest.raises(ArgumentTypeError, match=r"state must be a mapping .*got NoneType"):
        layer.load_errors(None)
    with pytest.raises(ArgumentTypeError, match=r"prefix must be a str .*got 5"):
        layer.load_errors({}, 5)
    assert layer.load_errors(layer.state_dict()) == []


def test_thresholded_layers_of_no_mapping():
    with pytest.raises(ArgumentTypeError, match=r"thresholds must be a mapping"):
        thresholded_layers([torch.zeros(8)], nn.Sequential(nn.Linear(8, 4)))


@pytest.mark.parametrize(("x", "threshold", "error", "match"), [
    (torch.randn(2, 8), 0.5, ArgumentTypeError, r"threshold must be a float tensor .*got float"),
    (torch.randn(2, 8), torch.zeros(3), ValueError,
     r"threshold must be a float tensor of 1 or 8 values .*got shape \(3,\)"),
    (torch.randn(2, 8), torch.zeros(8, dtype=torch.int64), ArgumentTypeError,
     r"threshold must be a float tensor .*got torch.int64"),
    ([1.0] * 8, torch.zeros(8), ArgumentTypeError, r"x must be a floating-point tensor, got list"),
    (torch.arange(8), torch.full((8,), 2.5), ArgumentTypeError,
     r"x must be a floating-point tensor, got torch.int64"),
    (torch.ones(8, dtype=torch.bool), torch.zeros(8), ArgumentTypeError,
     r"x must be a floating-point tensor, got torch.bool"),
])
def test_sparsify_input_arguments(x, threshold, error, match):
    # before: AttributeError ('float' object has no attribute 'to'), a raw broadcast
    # RuntimeError, NotImplementedError for bool, and integer inputs compared against
    # thresholds truncated to integers (|2| kept by 2.5)
    with pytest.raises(error, match=match):
        sparsify_input(x, threshold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_input_moves_the_threshold_to_the_input(dtype):
    # before: "Tensor on device cpu is not on the expected device meta!" (CUDA alike)
    y = sparsify_input(torch.randn(2, 8, device="meta", dtype=dtype), torch.full((8,), 0.5))
    assert y.device.type == "meta" and y.shape == (2, 8) and y.dtype == dtype


def test_sparsify_input_still_takes_a_scalar_tensor():
    x = torch.tensor([[0.1, -0.6, 0.5]])
    assert sparsify_input(x, torch.tensor(0.5)).tolist() == [[0.0, -0.6000000238418579, 0.5]]
    assert sparsify_input(x, torch.full((3,), 0.5)).tolist() == \
        sparsify_input(x, torch.tensor([0.5])).tolist()


def _bitmap_layer() -> ActivationSparseLinear:
    return ActivationSparseLinear.from_linear(nn.Linear(8, 300), 0.1, kernel="act_bitmap_gemv")


def _column_layer() -> ActivationSparseLinear:
    return ActivationSparseLinear.from_linear(nn.Linear(8, 300), 0.1, kernel="act_sparse_gemv")


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"out_features": 300.0}, ArgumentTypeError, r"out_features must be an int ≥ 0, got 300.0"),
    ({"out_features": -1}, ValueError, r"out_features must be an int ≥ 0, got -1"),
    ({"block": 0}, ValueError, r"block must be an int ≥ 1, got 0"),
    ({"block": 15}, ValueError, r"block must be a multiple of 16"),
    ({"bitmap": [1]}, ArgumentTypeError, r"layer: bitmap must be a tensor, got list"),
    ({"meta": True}, ValueError, r"layer: bitmap is on the meta device"),
])
def test_check_bitmap_index_arguments(change, error, match):
    # before: ZeroDivisionError (block 0), NotImplementedError "lshift_cpu" (a float
    # width), "Cannot copy out of meta tensor", AttributeError (a list)
    layer = _bitmap_layer()
    args = {"bitmap": layer.bitmap, "offsets": layer.offsets, "values": layer.values,
            "out_features": 300, "block": 256}
    if change.pop("meta", False):
        args.update({k: args[k].to("meta") for k in ("bitmap", "offsets", "values")})
    args.update(change)
    with pytest.raises(error, match=match):
        check_bitmap_index(args.pop("bitmap"), args.pop("offsets"), args.pop("values"), **args)


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"out_features": 300.0}, ArgumentTypeError, r"out_features must be an int ≥ 0, got 300.0"),
    ({"block": 0}, ValueError, r"block must be an int ≥ 1, got 0"),
    ({"colptr": None}, ArgumentTypeError, r"layer: colptr must be a tensor, got NoneType"),
    ({"meta": True}, ValueError, r"layer: colptr is on the meta device"),
    ({"values2d": True}, ValueError, r"and 1-D values, got .* and \(1, \d+\)"),
])
def test_check_column_index_arguments(change, error, match):
    # before: ZeroDivisionError, "Tensor.item() cannot be called on meta tensors",
    # AttributeError, and values of shape (1, nnz) passed; a float width passed too
    layer = _column_layer()
    args = {"colptr": layer.colptr, "row_indices": layer.row_indices, "values": layer.values,
            "out_features": 300, "block": 2048}
    if change.pop("meta", False):
        args.update({k: args[k].to("meta") for k in ("colptr", "row_indices", "values")})
    if change.pop("values2d", False):
        args["values"] = args["values"].view(1, -1)
    args.update(change)
    with pytest.raises(error, match=match):
        check_column_index(args.pop("colptr"), args.pop("row_indices"), args.pop("values"),
                           **args)


def test_index_checks_pass_valid_layers():
    bitmap, column = _bitmap_layer(), _column_layer()
    check_bitmap_index(bitmap.bitmap, bitmap.offsets, bitmap.values, 300, 256)
    check_column_index(column.colptr, column.row_indices, column.values, 300, 2048)


# -- fused projections ---------------------------------------------------------------------


class _Pair(nn.Module):
    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.keyword = nn.Linear(8, 4), nn.Linear(8, 4), keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.q(input=x) if self.keyword else self.q(x)) + self.k(x)


def test_shared_inputs_with_a_layer_called_by_keyword():
    # before: ValueError "example_inputs: the model cannot run on them: tuple index out of
    # range", raised by the recording hook, not the model
    model = _Pair(keyword=True)
    assert shared_inputs(model, (torch.randn(2, 8),)) == []
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert shared_inputs(_Pair(), (torch.randn(2, 8),)) == [["q", "k"]]


def _group() -> tuple[FusedProjections, list[FusedLinear]]:
    torch.manual_seed(0)
    q, k = nn.Linear(8, 4), nn.Linear(8, 4)
    projections = FusedProjections(CompiledLinear.from_linear(stack([q, k])), [4, 4])
    return projections, projections.members()


@pytest.mark.parametrize("index", [2, -1, True, 1.0])
def test_output_index_is_checked(index):
    # before: IndexError "tuple index out of range" after marking member 2 as served, so
    # the kept outputs were never dropped
    projections, _ = _group()
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 2\), got"):
        projections.output(x, index)
    assert projections.__dict__["_kept"] is None
    projections.output(x, 0)
    projections.output(x, 1)
    assert projections.__dict__["_kept"] is None  # every member served: nothing kept


@pytest.mark.parametrize("x", [[1.0] * 8, None])
def test_member_forward_of_no_tensor(x):
    # before: AttributeError: 'list' object has no attribute 'is_inference'
    _, members = _group()
    with pytest.raises(ArgumentTypeError, match=r"x must be a tensor of shape \(\.\.\., "
                                                r"in_features=8\), got"):
        members[1](x)


@pytest.mark.parametrize("change", [
    lambda m: m.load_state_dict({k: torch.zeros_like(v) for k, v in m.state_dict().items()}),
    lambda m: m.half().float(),  # the weights rounded to float16, x the same object
])
def test_kept_outputs_are_dropped_when_the_weights_change(change):
    # before: member 1, called with the input member 0 was called with before a load,
    # returned its slice of the old weights' product
    _, (first, second) = _group()
    x = torch.randn(1, 8)
    first(x)
    change(first)
    torch.testing.assert_close(second(x), second.to_linear()(x))


def test_member_of_a_numpy_index_works():
    import numpy as np

    projections, members = _group()
    member = FusedLinear(projections, np.int64(1))
    x = torch.randn(1, 8)
    torch.testing.assert_close(member(x), members[1](x))


@pytest.mark.parametrize(("args", "error", "match"), [
    ((-1, [4, 4], True, torch.float32), ValueError, r"in_features must be an int ≥ 0, got -1"),
    ((True, [4, 4], True, torch.float32), ArgumentTypeError, r"in_features must be an int"),
    ((8, [4.0, 4], True, torch.float32), ArgumentTypeError, r"sizes\[0\] must be an int ≥ 1"),
    ((8, [8], True, torch.float32), ValueError, r"sizes must be two ints ≥ 1 or more"),
    ((8, "44", True, torch.float32), ArgumentTypeError, r"sizes must be a sequence of ints"),
    ((8, [4, 4], "no", torch.float32), ArgumentTypeError, r"bias must be a bool"),
    ((8, [4, 4], True, torch.int64), ArgumentTypeError, r"dtype must be a floating-point"),
    ((8, [4, 4], True, "float32"), ArgumentTypeError, r"dtype must be a floating-point"),
    ((10**6, [10**6, 10**6], True, torch.float32), ValueError,
     r"make a stacked weight of .* bytes, more than this machine's memory"),
])
def test_placeholder_arguments(args, error, match):
    # before: raw RuntimeError/TypeError from torch (negative dimension, integer dtype,
    # float size), an allocator failure for a huge group, and bias="no" made a bias
    with pytest.raises(error, match=match):
        placeholder(*args)


def test_placeholder_bias_false_has_none():
    members = placeholder(8, [4, 4], False, torch.float32)
    assert members[0].to_linear().bias is None


def test_groups_and_conform_of_no_model():
    with pytest.raises(ArgumentTypeError, match=r"model must be an nn.Module, got NoneType"):
        groups(None)
    with pytest.raises(ArgumentTypeError, match=r"model must be an nn.Module, got NoneType"):
        conform(None, [], [])


class _Four(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 4), nn.Linear(8, 4)
        self.v, self.n = nn.Linear(6, 6), nn.Linear(8, 4, bias=False)


def _kinds(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules()}


@pytest.mark.parametrize(("saved", "match"), [
    ([["q", "q"]], r"names a layer twice, or one of another group"),
    ([["q", "k"], ["k", "n"]], r"names a layer twice, or one of another group"),
    ([["q", "v"]], r"layers of different in_features or bias presence"),
    ([["q", "n"]], r"layers of different in_features or bias presence"),
    ([["q"]], r"must name two layers or more"),
    (["qk"], r"must name two layers or more"),
    ([["q", 1]], r"must name two layers or more"),
])
def test_conform_refuses_groups_no_fuse_could_give(saved, match):
    # before: ["q", "q"] replaced the member holding the stacked weight by the other one,
    # ["q", "v"] put a group over q's 8 inputs in place of v's 6, and an overlapping group
    # was skipped, all silently
    model = _Four()
    before = _kinds(model)
    with pytest.raises(ValueError, match=match):
        conform(model, [], saved)
    assert _kinds(model) == before


def test_conform_refuses_a_layer_shared_under_two_names():
    # before: the two names got two members, untying the layer they shared
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(8, 4))
    model[1] = model[0]
    with pytest.raises(ValueError, match=r"shares under several names"):
        conform(model, [], [["0", "1"]])
    assert model[0] is model[1] and type(model[0]) is nn.Linear


def test_conform_valid_group_still_fuses():
    model = _Four()
    undo = conform(model, [], [["q", "k"]])
    assert groups(model) == [["q", "k"]]
    undo()
    assert type(model.q) is nn.Linear and type(model.k) is nn.Linear


# -- the decision cache ----------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "cache" / "decisions")
    return tmp_path


def _choice() -> dict[str, object]:
    return {"format": "dense", "rows": [1], "ms_dense": 1.0, "ms_chosen": 1.0, "speedup": 1.0,
            "times_ms": {"dense": {"1": 1.0}, "csr": {"1": 2.0}},
            "evidence": {"1": {"format": "dense", "spread": 0.01}}, "margin": 1.1}


def _key() -> dict[str, object]:
    return decisions.key(nn.Linear(8, 4), (8,), ["dense", "csr"], [1], None)


def test_store_replaces_a_symlink_instead_of_writing_through_it(cache):
    # before: the decision overwrote the file the link led to, wherever it was
    key = _key()
    path = decisions._path(key)
    path.parent.mkdir(parents=True)
    victim = cache / "notes.json"
    victim.write_text("mine")
    path.symlink_to(victim)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        decisions.lookup(key)  # corrupt: warned and ignored
    decisions.store(key, _choice())
    assert victim.read_text() == "mine"
    assert not path.is_symlink() and json.loads(path.read_text())["key"] == key
    assert decisions.lookup(key)["format"] == "dense"


def test_store_never_makes_folders_for_a_dangling_link(cache):
    # before: the write followed a link to nothing and created its folders
    key = _key()
    path = decisions._path(key)
    path.parent.mkdir(parents=True)
    target = cache / "elsewhere" / "sub" / "x.json"
    os.symlink(target, path)
    decisions.store(key, _choice())
    assert not (cache / "elsewhere").exists()
    assert decisions.lookup(key)["format"] == "dense"


def test_directory_at_an_entry_is_reported_as_no_regular_file(cache):
    # before: "cannot read decision cache file ...: [Errno 21] Is a directory: 3"
    key = _key()
    decisions._path(key).mkdir(parents=True)
    with pytest.warns(RuntimeWarning, match=r"\(ValueError: it is no regular file\)"):
        assert decisions.lookup(key) is None
    with pytest.warns(RuntimeWarning, match=r"cannot write to the decision cache"):
        decisions.store(key, _choice())


def test_key_of_a_meta_layer(cache):
    # before: RuntimeError "Tensor.item() cannot be called on meta tensors"
    with pytest.raises(ValueError, match=r"layer.weight is on the meta device"):
        decisions.key(nn.Linear(8, 4, device="meta"), (8,), ["dense"], [1], None)


# -- report ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [
    lambda: ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.1),
    lambda: CompiledLinear.from_linear(nn.Linear(8, 4)),
])
def test_report_of_a_meta_compiled_layer(compiled):
    # before: RuntimeError "Tensor.item() cannot be called on meta tensors"
    model = nn.Sequential(compiled().to("meta"))
    with pytest.raises(ValueError, match=r"model: 0\.\w+ is on the meta device"):
        report(model)


@pytest.mark.parametrize("choices", [
    [1, 2], None, {"0": None}, {"0": {"ms_dense": 1.0}},
    {"0": {"fused": {"group": ["0"], "stacked": {"ms_dense": 1.0}}}},
    {"q": {"fused": {"group": 5, "stacked": {"ms_dense": 1.0}}}},
])
def test_report_with_malformed_records(choices):
    # before: TypeError (a list, a group of 5), AttributeError (a record None), KeyError
    # 'ms_chosen'
    model = _Pair()
    model.q, model.k = _group()[1]
    model.o = ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.1)
    model.sparsekit_choices = choices
    text = str(report(model))
    assert "activation" in text and "q.group.linear" in text


def test_report_of_a_fused_model_names_the_group_row():
    model = _Pair()
    model.q, model.k = _group()[1]
    model.sparsekit_choices = {"q": {"fused": {"group": ["q", "k"], "stacked": {
        "ms_dense": 2.0, "ms_chosen": 1.0, "speedup": 2.0}}}}
    rows = {r.name: r for r in report(model, torch.randn(1, 8)).rows}
    assert rows["q.group.linear"].extra["note"] == "fused: q, k"
    assert rows["q.group.linear"].extra["speedup"] == 2.0


# -- decompile ----------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    CompiledLinear.from_linear, lambda linear: ActivationSparseLinear.from_linear(linear, 0.1),
])
def test_decompile_of_a_fused_member_whose_group_is_on_meta(build):
    # before: a member past the first gave back an nn.Linear of meta weights, silently
    torch.manual_seed(0)
    projections = FusedProjections(build(stack([nn.Linear(8, 4), nn.Linear(8, 4)])), [4, 4])
    first, second = projections.members()
    first.to("meta")
    with pytest.raises(ValueError, match=r"model: 1\.group\.linear\.\w+ is on the meta device"):
        decompile(nn.Sequential(nn.ReLU(), second))
    with pytest.raises(ValueError, match=r"model: 0\.group\.linear\.\w+ is on the meta device"):
        decompile(nn.Sequential(first, second))


@pytest.mark.parametrize("format", ["dense", "csr16", "bitmap"])
def test_compiled_linear_built_in_inference_mode_refuses_a_load_outside_it_unchanged(format):
    """Before: the saved format was installed (the weights changed), then copying the bias
    (an inference tensor) raised; now the load is refused before anything is written, and it
    works inside inference mode or with assign=True."""
    torch.manual_seed(0)
    source = nn.Linear(16, 8)
    with torch.no_grad():
        source.weight[:, ::2] = 0
    state = CompiledLinear.from_linear(source, format=format).state_dict()
    with torch.inference_mode():
        layer = CompiledLinear.from_linear(nn.Linear(16, 8), format=format)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"layer: bias is an inference tensor .*accepted: "):
        layer.load_state_dict(state)
    after = layer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    x = torch.randn(3, 16)
    with torch.inference_mode():
        layer.load_state_dict(state)
        assert torch.allclose(layer(x), source(x), atol=1e-5)


def test_a_model_reading_a_missing_key_of_its_input_is_named():
    """Before: ``model_errors`` passed a ``KeyError`` through (a model given a mapping
    without the key it reads), naming no argument."""
    class ByKey(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            x = batch["x"]
            return self.q(x) + self.k(x)

    with pytest.raises(ValueError, match=r"^example_inputs: the model cannot run on them: 'x'"):
        shared_inputs(ByKey(), ({"y": torch.randn(1, 4)},))
    assert shared_inputs(ByKey(), ({"x": torch.randn(1, 4)},)) == [["q", "k"]]


@pytest.mark.parametrize("format", ["dense", "csr16", "bitmap"])
def test_compiled_linear_names_an_integer_input_as_an_argument_type_error(format):
    """Before: the dense format's hot path gave F.linear's raw "mat1 and mat2 must have the
    same dtype" (a RuntimeError), the native ones a plain TypeError; now every format's is
    an ArgumentTypeError naming x (a float input of the right dtype runs as before)."""
    layer = CompiledLinear.from_linear(nn.Linear(8, 4), format=format)
    with pytest.raises(ArgumentTypeError, match=r"^x must "):
        layer(torch.ones(2, 8, dtype=torch.long))
    assert layer(torch.ones(2, 8)).shape == (2, 4)


def test_tuned_refuses_row_counts_beyond_max_rows_before_timing():
    """Before: ``ActivationSparseLinear.tuned(rows=(10**9,))`` failed allocating its timing
    inputs (a raw out-of-memory error); its row counts are now checked as compile's are
    (one ``autotune.check_rows``; the three checks of compile, autotune and tuned differed)."""
    from sparsekit.engine.autotune import MAX_ROWS
    linear = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=rf"^rows must be ints in \[1, {MAX_ROWS}\]"):
        ActivationSparseLinear.tuned(linear, 0.5, rows=(1, 10**9))
    with pytest.raises(ArgumentTypeError, match=r"^rows must be an int ≥ 1, got True"):
        ActivationSparseLinear.tuned(linear, 0.5, rows=(True,))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_compile_refuses_float8_layers_up_front(dtype):
    """Before: a float8 model compiled until the output check, which failed with torch's raw
    ``"isfinite" not implemented for 'Float8_e4m3fn'`` (a NotImplementedError)."""
    import sparsekit

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentTypeError, match=rf"^model: 0.weight has dtype {dtype}; compile "
                       "takes layers of float16, bfloat16, float32 or float64"):
        sparsekit.compile(model, torch.randn(2, 32))
    with pytest.raises(ArgumentTypeError, match=rf"^example_inputs must be float16, .* got "
                       rf"{dtype}"):
        sparsekit.compile(model, torch.randn(2, 32).to(dtype))
    assert all(torch.equal(v.view(torch.uint8), before[k].view(torch.uint8))
               for k, v in model.state_dict().items())


def test_layers_refuse_float8_weights_and_report_counts_them():
    """Before: ``SparseLinear.from_linear`` of a float8 layer raised torch's raw
    ``"check_uniform_bounds" not implemented``, ``ActivationSparseLinear.from_linear`` built
    a layer no kernel or fallback could run, and ``sparsekit.report`` of a float8 model
    failed in ``count_nonzero``."""
    import sparsekit
    from sparsekit.engine.sparse_linear import SparseLinear

    linear = nn.Linear(32, 16).to(torch.float8_e4m3fn)
    with pytest.raises(ArgumentTypeError, match=r"^linear's weight must be a floating-point "
                       r"tensor of 16 bits or more .* got dtype torch.float8_e4m3fn"):
        SparseLinear.from_linear(linear)
    with pytest.raises(TypeError, match=r"^weight must be float16, bfloat16, float32, float64 "
                       r"or int8 codes, got torch.float8_e4m3fn"):
        ActivationSparseLinear.from_linear(linear, 0.1)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    (row,) = sparsekit.report(nn.Sequential(linear)).rows
    assert row.nonzeros == int(linear.weight.float().count_nonzero()) <= 16 * 16
