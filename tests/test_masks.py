"""MaskSet: masks hold through every optimizer, state never leaks, bookkeeping is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsekit
from sparsekit import MaskSet

STEPS = 200
WEIGHTS = ("0.weight", "2.weight")



pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g)
    return x, (x @ teacher).argmax(1)


def step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> float:
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def hook_counts(opt: torch.optim.Optimizer) -> tuple[int, int]:
    return len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


def _tensor_states(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.shape == p.shape
    }


# -- masks hold through every optimizer configuration -------------------------------------

BASE = {
    "sgd": (torch.optim.SGD, {"lr": 0.05}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd_wd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adam_wd": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "rmsprop_momentum": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.9}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.05}),
}
# State tensors each optimizer must have for the weights after training.
EXPECTED_STATE = {
    "sgd": set(),
    "sgd_momentum": {"momentum_buffer"},
    "sgd_nesterov": {"momentum_buffer"},
    "sgd_wd_momentum": {"momentum_buffer"},
    "adam": {"exp_avg", "exp_avg_sq"},
    "adam_wd": {"exp_avg", "exp_avg_sq"},
    "adamw": {"exp_avg", "exp_avg_sq"},
    "rmsprop_momentum": {"square_avg", "momentum_buffer"},
    "adagrad": {"sum"},
}
FUSED = ("sgd", "sgd_momentum", "sgd_nesterov", "sgd_wd_momentum", "adam", "adam_wd", "adamw")

CONFIGS = []
for _name in BASE:
    CONFIGS.append((_name, "default"))
    CONFIGS.append((_name, "foreach"))
    CONFIGS.append((_name, "for-loop"))
    if _name in FUSED:
        CONFIGS.append((_name, "fused"))
CONFIGS += [("sgd_momentum", "gradscaler"), ("adam", "gradscaler")]

VARIANT_KWARGS = {
    "default": {},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
    "fused": {"fused": True},
    "gradscaler": {},
}


def _train_masked(name: str, variant: str):
    model = mlp()
    x, y = data()
    ms = sparsekit.prune(model, 0.8)
    cls, kwargs = BASE[name]
    try:
        opt = cls(model.parameters(), **kwargs, **VARIANT_KWARGS[variant])
    except (RuntimeError, ValueError) as err:  # pragma: no cover - depends on the torch build
        if "not supported" in str(err):
            pytest.skip(f"{name}/{variant}: {err}")
        raise
    ms.attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    scaler = torch.amp.GradScaler("cpu") if variant == "gradscaler" else None
    for _ in range(STEPS):
        if scaler is None:
            losses.append(step(model, opt, x, y))
            continue
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return model, ms, opt, before, losses


@pytest.mark.parametrize(("name", "variant"), CONFIGS, ids=[f"{n}-{v}" for n, v in CONFIGS])
def test_masks_hold_through_training(name, variant):
    model, ms, opt, before, losses = _train_masked(name, variant)
    params = dict(model.named_parameters())
    assert sorted(ms.masks) == sorted(WEIGHTS)
    assert {n: int(m.sum()) for n, m in ms.masks.items()} == {"0.weight": 102, "2.weight": 26}
    assert ms.sparsity() == 1 - 128 / 640
    for n, p in params.items():
        assert not torch.isnan(p).any(), n
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert not torch.isnan(v).any(), (n, k)
    for n in WEIGHTS:
        w, mask = params[n].detach(), ms.masks[n]
        assert (w[~mask] == 0).all(), n
        assert not torch.signbit(w[~mask]).any(), n  # exactly +0.0
        changed = (w != before[n])[mask].float().mean()
        assert changed > 0.5, f"{n}: only {changed:.2f} of the kept weights trained"
        states = _tensor_states(opt, params[n])
        assert EXPECTED_STATE[name] <= set(states), sorted(states)
        for k, v in states.items():
            assert (v[~mask] == 0).all(), (n, k)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))


def test_loss_decreases_while_masked():
    model, ms, _, _, losses = _train_masked("adam", "default")
    assert losses[-1] < 0.5 * losses[0]
    x, y = data()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.8
    assert ms.sparsity() > 0.79


def test_skipped_gradscaler_step_changes_nothing():
    model = mlp()
    x, y = data()
    ms = sparsekit.prune(model, 0.8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ms.attach(opt)
    scaler = torch.amp.GradScaler("cpu")
    step(model, opt, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert scaler.get_scale() == 65536.0 * 0.5


# -- optimizer state does not leak back -----------------------------------------------------

def _dense_then_sparse_adam():
    model = mlp()
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        step(model, opt, x, y)
    w = model[0].weight
    assert (opt.state[w]["exp_avg"] != 0).all()
    assert (opt.state[w]["exp_avg_sq"] != 0).all()
    ms = sparsekit.prune(model, 0.8)
    ms.attach(opt)
    return model, x, y, opt, ms


def test_attach_clears_existing_state_at_masked_positions():
    model, _, _, opt, ms = _dense_then_sparse_adam()
    w, mask = model[0].weight, ms.masks["0.weight"]
    for k in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[w][k][~mask] == 0).all()
        assert (opt.state[w][k][mask] != 0).all()  # kept state is untouched


def test_regrown_weights_start_from_zero_with_clean_state():
    model, x, y, opt, ms = _dense_then_sparse_adam()
    for _ in range(10):
        step(model, opt, x, y)
    w = model[0].weight
    old = ms.masks["0.weight"].clone()
    assert int(old.sum()) == 102
    ms.capture(True)  # the dense gradient, as RigL reads it: masked at backward otherwise
    F.cross_entropy(model(x), y).backward()  # regrow where the gradient is nonzero (as RigL)
    ms.capture(False)
    candidates = torch.nonzero((~old & (w.grad != 0)).view(-1)).flatten()
    assert candidates.numel() >= 50
    opt.zero_grad()
    grow = torch.zeros_like(old)
    grow.view(-1)[candidates[:50]] = True
    drop = torch.zeros_like(old)
    drop.view(-1)[torch.nonzero(old.view(-1)).flatten()[:7]] = True
    new = (old | grow) & ~drop
    ms.update({"0.weight": new})

    assert torch.equal(ms.masks["0.weight"], new)
    assert int(ms.masks["0.weight"].sum()) == 102 + 50 - 7
    assert ms.layer_sparsity()["0.weight"] == 1 - 145 / 512
    assert (w[grow] == 0).all()
    assert (w[drop] == 0).all()
    assert (opt.state[w]["exp_avg"][grow] == 0).all()
    assert (opt.state[w]["exp_avg_sq"][grow] == 0).all()
    assert (opt.state[w]["exp_avg"][old & ~drop] != 0).any()  # kept state is untouched

    for _ in range(20):
        step(model, opt, x, y)
    assert (w[~new] == 0).all()
    assert (w[grow] != 0).all()  # regrown weights train again
    for k in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[w][k][~new] == 0).all()


def test_update_validates_before_changing_anything():
    model, _, _, opt, ms = _dense_then_sparse_adam()
    saved = ms.state_dict()["masks"]
    ones = torch.ones(32, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="0.bias"):
        ms.update({"0.weight": ones, "0.bias": torch.ones(32, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"\(4, 32\)"):
        ms.update({"0.weight": ones, "2.weight": torch.ones(32, 4, dtype=torch.bool)})
    for n in WEIGHTS:
        assert torch.equal(ms.masks[n], saved[n])


def test_load_state_dict_regrowth_does_not_leak_state():
    model, _, _, opt, ms = _dense_then_sparse_adam()
    w = model[0].weight
    old = ms.masks["0.weight"].clone()
    state = ms.state_dict()
    state["masks"]["0.weight"] = torch.ones_like(old)
    ms.load_state_dict(state)  # right after attach, before any step
    grown = ~old
    assert (w[grown] == 0).all()
    assert (opt.state[w]["exp_avg"][grown] == 0).all()
    assert (opt.state[w]["exp_avg_sq"][grown] == 0).all()


# -- attach / detach / remove ---------------------------------------------------------------

def test_attach_is_idempotent_and_type_checked():
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert hook_counts(opt) == (0, 0)
    assert ms.attach(opt) is ms
    assert ms.attach(opt) is ms
    assert hook_counts(opt) == (1, 1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ms.attach(model)


def test_attach_zeroes_weights_that_were_revived():
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ms.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.equal(model[0].weight, ms.masks["0.weight"].float())


def test_detach_stops_enforcement():
    model = mlp()
    x, y = data()
    ms = sparsekit.prune(model, 0.8)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=1e-2)
    ms.attach(opt)
    step(model, opt, x, y)
    w, mask = model[0].weight, ms.masks["0.weight"]
    assert (w[~mask] == 0).all()

    ms.detach()
    assert hook_counts(opt) == (0, 0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = w.grad.clone()
    assert (grad[~mask] != 0).sum() > 100  # masked weights get real gradients
    opt.step()
    # plain SGD on a zero weight: 0 - lr * (grad + wd * 0)
    expected = torch.zeros_like(grad).add_(grad, alpha=-lr)
    assert torch.equal(w.detach()[~mask], expected[~mask])
    assert torch.equal(w[~mask] != 0, grad[~mask] != 0)
    assert torch.equal(ms.masks["0.weight"], mask)  # masks are kept, only enforcement stops


def test_detach_one_of_two_optimizers():
    model = mlp()
    x, y = data()
    ms = sparsekit.prune(model, 0.8)
    opt0 = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt2 = torch.optim.SGD(model[2].parameters(), lr=0.1)
    ms.attach(opt0).attach(opt2)
    ms.detach(opt0)
    assert hook_counts(opt0) == (0, 0)
    assert hook_counts(opt2) == (1, 1)

    for opt in (opt0, opt2):
        opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt0.step()  # no longer enforced
    assert (model[0].weight[~ms.masks["0.weight"]] != 0).any()
    opt2.step()  # still enforced (its hooks zero every masked weight of the MaskSet)
    for n in WEIGHTS:
        assert (dict(model.named_parameters())[n][~ms.masks[n]] == 0).all()
    ms.detach(opt0)  # detaching twice is harmless
    assert hook_counts(opt2) == (1, 1)


def test_remove_bakes_zeros_and_drops_hooks():
    model = mlp()
    x, y = data()
    ms = sparsekit.prune(model, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ms.attach(opt)
    masks = ms.state_dict()["masks"]
    with torch.no_grad():
        model[0].weight.add_(1.0)  # revive everything; remove() must bake the zeros back
    ms.remove()
    assert ms.masks == {} and ms.params == {}
    assert ms.sparsity() == 0.0 and ms.layer_sparsity() == {}
    assert hook_counts(opt) == (0, 0)
    assert (model[0].weight[~masks["0.weight"]] == 0).all()
    assert int((model[0].weight == 0).sum()) == 512 - 102
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = model[0].weight.grad.clone()
    opt.step()  # nothing enforces the zeros any more: 0 - lr * grad
    dropped = ~masks["0.weight"]
    assert (grad[dropped] != 0).sum() > 100
    assert torch.equal(model[0].weight.detach()[dropped], (-0.1 * grad)[dropped])


# -- sparsity numbers, state_dict -----------------------------------------------------------

def _hand_masks() -> dict[str, torch.Tensor]:
    m0 = torch.zeros(32, 16, dtype=torch.bool)
    m0[:8] = True  # 128 of 512 kept
    m2 = torch.zeros(4, 32, dtype=torch.bool)
    m2[0, :5] = True  # 5 of 128 kept
    return {"0.weight": m0, "2.weight": m2}


def test_sparsity_exact_numbers():
    ms = MaskSet(mlp(), _hand_masks())
    assert ms.layer_sparsity() == {"0.weight": 0.75, "2.weight": 1 - 5 / 128}
    assert ms.sparsity() == 1 - (128 + 5) / 640
    assert MaskSet(mlp(), {}).sparsity() == 0.0
    assert MaskSet(mlp(), {"0.bias": torch.ones(32, dtype=torch.bool)}).sparsity() == 0.0
    assert repr(ms) == "MaskSet(2 tensors, sparsity=0.7922, pattern='unstructured')"


def test_constructor_does_not_apply_but_apply_does():
    model = mlp()
    ms = MaskSet(model, _hand_masks(), pattern="fanin")
    assert ms.pattern == "fanin"
    assert int((model[0].weight == 0).sum()) == 0
    assert ms.apply() is ms
    assert int((model[0].weight == 0).sum()) == 512 - 128
    assert int((model[2].weight == 0).sum()) == 128 - 5
    assert (model[0].bias != 0).all()


def test_state_dict_round_trip_onto_another_model():
    ms = MaskSet(mlp(0), _hand_masks(), pattern="fanin")
    state = ms.state_dict()
    assert state["pattern"] == "fanin"
    state["masks"]["0.weight"].fill_(True)  # a copy: the MaskSet is unaffected
    assert int(ms.masks["0.weight"].sum()) == 128

    other = mlp(1)
    fresh = MaskSet(other, {})
    fresh.load_state_dict(ms.state_dict())
    assert fresh.pattern == "fanin"
    assert sorted(fresh.masks) == sorted(WEIGHTS)
    for n in WEIGHTS:
        assert torch.equal(fresh.masks[n], ms.masks[n])
        assert fresh.params[n] is dict(other.named_parameters())[n]
        w = dict(other.named_parameters())[n]
        assert (w[~fresh.masks[n]] == 0).all()
        assert (w[fresh.masks[n]] != 0).all()
    assert fresh.layer_sparsity() == ms.layer_sparsity()


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        ({"0.wieght": torch.ones(32, 16, dtype=torch.bool)}, "0.wieght"),
        ({"0.weight": torch.ones(16, 32, dtype=torch.bool)}, r"\(16, 32\)"),
        ({"2.weight": [[True] * 32] * 4}, "list"),
    ],
    ids=["wrong-name", "wrong-shape", "not-a-tensor"],
)
def test_load_state_dict_rejects_bad_masks_and_changes_nothing(masks, match):
    model = mlp()
    ms = MaskSet(model, _hand_masks()).apply()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        ms.load_state_dict({"pattern": "2:4", "masks": masks})
    with pytest.raises(ValueError, match="masks"):
        ms.load_state_dict({"pattern": "2:4"})
    assert ms.pattern == "unstructured"
    assert sorted(ms.masks) == sorted(WEIGHTS)
    for n, m in _hand_masks().items():
        assert torch.equal(ms.masks[n], m)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n])


# -- constructor validation -------------------------------------------------------------------

def test_constructor_validation():
    model = mlp()
    with pytest.raises(ValueError, match="'fc1.weight' that is not a parameter"):
        MaskSet(model, {"fc1.weight": torch.ones(32, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(32, 15\), expected \(32, 16\)"):
        MaskSet(model, {"0.weight": torch.ones(32, 15, dtype=torch.bool)})
    with pytest.raises(TypeError, match="nn.Module"):
        MaskSet(model.state_dict(), {})
    with pytest.raises(TypeError, match="dict"):
        MaskSet(model, [("0.weight", torch.ones(32, 16, dtype=torch.bool))])


def test_layer_sparsity_of_empty_parameter():
    with pytest.warns(UserWarning):
        model = nn.Linear(0, 4)
    ms = MaskSet(model, {"weight": torch.ones(4, 0, dtype=torch.bool)})
    assert ms.sparsity() == 0.0
    assert ms.layer_sparsity() == {"weight": 0.0}


def test_one_mask_gives_the_shared_mask_and_names_two_that_differ():
    from sparsekit.masks import one_mask

    keep = torch.ones(2, 2, dtype=torch.bool)
    cut = keep.clone()
    cut[0, 0] = False
    table = {"a.weight": keep, "b.weight": keep.clone(), "c.weight": cut}
    assert one_mask(table, ["a.weight", "b.weight"], "w") is keep
    with pytest.raises(ValueError, match=r"^masks\['a.weight'\] and masks\['c.weight'\] name "
                                         r"the same weight \(w\) but differ"):
        one_mask(table, ["a.weight", "b.weight", "c.weight"], "w")


def test_elementwise_state_is_the_optimizer_state_in_the_parameters_shape():
    from sparsekit.masks import elementwise_state

    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    assert elementwise_state(opt, model.weight) == {}
    assert model.weight not in opt.state  # asked, not created
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = elementwise_state(opt, model.weight)
    assert sorted(state) == ["exp_avg", "exp_avg_sq"]  # not the step count
    assert all(v is opt.state[model.weight][k] for k, v in state.items())


def test_first_names_maps_every_name_of_a_shared_tensor_to_its_first():
    from sparsekit.masks import first_names

    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    assert first_names(model) == {"0.weight": "0.weight", "0.bias": "0.bias",
                                  "2.weight": "0.weight", "2.bias": "0.bias",
                                  "3.weight": "3.weight", "3.bias": "3.bias"}
    assert list(dict.fromkeys(first_names(model).values())) == [
        n for n, _ in model.named_parameters()]
