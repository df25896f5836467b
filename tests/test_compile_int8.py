"""compile(weight_dtype=...) with int8 values: the candidates, a layer's attached scales
used exactly, the output check against the dequantized weights, the measured quantization
error in the choices and the report, and the compiled model's checkpoint."""

from __future__ import annotations

import pytest
import torch
from _kernels import kernels_ok
from kernel_cases import reloaded
from torch import nn

from sparsekit.engine import compile, decompile, report
from sparsekit.engine.compile import formats_fit
from sparsekit.quantize import attach_scales, attached_scales, fake_quantize, int8_scales

pytestmark = pytest.mark.skipif(not kernels_ok(), reason="compiled kernels unavailable")


def _model(seed: int = 0) -> nn.Sequential:
    """Two 2:4 layers (every native format can hold them)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            rows, cols = layer.weight.shape
            keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
            mask = torch.zeros(rows, cols // 4, 4).scatter_(-1, keep, 1.0).view(rows, cols)
            layer.weight.mul_(mask)
    return model.eval()


def _dequantized(model: nn.Module, compiled: nn.Module) -> nn.Module:
    """``model`` with each compiled layer's stored (dequantized) weights."""
    reference = _model()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for i in (0, 2):
            reference[i].weight.copy_(compiled[i].to_dense().float())
    return reference


@pytest.mark.parametrize("name", ["csr16", "bitmap", "nm", "fanin", "dense_lowp"])
def test_weight_dtype_int8_stores_int8_codes_checked_against_the_dequantized_model(
    name, one_thread
):
    model, x = _model(), torch.randn(8, 128)
    compiled = compile(model, x, formats=name, weight_dtype="int8", rows=(1,))
    for i in (0, 2):
        fmt, choice = compiled[i].format, compiled.sparsekit_choices[str(i)]
        assert fmt.name == name and fmt.value_dtype == torch.int8
        w = model[i].weight.detach()
        assert torch.equal(fmt.scales, int8_scales(w))
        assert torch.equal(fmt.to_dense(), fake_quantize(w, int8_scales(w)))
        assert choice["value_dtype"] == "int8"
        assert 0 < choice["quantization_error"] < 0.02  # ~ half a step of 127 over the row max
    with torch.no_grad():  # exact w.r.t. the dequantized weights, up to fp32 sum order
        y, ref = compiled(x), _dequantized(model, compiled)(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_an_int8_model_decompiles_with_its_scales_and_compiles_back_to_its_codes(one_thread):
    # decompile gave the dequantized weights without their grid, so compiling them again
    # with weight_dtype=None stored float32 values, not the int8 codes
    model, x = _model(), torch.randn(8, 128)
    compiled = compile(model, x, formats="bitmap", weight_dtype="int8", rows=(1,))
    plain = decompile(compiled)
    again = compile(plain, x, formats="bitmap", rows=(1,))
    for i in (0, 2):
        assert torch.equal(attached_scales(plain[i]), compiled[i].format.scales)
        assert again[i].format.value_dtype == torch.int8
        assert torch.equal(again[i].format.stored_dense(), compiled[i].format.stored_dense())
        assert torch.equal(again[i].format.scales, compiled[i].format.scales)


def test_quantization_error_is_measured_on_the_observed_inputs(one_thread):
    model = _model()
    x = torch.randn(8, 128) * 10 + 3  # far from the random normal probe
    compiled = compile(model, x, formats="csr16", weight_dtype="int8", rows=(1,))
    with torch.no_grad():
        h = model[1](model[0](x))
        for i, inputs in ((0, x), (2, h)):
            ref = model[i](inputs)
            err = float((compiled[i](inputs) - ref).norm() / ref.norm())
            measured = compiled.sparsekit_choices[str(i)]["quantization_error"]
            assert measured == pytest.approx(err, rel=1e-3)


def test_attached_scales_are_used_exactly_without_weight_dtype(one_thread):
    model = _model()
    with torch.no_grad():
        for i in (0, 2):
            layer = model[i]
            scales = int8_scales(layer.weight) * 1.5  # not the default grid: must be kept
            layer.weight.copy_(fake_quantize(layer.weight, scales))
            attach_scales(layer, scales)
    x = torch.randn(4, 128)
    compiled = compile(model, x, formats="bitmap", rows=(1,))  # weight_dtype=None
    for i in (0, 2):
        fmt = compiled[i].format
        assert fmt.value_dtype == torch.int8
        assert torch.equal(fmt.scales, model[i].weight_scale)
        assert torch.equal(fmt.to_dense(), model[i].weight.detach())  # the codes, exactly
        assert compiled.sparsekit_choices[str(i)]["quantization_error"] < 1e-6


def test_candidates_follow_the_value_dtype(one_thread):
    model, x = _model(), torch.randn(2, 128)
    fp32 = compile(model, x, rows=(1,), cache=False)
    int8 = compile(model, x, weight_dtype="int8", rows=(1,), cache=False)
    for i in ("0", "2"):
        assert "dense_lowp" not in fp32.sparsekit_choices[i]["times_ms"]
        assert fp32.sparsekit_choices[i]["quantization_error"] < 1e-5  # fp32 sum order only
        timed = set(int8.sparsekit_choices[i]["times_ms"])
        assert {"dense", "csr16", "bitmap", "nm", "dense_lowp"} <= timed
        assert "torch_csr" not in timed  # it cannot hold int8 values
        chosen = int8[int(i)].format
        assert chosen.name == "dense" or chosen.value_dtype == torch.int8
    bf16 = compile(model, x, formats=("dense", "dense_lowp"), weight_dtype="bf16", rows=(1,),
                   cache=False)
    assert "dense_lowp" in bf16.sparsekit_choices["0"]["times_ms"]
    with pytest.raises(ValueError, match="weight_dtype.*int8"):
        compile(model, weight_dtype="int4")


def test_formats_fit_says_whether_forced_formats_can_hold_a_layer():
    """formats_fit: true where dense is allowed; for forced formats, whether one of them
    holds some layer (with the values compile would store); bad arguments are refused."""
    pruned, dense = _model(), nn.Sequential(nn.Linear(128, 96))
    assert formats_fit(dense, "auto") and formats_fit(dense, ["dense", "nm"])
    assert formats_fit(pruned, ["nm"]) and formats_fit(pruned, ["nm"], "int8")
    assert not formats_fit(dense, ["nm"])  # no 2:4 weight to hold
    assert not formats_fit(pruned, ["torch_csr"], "int8")  # it cannot hold int8 values
    with pytest.raises(ValueError, match="weight_dtype.*int4"):
        formats_fit(pruned, ["nm"], "int4")
    with pytest.raises(ValueError, match="nope"):
        formats_fit(pruned, ["nope"])


def test_report_shows_value_dtype_bytes_and_quantization_error(one_thread):
    model, x = _model(), torch.randn(4, 128)
    compiled = compile(model, x, formats="nm", weight_dtype="int8", rows=(1,))
    rows = {r.name: r for r in report(compiled, x).rows}
    for i in ("0", "2"):
        extra = rows[i].extra
        assert extra["format"] == "nm" and extra["values"] == "int8"
        assert extra["bytes"] == compiled[int(i)].format.nbytes
        assert extra["quant err"] == compiled.sparsekit_choices[i]["quantization_error"]
    assert "quant err" in report(compiled).to_markdown()


def test_conv_compiles_to_int8(one_thread):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
    with torch.no_grad():
        conv[0].weight.mul_(torch.rand_like(conv[0].weight) > 0.5)
    x = torch.randn(2, 8, 6, 6)
    compiled = compile(conv, x, formats="csr16", weight_dtype="int8", rows=(2,))
    assert compiled[0].format.value_dtype == torch.int8
    assert 0 < compiled.sparsekit_choices["0"]["quantization_error"] < 0.02


def test_compiled_int8_model_reloads_bit_identically(tmp_path, one_thread):
    model, x = _model(), torch.randn(4, 128)
    compiled = compile(model, x, formats=("csr16", "dense_lowp"), weight_dtype="int8",
                       rows=(1,))
    like = reloaded(compiled, model, tmp_path / "int8.safetensors")
    with torch.no_grad():
        assert torch.equal(compiled(x), like(x))
