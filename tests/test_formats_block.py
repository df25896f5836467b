"""BSR and constant fan-in formats: kernels, torch fallback, validation, compile and persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, compile, kernels
from sparsekit.engine.formats import BSR, FORMATS, ConstantFanIn, format_from_state
from sparsekit.engine.formats.bsr import choose_block

BATCHES = (1, 2, 7, 64)


def _block_weight(
    shape: tuple[int, int], block: tuple[int, int], density: float, seed: int = 0
) -> torch.Tensor:
    """Random weight whose nonzeros fill whole ``block`` blocks (edge blocks cropped)."""
    g = torch.Generator().manual_seed(seed)
    (r, c), (rows, cols) = block, shape
    grid = torch.rand(-(-rows // r), -(-cols // c), generator=g) < density
    if grid.shape[0] > 2:
        grid[1] = False  # an empty block row
    mask = grid.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return torch.randn(shape, generator=g) * mask


def _fanin_weight(shape: tuple[int, int], k: int, seed: int = 0) -> torch.Tensor:
    """Random weight with ``k`` nonzeros in every row but row 1 (an ablated neuron)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    order = torch.rand(shape, generator=g).argsort(dim=1)
    mask = torch.zeros(shape, dtype=torch.bool).scatter_(1, order[:, :k], True)
    if rows > 2:
        mask[1] = False
    return torch.randn(shape, generator=g) * mask


def _check_matches(fmt, w: torch.Tensor, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(w.shape[0], generator=g)
    for batch in BATCHES:
        x = torch.randn(batch, w.shape[1], generator=g)
        for b in (bias, None):
            ref = F.linear(x, w, b)
            y = fmt.matmul(x, b)
            scale = ref.abs().max().clamp_min(1.0)
            assert y.shape == ref.shape
            assert float((y - ref).abs().max()) <= 1e-5 * float(scale), (batch, b is None)


BSR_CASES = [  # (shape, block, density)
    ((64, 64), (16, 16), 0.3),
    ((70, 45), (16, 16), 0.5),  # neither side divisible by the block
    ((33, 100), (4, 4), 0.2),
    ((100, 70), (8, 8), 0.4),
    ((40, 96), (32, 32), 0.6),
    ((1, 50), (4, 8), 0.5),  # a single output row
    ((20, 1), (4, 4), 1.0),  # a single input column
    ((48, 48), (16, 16), 0.0),  # fully pruned
    ((30, 36), (3, 12), 0.5),  # an explicit odd block
]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("shape", "block", "density"), BSR_CASES, ids=str)
def test_bsr_matches_masked_linear(shape, block, density, threads):
    w = _block_weight(shape, block, density)
    fmt = BSR.from_dense(w, threads=threads, block=block)
    assert fmt.block == block
    _check_matches(fmt, w)
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.nnz == int(torch.count_nonzero(w))


FANIN_CASES = [((64, 64), 6), ((70, 45), 5), ((1, 50), 7), ((20, 1), 1), ((48, 48), 0),
               ((30, 40000), 9)]  # the last: 16-bit indices above 32767


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("shape", "k"), FANIN_CASES, ids=str)
def test_fanin_matches_masked_linear(shape, k, threads):
    w = _fanin_weight(shape, k)
    fmt = ConstantFanIn.from_dense(w, threads=threads)
    stored = int((w != 0).any(dim=1).sum())  # ablated rows are not stored
    assert tuple(fmt.fanin_values.shape) == (stored, k)
    assert fmt.fanin_col_indices.dtype == torch.int16
    _check_matches(fmt, w)
    assert torch.equal(fmt.to_dense(), w)


def test_bsr_and_fanin_fall_back_to_torch(monkeypatch, one_thread):
    monkeypatch.setattr(kernels, "load", lambda: None)  # e.g. no C++ compiler
    for shape, block, density in BSR_CASES[:3]:
        w = _block_weight(shape, block, density)
        _check_matches(BSR.from_dense(w, block=block), w)
    for shape, k in FANIN_CASES[:3]:
        w = _fanin_weight(shape, k)
        _check_matches(ConstantFanIn.from_dense(w), w)


def test_choose_block_picks_largest_nearly_full_block():
    assert choose_block(_block_weight((128, 128), (16, 16), 0.3) != 0)[0] == (16, 16)
    assert choose_block(_block_weight((100, 90), (8, 8), 0.3) != 0)[0] == (8, 8)
    block, fill = choose_block(torch.rand(64, 64) < 0.1)  # unstructured: best fill, too low
    assert block == (4, 4) and fill < 0.5
    assert choose_block(torch.zeros(5, 5, dtype=torch.bool)) == ((32, 32), 1.0)


@needs_kernels
def test_supports_structured_weights_only():
    block = _block_weight((64, 64), (16, 16), 0.2)
    fanin = _fanin_weight((64, 64), 6)
    unstructured = torch.randn(64, 64) * (torch.rand(64, 64) < 0.1)
    assert BSR.supports(block) and not BSR.supports(unstructured) and not BSR.supports(fanin)
    assert ConstantFanIn.supports(fanin) and not ConstantFanIn.supports(unstructured)
    assert not ConstantFanIn.supports(torch.randn(8, 8))  # dense: k == in_features
    assert not BSR.supports(block.double()) and not ConstantFanIn.supports(fanin.double())


def test_from_dense_validates_inputs():
    with pytest.raises(ValueError, match="block must be"):
        BSR.from_dense(torch.randn(8, 8), block=(4, 3))
    with pytest.raises(TypeError, match="float32"):
        BSR.from_dense(torch.randn(8, 8).double())
    with pytest.raises(ValueError, match="same number of nonzeros"):
        ConstantFanIn.from_dense(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="mask has shape"):
        ConstantFanIn.from_dense(torch.randn(4, 4), torch.ones(4, 5, dtype=torch.bool))


@pytest.mark.parametrize("fmt", [
    BSR.from_dense(_block_weight((70, 45), (16, 16), 0.5)),
    ConstantFanIn.from_dense(_fanin_weight((70, 45), 5)),
], ids=["bsr", "fanin"])
def test_from_state_round_trip_is_exact(fmt):
    state = fmt.state_dict()
    assert set(state) == set(fmt.buffer_names)
    back = format_from_state(state, (fmt.out_features, fmt.in_features), threads=1)
    assert type(back) is type(fmt) and back.threads == 1
    assert all(torch.equal(state[k], back.state_dict()[k]) for k in state)
    assert torch.equal(back.to_dense(), fmt.to_dense())


def _broken(state: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> dict:
    return {**state, key: value}


def test_bsr_from_state_rejects_invalid_tensors():
    state = BSR.from_dense(_block_weight((70, 45), (16, 16), 0.5)).state_dict()
    values, col, rowptr = (state[k] for k in BSR.buffer_names)
    cases = {
        "bsr_values must be of a dtype in": _broken(state, "bsr_values", values.double()),
        "block must be": _broken(state, "bsr_values", values[:, :, :3].contiguous()),
        "bsr_col_indices must be int16": _broken(state, "bsr_col_indices", col.long()),
        "bsr_col_indices must lie": _broken(state, "bsr_col_indices", col.clone().fill_(3)),
        "bsr_rowptr must be int32": _broken(state, "bsr_rowptr", rowptr[:-1]),
        "bsr_rowptr must rise": _broken(state, "bsr_rowptr", rowptr.flip(0).contiguous()),
    }
    for match, bad in cases.items():
        with pytest.raises(ValueError, match=match):
            BSR.from_state(bad, (70, 45))


def test_fanin_from_state_rejects_invalid_tensors():
    state = ConstantFanIn.from_dense(_fanin_weight((70, 45), 5)).state_dict()
    values, col, rows = (state[k] for k in ConstantFanIn.buffer_names)
    cases = {
        r"fanin_values must be \(rows, k\)": _broken(state, "fanin_values", values.flatten()),
        "fanin_col_indices must be int16": _broken(state, "fanin_col_indices", col[:, :4]),
        "fanin_col_indices must lie": _broken(state, "fanin_col_indices", col + 45),
        "fanin_rows must be int32": _broken(state, "fanin_rows", rows.long()),
        "fanin_rows must be distinct": _broken(state, "fanin_rows", rows.clone().fill_(0)),
    }
    for match, bad in cases.items():
        with pytest.raises(ValueError, match=match):
            ConstantFanIn.from_state(bad, (70, 45))


def _block_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 10)).eval()
    with torch.no_grad():
        model[0].weight.copy_(_block_weight((160, 96), (16, 16), 0.1, seed) * 0.1)
    return model


@needs_kernels
@pytest.mark.parametrize(("name", "make"), [
    ("bsr", lambda w: _block_weight(tuple(w.shape), (16, 16), 0.1)),
    ("fanin", lambda w: _fanin_weight(tuple(w.shape), 10)),
])
def test_compile_save_load_round_trip(name, make, tmp_path, one_thread):
    model = _block_model()
    with torch.no_grad():
        model[0].weight.copy_(make(model[0].weight))
    x = torch.randn(7, 96)
    compiled = compile(model, x, formats=name, rows=(1, 8))
    assert name in compiled.sparsekit_choices["0"]["times_ms"]
    compiled[0] = CompiledLinear.from_linear(model[0], name)  # whether or not it was fastest
    assert isinstance(compiled[0].format, FORMATS[name])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        path = sparsekit.save(compiled, tmp_path / "model.safetensors")
        loaded = compile(_block_model(seed=1), formats="dense")
        sparsekit.load(loaded, path)
        assert isinstance(loaded[0].format, FORMATS[name])
        assert torch.equal(loaded(x), compiled(x))
        fresh = compile(_block_model(seed=2), formats="dense")
        fresh.load_state_dict(compiled.state_dict())
        assert torch.equal(fresh(x), compiled(x))
