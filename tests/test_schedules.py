"""Sparse-training schedules: gradual, iterative with rewinding, dynamic (SET/RigL/SNFS), soup."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner, IterativePruning, soup
from sparsekit.masks import Masks
from sparsekit.schedules import Schedule, cubic_sparsity, dynamic
from sparsekit.schedules.dynamic import drop_fraction_at

DST_METHODS = sorted(dynamic.METHODS.names())  # every registered dynamic-sparsity method


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(step))
    return x, x[:, :4].argmax(1)


def train(model, opt, schedule, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        schedule.step()


def counts(masks) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.masks.items()}


# -- gradual ------------------------------------------------------------------------------

def test_cubic_schedule_values():
    kw = dict(initial=0.0, final=0.9, start=10, end=110)
    assert cubic_sparsity(0, **kw) == 0.0
    assert cubic_sparsity(10, **kw) == 0.0
    assert cubic_sparsity(60, **kw) == pytest.approx(0.9 + (0.0 - 0.9) * 0.5**3)
    assert cubic_sparsity(110, **kw) == 0.9
    assert cubic_sparsity(500, **kw) == 0.9


def test_gradual_pruner_follows_the_schedule_and_masks_only_shrink():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gp = GradualPruner(model, 0.9, start_step=10, end_step=100, every=10, optimizer=opt)
    previous = {n: m.clone() for n, m in gp.masks.masks.items()}
    for t in range(120):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if gp.step():
            for n, m in gp.masks.masks.items():
                assert not (m & ~previous[n]).any()  # never revives
                expected = gp.sparsity_at(gp.step_count)
                assert 1 - int(m.sum()) / m.numel() == pytest.approx(expected, abs=1 / m.numel())
            previous = {n: m.clone() for n, m in gp.masks.masks.items()}
        for n, p in gp.masks.params.items():
            assert (p[~gp.masks.masks[n]] == 0).all()
    assert gp.masks.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_gradual_pruner_rejects_bad_arguments_without_touching_the_model():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="initial_sparsity"):
        GradualPruner(model, 0.5, start_step=0, end_step=10, every=1, initial_sparsity=0.8)
    with pytest.raises(ValueError, match="start_step"):
        GradualPruner(model, 0.5, start_step=10, end_step=10, every=1)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        GradualPruner(model, 0.5, start_step=0, end_step=10, every=1, method="nope")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- iterative magnitude pruning with rewinding ---------------------------------------------

def test_imp_rewinds_survivors_to_step_k():
    model = mlp()
    imp = IterativePruning(model, rounds=3, sparsity=1 - 0.8**3, rewind_step=5)
    snapshot = None
    for r in range(3):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        imp.masks.attach(opt)
        for t in range(20):
            x, y = batch(t)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            imp.step()
            if r == 0 and t == 4:
                snapshot = copy.deepcopy(model.state_dict())
        imp.masks.detach(opt)
        more = imp.next_round(metrics={"round": r})
        assert more == (r < 2)
        for n, m in imp.masks.masks.items():
            w = dict(model.named_parameters())[n]
            assert torch.equal(w[m], snapshot[n][m])  # survivors rewound to step k
            assert (w[~m] == 0).all()
        assert imp.masks.sparsity() == pytest.approx(1 - 0.8 ** (r + 1), abs=1e-3)
    assert [h["round"] for h in imp.history] == [0, 1, 2]
    assert imp.history[2]["metrics"] == {"round": 2}
    # masks are nested across rounds
    for n in imp.history[0]["masks"]:
        assert not (imp.history[2]["masks"][n] & ~imp.history[1]["masks"][n]).any()


# -- dynamic sparse training ----------------------------------------------------------------

def test_drop_fraction_schedules():
    assert drop_fraction_at(0, initial=0.3, end_step=100, schedule="cosine") == pytest.approx(0.3)
    assert drop_fraction_at(50, initial=0.3, end_step=100, schedule="cosine") == pytest.approx(0.15)
    assert drop_fraction_at(25, initial=0.3, end_step=100, schedule="cosine") == pytest.approx(
        0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction_at(50, initial=0.3, end_step=100, schedule="linear") == pytest.approx(0.15)
    assert drop_fraction_at(50, initial=0.3, end_step=100, schedule="constant") == 0.3
    assert drop_fraction_at(100, initial=0.3, end_step=100, schedule="constant") == 0.0


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dst_preserves_layer_counts_and_resets_regrown(method, optimizer):
    model = mlp()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    dst = DynamicSparsity(model, opt, 0.8, method=method, every=10, end_step=200)
    initial = counts(dst.masks)
    assert dst.masks.sparsity() == pytest.approx(0.8, abs=1e-3)
    for t in range(100):
        old = {n: m.clone() for n, m in dst.masks.masks.items()}
        train(model, opt, dst, 1, start=t)
        assert counts(dst.masks) == initial
        for n, m in dst.masks.masks.items():
            grown = m & ~old[n]
            p = dst.masks.params[n]
            assert (p[~m] == 0).all()
            if grown.any() and (t + 1) % 10 == 0:
                assert (p[grown] == 0).all()  # regrown weights start at zero
                for v in opt.state[p].values():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape:
                        assert (v[grown] == 0).all()  # and with a fresh optimizer state


def test_rigl_grows_exactly_where_the_dense_gradient_is_largest():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: isolate the grow rule
    dst = DynamicSparsity(model, opt, 0.8, method="rigl", every=1, end_step=10,
                          drop_fraction=0.25, drop_schedule="constant")
    old = {n: m.clone() for n, m in dst.masks.masks.items()}
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    dense = {n: p.grad.clone() for n, p in dst.masks.params.items()}
    opt.step()
    dst.step()
    for n, new in dst.masks.masks.items():
        w = dst.masks.params[n]
        k = round(0.25 * int(old[n].sum()))
        kept_scores = w.detach().abs().masked_fill(~old[n], float("inf"))
        dropped_expected = torch.zeros_like(old[n]).flatten()
        dropped_expected[torch.argsort(kept_scores.flatten(), stable=True)[:k]] = True
        after_drop = old[n] & ~dropped_expected.reshape(old[n].shape)
        g = dense[n].abs().masked_fill(after_drop, float("-inf")).flatten()
        grown_expected = torch.zeros_like(g, dtype=torch.bool)
        grown_expected[torch.argsort(g, descending=True, stable=True)[:k]] = True
        assert torch.equal(new, after_drop | grown_expected.reshape(new.shape))


def test_set_grows_uniformly_among_inactive_weights():
    hits = torch.zeros(32, 12)
    inactive_total = torch.zeros(32, 12)
    for seed in range(40):
        model = mlp(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        dst = DynamicSparsity(model, opt, 0.8, method="set", every=1, end_step=10,
                              drop_fraction=0.3, drop_schedule="constant", seed=seed)
        old = dst.masks.masks["0.weight"].clone()
        train(model, opt, dst, 1)
        new = dst.masks.masks["0.weight"]
        hits += (new & ~old).float()
        inactive_total += (~old).float()
    rate = hits.sum() / inactive_total.sum()
    # Grown counts per position are Binomial; a chi-square-like check on row totals.
    rows_expected = inactive_total.sum(1) * rate
    rows_observed = hits.sum(1)
    chi2 = float(((rows_observed - rows_expected) ** 2 / rows_expected).sum())
    assert chi2 < 70  # 31 dof: p ≈ 1e-4 bound; a magnitude-biased grow fails this by far


def test_snfs_keeps_the_total_and_moves_weights_between_layers():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = DynamicSparsity(model, opt, 0.8, method="snfs", every=10, end_step=200)
    total = sum(counts(dst.masks).values())
    train(model, opt, dst, 100)
    assert sum(counts(dst.masks).values()) == total


def test_granet_prunes_on_the_cubic_schedule_then_drops_and_grows():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = DynamicSparsity(model, opt, 0.9, method="granet", initial_sparsity=0.5,
                          every=10, end_step=100)
    assert dst.masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    for t in range(120):
        train(model, opt, dst, 1, start=t)
        if dst.is_update_step(dst.step_count):
            expected = cubic_sparsity(dst.step_count, initial=0.5, final=0.9, start=0, end=90)
            assert dst.masks.sparsity() == pytest.approx(expected, abs=1e-3)
    assert dst.masks.sparsity() == pytest.approx(0.9, abs=1e-3)  # at the last update, step 90


def test_granet_reaches_its_sparsity_at_its_last_update():
    # with the schedule ending at end_step, the one update (step 100) stopped at 0.885
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = DynamicSparsity(model, opt, 0.9, method="granet", initial_sparsity=0.5,
                          every=100, end_step=150)
    train(model, opt, dst, 160)
    assert dst.masks.sparsity() == pytest.approx(0.9, abs=1e-3)


def fan_ins(mask: torch.Tensor) -> set[int]:
    rows = mask.flatten(1).sum(1)
    return {int(r) for r in rows if r > 0}


def test_srigl_keeps_constant_fan_in_and_ablates_weak_neurons():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = DynamicSparsity(model, opt, 0.8, method="srigl", every=10, end_step=200)
    budgets = counts(dst.masks)
    for m in dst.masks.masks.values():
        assert len(fan_ins(m)) == 1  # one fan-in per layer from the start
    train(model, opt, dst, 100)
    for n, m in dst.masks.masks.items():
        assert len(fan_ins(m)) == 1
        alive = int(m.flatten(1).any(1).sum())
        assert budgets[n] - alive < int(m.sum()) <= budgets[n]
    # With a demanding saliency threshold neurons get ablated and the rest widen.
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = DynamicSparsity(model, opt, 0.8, method="srigl", every=10, end_step=200,
                          salient_fraction=0.95, drop_fraction=0.5)
    before = {n: int(m.flatten(1).any(1).sum()) for n, m in dst.masks.masks.items()}
    train(model, opt, dst, 50)
    after = {n: int(m.flatten(1).any(1).sum()) for n, m in dst.masks.masks.items()}
    assert any(after[n] < before[n] for n in before)
    for m in dst.masks.masks.values():
        assert len(fan_ins(m)) == 1


def test_srigl_ablates_a_neuron_of_few_salient_weights_at_the_default_fractions():
    """Lasby et al. 2023 count salient weights over the layer (its largest kept |w| and
    largest other |grad|): a neuron of tiny weights and gradients has none and is ablated,
    its budget going to the others (fan-in 16 // 3 = 5). Counted row by row, every neuron
    had fan_in - drop salient weights and none was ever ablated at 0.3 / 0.3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    dst = DynamicSparsity(model, opt, 0.5, method="srigl", allocation="uniform", every=2,
                          end_step=10, drop_fraction=0.3, drop_schedule="constant")
    with torch.no_grad():
        model[0].weight[0] *= 1e-4
    x = torch.randn(32, 8)
    for _ in range(2):
        opt.zero_grad()
        (model(x) * torch.tensor([1e-4, 1.0, 1.0, 1.0])).sum().backward()
        opt.step()
        dst.step()
    assert dst.masks.masks["0.weight"].sum(1).tolist() == [0, 5, 5, 5]


def test_srigl_with_a_budget_below_the_neurons_keeps_every_layer_alive():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = DynamicSparsity(model, opt, 0.9, method="srigl", allocation="uniform", every=1,
                          end_step=50)
    for _ in range(6):  # the start and five updates
        assert counts(dst.masks)["0.weight"] == 13  # fewer than its 16 neurons: fan-in 1
        for m in dst.masks.masks.values():
            assert m.any() and len(fan_ins(m)) == 1
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        opt.step()
        assert dst.step()


def test_dst_bad_arguments():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accepted: granet, rigl, set, snfs, srigl"):
        DynamicSparsity(model, opt, 0.8, method="nope", end_step=10)
    with pytest.raises(ValueError, match="drop_schedule"):
        DynamicSparsity(model, opt, 0.8, drop_schedule="nope", end_step=10)
    with pytest.raises(ValueError, match="sparsity"):
        DynamicSparsity(model, opt, 1.2, end_step=10)


@pytest.mark.parametrize("method", DST_METHODS)
def test_resume_reaches_the_same_masks_and_weights(tmp_path, method):
    def run(stop_at: int | None):
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        dst = DynamicSparsity(model, opt, 0.8, method=method, every=10, end_step=150,
                              seed=3)
        if stop_at is None:
            train(model, opt, dst, 100)
            return model, dst
        train(model, opt, dst, stop_at)
        sparsekit.save(model, tmp_path / "ckpt.safetensors", dst.masks)
        torch.save({"opt": opt.state_dict(), "dst": dst.state_dict()}, tmp_path / "state.pt")
        # a new process would rebuild everything from scratch:
        model2 = mlp(seed=99)
        opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
        dst2 = DynamicSparsity(model2, opt2, 0.8, method=method, every=10,
                               end_step=150, seed=3)
        sparsekit.load(model2, tmp_path / "ckpt.safetensors")
        state = torch.load(tmp_path / "state.pt", weights_only=False)
        opt2.load_state_dict(state["opt"])
        dst2.load_state_dict(state["dst"])
        train(model2, opt2, dst2, 100 - stop_at, start=stop_at)
        return model2, dst2

    a, dst_a = run(None)
    b, dst_b = run(45)
    for n in dst_a.masks.masks:
        assert torch.equal(dst_a.masks.masks[n], dst_b.masks.masks[n])
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na


@pytest.mark.parametrize("method", DST_METHODS)
def test_ddp_masks_identical_on_two_ranks(ddp_dst_runs, method):
    r0, r1 = (r[method] for r in ddp_dst_runs)
    assert len(r0["history"]) == 17  # updates at steps 10, 20, …, 170
    for h0, h1 in zip(r0["history"], r1["history"]):
        for n in h0:
            assert torch.equal(h0[n], h1[n])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])


# -- soup -----------------------------------------------------------------------------------

def test_soup_averages_and_keeps_the_mask():
    base = mlp()
    masks = sparsekit.prune(base, 0.7)
    models = []
    for seed in range(3):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        sparsekit.MaskSet(m, masks.masks).attach(opt)
        for t in range(5):
            x, y = batch(seed * 100 + t)
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        models.append(m)
    s = soup(models)
    for n, mask in masks.masks.items():
        w = dict(s.named_parameters())[n]
        assert (w[~mask] == 0).all()
        expected = torch.stack([dict(m.named_parameters())[n] for m in models]).mean(0)
        assert torch.allclose(w, expected)
    assert s is not models[0]


def test_soup_rejects_mismatched_masks():
    a, b = mlp(), mlp()
    sparsekit.prune(a, 0.5)
    sparsekit.prune(b, 0.5, method="random")
    with pytest.raises(ValueError, match="different mask"):
        soup([a, b])
    with pytest.raises(ValueError, match="architecture"):
        soup([a, nn.Sequential(nn.Linear(12, 8))])


# -- one protocol, one vocabulary -----------------------------------------------------------

def _gradual(model, opt):
    return GradualPruner(model, 0.8, start_step=10, end_step=80, every=10, optimizer=opt)


def _iterative(model, opt):
    return IterativePruning(model, rounds=4, sparsity=0.8, rewind_step=5, optimizer=opt)


def _dynamic(model, opt):
    return DynamicSparsity(model, optimizer=opt, sparsity=0.8, method="rigl", every=10,
                           end_step=80, seed=3)


SCHEDULES = {"gradual": _gradual, "iterative": _iterative, "dynamic": _dynamic}


def _run(build, model, opt, schedule, steps, start=0):
    """Train; IterativePruning ends a round every 20 steps."""
    for t in range(start, start + steps):
        train(model, opt, schedule, 1, start=t)
        if build is _iterative and (t + 1) % 20 == 0:
            schedule.next_round()


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_implements_the_protocol(name):
    model = mlp()
    schedule = SCHEDULES[name](model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(schedule, Schedule)
    assert isinstance(schedule.masks, Masks)
    assert schedule.step() in (True, False)


@pytest.mark.parametrize("name", SCHEDULES)
def test_state_dict_round_trips_mid_run_exactly(name):
    build = SCHEDULES[name]
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = build(model, opt)
    _run(build, model, opt, schedule, 45)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "schedule": schedule.state_dict()})
    _run(build, model, opt, schedule, 45, start=45)

    model2 = mlp(seed=99)  # a fresh process rebuilds everything, then loads
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    schedule2 = build(model2, opt2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    schedule2.load_state_dict(saved["schedule"])
    _run(build, model2, opt2, schedule2, 45, start=45)

    assert schedule2.masks.sparsity() > 0
    for n, m in schedule.masks.masks.items():
        assert torch.equal(m, schedule2.masks.masks[n]), n
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert schedule.state_dict()["step"] == schedule2.state_dict()["step"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_optimizer_keyword_keeps_masked_weights_at_zero(name):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    schedule = SCHEDULES[name](model, opt)
    schedule.masks.update({n: torch.rand(m.shape) > 0.5 for n, m in schedule.masks.masks.items()})
    train(model, opt, schedule, 3)
    for n, p in schedule.masks.params.items():
        assert (p[~schedule.masks.masks[n]] == 0).all(), n


def test_iterative_sparsity_is_the_final_target():
    model = mlp()
    imp = IterativePruning(model, rounds=3, sparsity=0.9, rewind_step=0)
    assert imp.rate_per_round == pytest.approx(1 - 0.1 ** (1 / 3))
    assert imp.target_sparsity(0) == pytest.approx(imp.rate_per_round)
    assert imp.target_sparsity(2) == 0.9
    while imp.next_round():
        pass
    assert imp.masks.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_old_spellings_warn_and_mean_the_same():
    with pytest.warns(DeprecationWarning) as record:
        old = GradualPruner(mlp(), final_sparsity=0.6, start_step=0, end_step=10, every=1,
                            criterion="random")
    assert [str(w.message) for w in record] == [
        "GradualPruner(): final_sparsity= is deprecated, use sparsity=",
        "GradualPruner(): criterion= is deprecated, use method=",
    ]
    assert all(w.filename == __file__ for w in record)  # points at the caller
    new = GradualPruner(mlp(), 0.6, start_step=0, end_step=10, every=1, method="random")
    assert counts(old.masks) == counts(new.masks)
    with pytest.warns(DeprecationWarning, match=r"GradualPruner.final_sparsity is deprecated"):
        assert old.final_sparsity == 0.6

    with pytest.warns(DeprecationWarning) as record:
        old = IterativePruning(mlp(), rounds=3, rate_per_round=0.2, rewind_step=0,
                               criterion="magnitude")
    assert sorted(str(w.message).split(" is ")[0] for w in record) == [
        "IterativePruning(): criterion=", "IterativePruning(): rate_per_round="]
    assert all(w.filename == __file__ for w in record)
    assert old.sparsity == pytest.approx(1 - 0.8**3)
    assert [old.target_sparsity(r) for r in range(3)] == pytest.approx([0.2, 0.36, 0.488])

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(DeprecationWarning, match=r"update_every= is deprecated, use every="):
        dst = DynamicSparsity(model, opt, 0.8, update_every=7, end_step=50)
    assert dst.every == 7
    with pytest.warns(DeprecationWarning, match=r"DynamicSparsity.update_every is deprecated"):
        assert dst.update_every == 7


def test_both_spellings_are_a_type_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(start_step=0, end_step=10, every=1)
    with pytest.raises(TypeError, match=r"both final_sparsity= and sparsity="):
        GradualPruner(model, 0.5, final_sparsity=0.5, **kw)
    with pytest.raises(TypeError, match=r"both final_sparsity= and sparsity="):
        GradualPruner(model, sparsity=0.5, final_sparsity=0.5, **kw)
    with pytest.raises(TypeError, match=r"both criterion= and method="):
        GradualPruner(model, 0.5, method="random", criterion="random", **kw)
    with pytest.raises(TypeError, match=r"both rate_per_round= and sparsity="):
        IterativePruning(model, rounds=2, sparsity=0.5, rate_per_round=0.3, rewind_step=0)
    with pytest.raises(TypeError, match=r"'sparsity'"):
        IterativePruning(model, rounds=2, rewind_step=0)
    with pytest.raises(TypeError, match=r"both update_every= and every="):
        DynamicSparsity(model, opt, 0.8, every=5, update_every=5, end_step=10)


def test_dst_refuses_an_optimizer_another_mask_set_of_its_weights_keeps():
    # the static MaskSet's after-step hook zeroed every connection RigL regrew, silently
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static = sparsekit.prune(model, 0.5)
    static.attach(opt)
    assert sparsekit.masks.keeping(opt) == [static]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = len(opt._optimizer_step_pre_hooks)
    with pytest.raises(ValueError, match=r"optimizer keeps another MaskSet of these weights "
                                         r"through its steps \(0.weight, 2.weight\).*"
                                         r"masks.detach\(optimizer\)"):
        DynamicSparsity(model, opt, 0.5, method="rigl", every=2, end_step=10)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert len(opt._optimizer_step_pre_hooks) == hooks
    static.detach(opt)
    assert sparsekit.masks.keeping(opt) == []
    ds = DynamicSparsity(model, opt, 0.5, method="rigl", every=2, end_step=10)
    assert sparsekit.masks.keeping(opt) == [ds.masks]
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    static.attach(other)  # another optimizer's masks do not fight this one's
    ds.detach()
    ds.attach(opt)


@pytest.mark.parametrize(("kind", "options", "field"), [
    ("dynamic", {"sparsity": 0.5}, "sparsity=0.7"),
    ("dynamic", {"method": "srigl"}, "method='rigl'"),
    ("gradual", {"sparsity": 0.5}, "sparsity=0.7"),
    ("gradual", {"end_step": 12}, "end_step=10"),
])
def test_a_run_resumes_only_into_a_schedule_of_its_settings(kind, options, field):
    """A 0.7 run's state loaded into a 0.5 schedule trained on at 0.7 while ``sparsity``
    said 0.5; a RigL run's masks resumed into SRigL broke its constant fan-in. The state
    records the settings, and a schedule of others refuses it, unchanged."""
    def build(model, **kw):
        if kind == "dynamic":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            args = {"sparsity": 0.7, "method": "rigl", "every": 2, "end_step": 10} | kw
            return DynamicSparsity(model, opt, args.pop("sparsity"), **args)
        args = {"sparsity": 0.7, "start_step": 0, "end_step": 10, "every": 2} | kw
        return GradualPruner(model, args.pop("sparsity"), **args)

    state = build(mlp()).state_dict()
    model = mlp()
    schedule = build(model, **options)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"state\['settings'\] is of a run with {field}"):
        schedule.load_state_dict(state)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert schedule.step_count == 0
    assert state["settings"] == build(mlp()).settings()
    build(mlp()).load_state_dict(state)  # the same settings resume


def test_gradual_pruner_refuses_the_masks_of_a_run_with_another_pattern():
    # accepted, they were AND-ed with 2:4 masks at the next update and labelled '2:4'
    # without following it
    other = GradualPruner(mlp(), 0.5, start_step=0, end_step=10, every=2)
    model = mlp()
    pruner = GradualPruner(model, 0.5, start_step=0, end_step=10, every=2, pattern="2:4")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = other.state_dict()
    with pytest.raises(ValueError, match=r"state\['settings'\] is of a run with "
                                         r"pattern='unstructured', this GradualPruner has "
                                         r"pattern='2:4'"):
        pruner.load_state_dict(state)
    del state["settings"]  # a state saved before the settings were: its masks are checked
    with pytest.raises(ValueError, match=r"state\['masks'\] follow pattern 'unstructured', this "
                                         r"GradualPruner prunes to '2:4'"):
        pruner.load_state_dict(state)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert pruner.masks.pattern == "2:4" and pruner.step_count == 0
    pruner.load_state_dict(pruner.state_dict())  # its own state loads
