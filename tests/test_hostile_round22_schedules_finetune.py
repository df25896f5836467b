"""Hostile inputs, round 22: schedules, the plain training loop and fine-tuning.

- ``DynamicSparsity.step`` at an update step read NaN/inf without a word: RigL and SRigL
  regrew the entries whose dense gradient was NaN (NaN ranks above every number), SET kept
  NaN weights, and SNFS failed with a raw "cannot convert float NaN to integer" after its
  step count had moved; each is a ``ValueError`` naming the weight, before anything changes;
- ``DynamicSparsity.load_state_dict`` took NaN momenta (SNFS grows by them);
- a second ``DynamicSparsity`` on the optimizer of one already attached to the same weights
  (a notebook cell run twice) was taken: both kept their masks through every step;
- ``DynamicSparsity.step`` while detached told the caller to call ``step()`` after every
  ``optimizer.step()``, which they did; it names ``detach()`` now;
- ``cubic_sparsity`` returned NaN for a NaN sparsity, a schedule for ``start ≥ end`` and a
  raw ``TypeError`` for a step given as a str (so did ``GradualPruner.sparsity_at``);
- ``train_epoch`` trained on NaN probability labels (every weight NaN), and failed with a
  raw "Expected more than 1 value per channel" at a last minibatch of one example for a
  BatchNorm layer, after the batches before it had changed the weights;
- ``accuracy`` counted labels outside ``[0, classes)`` as wrong predictions silently;
- ``DeltaTraining.attach``/``parameters`` after ``merge()``: a masks error about weights
  "replaced or deleted", or no parameters at all; a second ``merge()`` set every
  ``requires_grad`` back once more; ``Delta.apply`` onto a model training a delta blamed
  "another architecture";
- ``soup`` averaged a NaN buffer (a diverged BatchNorm's running mean) into the soup.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from sparsekit.finetune import masked_delta
from sparsekit.schedules import DynamicSparsity, GradualPruner, cubic_sparsity, soup
from sparsekit.training import accuracy, train_epoch


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, poison=None) -> None:
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    if poison is not None:
        poison(model)
    opt.step()


def snapshot(ds: DynamicSparsity):
    return ds.step_count, {n: m.clone() for n, m in ds.masks.masks.items()}


def assert_unchanged(ds: DynamicSparsity, before) -> None:
    step, masks = before
    assert ds.step_count == step
    assert all(torch.equal(ds.masks.masks[n], m) for n, m in masks.items())


# -- DynamicSparsity: NaN / inf at an update -------------------------------------------

@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_dynamic_refuses_nan_dense_gradient_before_any_change(method):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, method=method, every=2, end_step=10)
    train_step(model, opt)
    ds.step()

    def nan_grad(m):  # a NaN in the gradient of a pruned entry; the weights stay finite
        m[0].weight.grad[~ds.masks.masks["0.weight"]] = float("nan")

    train_step(model, opt, nan_grad)
    with torch.no_grad():
        model[0].weight.nan_to_num_(0.0)  # masked entries stay 0 (NaN · 0 made them NaN)
    before = snapshot(ds)
    with pytest.raises(ValueError, match=r"dense gradient of '0.weight' must be finite.*"
                                         r"diverged.*changed nothing"):
        ds.step()
    assert_unchanged(ds, before)


def test_dynamic_refuses_nan_weights_before_any_change():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, method="set", every=2, end_step=10)
    train_step(model, opt)
    ds.step()
    train_step(model, opt)
    with torch.no_grad():
        model[2].weight[ds.masks.masks["2.weight"]] = float("nan")
    before = snapshot(ds)
    with pytest.raises(ValueError, match=r"weight '2.weight' must be finite, got \d+ NaN"):
        ds.step()
    assert_unchanged(ds, before)


def test_snfs_refuses_inf_momentum_with_a_named_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, method="snfs", every=2, end_step=10)

    def inf_grad(m):
        m[0].weight.grad[0, 0] = float("inf")

    train_step(model, opt, inf_grad)
    with torch.no_grad():
        model[0].weight.nan_to_num_(0.0, posinf=0.0, neginf=0.0)
    ds.step()
    train_step(model, opt)
    before = snapshot(ds)
    with pytest.raises(ValueError, match=r"gradient momentum of '0.weight' must be finite"):
        ds.step()  # was a raw "cannot convert float NaN to integer", step count moved
    assert_unchanged(ds, before)


# -- DynamicSparsity: states ------------------------------------------------------------

def test_dynamic_load_refuses_nan_momenta():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, method="snfs", every=2, end_step=10)
    state = ds.state_dict()
    state["momenta"]["0.weight"][3, 3] = float("nan")
    state["step"] = 5
    with pytest.raises(ValueError, match=r"state\['momenta'\]\['0.weight'\] must be finite"):
        ds.load_state_dict(state)
    assert ds.step_count == 0
    assert bool(ds.momentum("0.weight").isfinite().all())


def test_schedule_states_refuse_sparse_tensors_by_name():
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.schedules import IterativePruning

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, method="snfs", every=2, end_step=10)
    state = ds.state_dict()
    state["momenta"]["0.weight"] = state["momenta"]["0.weight"].to_sparse()
    with pytest.raises(ArgumentTypeError, match=r"state\['momenta'\]\['0.weight'\] must be a "
                                                r"dense \(strided\) tensor, got layout "
                                                r"torch.sparse_coo"):
        ds.load_state_dict(state)  # was a raw NotImplementedError of the SparseCPU backend
    ip = IterativePruning(mlp(), rounds=2, sparsity=0.5, rewind_step=0)
    state = ip.state_dict()
    state["rewind_state"] = dict(state["rewind_state"])
    state["rewind_state"]["2.weight"] = state["rewind_state"]["2.weight"].to_sparse_csr()
    with pytest.raises(ArgumentTypeError, match=r"state\['rewind_state'\]\['2.weight'\] must "
                                                "be a dense"):
        ip.load_state_dict(state)


def test_second_dynamic_sparsity_on_one_optimizer_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = DynamicSparsity(model, opt, 0.5, every=2, end_step=10)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = len(opt._optimizer_step_pre_hooks)
    with pytest.raises(ValueError, match="attached to another DynamicSparsity of these weights"):
        DynamicSparsity(model, opt, 0.5, every=2, end_step=10, seed=1)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert len(opt._optimizer_step_pre_hooks) == hooks
    first.detach()
    second = DynamicSparsity(model, opt, 0.5, every=2, end_step=10, seed=1)  # once detached
    with pytest.raises(ValueError, match="attached to another DynamicSparsity"):
        first.attach(opt)  # attached again while the second one is
    second.remove()
    first.attach(opt)


def test_detached_dynamic_step_names_detach():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, every=2, end_step=10)
    train_step(model, opt)
    ds.step()
    ds.detach()
    train_step(model, opt)
    with pytest.raises(RuntimeError, match=r"detached DynamicSparsity.*attach\(optimizer\)"):
        ds.step()
    assert ds.step_count == 1


# -- cubic_sparsity ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(initial=float("nan")), ValueError, r"initial must be in \[0, 1\), got nan"),
    (dict(final=1.5), ValueError, r"final must be in \[0, 1\), got 1.5"),
    (dict(step="5"), TypeError, r"step must be an int ≥ 0, got '5'"),
    (dict(step=True), TypeError, r"step must be an int ≥ 0, got True"),
    (dict(start=10, end=5), ValueError, r"need 0 ≤ start < end, got start=10, end=5"),
    (dict(end=0), ValueError, r"end must be an int ≥ 1, got 0"),
])
def test_cubic_sparsity_checks_its_arguments(kwargs, error, match):
    args = dict(step=5, initial=0.0, final=0.5, start=0, end=10) | kwargs
    with pytest.raises(error, match=match):
        cubic_sparsity(args.pop("step"), **args)


def test_gradual_sparsity_at_names_a_bad_step():
    gp = GradualPruner(mlp(), 0.5, start_step=0, end_step=10, every=1)
    with pytest.raises(TypeError, match="step must be an int"):
        gp.sparsity_at("5")


# -- training ---------------------------------------------------------------------------

def test_train_epoch_refuses_nan_probability_labels():
    model = mlp()
    labels = torch.softmax(torch.randn(10, 4), 1)
    labels[3, 0] = float("nan")
    data = TensorDataset(torch.randn(10, 8), labels)
    weights = [p.detach().clone() for p in model.parameters()]
    model.eval()
    with pytest.raises(ValueError, match=r"data's labels hold 1 non-finite value"):
        train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not model.training


@pytest.mark.parametrize("bad", [7, -1, -100])
def test_accuracy_refuses_labels_outside_the_classes(bad):
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, bad])
    data = TensorDataset(torch.randn(10, 8), labels)
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, 4\).*got {bad}"):
        accuracy(mlp(), data)


def test_accuracy_and_train_take_good_labels():
    model = mlp()
    data = TensorDataset(torch.randn(10, 8), torch.randint(0, 4, (10,)))
    train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    assert 0.0 <= accuracy(model, data) <= 1.0
    soft = TensorDataset(torch.randn(10, 8), F.softmax(torch.randn(10, 4), 1))
    train_epoch(model, soft, torch.optim.SGD(model.parameters(), lr=0.1))


# -- finetune ---------------------------------------------------------------------------

def test_delta_training_after_merge():
    model = mlp()
    training = masked_delta(model, 0.1, method="magnitude")
    opt = torch.optim.SGD(training.parameters(), lr=0.1)
    training.attach(opt)
    merged = training.merge()
    merged[0].bias.requires_grad_(False)  # a change made after the merge
    assert training.merge() is model  # merging again changes nothing
    assert not merged[0].bias.requires_grad
    for action in (lambda: training.attach(opt), training.parameters):
        with pytest.raises(RuntimeError, match=r"merge\(\) wrote the update into the weights"):
            action()
    assert training.delta().nnz == training.trainable  # the update stays readable


def test_second_dynamic_sparsity_on_sparse_layers_is_refused():
    from sparsekit import SparseLinear

    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear.from_linear(nn.Linear(8, 16), torch.rand(16, 8) < 0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    DynamicSparsity(model, opt, 0.5, method="set", every=2, end_step=10)
    with pytest.raises(ValueError, match="attached to another DynamicSparsity"):
        DynamicSparsity(model, opt, 0.5, method="set", every=2, end_step=10)


# -- soup -------------------------------------------------------------------------------

def test_soup_refuses_nan_buffers():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    a, b = net(), net()
    b[1].running_mean[0] = float("nan")  # a diverged BatchNorm
    with pytest.raises(ValueError, match=r"models\[1\] holds NaN in its buffer '1.running_mean'"):
        soup([a, b])
    mask = torch.zeros(4, 4).fill_diagonal_(float("-inf"))  # ±inf buffers stay accepted
    a.register_buffer("attn", mask.clone())
    b.register_buffer("attn", mask.clone())
    b[1].running_mean[0] = 0.0
    assert torch.equal(soup([a, b]).attn, mask)


def test_delta_apply_onto_a_model_training_a_delta_names_it():
    from sparsekit.finetune import Delta

    model = mlp()
    training = masked_delta(model, 0.1, method="magnitude")
    delta = Delta({"0.weight": torch.zeros(16, 8)}, {"0.weight": torch.ones(16, 8, dtype=bool)})
    with pytest.raises(ValueError, match=r"model trains a delta on 0.weight.*merge\(\) it before "
                                         "applying a delta onto it"):
        delta.apply(model)  # was "no parameters ['0.weight'] (another architecture?)"
    before = model[0].weight.detach().clone()
    delta.apply(training.merge())
    assert torch.equal(model[0].weight, before)


def test_train_epoch_refuses_a_lone_example_for_batchnorm_before_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    data = TensorDataset(torch.randn(9, 8), torch.randint(0, 4, (9,)))
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    model.eval()
    with pytest.raises(ValueError, match=r"batch_size=4 leaves a minibatch of one example "
                                         r"\(of 9\), on which BatchNorm layer '1' cannot train"):
        train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=4)
    assert all(torch.equal(t, weights[n]) for n, t in model.state_dict().items())
    assert not model.training
    assert not model[1]._forward_pre_hooks  # no hook left behind
    train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=3)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    images = TensorDataset(torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,)))
    train_epoch(conv, images, torch.optim.SGD(conv.parameters(), lr=0.1), batch_size=2)


def test_delta_merge_refuses_a_nan_delta_before_merging_anything():
    model = mlp()
    training = masked_delta(model, 0.2, method="magnitude")
    deltas = list(training.parameters())
    with torch.no_grad():
        deltas[1][training.masks.masks["2.parametrizations.weight.0.delta"]] = float("inf")
    with pytest.raises(ValueError, match=r"the delta of '2.weight' must be finite.*nothing "
                                         "was merged"):
        training.merge()
    assert list(training.parameters()) == deltas  # still training, nothing merged
    with torch.no_grad():
        deltas[1].zero_()
    assert bool(training.merge()[2].weight.isfinite().all())


# -- IterativePruning -------------------------------------------------------------------

@pytest.mark.parametrize("change", ["buffer", "resize"])
def test_iterative_next_round_refuses_a_model_the_rewind_no_longer_fits(change):
    from sparsekit.schedules import IterativePruning

    model = mlp()
    ip = IterativePruning(model, rounds=2, sparsity=0.5, rewind_step=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if change == "buffer":
        model[2].register_buffer("extra", torch.zeros(3))
    else:
        model[2].bias = nn.Parameter(torch.zeros(5))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"next_round\(\): the model's state no longer fits .*"
                                         r"'2\.(extra|bias)'.*nothing was changed"):
        ip.next_round()  # was a raw RuntimeError, with the model half rewound
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert ip.round == 0 and ip.masks.sparsity() == 0.0


def test_iterative_state_rewind_dict_is_its_own():
    from sparsekit.schedules import IterativePruning

    model = mlp()
    ip = IterativePruning(model, rounds=2, sparsity=0.5, rewind_step=0)
    start = {n: t.clone() for n, t in model.state_dict().items()}
    state = ip.state_dict()
    state["rewind_state"]["0.weight"] = state["rewind_state"]["0.weight"].half()  # the caller's
    other = IterativePruning(mlp(), rounds=2, sparsity=0.5, rewind_step=0)
    other.load_state_dict(state)
    state["rewind_state"]["0.weight"] = torch.zeros(16, 8)  # after loading: not the schedule's
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ip.next_round()
    kept = ip.masks.masks["0.weight"]
    assert torch.equal(model[0].weight[kept], start["0.weight"][kept])  # exact, not via half
    assert other._rewind_state["0.weight"].dtype == torch.float16


def test_train_epoch_takes_batchnorm_without_running_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=False),
                          nn.ReLU(), nn.Linear(16, 4))
    data = TensorDataset(torch.randn(8, 8), torch.randint(0, 4, (8,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert math.isfinite(train_epoch(model, data, opt, batch_size=4))  # was refused: "data:
    # the model cannot train on its examples" (its check ran one example)
    with pytest.raises(ValueError, match=r"batch_size=1 leaves a minibatch of one example"):
        train_epoch(model, data, opt, batch_size=1)
    with pytest.raises(ValueError, match=r"batch_size=7 leaves a minibatch of one example"):
        train_epoch(model, data, opt, batch_size=7)


def test_train_epoch_refuses_negative_probability_labels():
    model = mlp()
    labels = torch.softmax(torch.randn(10, 4), 1)
    labels[2] = torch.tensor([1.5, -0.5, 0.0, 0.0])
    data = TensorDataset(torch.randn(10, 8), labels)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"class probabilities must be ≥ 0, got 1 negative "
                                         r"\(the smallest -0.5\)"):
        train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
