"""The CSR16 GEMV on every instruction set this CPU runs: rows dense enough for its windowed
path (x picked from whole loaded windows by permutes), rows that fall back to scalar loads
within the same row, windows that reach past the last input, and int32 column indices of
wide layers all equal the dequantized float64 reference."""

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


def _run(isa: str, dtype: str, w: torch.Tensor, batch: int, threads: int) -> None:
    c = case("csr16", dtype, w)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, w.shape[1], generator=g)
    bias = torch.randn(w.shape[0], generator=g)
    with kernels.use_isa(isa):
        y = c.call(x, bias, threads)
    assert_matches(y, c, x, bias)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("cols", [300, 1001])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_at_every_density_equals_the_reference(isa, dtype, sparsity, cols, threads):
    # dense rows: every window ends at the last input and reads into the padding; 50-70%:
    # most vectors in one window, some not; 90%: the scalar path; ragged tails throughout
    _run(isa, dtype, weight("csr16", 37, cols, sparsity=sparsity, seed=5), 1, threads)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_rows_mixing_windowed_and_scattered_nonzeros(isa, dtype, batch):
    # each row: 600 contiguous inputs (windows) then every 20th of the rest (spans far wider
    # than a window: scalar loads inside a row that takes the windowed path), shifted per row
    cols = 1000
    keep = torch.zeros(24, cols, dtype=torch.bool)
    for r in range(24):
        keep[r, r : r + 600] = True
        keep[r, r + 600 :: 20] = True
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(4)) * keep
    _run(isa, dtype, w, batch, 2)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("dtype", VALUE_DTYPES)
def test_wide_layers_with_int32_columns(isa, dtype):
    w = weight("csr16", 3, 70_000, sparsity=0.5, seed=6)
    _run(isa, dtype, w, 1, 2)
