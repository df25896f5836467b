"""A tiny routed FFN for the MoE tests: random weights of the given widths and a router."""

from __future__ import annotations

import torch

from sparsekit.moe import RoutedFFN, Router


def routed_ffn(neurons: int, features: int, unit: int, rank: int,
               **overrides: object) -> RoutedFFN:
    """A ``RoutedFFN`` of ``neurons`` ReLU neurons over ``features`` in units of ``unit``
    neurons, routed by a ``Router`` of ``rank``, two units a token; ``overrides`` replace
    any of its arguments (``unit_size`` too)."""
    args = {"w_in": torch.randn(neurons, 1, features), "b_in": None,
            "w_out": torch.randn(features, neurons), "b_out": None, "act": torch.relu,
            "order": torch.arange(neurons), "hot": 0, "unit_size": unit,
            "router": Router(features, neurons // unit, rank), "k": 2} | overrides
    w_in, b_in, w_out, b_out, act = (args.pop(n) for n in ("w_in", "b_in", "w_out", "b_out",
                                                           "act"))
    return RoutedFFN(w_in, b_in, w_out, b_out, act, **args)
