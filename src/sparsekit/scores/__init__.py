"""How important is each weight: the scoring stage.

A criterion is a function ``fn(ctx: ScoreContext) -> dict[str, Tensor]`` returning one
float score per weight of each target (same shape as the weight; higher means keep).
Criteria are pure: they may run the model, but leave its parameters, gradients,
buffers and train/eval mode exactly as they found them.
"""

from __future__ import annotations

from sparsekit.registry import Registry
from sparsekit.scores._context import ScoreContext, batches, preserved

CRITERIA: Registry = Registry("criterion")
DATA_DRIVEN = frozenset({"snip", "taylor", "grasp", "synflow", "wanda"})
"""Criteria that need calibration data (``data=``) to compute their scores."""

# Registration happens on import of the modules below (kept after the registry).
from sparsekit.graph import priors  # noqa: E402,F401  (the graph:* criteria)
from sparsekit.scores import magnitude, saliency, wanda  # noqa: E402,F401

__all__ = ["CRITERIA", "DATA_DRIVEN", "ScoreContext", "batches", "preserved"]
