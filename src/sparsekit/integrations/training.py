"""Sparsity through a framework's training: masks kept through its optimizer, schedules stepped.

Frameworks create the optimizer inside ``train()`` and hand out a wrapper of it, so the
integrations attach once they hold it. The schedule advances in a step post-hook of the
real optimizer, registered after the masks' own hooks: it counts exactly the steps that
ran — not micro-batches of gradient accumulation, nor steps a ``GradScaler`` skipped —
and sees the masked weights of that step. One :class:`Attached` at a time steps a given
schedule: a second :func:`attach` of it is refused until the first is removed, since two
hooks would step it twice per optimizer step.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsekit._checks import (
    ArgumentTypeError,
    check_materialized,
    check_module,
    check_optimizer,
)
from sparsekit.distributed import local
from sparsekit.masks import Masks, MaskSet, elementwise_state
from sparsekit.schedules.base import Schedule

Sparsity = Masks | Schedule | Callable[[nn.Module, torch.optim.Optimizer], Masks | Schedule]
"""What an integration keeps through training: a ``MaskSet``, a schedule, or a function
``(model, optimizer) -> MaskSet | schedule`` called at train begin with the real optimizer
(how a :class:`~sparsekit.DynamicSparsity`, which needs that optimizer, is built)."""


@dataclass
class Attached:
    """Masks (and a schedule) kept through one optimizer; :meth:`remove` lets go of it."""

    masks: Masks
    schedule: Schedule | None
    optimizer: torch.optim.Optimizer  # the real optimizer, not a framework's wrapper
    _handle: RemovableHandle | None = field(default=None, repr=False)
    _hooked: bool = field(default=True, repr=False)  # whether attach() hooked the masks

    def remove(self) -> None:
        """Stop stepping the schedule and stop masking the optimizer's steps. The weights
        keep their zeros (a saved model holds them); the masks stay usable, and the
        schedule can be attached again. Masks (without a schedule) that were attached to
        the optimizer before :func:`attach` (by ``masks.attach`` or another :func:`attach`)
        stay attached: a remove stopped the masking the user had set up, and the first
        remove of two attaches of the same masks stopped it for both."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            del _STEPPING[id(self.schedule)]
        # a DynamicSparsity's own detach also takes off its gradient-reading hook
        detach = getattr(self.schedule, "detach", None) or getattr(self.masks, "detach", None)
        if detach is not None and self._hooked:  # a StructureSet holds no hooks to remove
            self._hooked = False
            detach(self.optimizer)

    def _step(self, *_: object) -> None:
        """The optimizer's step post-hook; it holds this ``Attached``, and so its entry in
        :data:`_STEPPING`, for as long as it is registered."""
        assert self.schedule is not None
        self.schedule.step()


_STEPPING: weakref.WeakValueDictionary[int, Attached] = weakref.WeakValueDictionary()
"""The ``Attached`` stepping each schedule, by the schedule's id. An entry lasts while its
hook is registered (the hook holds it): it goes with :meth:`Attached.remove`, or with the
optimizer and the schedule once nothing else holds them (weak, so they are not kept
alive). It holds the schedule, so no other object reuses the id meanwhile."""


def attach(
    sparsity: Sparsity, model: nn.Module, optimizer: object, *,
    state: Mapping[str, Any] | None = None, state_name: str = "state",
) -> Attached:
    """Keep ``sparsity`` through every step of ``optimizer`` (or of the optimizer it wraps).

    A schedule's :meth:`~sparsekit.schedules.base.Schedule.step` then runs after each step
    that optimizer takes. A schedule built on another optimizer is refused: its gradient
    hooks would never fire (pass a function that builds it instead). So is a schedule that
    is attached already (to this optimizer or another) until :meth:`Attached.remove` of the
    first: it would step twice per optimizer step, and a remove would leave it stepping.

    ``state``, a ``state_dict()`` of the masks or the schedule (to resume a run), is loaded
    into them before anything is attached, so a state they refuse leaves the optimizer as
    it was; ``state_name`` names it in that error (the file it was read from). A schedule
    that a function builds hooks the optimizer as it is built (and prunes the model): when
    attaching it fails, the optimizer's step hooks are put back as they were before the
    call.

    A schedule a function builds starts from masks of its own, which building it applies
    to the weights and the optimizer state (a ``DynamicSparsity``'s starting masks). When
    resuming, those are the checkpoint's weights: the ones the ``state``'s masks keep, and
    their optimizer state, are put back as they were before the call, so that the run goes
    on exactly as the one that saved the state. When the state is refused, every weight
    and its optimizer state are put back (only those its masks named were: a state
    refused for having no masks, or masks of other names, left the model as the
    function's schedule had pruned it).
    """
    check(sparsity)
    real = check_optimizer(optimizer)
    if isinstance(sparsity, (Schedule, Masks)):
        return _attach(sparsity, real, state, state_name, _step_hooks(real))
    check_module("model", model)  # what the function builds on (masks and schedules: unused)
    hooks = _step_hooks(real)
    kept = None if state is None else _Kept(model, real)
    try:  # a DynamicSparsity hooks the optimizer as it is built
        attached = _attach(sparsity(model, real), real, state, state_name, hooks)
    except BaseException:
        _remove_hooks_since(real, hooks)
        if kept is not None:  # every weight: a refused state may name none of them
            kept.restore()
        raise
    if kept is not None:
        kept.restore(_kept_names(state))
        masks = attached.masks
        if isinstance(masks, MaskSet):  # zero what the loaded masks mask, again
            masks.load_state_dict(masks.state_dict())
    return attached


def _attach(built: object, real: torch.optim.Optimizer, state: Mapping[str, Any] | None,
            state_name: str, hooks: tuple[set[int], set[int]]) -> Attached:
    """:func:`attach` of what ``sparsity`` is or built: check it, load ``state``, hook it.
    ``hooks`` are the optimizer's step hooks before the call (:func:`_step_hooks`): the
    ``Attached`` of bare masks detaches them on remove only where they were not hooked
    then."""
    if not isinstance(built, (Schedule, Masks)):
        raise ArgumentTypeError(
            f"sparsity: the function must return a MaskSet or a schedule, got {built!r}"
        )
    schedule = built if isinstance(built, Schedule) else None
    own = getattr(schedule, "optimizer", None)
    if own is not None and check_optimizer(own) is not real:
        raise ValueError(
            f"sparsity: this {type(schedule).__name__} was built on another optimizer than "
            "the one training uses; pass a function (model, optimizer) -> schedule so that "
            "it is built on the training optimizer"
        )
    if schedule is not None and id(schedule) in _STEPPING:
        raise ValueError(
            f"sparsity: this {type(schedule).__name__} is attached already and would step "
            "twice per optimizer step; call remove() on the Attached that attach() returned "
            "before attaching it again"
        )
    masks = built.masks if schedule is not None else built
    # Whatever attaching would refuse (masks removed, an optimizer without the masked
    # weights) is refused before the state is loaded: a refusal changes nothing.
    check_attach = getattr(schedule, "check_attach", None) or getattr(masks, "check_attach",
                                                                      None)
    if check_attach is not None:
        check_attach(real, names=_state_names(state, schedule is not None))
    if state is not None:
        try:
            built.load_state_dict(state)  # checks it all before it changes anything
        except (TypeError, ValueError) as err:
            kind = ArgumentTypeError if isinstance(err, TypeError) else ValueError
            message = f"{state_name} is no state of this {type(built).__name__}: {err}"
            raise kind(message) from err
    (getattr(schedule, "attach", None) or masks.attach)(real)  # a DynamicSparsity's hook too
    attached = Attached(masks, schedule, real,  # a schedule is attached once (_STEPPING)
                        _hooked=schedule is not None or _step_hooks(real) != hooks)
    if schedule is not None:
        attached._handle = real.register_step_post_hook(attached._step)
        _STEPPING[id(schedule)] = attached
    return attached


class _Kept:
    """A copy (on the CPU) of every weight of ``model`` and of its per-element state in
    ``optimizer``, to put back with :meth:`restore`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = dict(model.named_parameters()) if isinstance(model, nn.Module) else {}
        for n, p in params.items():  # a meta weight failed the copy with a raw
            check_materialized(f"model: {n}", p)  # NotImplementedError ("Cannot copy out")
        self.weights = {n: (p, local(p).detach().to("cpu", copy=True))
                        for n, p in params.items()}
        self.state = {
            n: [(value, local(value).detach().to("cpu", copy=True))
                for value in elementwise_state(optimizer, p).values()]
            for n, p in params.items()
        }

    @torch.no_grad()
    def restore(self, names: list[str] | None = None) -> None:
        """Put back the weights ``names`` names (and their optimizer state), or all of
        them without ``names``."""
        chosen = self.weights if names is None else [n for n in names if n in self.weights]
        for n in chosen:
            for tensor, saved in (self.weights[n], *self.state[n]):
                local(tensor).copy_(saved)


def _state_names(state: object, of_schedule: bool) -> list[str] | None:
    """The names of the masks ``state`` (a schedule's state when ``of_schedule``, else a
    masks' state) holds, or ``None`` (the masks' own names) where it holds none: a state
    of the wrong form is left for ``load_state_dict`` to refuse."""
    if of_schedule:
        state = state.get("masks") if isinstance(state, Mapping) else None
    masks = state.get("masks") if isinstance(state, Mapping) else None
    return list(masks) if isinstance(masks, Mapping) else None


def _kept_names(state: object) -> list[str] | None:
    """The names of the masks in ``state``, a schedule's state or a masks' one (what a
    function returns is not known before it is called)."""
    return _state_names(state, True) or _state_names(state, False)


def _step_hooks(optimizer: torch.optim.Optimizer) -> tuple[set[int], set[int]]:
    """The ids of ``optimizer``'s step pre- and post-hooks now."""
    return set(optimizer._optimizer_step_pre_hooks), set(optimizer._optimizer_step_post_hooks)


def _remove_hooks_since(optimizer: torch.optim.Optimizer, before: tuple[set[int], set[int]]
                        ) -> None:
    """Remove the step hooks registered on ``optimizer`` since :func:`_step_hooks` gave
    ``before``: those of a schedule the sparsity function built for an :func:`attach` that
    then failed (a refused state), which would otherwise keep masking every later step of
    that optimizer (a ``Trainer`` keeps its optimizer for the next ``train()``)."""
    for hooks, known in zip((optimizer._optimizer_step_pre_hooks,
                             optimizer._optimizer_step_post_hooks), before, strict=True):
        for handle_id in [h for h in hooks if h not in known]:
            del hooks[handle_id]


def check(sparsity: object) -> None:
    """Raise :class:`ArgumentTypeError` unless ``sparsity`` is one of the accepted
    :data:`Sparsity`.

    A class (``GradualPruner`` rather than ``GradualPruner(...)``) and a function that
    cannot be called with ``(model, optimizer)`` are refused here, when the callback is
    built: both were taken for functions and failed only once training began, with
    Python's own ``TypeError`` (a missing argument) or a check of the class's own
    arguments that named the optimizer ("masks must be a dict …, got SGD"). A schedule
    class built from ``(model, optimizer)`` alone (a subclass fixing the rest) is a
    function like any other."""
    if not (isinstance(sparsity, (Schedule, Masks)) or callable(sparsity)):
        raise ArgumentTypeError(
            "sparsity must be a MaskSet, a schedule (GradualPruner, IterativePruning, "
            "DynamicSparsity …) or a function (model, optimizer) -> one of them, got "
            f"{type(sparsity).__name__}"
        )
    if isinstance(sparsity, (Schedule, Masks)):
        return
    try:
        signature = inspect.signature(sparsity)
    except (TypeError, ValueError):  # some builtins have none: left to the call
        return
    try:
        signature.bind(None, None)
    except TypeError as err:
        failure: TypeError | None = err
    else:
        failure = None
    # a Protocol with attributes (Schedule's masks) takes no issubclass: its step tells
    if isinstance(sparsity, type) and (failure is not None
                                       or not callable(getattr(sparsity, "step", None))):
        raise ArgumentTypeError(
            f"sparsity must be a MaskSet, a schedule or a function (model, optimizer) -> one "
            f"of them, got the class {sparsity.__name__}: pass an instance of it, or a "
            "function (model, optimizer) that builds one")
    if failure is not None:
        raise ArgumentTypeError(
            f"sparsity: the function must take the two arguments (model, optimizer), its "
            f"signature is {signature} ({failure})") from failure


class TrainingSparsity:
    """What every framework callback does: :func:`attach` when training starts, let go
    when it ends; a later training run continues with the same masks and schedule."""

    def __init__(self, sparsity: Sparsity) -> None:
        check(sparsity)
        self.sparsity = sparsity
        self.attached: Attached | None = None
        self._function = None if isinstance(sparsity, (Schedule, Masks)) else sparsity
        self._trained: nn.Module | None = None  # the model of the last begin()

    @property
    def masks(self) -> Masks | None:
        """The masks being (or last) trained; None before training started."""
        return None if self.attached is None else self.attached.masks

    @property
    def schedule(self) -> Schedule | None:
        """The schedule being (or last) stepped; None without one."""
        return None if self.attached is None else self.attached.schedule

    def begin(self, model: nn.Module, optimizer: object, *,
              state: Mapping[str, Any] | None = None, state_name: str = "state") -> None:
        """:func:`attach` (with the ``state`` to resume from, if any); :attr:`attached` is
        set only once that succeeded.

        A later training of the same model goes on with the masks and the schedule of the
        one before. A schedule the function built on that training's optimizer (a
        ``DynamicSparsity``) is built again on this one, from the state it ended with
        (unless ``state`` is given): it was refused as "built on another optimizer" —
        Lightning builds a new optimizer for each ``fit``. A function builds afresh for
        another model (an HF ``model_init`` builds one per ``train()``, a search trial each),
        which the masks of the one before were refused for."""
        if self.attached is not None:
            previous = self.attached.schedule or self.attached.masks
            own = getattr(self.attached.schedule, "optimizer", None)
            self.attached.remove()
            self.attached = None
            same = model is self._trained
            if self._function is None or same and (
                    own is None or check_optimizer(own) is check_optimizer(optimizer)):
                self.sparsity = previous
            else:
                self.sparsity = self._function
                if same and state is None:
                    state, state_name = previous.state_dict(), "the previous training's state"
        self.attached = attach(self.sparsity, model, optimizer, state=state,
                               state_name=state_name)
        self._trained = model

    def end(self) -> None:
        if self.attached is not None:
            self.attached.remove()
