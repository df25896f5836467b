"""Hostile arguments (issue 17, item 9): each is a clear error, and nothing changes.

Every case here was accepted (or crashed with a raw ``AttributeError``) before.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsekit
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


# -- data the model cannot take, frozen weights, wrong example_inputs ----------------------
# Each raised a raw PyTorch error (RuntimeError, or a TypeError naming no argument) before.

X, Y = torch.randn(8, 12), torch.randint(0, 4, (8,))

DATA_CASES = [
    # name, method, data, the error type, a phrase the message must hold
    ("inputs of the wrong width", "snip", (torch.randn(8, 13), Y), ValueError, "8x13"),
    ("wrong width (wanda)", "wanda", torch.randn(8, 13), ValueError, "8x13"),
    ("wrong width (synflow)", "synflow", torch.randn(8, 13), ValueError, "1x13"),
    ("inputs of the wrong type", "taylor", ("abc", Y), TypeError, "str"),
    ("integer inputs", "grasp", (torch.ones(8, 12, dtype=torch.long), Y), ValueError, "Long"),
    ("labels of the wrong length", "snip", (X, Y[:5]), ValueError, "batch_size"),
    ("float labels", "taylor", (X, torch.randn(8)), ValueError, "dtype"),
    ("labels of the wrong length (grasp)", "grasp", (X, Y[:5]), ValueError, "batch_size"),
    ("an empty list", "snip", [], ValueError, "no batches"),
    ("an empty list (wanda)", "wanda", [], ValueError, "no batches"),
]


@pytest.mark.parametrize("method, data, error, phrase", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_is_a_clear_error_and_changes_nothing(method, data, error, phrase):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error) as err:
        sparsekit.prune(model, 0.5, method=method, data=data)
    assert "data" in str(err.value) and phrase in str(err.value)
    assert not isinstance(err.value, RuntimeError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["snip", "taylor", "taylor:accumulated", "grasp"])
def test_frozen_targets_with_a_gradient_criterion_are_a_clear_error(method):
    model = mlp()
    model[0].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"requires_grad=False") as err:
        sparsekit.prune(model, 0.5, method=method, data=(X, Y))
    assert "'0.weight'" in str(err.value) and method in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0].weight.requires_grad


def test_frozen_targets_are_fine_for_synflow_and_a_frozen_model_excluded_layer():
    model = mlp()
    model.requires_grad_(False)
    assert sparsekit.prune(model, 0.5, method="synflow", data=X).sparsity() > 0.49
    model = mlp()
    model[2].requires_grad_(False)
    masks = sparsekit.prune(model, 0.5, method="snip", data=(X, Y), exclude=["2"])
    assert set(masks.masks) == {"0.weight"}


@pytest.mark.parametrize("method", ["snip", "taylor", "grasp", "synflow"])
def test_gradient_criteria_score_under_no_grad(method):
    # They failed with "element 0 of tensors does not require grad" inside torch.no_grad().
    with torch.no_grad():
        masks = sparsekit.prune(mlp(), 0.5, method=method, data=(X, Y))
    assert masks.sparsity() > 0.49


COMPILE_CASES = [
    ("wrong width", torch.randn(2, 13), ValueError, "2x13"),
    ("integer inputs", torch.ones(2, 12, dtype=torch.long), ValueError, "Long"),
    ("a string in the tuple", ("abc",), TypeError, "str"),
    ("too many inputs", (X, X), TypeError, "positional"),
]


@pytest.mark.parametrize("example_inputs, error, phrase", [c[1:] for c in COMPILE_CASES],
                         ids=[c[0] for c in COMPILE_CASES])
def test_compile_with_wrong_example_inputs_is_a_clear_error(example_inputs, error, phrase):
    from sparsekit.engine import compile as compile_model

    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error) as err:
        compile_model(model, example_inputs)
    assert "example_inputs" in str(err.value) and phrase in str(err.value)
    assert not isinstance(err.value, RuntimeError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, param", [
    (dict(threads=1.5), "threads"), (dict(threads=True), "threads"), (dict(threads=0), "threads"),
    (dict(rows=(1, 2.5)), "rows"), (dict(rows=[True]), "rows"), (dict(rows=()), "rows"),
])
def test_compile_options_are_checked(kwargs, param):
    from sparsekit.engine import compile as compile_model

    with pytest.raises(ValueError) as err:
        compile_model(mlp(), **kwargs)
    assert param in str(err.value)


# -- int and fraction checks shared through sparsekit._checks -----------------------------


def _csr16(**kw):
    from sparsekit.engine.formats import FORMATS

    return FORMATS.get("csr16").from_dense(torch.randn(4, 8), **kw)


def _bsr(**kw):
    from sparsekit.engine.formats import FORMATS

    return FORMATS.get("bsr").from_dense(torch.randn(8, 8), **kw)


def _activation_linear(**kw):
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    return ActivationSparseLinear(torch.randn(4, 8), None, 0.1, **kw)


def _reber(n):
    from sparsekit.data.reber import reber

    return reber(n)


def _calibrate(**kw):
    from sparsekit import activation

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return activation.calibrate(model, torch.randn(16, 8), **kw)


def _demo_sparsities(text):
    from sparsekit.cli.demo import _parse_sparsities

    return _parse_sparsities(text)


INT_CASES = [
    # Floats and bools were accepted as counts (threads=2.0 ran; n=True gave one string).
    ("fractional threads (csr16)", lambda: _csr16(threads=2.5), TypeError, "threads"),
    ("float threads (activation linear)", lambda: _activation_linear(threads=2.0), TypeError,
     "threads"),
    ("bool threads (activation linear)", lambda: _activation_linear(threads=True), TypeError,
     "threads"),
    ("fractional bsr block", lambda: _bsr(block=(4.0, 4)), TypeError, "block[0]"),
    ("bool bsr block", lambda: _bsr(block=(True, 4)), TypeError, "block[0]"),
    ("bsr block not a multiple of 4", lambda: _bsr(block=(4, 6)), ValueError, "block must be"),
    ("fractional reber n", lambda: _reber(2.5), TypeError, "n must be"),
    ("bool reber n", lambda: _reber(True), TypeError, "n must be"),
    ("zero reber n", lambda: _reber(0), ValueError, "n must be"),
    ("fractional max_rows", lambda: _calibrate(max_rows=10.5), TypeError, "max_rows"),
    ("bool max_rows", lambda: _calibrate(max_rows=True), TypeError, "max_rows"),
    ("nan in --sparsities", lambda: _demo_sparsities("0.5,nan"), ValueError,
     "--sparsities entry 2"),
    ("1 in --sparsities", lambda: _demo_sparsities("1"), ValueError, "--sparsities entry 1"),
]


@pytest.mark.parametrize("call, error, phrase", [c[1:] for c in INT_CASES],
                         ids=[c[0] for c in INT_CASES])
def test_counts_and_fractions_are_checked(call, error, phrase):
    with pytest.raises(error) as err:
        call()
    assert phrase in str(err.value)
    assert isinstance(err.value, ValueError)  # a wrong type is both


def test_model_errors_names_the_argument_and_keeps_the_cause():
    from sparsekit._checks import ArgumentTypeError, model_errors

    def fail(error: Exception, *args: str) -> None:
        with model_errors(*args):
            raise error

    with pytest.raises(ValueError, match=r"^x: the model cannot run on it: boom$") as err:
        fail(RuntimeError("boom"), "x")
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(ArgumentTypeError, match=r"^x: bad: no$"):
        fail(TypeError("no"), "x", "bad")
    with pytest.raises(torch.OutOfMemoryError):  # not the argument's fault: unchanged
        fail(torch.OutOfMemoryError("out of memory"), "x")
