"""bf16 values in the native formats (CSR16, bitmap, packed N:M, BSR, fan-in): fp32 sums, inputs and
outputs in the layer's dtype, compile, save/load and the fallback without kernels."""

from __future__ import annotations

import pytest
import torch
from _kernels import kernels_ok
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, compile, kernels
from sparsekit.engine.formats import FORMATS, available_formats

BF16_FORMATS = ("csr16", "bitmap", "nm", "bsr", "fanin")


pytestmark = pytest.mark.skipif(not kernels_ok(), reason="compiled kernels unavailable")


def _weight(shape: tuple[int, int], pattern: str, seed: int = 0) -> torch.Tensor:
    """A bf16 weight pruned to ``pattern``: "2:4", "blocks" (4 x 8, 40 % kept, ragged
    edges), "fanin" (40 % of the inputs in every row but an empty one) or an unstructured
    sparsity like "0.7"."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    rows, cols = shape
    if pattern == "blocks":
        keep = torch.rand(-(-rows // 4), -(-cols // 8), generator=g) >= 0.6
        mask = keep.repeat_interleave(4, 0).repeat_interleave(8, 1)[:rows, :cols]
    elif pattern == "fanin":
        mask = torch.rand(shape, generator=g).argsort(1) < int(0.4 * cols)
        mask[rows // 2] = False
    elif pattern == "2:4":
        padded = torch.zeros(rows, -(-cols // 4) * 4)
        padded[:, :cols] = torch.rand(shape, generator=g)
        keep = padded.view(rows, -1, 4).argsort(-1, descending=True)[..., :2]
        mask = torch.zeros_like(padded).view(rows, -1, 4).scatter_(-1, keep, 1.0)
        mask = mask.view(rows, -1)[:, :cols].bool()
    else:
        mask = torch.rand(shape, generator=g) >= float(pattern)
    return (w * mask).to(torch.bfloat16)


def _pattern(name: str) -> str:
    return {"nm": "2:4", "bsr": "blocks", "fanin": "fanin"}.get(name, "0.7")


def _reference(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 product with the same (bf16-rounded) weights and inputs."""
    y = x.float() @ w.float().T
    return y if bias is None else y + bias.float()


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to the fp32 summation order, and one rounding to y's dtype."""
    scale = float(ref.abs().max())
    if y.dtype == torch.bfloat16:
        torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(),
                                   rtol=2 ** -7, atol=1e-4 * scale)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", BF16_FORMATS)
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_bf16_values_equal_fp32_reference(name, batch, threads, x_dtype):
    w = _weight((67, 301), _pattern(name))  # ragged: vector tails, partial words and groups
    bias = torch.randn(67)
    fmt = FORMATS[name].from_dense(w, threads=threads)
    assert {t.dtype for t in fmt.buffers() if t.is_floating_point()} == {torch.bfloat16}
    assert torch.equal(fmt.to_dense(), w)
    x = torch.randn(batch, 301).to(x_dtype)
    y = fmt.matmul(x, bias)
    assert y.dtype == x_dtype and y.shape == (batch, 67)
    _assert_matches(y, _reference(w, x, bias))


@pytest.mark.parametrize("name", (*BF16_FORMATS, "dense_lowp"))
@pytest.mark.parametrize("batch", [1, 16, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_inputs_give_the_float32_product_rounded_once(name, batch, threads):
    """A bf16 x (widened and narrowed inside the op up to 16 rows, by tensor conversions
    above) gives exactly the product of x in float32, rounded to bf16 as Tensor.to does:
    to nearest even, subnormals kept."""
    w = _weight((67, 301), _pattern(name))
    fmt = FORMATS[name].from_dense(w, threads=threads)
    x = torch.randn(batch, 301, generator=torch.Generator().manual_seed(batch))
    x[0] *= 3e-40  # outputs in bf16's subnormal range
    x = x.to(torch.bfloat16)
    y = fmt.matmul(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, fmt.matmul(x.float()).to(torch.bfloat16))
    assert bool((y[0] != 0).any() & (y[0].float().abs() < torch.finfo(torch.bfloat16).tiny).any())


@pytest.mark.parametrize("name", BF16_FORMATS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_bf16_ops_check_the_input_width_and_dtype(name, x_dtype):
    """The ops themselves (past Format.matmul's check) refuse an x of another width than
    in_features, or of another dtype, for bf16 values too: no read past x."""
    w = _weight((24, 40), _pattern(name))
    fmt = FORMATS[name].from_dense(w)
    x = torch.randn(3, 40).to(x_dtype)
    _assert_matches(fmt._kernel(x, None, 1), _reference(w, x, None))
    for cols in (39, 56, 1):
        with pytest.raises(RuntimeError, match="in_features=40"):
            fmt._kernel(torch.randn(3, cols).to(x_dtype), None, 1)
    with pytest.raises(RuntimeError, match="x must be Float or BFloat16"):
        fmt._kernel(x.half(), None, 1)


@pytest.mark.parametrize("name", BF16_FORMATS)
def test_bf16_weight_gets_the_native_formats(name):
    w = _weight((32, 64), _pattern(name))
    assert name in available_formats(w)
    assert torch.bfloat16 in FORMATS.meta(name)["dtypes"]
    assert "torch_csr" not in available_formats(w)  # MKL has no bf16 sparse products


@pytest.mark.parametrize("name", BF16_FORMATS)
def test_bf16_state_round_trips_and_other_dtypes_are_rejected(name):
    fmt = FORMATS[name].from_dense(_weight((16, 48), _pattern(name)))
    state = {k: v.clone() for k, v in fmt.state_dict().items()}
    again = FORMATS[name].from_state(state, (16, 48))
    assert all(torch.equal(a, b) for a, b in zip(fmt.buffers(), again.buffers(), strict=True))
    values = next(k for k, v in state.items() if v.dtype == torch.bfloat16)
    state[values] = state[values].to(torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        FORMATS[name].from_state(state, (16, 48))
    with pytest.raises(TypeError, match="dtype"):
        FORMATS[name].from_dense(_weight((16, 48), _pattern(name)).half())


@pytest.mark.parametrize("name", BF16_FORMATS)
def test_without_kernels_the_fallback_is_correct_for_bf16(name, monkeypatch):
    w = _weight((40, 96), _pattern(name))
    fmt = FORMATS[name].from_dense(w)
    x, bias = torch.randn(3, 96).to(torch.bfloat16), torch.randn(40)
    monkeypatch.setattr(kernels, "load", lambda: None)
    y = fmt.matmul(x, bias)
    assert y.dtype == torch.bfloat16
    _assert_matches(y, _reference(w, x, bias))


def _bf16_model(pattern: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64)).to(torch.bfloat16)
    with torch.no_grad():
        for i, layer in enumerate((model[0], model[2])):
            layer.weight.copy_(_weight(tuple(layer.weight.shape), pattern, seed=i))
    return model.eval()


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_compile_times_sparse_formats_for_a_bf16_model(pattern, one_thread):
    model = _bf16_model(pattern)
    x = torch.randn(4, 128).to(torch.bfloat16)
    compiled = compile(model, x, formats=("csr16", "bitmap", "nm"), rows=(1, 4))
    for name in ("0", "2"):
        timed = set(compiled.sparsekit_choices[name]["times_ms"])
        assert {"csr16", "bitmap"} <= timed  # bf16 layers are no longer dense-only
        assert ("nm" in timed) == (pattern == "2:4")
    with torch.no_grad():
        assert compiled(x).dtype == torch.bfloat16


def test_compile_weight_dtype_bf16_rounds_the_kept_values_of_fp32_layers(one_thread):
    model = _bf16_model("0.5").float()
    x = torch.randn(4, 128)
    compiled = compile(model, x, formats="csr16", weight_dtype="bf16")  # checks the output
    for name in ("0", "2"):
        assert "csr16" in compiled.sparsekit_choices[name]["times_ms"]
        fmt = getattr(compiled, name).format
        assert fmt.name == "dense" and fmt.weight.dtype == torch.float32 or (
            fmt.values.dtype == torch.bfloat16
        )
    layer = CompiledLinear(FORMATS["csr16"].from_dense(model[0].weight.bfloat16()), model[0].bias)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32  # fp32 in and out
    _assert_matches(y, _reference(model[0].weight.bfloat16(), x, model[0].bias).detach())
    with pytest.raises(ValueError, match="weight_dtype"):
        compile(model, weight_dtype="fp8")


def test_compiled_bf16_model_saves_and_loads_bit_identically(tmp_path, one_thread):
    model = _bf16_model("2:4")
    compiled = nn.Sequential(
        CompiledLinear.from_linear(model[0], "nm"), nn.ReLU(),
        CompiledLinear.from_linear(model[2], "bitmap"),
    )
    path = sparsekit.save(compiled, tmp_path / "bf16.safetensors")
    like = nn.Sequential(
        CompiledLinear.from_linear(model[0], "dense"), nn.ReLU(),
        CompiledLinear.from_linear(model[2], "csr16"),
    )
    sparsekit.load(like, path)
    assert type(like[0].format) is type(compiled[0].format)
    assert type(like[2].format) is type(compiled[2].format)
    for a, b in zip(compiled.state_dict().values(), like.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(5, 128).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(compiled(x), like(x))
