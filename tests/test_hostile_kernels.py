"""Hostile inputs to the compiled layers and their kernels (issue 17, item 1).

No call may read past its input: every layer checks the width, dtype and device of ``x``
before a kernel runs (``ValueError``/``TypeError``), and every ``torch.ops.sparsekit`` op
checks the sizes, dtypes and devices of its tensors again (``RuntimeError``), so a direct
op call with mismatched tensors raises instead of reading out of bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _kernels import kernels_ok, needs_kernels
from torch import nn

from sparsekit.engine import CompiledLinear, kernels
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.formats import CSR16, FORMATS, ConstantFanIn
from sparsekit.engine.sparse_linear import SparseLinear

OUT, IN = 64, 256
NATIVE = ("csr16", "bitmap", "nm", "bsr", "fanin")
FORMAT_NAMES = ("dense", "torch_csr", *NATIVE)
# short by 1, by one bitmap word, by one N:M group, by one BSR block column; longer; 1 and 0 wide
WIDTHS = (IN - 1, IN - 16, IN - 4, IN - 8, IN + 1, IN + 16, 2 * IN, 1, 0)


def _weight(name: str, out: int = OUT, cols: int = IN, seed: int = 0) -> torch.Tensor:
    """A random weight that the format ``name`` can hold."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g)
    if name == "nm":  # 2:4
        return w * (torch.arange(cols) % 4 < 2)
    if name == "bsr":  # whole 4x8 blocks
        keep = torch.rand(-(-out // 4), -(-cols // 8), generator=g) < 0.3
        return w * keep.repeat_interleave(4, 0).repeat_interleave(8, 1)[:out, :cols]
    if name == "fanin":  # 16 inputs per row
        keep = torch.zeros(out, cols, dtype=torch.bool)
        keep.scatter_(1, torch.rand(out, cols, generator=g).argsort(1)[:, :16], True)
        return w * keep
    return w * (torch.rand(out, cols, generator=g) >= 0.9)


def _format_param(name: str):  # type: ignore[no-untyped-def]
    return pytest.param(name, marks=[needs_kernels] if name in NATIVE else [], id=name)


def _layer(name: str) -> CompiledLinear:
    linear = nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.copy_(_weight(name))
    layer = CompiledLinear.from_linear(linear, name)
    assert layer.format.name == name
    return layer


# -- compiled layers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [_format_param(n) for n in FORMAT_NAMES])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("batch", [1, 5])  # the GEMV and the batched kernels
def test_compiled_linear_rejects_wrong_width(name: str, width: int, batch: int) -> None:
    layer = _layer(name)
    for x in (torch.randn(batch, width), torch.randn(2, batch, width)):
        with pytest.raises(ValueError, match=rf"in_features={IN}\).*got shape"):
            layer(x)
    with pytest.raises(ValueError, match=f"in_features={IN}"):
        layer(torch.tensor(1.0))  # 0-d


@pytest.mark.parametrize("name", [_format_param(n) for n in FORMAT_NAMES])
def test_memory_after_x_never_reaches_the_output(name: str) -> None:
    """The red-team repro: x a view into a larger buffer whose tail changes."""
    layer = _layer(name)
    buf = torch.zeros(4, 4096)
    short = buf[:1, : IN // 2]
    with pytest.raises(ValueError, match=f"in_features={IN}"):
        layer(short)
    for rows in (1, 4):  # GEMV and batched paths, on a non-contiguous view of the buffer
        buf.zero_()
        buf[:rows, :IN] = torch.randn(rows, IN)
        x = buf[:rows, :IN]
        y1 = layer(x).clone()
        buf[:, IN:] = 1000.0
        torch.testing.assert_close(layer(x), y1, rtol=0, atol=0)
        torch.testing.assert_close(y1, x @ layer.to_dense().T + layer.bias)


@needs_kernels
@pytest.mark.parametrize("name", NATIVE)
def test_native_formats_check_dtype_and_device(name: str) -> None:
    layer = _layer(name)
    fmt = layer.format
    for dtype in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match="floating-point"):
            fmt.matmul(torch.ones(2, IN, dtype=dtype))
        with pytest.raises(TypeError, match=f"x must be torch.float32 .*got {dtype}"):
            layer(torch.ones(2, IN, dtype=dtype))  # the compiled layer takes its own dtype
    with pytest.raises(ValueError, match="on the CPU"):
        layer(torch.ones(2, IN, device="meta"))
    x = torch.randn(3, IN, dtype=torch.float64)  # the format converts other float dtypes
    torch.testing.assert_close(fmt.matmul(x), fmt.matmul(x.float()))


@pytest.mark.parametrize("name", ["csr16", "fanin", "bsr"])
def test_torch_fallback_rejects_wrong_width(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the kernels (a model loaded elsewhere) a longer input is no less wrong."""
    layer = CompiledLinear(FORMATS[name].from_dense(_weight(name)))
    monkeypatch.setattr(kernels, "load", lambda: None)
    for width in (IN + 1, IN - 1, 1):
        with pytest.raises(ValueError, match=f"in_features={IN}"):
            layer(torch.randn(2, width))
    x = torch.randn(2, IN)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T)


@pytest.mark.parametrize("name", ["csr16", "fanin"])
def test_huge_layer_with_one_wide_input_raises(name: str) -> None:
    """Linear(4_000_000, 8) called with a 1-wide input segfaulted. The format is built from
    a few stored weights, so the test allocates kilobytes, not the 128 MB dense weight."""
    cols = 4_000_000
    col = torch.tensor([5, cols - 1], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0])
    if name == "csr16":
        rowptr = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 2], dtype=torch.int32)
        fmt = CSR16.from_state(
            {"rowptr": rowptr, "col_indices": col, "values": values}, (8, cols), threads=1
        )
    else:
        fmt = ConstantFanIn.from_state(
            {"fanin_values": values[None], "fanin_col_indices": col[None],
             "fanin_rows": torch.tensor([3], dtype=torch.int32)}, (8, cols), threads=1,
        )
    layer = CompiledLinear(fmt)
    for x in (torch.ones(1, 1), torch.ones(4, 1), torch.ones(1, 0)):
        with pytest.raises(ValueError, match=f"in_features={cols}"):
            layer(x)
    if kernels_ok():
        b = fmt._buffers
        args = [b[k] for k in fmt.buffer_names]
        with pytest.raises(RuntimeError, match=f"in_features={cols}"):
            if name == "csr16":
                torch.ops.sparsekit.csr_linear(*args[::-1], torch.ones(1, 1), None, cols, 1)
            else:
                torch.ops.sparsekit.fanin_linear(*args, torch.ones(1, 1), None, 8, cols, 1)


@needs_kernels
def test_compiled_conv_rejects_wrong_channels() -> None:
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
    for name in ("dense", "csr16"):
        layer = CompiledConv2d.from_conv2d(conv, name)
        for x in (torch.randn(1, 3, 8, 8), torch.randn(1, 5, 8, 8), torch.randn(4, 8, 8)[0],
                  torch.randn(8, 8)):
            with pytest.raises(ValueError, match="in_channels=4"):
                layer(x)
        x = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernels), False])
def test_activation_sparse_linear_rejects_bad_inputs(kernel: bool) -> None:
    linear = nn.Linear(IN, OUT)
    layer = ActivationSparseLinear.from_linear(linear, 0.1, threads=1)
    if not kernel:
        layer.weight_t = layer.weight_t.double()  # no kernel for a mixed dtype: PyTorch path
    for width in WIDTHS:
        for x in (torch.randn(width), torch.randn(1, width), torch.randn(3, width)):
            with pytest.raises(ValueError, match=f"in_features={IN}"):
                layer(x)
    with pytest.raises(ValueError, match=f"in_features={IN}"):
        layer(torch.tensor(1.0))
    for x in (torch.ones(IN, dtype=torch.int64), torch.ones(3, IN, dtype=torch.int32)):
        with pytest.raises(TypeError, match="floating-point"):
            layer(x)
    for x in (torch.ones(IN, device="meta"), torch.ones(3, IN, device="meta")):
        with pytest.raises(ValueError, match="device"):
            layer(x)


@pytest.mark.usefixtures("backend")
def test_sparse_linear_rejects_bad_inputs() -> None:
    layer = SparseLinear.from_linear(nn.Linear(IN, OUT), torch.rand(OUT, IN) < 0.1)
    for width in WIDTHS:
        for x in (torch.randn(5, width), torch.randn(2, 5, width)):
            with pytest.raises(ValueError, match=f"in_features={IN}"):
                layer(x)
    with pytest.raises(ValueError, match=f"in_features={IN}"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        layer(torch.randn(5, IN, dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        layer(torch.randn(5, IN, device="meta"))
    x = torch.randn(5, IN, requires_grad=True)
    y = layer(x)
    with pytest.raises(RuntimeError, match="shape"):  # autograd checks the gradient's shape
        y.backward(torch.ones(5, OUT - 1))
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.values.grad.shape == layer.values.shape


# -- direct op calls ------------------------------------------------------------------------


def _linear_op_args(name: str) -> tuple[Callable[..., torch.Tensor], dict[str, object]]:
    """A compiled linear op and valid keyword arguments for it."""
    fmt = FORMATS[name].from_dense(_weight(name), threads=1)
    b = fmt._buffers
    common = {"x": torch.randn(5, IN), "bias": torch.randn(OUT), "in_features": IN,
              "threads": 1}
    ops = torch.ops.sparsekit
    if name == "csr16":
        return ops.csr_linear, {"values": b["values"], "col_indices": b["col_indices"],
                                "rowptr": b["rowptr"], **common}
    if name == "bitmap":
        return ops.bitmap_linear, {"values": b["bitmap_values"], "bitmap": b["bitmap_mask"],
                                   "rowptr": b["bitmap_rowptr"], **common}
    if name == "nm":
        return ops.nm_linear, {"values": b["nm_values"], "indices": b["nm_indices"],
                               "n": fmt.n, "m": fmt.m, **common}
    if name == "bsr":
        return ops.bsr_linear, {"values": b["bsr_values"], "col_indices": b["bsr_col_indices"],
                                "rowptr": b["bsr_rowptr"], "out_features": OUT, **common}
    return ops.fanin_linear, {"values": b["fanin_values"], "col_indices": b["fanin_col_indices"],
                              "rows": b["fanin_rows"], "out_features": OUT, **common}


# (argument, replacement given the valid arguments, message)
_LINEAR_CASES: list[tuple[str, Callable[[dict], object], str]] = [
    ("x", lambda a: torch.randn(5, IN - 1), f"in_features={IN}"),
    ("x", lambda a: torch.randn(5, IN + 16), f"in_features={IN}"),
    ("x", lambda a: torch.randn(1, 1), f"in_features={IN}"),
    ("x", lambda a: torch.randn(5, 0), f"in_features={IN}"),
    ("x", lambda a: torch.tensor(1.0), r"shape \(\.\.\., in_features\)"),
    ("x", lambda a: torch.randn(IN, 5).t(), "not contiguous"),
    ("x", lambda a: torch.randn(5, IN, dtype=torch.float64), "Float"),
    ("x", lambda a: torch.ones(5, IN, dtype=torch.int32), "Float"),
    ("bias", lambda a: torch.randn(OUT - 1), "bias"),
    ("bias", lambda a: torch.randn(OUT, dtype=torch.float64), "bias"),
    ("threads", lambda a: 0, "threads"),
    ("threads", lambda a: -3, "threads"),
    ("values", lambda a: a["values"].reshape(-1)[:-1] if a["values"].dim() == 1
     else a["values"][:-1], "values|rowptr|indices|rows|col_indices"),
    ("values", lambda a: a["values"].double(), "values"),
]


@needs_kernels
@pytest.mark.parametrize("name", NATIVE)
@pytest.mark.parametrize(("arg", "replace", "match"), _LINEAR_CASES,
                         ids=[f"{c[0]}{i}" for i, c in enumerate(_LINEAR_CASES)])
def test_linear_ops_reject_mismatched_tensors(
    name: str, arg: str, replace: Callable[[dict], object], match: str
) -> None:
    op, args = _linear_op_args(name)
    expected = op(**args)
    torch.testing.assert_close(expected, args["x"] @ FORMATS[name].from_dense(
        _weight(name)).to_dense().T + args["bias"])
    with pytest.raises(RuntimeError, match=match):
        op(**(args | {arg: replace(args)}))


# every linear op: the fp32 formats, bf16 values and inputs, W8A8 (int8 values and inputs)
_KERNEL_PATHS = [(n, {}, torch.float32) for n in NATIVE] + [
    ("dense_lowp", {"value_dtype": torch.bfloat16}, torch.bfloat16),
    ("bitmap", {"value_dtype": torch.bfloat16}, torch.bfloat16),
    *[(n, {"value_dtype": torch.int8, "activation_dtype": torch.int8}, torch.float32)
      for n in ("dense_lowp", "bitmap", "nm")],
]


@needs_kernels
@pytest.mark.parametrize(("name", "options", "dtype"), _KERNEL_PATHS,
                         ids=[f"{n}-{o.get('activation_dtype', o.get('value_dtype', 'fp32'))}"
                              for n, o, _ in _KERNEL_PATHS])
@pytest.mark.parametrize("lead", [(), (1, 1), (2, 3, 1)], ids=["1-D", "1x1", "2x3x1"])
def test_linear_ops_take_the_leading_dimensions_as_rows(
    name: str, options: dict[str, object], dtype: torch.dtype, lead: tuple[int, ...]
) -> None:
    """x (..., in_features) goes to the op as it is (a decoded token, (1, 1, in_features),
    needs no reshape) and gives y (..., out_features): the rows of the 2-D product, bit for
    bit."""
    fmt = FORMATS[name].from_dense(_weight(name), threads=1, **options)
    x = torch.randn(*lead, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = fmt.matmul(x)
    assert y.shape == (*lead, OUT) and y.dtype == dtype
    assert torch.equal(y, fmt.matmul(x.reshape(-1, IN)).reshape(*lead, OUT))


@needs_kernels
@pytest.mark.parametrize("name", NATIVE)
def test_linear_ops_check_their_own_buffers(name: str) -> None:
    """Index buffers whose sizes disagree with each other or with in_features."""
    op, args = _linear_op_args(name)
    cases: list[dict[str, object]] = []
    if name in ("bitmap", "nm"):  # the others' buffers do not record in_features
        cases += [{"in_features": IN + 64, "x": torch.randn(5, IN + 64)},
                  {"in_features": IN - 16, "x": torch.randn(5, IN - 16)}]
    if "rowptr" in args:
        rowptr = args["rowptr"]
        cases += [{"rowptr": rowptr[:-1]}, {"rowptr": rowptr[:0]},
                  {"rowptr": rowptr.long()}, {"rowptr": rowptr + 1}]
    if "col_indices" in args:
        col = args["col_indices"]
        cases += [{"col_indices": col.reshape(-1)[:-1]}, {"col_indices": col.long()}]
    if name == "bitmap":
        cases += [{"bitmap": args["bitmap"][:, :-1].contiguous()},
                  {"bitmap": args["bitmap"].int()}]
    if name == "nm":
        cases += [{"indices": args["indices"][:-1]}, {"indices": args["indices"][:, :-1]},
                  {"m": 8}, {"n": 3}, {"values": args["values"][:, :-2].contiguous()}]
    if name == "bsr":
        cases += [{"out_features": OUT + 8}, {"values": args["values"][:, :, :2].contiguous()}]
    if name == "fanin":
        cases += [{"rows": args["rows"][:-1]}, {"out_features": 1}]
    for case in cases:
        with pytest.raises(RuntimeError):
            op(**(args | case))


@needs_kernels
def test_act_gemv_rejects_mismatched_tensors() -> None:
    wt, x, threshold = torch.randn(IN, OUT), torch.randn(IN), torch.zeros(IN)
    args = {"wt": wt, "x": x, "threshold": threshold, "bias": torch.randn(OUT), "threads": 1}
    # 256-term fp32 sums in another order than the reference: a few ulps of a sum's size
    torch.testing.assert_close(torch.ops.sparsekit.act_gemv(**args), x @ wt + args["bias"],
                               rtol=1e-5, atol=1e-4)
    cases = [
        {"x": torch.randn(IN - 1)}, {"x": torch.randn(IN + 1)}, {"x": torch.randn(1)},
        {"x": torch.randn(0)}, {"x": torch.randn(2 * IN)[::2]}, {"x": x.double()},
        {"threshold": threshold[:-1]}, {"threshold": threshold.bfloat16()},
        {"bias": torch.randn(OUT + 1)}, {"wt": wt.t().contiguous().t()},
        {"wt": wt.int()}, {"threads": 0},
    ]
    for case in cases:
        with pytest.raises(RuntimeError):
            torch.ops.sparsekit.act_gemv(**(args | case))


@needs_kernels
def test_training_ops_reject_mismatched_tensors() -> None:
    layer = SparseLinear.from_linear(nn.Linear(IN, OUT), torch.rand(OUT, IN) < 0.1)
    s, values = layer._structure, layer.values.detach()
    xt, gt = torch.randn(IN, 5), torch.randn(OUT, 5)
    spmm = {"rowptr": s.rowptr, "col": s.col, "values": values, "perm": None, "xt": xt,
            "bias": None, "in_features": IN, "threads": 1}
    torch.testing.assert_close(torch.ops.sparsekit.spmm_rows(**spmm), layer.to_dense() @ xt)
    for case in [
        {"xt": torch.randn(IN - 1, 5)}, {"xt": torch.randn(1, 5)}, {"xt": xt.t()},
        {"xt": xt.contiguous().t().contiguous().t()}, {"in_features": IN + 1},
        {"values": values[:-1]}, {"values": values.double()}, {"rowptr": s.rowptr[:-1]},
        {"rowptr": s.rowptr[:0]}, {"col": s.col[:-1]}, {"col": s.col.long()},
        {"perm": s.t_perm[:-1]}, {"perm": s.t_perm.int()}, {"bias": torch.randn(OUT - 1)},
        {"threads": 0},
    ]:
        with pytest.raises(RuntimeError):
            torch.ops.sparsekit.spmm_rows(**(spmm | case))
    sddmm = {"rowptr": s.rowptr, "col": s.col, "a": gt, "b": xt, "in_features": IN,
             "threads": 1}
    dense = gt @ xt.T
    torch.testing.assert_close(torch.ops.sparsekit.sddmm(**sddmm),
                               dense[s.row.long(), s.col.long()])
    for case in [
        {"b": torch.randn(IN - 1, 5)}, {"b": torch.randn(1, 5)}, {"in_features": IN - 1},
        {"a": torch.randn(OUT - 1, 5)}, {"a": torch.randn(OUT, 4)}, {"b": xt.double()},
        {"rowptr": s.rowptr[:-1]}, {"col": s.col[:-1]}, {"threads": 0},
        {"a": torch.randn(5, OUT).t()},
    ]:
        with pytest.raises(RuntimeError):
            torch.ops.sparsekit.sddmm(**(sddmm | case))


# an index buffer of each format and a value that is out of range in its first entry
_BAD_INDEX = {"torch_csr": ("col_indices", IN), "csr16": ("col_indices", -1),
              "bitmap": ("bitmap_mask", -1), "nm": ("nm_pattern", 3),
              "bsr": ("bsr_col_indices", -1), "fanin": ("fanin_col_indices", -1)}


@pytest.mark.parametrize("name", [_format_param(n) for n in _BAD_INDEX])
def test_format_load_state_dict_checks_index_contents(name: str) -> None:
    """The kernels trust the indices: a format's own load_state_dict checks them first."""
    fmt = FORMATS[name].from_dense(_weight(name))
    before = {k: v.clone() for k, v in fmt.state_dict().items()}
    key, value = _BAD_INDEX[name]
    state = before | {key: before[key].clone()}
    state[key].view(-1)[0] = value
    with pytest.raises(RuntimeError, match=f"{name}: "):
        fmt.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in fmt.state_dict().items())
    x = torch.randn(3, IN)
    torch.testing.assert_close(fmt.matmul(x), x @ fmt.to_dense().T)


def _w8a8(kind: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], object]:
    """The W8A8 op of ``kind`` on a random half-pruned 8 x 70 layer, and its format."""
    from sparsekit.engine.formats import Bitmap, DenseLowPrecision, PackedNM

    layer = nn.Linear(70, 8)
    with torch.no_grad():
        layer.weight.mul_(torch.arange(70) % 4 < 2)  # 2:4 along the inputs: any format
    cls = {"dense": DenseLowPrecision, "bitmap": Bitmap, "nm": PackedNM}[kind]
    fmt = cls.from_dense(layer.weight.detach(), value_dtype=torch.int8,
                         activation_dtype=torch.int8)
    ops, bias = torch.ops.sparsekit, layer.bias.detach()
    calls = {
        "dense": lambda x: ops.dense_qlinear(fmt.lowp_weight, x, bias, 70, 1, fmt.scales),
        "bitmap": lambda x: ops.bitmap_qlinear(fmt.bitmap_values, fmt.bitmap_mask,
                                               fmt.bitmap_rowptr, x, bias, 70, 1, fmt.scales),
        "nm": lambda x: ops.nm_qlinear(fmt.nm_values, fmt.nm_indices, x, bias, fmt.n, fmt.m, 70,
                                       1, fmt.scales),
    }
    return calls[kind], fmt


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("position", [0, 37, 69])  # in a 16-wide vector, in the tail
@pytest.mark.parametrize("kind", ["dense", "bitmap", "nm"])
def test_w8a8_ops_give_nan_rows_for_non_finite_inputs_on_every_isa(kind, position, bad):
    """A NaN (or infinite) input has no place on an int8 grid. The AVX-512 path used to
    give NaN rows and AVX2/scalar arbitrary finite values; every ISA now gives NaN in each
    output of the affected input rows (F.linear gives NaN or ±inf there) and leaves the
    other rows exact. The PyTorch fallback agrees."""
    op, fmt = _w8a8(kind)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(position))
    clean = x.clone()
    x[1, position] = bad
    for isa in kernels.isas():
        with kernels.use_isa(isa):
            y, ref = op(x), op(clean)
        assert torch.isnan(y[1]).all(), (isa, y[1])
        assert torch.equal(y[[0, 2]], ref[[0, 2]]), isa
    y, ref = fmt._fallback_mm(x, None), fmt._fallback_mm(clean, None)
    assert torch.isnan(y[1]).all() and torch.equal(y[[0, 2]], ref[[0, 2]])
