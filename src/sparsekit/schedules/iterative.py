"""Iterative magnitude pruning with weight rewinding (Frankle et al. 2020).

"Stabilizing the Lottery Ticket Hypothesis": rewind survivors to an early step k, not to
initialisation.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_fraction,
    check_int,
    check_optimizer,
    check_sparsity,
    renamed,
)
from sparsekit.masks import MaskSet
from sparsekit.prune import compute_masks
from sparsekit.schedules.base import check_masks_usable, check_state, check_tensors
from sparsekit.targets import resolve_targets


class IterativePruning:
    """Train → prune → rewind to step k, ``rounds`` times, reaching ``sparsity`` at the end.

    Each round prunes the same fraction of the survivors, ``rate_per_round`` =
    1 − (1 − ``sparsity``)^(1/``rounds``). Your loop trains each round and calls
    :meth:`step` after every optimizer step (the weights at step ``rewind_step`` of the
    first round are remembered), then :meth:`next_round` to prune, record the round and
    rewind. ``optimizer`` is the first round's; attach ``masks`` to each later round's
    (fresh) optimizer. ``rate_per_round=`` (instead of ``sparsity=``) and ``criterion=``
    are deprecated.
    """

    @renamed(criterion="method")
    def __init__(
        self,
        model: nn.Module,
        *,
        rounds: int,
        sparsity: float | None = None,
        rewind_step: int,
        method: str = "magnitude",
        allocation: str = "global",
        optimizer: torch.optim.Optimizer | None = None,
        rate_per_round: float | None = None,
    ) -> None:
        check_int("rounds", rounds, minimum=1)
        if rate_per_round is not None:
            if sparsity is not None:
                raise TypeError(
                    "IterativePruning() got both rate_per_round= and sparsity=; pass only sparsity="
                )
            warnings.warn(
                "IterativePruning(): rate_per_round= is deprecated, use sparsity= (the final "
                "sparsity after all rounds)", DeprecationWarning, stacklevel=3,
            )
            check_fraction("rate_per_round", rate_per_round, zero=False)
            sparsity = 1.0 - (1.0 - rate_per_round) ** rounds
            if sparsity >= 1.0:  # (1 - rate)^rounds below float precision: the last round
                raise ValueError(  # could keep no weight and failed after all the others
                    f"rate_per_round={rate_per_round} over rounds={rounds} reaches a final "
                    "sparsity of 1.0 in floating point (no weight left); accepted: a rate and "
                    "a number of rounds whose final sparsity is below 1 (pass sparsity=)"
                )
        elif sparsity is None:
            raise TypeError("IterativePruning() missing required keyword argument: 'sparsity'")
        else:
            check_sparsity(sparsity)
            rate_per_round = 1.0 - (1.0 - sparsity) ** (1.0 / rounds)
        check_int("rewind_step", rewind_step, minimum=0)
        check_optimizer(optimizer, optional=True)
        compute_masks(model, rate_per_round, method=method, allocation=allocation)
        self.model = model
        # Python floats: a NumPy one (np.linspace) went into the history, whose checkpoint
        # torch.load's weights_only default (and SparsityCallback's resume) then refused
        self.rounds, self.sparsity, self.rewind_step = rounds, float(sparsity), rewind_step
        self.rate_per_round = float(rate_per_round)
        self._prune = dict(method=method, allocation=allocation)
        self.masks = MaskSet(model, {t.name: torch.ones_like(t.param, dtype=torch.bool)
                                     for t in resolve_targets(model)})
        self.masks.schedule = type(self).__name__
        if optimizer is not None:
            self.masks.attach(optimizer)
        self.round = 0
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._rewind_state = copy.deepcopy(model.state_dict()) if rewind_step == 0 else None

    def target_sparsity(self, round_index: int) -> float:
        """Sparsity after ``round_index + 1`` prunings: 1 − (1 − rate)^(r+1), ``sparsity`` last."""
        if round_index + 1 == self.rounds:
            return self.sparsity
        return 1.0 - (1.0 - self.rate_per_round) ** (round_index + 1)

    def step(self) -> bool:
        """Advance one training step; masks change only in :meth:`next_round`, so ``False``."""
        self.step_count += 1
        if self._rewind_state is None and self.step_count == self.rewind_step:
            self._rewind_state = copy.deepcopy(self.model.state_dict())
        return False

    def next_round(self, metrics: dict[str, float] | None = None) -> bool:
        """Prune, record this round, rewind survivors to step k; return whether rounds remain.

        ``metrics`` (e.g. the round's accuracy) go into :attr:`history`, a NumPy scalar as
        the Python number it holds (a checkpoint of it loads with ``weights_only=True``).

        Once all ``rounds`` ran there is nothing left to prune: it changes nothing (neither
        the masks nor the weights) and returns ``False``. A model whose state no longer fits
        the remembered weights (a buffer registered since) is refused before any change.
        """
        if self.round >= self.rounds:
            return False
        if self._rewind_state is None:
            raise RuntimeError(
                f"rewind_step {self.rewind_step} was never reached: call step() after every "
                "optimizer step and train at least that long in the first round"
            )
        check_masks_usable(self, "next_round")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise ArgumentTypeError(f"metrics must be a dict of name -> value or None, got "
                                    f"{type(metrics).__name__}")
        metrics = {k: _python_number(v) for k, v in (metrics or {}).items()}
        sparsity = self.target_sparsity(self.round)
        new, _ = compute_masks(self.model, sparsity, **self._prune)
        self.masks.check_update(new)  # refused before the weights are rewound
        self._check_rewindable()
        self.model.load_state_dict(self._rewind_state)
        self.masks.update(new)
        self.history.append({"round": self.round, "sparsity": sparsity, "metrics": metrics,
                             "masks": {n: m.clone() for n, m in new.items()}})
        self.round += 1
        self.step_count = 0
        return self.round < self.rounds

    def _check_rewindable(self) -> None:
        """Raise unless the weights remembered at ``rewind_step`` fit the model as it is now
        (the same entries, of the same shapes): ``load_state_dict`` copies the entries that
        fit before it refuses the rest, so a buffer registered since (or a layer resized)
        left the model half rewound, with its masks and round as before, behind a raw
        ``RuntimeError``."""
        now = self.model.state_dict()
        differ = sorted(set(now) ^ set(self._rewind_state)) or sorted(
            k for k in now if now[k].shape != self._rewind_state[k].shape)
        if differ:
            raise ValueError(
                f"next_round(): the model's state no longer fits the weights remembered at "
                f"rewind_step={self.rewind_step} ({', '.join(map(repr, differ[:3]))}"
                f"{', …' if len(differ) > 3 else ''} added, removed or resized since); "
                "give the model back the entries it had then, or build a new IterativePruning; "
                "nothing was changed"
            )

    def state_dict(self) -> dict[str, Any]:
        """The round, step, masks, rewind state and history as they are now: the history is
        a list of its own, which later rounds do not lengthen, and the rewind state a dict
        of its own (of the same tensors)."""
        return {"round": self.round, "step": self.step_count, "masks": self.masks.state_dict(),
                "rewind_state": _own(self._rewind_state), "history": list(self.history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a state it cannot come from changes nothing (a
        rewind state that does not fit the model is refused here, not at the next round, and
        so is a state that lacks one past ``rewind_step`` or holds one before it: the next
        round failed or rewound to weights of another step; one whose rounds pruned to
        other sparsities, of a run with another ``sparsity`` or ``rounds``; and a rewind
        state holding NaN or inf weights)."""
        check_state(self, state, ("round", "rewind_state", "history"))
        check_int("state['round']", state["round"], minimum=0)
        if state["round"] > self.rounds:
            raise ValueError(f"state['round'] must be at most rounds={self.rounds}, "
                             f"got {state['round']}")
        reached = state["round"] > 0 or state["step"] >= self.rewind_step
        if (state["rewind_state"] is not None) != reached:
            raise ValueError(
                f"state['rewind_state'] is {'None' if reached else 'set'} at round "
                f"{state['round']}, step {state['step']}, but this IterativePruning "
                f"(rewind_step={self.rewind_step}) {'has' if reached else 'has not'} reached "
                "its rewind step there: a state of a run with another rewind_step, or edited"
            )
        if state["rewind_state"] is not None:
            check_tensors("rewind_state", state["rewind_state"], self.model.state_dict())
            _check_rewind_values(self.model, state["rewind_state"])
        history = state["history"]
        if not isinstance(history, list) or len(history) != state["round"]:
            raise ValueError(f"state['history'] must be a list of one entry per round ran "
                             f"({state['round']}), got {history!r:.80}")
        for i, entry in enumerate(history):
            # a run of another sparsity or number of rounds pruned to other targets: its
            # masks were taken, and the next round pruned to this schedule's, without a word
            theirs = entry.get("sparsity") if isinstance(entry, Mapping) else None
            if not isinstance(theirs, numbers.Real) or not math.isclose(
                    theirs, self.target_sparsity(i), rel_tol=1e-12, abs_tol=1e-12):
                raise ValueError(
                    f"state['history'][{i}] pruned round {i} to sparsity {theirs!r}, this "
                    f"IterativePruning (rounds={self.rounds}, sparsity={self.sparsity!r}) "
                    f"prunes it to {self.target_sparsity(i)!r}: the state of a run with "
                    "another sparsity or number of rounds; accepted: the state of an "
                    "IterativePruning built with the same rounds and sparsity; nothing was "
                    "loaded")
        self.masks.load_state_dict(state["masks"])
        self.round, self.step_count = int(state["round"]), int(state["step"])
        self._rewind_state, self.history = _own(state["rewind_state"]), list(history)


def _check_rewind_values(model: nn.Module, rewind_state: Mapping[str, torch.Tensor]) -> None:
    """Raise naming the first entry of ``rewind_state`` that the next round would rewind
    ``model`` to a NaN or infinite weight with (or a NaN buffer, e.g. a running mean;
    buffers may hold ±inf on purpose, an attention mask's): it was loaded without a word,
    and every round after it trained from NaN."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    hint = "a state of a diverged run, or edited; nothing was loaded"
    for n, t in rewind_state.items():
        if not t.is_floating_point():
            continue
        if n in params:
            check_finite(f"state['rewind_state'][{n!r}]", t, hint=hint)
        elif bool(t.isnan().any()):
            raise ValueError(f"state['rewind_state'][{n!r}] holds NaN; {hint}")


def _own(rewind_state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A dict of its own holding the same tensors (never changed in place here): a state's
    ``rewind_state`` was the schedule's own dict, so a key the caller replaced in the state
    it saved (a tensor moved with ``.cpu()``, cast) changed the weights the next round
    rewinds to, and a loaded state stayed the caller's dict."""
    return None if rewind_state is None else dict(rewind_state)


def _python_number(value: object) -> object:
    """``value``, or the Python number a NumPy scalar (``np.float64``, ``np.bool_``, a 0-d
    array) holds."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()  # type: ignore[attr-defined]
    return value
