"""DynamicSparsity on SparseLinear layers (truly sparse DST) and SparseLinear persistence."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekit
from sparsekit import DynamicSparsity, SparseLinear
from sparsekit.checkpoint import expected_state
from sparsekit.engine.structure_set import StructureSet, sparse_layers
from sparsekit.prune import compute_masks

UPDATE_EVERY, END_STEP, STEPS = 5, 40, 30


def _dense_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)
    ).double()


def _sparse_copy(dense: nn.Sequential, masks: dict[str, torch.Tensor]) -> nn.Sequential:
    """``dense`` with every ``nn.Linear`` replaced by a SparseLinear keeping ``masks``."""
    out = copy.deepcopy(dense)
    for i, m in enumerate(out):
        if isinstance(m, nn.Linear):
            out[i] = SparseLinear.from_linear(m, masks[f"{i}.weight"])
    return out


def _sparse_mlp(sparsity: float = 0.8) -> nn.Sequential:
    dense = _dense_mlp()
    masks, _ = compute_masks(dense, sparsity, method="random", allocation="erk")
    return _sparse_copy(dense, masks)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
    return x, x[:, :5].argmax(1)


def _dst(model: nn.Module, method: str) -> tuple[torch.optim.Optimizer, DynamicSparsity]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ds = DynamicSparsity(model, opt, 0.8, method=method, every=UPDATE_EVERY,
                         end_step=END_STEP, seed=3)
    return opt, ds


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, ds: DynamicSparsity,
                step: int) -> None:
    x, y = _batch(step)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    ds.step()


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "srigl"])
def test_sparse_layers_train_like_masked_dense(backend, one_thread, method) -> None:
    # float64: the sparse and dense products round differently, and in float64 no
    # drop/grow score comes close enough to a neighbour for that to reorder them.
    dense = _dense_mlp()
    opt_d, ds_d = _dst(dense, method)
    sparse = _sparse_copy(dense, ds_d.masks.masks)
    opt_s, ds_s = _dst(sparse, method)
    initial = {n: m.clone() for n, m in ds_s.masks.masks.items()}
    for step in range(STEPS):
        _train_step(dense, opt_d, ds_d, step)
        _train_step(sparse, opt_s, ds_s, step)
        for n, layer in ds_s.masks.layers.items():
            assert torch.equal(ds_d.masks.masks[n], layer.mask), (step, n)
            assert layer.nnz == int(ds_d.masks.masks[n].sum())
            torch.testing.assert_close(layer.to_dense(), dense.get_submodule(n[:-7]).weight,
                                       rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(initial[n], m) for n, m in ds_s.masks.masks.items())
    if method in ("set", "rigl"):  # exact per-layer nnz
        assert {n: int(m.sum()) for n, m in initial.items()} == {
            n: layer.nnz for n, layer in ds_s.masks.layers.items()}


def test_dense_grad_is_captured_only_for_update_steps(one_thread) -> None:
    model = _sparse_mlp()
    opt, ds = _dst(model, "rigl")
    layers = list(sparse_layers(model).values())
    captured = []
    for step in range(2 * UPDATE_EVERY):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        captured.append(layers[0].dense_grad is not None)
        opt.step()
        ds.step()
    assert captured == [(s + 1) % UPDATE_EVERY == 0 for s in range(2 * UPDATE_EVERY)]


def test_snfs_stops_capturing_dense_gradients_once_its_updates_end(one_thread) -> None:
    """SNFS reads momenta of the dense gradients at its updates, so it captures them every
    step, but only until end_step: after it, sparse layers no longer compute dense
    gradients and the momenta stay as the last update left them."""
    model = _sparse_mlp()
    opt, ds = _dst(model, "snfs")
    layers = list(sparse_layers(model).values())
    for step in range(END_STEP + 2):
        assert all(layer.capture_dense_grad for layer in layers) == (step + 1 < END_STEP)
        if step + 1 == END_STEP:
            momenta = {n: m.clone() for n, m in ds._momenta.items()}
        _train_step(model, opt, ds, step)
    assert all(torch.equal(m, ds._momenta[n]) for n, m in momenta.items())


def test_captured_dense_grad_equals_autograd(backend) -> None:
    layer = _sparse_mlp()[0]
    x = torch.randn(7, 20, dtype=torch.float64)
    g = torch.randn(7, 48, dtype=torch.float64)
    layer.capture_dense_grad = True
    layer(x).backward(g)
    w = layer.to_dense().requires_grad_()
    (F.linear(x, w, layer.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(layer.dense_grad, w.grad, rtol=1e-12, atol=1e-12)


def test_rigl_regrows_where_the_dense_gradient_is_largest(one_thread) -> None:
    torch.manual_seed(1)
    layer = SparseLinear(30, 12, torch.rand(12, 30) < 0.3).double()
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay: drops are by |w|
    ds = DynamicSparsity(model, opt, 0.7, method="rigl", every=1, end_step=5)
    before, w = layer.mask, layer.to_dense()
    x, g = torch.randn(9, 30, dtype=torch.float64), torch.randn(9, 12, dtype=torch.float64)
    layer(x).backward(g)
    opt.step()
    assert ds.step()
    after = layer.mask
    grad = (g.t() @ x).abs()
    grown = after & ~before
    assert int(after.sum()) == int(before.sum()) and int(grown.sum()) > 0
    assert float(grad[grown].min()) >= float(grad[~after].max())
    assert torch.equal(layer.to_dense()[grown], torch.zeros(int(grown.sum()), dtype=w.dtype))
    survived = after & before
    assert torch.equal(layer.to_dense()[survived], w[survived])


def _trained(method: str = "rigl", steps: int = 12):
    model = _sparse_mlp()
    opt, ds = _dst(model, method)
    for step in range(steps):
        _train_step(model, opt, ds, step)
    return model, opt, ds


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_state_dict_round_trip_installs_the_saved_structure(one_thread) -> None:
    model, opt, _ = _trained()
    state = model.state_dict()
    assert state["0.rowptr"].dtype == torch.int32 and state["0.col"].dtype == torch.int32
    assert state["0.col"].numel() == model[0].nnz  # compact: no dense mask
    other = _sparse_mlp(0.5)  # another structure and number of nonzeros
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    values = other[0].values
    other.load_state_dict(state)
    assert other[0].values is values  # resized in place: the optimizer still holds it
    _assert_same_model(model, other)
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict aliases
    for m, o in ((model, opt), (other, other_opt)):  # one more step each: still identical
        x, y = _batch(99)
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    _assert_same_model(model, other)


def test_save_and_load_round_trip(tmp_path, one_thread) -> None:
    model, _, _ = _trained()
    sparsekit.save(model, tmp_path / "m.safetensors")
    other = _sparse_mlp(0.5)
    sparsekit.load(other, tmp_path / "m.safetensors")
    _assert_same_model(model, other)
    x, _ = _batch(0)
    assert torch.equal(model(x), other(x))


def test_invalid_structure_is_rejected() -> None:
    model = _sparse_mlp()
    state = model.state_dict()
    state["0.col"] = state["0.col"].flip(0).contiguous()  # not increasing within rows
    with pytest.raises(RuntimeError, match="col must hold increasing column indices"):
        _sparse_mlp(0.5).load_state_dict(state)
    with pytest.raises(ValueError, match="SparseLinear 0: col must hold"):
        expected_state(_sparse_mlp(0.5), state)  # what sparsekit.load checks first
    state = model.state_dict()
    state["2.rowptr"] = state["2.rowptr"] + 1
    with pytest.raises(ValueError, match="rowptr must rise from 0"):
        model[2].structure_from_state(state, "2.")
    state = model.state_dict()
    state["0.values"] = state["0.values"][:-1]
    with pytest.raises(ValueError, match="values has shape"):
        model[0].structure_from_state(state, "0.")


@pytest.mark.parametrize("method", ["rigl", "snfs"])
def test_resume_mid_run_reaches_the_same_masks(one_thread, method) -> None:
    full, _, full_ds = _trained(method, steps=STEPS)
    half, half_opt, half_ds = _trained(method, steps=13)
    saved = copy.deepcopy(
        (half.state_dict(), half_opt.state_dict(), half_ds.state_dict())
    )
    model = _sparse_mlp(0.5)
    opt, ds = _dst(model, method)
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    ds.load_state_dict(saved[2])
    for step in range(13, STEPS):
        _train_step(model, opt, ds, step)
    for n, m in full_ds.masks.masks.items():
        assert torch.equal(ds.masks.masks[n], m), n
    _assert_same_model(full, model)


def test_errors_name_the_parameter() -> None:
    model = _sparse_mlp()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="'granet' does not support SparseLinear"):
        DynamicSparsity(model, opt, 0.8, method="granet", end_step=10)
    s = StructureSet(model)
    with pytest.raises(ValueError, match="not a SparseLinear layer"):
        s.update({"1.weight": torch.ones(48, 20, dtype=torch.bool)})
    with pytest.raises(ValueError, match="expected \\(48, 20\\)"):
        s.update({"0.weight": torch.ones(20, 48, dtype=torch.bool)})
    before = {n: m.clone() for n, m in s.masks.items()}
    with pytest.raises(TypeError, match="masks\\['2.weight'\\] must be a bool tensor"):
        s.update({"0.weight": ~before["0.weight"], "2.weight": torch.ones_like(before["2.weight"],
                                                                           dtype=torch.float32)})
    assert all(torch.equal(s.masks[n], m) for n, m in before.items())  # checked before changing
    with pytest.raises(ValueError, match="no SparseLinear layers"):
        StructureSet(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="optimizer must be"):
        s.attach(object())  # type: ignore[arg-type]


def test_ddp_rigl_sparse_layers_stay_identical_on_two_ranks(ddp_dst_runs) -> None:
    r0, r1 = (r["rigl:sparse"] for r in ddp_dst_runs)
    assert len(r0["history"]) == 17
    first, last = r0["history"][0], r0["history"][-1]
    assert not torch.equal(first["module.0.weight"], last["module.0.weight"])
    for h0, h1 in zip(r0["history"], r1["history"]):
        for n in h0:
            assert torch.equal(h0[n], h1[n])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k


def test_ddp_follows_methods_that_resize_layers(tmp_path) -> None:
    """SNFS resizes SparseLinear layers; DDP used to fail the next backward (its reducer
    kept the old sizes), so DynamicSparsity refused it. Now DDP gets a new reducer."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        model = DDP(_sparse_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dst = DynamicSparsity(model, opt, 0.8, method="snfs", every=2, end_step=12)
        sizes = set()
        for t in range(12):
            x, y = _batch(t)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            dst.step()
            sizes.add(tuple(layer.nnz for layer in sparse_layers(model).values()))
        assert len(sizes) > 1  # the layers did trade weights
    finally:
        dist.destroy_process_group()


def test_structure_set_and_mask_set_are_both_masks(one_thread) -> None:
    from sparsekit.masks import Masks

    sparse = _sparse_mlp()
    structures = StructureSet(sparse)
    dense = _dense_mlp()
    masked = sparsekit.prune(dense, 0.8, method="random")
    assert isinstance(structures, Masks) and isinstance(masked, Masks)
    # The same call path reads dense gradients from either (no isinstance in DynamicSparsity).
    for masks, model in ((structures, sparse), (masked, dense)):
        masks.capture(True)
        x, y = _batch(0)
        F.cross_entropy(model(x), y).backward()
        grads = masks.dense_grads()
        assert set(grads) == set(masks.masks)
        for n, g in grads.items():
            assert g.shape == masks.masks[n].shape and (g[~masks.masks[n]] != 0).any(), n
        masks.capture(False)
