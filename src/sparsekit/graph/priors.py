"""Random-graph priors as masks: ``prior_masks(model, sparsity=..., method=...)``.

The ``graph:*`` criteria themselves are scores and live in :mod:`sparsekit.scores.graph`;
their names are re-exported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from sparsekit._checks import check_fraction, check_module, check_sparsity, renamed
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


@renamed(kind="method")
def prior_masks(
    model: nn.Module,
    density: float | None = None,
    kind: str | None = None,
    *,
    sparsity: float | None = None,
    method: str | None = None,
    seed: int = 0,
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
) -> MaskSet:
    """Make every target of ``model`` a random graph of family ``method`` (a name of
    :data:`KINDS`) at ``sparsity``; returns the masks.

    ``targets`` defaults to every ``nn.Linear`` weight and every recurrent hidden-to-hidden
    matrix. Same as ``sparsekit.prune(model, sparsity, method=f"graph:{method}")``.

    ``density`` (the kept fraction, ``1 - sparsity``) and ``kind`` are the deprecated
    spellings, also as the second and third positional arguments; they still work, with a
    ``DeprecationWarning``. The amount is taken by keyword only, so that a positional
    density can never be read as a sparsity.
    """
    check_module("model", model)
    if kind is not None:  # positional; kind= by keyword is renamed to method= on the way in
        if method is not None:
            raise TypeError("prior_masks() got both kind and method=; pass only method=")
        _deprecated("kind (the third positional argument)", "method=")
        method = kind
    if density is not None:
        if sparsity is not None:
            raise TypeError("prior_masks() got both density and sparsity=; pass only "
                            "sparsity= (= 1 - density)")
        check_fraction("density", density, zero=False, one=True)
        _deprecated("density", f"sparsity=1 - density (here sparsity={1.0 - density:g})")
        sparsity = 1.0 - density
    if sparsity is None or method is None:
        raise TypeError("prior_masks() needs sparsity= and method=, e.g. "
                        "prior_masks(model, sparsity=0.9, method='erdos_renyi')")
    if method not in KINDS:
        raise ValueError(f"method must be a random-graph family; unknown kind {method!r}; "
                         f"accepted: {', '.join(KINDS)}")
    check_sparsity(sparsity)
    if targets is None:
        targets = [n for n, _ in model.named_parameters() if _is_default_target(model, n)]
    return prune(model, sparsity, method=f"graph:{method}", targets=targets, seed=seed)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"prior_masks(): {old} is deprecated, use {new}", DeprecationWarning,
                  stacklevel=4)  # past this helper, prior_masks and its renamed() wrapper


def _is_default_target(model: nn.Module, name: str) -> bool:
    owner, _, pname = name.rpartition(".")
    module = model.get_submodule(owner)
    return (isinstance(module, nn.Linear) and pname == "weight") or (
        isinstance(module, nn.RNNBase) and pname.startswith("weight_hh")
    )
