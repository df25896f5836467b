"""The CUDA formats: packing and CPU paths everywhere, torch's GPU kernels where CUDA is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, compile
from sparsekit.engine.formats import FORMATS, CudaBSR, CudaSemiStructured, format_from_state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _two_four(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    mask &= torch.rand(rows, cols // 4, 4, generator=g) > 0.2  # some groups hold fewer
    return w * mask.view(rows, cols)


def _blocks(rows: int, cols: int, block: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(rows // block, cols // block, generator=g) > 0.7
    mask = grid.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return torch.randn(rows, cols, generator=g) * mask


def test_cpu_weights_are_not_candidates() -> None:
    for w in (_two_four(64, 64), _blocks(64, 64), _two_four(64, 64).half()):
        assert not CudaSemiStructured.supports(w) and not CudaBSR.supports(w)


@pytest.mark.parametrize(("capability", "cusparselt", "runs"), [
    ((7, 5), True, False), ((8, 0), False, True), ((8, 9), False, True),
    ((9, 0), False, False), ((9, 0), True, True),
])
def test_semi_structured_needs_a_gpu_whose_kernels_exist(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], cusparselt: bool, runs: bool
) -> None:
    # torch's CUTLASS fallback exists for 8.x only: on an H200 (9.0) without cuSPARSELt it
    # raises at the first product, so the format must not be a candidate there
    from sparsekit.engine.formats import cuda as cuda_formats
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    assert cuda_formats._runs_semi_structured(torch.device("cuda")) is runs


@pytest.mark.parametrize("fmt", ["cuda_24", "cuda_bsr"])
def test_packing_round_trips_and_cpu_product(fmt: str) -> None:
    w = _two_four(32, 64) if fmt == "cuda_24" else _blocks(32, 64)
    f = FORMATS[fmt].from_dense(w)
    assert torch.equal(f.to_dense(), w) and f.nnz == int(torch.count_nonzero(w))
    x, bias = torch.randn(5, 64), torch.randn(32)
    torch.testing.assert_close(f.matmul(x, bias), F.linear(x, w, bias))
    state = dict(f.state_dict())
    back = format_from_state(state, (32, 64))
    assert type(back) is type(f) and torch.equal(back.to_dense(), w)


def test_semi_structured_rejects_what_is_not_two_four() -> None:
    with pytest.raises(ValueError, match="2:4"):
        CudaSemiStructured.from_dense(torch.ones(4, 8))
    f = CudaSemiStructured.from_dense(_two_four(8, 16))
    bad = dict(f.state_dict())
    bad["cuda24_index"] = bad["cuda24_index"].flip(-1).contiguous()
    with pytest.raises(ValueError, match="rising"):
        format_from_state(bad, (8, 16))


def test_bsr_rejects_blocks_that_do_not_tile_and_broken_indices() -> None:
    with pytest.raises(ValueError, match="tile"):
        CudaBSR.from_dense(torch.ones(20, 32), block=(16, 16))
    state = dict(CudaBSR.from_dense(_blocks(32, 64)).state_dict())
    state["cudabsr_col"] = state["cudabsr_col"] + 100
    with pytest.raises(ValueError, match="do not form a BSR"):
        format_from_state(state, (32, 64))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compile_on_cuda_uses_the_gpu_formats(dtype: torch.dtype) -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs compute capability 8.0")
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    sparsekit.prune(model, 0.5, pattern="2:4")
    model = model.to("cuda", dtype).eval()
    x = torch.randn(32, 256, device="cuda", dtype=dtype)
    compiled = compile(model, x, rows=(32,))
    for choice in compiled.sparsekit_choices.values():
        assert "cuda_24" in choice["times_ms"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=2e-2, atol=2e-2)
    layer = CompiledLinear.from_linear(model[0], "cuda_24")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), model[0](x), rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_bsr_matches_dense_on_gpu() -> None:
    w = _blocks(128, 256).cuda()
    assert CudaBSR.supports(w)
    f = CudaBSR.from_dense(w)
    x = torch.randn(8, 256, device="cuda")
    torch.testing.assert_close(f.matmul(x), x @ w.T, rtol=1e-4, atol=1e-4)
