"""The Schedule protocol: what every "when" of the pipeline offers a training loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

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
