"""Every instruction set this CPU runs (``kernels.isas()``) computes every value-typed op:
op x value dtype x ISA x batch (GEMV and SpMM paths) x threads equals the dequantized float64
reference; ``use_isa`` chooses and restores the ISA and rejects names it cannot run."""

from __future__ import annotations

import warnings

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
@pytest.mark.parametrize("batch", [1, 2, 5, 17])
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


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("name", ["bsr", "fanin"])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_every_isa_computes_the_fp32_formats(isa, name, batch):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 200, generator=g)
    if name == "bsr":
        keep = torch.rand(12, 25, generator=g) < 0.3
        w = w * keep.repeat_interleave(4, 0).repeat_interleave(8, 1)
    else:
        w = w * (torch.rand(48, 200, generator=g).argsort(1) < 24)
    fmt = FORMATS[name].from_dense(w)
    x, bias = torch.randn(batch, 200, generator=g), torch.randn(48, generator=g)
    with kernels.use_isa(isa):
        y = fmt.matmul(x, bias)
    ref = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_isas_list_the_portable_path_first_and_isa_the_best():
    isas = kernels.isas()
    assert isas[0] == "scalar"
    assert kernels.isa() == isas[-1]
    assert set(isas) <= {"scalar", "avx2", "avx512"}


def test_use_isa_restores_the_previous_isa_after_an_error():
    best = kernels.isa()
    with pytest.raises(KeyError), kernels.use_isa("scalar"):
        assert kernels.isa() == "scalar"
        raise KeyError("inside")
    assert kernels.isa() == best


@pytest.mark.parametrize("name", ["neon", "AVX2", "", "avx1024"])
def test_use_isa_rejects_names_this_cpu_cannot_run(name):
    with pytest.raises(ValueError, match=r"isa must be one of \('scalar'.*got"), \
            kernels.use_isa(name):
        pass
    assert kernels.isa() == kernels.isas()[-1]


def test_the_set_isa_op_checks_its_name():
    with pytest.raises(RuntimeError, match="isa must be one this CPU runs"):
        torch.ops.sparsekit.set_isa("neon")
