"""Every instruction set this CPU runs (``kernels.isas()``) computes every value-typed op:
op x value dtype x ISA x batch (GEMV and SpMM paths) x threads equals the dequantized float64
reference; ``use_isa`` chooses and restores the ISA and rejects names it cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_cases import OPS, VALUE_DTYPES, assert_matches, case, weight

from sparsekit.engine import kernels


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
