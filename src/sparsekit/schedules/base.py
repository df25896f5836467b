"""The Schedule protocol: what every "when" of the pipeline offers a training loop, and the
checks every schedule's ``load_state_dict`` runs before it changes anything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from sparsekit._checks import ArgumentTypeError, check_int, check_materialized
from sparsekit.masks import Masks


@runtime_checkable
class Schedule(Protocol):
    """Changes a model's masks as training goes on.

    Call :meth:`step` after every ``optimizer.step()``; ``masks`` is the current state
    (a :class:`~sparsekit.masks.Masks`). ``state_dict``/``load_state_dict`` save and
    resume a run mid-way exactly, masks included (save the model and the optimizer too).
    """

    masks: Masks

    def step(self) -> bool:
        """Advance one training step; return whether the masks changed."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def check_state(schedule: Schedule, state: Any, keys: tuple[str, ...],
                settings: Mapping[str, Any] | None = None) -> None:
    """Raise unless ``state`` can be what ``schedule.state_dict()`` returned: a mapping with
    every one of ``keys`` and no other, a ``"step"`` that is an int ≥ 0 and a ``"masks"``
    state for the weights ``schedule.masks`` holds. Other keys are those of another
    schedule's state, whose step and masks mean something else (an IterativePruning's step
    counts from its last round; a DynamicSparsity's masks may grow). A schedule that records
    its ``settings`` (what its trajectory depends on: sparsity, method, steps) takes only a
    state of the same ones, under ``"settings"`` (a state saved without them, by an earlier
    version, is taken as it is): a 0.7 run resumed into a 0.5 schedule trained on at 0.7
    while ``sparsity`` said 0.5, a RigL run's masks resumed into SRigL broke its constant
    fan-in.

    The masks' own ``load_state_dict`` checks their shapes and dtypes before it changes
    anything; load them first of all that changes, after this and the schedule's own checks,
    so that a refused state leaves the model, the masks and the schedule as they were.
    """
    owner = f"{type(schedule).__name__}.state_dict()"
    check_masks_usable(schedule, "load_state_dict")
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(f"state must be the dict {owner} returns, got "
                                f"{type(state).__name__}")
    optional = ("settings",) if settings is not None else ()
    missing = [k for k in ("step", "masks", *keys) if k not in state]
    if missing:
        raise ValueError(f"state lacks {', '.join(map(repr, missing))}: pass the dict {owner} "
                         f"returns, with keys {', '.join(map(repr, ('step', 'masks', *keys)))}")
    extra = [k for k in state if k not in ("step", "masks", *keys, *optional)]
    if extra:
        raise ValueError(f"state has {', '.join(map(repr, extra))}, which {owner} never holds "
                         f"(the state of another schedule?): pass the dict {owner} returns, "
                         f"with keys {', '.join(map(repr, ('step', 'masks', *keys)))}")
    check_int("state['step']", state["step"], minimum=0)
    masks = state["masks"]
    if not isinstance(masks, Mapping) or not isinstance(masks.get("masks"), Mapping):
        raise ArgumentTypeError(f"state['masks'] must be the dict masks.state_dict() returns, "
                                f"with a 'masks' dict of name -> bool tensor, got {masks!r:.80}")
    if set(masks["masks"]) != set(schedule.masks.masks):
        raise ValueError(f"state['masks'] holds masks for {sorted(masks['masks'])}; this "
                         f"schedule masks {sorted(schedule.masks.masks)}")
    saved = state.get("settings")
    if settings is not None and saved is not None:
        if not isinstance(saved, Mapping):
            raise ArgumentTypeError(f"state['settings'] must be the dict {owner} holds, got "
                                    f"{saved!r:.80}")
        for key, value in settings.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"state['settings'] is of a run with {key}={saved.get(key)!r}, this "
                    f"{type(schedule).__name__} has {key}={value!r}: build it with the run's "
                    "settings to resume that run; nothing was changed")


def check_masks_usable(schedule: Any, action: str) -> None:
    """Raise ``RuntimeError`` if the masks ``schedule`` drives were removed
    (``schedule.masks.remove()``): there is nothing left to load into or to update, and
    the error should say so rather than that the names differ or a key is missing."""
    if getattr(schedule.masks, "_removed", False):
        raise RuntimeError(
            f"{type(schedule).__name__}.{action}(): its masks were removed by remove(); "
            f"build a new {type(schedule).__name__} to go on"
        )


def check_tensors(key: str, value: Any, like: Mapping[str, torch.Tensor]) -> None:
    """Raise unless ``value`` maps exactly the names of ``like`` to dense tensors of their
    shapes, floating where they are, and holding values (not on the meta device: a state
    read with ``map_location="meta"`` failed to copy after the masks had loaded, or at the
    next round); ``key`` names ``value`` in the state dict."""
    if not isinstance(value, Mapping) or not all(isinstance(t, torch.Tensor)
                                                 for t in value.values()):
        raise ArgumentTypeError(f"state[{key!r}] must be a dict of name -> tensor, got "
                                f"{value!r:.80}")
    if set(value) != set(like):
        raise ValueError(f"state[{key!r}] has entries for {sorted(value)}, expected {sorted(like)}")
    for n, t in value.items():
        if t.layout != torch.strided:  # a sparse one failed inside PyTorch at its first read
            raise ArgumentTypeError(f"state[{key!r}][{n!r}] must be a dense (strided) tensor, "
                                    f"got layout {t.layout}; convert it with .to_dense()")
        if t.shape != like[n].shape or t.is_floating_point() != like[n].is_floating_point():
            raise ValueError(f"state[{key!r}][{n!r}] is a {t.dtype} tensor of shape "
                             f"{tuple(t.shape)}, expected {like[n].dtype} of shape "
                             f"{tuple(like[n].shape)}")
        check_materialized(f"state[{key!r}][{n!r}]", t)
