"""Hostile inputs, round 18: the trainable sparse layers and graph surgery.

- ``SparseLinear.from_linear`` copied ``linear``'s bias unchecked: a bias of another shape
  failed in the copy with a raw ``RuntimeError``, one on the meta device with a raw
  ``NotImplementedError``, an integer one was cast silently, and an integer weight's
  error named a ``dtype`` the caller never passed;
- a ``SparseLinear`` moved with ``.to("meta")`` failed its forward inside PyTorch (a raw
  ``RuntimeError`` of ``repeat_interleave``);
- changing a ``SparseLinear``'s structure (``set_structure``, or loading a state with
  another structure) between a forward and its backward put the gradients on the new
  structure's weights silently when the number of nonzeros stayed the same (a
  prune-and-regrow step), and failed with a raw kernel or autograd ``RuntimeError``
  otherwise;
- ``load_state_dict(..., assign=True)`` made ``rowptr``/``col`` the state's own tensors
  beside a structure built from copies: after the next ``.to()`` the products read them,
  a non-contiguous ``col`` failed in the kernel and one changed later by its owner gave
  wrong outputs silently;
- ``SparseLinear.to_empty()`` left the index buffers uninitialized (the structure is no
  value to initialize again): the next forward failed in the kernel's rowptr check, and a
  garbage rowptr that passed it would have sent garbage column indices, which the kernels
  trust, into the products;
- a ``SparseLinear`` that loaded a state of another structure (or ran ``set_structure``)
  under ``torch.inference_mode`` could no longer be trained ("Inference tensors cannot be
  saved for backward"), where an ``nn.Linear`` loaded the same way could;
- ``ActivationSparseLinear.to(dtype)`` (``.half()``, ``.to(torch.bfloat16)``, ...) kept its
  old ``dtype`` and cast int8 scales: inputs of either dtype then failed in a kernel with
  a raw ``RuntimeError``;
- ``ActivationSparseLinear.load_state_dict(..., assign=True)`` of non-contiguous tensors
  (a transposed or strided view) kept them as buffers: the next forward failed in the
  kernel with a raw ``RuntimeError``;
- an ``ActivationSparseLinear`` moved to the meta device failed its single-row product (and
  the weight-sparse kernels' multi-row one) with a raw ``NotImplementedError`` of
  ``nonzero()``;
- ``ActivationSparseLinear.from_linear`` took any module: an ``nn.Embedding`` or an
  ``nn.ReLU`` failed with a raw ``AttributeError``;
- ``remove_dead_neurons`` rebuilt an ``nn.Linear`` subclass that overrides ``forward`` as
  a plain ``nn.Linear``: the outputs changed silently;
- ``remove_dead_neurons`` untied a layer used twice or tied weights silently: the
  "smaller" model could hold more weights than the original;
- ``remove_dead_neurons`` of a model on the meta device failed with a raw ``RuntimeError``
  (``Tensor.item()``);
- ``to_graph`` and ``structure_features`` of a model on the meta device failed with a raw
  ``NotImplementedError``.
"""

from __future__ import annotations

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.sparse_linear import SparseLinear
from sparsekit.graph import remove_dead_neurons, structure_features, to_graph
from sparsekit.models import LeNet300100

MASK = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
OTHER = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)  # same nnz


def _layer(mask: torch.Tensor = MASK, seed: int = 0) -> SparseLinear:
    torch.manual_seed(seed)
    return SparseLinear(4, 3, mask)


# -- SparseLinear -----------------------------------------------------------------------------


def _linear_with(part: str) -> nn.Linear:
    linear = nn.Linear(4, 3)
    if part == "bias of another shape":
        linear.bias = nn.Parameter(torch.zeros(5))
    elif part == "bias on meta":
        linear.bias = nn.Parameter(torch.zeros(3, device="meta"))
    elif part == "integer bias":
        linear.bias = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    elif part == "integer weight":
        linear.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.long), requires_grad=False)
    return linear


@pytest.mark.parametrize("part, error, match", [
    ("bias of another shape", ValueError, r"linear's bias must be .* shape \(3,\).* got shape "
                                          r"\(5,\)"),
    ("bias on meta", ValueError, "linear's bias is on the meta device"),
    ("integer bias", ArgumentTypeError, "linear's bias must be a floating-point .* torch.int64"),
    ("integer weight", ArgumentTypeError, "linear's weight must be a floating-point .* "
                                          "torch.int64"),
])
def test_from_linear_checks_the_linears_weight_and_bias(part, error, match):
    linear = _linear_with(part)
    before = {k: v for k, v in linear.state_dict().items() if not v.is_meta}
    with pytest.raises(error, match=match):
        SparseLinear.from_linear(linear)
    assert all(torch.equal(linear.state_dict()[k], v) for k, v in before.items())


def test_forward_of_a_layer_on_the_meta_device_is_named():
    layer = _layer().to("meta")
    with pytest.raises(ValueError, match="SparseLinear.values is on the meta device"):
        layer(torch.randn(2, 4, device="meta"))


def _change(layer: SparseLinear, how: str) -> None:
    if how == "set_structure, same nnz":
        layer.set_structure(OTHER)
    elif how == "set_structure, more nnz":
        layer.set_structure(OTHER | MASK)
    else:  # a state of another structure, as many nonzeros
        layer.load_state_dict(_layer(OTHER, seed=1).state_dict())


@pytest.mark.parametrize("how", ["set_structure, same nnz", "set_structure, more nnz",
                                 "load_state_dict"])
def test_structure_change_between_forward_and_backward_is_refused(how):
    """With as many nonzeros the backward put the gradients on the new structure's weights."""
    layer = _layer()
    x = torch.randn(2, 4, requires_grad=True)
    y = layer(x)
    _change(layer, how)
    with pytest.raises(ValueError, match="SparseLinear: its structure was changed .* between "
                                         "this forward and its backward"):
        y.sum().backward()
    assert layer.values.grad is None and x.grad is None
    del y  # its graph holds the values' gradient accumulator, made for the old size
    layer(x).sum().backward()  # a new forward trains the new structure
    dense = nn.Linear(4, 3)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
    dense(x).sum().backward()
    torch.testing.assert_close(layer.values.grad, dense.weight.grad[layer.mask])


def test_load_with_assign_keeps_the_structures_own_buffers():
    """The buffers were the state's tensors: a non-contiguous col reached the kernel after
    .to(), and a col changed by its owner later gave wrong outputs."""
    layer, source = _layer(), _layer(OTHER, seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    spread = torch.zeros(2 * state["col"].numel(), dtype=torch.int32)
    spread[::2] = state["col"]
    state["col"] = spread[::2]  # not contiguous
    layer.load_state_dict(state, assign=True)
    assert layer.col is layer._structure.col and layer.rowptr is layer._structure.rowptr
    state["col"].zero_()  # the caller reuses its tensor
    state["rowptr"].zero_()
    layer, source = layer.double(), source.double()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), source(x))
    assert torch.equal(layer.col, source.col) and torch.equal(layer.rowptr, source.rowptr)


def test_to_empty_keeps_the_structure():
    """to_empty() left rowptr/col uninitialized: the next forward failed in the kernel's
    rowptr check (its column indices, which the kernels trust, were garbage too)."""
    layer = _layer()
    before = snapshot(layer)
    layer.to_empty(device="cpu")
    assert torch.equal(layer.mask, MASK)
    assert torch.equal(layer.rowptr, before["rowptr"]) and torch.equal(layer.col, before["col"])
    assert layer(torch.randn(2, 4)).shape == (2, 3)
    layer.load_state_dict(before)  # the usual next step: values and bias loaded
    assert unchanged(layer, before)


@pytest.mark.parametrize("how", ["load_state_dict", "set_structure"])
def test_structure_change_under_inference_mode_keeps_the_layer_trainable(how):
    layer = _layer()
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with torch.inference_mode():
        if how == "load_state_dict":
            layer.load_state_dict(_layer(OTHER | MASK, seed=1).state_dict())
            optimizer.state.pop(layer.values)
        else:
            layer.set_structure(OTHER | MASK, optimizer)
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert layer.nnz == int((OTHER | MASK).sum()) and not layer.values.is_inference()


# -- ActivationSparseLinear -------------------------------------------------------------------


def _pruned_linear() -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight[linear.weight.abs() < 0.1] = 0
    return linear


@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_activation_layer_cast_with_to_takes_the_new_dtype(kernel, dtype):
    """Its dtype stayed the old one: inputs of either dtype failed in a kernel."""
    linear = _pruned_linear()
    layer = ActivationSparseLinear.from_linear(linear, 0.0, kernel=kernel)
    x = torch.randn(3, 16)
    layer(x[0])  # binds the kernel's arguments
    layer = layer.to(dtype)
    assert layer.dtype == dtype
    reference = linear.to(dtype)
    for rows in (x[:1], x):
        torch.testing.assert_close(layer(rows.to(dtype)), reference(rows.to(dtype)))
        assert layer(rows).dtype == torch.float32  # the old dtype still runs, in PyTorch


@pytest.mark.parametrize("kernel", ["act_gemv", "act_bitmap_qgemv"])
def test_activation_int8_layer_cast_with_to_keeps_float32_scales(kernel):
    """The scales were cast (and rounded) too; the kernels read float32 scales only."""
    layer = ActivationSparseLinear.from_linear(_pruned_linear(), 0.0, kernel=kernel,
                                               value_dtype=torch.int8)
    scales, x = layer.scales.clone(), torch.randn(16)
    y = layer(x)
    layer = layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)
    torch.testing.assert_close(layer(x.bfloat16()).float(), y, atol=0.05, rtol=0.05)
    torch.testing.assert_close(layer(x), y, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
def test_activation_load_with_assign_of_non_contiguous_tensors_runs(kernel):
    """assign=True made the buffers the state's tensors: the next forward failed in the
    kernel ("must be a contiguous ... tensor")."""
    source = ActivationSparseLinear.from_linear(_pruned_linear(), 0.1, kernel=kernel)
    layer = ActivationSparseLinear.from_linear(_pruned_linear(), 0.5, kernel=kernel)
    state = {k: torch.stack([v, torch.zeros_like(v)], -1)[..., 0]  # the same values, strided
             for k, v in source.state_dict().items()}
    assert not all(t.is_contiguous() for t in state.values())
    layer.load_state_dict(state, assign=True)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x[0]), source(x[0])) and torch.equal(layer(x), source(x))


@pytest.mark.parametrize("kernel, shape", [("act_gemv", (16,)), ("act_sparse_gemv", (3, 16)),
                                           ("act_bitmap_gemv", (16,))])
def test_activation_forward_on_the_meta_device_is_named(kernel, shape):
    """A layer and input moved to the meta device failed in nonzero() (NotImplementedError);
    the multi-row dense product, which needs no values, still gives the output's shape."""
    layer = ActivationSparseLinear.from_linear(_pruned_linear(), 0.1, kernel=kernel).to("meta")
    with pytest.raises(ValueError, match="x is on the meta device"):
        layer(torch.randn(shape, device="meta"))
    if kernel == "act_gemv":
        assert layer(torch.randn(3, 16, device="meta")).shape == (3, 8)


@pytest.mark.parametrize("module", [nn.Embedding(10, 4), nn.ReLU()])
def test_activation_from_linear_refuses_other_modules(module):
    before = snapshot(module)
    with pytest.raises(ArgumentTypeError, match=f"linear must be an nn.Linear, got "
                                                f"{type(module).__name__}"):
        ActivationSparseLinear.from_linear(module, 0.1)
    assert unchanged(module, before)


# -- remove_dead_neurons, to_graph ------------------------------------------------------------


def _mlp(first: nn.Linear | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(first or nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                          nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[2].weight[:, 2] = 0
    return model


class _Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_remove_dead_neurons_refuses_a_linear_subclass_that_overrides_forward():
    """It was rebuilt as a plain nn.Linear: the outputs changed silently."""
    model = _mlp(_Doubled(4, 6))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model.0 \(_Doubled\) overrides nn.Linear.forward"):
        remove_dead_neurons(model)
    assert unchanged(model, before)


def _shared(kind: str) -> nn.Module:
    model = _mlp()
    if kind == "layer used twice":
        square = nn.Linear(6, 6)
        return nn.Sequential(model[0], nn.ReLU(), square, nn.ReLU(), square)
    if kind == "tied weights":
        tied = nn.Linear(6, 5)
        tied.weight = model[2].weight
        return nn.Sequential(*model[:4], nn.Linear(5, 6), nn.ReLU(), tied)
    # an embedding before the chain tied to its last layer
    head = nn.Linear(6, 10)
    embedding = nn.Embedding(10, 6)
    embedding.weight = head.weight
    return nn.Sequential(embedding, nn.Linear(6, 6), nn.ReLU(), head)


@pytest.mark.parametrize("kind, match", [
    ("layer used twice", r"model.2.weight is also model.4.weight"),
    ("tied weights", r"model.2.weight is also model.6.weight"),
    ("tied to a module outside the chain", r"model.3.weight is also model.0.weight"),
])
def test_remove_dead_neurons_refuses_shared_layers_and_tied_weights(kind, match):
    """Each layer was rebuilt on its own: the ties came undone silently, and the copy could
    hold more weights than the original."""
    model = _shared(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match + r" \(a layer used twice or tied weights\)"):
        remove_dead_neurons(model)
    assert unchanged(model, before)


@pytest.mark.parametrize("build, match", [
    (lambda: _mlp().to("meta"), "model.0.weight is on the meta device"),
    (lambda: LeNet300100().to("meta"), "model.fc1.weight is on the meta device"),
])
def test_remove_dead_neurons_names_a_meta_layer(build, match):
    with pytest.raises(ValueError, match=match):
        remove_dead_neurons(build())


@pytest.mark.parametrize("call, param", [(to_graph, "model_or_masks"),
                                         (structure_features, "model_or_graph")])
def test_graph_of_a_meta_model_names_the_weight(call, param):
    # each names its own parameter (structure_features said model_or_masks until session 40)
    with pytest.raises(ValueError, match=f"{param}: weight '0.weight' is on the meta device"):
        call(_mlp().to("meta"))
