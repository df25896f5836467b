"""How important is each weight: the scoring stage.

A criterion is a function ``fn(ctx: ScoreContext) -> dict[str, Tensor]`` returning one
float score per weight of each target (same shape as the weight; higher means keep) and,
if it reads only a weight's value, of each BatchNorm scale in ``ctx.scales`` (a channel
pattern's group counts them; ``magnitude`` does).
Criteria are pure: they may run the model, but leave its parameters, gradients,
buffers and train/eval mode exactly as they found them.

Each criterion registers with its metadata: ``data_driven`` (it needs calibration data,
``data=``), ``needs_labels`` (that data must be ``(inputs, labels)`` batches) and
``readers_only`` (the scores rank the input columns that read a channel, so a structured
pattern takes a channel's importance from its readers alone: FLAP) and ``per_row`` (the
scores compare the weights of one output row, so an unstructured mask keeps an equal share
of each row: Wanda's "per output" comparison), read with
``CRITERIA.meta(name)`` or selected with ``CRITERIA.names(data_driven=True)``.
"""

from __future__ import annotations

import warnings
from typing import Any

from sparsekit.registry import Registry
from sparsekit.scores._context import ScoreContext, batches, preserved

CRITERIA: Registry = Registry("method", meta={"data_driven": False, "needs_labels": False,
                                          "readers_only": False, "per_row": False})

# Registration happens on import of the modules below (kept after the registry).
from sparsekit.scores import flap, graph, magnitude, saliency, wanda  # noqa: E402,F401

__all__ = ["CRITERIA", "ScoreContext", "batches", "preserved"]


def __getattr__(name: str) -> Any:
    if name == "DATA_DRIVEN":
        warnings.warn(
            "sparsekit.scores.DATA_DRIVEN is deprecated; use "
            "CRITERIA.names(data_driven=True) or CRITERIA.meta(name)['data_driven']",
            DeprecationWarning, stacklevel=2,
        )
        return frozenset(CRITERIA.names(data_driven=True))
    raise AttributeError(f"module 'sparsekit.scores' has no attribute {name!r}")
