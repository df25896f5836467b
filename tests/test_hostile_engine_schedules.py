"""Hostile cases for the training-time schedules: a DynamicSparsity let go of its optimizer,
steps called out of turn, frozen weights. Each must raise (or do nothing) before the
model, the masks, the optimizer or the schedule change."""

import copy

import pytest
import torch
from torch import nn

from sparsekit import DynamicSparsity, GradualPruner, IterativePruning, SparseLinear

METHODS = ["set", "rigl", "snfs", "granet", "srigl"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ds: DynamicSparsity | None,
          steps: int) -> list[bool]:
    updated = []
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(3, 8)).sum().backward()
        optimizer.step()
        if ds is not None:
            updated.append(ds.step())
    return updated


def hooks(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    return len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)


def test_detach_stops_reading_gradients_and_attach_resumes():
    """remove() of the Attached that integrations.attach() returns detached the masks from
    the optimizer but left DynamicSparsity's own step pre-hook on it: every later step
    still ran its capture (SNFS's momenta kept moving). detach() takes it off; attach()
    puts it back."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hooks(optimizer)
    ds = DynamicSparsity(model, optimizer, 0.5, method="snfs", every=2, end_step=100)
    train(model, optimizer, ds, 1)
    ds.detach()
    ds.detach()  # twice does nothing
    assert hooks(optimizer) == before
    momenta = copy.deepcopy(ds._momenta)
    train(model, optimizer, None, 2)
    assert all(torch.equal(m, ds._momenta[n]) for n, m in momenta.items())
    assert ds.attach(optimizer) is ds
    ds.attach(optimizer)  # twice does nothing
    assert hooks(optimizer) == (before[0] + 2, before[1] + 1)
    train(model, optimizer, ds, 1)
    assert not all(torch.equal(m, ds._momenta[n]) for n, m in momenta.items())
    ds.remove()
    assert hooks(optimizer) == before


def test_attach_and_detach_refuse_another_optimizer_before_changing_anything():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="rigl", every=1, end_step=10)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    for call in (ds.attach, ds.detach):
        with pytest.raises(ValueError, match="optimizer must be the one this DynamicSparsity"):
            call(other)
        assert hooks(other) == (0, 0) and hooks(optimizer) == (2, 1)


def test_detach_stops_sparse_layers_computing_dense_gradients():
    """A detached DynamicSparsity reads no gradient: its SparseLinear layers must not go on
    computing the dense one in every backward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(8, 16, torch.rand(16, 8) < 0.5), nn.ReLU(),
                          SparseLinear(16, 4, torch.rand(4, 16) < 0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="snfs", every=2, end_step=100)
    assert all(layer.capture_dense_grad for layer in (model[0], model[2]))
    ds.detach()
    train(model, optimizer, None, 1)
    assert not any(layer.capture_dense_grad for layer in (model[0], model[2]))
    assert all(layer.dense_grad is None for layer in (model[0], model[2]))
    ds.attach(optimizer)
    assert all(layer.capture_dense_grad for layer in (model[0], model[2]))


def test_a_second_step_without_gradients_changes_nothing():
    """step() twice after one optimizer step: GraNet's update pruned the masks and counted
    the step before it found no dense gradient to grow by and raised."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.8, method="granet", every=2, end_step=20,
                         initial_sparsity=0.5)
    train(model, optimizer, ds, 1)
    masks = {n: m.clone() for n, m in ds.masks.masks.items()}
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="needs the dense gradient"):
        ds.step()
    assert ds.step_count == 1
    assert all(torch.equal(m, ds.masks.masks[n]) for n, m in masks.items())
    assert all(torch.equal(w, model.state_dict()[k]) for k, w in weights.items())
    assert train(model, optimizer, ds, 1) == [True]  # the step then goes on as it should


@pytest.mark.parametrize("method", METHODS)
def test_frozen_weights_are_left_alone(method):
    """A frozen layer (requires_grad=False, not in the optimizer) was a target: RigL, GraNet
    and SRigL raised at the first update (no gradient), SET and SNFS dropped and regrew
    its frozen weights."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method=method, every=1, end_step=10)
    assert list(ds.masks.masks) == ["2.weight"]
    assert train(model, optimizer, ds, 3) == [True] * 3
    assert torch.equal(model[0].weight, frozen)


def test_all_frozen_is_refused_before_hooking_the_optimizer():
    model = mlp()
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([model[0].bias, model[2].bias], lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"every weight DynamicSparsity would train is frozen"
                                         r" \(requires_grad=False: 0.weight, 2.weight\)"):
        DynamicSparsity(model, optimizer, 0.5, end_step=10)
    assert hooks(optimizer) == (0, 0)
    assert all(torch.equal(w, model.state_dict()[k]) for k, w in before.items())


def test_a_state_of_another_schedule_type_is_refused():
    """GradualPruner.load_state_dict took an IterativePruning's or a DynamicSparsity's state
    (it has a "step" and "masks" too) and resumed at the wrong step with masks its
    schedule never made."""
    model = mlp()
    gradual = GradualPruner(model, 0.5, start_step=0, end_step=10, every=1)
    other = mlp()
    iterative = IterativePruning(other, rounds=2, sparsity=0.75, rewind_step=0)
    iterative.next_round()
    dynamic = DynamicSparsity(other, torch.optim.SGD(other.parameters(), lr=0.1), 0.5,
                              end_step=10)
    masks = {n: m.clone() for n, m in gradual.masks.masks.items()}
    for state, keys in ((iterative.state_dict(), "'round', 'rewind_state', 'history'"),
                        (dynamic.state_dict(), "'generator', 'momenta'")):
        with pytest.raises(ValueError, match=f"state has {keys}, which GradualPruner"):
            gradual.load_state_dict(state)
    assert gradual.step_count == 0
    assert all(torch.equal(m, gradual.masks.masks[n]) for n, m in masks.items())
    gradual.load_state_dict(gradual.state_dict())  # its own still loads


def test_engine_wrong_types_raise_argument_type_error():
    """decompile(), FusedProjections and FusedLinear raised a plain TypeError for a wrong
    type, which `except ValueError` (the project's one catch for a bad argument) missed."""
    from sparsekit.engine.fused import FusedLinear, FusedProjections
    from sparsekit.engine.persist import decompile

    for call, phrase in ((lambda: decompile("model.pt"), "model must be an nn.Module, got str"),
                         (lambda: FusedProjections(nn.Linear(2, 4), [2, 2]),
                          "linear must be a CompiledLinear or an ActivationSparseLinear, got "
                          "Linear"),
                         (lambda: FusedLinear(nn.Linear(2, 4), 0),
                          "group must be FusedProjections, got Linear")):
        with pytest.raises(ValueError, match=phrase) as caught:
            call()
        assert isinstance(caught.value, TypeError)


def test_iterative_state_dict_is_a_snapshot():
    """IterativePruning.state_dict() handed out its own history list: the next round
    lengthened the saved state's history, which load_state_dict then refused (one entry
    per round), so an in-memory checkpoint (the best round so far) could not be resumed."""
    model = mlp()
    imp = IterativePruning(model, rounds=3, sparsity=0.9, rewind_step=0)
    imp.next_round()
    saved = imp.state_dict()
    masks = {n: m.clone() for n, m in imp.masks.masks.items()}
    imp.next_round()
    assert len(saved["history"]) == 1
    imp.load_state_dict(saved)
    assert imp.round == 1 and len(imp.history) == 1
    assert all(torch.equal(m, imp.masks.masks[n]) for n, m in masks.items())


def test_attached_remove_takes_off_the_dynamic_sparsity_hook():
    """integrations.attach(...).remove() detached the masks but left DynamicSparsity's own
    step pre-hook: every later step still captured gradients. Attaching it again must
    bring the hook back."""
    from sparsekit import integrations

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attached = integrations.attach(
        lambda m, o: DynamicSparsity(m, o, 0.5, method="snfs", every=2, end_step=100),
        model, optimizer)
    ds = attached.schedule
    attached.remove()
    assert hooks(optimizer) == (0, 0)
    again = integrations.attach(ds, model, optimizer)
    assert hooks(optimizer) == (2, 2)
    again.remove()


@pytest.mark.parametrize("bad, error, phrase", [
    ("abc", TypeError, "example_inputs must be a tensor, a tuple of model inputs or None, "
                       "got str"),
    (5, TypeError, "example_inputs must be a tensor, a tuple of model inputs or None, got int"),
    ({"x": torch.ones(2, 8)}, TypeError, "example_inputs must be a tensor, a tuple of model "
                                         "inputs or None, got dict"),
    (torch.ones(2, 9), ValueError, "example_inputs: the model cannot run on them: x must have "
                                   r"shape \(..., in_features=8\)"),
], ids=["str", "int", "dict", "wrong shape"])
def test_engine_report_checks_example_inputs_before_running_the_model(bad, error, phrase):
    """sparsekit.engine.report ran the model on example_inputs before the checks of
    sparsekit.report: a string was unpacked into three positional inputs (a TypeError
    from the model's forward), a dict into its keys (AttributeError), an int raised
    "Value after * must be an iterable", none naming example_inputs."""
    from sparsekit.engine import CompiledLinear
    from sparsekit.engine.report import report

    torch.manual_seed(0)
    model = nn.Sequential(CompiledLinear.from_linear(nn.Linear(8, 4), "dense"))
    with pytest.raises(ValueError, match=phrase) as caught:
        report(model, bad)
    assert isinstance(caught.value, error)


def test_attach_after_remove_is_refused_before_hooking_the_optimizer():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, every=1, end_step=10)
    ds.remove()
    with pytest.raises(RuntimeError, match="removed by remove"):
        ds.attach(optimizer)
    assert hooks(optimizer) == (0, 0)
