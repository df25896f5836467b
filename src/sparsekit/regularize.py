"""The training-time route to structure: penalties and proximal steps over dependency groups.

Channel ``c`` of a dependency group (see :mod:`sparsekit.structured`) is one vector: its
writer rows, biases, BatchNorm entries and reader columns on every branch. Driving that
vector to exactly zero makes the channel removable by :func:`~sparsekit.shrink` without
changing the outputs. Three ways to get there, all usable with any optimizer:

* :class:`GroupLasso` — the SSL penalty (Wen et al. 2016) ``λ Σ_c ‖w_c‖₂`` to add to the
  loss; it shrinks whole channels, but plain (sub)gradient steps rarely land on zero;
* :class:`GroupEnvelope` — ``λ/2 Σ_{c ∉ top-k} ‖w_c‖₂²`` per group: only the channels
  outside the ``k`` strongest are pulled down, so the survivors are not shrunk (the
  k-level idea of group sparse envelope penalties such as WGSEF);
* :class:`SoftThreshold` — an optimizer wrapper that applies the proximal operator after
  every step (soft-thresholding, as in ST-3's recipe): elementwise ``sign(w)·max(|w| − λη,
  0)`` or, given groups, ``w_c · max(0, 1 − λη/‖w_c‖₂)``. It sets weights and whole
  channels to exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from sparsekit._checks import check_fraction, check_nonnegative, check_optimizer
from sparsekit.structured.dependency import Group, Slice, check_groups, dependency_groups

__all__ = ["GroupEnvelope", "GroupLasso", "SoftThreshold", "channel_norms"]


def channel_norms(model: nn.Module, group: Group) -> torch.Tensor:
    """‖w_c‖₂ of every channel of ``group`` over all of its parameter slices
    (differentiable; buffers such as BatchNorm running statistics are not counted)."""
    squares = None
    for s, param in _parameter_slices(model, group):
        part = _rows(param, s, group.channels).reshape(group.channels, -1).pow(2).sum(1)
        squares = part if squares is None else squares + part
    if squares is None:
        return torch.zeros(group.channels)
    return squares.clamp_min(1e-24).sqrt()  # finite gradient at an exact zero


class GroupLasso:
    """``strength · Σ_groups Σ_c ‖w_c‖₂`` — call it and add the result to the loss.

    ``groups`` defaults to :func:`~sparsekit.structured.dependency_groups` of ``model``
    (traced once, here).
    """

    def __init__(self, model: nn.Module, strength: float, groups: Sequence[Group] | None = None
                 ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_nonnegative("strength", strength)  # inf would zero every weight
        self.model = model
        self.strength = float(strength)
        self.groups = dependency_groups(model) if groups is None else check_groups(groups, model)

    def __call__(self) -> torch.Tensor:
        return self.strength * sum((channel_norms(self.model, g).sum() for g in self.groups),
                                   torch.zeros(()))


class GroupEnvelope(GroupLasso):
    """``strength/2 · Σ_groups Σ_{c outside the top k} ‖w_c‖₂²`` with ``k`` the channels a
    group keeps at ``sparsity`` (at least one): the weakest channels are pulled to zero and
    the strongest are left alone."""

    def __init__(self, model: nn.Module, strength: float, sparsity: float,
                 groups: Sequence[Group] | None = None) -> None:
        check_fraction("sparsity", sparsity)
        super().__init__(model, strength, groups)
        self.sparsity = float(sparsity)

    def __call__(self) -> torch.Tensor:
        total = torch.zeros(())
        for g in self.groups:
            norms = channel_norms(self.model, g)
            k = max(round(g.channels * (1.0 - self.sparsity)), 1)
            outside = torch.topk(norms.detach(), g.channels - k, largest=False).indices
            total = total + norms[outside].pow(2).sum()
        return 0.5 * self.strength * total


class SoftThreshold:
    """Wrap ``optimizer``: after each ``step`` apply the proximal operator of
    ``strength · ‖·‖₁`` (elementwise, on the optimizer's parameters of two or more
    dimensions) or, with ``groups``, of the group lasso over their channels. The
    threshold is ``strength`` times each parameter group's learning rate.

    Everything else (``zero_grad``, ``state_dict``, ``param_groups`` …) is the wrapped
    optimizer's, so schedulers and training loops use it unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, strength: float, *,
                 model: nn.Module | None = None, groups: Iterable[Group] | None = None) -> None:
        check_optimizer(optimizer)
        check_nonnegative("strength", strength)  # inf would zero every weight
        if groups is not None and model is None:
            raise ValueError("groups= needs model= (the module the groups' names refer to)")
        self.optimizer = optimizer
        self.strength = float(strength)
        self.model = model
        self.groups = None if groups is None else check_groups(groups, model)
        if self.groups is not None:
            self._lr()  # one learning rate, checked before training starts

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = self.optimizer.step(closure)
        self.threshold()
        return loss

    @torch.no_grad()
    def threshold(self) -> None:
        """Apply the proximal step now (``step`` calls it after the optimizer's step)."""
        if self.groups is None:
            for group in self.optimizer.param_groups:
                tau = self.strength * group["lr"]
                for p in group["params"]:
                    if p.dim() >= 2:
                        p.copy_(p.sign() * (p.abs() - tau).clamp_min(0))
            return
        tau = self.strength * self._lr()
        for g in self.groups:
            scale = (1 - tau / channel_norms(self.model, g)).clamp_min(0)
            for s, param in _parameter_slices(self.model, g):
                view = _rows(param, s, g.channels)  # writes through to param
                factor = scale.repeat_interleave(s.repeat).to(param.device, param.dtype)
                view.mul_(factor.reshape(-1, *[1] * (view.dim() - 1)))

    def _lr(self) -> float:
        rates = {g["lr"] for g in self.optimizer.param_groups}
        if len(rates) != 1:
            raise ValueError("SoftThreshold with groups needs one learning rate for all "
                             f"parameter groups, got {sorted(rates)}")
        return float(next(iter(rates)))

    def __getattr__(self, name: str):  # zero_grad, param_groups, state_dict …
        return getattr(self.optimizer, name)


def _parameter_slices(model: nn.Module, group: Group) -> list[tuple[Slice, torch.Tensor]]:
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[tuple[int, int, int]] = set()
    out = []
    for s in group.slices:
        p = params.get(s.name)
        key = (id(p), s.dim, s.offset)
        if p is not None and key not in seen:  # a tied weight counts once
            seen.add(key)
            out.append((s, p))
    return out


def _rows(param: torch.Tensor, s: Slice, channels: int) -> torch.Tensor:
    """The entries of ``param`` owned by the group's channels, channel axis first (a view)."""
    return param.movedim(s.dim, 0)[s.offset: s.offset + channels * s.repeat]
