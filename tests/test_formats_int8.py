"""int8 values (per-row float32 scales) in the native formats and the dense low-precision
format: exact against the dequantized weight on the kernels and on the fallback, the
optional ``scales`` buffer in states and checkpoints, and the hostile cases."""

from __future__ import annotations

import pytest
import torch
from _kernels import kernels_ok, needs_kernels
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, kernels
from sparsekit.engine.formats import FORMATS, available_formats, format_from_state
from sparsekit.quantize import fake_quantize, int8_scales, quantize_int8

INT8_FORMATS = ("csr16", "bitmap", "nm", "bsr", "fanin", "dense_lowp")



def _weight(shape: tuple[int, int], name: str, seed: int = 0) -> torch.Tensor:
    """A float32 weight, 2:4 for "nm" (a last partial group), 4 x 8 blocks for "bsr" (ragged
    edges), 40 % of the inputs in every row but an empty one for "fanin", 60 % unstructured
    otherwise."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(shape, generator=g)
    if name == "bsr":
        keep = torch.rand(-(-rows // 4), -(-cols // 8), generator=g) >= 0.6
        return w * keep.repeat_interleave(4, 0).repeat_interleave(8, 1)[:rows, :cols]
    if name == "fanin":
        w = w * (torch.rand(shape, generator=g).argsort(1) < int(0.4 * cols))
        w[rows // 2] = 0
        return w
    if name == "nm":
        padded = torch.zeros(rows, -(-cols // 4) * 4)
        padded[:, :cols] = torch.rand(shape, generator=g)
        keep = padded.view(rows, -1, 4).argsort(-1, descending=True)[..., :2]
        mask = torch.zeros_like(padded).view(rows, -1, 4).scatter_(-1, keep, 1.0)
        return w * mask.view(rows, -1)[:, :cols]
    return w * (torch.rand(shape, generator=g) >= 0.6)


def _assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to the fp32 summation order, and one rounding to y's dtype."""
    scale = float(ref.abs().max())
    if y.dtype == torch.bfloat16:
        torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float(),
                                   rtol=2 ** -7, atol=1e-4 * scale)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)


def _reference(dense: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (x.double() @ dense.double().T + bias.double()).float()


@pytest.mark.parametrize("name", INT8_FORMATS)
def test_int8_values_are_the_kept_weights_on_the_shared_grid(name):
    w = _weight((37, 301), name)
    fmt = FORMATS[name].from_dense(w, value_dtype=torch.int8)
    assert fmt.value_dtype == torch.int8
    assert torch.equal(fmt.scales, int8_scales(w))
    assert torch.equal(fmt.to_dense(), fake_quantize(w, int8_scales(w)))  # zeros stay zero
    assert fmt.nbytes == sum(t.numel() * t.element_size() for t in fmt.buffers())
    assert "values=int8" in repr(fmt)
    given = int8_scales(w) * (1 + torch.rand(37))  # a layer's weight_scale: used exactly
    #                                              (coarser than w's own, so it holds w)
    fmt = FORMATS[name].from_dense(w, scales=given)  # value_dtype defaults to int8
    assert fmt.value_dtype == torch.int8 and torch.equal(fmt.scales, given)
    codes, _ = quantize_int8(w, given)
    assert torch.equal(fmt.stored_dense(), codes)


@pytest.mark.parametrize("name", INT8_FORMATS)
def test_int8_values_refuse_a_grid_the_weight_outgrew(name):
    # clamped to ±127 steps, such weights were stored far from themselves, without a word
    w = _weight((37, 301), name)
    with pytest.raises(ValueError, match=r"weight: the weight lies beyond its int8 grid"):
        FORMATS[name].from_dense(w, scales=int8_scales(w) / 2)


@needs_kernels
@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_int8_kernels_equal_the_dequantized_reference(name, batch, threads, x_dtype):
    w = _weight((67, 301), name)  # ragged: vector tails, partial words and groups
    fmt = FORMATS[name].from_dense(w, threads=threads, value_dtype=torch.int8)
    x, bias = torch.randn(batch, 301).to(x_dtype), torch.randn(67)
    y = fmt.matmul(x, bias)
    assert y.dtype == x_dtype and y.shape == (batch, 67)
    _assert_matches(y, _reference(fmt.to_dense(), x, bias))


@needs_kernels
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_dense_lowp_bf16_kernel_equals_the_rounded_reference(batch, x_dtype):
    w = _weight((67, 301), "dense")
    fmt = FORMATS["dense_lowp"].from_dense(w, value_dtype=torch.bfloat16, threads=2)
    assert fmt.value_dtype == torch.bfloat16 and torch.equal(fmt.to_dense(), w.bfloat16())
    x, bias = torch.randn(batch, 301).to(x_dtype), torch.randn(67)
    _assert_matches(fmt.matmul(x, bias), _reference(fmt.to_dense(), x, bias))
    again = FORMATS["dense_lowp"].from_dense(w.bfloat16())  # a bf16 weight keeps its dtype
    assert torch.equal(again.lowp_weight, fmt.lowp_weight)


@needs_kernels
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("value_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4, 7])
def test_dense_lowp_kernel_on_every_instruction_set(isa, value_dtype, batch):
    if isa not in kernels.isas():
        pytest.skip(f"this CPU does not run {isa}")
    w = _weight((37, 301), "dense")  # 37 rows: a partial block of 4; 301: vector tails
    fmt = FORMATS["dense_lowp"].from_dense(w, value_dtype=value_dtype, threads=2)
    x, bias = torch.randn(batch, 301), torch.randn(37)
    with kernels.use_isa(isa):
        y = fmt.matmul(x, bias)
    _assert_matches(y, _reference(fmt.to_dense(), x, bias))


@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("value_dtype", [torch.int8, torch.bfloat16])
def test_without_kernels_the_fallback_is_correct(name, value_dtype, monkeypatch):
    w = _weight((40, 96), name)
    fmt = FORMATS[name].from_dense(w, value_dtype=value_dtype)
    x, bias = torch.randn(3, 96), torch.randn(40)
    monkeypatch.setattr(kernels, "load", lambda: None)
    y = fmt.matmul(x, bias)
    _assert_matches(y, _reference(fmt.to_dense(), x, bias))
    assert fmt.matmul(x.bfloat16(), bias).dtype == torch.bfloat16


def test_available_formats_follow_the_value_dtype():
    w = _weight((16, 64), "nm")
    native = kernels_ok()
    assert "dense_lowp" not in available_formats(w)  # float32 values: plain dense does that
    for value_dtype in (torch.int8, torch.bfloat16):
        names = available_formats(w, value_dtype)
        assert names[0] == "dense" and "torch_csr" not in names and "bsr" not in names
        expected = {"csr16", "bitmap", "nm", "fanin", "dense_lowp"}  # 2:4 is a constant fan-in
        assert set(names[1:]) == (expected if native else set())
    assert FORMATS["csr16"].value_dtypes == (torch.float32, torch.bfloat16, torch.int8)


@pytest.mark.parametrize("name", ["csr16", "dense_lowp"])
def test_bad_value_dtypes_and_scales_are_refused(name):
    w = _weight((16, 64), name)
    with pytest.raises(ValueError, match="value_dtype"):
        FORMATS[name].from_dense(w, value_dtype=torch.float16)
    with pytest.raises(ValueError, match="scales"):
        FORMATS[name].from_dense(w, value_dtype=torch.bfloat16, scales=torch.ones(16))
    with pytest.raises(ValueError, match="scales"):
        FORMATS[name].from_dense(w, scales=torch.ones(15))
    with pytest.raises(ValueError, match="value_dtype"):
        FORMATS["bsr"].from_dense(w, value_dtype=torch.float16)


def _bad_states(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    values = next(k for k, v in state.items() if v.dtype == torch.int8)
    without = {k: v for k, v in state.items() if k != "scales"}
    return {
        "missing": without,
        "short": {**state, "scales": state["scales"][:-1]},
        "float64": {**state, "scales": state["scales"].double()},
        "nan": {**state, "scales": torch.full_like(state["scales"], float("nan"))},
        "float values": {**state, values: state[values].bfloat16()},
    }


@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("bad", ["missing", "short", "float64", "nan", "float values"])
def test_int8_state_without_valid_scales_is_refused(name, bad):
    shape = (16, 64)
    fmt = FORMATS[name].from_dense(_weight(shape, name), value_dtype=torch.int8)
    state = {k: v.clone() for k, v in fmt.state_dict().items()}
    assert type(format_from_state(state, shape)) is type(fmt)  # the intact state loads
    with pytest.raises(ValueError, match="scales"):
        format_from_state(_bad_states(state)[bad], shape)


def _compiled(names: tuple[str, str], value_dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    with torch.no_grad():
        model[0].weight.copy_(_weight((48, 64), names[0], seed=1))
        model[2].weight.copy_(_weight((32, 48), names[1], seed=2))
    def compiled(layer: nn.Linear, name: str) -> CompiledLinear:
        return CompiledLinear.from_linear(
            layer, name, **({} if name == "dense" else {"value_dtype": value_dtype})
        )

    return nn.Sequential(compiled(model[0], names[0]), nn.ReLU(), compiled(model[2], names[1]))


@pytest.mark.parametrize("value_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("names", [("csr16", "nm"), ("bitmap", "dense_lowp"), ("bsr", "fanin")])
def test_compiled_low_precision_model_saves_and_loads_bit_identically(
    tmp_path, names, value_dtype
):
    compiled = _compiled(names, value_dtype)
    path = sparsekit.save(compiled, tmp_path / "lowp.safetensors")
    like = _compiled(("dense", "dense"), torch.float32)  # other formats: the file's win
    sparsekit.load(like, path)
    for mine, theirs in ((compiled[0], like[0]), (compiled[2], like[2])):
        assert type(theirs.format) is type(mine.format)
        assert theirs.format.value_dtype == value_dtype
    state, loaded = compiled.state_dict(), like.state_dict()
    assert list(state) == list(loaded)
    assert all(state[k].dtype == loaded[k].dtype and torch.equal(state[k], loaded[k])
               for k in state)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(compiled(x), like(x))


@pytest.mark.parametrize("bad", ["missing", "short"])
def test_checkpoint_with_bad_int8_scales_is_refused_and_nothing_loads(tmp_path, bad):
    compiled = _compiled(("csr16", "nm"), torch.int8)
    fmt = compiled[2].format  # a hostile file: int8 values without (valid) scales
    tensors = [fmt._buffers[k] for k in fmt.buffer_names]
    scales = [] if bad == "missing" else [fmt.scales[:-1].clone()]
    compiled[2].format = type(fmt)([*tensors, *scales], (32, 48))  # the constructor trusts
    path = sparsekit.save(compiled, tmp_path / "bad.safetensors")
    like = _compiled(("dense", "dense"), torch.float32)
    before = {k: v.clone() for k, v in like.state_dict().items()}
    with pytest.raises(ValueError, match="scales"):
        sparsekit.load(like, path)
    after = like.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded
    with pytest.raises(RuntimeError, match="scales"):
        like.load_state_dict(compiled.state_dict())


@needs_kernels
def test_dense_linear_op_checks_its_arguments():
    op = torch.ops.sparsekit.dense_linear
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (8, 32), dtype=torch.int8, generator=g)
    x, scales = torch.randn(2, 32, generator=g), torch.rand(8, generator=g)
    w = q.float() * scales[:, None]
    # fp32 rounding of sums of 32 products of up to ~127 in magnitude: a few ulp of the
    # magnitudes summed, not of the (possibly cancelled) result
    torch.testing.assert_close(op(q, x, None, 32, 1, scales), x @ w.T, rtol=0,
                               atol=1e-6 * float((x.abs() @ w.abs().T).max()))
    with pytest.raises(RuntimeError, match="scales"):
        op(q, x, None, 32, 1)  # int8 without scales
    with pytest.raises(RuntimeError, match="scales"):
        op(q.bfloat16(), x, None, 32, 1, scales)  # bf16 with scales
    with pytest.raises(RuntimeError, match="scales"):
        op(q, x, None, 32, 1, scales[:-1])
    with pytest.raises(RuntimeError, match="in_features"):
        op(q, torch.randn(2, 31), None, 32, 1, scales)
    with pytest.raises(RuntimeError, match="weight"):
        op(q.float(), x, None, 32, 1)
    torch.library.opcheck(op.default, (q, x, torch.randn(8), 32, 1, scales))


# -- float inputs as int8 slices ---------------------------------------------------------------

def _vnni_cpu() -> bool:
    """Whether the W8A8 cores of this CPU are the AVX-512 ones (VNNI, VBMI, VBMI2, BITALG),
    which take one float input row of bitmap int8 codes as three int8 slices."""
    flags = set(kernels._cpu_flags().split())  # the flags line the build key reads
    return {"avx512_vnni", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg"} <= flags


def _slices(x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The three int8 slices of one float32 row and their steps, as the kernel forms them:
    s0 = max|x| / 127, each next step 254 times finer, codes rounded half to even from the
    residual times the step's float32 inverse, and the residual then updated with one
    rounding (x - t * s is exact in float64)."""
    steps = [x.abs().max() / 127]
    steps += [steps[0] / 254]
    steps += [steps[1] / 254]
    codes, r = [], x.clone()
    for s in steps:
        t = (r * (1 / s)).round().clamp(-127, 127)  # float32 product, then half to even
        codes.append(t)
        r = (r.double() - t.double() * s.double()).float()
    return codes, steps


@needs_kernels
@pytest.mark.skipif(not _vnni_cpu(), reason="the int8 slices run on the AVX-512 VNNI cores")
@pytest.mark.parametrize("outlier", [None, 300.0, 2.0 ** 20])
def test_one_float_row_meets_bitmap_int8_codes_as_three_int8_slices(outlier):
    """x = s0 q0 + s1 q1 + s2 q2 + r, |r| <= max|x| / (2 * 127 * 254^2): the products are
    exact integer dot products of the slices, combined in float32 (a layer of at least 2^20
    weight positions). With an input 2^20 above the rest the slices leave the small inputs a
    coarse grid (the float path's error there is ~1e-7 of the output): that is the trade,
    documented in qlinear_core.h."""
    g = torch.Generator().manual_seed(3)
    w = _weight((512, 2048), "bitmap")
    fmt = FORMATS["bitmap"].from_dense(w, value_dtype=torch.int8)
    x = torch.randn(1, 2048, generator=g)
    if outlier is not None:
        x[0, 7] = outlier
    with kernels.use_isa("avx512"):
        y = fmt.matmul(x)
    codes, steps = _slices(x[0])
    stored = fmt.stored_dense().double()
    parts = [(stored @ q.double()) * s.double() for q, s in zip(codes, steps, strict=True)]
    emulated = sum(parts) * fmt.scales.double()
    magnitude = sum(p.abs() for p in parts) * fmt.scales.double()
    assert ((y[0].double() - emulated).abs() <= 4 * 2 ** -24 * magnitude + 1e-30).all()
    exact = (x.double() @ stored.T)[0] * fmt.scales.double()
    residual = x.abs().max().double() / (2 * 127 * 254 ** 2)
    bound = fmt.scales.double() * stored.abs().sum(1) * residual * 1.001 + 4 * 2 ** -24 * magnitude
    assert ((y[0].double() - exact).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("row", ["inf", "nan", "tiny", "zero", "small layer", "wide layer"])
def test_rows_the_int8_slices_cannot_hold_take_the_float_path(row):
    """A row with an infinity or a NaN has no int8 grid, and one whose largest input is under
    1e-30 would put the last slice's step among the subnormals: both keep the float FMAs,
    so one row gives what it gives inside a batch of two (the float path there too). So does
    every row of a layer under 2^20 weight positions, where slicing costs more than it saves,
    and of a layer over 65536 inputs, whose slices' int32 sums could overflow: 140,000
    inputs of code 127 against codes of 127 sum to 2.26e9."""
    shape = {"small layer": (256, 2048), "wide layer": (16, 140_000)}.get(row, (512, 2048))
    w = torch.full(shape, 0.5) if row == "wide layer" else _weight(shape, "bitmap")  # codes 127
    fmt = FORMATS["bitmap"].from_dense(w, value_dtype=torch.int8)
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(4))
    if row in ("inf", "nan"):
        x[0, 5] = float(row)
    elif row == "tiny":
        x *= 1e-32
    elif row == "zero":
        x.zero_()
    elif row == "small layer":
        x[0, 3] = 2.0 ** 20  # the slices would move the outputs (see the test above)
    else:
        x = torch.ones(1, shape[1])
    one, two = fmt.matmul(x), fmt.matmul(torch.cat([x, x]))[:1]
    torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    if row == "zero":
        assert torch.equal(one, torch.zeros_like(one))
    if row == "wide layer":  # and it is right, not merely the same
        exact = (x.double() @ fmt.to_dense().double().T).float()
        torch.testing.assert_close(one, exact, rtol=1e-5, atol=0)
