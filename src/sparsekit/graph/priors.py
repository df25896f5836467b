"""Random-graph priors as masks: ``prior_masks(model, density, kind)``.

The ``graph:*`` criteria themselves are scores and live in :mod:`sparsekit.scores.graph`;
their names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from sparsekit.masks import MaskSet
from sparsekit.prune import prune
from sparsekit.scores.graph import (
    KINDS,
    REWIRE,
    GraphScores,
    barabasi_albert,
    erdos_renyi,
    watts_strogatz,
)
from sparsekit.targets import TargetSpec

__all__ = ["KINDS", "REWIRE", "GraphScores", "barabasi_albert", "erdos_renyi", "prior_masks",
           "watts_strogatz"]


def prior_masks(
    model: nn.Module,
    density: float,
    kind: str,
    *,
    seed: int = 0,
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
) -> MaskSet:
    """Make ``model`` a ``kind`` random graph at ``density`` in every target; returns the masks.

    ``targets`` defaults to every ``nn.Linear`` weight and every recurrent hidden-to-hidden
    matrix. Same as ``sparsekit.prune(model, 1 - density, method=f"graph:{kind}")``.
    """
    KINDS.get(kind)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a float in (0, 1], got {density!r}")
    if targets is None:
        targets = [n for n, _ in model.named_parameters() if _is_default_target(model, n)]
    return prune(model, 1.0 - density, method=f"graph:{kind}", targets=targets, seed=seed)


def _is_default_target(model: nn.Module, name: str) -> bool:
    owner, _, pname = name.rpartition(".")
    module = model.get_submodule(owner)
    return (isinstance(module, nn.Linear) and pname == "weight") or (
        isinstance(module, nn.RNNBase) and pname.startswith("weight_hh")
    )
