"""Dynamic sparse training: drop and regrow connections at a fixed sparsity.

Every method is the same loop — every ``update_every`` steps, drop the weakest active
weights of each layer and grow as many inactive ones — with its own rules:

=========  ======================================  =========================================
method     drop                                    grow
=========  ======================================  =========================================
set        smallest |w| (Mocanu et al. 2018)       uniformly at random
rigl       smallest |w| (Evci et al. 2020)         largest |dense gradient|
snfs       smallest |w|; the total regrowth is     largest |momentum of dense gradients|
           redistributed over layers by their      (Dettmers & Zettlemoyer 2019)
           mean momentum magnitude
=========  ======================================  =========================================

Decisions depend only on weights, gradients and a seeded generator. Under
``DistributedDataParallel`` gradients are all-reduced before the step, so every rank
computes bitwise the same masks; the random stream is seeded identically on all ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparsekit.masks import MaskSet
from sparsekit.prune import check_sparsity, compute_masks

METHODS = ("set", "rigl", "snfs")
DROP_SCHEDULES = ("cosine", "linear", "constant")


def drop_fraction_at(step: int, *, initial: float, end_step: int, schedule: str) -> float:
    """The fraction of active weights replaced at ``step`` (0 from ``end_step`` on)."""
    if step >= end_step:
        return 0.0
    if schedule == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * step / end_step))
    if schedule == "linear":
        return initial * (1 - step / end_step)
    return initial


class DynamicSparsity:
    """Keep ``model`` at ``sparsity`` while moving its connections (SET, RigL, SNFS).

    Starts from a random mask with the given ``allocation`` (ERK by default). Call
    :meth:`step` after every ``optimizer.step()``. Regrown weights start at zero and their
    optimizer state is reset; each layer's number of active weights is preserved exactly
    (for ``snfs`` the total is preserved and layers trade weights by momentum).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float,
        *,
        method: str = "rigl",
        allocation: str = "erk",
        update_every: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        end_step: int,
        seed: int = 0,
        momentum: float = 0.9,
    ) -> None:
        check_sparsity(sparsity)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
        if drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"unknown drop_schedule {drop_schedule!r}; accepted: {', '.join(DROP_SCHEDULES)}"
            )
        if not 0 < drop_fraction < 1:
            raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction}")
        if update_every < 1 or end_step < 1:
            raise ValueError(
                f"update_every and end_step must be ≥ 1, got {update_every}, {end_step}"
            )
        masks, _ = compute_masks(model, sparsity, criterion="random", allocation=allocation,
                                 seed=seed)
        self.model, self.optimizer, self.method = model, optimizer, method
        self.update_every, self.end_step = update_every, end_step
        self.drop_fraction, self.drop_schedule, self.beta = drop_fraction, drop_schedule, momentum
        # A stream of its own: reusing the initial mask's stream would regrow the very
        # positions that scored highest at initialisation.
        self.generator = torch.Generator().manual_seed(seed + 1_000_003)
        self.step_count = 0
        self.masks = MaskSet(model, masks)
        self._grads: dict[str, torch.Tensor] = {}
        self._momenta = {n: torch.zeros_like(p) for n, p in self.masks.params.items()}
        # Registered before the MaskSet's hooks, so it sees the dense gradients.
        self._hook = optimizer.register_step_pre_hook(lambda *_: self._capture())
        self.masks.attach(optimizer)

    # -- the schedule -----------------------------------------------------------------

    def is_update_step(self, step: int) -> bool:
        return step % self.update_every == 0 and 0 < step < self.end_step

    def step(self) -> bool:
        """Advance one step; at update steps drop and regrow. Returns whether it updated."""
        self.step_count += 1
        if not self.is_update_step(self.step_count):
            return False
        fraction = drop_fraction_at(self.step_count, initial=self.drop_fraction,
                                    end_step=self.end_step, schedule=self.drop_schedule)
        self.masks.update(self._new_masks(fraction))
        self._grads.clear()
        return True

    @torch.no_grad()
    def _capture(self) -> None:
        upcoming = self.step_count + 1
        for n, p in self.masks.params.items():
            if p.grad is None:
                continue
            if self.method == "snfs":
                self._momenta[n].mul_(self.beta).add_(p.grad, alpha=1 - self.beta)
            elif self.method == "rigl" and self.is_update_step(upcoming):
                self._grads[n] = p.grad.detach().clone()

    @torch.no_grad()
    def _new_masks(self, fraction: float) -> dict[str, torch.Tensor]:
        masks = self.masks.masks
        drops = {n: round(fraction * int(m.sum())) for n, m in masks.items()}
        grows = self._redistribute(drops) if self.method == "snfs" else drops
        new = {}
        for n, mask in masks.items():
            w = self.masks.params[n].detach()
            kept = _keep_top(w.abs().float(), mask, int(mask.sum()) - drops[n])
            score = self._grow_scores(n, w)
            candidates = ~kept
            grow = _keep_top(score, candidates, min(grows[n], int(candidates.sum())))
            new[n] = kept | grow
        return new

    def _grow_scores(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if self.method == "set":
            return torch.rand(w.shape, generator=self.generator).to(w.device)
        if self.method == "rigl":
            if name not in self._grads:
                raise RuntimeError(
                    "rigl needs the dense gradient at update steps: call step() after every "
                    "optimizer.step() of the optimizer given to DynamicSparsity"
                )
            return self._grads[name].abs().float()
        return self._momenta[name].abs().float()

    def _redistribute(self, drops: dict[str, int]) -> dict[str, int]:
        """SNFS: share the total regrowth by each layer's mean momentum over active weights."""
        masks = self.masks.masks
        contrib = {n: float(self._momenta[n].abs()[m].mean()) if m.any() else 0.0
                   for n, m in masks.items()}
        total, norm = sum(drops.values()), sum(contrib.values())
        if norm == 0:
            return drops
        room = {n: m.numel() - int(m.sum()) + drops[n] for n, m in masks.items()}
        share = {n: min(room[n], math.floor(total * c / norm)) for n, c in contrib.items()}
        left = total - sum(share.values())
        for n in sorted(masks, key=lambda n: contrib[n], reverse=True):  # rounding remainder
            extra = min(left, room[n] - share[n])
            share[n] += extra
            left -= extra
        return share

    # -- persistence ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "masks": self.masks.state_dict(),
                "generator": self.generator.get_state(),
                "momenta": {n: m.clone() for n, m in self._momenta.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self._momenta = {n: m.clone() for n, m in state["momenta"].items()}

    def remove(self) -> None:
        """Stop updating and stop enforcing the masks (the weights stay sparse)."""
        self._hook.remove()
        self.masks.remove()


def _keep_top(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring entries among ``allowed`` (ties broken by position)."""
    flat = score.flatten().masked_fill(~allowed.flatten(), float("-inf"))
    out = torch.zeros_like(allowed.flatten())
    if k > 0:
        out[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return out.reshape(allowed.shape)
