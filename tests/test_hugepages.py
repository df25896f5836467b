"""Weights on transparent huge pages (sparsekit.engine.hugepages): what moves, what stays,
and that a placed model computes, trains, copies and saves exactly as before."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.engine import hugepages
from sparsekit.engine.hugepages import HUGE_PAGE_BYTES, on_huge_pages, place

needs_thp = pytest.mark.skipif(not hugepages.available(),
                               reason="no transparent huge pages on this system")
BIG = HUGE_PAGE_BYTES // 4 + 1024  # float32 elements: just over one huge page


@needs_thp
def test_a_large_tensor_moves_to_an_aligned_advised_mapping_with_its_values():
    t = torch.randn(BIG)
    placed = place(t)
    assert placed is not t and torch.equal(placed, t) and placed.dtype == t.dtype
    assert placed.data_ptr() % HUGE_PAGE_BYTES == 0
    assert on_huge_pages(placed) and not on_huge_pages(t)
    assert place(placed) is placed  # placing again costs nothing
    codes = torch.randint(-127, 128, (2048, 1100), dtype=torch.int8)  # 2.1 MiB of int8
    assert torch.equal(place(codes), codes) and place(codes).shape == codes.shape


@pytest.mark.parametrize("case", ["small", "view", "strided", "meta", "quantized"])
def test_tensors_that_cannot_move_are_returned_as_they_are(case):
    big = torch.randn(2 * BIG)
    t = {
        "small": torch.randn(HUGE_PAGE_BYTES // 4 - 1),  # one element under a huge page
        "view": big[:BIG],  # part of a larger storage: moving it would split the storage
        "strided": big.view(2, BIG).t(),
        "meta": torch.empty(2 * BIG, device="meta"),
        "quantized": torch.quantize_per_tensor(big, 0.1, 0, torch.qint8),
    }[case]
    assert place(t) is t


@needs_thp
def test_a_module_moves_in_place_keeping_parameters_ties_and_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 8))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("table", torch.randn(BIG))
    weight, before = model[0].weight, copy.deepcopy(model)
    assert place(model) is model
    assert model[0].weight is weight and model[1].weight is weight and weight.requires_grad
    assert on_huge_pages(weight) and on_huge_pages(model.table)
    assert not on_huge_pages(model[2].weight)  # 32 KiB: stays where it was
    x = torch.randn(4, 1024)
    assert torch.equal(model(x), before(x)) and torch.equal(model.table, before.table)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reference = torch.optim.Adam(before.parameters(), lr=1e-3)
    for m, opt in ((model, optimizer), (before, reference)):
        m(x).square().sum().backward()
        opt.step()
    assert torch.equal(model[0].weight, before[0].weight) and on_huge_pages(weight)
    assert model[1].weight is model[0].weight
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_place_names_what_it_takes():
    with pytest.raises(TypeError, match="obj must be an nn.Module or a torch.Tensor, got list"):
        place([torch.ones(3)])


def test_nothing_moves_where_the_kernel_never_gives_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_ENABLED", setting)
    hugepages.available.cache_clear()
    try:
        assert not hugepages.available()
        t = torch.randn(BIG)
        assert place(t) is t and not on_huge_pages(t)
    finally:
        hugepages.available.cache_clear()


@needs_thp
def test_compile_leaves_large_weights_on_huge_pages_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16))
    sparsekit.prune(model, 0.5, method="magnitude")
    x = torch.randn(2, 1024)
    compiled = sparsekit.compile(model, x, formats=["dense", "bitmap"], rows=(1, 2), cache=False)
    large = [t for t in compiled.state_dict().values() if t.numel() * t.element_size()
             >= HUGE_PAGE_BYTES]
    assert large and all(on_huge_pages(t) for t in large)
    assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "compiled.safetensors"
    sparsekit.save(compiled, path)
    fresh = sparsekit.compile(model, x, formats=["dense", "bitmap"], rows=(1, 2), cache=False)
    sparsekit.load(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                   compiled.state_dict().values(), strict=True))
