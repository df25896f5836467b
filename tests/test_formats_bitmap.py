"""Bitmap and PackedNM formats: numbers, packing, validation, fallback and persistence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import kernels_ok, needs_kernels

import sparsekit
from sparsekit.engine import CompiledLinear, compile
from sparsekit.engine.formats import FORMATS, Bitmap, PackedNM, available_formats
from sparsekit.engine.formats import native as native_mod
from sparsekit.engine.formats.nm import NM_PATTERNS, fitting_pattern
from sparsekit.models import lenet_300_100
from sparsekit.patterns import NM

# (out, in): in not a multiple of 4/16/64, a single output row, a single input column
SHAPES = [(1, 7), (5, 1), (33, 70), (64, 100), (20, 129)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
BATCHES = [1, 2, 7, 64]


def _weight(shape: tuple[int, int], sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight = weight * (torch.rand(shape, generator=gen) >= sparsity)
    weight[shape[0] // 2] = 0  # an empty row
    return weight


def _nm_weight(shape: tuple[int, int], n: int, m: int, seed: int = 0) -> torch.Tensor:
    """An N:M-pruned weight (groups as in sparsekit.patterns.NM) with some sparser groups."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    padded = torch.randn(rows, -(-cols // m) * m, generator=gen)
    weight = (padded * NM(n, m).mask(padded.abs(), padded.numel()))[:, :cols]
    return weight * (torch.rand(shape, generator=gen) >= 0.2)  # groups with fewer than N


def _assert_linear(fmt, weight: torch.Tensor, batch: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, weight.shape[1], generator=gen)
    bias = torch.randn(weight.shape[0], generator=gen)
    ref = F.linear(x, weight, bias)
    scale = ref.abs().max().clamp_min(1.0)
    assert float((fmt.matmul(x, bias) - ref).abs().max() / scale) <= 1e-5
    torch.testing.assert_close(fmt.matmul(x), F.linear(x, weight), rtol=1e-5, atol=1e-5 * scale)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bitmap_matches_f_linear(shape, sparsity, threads):
    weight = _weight(shape, sparsity)
    fmt = Bitmap.from_dense(weight, threads=threads)
    assert fmt.nnz == int(torch.count_nonzero(weight))
    for batch in BATCHES:
        _assert_linear(fmt, weight, batch)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern", NM_PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_nm_matches_f_linear(shape, pattern, threads):
    weight = _nm_weight(shape, *pattern)
    fmt = PackedNM.from_dense(weight, threads=threads)
    assert fitting_pattern(weight) == (fmt.n, fmt.m)
    for batch in BATCHES:
        _assert_linear(fmt, weight, batch)


def test_mask_argument_and_leading_dims():
    weight, mask = torch.randn(6, 40), torch.rand(6, 40) > 0.5
    for fmt_cls in (Bitmap, PackedNM):
        nm_mask = NM(2, 4).mask(torch.rand(6, 40), 240) if fmt_cls is PackedNM else mask
        fmt = fmt_cls.from_dense(weight, nm_mask)
        assert torch.equal(fmt.to_dense(), weight * nm_mask)
        x = torch.randn(3, 2, 40)
        torch.testing.assert_close(fmt.matmul(x), F.linear(x, weight * nm_mask))


def test_to_dense_is_exact_and_storage_is_compressed():
    weight = _weight((33, 70), 0.5)
    bitmap = Bitmap.from_dense(weight)
    assert torch.equal(bitmap.to_dense(), weight)
    assert bitmap.bitmap_mask.shape == (33, 5) and bitmap.bitmap_mask.dtype == torch.int16
    assert bitmap.bitmap_values.numel() == int(torch.count_nonzero(weight))
    nm = PackedNM.from_dense(_nm_weight((8, 4096), 2, 4))
    assert torch.equal(nm.to_dense(), _nm_weight((8, 4096), 2, 4))
    assert nm.nm_values.shape == (8, 2048) and nm.nm_indices.shape == (8, 128)  # 2 bits each


def test_packed_nm_picks_the_smallest_fitting_pattern():
    assert fitting_pattern(_nm_weight((4, 16), 1, 4)) == (1, 4)
    assert fitting_pattern(_nm_weight((4, 16), 2, 4)) == (2, 4)
    four_eight = torch.zeros(2, 16)
    four_eight[:, :3] = 1.0  # 3 in the first group of 4, 3 in the first group of 8
    assert fitting_pattern(four_eight) == (4, 8)
    assert fitting_pattern(torch.ones(2, 16)) is None
    assert fitting_pattern(torch.zeros(3, 5)) == (1, 4)


def test_supports():
    nm_weight = _nm_weight((8, 12), 2, 4)
    assert not PackedNM.supports(torch.ones(8, 12))
    assert not PackedNM.supports(nm_weight.double())
    assert not Bitmap.supports(torch.ones(8, 12, dtype=torch.float16))
    assert Bitmap.supports(torch.ones(8, 12, dtype=torch.bfloat16)) == kernels_ok()
    assert Bitmap.supports(torch.ones(8, 12)) == kernels_ok()
    assert PackedNM.supports(nm_weight) == kernels_ok()
    assert ("nm" in available_formats(nm_weight)) == kernels_ok()
    assert "nm" not in available_formats(torch.ones(8, 12))
    very_sparse = torch.zeros(8, 12)
    very_sparse[0, 0] = 1.0  # fits 1:4, but 23 of its 24 slots would be padding
    assert fitting_pattern(very_sparse) == (1, 4) and not PackedNM.supports(very_sparse)


def test_from_dense_rejects_bad_input():
    with pytest.raises(TypeError, match="float32"):
        Bitmap.from_dense(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        Bitmap.from_dense(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="more than N nonzeros"):
        PackedNM.from_dense(torch.ones(2, 8))
    with pytest.raises(ValueError, match="threads"):
        Bitmap.from_dense(torch.ones(2, 2), threads=0)


@pytest.mark.parametrize("fmt_cls", [Bitmap, PackedNM])
def test_from_state_round_trip_is_exact(fmt_cls):
    weight = _nm_weight((9, 30), 2, 4)
    fmt = fmt_cls.from_dense(weight)
    again = fmt_cls.from_state(fmt.state_dict(), (9, 30), threads=2)
    assert again.threads == 2
    assert all(torch.equal(a, b) for a, b in zip(fmt.buffers(), again.buffers()))
    assert torch.equal(again.to_dense(), weight)


def _bad_states() -> list[tuple[type, dict[str, torch.Tensor], str]]:
    bitmap = Bitmap.from_dense(_weight((4, 20), 0.5)).state_dict()
    four_eight = torch.zeros(4, 20)
    four_eight[:, [0, 1, 2, 8, 9, 10, 16, 17, 18]] = 1.0  # fits 4:8, not 2:4
    nm = PackedNM.from_dense(four_eight).state_dict()
    cases = []

    def case(fmt_cls, state, key, value, match):
        cases.append((fmt_cls, {**state, key: value}, match))

    case(Bitmap, bitmap, "bitmap_values", bitmap["bitmap_values"].double(), "bitmap_values")
    case(Bitmap, bitmap, "bitmap_mask", bitmap["bitmap_mask"][:, :1], "bitmap_mask must be")
    case(Bitmap, bitmap, "bitmap_rowptr", bitmap["bitmap_rowptr"].long(), "bitmap_rowptr must")
    case(Bitmap, bitmap, "bitmap_values", bitmap["bitmap_values"][1:], "count the set bits")
    beyond = bitmap["bitmap_mask"].clone()
    beyond[0, 1] = -1  # bits for inputs 16..31 of 20
    case(Bitmap, bitmap, "bitmap_mask", beyond, "beyond the 20 inputs")
    case(PackedNM, nm, "nm_pattern", torch.tensor([3, 4], dtype=torch.int32), "nm_pattern")
    case(PackedNM, nm, "nm_values", nm["nm_values"][:, 1:], "nm_values must be")
    case(PackedNM, nm, "nm_indices", nm["nm_indices"].long(), "nm_indices must be int32")
    nibble = nm["nm_indices"].clone()
    nibble[0, 0] = 0xF  # field 15 in a group of 8
    case(PackedNM, nm, "nm_indices", nibble, "within their group")
    last = nm["nm_indices"].clone()
    last[0, 1] = 0x7 << 12  # value 11 (group 2: inputs 16..23) names input 23 >= 20
    case(PackedNM, nm, "nm_indices", last, "below 20")
    return cases


@pytest.mark.parametrize("fmt_cls,state,match", _bad_states())
def test_from_state_rejects_invalid_tensors(fmt_cls, state, match):
    with pytest.raises(ValueError, match=match):
        fmt_cls.from_state(state, (4, 20))


@pytest.mark.parametrize("fmt_cls", [Bitmap, PackedNM])
def test_fallback_without_kernels_gives_the_same_numbers(monkeypatch, fmt_cls, one_thread):
    weight = _nm_weight((33, 70), 2, 4)
    fmt = fmt_cls.from_dense(weight)
    monkeypatch.setattr(native_mod.kernels, "load", lambda: None)  # e.g. no C++ compiler
    for batch in (1, 7):
        _assert_linear(fmt, weight, batch)
    def cached() -> torch.Tensor:
        return fmt.derived(lambda: pytest.fail("the fallback's dense weight is not cached"))

    dense = cached()
    fmt.matmul(torch.randn(2, 70))
    assert cached() is dense  # rebuilt once, not per call


def _pruned_24(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = lenet_300_100().eval()
    sparsekit.prune(model, 0.5, pattern="2:4")
    return model


@needs_kernels
@pytest.mark.parametrize("name", ["nm", "bitmap"])
def test_compile_matches_masked_model_and_round_trips(tmp_path, name, one_thread):
    model = _pruned_24(0)
    compiled = compile(model, formats=name)
    x = torch.randn(5, 784)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        compiled.fc1 = CompiledLinear.from_linear(model.fc1, name)  # whatever won the timing
        assert compiled.fc1.format.name == name
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        fresh = compile(_pruned_24(1), formats="dense")
        fresh.load_state_dict(compiled.state_dict())
        assert type(fresh.fc1.format) is FORMATS[name]
        assert torch.equal(fresh(x), compiled(x))
        path = sparsekit.save(compiled, tmp_path / f"{name}.safetensors")
        loaded = compile(_pruned_24(2), formats="dense")
        sparsekit.load(loaded, path)
        assert torch.equal(loaded(x), compiled(x))


def test_registered_with_unique_buffer_names():
    assert FORMATS["bitmap"] is Bitmap and FORMATS["nm"] is PackedNM
    sets = [frozenset(f.buffer_names) for f in FORMATS.values()]
    assert len(set(sets)) == len(sets)
