"""Hostile arguments to the schedules (issue 17, item 9): each is a clear error, nothing changes.

Every case here was accepted (or crashed with a raw ``AttributeError``) before.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsekit import DynamicSparsity, GradualPruner, IterativePruning


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def gradual(model, **kw):
    args = dict(start_step=0, end_step=10, every=1) | kw
    return GradualPruner(model, 0.5, **args)


def dynamic(model, **kw):
    args = dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8,
                end_step=10) | kw
    return DynamicSparsity(model, **args)


def iterative(model, **kw):
    return IterativePruning(model, **(dict(rounds=2, sparsity=0.5, rewind_step=0) | kw))


CASES = [
    # name, build, kwargs, the parameter the message must name
    ("fractional steps never prune", gradual, dict(start_step=0.5, end_step=10.5), "start_step"),
    ("fractional end_step", gradual, dict(end_step=10.5), "end_step"),
    ("fractional every", gradual, dict(every=1.5), "every"),
    ("bool every", gradual, dict(every=True), "every"),
    ("bool start_step", gradual, dict(start_step=False), "start_step"),
    ("fractional update_every", dynamic, dict(update_every=2.5), "every"),
    ("fractional every (dst)", dynamic, dict(every=2.5), "every"),
    ("bool every (dst)", dynamic, dict(every=True), "every"),
    ("fractional end_step (dst)", dynamic, dict(end_step=9.5), "end_step"),
    ("nan momentum", dynamic, dict(momentum=float("nan")), "momentum"),
    ("momentum ≥ 1", dynamic, dict(momentum=1.5), "momentum"),
    ("salient_fraction above 1", dynamic, dict(salient_fraction=5), "salient_fraction"),
    ("nan salient_fraction", dynamic, dict(salient_fraction=float("nan")), "salient_fraction"),
    ("nan drop_fraction", dynamic, dict(drop_fraction=float("nan")), "drop_fraction"),
    ("string drop_fraction", dynamic, dict(drop_fraction="0.3"), "drop_fraction"),
    ("float seed", dynamic, dict(seed=1.5), "seed"),
    ("no optimizer", dynamic, dict(optimizer=None), "optimizer"),
    ("bool rounds", iterative, dict(rounds=True), "rounds"),
    ("fractional rounds", iterative, dict(rounds=2.5), "rounds"),
    ("fractional rewind_step", iterative, dict(rewind_step=0.5), "rewind_step"),
    ("nan sparsity", iterative, dict(sparsity=float("nan")), "sparsity"),
]


@pytest.mark.filterwarnings("ignore:.*update_every=:DeprecationWarning")
@pytest.mark.parametrize("build, kwargs, param", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_is_a_clear_error_and_changes_nothing(build, kwargs, param):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        build(model, **kwargs)
    assert param in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_wrong_types_are_type_errors_too():
    # A float step or a bool is a wrong *type*: both ``except TypeError`` and
    # ``except ValueError`` catch it.
    with pytest.raises(TypeError, match="every"):
        gradual(mlp(), every=1.5)
    with pytest.raises(TypeError, match="momentum"):
        dynamic(mlp(), momentum="0.9")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        dynamic(mlp(), optimizer="sgd")


def test_no_optimizer_says_why_it_is_needed():
    with pytest.raises(ValueError, match=r"DynamicSparsity needs the training optimizer"):
        DynamicSparsity(mlp(), None, 0.8, end_step=10)
