"""The hidden structure of sparse networks: masks as graphs, structure features, priors.

``to_graph`` turns a pruned model (or a ``MaskSet``) into a ``networkx.DiGraph`` of
neurons and surviving connections; ``structure_features`` summarises it in numbers that
predict how well the network trains; ``remove_dead_neurons`` makes the structure real by
dropping neurons that cannot affect the output; ``prior_masks`` builds masks from
random-graph families (Stier et al. 2021) through the ``graph:*`` criteria of
:mod:`sparsekit.scores.graph`.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparsekit.graph.priors import KINDS, prior_masks

# networkx is imported on first use only.
_LAZY = {
    "to_graph": "convert",
    "masks_from_graph": "convert",
    "structure_features": "features",
    "FEATURES": "features",
    "remove_dead_neurons": "surgery",
}

__all__ = ["FEATURES", "KINDS", "masks_from_graph", "prior_masks", "remove_dead_neurons",
           "structure_features", "to_graph"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(f"sparsekit.graph.{_LAZY[name]}")
        except ModuleNotFoundError as exc:
            if exc.name != "networkx":
                raise
            raise ImportError(f"sparsekit.graph.{name} needs networkx: "
                              "pip install 'sparsekit[graph]'") from exc
        return getattr(module, name)
    raise AttributeError(f"module 'sparsekit.graph' has no attribute {name!r}")
