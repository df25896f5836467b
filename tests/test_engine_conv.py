"""Compiled convolutions: CompiledConv2d against F.conv2d, compile() on CNNs, persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import kernels_ok
from torch import nn

import sparsekit
from sparsekit.engine import CompiledConv2d, compile, decompile, report
from sparsekit.engine.compiled_conv import convertible
from sparsekit.engine.formats import DenseFormat
from sparsekit.models import lenet5, resnet_small

FORMATS = ["dense", "torch_csr", *(["csr16"] if kernels_ok() else [])]

CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=3),
    dict(in_channels=4, out_channels=5, kernel_size=(3, 2), stride=2, padding=(1, 0)),
    dict(in_channels=2, out_channels=6, kernel_size=3, dilation=2, padding=2, bias=False),
    dict(in_channels=1, out_channels=1, kernel_size=1),
]


def _pruned_conv(kwargs: dict, sparsity: float = 0.8) -> nn.Conv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) >= sparsity)
    return conv


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kwargs", CONVS, ids=lambda k: str(k["kernel_size"]))
def test_compiled_conv_matches_conv2d(fmt: str, kwargs: dict, one_thread) -> None:
    conv = _pruned_conv(kwargs)
    layer = CompiledConv2d.from_conv2d(conv, fmt)
    for shape in [(2, kwargs["in_channels"], 9, 11), (kwargs["in_channels"], 7, 7)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    back = layer.to_conv2d()
    assert torch.equal(back.weight, conv.weight)
    assert (back.bias is None) == (conv.bias is None)
    assert f"format={fmt!r}" in repr(layer)


def test_convertible_names_the_reason() -> None:
    assert convertible(nn.Conv2d(4, 4, 3)) is None
    assert "groups=2" in convertible(nn.Conv2d(4, 4, 3, groups=2))
    assert "padding_mode" in convertible(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert "padding='same'" in convertible(nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(ValueError, match="groups=2"):
        CompiledConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), "torch_csr")
    with pytest.raises(ValueError, match="format must be one of"):
        CompiledConv2d.from_conv2d(nn.Conv2d(4, 4, 3), "csr8")


def _pruned_lenet5() -> nn.Module:
    torch.manual_seed(0)
    model = lenet5().eval()
    sparsekit.prune(model, 0.9, allocation="global")
    return model


def test_compile_replaces_convolutions_given_example_inputs(one_thread) -> None:
    model = _pruned_lenet5()
    x = torch.randn(2, 1, 28, 28)
    compiled = compile(model, x, rows=(1, 4), formats="torch_csr")
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    assert convs and all(isinstance(compiled.get_submodule(n), CompiledConv2d) for n in convs)
    assert set(convs) <= set(compiled.sparsekit_choices)
    for n in convs:
        assert set(compiled.sparsekit_choices[n]["times_ms"]) == {"dense", "torch_csr"}
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    rows = {r.name: r for r in report(compiled, x).rows}
    assert rows[convs[0]].kind == "Conv2d" and "format" in rows[convs[0]].extra
    assert rows[convs[0]].dense_flops == sparsekit.report(model, x).rows[0].dense_flops
    # without example inputs the convolutions keep nn.Conv2d
    plain = compile(model, formats="torch_csr")
    assert all(type(plain.get_submodule(n)) is nn.Conv2d for n in convs)


def test_compile_leaves_grouped_convolutions(one_thread) -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    compiled = compile(model, torch.randn(1, 4, 6, 6))
    assert type(compiled[0]) is nn.Conv2d and "0" not in compiled.sparsekit_choices


def test_compiled_cnn_saves_loads_and_decompiles(tmp_path, one_thread) -> None:
    model = _pruned_lenet5()
    x = torch.randn(3, 1, 28, 28)
    compiled = compile(model, x, formats="torch_csr")
    path = tmp_path / "cnn.safetensors"
    sparsekit.save(compiled, path)
    fresh = compile(_pruned_lenet5(), x, formats="dense")
    sparsekit.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), compiled(x))
    back = decompile(compiled)
    assert not any(isinstance(m, CompiledConv2d) for m in back.modules())
    for (n, a), b in zip(model.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(a, b), n
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-6)


def test_compile_resnet_with_skips_and_batchnorm(one_thread) -> None:
    torch.manual_seed(0)
    model = resnet_small().eval()
    sparsekit.prune(model, 0.9, allocation="global")
    x = torch.randn(1, 1, 28, 28)
    compiled = compile(model, x, formats=["torch_csr"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, CompiledConv2d) for m in compiled.modules())


def test_compiled_conv_follows_to() -> None:
    layer = CompiledConv2d.from_conv2d(_pruned_conv(CONVS[0]), "dense")
    layer.to(torch.float64)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    ref = F.conv2d(x, layer.to_dense().view(8, 3, 3, 3), layer.bias)
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kernel_size": (0, 3)}, ValueError, r"kernel_size\[0\] must be an int ≥ 1, got 0"),
        ({"kernel_size": 3}, TypeError, "kernel_size must be a pair of ints ≥ 1, got 3"),
        ({"kernel_size": (3, 3.0)}, TypeError, r"kernel_size\[1\] must be an int ≥ 1"),
        ({"stride": (0, 1)}, ValueError, r"stride\[0\] must be an int ≥ 1, got 0"),
        ({"stride": (True, 1)}, TypeError, r"stride\[0\] must be an int ≥ 1, got True"),
        ({"padding": (-1, 0)}, ValueError, r"padding\[0\] must be an int ≥ 0, got -1"),
        ({"dilation": (1, 2, 3)}, TypeError, r"dilation must be a pair of ints ≥ 1"),
        ({"dilation": "11"}, TypeError, r"dilation must be a pair of ints ≥ 1"),
    ],
    ids=lambda v: str(v),
)
def test_compiled_conv_refuses_bad_geometry(kwargs: dict, error: type, match: str) -> None:
    fmt = DenseFormat.from_dense(torch.randn(4, 27))
    with pytest.raises(error, match=match):
        CompiledConv2d(fmt, None, **({"kernel_size": (3, 3)} | kwargs))


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_conv_refuses_inputs_smaller_than_the_kernel(fmt: str) -> None:
    conv = _pruned_conv(dict(in_channels=3, out_channels=4, kernel_size=3, dilation=10))
    layer = CompiledConv2d.from_conv2d(conv, fmt)
    with pytest.raises(ValueError, match=r"x must be at least 21x21 .*dilation=\(10, 10\)"):
        layer(torch.randn(1, 3, 5, 5))
    layer = CompiledConv2d.from_conv2d(_pruned_conv(CONVS[0] | {"padding": 1}), fmt)
    with pytest.raises(ValueError, match=r"x must be at least 1x1 .*got shape \(1, 3, 0, 5\)"):
        layer(torch.randn(1, 3, 0, 5))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64])
def test_compiled_conv_refuses_dtypes_every_format_cannot_compute(
    fmt: str, dtype: torch.dtype
) -> None:
    """A float32 layer refuses in every format what nn.Conv2d refuses, instead of the
    kernel formats computing it silently in float32."""
    layer = CompiledConv2d.from_conv2d(_pruned_conv(CONVS[0]), fmt)
    with pytest.raises(ValueError, match=f"x must be float32.* weight, got "
                                         f"{str(dtype).removeprefix('torch.')}"):
        layer(torch.ones(1, 3, 5, 5, dtype=dtype))
