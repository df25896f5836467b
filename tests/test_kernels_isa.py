"""Every instruction set this CPU runs (``kernels.isas()``) computes every value-typed op:
op x value dtype x ISA x batch (GEMV and SpMM paths) x threads equals the dequantized float64
reference; ``use_isa`` chooses and restores the ISA and rejects names it cannot run."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from kernel_cases import OPS, VALUE_DTYPES, assert_matches, case, weight

from sparsekit.engine import kernels
from sparsekit.engine.formats import FORMATS


def _isas() -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.isas()


pytestmark = pytest.mark.skipif(not _isas(), reason="compiled kernels unavailable")

ROWS = 40


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_isa_equals_the_reference(isa, name, dtype, batch, threads):
    # 300 inputs: whole 16- and 8-lane blocks and a tail, rows of every length
    c = case(name, dtype, weight(name, ROWS, 300, sparsity=0.6))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 300, generator=g)
    bias = torch.randn(ROWS, generator=g)
    with kernels.use_isa(isa):
        assert kernels.isa() == isa
        y = c.call(x, bias, threads)
    assert_matches(y, c, x, bias)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("cols", [64, 1000])
def test_every_isa_expands_full_and_empty_bitmap_words(isa, dtype, sparsity, cols):
    # dense rows: 16 values per word (the high byte's shuffle reads past the low byte's 8);
    # nearly empty rows: most bytes expand to zeros; 64 inputs: no word takes the vector loop
    # twice, the last rows end in the scalar tail
    c = case("bitmap", dtype, weight("bitmap", 33, cols, sparsity=sparsity, seed=7))
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(8))
    bias = torch.randn(33)
    with kernels.use_isa(isa):
        assert_matches(c.call(x, bias, 2), c, x, bias)


def _expansions() -> tuple[str, ...]:
    return kernels.bitmap_expansions() if _isas() else ()


@pytest.mark.parametrize("expansion", _expansions())
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("cols", [64, 1000])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_every_bitmap_expansion_gives_the_tables_rows_bit_for_bit(
    expansion, sparsity, cols, batch, dtype
):
    # on the best ISA (the expansions are AVX-512's): full, half-full and nearly empty words,
    # rows ending in the scalar tail, the GEMV (batch 1) and the SpMM (batch 5), for bf16
    # values and int8 codes with float inputs (W8A8: test_kernels_qlinear.py)
    c = case("bitmap", dtype, weight("bitmap", 33, cols, sparsity=sparsity, seed=9))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(10))
    bias = torch.randn(33)
    with kernels.use_bitmap_expansion(expansion):
        assert kernels.bitmap_expansion() == expansion
        y = c.call(x, bias, 2)
    with kernels.use_bitmap_expansion("tables"):
        expected = c.call(x, bias, 2)
    assert_matches(y, c, x, bias)
    assert torch.equal(y, expected)


def test_the_bitmap_expansion_is_auto_vpexpand_on_intel_and_for_zen_4_codes_and_columns():
    expansions = kernels.bitmap_expansions()
    assert expansions[0] == "tables"
    assert set(expansions) <= {"tables", "vpexpand"}
    assert ("vpexpand" in expansions) == ("avx512" in _isas() and "avx512_vbmi2" in _cpu_flags())
    assert kernels.bitmap_expansion() == "auto"
    intel = "GenuineIntel" in _cpu_info("vendor_id")
    zen4 = "AuthenticAMD" in _cpu_info("vendor_id") and _cpu_info("cpu family").endswith(" 25")
    runs = "vpexpand" in expansions
    expected = {"bf16": runs and intel, "fp32": runs and intel, "int8": runs and (intel or zen4)}
    for values, vpexpand in expected.items():
        assert kernels.bitmap_expansion(values) == ("vpexpand" if vpexpand else "tables")
        in_columns = vpexpand or (runs and zen4)  # act_bitmap_gemv's columns, every dtype
        assert kernels.bitmap_expansion(values, columns=True) == (
            "vpexpand" if in_columns else "tables")
        for forced in expansions:
            with kernels.use_bitmap_expansion(forced):
                assert kernels.bitmap_expansion(values) == forced
                assert kernels.bitmap_expansion(values, columns=True) == forced
    with pytest.raises(TypeError, match="columns must be a bool, got 'yes'"):
        kernels.bitmap_expansion("bf16", columns="yes")


def test_bitmap_expansion_names_the_values_it_accepts():
    with pytest.raises(ValueError, match=r"values must be one of \('bf16', 'fp32', 'int8'\), "
                                         r"got 'fp16'"):
        kernels.bitmap_expansion("fp16")
    with pytest.raises(RuntimeError, match="values must be 'bf16', 'fp32' or 'int8', got 'fp16'"):
        torch.ops.sparsekit.bitmap_expansion_of("fp16")


def _cpu_info(field: str) -> str:
    """The first ``field`` line of /proc/cpuinfo ("" where there is none)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line for line in lines if line.startswith(field)), "")


def _cpu_flags() -> set[str]:
    return set(_cpu_info("flags").split())


def test_use_bitmap_expansion_rejects_names_this_cpu_cannot_run():
    before = kernels.bitmap_expansion()
    bad = r"bitmap expansion must be one of \('auto', 'tables'.*got 'pshufb'"
    with pytest.raises(ValueError, match=bad), kernels.use_bitmap_expansion("pshufb"):
        pass
    assert kernels.bitmap_expansion() == before
    with pytest.raises(RuntimeError, match="bitmap expansion must be one this CPU runs"):
        torch.ops.sparsekit.set_bitmap_expansion("pshufb")


def _ragged_bitmap_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows of every kind the 64-input steps of the int8 bitmap GEMVs meet: empty, full,
    one nonzero (first or last input), and random at 30-95% sparsity."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols, generator=g) >= torch.linspace(0.3, 0.95, rows)[:, None]
    keep[0] = False
    keep[1] = True
    keep[2] = False
    keep[2, 0] = True
    keep[3] = False
    keep[3, -1] = True
    keep[-1] = True  # the last row ends at the end of the values: the masked tail loads
    return w * keep


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("cols", [1, 16, 63, 64, 65, 100, 130, 1000])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_isa_computes_int8_bitmap_rows_at_every_width(isa, cols, batch):
    # in_features around multiples of 64 (AVX-512 expands 4 words = 64 inputs per step), rows
    # with no, one and all nonzeros, and a last row whose codes end the array
    c = case("bitmap", "int8", _ragged_bitmap_weight(24, cols, seed=cols))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(24)
    with kernels.use_isa(isa):
        assert_matches(c.call(x, bias, 2), c, x, bias)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("magnitude", [2.0**-100, 2.0**100])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_isa_computes_int8_bitmap_rows_at_extreme_input_magnitudes(isa, magnitude, batch):
    # the AVX-512 GEMV multiplies the codes times 2^24 by the inputs times 2^-24: the same
    # products, neither overflowing for large inputs nor lost for small ones
    c = case("bitmap", "int8", _ragged_bitmap_weight(24, 300, seed=5))
    x = torch.randn(batch, 300, generator=torch.Generator().manual_seed(4))
    with kernels.use_isa(isa):
        y = c.call(x * magnitude, None, 2)
    assert_matches(y / magnitude, c, x, None)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("cols", [1, 15, 37])
def test_every_isa_handles_narrow_layers(isa, name, cols):
    c = case(name, "int8", weight(name, 9, cols, sparsity=0.3))
    x = torch.randn(1, cols)
    with kernels.use_isa(isa):
        assert_matches(c.call(x, None, 1), c, x, None)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (4, 8)])
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_every_isa_computes_every_nm_pattern(isa, nm, dtype, batch):
    c = case("nm", dtype, weight("nm", ROWS, 203, nm=nm))
    assert int(c.values.shape[1]) == -(-203 // nm[1]) * nm[0]  # stored as N:M, not another
    x = torch.randn(batch, 203)
    with kernels.use_isa(isa):
        assert_matches(c.call(x, None, 2), c, x, None)


def _assert_format_matches(isa, fmt, batch, g):  # type: ignore[no-untyped-def]
    """``fmt`` on ``isa`` equals the float64 product of its (dequantized) weight at ``batch``
    rows."""
    w = fmt.to_dense()
    x, bias = torch.randn(batch, w.shape[1], generator=g), torch.randn(w.shape[0], generator=g)
    with kernels.use_isa(isa):
        y = fmt.matmul(x, bias)
    ref = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("block", [(4, 4), (8, 8), (16, 16), (32, 32), (3, 12), (5, 24)])
@pytest.mark.parametrize("batch", [1, 3, 8, 17, 33])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_every_isa_computes_bsr_at_every_block_width(isa, block, batch, value_dtype):
    # the GEMV's vectors follow C (4, 8 or 16 lanes, never wider than the ISA's registers);
    # the SpMM's chunk of inputs is 16 (AVX2) or 64 (AVX-512) lanes: batch 17 and 33 end in
    # a ragged chunk, and 61 x 203 ends in ragged block rows and block columns
    g = torch.Generator().manual_seed(5)
    (r, c), rows, cols = block, 61, 203
    keep = torch.rand(-(-rows // r), -(-cols // c), generator=g) < 0.4
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    w = torch.randn(rows, cols, generator=g) * mask
    fmt = FORMATS["bsr"].from_dense(w, block=block, value_dtype=value_dtype)
    _assert_format_matches(isa, fmt, batch, g)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("k", [1, 7, 8, 16, 31, 40, 100])
@pytest.mark.parametrize("batch", [1, 3, 8, 17, 33])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_every_isa_computes_fanin_at_every_fan_in(isa, k, batch, value_dtype):
    # the GEMV runs 16- or 8-lane steps and a scalar tail of each row's k inputs (from
    # windows of x where k is dense enough: 100 of 150 on AVX2 and AVX-512, 120 of 300 in
    # kernel_cases on AVX-512 only); the SpMM's chunk is 4 register vectors of inputs (32 on
    # AVX2, 64 on AVX-512), ragged at 17 and 33
    g = torch.Generator().manual_seed(6)
    rows, cols = 37, 150
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g).argsort(1) < k)
    w[5] = 0  # an ablated neuron: not stored, its output is the bias
    fmt = FORMATS["fanin"].from_dense(w, value_dtype=value_dtype)
    _assert_format_matches(isa, fmt, batch, g)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_isa_computes_the_activation_sparse_gemv(isa, dtype, threads):
    """The threads share the kept inputs, each into its own sums, and each writes a share of
    every tile's outputs from all of them (three threads: uneven shares of the tail); each
    thread's ~16 kept rows run the groups that prefetch the rows two groups ahead and the
    groups too close to the end to. int8: codes scaled per output, float32 inputs."""
    g = torch.Generator().manual_seed(4)
    wt = torch.randn(100, 16400, generator=g)  # 16400 outputs: a tile and a tail
    scales = None
    if dtype == torch.int8:
        wt = torch.randint(-127, 128, wt.shape, generator=g, dtype=torch.int8)
        scales = torch.rand(16400, generator=g) / 127
    wt = wt.to(dtype)
    dtype = torch.float32 if dtype == torch.int8 else dtype
    x, bias = torch.randn(100, generator=g).to(dtype), torch.randn(16400, generator=g).to(dtype)
    threshold = torch.full((100,), 0.7).to(dtype)
    with kernels.use_isa(isa):
        y = torch.ops.sparsekit.act_gemv(wt, x, threshold, bias, threads, scales)
    kept = torch.where(x.abs() >= threshold, x, torch.zeros_like(x)).double()
    ref = kept @ (wt.double() if scales is None else wt.double() * scales.double())
    ref += bias.double()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_isa_computes_the_training_kernels(isa, dtype):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(50, 70, generator=g, dtype=dtype) * (torch.rand(50, 70, generator=g) < 0.2)
    keep = w != 0
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)]).to(torch.int32)
    col, values = keep.nonzero()[:, 1].to(torch.int32), w[keep]
    xt, bias = torch.randn(70, 67, generator=g, dtype=dtype), torch.randn(50, dtype=dtype)
    a = torch.randn(50, 67, generator=g, dtype=dtype)
    with kernels.use_isa(isa):
        y = torch.ops.sparsekit.spmm_rows(rowptr, col, values, None, xt, bias, 70, 2)
        dw = torch.ops.sparsekit.sddmm(rowptr, col, a, xt, 70, 2)
    torch.testing.assert_close(y, w @ xt + bias.unsqueeze(1))
    rows = torch.repeat_interleave(torch.arange(50), torch.diff(rowptr.long()))
    torch.testing.assert_close(dw, (a[rows] * xt[col.long()]).sum(1))


def test_isas_list_the_portable_path_first_and_isa_the_best():
    isas = kernels.isas()
    assert isas[0] == "scalar"
    assert kernels.isa() == isas[-1]
    assert set(isas) <= {"scalar", "avx2", "avx512"}


@pytest.mark.parametrize(("use", "current", "name"), [
    (kernels.use_isa, kernels.isa, "scalar"),
    (kernels.use_bitmap_expansion, kernels.bitmap_expansion, "tables"),
])
def test_use_isa_and_use_bitmap_expansion_restore_the_previous_choice_after_an_error(
    use, current, name
):
    before = current()
    with pytest.raises(KeyError), use(name):
        assert current() == name
        raise KeyError("inside")
    assert current() == before


@pytest.mark.parametrize("name", ["neon", "AVX2", "", "avx1024"])
def test_use_isa_rejects_names_this_cpu_cannot_run(name):
    with pytest.raises(ValueError, match=r"isa must be one of \('scalar'.*got"), \
            kernels.use_isa(name):
        pass
    assert kernels.isa() == kernels.isas()[-1]


def test_the_set_isa_op_checks_its_name():
    with pytest.raises(RuntimeError, match="isa must be one this CPU runs"):
        torch.ops.sparsekit.set_isa("neon")


ARM_CXX = "aarch64-linux-gnu-g++"


@pytest.mark.skipif(shutil.which(ARM_CXX) is None, reason=f"no {ARM_CXX} cross compiler")
def test_the_cores_compile_for_arm(tmp_path):
    """The portable cores build for 64-bit ARM (the x86 ones compile to nothing there)."""
    sources = Path(kernels.__file__).parent
    for isa in ("scalar", "avx2", "avx512"):
        obj = tmp_path / f"{isa}.o"
        result = subprocess.run(
            [ARM_CXX, "-std=c++17", "-O1", "-fopenmp", "-Wall", "-Werror", "-c",
             str(sources / f"isa_{isa}.cpp"), "-o", str(obj)],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert obj.exists()


QEMU = "qemu-aarch64"


@pytest.mark.skipif(shutil.which(ARM_CXX) is None or shutil.which(QEMU) is None,
                    reason=f"no {ARM_CXX} cross compiler or no {QEMU}")
def test_the_portable_cores_compute_right_on_arm(tmp_path):
    """The cores a 64-bit ARM CPU runs (the portable ones: GCC vector code, NEON there) built
    for ARM and run under qemu against a double-precision loop (tests/arm/cores_check.cpp):
    dense, CSR, bitmap rows, packed 2:4 and the activation-sparse GEMV × fp32, bf16, int8
    (and W8A8) × GEMV and SpMM."""
    sources = Path(kernels.__file__).parent
    exe = tmp_path / "cores_check"
    build = subprocess.run(
        [ARM_CXX, "-std=c++17", "-O2", "-fopenmp", "-Wall", "-Werror", "-static",
         f"-I{sources}", str(Path(__file__).parent / "arm" / "cores_check.cpp"),
         *(str(sources / f"isa_{isa}.cpp") for isa in ("scalar", "avx2", "avx512")),
         "-o", str(exe)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    result = subprocess.run([QEMU, str(exe)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    assert "scalar: 0 mismatches" in result.stdout


def _act_case(x_kind: str, value: torch.dtype, g: torch.Generator):
    """A ragged activation-sparse case (37 inputs, 131 outputs, a third of the weights
    pruned): stored weights, x, threshold and the dense float64 weight they stand for."""
    w = torch.randn(131, 37, generator=g)
    w[torch.rand(131, 37, generator=g) < 0.3] = 0
    scales = None
    if value == torch.int8:
        scales = w.abs().amax(1).clamp_min(1e-8) / 127
        w = (w / scales[:, None]).round().clamp(-127, 127)
        stored = w.to(torch.int8)
    else:
        stored = w.to(value)
    xdtype = torch.float32 if value == torch.int8 else value
    x = torch.randn(37, generator=g).to(xdtype)
    threshold = x.abs() if x_kind == "equal" else torch.full((37,), 0.5).to(xdtype)
    if x_kind == "zero":
        x = torch.zeros_like(x)
    dense = stored.double() * (1 if scales is None else scales.double()[:, None])
    return stored, x, threshold, scales, dense


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("value", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("x_kind", ["some", "zero", "equal"])
@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv"])
def test_every_isa_computes_both_activation_kernels_at_the_edges(isa, value, x_kind, kernel):
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    stored, x, threshold, scales, dense = _act_case(x_kind, value, torch.Generator().manual_seed(7))
    layer = ActivationSparseLinear(stored, None, threshold, kernel=kernel, threads=2,
                                   scales=scales, dtype=x.dtype)
    with kernels.use_isa(isa):
        y = layer(x)
    kept = torch.where(x.abs() >= threshold, x, torch.zeros_like(x)).double()  # equal: kept
    ref = dense @ kept
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    assert y.dtype == x.dtype and y.shape == (131,)
    torch.testing.assert_close(y.double(), ref.to(x.dtype).double(), rtol=tol, atol=tol)
    if x_kind == "zero":
        assert torch.equal(y, torch.zeros_like(y))
