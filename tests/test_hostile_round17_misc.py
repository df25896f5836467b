"""Hostile inputs, round 17 (odds and ends):

- ``moe.LowRankRouter`` with an ``act`` that is no callable (e.g. the string ``"relu"``) was
  built, and every forward failed with ``'str' object is not callable``.
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
