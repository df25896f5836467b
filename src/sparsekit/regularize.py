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
  every step (proximal gradient descent, ISTA): elementwise ``sign(w)·max(|w| − λη, 0)``
  or, given groups, ``w_c · max(0, 1 − λη/‖w_c‖₂)``. It sets weights and whole channels to
  exactly zero. The shrinkage accumulates in the stored weights; ST-3 instead keeps the
  dense weights, soft-thresholds them in the forward pass only and trains them through a
  straight-through estimator, which this wrapper does not do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_fraction,
    check_int,
    check_module,
    check_nonnegative,
    check_optimizer,
)
from sparsekit.structured.dependency import Group, Slice, check_groups, dependency_groups
from sparsekit.structured.importance import round_count

__all__ = ["GroupEnvelope", "GroupLasso", "SoftThreshold", "channel_norms"]


def channel_norms(model: nn.Module, group: Group) -> torch.Tensor:
    """‖w_c‖₂ of every channel of ``group`` over all of its parameter slices
    (differentiable; buffers such as BatchNorm running statistics are not counted).

    ``group`` is checked against ``model`` (a group of another model used to give zeros).
    Half-precision weights are summed in float32, so the norms neither overflow (a
    float16 weight of 300) nor give NaN gradients at an exact zero.
    """
    check_module("model", model)
    if not isinstance(group, Group):
        raise ArgumentTypeError(f"group must be a Group (from dependency_groups or "
                                f"transformer_groups), got {type(group).__name__}")
    _check_groups([group], model, "group")
    return _channel_norms(model, group)


def _channel_norms(model: nn.Module, group: Group) -> torch.Tensor:
    squares = None
    for s, param in _parameter_slices(model, group):
        rows = _rows(param, s, group.channels)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        part = rows.reshape(group.channels, -1).pow(2).sum(1)
        squares = part if squares is None else squares + part
    if squares is None:
        return torch.zeros(group.channels)
    return squares.clamp_min(1e-24).sqrt()  # finite gradient at an exact zero


def _check_groups(groups: object, model: nn.Module, name: str = "groups") -> list[Group]:
    """:func:`check_groups`, with wrong types as :class:`ArgumentTypeError` and every group
    of at least one channel (a group of none failed in ``reshape``)."""
    try:
        groups = check_groups(groups, model, name)
    except TypeError as e:
        raise ArgumentTypeError(str(e)) from e
    for i, g in enumerate(groups):
        check_int(f"{name}[{i}].channels" if name == "groups" else f"{name}.channels",
                  g.channels, minimum=1)
    return groups


def _check_still_fit(groups: list[Group], model: nn.Module) -> None:
    """Raise, naming ``groups``, unless they still fit ``model``: a layer replaced since they
    were traced (another width) gave norms of the wrong entries, silently where the sizes
    divide, else a raw ``RuntimeError`` of ``reshape``."""
    try:
        check_groups(groups, model)
    except ValueError as e:
        raise ValueError(f"{e}; the model changed since the regulariser was built: build it "
                         "again for the model as it is") from e


def _resolve_groups(model: nn.Module, groups: object) -> list[Group]:
    """``groups`` checked, or the dependency groups of ``model``; never none (a penalty or
    a proximal step over no groups used to do nothing, silently). ``model`` is an
    ``nn.Module``: its callers check it first."""
    if groups is None:
        found = dependency_groups(model)
        if not found:
            raise ValueError(f"model ({type(model).__name__}) has no dependency groups: no "
                             "channel can be removed, so the regulariser would do nothing; "
                             "pass groups= (e.g. transformer_groups) or regularise another model")
        return found
    found = _check_groups(groups, model)
    if not found:
        raise ValueError("groups is empty: the regulariser would do nothing; pass at least "
                         "one Group (dependency_groups(model), transformer_groups(model))")
    return found


class GroupLasso:
    """``strength · Σ_groups Σ_c ‖w_c‖₂`` — call it and add the result to the loss.

    ``groups`` defaults to :func:`~sparsekit.structured.dependency_groups` of ``model``
    (traced once, here).
    """

    def __init__(self, model: nn.Module, strength: float, groups: Sequence[Group] | None = None
                 ) -> None:
        check_module("model", model)
        check_nonnegative("strength", strength)  # inf would zero every weight
        self.groups = _resolve_groups(model, groups)
        self.model = model
        self.strength = float(strength)

    def __call__(self) -> torch.Tensor:
        _check_still_fit(self.groups, self.model)
        return self.strength * sum((_channel_norms(self.model, g).sum() for g in self.groups),
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
        _check_still_fit(self.groups, self.model)
        total = torch.zeros(())
        for g in self.groups:
            norms = _channel_norms(self.model, g)
            # as prune(pattern="channel") and prune_structured count (ties keep more):
            # round() kept 2 of 5 at 0.5, the pruning 3, so this drove a kept channel to 0
            near = g.channels * (1.0 - self.sparsity)
            k = round_count(int(near), g, 1, near=near)
            outside = torch.topk(norms.detach(), g.channels - k, largest=False).indices
            total = total + norms[outside].pow(2).sum()
        return 0.5 * self.strength * total


def _wrapped(name: str) -> property:
    """The attribute ``name`` of the wrapped ``self.optimizer``, read and written through
    (Optimizer's own methods and LR schedulers reach it on the wrapper)."""
    return property(lambda self: getattr(self.optimizer, name),
                    lambda self, value: setattr(self.optimizer, name, value))


class SoftThreshold(torch.optim.Optimizer):
    """Wrap ``optimizer``: after each ``step`` apply the proximal operator of
    ``strength · ‖·‖₁`` (elementwise, on the optimizer's trainable parameters of two or
    more dimensions; one with ``requires_grad=False`` is left alone) or, with ``groups``,
    of the group lasso over their channels. The threshold is ``strength`` times each
    parameter group's learning rate. Every parameter of ``groups`` must be one the
    optimizer steps (held by it, ``requires_grad``): a ``ValueError`` otherwise, at
    construction and before each step — the proximal step shrank frozen weights, a
    BatchNorm γ left out of the optimizer or another model's weights, and a channel with a
    fixed part can never reach zero.

    Everything else (``zero_grad``, ``state_dict``, ``param_groups`` …) is the wrapped
    optimizer's, so schedulers and training loops use it unchanged: it is a
    ``torch.optim.Optimizer`` (as accelerate's wrapper is) that keeps no state of its own,
    and ``state_dict``/``load_state_dict`` are the wrapped optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, strength: float, *,
                 model: nn.Module | None = None, groups: Iterable[Group] | None = None) -> None:
        # no Optimizer.__init__: param_groups, state and hooks are the wrapped optimizer's
        check_optimizer(optimizer)
        check_nonnegative("strength", strength)  # inf would zero every weight
        if groups is not None and model is None:
            raise ValueError("groups= needs model= (the module the groups' names refer to)")
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be an nn.Module or None, got "
                                    f"{type(model).__name__}")
        groups = None if groups is None else _resolve_groups(model, groups)
        self.optimizer = optimizer
        self.strength = float(strength)
        self.model = model
        self.groups = groups
        if self.groups is not None:  # checked before training starts
            self._lr()
            self._check_stepped()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if self.groups is not None:
            # before the optimizer steps: a failure leaves the weights as they were
            self._lr()
            _check_still_fit(self.groups, self.model)
            self._check_stepped()
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
                    if p.dim() >= 2 and p.requires_grad:
                        p.copy_(p.sign() * (p.abs() - tau).clamp_min(0))
            return
        _check_still_fit(self.groups, self.model)
        self._check_stepped()
        tau = self.strength * self._lr()
        for g in self.groups:
            scale = (1 - tau / _channel_norms(self.model, g)).clamp_min(0)
            for s, param in _parameter_slices(self.model, g):
                view = _rows(param, s, g.channels)  # writes through to param
                factor = scale.repeat_interleave(s.repeat).to(param.device, param.dtype)
                view.mul_(factor.reshape(-1, *[1] * (view.dim() - 1)))

    def _check_stepped(self) -> None:
        """Raise, naming ``groups``, unless the optimizer steps every parameter of the
        groups, as the elementwise mode thresholds only those (and the penalties move only
        those): anything else is not the optimizer's to change."""
        stepped = {id(p) for g in self.optimizer.param_groups for p in g["params"]
                   if p.requires_grad}
        for i, g in enumerate(self.groups):
            for s, param in _parameter_slices(self.model, g):
                if id(param) not in stepped:
                    why = "requires_grad=False" if not param.requires_grad else \
                        "not among the optimizer's parameters"
                    raise ValueError(
                        f"groups[{i}] ({g.name!r}) holds {s.name!r} ({why}), which the "
                        "optimizer does not step: the proximal step would change a weight "
                        "training leaves fixed, and its channels could not reach zero; "
                        "accepted: groups whose parameters the optimizer steps (leave out "
                        "the groups of frozen layers, or pass the optimizer of model)")

    def _lr(self) -> float:
        rates = {float(g["lr"]) for g in self.optimizer.param_groups}
        if len(rates) != 1:
            raise ValueError("SoftThreshold with groups needs one learning rate for all "
                             f"parameter groups, got {sorted(rates)}")
        return next(iter(rates))

    # -- the wrapped optimizer's, as Optimizer's own methods would otherwise see this one

    param_groups = _wrapped("param_groups")
    state = _wrapped("state")
    defaults = _wrapped("defaults")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):  # type: ignore[override]
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict:  # plain attributes (Optimizer's expects its own)
        # without the ``step`` an LR scheduler wraps onto the instance (a local function
        # that cannot be pickled), as Optimizer.__getstate__ leaves it out
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"SoftThreshold(strength={self.strength}, optimizer={self.optimizer!r})"

    def __getattr__(self, name: str):  # register_step_pre_hook's dicts, Adam's options …
        if name == "optimizer" or name.startswith("__"):  # unpickling, copying: no recursion
            raise AttributeError(name)
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
