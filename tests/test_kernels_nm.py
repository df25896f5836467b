"""The packed N:M GEMV on every instruction set this CPU runs, at widths that end the 2:4
loop of 16 values anywhere: in its 8-value loop (48, 60 inputs), exactly (64) or in the
scalar tail (203, 1001), against the dequantized float64 reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_cases import VALUE_DTYPES, assert_matches, case, weight

from sparsekit.engine import kernels


def _isas() -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernels.isas()


pytestmark = pytest.mark.skipif(not _isas(), reason="compiled kernels unavailable")


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("cols", [48, 60, 64, 203, 1001])
@pytest.mark.parametrize("threads", [1, 2])
def test_2_4_gemv_at_every_width_equals_the_reference(isa, dtype, cols, threads):
    c = case("nm", dtype, weight("nm", 29, cols, seed=9, nm=(2, 4)))
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, cols, generator=g)
    bias = torch.randn(29, generator=g)
    with kernels.use_isa(isa):
        y = c.call(x, bias, threads)
    assert_matches(y, c, x, bias)
