"""Hostile inputs, round 17: the compiled kernels' Python surface (the ``torch.ops.sparsekit``
fakes, the compressed formats, ``SparseLinear`` and ``ActivationSparseLinear``).

- the fake (meta) implementations of the ops took what the ops refuse (an ``x`` of float64,
  a transposed ``x``, ``threads=0``, a bias of the wrong length, float16 values, ...): under
  ``FakeTensorMode`` (``torch.compile`` / ``torch.export``) such a call traced into a graph
  of the wrong dtype, which only failed when run; each fake now refuses it, naming the
  argument, and still agrees with the op on every accepted call;
- ``from_state`` and ``load_state_dict`` of a native or torch CSR format with tensors on the
  meta device failed inside ``Tensor.item()`` (or "not on the expected device") with a raw
  ``RuntimeError``; the buffer is named, and a load changes nothing;
- ``from_dense`` of such a format with a weight (or mask) on the meta device failed inside
  ``nonzero`` with a raw ``NotImplementedError``;
- ``TorchCSR.matmul`` of an ``x`` of another dtype than its values (float16, bfloat16,
  float64, int) or on another device (meta) failed inside torch's sparse product with a raw
  ``RuntimeError`` / ``NotImplementedError``;
- a ``bias`` on the meta device given to a native format's ``matmul`` was the op's
  ``RuntimeError`` about devices, naming no argument;
- a ``bias`` that requires grad given to a native format's ``matmul`` got no gradient, torch
  only warning that the op has no autograd kernel: its backward now raises, as an ``x`` that
  requires grad already did;
- a (tampered) BSR state with a NaN or inf in the padding of an edge block loaded, and the
  product turned real outputs NaN where ``to_dense`` (cropped) and the reference were
  finite;
- ``ActivationSparseLinear`` built from a weight on the meta device failed inside
  ``nonzero`` (weight-sparse kernels) or built a layer that holds no weights (``act_gemv``);
  a meta threshold or int8 scales failed inside ``Tensor.item()``, and a meta bias was kept
  for the first product to fail in the op with a raw ``RuntimeError``;
- ``ActivationSparseLinear.load_state_dict`` of meta tensors failed inside ``Tensor.item()``;
- ``ActivationSparseLinear`` without inputs (``in_features=0``) took every ``x`` as one
  decode row: several rows were a raw ``RuntimeError`` of ``view`` / ``reshape``;
- a format without inputs (``in_features=0``: torch CSR, and the torch fallback of the native
  formats where the kernels are missing) failed in ``reshape(-1, 0)`` for any ``x``;
- a (tampered) CSR16, torch CSR, fan-in or BSR state with a column (block) twice in a row
  loaded: the kernels added both values where ``to_dense`` kept one, so the product and the
  dense weight disagreed without a word; columns must increase within each row, as
  ``from_dense`` stores them (and ``SparseLinear`` requires);
- ``SparseLinear.load_state_dict`` of another structure with ``values`` (or ``bias``) on the
  meta device installed the structure, zeroed the values and copied the bias before torch's
  copy failed: a partial mutation;
- ``SparseLinear``'s second derivative (``create_graph=True``, a Hessian-vector product)
  came back as zeros: the kernels have no derivative; it is refused.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import needs_kernels
from _state import snapshot, unchanged
from torch import nn
from torch._subclasses import FakeTensorMode

from sparsekit.engine import kernels
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.formats import FORMATS, Format
from sparsekit.engine.sparse_linear import SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")

OUT, IN = 8, 32
META = torch.device("meta")


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g)
    return w * (w.abs() > 0.5)


# -- the fakes refuse what the ops refuse -------------------------------------------------


def _ops_cases() -> list[tuple[str, str, object]]:
    """(id, the argument named, a function building (op, args)) the real op refuses."""
    ops = torch.ops.sparsekit

    def csr(**change):  # noqa: ANN202
        f = FORMATS["csr16"].from_dense(_weight())
        args = dict(values=f.values, col_indices=f.col_indices, rowptr=f.rowptr,
                    x=torch.randn(3, IN), bias=None, in_features=IN, threads=1, scales=None)
        args.update(change)
        return ops.csr_linear, tuple(args.values())

    def bitmap(**change):  # noqa: ANN202
        f = FORMATS["bitmap"].from_dense(_weight())
        args = dict(values=f.bitmap_values, bitmap=f.bitmap_mask, rowptr=f.bitmap_rowptr,
                    x=torch.randn(3, IN), bias=None, in_features=IN, threads=1, scales=None)
        args.update(change)
        return ops.bitmap_linear, tuple(args.values())

    def act(**change):  # noqa: ANN202
        args = dict(wt=torch.randn(IN, OUT), x=torch.randn(IN), threshold=torch.zeros(IN),
                    bias=None, threads=1, scales=None)
        args.update(change)
        return ops.act_gemv, tuple(args.values())

    def spmm(**change):  # noqa: ANN202
        f = FORMATS["csr16"].from_dense(_weight())
        args = dict(rowptr=f.rowptr, col=f.col_indices.int(), values=f.values, perm=None,
                    xt=torch.randn(IN, 3), bias=None, in_features=IN, threads=1)
        args.update(change)
        return ops.spmm_rows, tuple(args.values())

    q = torch.randn(1, 2, 16, 8)
    one = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    return [
        ("csr x float64", "x", lambda: csr(x=torch.randn(3, IN, dtype=torch.float64))),
        ("csr x transposed", "x", lambda: csr(x=torch.randn(IN, 3).t())),
        ("csr threads 0", "threads", lambda: csr(threads=0)),
        ("csr bias length", "bias", lambda: csr(bias=torch.zeros(OUT - 1))),
        ("csr values float16", "values", lambda: csr(values=csr()[1][0].half())),
        ("csr rowptr int64", "rowptr", lambda: csr(rowptr=csr()[1][2].long())),
        ("csr int8 without scales", "scales",
         lambda: csr(values=csr()[1][0].to(torch.int8))),
        ("bitmap width", "bitmap", lambda: bitmap(bitmap=bitmap()[1][1][:, :1].contiguous())),
        ("bitmap scales float values", "scales", lambda: bitmap(scales=torch.ones(OUT))),
        ("act_gemv x 2-D", "x", lambda: act(x=torch.randn(2, IN))),
        ("act_gemv x bf16 on fp32 weights", "x", lambda: act(x=torch.randn(IN).bfloat16(),
                                                               threshold=torch.zeros(IN))),
        ("act_threshold float64", "x",
         lambda: (ops.act_threshold, (torch.randn(3, IN, dtype=torch.float64),
                                      torch.zeros(IN, dtype=torch.float64)))),
        ("spmm_rows xt bf16", "xt", lambda: spmm(xt=torch.randn(IN, 3).bfloat16())),
        ("spmm_rows values dtype", "values", lambda: spmm(xt=torch.randn(IN, 3).double())),
        ("attention float64", "q",
         lambda: (ops.block_sparse_attention, (q.double(), q.double(), q.double(), one, False,
                                               16, 0.5, 1))),
        ("attention v shape", "v",
         lambda: (ops.block_sparse_attention, (q, q, torch.randn(1, 2, 16, 4), one, False, 16,
                                               0.5, 1))),
    ]


def _fake_call(op, args):  # noqa: ANN001, ANN202
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        return op(*fakes)


@needs_kernels
@pytest.mark.parametrize("case", _ops_cases(), ids=lambda c: c[0])
def test_fake_refuses_what_the_op_refuses(case):
    _, name, build = case
    op, args = build()
    with pytest.raises(RuntimeError, match=name):
        op(*args)
    with pytest.raises(RuntimeError, match=name):
        _fake_call(op, args)


@needs_kernels
@pytest.mark.parametrize("name", ["csr16", "bitmap", "bsr", "dense_lowp"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fake_agrees_with_the_op_on_accepted_calls(name, x_dtype):
    for value_dtype in FORMATS[name].value_dtypes:
        f = FORMATS[name].from_dense(_weight(), value_dtype=value_dtype)
        op, tensors, ints = f._operands()
        for shape in [(3, IN), (IN,), (2, 2, IN), (0, IN)]:
            args = (*tensors, torch.randn(*shape, dtype=x_dtype), torch.randn(OUT), *ints, 2,
                    *f.scale_args())
            real, fake = op(*args), _fake_call(op, args)
            assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


@needs_kernels
def test_fakes_keep_a_dynamic_batch_symbolic():
    """The checked fakes (and the rows of a format's checked product) guard no size of ``x``
    to its example's value: ``torch.export`` with a dynamic batch still works."""

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = FORMATS["bitmap"].from_dense(_weight())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f.matmul(x)

    model = Wrapped()
    program = torch.export.export(model, (torch.randn(5, IN),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    x = torch.randn(7, IN)
    torch.testing.assert_close(program.module()(x), model(x))


# -- meta tensors in formats ---------------------------------------------------------------


FORMAT_NAMES = ("torch_csr", "csr16", "bitmap", "bsr")


@needs_kernels
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_format_state_on_meta_is_named(name):
    f = FORMATS[name].from_dense(_weight())
    state = {k: v.to(META) for k, v in f.state_dict().items()}
    with pytest.raises(ValueError, match="buffer '.*' is on the meta device"):
        FORMATS[name].from_state(state, (OUT, IN))
    before = snapshot(f)
    with pytest.raises(RuntimeError, match="is on the meta device"):
        f.load_state_dict(state)
    assert unchanged(f, before)


@needs_kernels
@pytest.mark.parametrize("name", (*FORMAT_NAMES, "fanin", "nm"))
def test_format_from_dense_of_meta_is_named(name):
    with pytest.raises(ValueError, match="weight is on the meta device"):
        FORMATS[name].from_dense(_weight().to(META))
    with pytest.raises(ValueError, match="mask is on the meta device"):
        FORMATS[name].from_dense(_weight(), torch.ones(OUT, IN, dtype=torch.bool, device=META))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_torch_csr_refuses_x_of_another_dtype(dtype):
    f = FORMATS["torch_csr"].from_dense(_weight())
    with pytest.raises(TypeError, match=rf"x must have the values' dtype torch.float32.*{dtype}"):
        f.matmul(torch.ones(3, IN, dtype=dtype))


def test_torch_csr_refuses_x_and_bias_on_another_device():
    f = FORMATS["torch_csr"].from_dense(_weight())
    with pytest.raises(ValueError, match="x must be on the values' device cpu.*meta"):
        f.matmul(torch.ones(3, IN, device=META))
    with pytest.raises(ValueError, match="bias must be on the values' device cpu.*meta"):
        f.matmul(torch.ones(3, IN), torch.zeros(OUT, device=META))


@needs_kernels
@pytest.mark.parametrize("name", ["csr16", "bitmap", "bsr"])
def test_native_format_refuses_bias_on_meta(name):
    f = FORMATS[name].from_dense(_weight())
    with pytest.raises(ValueError, match=f"bias must be on the CPU for the {name} kernel, got "
                                         "meta"):
        f.matmul(torch.ones(3, IN), torch.zeros(OUT, device=META))


@needs_kernels
@pytest.mark.parametrize("name", ["csr16", "bitmap", "bsr"])
def test_native_format_bias_that_requires_grad_refuses_backward(name):
    """The ops have no backward: a trainable bias got no gradient, torch only warning."""
    f = FORMATS[name].from_dense(_weight())
    bias = torch.zeros(OUT, requires_grad=True)
    x = torch.randn(3, IN)
    y = f.matmul(x, bias)
    torch.testing.assert_close(y, f.matmul(x) + bias.detach())
    with pytest.raises(ValueError, match=f"the {name} kernel has no backward"):
        y.sum().backward()
    assert bias.grad is None


# -- BSR padding -----------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_bsr_state_with_values_in_the_padding_is_refused(poison):
    w = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    f = FORMATS["bsr"].from_dense(w, block=(4, 4))
    x = torch.randn(2, 6)
    torch.testing.assert_close(f.matmul(x), x @ w.T)
    state = {k: v.clone() for k, v in f.state_dict().items()}
    edge = int((state["bsr_col_indices"].long() == 1).nonzero()[0])  # columns 4..7 of 6
    state["bsr_values"][edge, 0, 2] = poison  # column 6: padding
    with pytest.raises(ValueError, match="bsr_values must be zero in the padding"):
        FORMATS["bsr"].from_state(state, (5, 6))
    before = snapshot(f)
    with pytest.raises(RuntimeError, match="bsr_values must be zero in the padding"):
        f.load_state_dict(state)
    assert unchanged(f, before)
    torch.testing.assert_close(f.matmul(x), x @ w.T)


def _twice(name: str) -> tuple[Format, dict[str, torch.Tensor], str]:
    """A format ``name`` and its state with one column (block) twice in the first row."""
    if name == "bsr":
        f = FORMATS[name].from_dense(torch.randn(8, 16), block=(4, 4))
        key, message = "bsr_col_indices", "bsr_col_indices must increase"
    else:
        w = torch.zeros(2, 8)
        w[0, [3, 5]] = torch.tensor([1.0, 2.0])
        w[1, [1, 2]] = 1.0
        f = FORMATS[name].from_dense(w)
        key = "fanin_col_indices" if name == "fanin" else "col_indices"
        message = f"{key if name == 'fanin' else 'column indices'} must increase"
    state = {k: v.clone() for k, v in f.state_dict().items()}
    state[key].view(-1)[1] = state[key].view(-1)[0]
    return f, state, message


@needs_kernels
@pytest.mark.parametrize("name", ["csr16", "torch_csr", "fanin", "bsr"])
def test_state_with_a_column_twice_is_refused(name):
    """The kernels added both values of a repeated column where ``to_dense`` kept one: the
    product and the dense weight disagreed without a word."""
    f, state, message = _twice(name)
    with pytest.raises(ValueError, match=message):
        FORMATS[name].from_state(state, (f.out_features, f.in_features))
    before = snapshot(f)
    with pytest.raises(RuntimeError, match=message):
        f.load_state_dict(state)
    assert unchanged(f, before)


# -- ActivationSparseLinear ------------------------------------------------------------------


KERNELS = ("act_gemv", "act_sparse_gemv", "act_bitmap_gemv")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("meta", ["weight", "threshold", "bias", "scales"])
def test_activation_layer_of_meta_arguments_is_named(kernel, meta):
    int8 = meta == "scales"
    args = {"weight": _weight().to(torch.int8) if int8 else _weight(), "bias": torch.zeros(OUT),
            "threshold": torch.full((IN,), 0.1), "scales": torch.ones(OUT) if int8 else None}
    args[meta] = args[meta].to(META)
    with pytest.raises(ValueError, match=f"{meta} is on the meta device"):
        ActivationSparseLinear(args["weight"], args["bias"], args["threshold"], kernel=kernel,
                               scales=args["scales"])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("key", ["all", "threshold"])
def test_activation_layer_load_of_meta_is_named(kernel, key):
    layer = ActivationSparseLinear(_weight(), torch.zeros(OUT), 0.1, kernel=kernel)
    state = layer.state_dict()
    state = {k: v.to(META) if key in ("all", k) else v for k, v in state.items()}
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="is on the meta device"):
        layer.load_state_dict(state)
    assert unchanged(layer, before)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(2, 0), (0, 0), (2, 3, 0), (1, 0), (0,)])
def test_activation_layer_without_inputs_takes_any_rows(kernel, shape):
    bias = torch.randn(OUT)
    layer = ActivationSparseLinear(torch.randn(OUT, 0), bias, 0.1, kernel=kernel)
    y = layer(torch.randn(*shape))
    assert y.shape == (*shape[:-1], OUT)
    assert bool((y == bias).all())


@pytest.mark.parametrize("name", ["torch_csr", "csr16", "bitmap", "bsr", "fanin"])
@pytest.mark.parametrize("shape", [(0,), (2, 3, 0)])
def test_format_without_inputs_takes_any_rows(name, shape, monkeypatch):
    f = FORMATS[name].from_dense(torch.zeros(OUT, 0))
    # native formats: the torch fallback of a layer loaded where the kernels cannot be built
    monkeypatch.setattr(kernels, "load", lambda: None)
    bias = torch.randn(OUT)
    y = f.matmul(torch.randn(*shape), bias)
    assert y.shape == (*shape[:-1], OUT)
    assert bool((y == bias).all())


# -- SparseLinear ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["values", "bias"])
def test_sparse_linear_load_of_meta_changes_nothing(key):
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(IN, OUT), _weight() != 0)
    other = SparseLinear.from_linear(nn.Linear(IN, OUT), _weight(1) != 0)  # another structure
    state = dict(other.state_dict())
    state[key] = state[key].to(META)
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match=f"{key} is on the meta device"):
        layer.load_state_dict(state)
    assert unchanged(layer, before)
    x = torch.randn(2, IN)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_sparse_linear_refuses_a_second_derivative(use_kernels, monkeypatch):
    from sparsekit.engine import sparse_linear

    if not use_kernels:
        monkeypatch.setattr(sparse_linear, "_use_kernels", lambda t: False)
    torch.manual_seed(0)
    layer = SparseLinear.from_linear(nn.Linear(6, 4).double(), torch.rand(4, 6) > 0.4)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    grad_values, grad_x = torch.autograd.grad(layer(x).square().sum(), (layer.values, x),
                                              create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (grad_values.square().sum() + grad_x.sum()).backward()
    # first derivatives are unchanged: the dense masked reference
    dense = nn.Linear(6, 4).double()
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
    x2 = x.detach().clone().requires_grad_()
    dense(x2).square().sum().backward()
    torch.testing.assert_close(grad_x, x2.grad)
    torch.testing.assert_close(grad_values, dense.weight.grad[layer.mask])


def test_entry_rows_gives_each_entrys_row_and_names_the_callers_tensors():
    from sparsekit.engine.formats.csr import entry_rows

    rowptr = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    rows = entry_rows(rowptr, torch.tensor([1, 3, 0], dtype=torch.int32), 3, 4)
    assert rows.tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match=r"^bsr_col_indices must increase within each block "
                                         r"row \(no block twice\)$"):
        entry_rows(rowptr, torch.tensor([3, 3, 0], dtype=torch.int32), 3, 4,
                   pointers="bsr_rowptr", indices="bsr_col_indices", entries="blocks",
                   row="block row", entry="block")
    with pytest.raises(ValueError, match=r"^row pointers must rise from 0 to the number of "
                                         r"values$"):
        entry_rows(rowptr, torch.tensor([1, 3], dtype=torch.int32), 2, 4)
    with pytest.raises(ValueError, match=r"^column indices must lie in \[0, 4\)$"):
        entry_rows(rowptr, torch.tensor([1, 4, 0], dtype=torch.int32), 3, 4)
