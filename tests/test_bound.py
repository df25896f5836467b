"""Bound kernel arguments (sparsekit.engine.bound): NativeFormat.matmul and
ActivationSparseLinear's decode step call the op's C++ entry with arguments bound once. They
must give the checked path's bits, follow the buffers wherever they are replaced, hand every
input they do not take as it is to the checked path (which converts or raises), and stay
out of torch.compile's way."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from _kernels import needs_kernels

from sparsekit.engine import CompiledLinear
from sparsekit.engine.activation_linear import KERNELS, ActivationSparseLinear
from sparsekit.engine.formats import FORMATS

pytestmark = needs_kernels

# (format, from_dense options): every native format, int8 values and W8A8 included
CASES = [
    ("csr16", {}), ("bitmap", {}), ("nm", {}), ("bsr", {}), ("fanin", {}),
    ("dense_lowp", {"value_dtype": torch.bfloat16}),
    ("bitmap", {"value_dtype": torch.int8}),
    ("bitmap", {"value_dtype": torch.int8, "activation_dtype": torch.int8}),
    ("nm", {"value_dtype": torch.int8, "activation_dtype": torch.int8}),
    ("dense_lowp", {"value_dtype": torch.int8, "activation_dtype": torch.int8}),
]


def _weight(rows: int = 24, cols: int = 40, seed: int = 0) -> torch.Tensor:
    """2:4 (so that every format holds it): the first two of each group of four kept."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[:, 2::4] = 0
    w[:, 3::4] = 0
    return w


def _format(name: str, options: dict, w: torch.Tensor | None = None):
    return FORMATS[name].from_dense(_weight() if w is None else w, **options)


@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.parametrize("shape", [(40,), (1, 1, 40), (3, 40), (2, 5, 40)])
def test_direct_call_gives_the_checked_paths_bits(name, options, shape):
    fmt = _format(name, options)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(24)
    y = fmt.matmul(x, bias)
    assert "_bound" in fmt.__dict__  # the direct call ran
    assert torch.equal(y, fmt._checked_matmul(x, bias))
    assert y.shape == (*shape[:-1], 24)


@pytest.mark.parametrize("name,options", CASES)
def test_direct_call_uses_the_checked_paths_thread_count(name, options, monkeypatch):
    fmt = _format(name, options)
    fmt.matmul(torch.randn(1, 40))
    op, *rest = fmt.__dict__["_bound"]
    seen = []

    def spy(*args):
        seen.append(args[len(rest[0]) + 2 + len(rest[1])])  # tensors, x, bias, ints, threads
        return op(*args)

    fmt.__dict__["_bound"] = (spy, *rest)
    for threads in (1, 2, 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        for rows in (1, 3, 64, 700):
            fmt.matmul(torch.randn(rows, 40))
            assert seen[-1] == fmt._threads(rows)


@pytest.mark.parametrize("replace", ["_apply", "setattr", "register_buffer", "load assign"])
def test_bound_arguments_follow_replaced_buffers(replace):
    """After the buffers are replaced the product is the new weight's, even if the old
    tensors change afterwards."""
    fmt = _format("bitmap", {"value_dtype": torch.int8, "activation_dtype": torch.int8})
    other = _format("bitmap", {"value_dtype": torch.int8, "activation_dtype": torch.int8},
                    -_weight())  # the same nonzeros
    x = torch.randn(2, 40)
    fmt.matmul(x)  # binds the old buffers
    old = dict(fmt._buffers)
    if replace == "_apply":
        fmt._apply(torch.clone)
        expected = fmt._checked_matmul(x, None)
    else:
        state = {k: v.clone() for k, v in other.state_dict().items()}
        if replace == "setattr":
            for k, v in state.items():
                setattr(fmt, k, v)
        elif replace == "register_buffer":
            for k, v in state.items():
                fmt.register_buffer(k, v)
        else:
            fmt.load_state_dict(state, assign=True)
        expected = other.matmul(x)
    for t in old.values():
        t.zero_()
    assert torch.equal(fmt.matmul(x), expected)


def test_load_state_dict_in_place_keeps_the_binding_right():
    fmt = _format("csr16", {})
    other = _format("csr16", {}, -_weight())  # the same nonzeros
    x = torch.randn(2, 40)
    fmt.matmul(x)
    fmt.load_state_dict(other.state_dict())  # copies into the bound tensors
    assert torch.equal(fmt.matmul(x), other.matmul(x))


def test_copies_and_pickles_carry_no_binding():
    layer = CompiledLinear(_format("bitmap", {}), torch.randn(24))
    x = torch.randn(3, 40)
    y = layer(x)
    assert "_bound" in layer.format.__dict__
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert "_bound" not in twin.format.__dict__
        twin.format._buffers["bitmap_values"].zero_()  # its own buffers, not the original's
        assert torch.equal(layer(x), y)
        assert torch.equal(twin(x), twin.format._checked_matmul(x, twin.bias))


@pytest.mark.parametrize("name,options", CASES[:3])
def test_inputs_the_op_does_not_take_as_they_are_go_the_checked_way(name, options):
    fmt = _format(name, options)
    x = torch.randn(40, 3).T  # not contiguous
    ref = fmt.matmul(x.contiguous())
    assert torch.equal(fmt.matmul(x), ref)
    assert torch.equal(fmt.matmul(x.double()), ref)  # converted to float32
    bias = torch.randn(24, dtype=torch.float64)
    assert torch.equal(fmt.matmul(x, bias), fmt.matmul(x, bias.float()))
    with pytest.raises(ValueError, match=r"in_features=40"):
        fmt.matmul(torch.randn(3, 39))
    with pytest.raises(ValueError, match="shape"):
        fmt.matmul(torch.tensor(1.0))
    with pytest.raises(ValueError, match="on the CPU"):
        fmt.matmul(torch.randn(3, 40, device="meta"))
    with pytest.raises(TypeError, match="floating-point"):
        fmt.matmul(torch.ones(3, 40, dtype=torch.int32))


def test_torch_compile_traces_a_layer_already_called_eagerly():
    layer = CompiledLinear(_format("bitmap", {"value_dtype": torch.int8,
                                              "activation_dtype": torch.int8}), torch.randn(24))
    x = torch.randn(3, 40)
    y = layer(x)  # binds
    torch._dynamo.reset()  # other tests' graphs of the same forward count to its recompile limit
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), y)
    exported = torch.export.export(layer, (x,))
    assert torch.equal(exported.module()(x), y)


# -- ActivationSparseLinear: one input row -----------------------------------------------


def _activation(kernel: str, dtype: torch.dtype = torch.float32, sign: float = 1.0):
    linear = torch.nn.Linear(40, 24).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(sign * _weight())
    return ActivationSparseLinear.from_linear(
        linear, 0.3, kernel=kernel,
        value_dtype=torch.int8 if kernel == "act_bitmap_qgemv" else None)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40,), (1, 40), (1, 1, 40)])
def test_decode_step_gives_the_checked_gemvs_bits(kernel, dtype, shape):
    layer = _activation(kernel, dtype)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert "_bound" in layer.__dict__
    assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
    assert torch.equal(y, layer._gemv(x.reshape(-1)).view(y.shape))


@pytest.mark.parametrize("kernel", KERNELS)
def test_activation_binding_follows_replaced_buffers(kernel):
    layer, other = _activation(kernel), _activation(kernel, sign=-1.0)  # the same nonzeros
    x = torch.randn(1, 40)
    layer(x)  # binds
    old = dict(layer._buffers)
    layer.load_state_dict(other.state_dict(), assign=True)
    for t in old.values():
        if t is not None:
            t.zero_()
    assert torch.equal(layer(x), other(x))
    layer._apply(torch.clone)
    assert torch.equal(layer(x), other(x))
    assert "_bound" not in copy.deepcopy(layer).__dict__


def test_activation_inputs_it_does_not_take_go_the_checked_way():
    layer = _activation("act_bitmap_gemv")
    checked = copy.deepcopy(layer)
    checked._bind = lambda: None  # never binds: every call takes the checked way
    layer(torch.randn(1, 40))  # binds
    strided = torch.randn(40, 2).T[:1]
    assert not strided.is_contiguous()
    for x in (strided, torch.randn(1, 40, dtype=torch.float64), torch.randn(3, 40)):
        assert torch.equal(layer(x), checked(x))
    for bad in (torch.randn(1, 39), torch.randn(40, 1), torch.randn(2, 20), torch.tensor(1.0),
                torch.randn(1, 40, device="meta")):
        with pytest.raises((ValueError, TypeError)) as raised:
            checked(bad)
        with pytest.raises(raised.type, match=re.escape(str(raised.value))):
            layer(bad)


@pytest.mark.parametrize("kernel", KERNELS)
def test_activation_layer_called_eagerly_still_traces(kernel):
    layer = _activation(kernel)
    x = torch.randn(1, 40)
    y = layer(x)  # binds
    torch._dynamo.reset()  # other tests' graphs of the same forward count to its recompile limit
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="eager")(x), y)
    exported = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert f"sparsekit.{kernel}.default" in targets, targets
    assert torch.equal(exported.module()(x), y)
