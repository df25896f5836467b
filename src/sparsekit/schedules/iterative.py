"""Iterative magnitude pruning with weight rewinding (Frankle et al. 2020).

"Stabilizing the Lottery Ticket Hypothesis": rewind survivors to an early step k, not to
initialisation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sparsekit.masks import MaskSet
from sparsekit.prune import compute_masks
from sparsekit.targets import resolve_targets


class IterativePruning:
    """Train → prune ``rate_per_round`` of the survivors → rewind to step k → repeat.

    Your loop trains each round and calls :meth:`step` after every optimizer step (the
    weights at step ``rewind_step`` of the first round are remembered), then
    :meth:`next_round` to prune, record the round and rewind. Attach ``masks`` to each
    round's (fresh) optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rounds: int,
        rate_per_round: float,
        rewind_step: int,
        criterion: str = "magnitude",
        allocation: str = "global",
    ) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be ≥ 1, got {rounds}")
        if not 0 < rate_per_round < 1:
            raise ValueError(f"rate_per_round must be in (0, 1), got {rate_per_round}")
        if rewind_step < 0:
            raise ValueError(f"rewind_step must be ≥ 0, got {rewind_step}")
        compute_masks(model, rate_per_round, criterion=criterion, allocation=allocation)
        self.model = model
        self.rounds, self.rate_per_round, self.rewind_step = rounds, rate_per_round, rewind_step
        self._prune = dict(criterion=criterion, allocation=allocation)
        self.masks = MaskSet(model, {t.name: torch.ones_like(t.param, dtype=torch.bool)
                                     for t in resolve_targets(model)})
        self.round = 0
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._rewind_state = copy.deepcopy(model.state_dict()) if rewind_step == 0 else None

    def target_sparsity(self, round_index: int) -> float:
        """Sparsity after ``round_index + 1`` prunings: 1 − (1 − rate)^(r+1)."""
        return 1.0 - (1.0 - self.rate_per_round) ** (round_index + 1)

    def step(self) -> None:
        self.step_count += 1
        if self._rewind_state is None and self.step_count == self.rewind_step:
            self._rewind_state = copy.deepcopy(self.model.state_dict())

    def next_round(self, metrics: dict[str, float] | None = None) -> bool:
        """Prune, record this round, rewind survivors to step k; False once all rounds ran."""
        if self._rewind_state is None:
            raise RuntimeError(
                f"rewind_step {self.rewind_step} was never reached: call step() after every "
                "optimizer step and train at least that long in the first round"
            )
        sparsity = self.target_sparsity(self.round)
        new, _ = compute_masks(self.model, sparsity, **self._prune)
        self.history.append({"round": self.round, "sparsity": sparsity,
                             "metrics": dict(metrics or {}),
                             "masks": {n: m.clone() for n, m in new.items()}})
        self.model.load_state_dict(self._rewind_state)
        self.masks.update(new)
        self.round += 1
        self.step_count = 0
        return self.round < self.rounds

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "step": self.step_count, "masks": self.masks.state_dict(),
                "rewind_state": self._rewind_state, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.round, self.step_count = int(state["round"]), int(state["step"])
        self._rewind_state, self.history = state["rewind_state"], list(state["history"])
