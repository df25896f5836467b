"""Hostile inputs, round 17 (odds and ends):

- ``moe.LowRankRouter`` with an ``act`` that is no callable (e.g. the string ``"relu"``) was
  built, and every forward failed with ``'str' object is not callable``;
- a NumPy int ``seed`` passes ``check_seed``, but ``torch.Generator.manual_seed`` takes
  Python ints only: ``sparsekit.prune(method="random", seed=np.int64(5))`` and the other
  seeded draws (calibration, SAE, MoEfication) failed with a raw ``TypeError``.
"""

from __future__ import annotations

import pytest
import torch

from sparsekit.moe import LowRankRouter


def test_a_low_rank_router_refuses_an_activation_that_is_no_callable():
    with pytest.raises(TypeError, match=r"act must be the FFN's activation, a callable such as "
                                        r"torch.relu, got 'relu'"):
        LowRankRouter(torch.randn(8, 1, 4), None, torch.ones(8), "relu", torch.randn(16, 4),
                      rank=2, unit_size=2)


def test_numpy_int_seeds_draw_what_python_ints_draw():
    """``check_seed`` accepts any integral seed; the generators took Python ints only (a raw
    ``TypeError: an integer is required`` from ``sparsekit.prune(method="random")`` and
    every other seeded draw)."""
    import numpy as np

    import sparsekit

    def pruned(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        sparsekit.prune(model, sparsity=0.5, method="random", seed=seed)
        return model[0].weight.detach().clone()

    assert torch.equal(pruned(np.int64(5)), pruned(5))
