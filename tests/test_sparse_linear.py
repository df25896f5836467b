"""SparseLinear: sparse forward/backward equal the masked dense layer, and it trains the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit._checks import ArgumentTypeError
from sparsekit.engine import sparse_linear as st
from sparsekit.engine.sparse_linear import SparseLinear


def _layer(
    in_f: int, out_f: int, density: float, *, bias: bool = True, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Linear, torch.Tensor, SparseLinear]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    mask = torch.rand(out_f, in_f, generator=g) < density
    if out_f > 2:
        mask[1] = False  # an empty row
    if in_f > 3:
        mask[:, 2] = False  # an empty column
    return linear, mask, SparseLinear.from_linear(linear, mask)


def _reference(linear: nn.Linear, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = (linear.weight.detach() * mask).requires_grad_()
    b = None if linear.bias is None else linear.bias.detach().clone().requires_grad_()
    return w, b


@pytest.mark.parametrize("shape", [(37, 23), (64, 1), (1, 17), (128, 96)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5])
def test_forward_and_grads_match_masked_dense(backend, shape, density) -> None:
    in_f, out_f = shape
    linear, mask, layer = _layer(in_f, out_f, density)
    x = torch.randn(9, in_f, requires_grad=True)
    w, b = _reference(linear, mask)
    y, ref = layer(x), F.linear(x, w, b)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    dx, dv, db = torch.autograd.grad(y, (x, layer.values, layer.bias), g)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv, dw_ref[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, db_ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64(backend) -> None:
    _, _, layer = _layer(7, 5, 0.5, dtype=torch.float64)
    s = layer._structure
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    fn = st._SparseLinearFunction.apply
    assert torch.autograd.gradcheck(lambda x, v, b: fn(x, v, b, s, None), (x, v, b))
    assert torch.autograd.gradcheck(lambda x, v: fn(x, v, None, s, None), (x, v))


def test_batched_input_and_no_bias(backend) -> None:
    linear, mask, layer = _layer(12, 6, 0.4, bias=False)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x), F.linear(x, linear.weight * mask), atol=1e-5, rtol=1e-5)
    assert layer(x).shape == (2, 3, 6)


def test_fully_pruned_layer_and_single_output(backend) -> None:
    linear, mask, layer = _layer(10, 4, 0.0)
    assert layer.nnz == 0
    x = torch.randn(3, 10, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, linear.bias.detach().expand(3, 4))
    y.sum().backward()
    assert layer.values.grad.shape == (0,)
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
    linear, mask, layer = _layer(10, 1, 1.0)
    ref = F.linear(x, linear.weight * mask, linear.bias)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def _mlp(layers: list[nn.Module]) -> nn.Sequential:
    return nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_training_matches_masked_dense(backend, opt_cls) -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(20, 32), nn.Linear(32, 16), nn.Linear(16, 3)]
    masks = [torch.rand(lin.weight.shape) < 0.3 for lin in linears]
    dense = _mlp([nn.Linear(lin.in_features, lin.out_features) for lin in linears])
    for d, lin in zip(dense[::2], linears):
        d.load_state_dict(lin.state_dict())
    names = [f"{i}.weight" for i in (0, 2, 4)]
    mask_set = sparsekit.MaskSet(dense, dict(zip(names, masks)))
    sparse = _mlp([SparseLinear.from_linear(lin, m) for lin, m in zip(linears, masks)])
    kwargs = {"lr": 1e-2} | ({"momentum": 0.9} if opt_cls is torch.optim.SGD else {})
    opt_d, opt_s = opt_cls(dense.parameters(), **kwargs), opt_cls(sparse.parameters(), **kwargs)
    mask_set.attach(opt_d)
    x, y = torch.randn(16, 20), torch.randint(0, 3, (16,))
    for _ in range(5):
        losses = []
        for model, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4
    for d, s in zip(dense[::2], sparse[::2]):
        torch.testing.assert_close(s.to_dense(), d.weight.detach(), atol=1e-5, rtol=1e-5)


def test_set_structure_keeps_survivors_and_remaps_optimizer_state() -> None:
    linear, mask, layer = _layer(16, 8, 0.5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 16)).sum().backward()
    opt.step()
    before = layer.to_dense()
    state_before = {k: v.clone() for k, v in opt.state[layer.values].items()}
    new = torch.rand(8, 16) < 0.5
    values = layer.values
    layer.set_structure(new, opt)
    assert layer.values is values  # the optimizer keeps the same parameter object
    assert torch.equal(layer.mask, new)
    torch.testing.assert_close(layer.to_dense(), before * new)  # survivors kept, new ones 0
    dense_avg = torch.zeros(8, 16)
    dense_avg[mask] = state_before["exp_avg"]
    state = opt.state[layer.values]
    assert state["exp_avg"].shape == layer.values.shape
    torch.testing.assert_close(state["exp_avg"], (dense_avg * new)[new])
    layer(torch.randn(4, 16)).sum().backward()  # and training goes on
    opt.step()


def test_to_linear_round_trip() -> None:
    linear, mask, layer = _layer(11, 7, 0.3)
    back = layer.to_linear()
    torch.testing.assert_close(back.weight, linear.weight.detach() * mask)
    torch.testing.assert_close(back.bias, linear.bias)
    again = SparseLinear.from_linear(back)
    assert torch.equal(again.mask, mask & (linear.weight != 0))
    torch.testing.assert_close(again.values, layer.values)


def test_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"mask has shape \(4, 3\), expected \(3, 4\)"):
        SparseLinear(4, 3, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(1, 1, 1))  # type: ignore[arg-type]
    layer = SparseLinear(4, 3, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="in_features=4"):
        layer(torch.randn(2, 5))


def test_exported() -> None:
    assert sparsekit.SparseLinear is SparseLinear


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_bias_of_another_dtype_is_named_before_the_product(dtype):
    """A bias assigned in another dtype than the values failed inside the kernel ("bias must
    be Float, got Double") or PyTorch's index_add_."""
    layer = SparseLinear.from_linear(nn.Linear(6, 4), torch.rand(4, 6) < 0.5)
    layer.bias = nn.Parameter(layer.bias.detach().to(dtype))
    with pytest.raises(ArgumentTypeError, match=rf"bias must have the weight's dtype "
                                                rf"torch.float32, got {dtype}"):
        layer(torch.randn(2, 6))
