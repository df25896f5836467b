"""Masked-delta fine-tuning: only the chosen entries train; the update is a small sparse delta."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsekit
from sparsekit.finetune import Delta, DeltaTraining, masked_delta
from sparsekit.scores import CRITERIA, ScoreContext
from sparsekit.targets import resolve_targets

X = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 3))


def _train(model: nn.Module, training: DeltaTraining, opt: torch.optim.Optimizer,
           steps: int = 10) -> None:
    training.attach(opt)
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(X), Y)
            loss.backward()
            return loss
        opt.step(closure)


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_only_the_chosen_entries_train_with_any_optimizer(name):
    model = _model()
    base = copy.deepcopy(model)
    training = masked_delta(model, 0.1, data=(X, Y))
    assert training.trainable == round(0.1 * 240) + round(0.1 * 72)
    _train(model, training, OPTIMIZERS[name](training.parameters()))
    delta = training.delta()
    merged = training.merge()
    for n, p in merged.named_parameters():
        changed = p.detach() != base.get_parameter(n).detach()
        if n in delta.masks:
            assert not bool((changed & ~delta.masks[n]).any()), n  # frozen entries exact
            assert bool(changed.any()), n  # and the chosen ones did train
        else:
            assert not bool(changed.any()), n  # biases were frozen


def test_gradient_choice_is_the_largest_accumulated_gradient():
    model = _model(1)
    batches = [(X[:32], Y[:32]), (X[32:], Y[32:])]
    grads = [torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight, model[2].weight])
             for x, y in batches]
    score = (grads[0][0] + grads[1][0]).abs()
    training = masked_delta(model, 0.25, data=batches)
    chosen = training.delta().masks["0.weight"]
    assert int(chosen.sum()) == 60
    assert score[chosen].min() >= score[~chosen].max()


def test_gradient_criterion_is_registered_and_pure():
    model = _model(2)
    targets = resolve_targets(model)
    before = copy.deepcopy(model.state_dict())
    out = CRITERIA.get("gradient")(ScoreContext(model, targets, (X, Y)))
    g = torch.autograd.grad(F.cross_entropy(model(X), Y), model[2].weight)[0]
    torch.testing.assert_close(out["2.weight"], g.abs())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_magnitude_choice_and_global_allocation():
    model = _model(3)
    training = masked_delta(model, 0.2, method="magnitude", allocation="global")
    masks = training.delta().masks
    weights = torch.cat([model[0].parametrizations.weight.original.detach().abs().flatten(),
                         model[2].parametrizations.weight.original.detach().abs().flatten()])
    chosen = torch.cat([masks["0.weight"].flatten(), masks["2.weight"].flatten()])
    assert int(chosen.sum()) == round(0.2 * 312)
    assert weights[chosen].min() >= weights[~chosen].max()


def test_a_pruned_base_keeps_every_zero():
    model = _model(4)
    pruned = sparsekit.prune(model, 0.6)
    zeros = {n: ~m for n, m in pruned.masks.items()}
    training = masked_delta(model, 0.9, data=(X, Y))  # more than the nonzeros: capped at them
    assert training.trainable == sum(int(m.sum()) for m in pruned.masks.values())
    _train(model, training, torch.optim.AdamW(training.parameters(), lr=1e-2, weight_decay=0.1))
    merged = training.merge()
    params = dict(merged.named_parameters())
    assert all(bool((params[n][z] == 0).all()) for n, z in zeros.items())
    pruned.apply()  # the base's MaskSet still tracks the merged weights (same Parameters)
    assert all(params[n] is pruned.params[n] for n in zeros)


def test_merge_restores_parameters_and_their_flags():
    model = _model(5)
    model[2].bias.requires_grad_(False)
    ids = {n: id(p) for n, p in model.named_parameters()}
    training = masked_delta(model, 0.5, method="random")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "delta" not in n)
    merged = training.merge()
    assert not parametrize.is_parametrized(merged)
    assert {n: id(p) for n, p in merged.named_parameters()} == ids
    assert [p.requires_grad for p in merged.parameters()] == [True, True, True, False]


def test_the_delta_saves_small_and_applies_onto_the_base(tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 3))
    base = copy.deepcopy(model)
    x, y = torch.randn(32, 64), torch.randint(0, 3, (32,))
    training = masked_delta(model, 0.02, data=(x, y))
    opt = torch.optim.Adam(training.parameters(), lr=1e-2)
    training.attach(opt)
    for _ in range(5):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    delta = training.delta()
    assert delta.nnz == training.trainable
    assert delta.density == pytest.approx(0.02, abs=1e-3)
    path = delta.save(tmp_path / "delta.safetensors")
    dense_bytes = sum(v.numel() * 4 for v in delta.values.values())
    assert path.stat().st_size < 0.15 * dense_bytes
    back = Delta.load(path)
    assert all(torch.equal(back.values[n], delta.values[n]) for n in delta.values)
    assert all(torch.equal(back.masks[n], delta.masks[n]) for n in delta.masks)
    merged = training.merge()
    applied = back.apply(base)
    for n, p in merged.named_parameters():
        assert torch.equal(p, applied.get_parameter(n)), n
    back.apply(applied, alpha=-1.0)  # and takes it off again
    torch.testing.assert_close(applied[0].weight, copy.deepcopy(merged)[0].weight - delta.values[
        "0.weight"])


# -- hostile input: clear errors, nothing changed --------------------------------------------

def _untouched(model: nn.Module, state: dict) -> bool:
    return not parametrize.is_parametrized(model) and all(
        torch.equal(model.state_dict()[k], v) for k, v in state.items()
    ) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("density, error", [
    (0.0, ValueError), (1.5, ValueError), (-0.1, ValueError), (math.nan, ValueError),
    (True, TypeError), ("0.1", TypeError),
])
def test_density_outside_0_1_is_refused(density, error):
    model = _model(7)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match="density"):
        masked_delta(model, density, method="magnitude")
    assert _untouched(model, state)


def test_density_one_trains_everything():
    training = masked_delta(_model(8), 1.0, method="magnitude")
    assert training.trainable == 240 + 72


def test_gradient_without_data_is_refused():
    model = _model(9)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs data"):
        masked_delta(model, 0.1)
    assert _untouched(model, state)


def test_tied_weights_are_refused():
    model = _model(10)
    model.add_module("tied", nn.Linear(10, 24))
    model.tied.weight = model[0].weight
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="tied"):
        masked_delta(model, 0.1, method="magnitude", targets=["0"])
    assert _untouched(model, state)


def test_a_second_delta_training_on_the_same_weights_is_refused():
    model = _model(11)
    masked_delta(model, 0.1, method="magnitude")
    with pytest.raises(ValueError, match="parametrized already"):
        DeltaTraining(model, {"0.weight": torch.ones(24, 10, dtype=torch.bool)})


def test_support_that_does_not_match_the_model_is_refused():
    model = _model(12)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="shape"):
        DeltaTraining(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="support names .9.weight., which is not a parameter"):
        DeltaTraining(model, {"9.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no weights"):
        DeltaTraining(model, {})
    assert _untouched(model, state)


def test_a_delta_for_another_model_is_refused_before_any_change():
    training = masked_delta(_model(13), 0.5, method="magnitude")
    with torch.no_grad():
        for p in training.parameters():
            p.fill_(1.0)
    delta = training.delta()
    other = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4))  # last layer differs
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="'2.weight'"):
        delta.apply(other)
    renamed = nn.Sequential(nn.Linear(10, 24))
    with pytest.raises(ValueError, match="another architecture"):
        delta.apply(renamed)
    with pytest.raises(ValueError, match="alpha must be a finite real number"):
        delta.apply(other, alpha=math.inf)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


def test_a_file_that_is_no_delta_is_refused(tmp_path):
    model = _model(14)
    path = sparsekit.save(model, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a sparse delta"):
        Delta.load(path)


def test_inconsistent_delta_is_refused():
    with pytest.raises(ValueError, match="same tensors"):
        Delta({"a": torch.zeros(2)}, {})
    with pytest.raises(ValueError, match="bool tensor"):
        Delta({"a": torch.zeros(2)}, {"a": torch.zeros(2)})
