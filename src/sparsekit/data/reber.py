"""The (embedded) Reber grammar: a classic next-symbol prediction task for small RNNs.

A Reber string is a walk through a 7-state automaton from ``B`` to ``E`` (Reber 1967);
the embedded grammar wraps one as ``B T <reber> T E`` or ``B P <reber> P E``, so the
second-to-last symbol depends on the second one — a long-range dependency (Hochreiter &
Schmidhuber 1997). Because the grammar is nondeterministic, the target at each step is
the *set* of legal next symbols, and a prediction counts as correct when it is legal.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_int,
    check_materialized,
    check_seed,
)

SYMBOLS = "BTPSXVE"
"""The alphabet; symbol ``SYMBOLS[i]`` is one-hot index ``i``."""

Transitions = dict[Hashable, dict[str, Hashable]]

# state -> {symbol: next state}; 0 is the start state and 7 the accepting one.
_REBER: Transitions = {
    0: {"B": 1},
    1: {"T": 2, "P": 3},
    2: {"S": 2, "X": 4},
    3: {"T": 3, "V": 5},
    4: {"X": 3, "S": 6},
    5: {"P": 4, "V": 6},
    6: {"E": 7},
    7: {},
}


def _embedded() -> Transitions:
    """The embedded grammar as one automaton: a copy of the plain one per branch T/P."""
    dfa: Transitions = {"start": {"B": "fork"}, "fork": {b: (b, 0) for b in "TP"}}
    for b in "TP":
        dfa.update({(b, s): {c: (b, t) for c, t in edges.items()} for s, edges in _REBER.items()})
        dfa[(b, 7)] = {b: "join"}
    dfa.update({"join": {"E": "end"}, "end": {}})
    return dfa


_GRAMMARS: dict[bool, tuple[Transitions, Hashable]] = {
    False: (_REBER, 0),
    True: (_embedded(), "start"),
}


@dataclass(frozen=True)
class ReberData:
    """Padded next-symbol prediction data.

    ``inputs[n, t]`` is the one-hot of symbol ``t`` of string ``n`` and ``targets[n, t]``
    the multi-hot set of symbols that may legally follow ``strings[n][:t + 1]``; both are
    ``(N, T, 7)`` float32 with ``T = max(lengths)``. String ``n`` fills the first
    ``lengths[n] = len(strings[n]) - 1`` steps (the final ``E`` has no successor); the
    rest is zero, so padded steps have an all-zero target.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    strings: list[str]


def reber(n: int, *, embedded: bool = False, seed: int = 0) -> ReberData:
    """``n`` random strings of the (embedded) Reber grammar with legal-next-symbol targets.

    Each step picks uniformly among the legal transitions (``random.Random(seed)``), the
    usual way the grammar is sampled; ``seed`` is an int in [0, 2**63 - 1].
    """
    check_int("n", n, minimum=1)
    check_seed("seed", seed)
    check_bool("embedded", embedded)
    dfa, start = _GRAMMARS[embedded]
    rng = random.Random(seed)
    walks = [_walk(dfa, start, rng) for _ in range(n)]
    steps = max(len(w) for w in walks) - 1
    inputs = torch.zeros(n, steps, len(SYMBOLS))
    targets = torch.zeros(n, steps, len(SYMBOLS))
    for i, walk in enumerate(walks):
        for t, (symbol, state) in enumerate(walk[:-1]):
            inputs[i, t, SYMBOLS.index(symbol)] = 1
            targets[i, t, [SYMBOLS.index(c) for c in dfa[state]]] = 1
    lengths = torch.tensor([len(w) - 1 for w in walks])
    return ReberData(inputs, targets, lengths, ["".join(c for c, _ in w) for w in walks])


def reber_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of real (non-padded) steps whose argmax is a legal next symbol.

    ``logits`` and ``targets`` are tensors of one shape ``(..., symbols)`` with at least
    one symbol, and ``targets`` is multi-hot (every entry 0 or 1, as :func:`reber` makes
    them): other values counted as legal symbols (0.3) or as padding (negative sums).
    NaN logits are refused, as their argmax (the first NaN) would count as a prediction."""
    for name, given in (("logits", logits), ("targets", targets)):
        if not isinstance(given, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a tensor (..., symbols), got "
                                    f"{type(given).__name__}")
        check_materialized(name, given)  # was a NotImplementedError from torch.nonzero
        if given.is_complex():  # complex logits were a raw RuntimeError from argmax
            raise ValueError(f"{name} must be a real tensor (..., symbols), got {given.dtype}")
    if logits.shape != targets.shape or logits.dim() == 0:
        raise ValueError(
            f"logits and targets must have the same shape (..., symbols), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits and targets must hold at least one symbol in their last "
                         f"dimension, got shape {tuple(logits.shape)}")
    other = targets[(targets != 0) & (targets != 1)]
    if other.numel():
        raise ValueError(f"targets must be multi-hot (every entry 0 or 1: the legal next "
                         f"symbols), got {other.numel()} other entries such as "
                         f"{other[0].item()!r}")
    nans = int(logits.isnan().sum())
    if nans:
        raise ValueError(f"logits must be numbers or ±inf, got {nans} NaN of {logits.numel()}")
    real = targets.sum(-1) > 0
    hit = targets.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1) > 0
    return float(hit[real].float().mean()) if real.any() else 0.0


def _walk(dfa: Transitions, start: Hashable, rng: random.Random) -> list[tuple[str, Hashable]]:
    """One accepted string as ``(symbol, state after it)`` pairs."""
    walk, state = [], start
    while dfa[state]:
        symbol = rng.choice(sorted(dfa[state]))
        state = dfa[state][symbol]
        walk.append((symbol, state))
    return walk
