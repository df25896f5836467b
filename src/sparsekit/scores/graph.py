"""Random-graph priors from network theory as pruning criteria (``graph:*``).

``graph:erdos_renyi``, ``graph:watts_strogatz`` and ``graph:barabasi_albert`` score the
weights of ``nn.Linear`` layers (a bipartite graph from inputs to outputs) and of the
hidden-to-hidden matrices of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (the adjacency matrix of a
directed graph on the hidden units; every gate block gets the same graph).

The allocation decides how many weights each layer keeps, so the scores are built such
that the top-k entries form a graph of the family for *every* k — each score is the
"arrival order" of its edge in a growth process whose every prefix is such a graph:

* Erdős–Rényi: iid uniform scores; any top-k is a uniform random graph with k edges.
* Watts–Strogatz: neurons sit on a ring (inputs at ``i / n_in``, outputs at
  ``j / n_out``) and edges arrive by ring distance, nearest first, so any top-k is a ring
  lattice; each edge is independently rewired with probability ``REWIRE`` — it arrives
  at a uniformly random time instead — so a fraction ≈ ``REWIRE`` of the kept edges are
  random shortcuts at any density.
* Barabási–Albert: the static model (Goh, Kahng & Kim 2001), the growth process of
  preferential attachment in closed form: node ``i`` (in a random order) has weight
  ``w_i = (i + 1)^-1/2`` and edge ``(i, j)`` arrives at an exponential time with rate
  ``w_i · w_j``. Every prefix has expected degrees ∝ ``w``, i.e. the power-law degree
  distribution P(k) ∝ k^-3 of BA graphs, at any density.

Self-loops of recurrent matrices arrive last (the families have none).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsekit.registry import Registry
from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext
from sparsekit.targets import Target

REWIRE = 0.1
"""Watts–Strogatz rewiring probability (small-world regime: high clustering, short paths)."""

Generator = torch.Generator | None
GraphScores = Callable[[int, int, bool, Generator], torch.Tensor]
KINDS: Registry[GraphScores] = Registry("kind", ordered=True)
"""The random-graph families; each is also the criterion ``graph:<kind>``."""


def _kind(name: str) -> Callable[[GraphScores], GraphScores]:
    """Register a ``(n_out, n_in, square, generator) -> scores`` function as ``graph:name``."""

    def add(fn: GraphScores) -> GraphScores:
        def criterion(ctx: ScoreContext) -> dict[str, torch.Tensor]:
            return {t.name: _target_scores(t, fn, ctx.generator).to(t.param.device)
                    for t in ctx.targets}

        criterion.__doc__ = fn.__doc__
        KINDS.register(name)(fn)
        CRITERIA.register(f"graph:{name}")(criterion)
        return fn

    return add


@_kind("erdos_renyi")
def erdos_renyi(n_out: int, n_in: int, square: bool, generator: Generator) -> torch.Tensor:
    """iid uniform scores: every top-k is a uniform random graph with k edges."""
    return torch.rand(n_out, n_in, generator=generator)


@_kind("watts_strogatz")
def watts_strogatz(n_out: int, n_in: int, square: bool, generator: Generator) -> torch.Tensor:
    """Ring-lattice order (nearest first, random tie-breaks) with rewired edges at random times."""
    pos_out = torch.arange(n_out, dtype=torch.float64).unsqueeze(1) / n_out
    pos_in = torch.arange(n_in, dtype=torch.float64).unsqueeze(0) / n_in
    gap = (pos_out - pos_in).abs()
    distance = torch.minimum(gap, 1 - gap)  # in [0, 0.5]
    noise = torch.rand(n_out, n_in, generator=generator, dtype=torch.float64)
    lattice = -(distance + noise / (4 * max(n_out, n_in)))  # ties broken within a ring step
    random_time = -0.5 * torch.rand(n_out, n_in, generator=generator, dtype=torch.float64)
    rewired = torch.rand(n_out, n_in, generator=generator) < REWIRE
    return torch.where(rewired, random_time, lattice)


@_kind("barabasi_albert")
def barabasi_albert(n_out: int, n_in: int, square: bool, generator: Generator) -> torch.Tensor:
    """Static-model arrival order: rate ``w_i · w_j`` with power-law node weights."""
    w_out = _power_law_weights(n_out, generator)
    w_in = w_out if square else _power_law_weights(n_in, generator)
    arrival = torch.empty(n_out, n_in, dtype=torch.float64).exponential_(generator=generator)
    return -arrival / (w_out.unsqueeze(1) * w_in.unsqueeze(0))


def _power_law_weights(n: int, generator: Generator) -> torch.Tensor:
    ranks = torch.randperm(n, generator=generator).to(torch.float64)
    return (ranks + 1).rsqrt()


def _target_scores(t: Target, fn: GraphScores, generator: Generator) -> torch.Tensor:
    """The scores of one target: a Linear's weight, also one parametrized over one stored
    tensor of its shape (``spectral_norm``: :attr:`Target.alias`, whose ``param`` is not the
    computed ``module.weight``), or a recurrent ``weight_hh``."""
    shape = tuple(t.param.shape)
    if isinstance(t.module, nn.Linear) and (t.alias is not None or t.param is t.module.weight):
        return fn(*shape, False, generator).float()
    if isinstance(t.module, nn.RNNBase) and t.name.rsplit(".", 1)[-1].startswith("weight_hh"):
        hidden = t.module.hidden_size
        if shape[1] != hidden:
            raise ValueError(f"{t.name}: graph priors do not support proj_size")
        return _gated(fn(hidden, hidden, True, generator), shape[0] // hidden)
    raise ValueError(
        f"graph priors score nn.Linear weights and recurrent weight_hh matrices; "
        f"{t.name!r} is neither (exclude it, or pass targets=)"
    )


def _gated(scores: torch.Tensor, gates: int) -> torch.Tensor:
    """One square score matrix for every gate block, as exact ranks.

    Blocks hold the same ranks, each level of equal scores ordered by gate, so a top-k
    keeps whole levels — the same graph in every gate block whenever k is a multiple of
    the number of gates (otherwise the first gates hold one edge more). Self-loops rank
    last. Float64, so ranks stay exact up to 2^53.
    """
    scores = scores.double().fill_diagonal_(float("-inf"))
    ranks = torch.empty_like(scores)
    ranks.view(-1)[scores.flatten().argsort(stable=True)] = torch.arange(
        scores.numel(), dtype=torch.float64
    )
    gate_order = torch.arange(gates - 1, -1, -1, dtype=torch.float64).view(gates, 1, 1)
    return (ranks.unsqueeze(0) * gates + gate_order).flatten(0, 1)
