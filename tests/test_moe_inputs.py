"""sparsekit.moe on hostile input: errors that name the parameter, raised before any work."""

import re

import pytest
import torch
from torch import nn

from sparsekit import moe
from sparsekit._checks import ArgumentTypeError
from sparsekit.moe.heads import head_predictors
from sparsekit.moe.lowrank import LowRankRouter
from sparsekit.moe.router import Router, fit

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("points", "match"), [
    (torch.full((8, 3), NAN), "points must be finite, got 24 NaN or inf among 24 values"),
    (torch.cat([torch.full((4, 3), INF), torch.zeros(4, 3)]), "points must be finite, got 12"),
    (torch.ones(0, 3), r"points must hold at least one row, got shape \(0, 3\)"),
])
def test_balanced_kmeans_refuses_points_it_cannot_cluster(points, match):
    with pytest.raises(ValueError, match=match):
        moe.balanced_kmeans(points, 2)


SEED_TAKERS = {  # a call of each function taking a seed; the seed is checked first
    "balanced_kmeans": lambda seed: moe.balanced_kmeans(torch.randn(8, 3), 2, seed=seed),
    "moefy": lambda seed: moe.moefy(nn.Linear(4, 4), torch.ones(1, 4), seed=seed),
    "contextual": lambda seed: moe.contextual(nn.Linear(4, 4), torch.ones(1, 4), seed=seed),
    "evaluate": lambda seed: moe.evaluate(nn.Linear(4, 4), torch.ones(1, 4), seed=seed),
    "head_predictors": lambda seed: head_predictors(nn.Linear(4, 4), None, None, seed=seed),
    "fit": lambda seed: fit(Router(4, 3, 2), torch.randn(8, 4), torch.rand(8, 3), seed=seed),
    "LowRankRouter.refine": lambda seed: LowRankRouter(
        torch.randn(6, 1, 4), None, torch.ones(6), torch.relu, torch.randn(16, 4), rank=2,
        unit_size=2).refine(torch.randn(16, 4), torch.rand(16, 3), steps=1, seed=seed),
}


@pytest.mark.parametrize("seed", [1.5, True, "x", None])
@pytest.mark.parametrize("taker", sorted(SEED_TAKERS))
def test_every_seed_must_be_an_int(taker, seed):
    with pytest.raises(ArgumentTypeError, match=rf"seed must be an int in \[0, 2\*\*63 - 1\], "
                                                rf"got {re.escape(repr(seed))}"):
        SEED_TAKERS[taker](seed)


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70])
@pytest.mark.parametrize("taker", sorted(SEED_TAKERS))
def test_every_seed_must_be_in_range(taker, seed):
    """2**70 was a raw "Overflow when unpacking long long" from manual_seed."""
    with pytest.raises(ValueError, match=rf"seed must be an int in \[0, 2\*\*63 - 1\], "
                                         rf"got {seed}"):
        SEED_TAKERS[taker](seed)


def test_the_seed_is_checked_before_the_model_is_copied():
    model = nn.Linear(4, 4)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ArgumentTypeError, match="seed must be an int"):
        moe.moefy(model, torch.ones(1, 4), seed=1.5)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize(("args", "error", "match"), [
    ((torch.randn(2, 10), torch.ones(10), 0, 3), ValueError,
     "unit_size must divide the 10 neurons after the 0 hot ones, got 3"),
    ((torch.randn(2, 10), torch.ones(10), 2, 3), ValueError,
     "unit_size must divide the 8 neurons after the 2 hot ones, got 3"),
    ((torch.randn(2, 10), torch.ones(10), 0, 0), ValueError, "unit_size must be an int ≥ 1"),
    ((torch.randn(2, 10), torch.ones(10), 0, 2.0), ArgumentTypeError,
     "unit_size must be an int ≥ 1, got 2.0"),
    ((torch.randn(2, 10), torch.ones(10), 20, 1), ValueError,
     r"hot must be an int in \[0, 10\] \(h's neurons\), got 20"),
    ((torch.randn(2, 10), torch.ones(10), -1, 1), ValueError, "hot must be an int ≥ 0"),
    ((torch.randn(2, 10), torch.ones(9), 0, 1), ValueError,
     r"norms must be a tensor of shape \(10,\) \(one per neuron of h\), got \(9,\)"),
    (([1.0, 2.0], torch.ones(2), 0, 1), ArgumentTypeError, "h must be a tensor of shape"),
])
def test_unit_mass_names_the_argument_that_does_not_fit(args, error, match):
    with pytest.raises(error, match=match):
        moe.unit_mass(*args)
