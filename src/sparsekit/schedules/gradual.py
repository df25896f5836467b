"""Gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_int,
    check_optimizer,
    check_sparsity,
    renamed,
    renamed_attribute,
)
from sparsekit.masks import MaskSet
from sparsekit.patterns import parse_pattern
from sparsekit.prune import compute_masks
from sparsekit.schedules.base import check_masks_usable, check_state
from sparsekit.targets import resolve_targets


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """s(t) = s_f + (s_i − s_f)(1 − (t − t₀)/(t_end − t₀))³, clamped to [t₀, t_end].

    ``step``, ``start`` and ``end`` are ints ≥ 0 with ``start < end``, ``initial`` and
    ``final`` sparsities in [0, 1): a NaN sparsity came back as NaN, a step given as a str
    was a raw ``TypeError``, and ``start ≥ end`` returned ``initial`` or ``final`` as if
    it were a schedule.
    """
    check_int("step", step, minimum=0)
    check_sparsity(initial, "initial")
    check_sparsity(final, "final")
    check_int("start", start, minimum=0)
    check_int("end", end, minimum=1)
    if start >= end:
        raise ValueError(f"need 0 ≤ start < end, got start={start}, end={end}")
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def check_initial_sparsity(initial_sparsity: float, sparsity: float) -> None:
    """Raise unless a schedule from ``initial_sparsity`` to ``sparsity`` only prunes: one
    that starts sparser than it ends would have to revive pruned weights."""
    if initial_sparsity > sparsity:
        raise ValueError(
            f"initial_sparsity must be in [0, sparsity] = [0, {sparsity}], got {initial_sparsity}"
        )


class GradualPruner:
    """Raise sparsity from ``initial_sparsity`` to ``sparsity`` while training.

    Call :meth:`step` after every ``optimizer.step()``. Every ``every`` steps between
    ``start_step`` and ``end_step`` the model is re-pruned by ``method`` to the cubic
    schedule's sparsity; masks only shrink, and with ``optimizer`` they are kept through
    its steps. The remaining keywords (``targets``, ``exclude``, ``data`` …) go to
    :func:`~sparsekit.prune` (``data``, which every update prunes with, must be
    re-iterable: not a generator). ``final_sparsity=`` and ``criterion=`` are deprecated
    spellings of ``sparsity=`` and ``method=``.
    """

    @renamed(final_sparsity="sparsity", criterion="method")
    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        start_step: int,
        end_step: int,
        every: int,
        initial_sparsity: float = 0.0,
        method: str = "magnitude",
        allocation: str = "uniform",
        pattern: str = "unstructured",
        optimizer: torch.optim.Optimizer | None = None,
        **prune_kwargs: Any,
    ) -> None:
        check_sparsity(sparsity)
        check_sparsity(initial_sparsity, "initial_sparsity")
        check_initial_sparsity(initial_sparsity, sparsity)
        check_int("start_step", start_step, minimum=0)
        check_int("end_step", end_step, minimum=1)
        check_int("every", every, minimum=1)
        if start_step >= end_step:
            raise ValueError(f"need 0 ≤ start_step < end_step, got {start_step}, {end_step}")
        check_optimizer(optimizer, optional=True)
        if isinstance(prune_kwargs.get("data"), Iterator):
            # the dry run below used it up, and the first prune failed, after training began,
            # saying that data "holds no batches"
            raise ArgumentTypeError(
                f"data must be re-iterable (a tensor, an (inputs, labels) pair, a list of "
                f"batches or a DataLoader): GradualPruner prunes with it at every update, and "
                f"an iterator is used up by the first; got {type(prune_kwargs['data']).__name__}"
            )
        self.model = model
        self.sparsity, self.initial_sparsity = sparsity, initial_sparsity
        # Python ints: NumPy ones made step() return np.bool_, not the bool it documents
        self.start_step, self.end_step, self.every = int(start_step), int(end_step), int(every)
        self._prune = dict(method=method, allocation=allocation, pattern=pattern, **prune_kwargs)
        # Validate the whole configuration now (a dry run), before anything is mutated.
        compute_masks(model, sparsity, **self._prune)
        chosen = resolve_targets(
            model, prune_kwargs.get("targets"), prune_kwargs.get("exclude", ())
        )
        # the weights' own zeros need not follow the pattern (a model pruned before): it is
        # declared at the first prune, whose masks follow it (update keeps new & old)
        self.masks = MaskSet(model, {t.name: _already_kept(t.param) for t in chosen})
        self._pattern = str(parse_pattern(pattern))
        self.masks.schedule = type(self).__name__
        if optimizer is not None:
            self.masks.attach(optimizer)
        self.step_count = 0
        if start_step == 0:
            self._update(0)

    final_sparsity = renamed_attribute("final_sparsity", "sparsity")

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, initial=self.initial_sparsity, final=self.sparsity,
                              start=self.start_step, end=self.end_step)

    def step(self) -> bool:
        """Advance one training step; returns whether the masks changed.

        A prune that fails (masks removed, a parameter replaced by one of another shape)
        raises before the step count or any mask changes."""
        t = self.step_count + 1
        on_grid = (t - self.start_step) % self.every == 0 or t == self.end_step
        updated = self.start_step <= t <= self.end_step and on_grid
        if updated:
            self._update(t)
        self.step_count = t
        return updated

    def _update(self, t: int) -> None:
        check_masks_usable(self, "step")
        self.masks.check_update({})  # a weight replaced by one of another shape
        new, _ = compute_masks(self.model, self.sparsity_at(t), **self._prune)
        self.masks.update({n: m & self.masks.masks[n] for n, m in new.items()})
        self.masks.pattern = self._pattern

    def state_dict(self) -> dict[str, Any]:
        """The step and the masks, and the settings they follow (:meth:`settings`)."""
        return {"step": self.step_count, "masks": self.masks.state_dict(),
                "settings": self.settings()}

    def settings(self) -> dict[str, Any]:
        """What the run's masks depend on, which a resumed run must share."""
        return {"sparsity": float(self.sparsity), "initial_sparsity": float(self.initial_sparsity),
                "start_step": self.start_step, "end_step": self.end_step, "every": self.every,
                "method": self._prune["method"], "allocation": self._prune["allocation"],
                "pattern": self._pattern}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a state it cannot come from changes nothing —
        among them the masks of a run with another ``pattern`` once it has pruned (their
        label checked against this pruner's: its next update kept them, AND-ed with masks of
        its own pattern, under its own label, which they then did not follow)."""
        check_state(self, state, (), self.settings())
        masks = state["masks"]
        label = masks.get("pattern") if isinstance(masks, Mapping) else None
        if int(state["step"]) >= self.start_step and isinstance(label, str):
            try:
                theirs = str(parse_pattern(label))
            except ValueError:
                theirs = None  # the masks' own load names a malformed label
            if theirs is not None and theirs != self._pattern:
                raise ValueError(f"state['masks'] follow pattern {theirs!r}, this GradualPruner "
                                 f"prunes to {self._pattern!r}; accepted: the state of a "
                                 f"GradualPruner of pattern={self._pattern!r}")
        self.masks.load_state_dict(masks)
        self.step_count = int(state["step"])


def _already_kept(weight: torch.Tensor) -> torch.Tensor:
    """The entries of ``weight`` a gradual schedule starts from: its nonzeros (a model
    pruned before keeps its zeros), or all of it where every entry is zero. An all-zero
    weight is a zero-initialised one (an output projection, a residual branch), not a
    pruned one: its mask of zeros froze it through the dense phase and pruned it 100 %."""
    weight = weight.detach()
    return weight != 0 if bool(weight.any()) else torch.ones_like(weight, dtype=torch.bool)
