"""Top-k selection: the one way every stage picks "the k highest scores".

Patterns keep the best weights of a layer, allocations rank weights across layers, the
dynamic-sparsity rules drop and grow, LLM methods keep the best of each row — all through
:func:`top_k`, so they agree on ties: equal scores are taken in order of position, exactly
as a stable descending sort would take them.
"""

from __future__ import annotations

import operator

import torch


def top_k(
    scores: torch.Tensor,
    k: int,
    *,
    allowed: torch.Tensor | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """Boolean mask of the ``k`` highest ``scores``, ties broken towards the lower index.

    ``dim=None`` ranks all entries together; with ``dim`` every slice along that dimension
    keeps its own ``k`` (``dim=1`` on a 2-D score: ``k`` per row). Only entries where
    ``allowed`` is true are chosen, at most as many as there are. NaN ranks as ``+inf``.

    A selection, not a sort: every score above the k-th largest, then the first ones equal
    to it, so n scores cost O(n) however large k is.
    """
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    if allowed is not None and allowed.shape != scores.shape:
        raise ValueError(
            f"allowed must have the shape of scores {tuple(scores.shape)}, "
            f"got {tuple(allowed.shape)}"
        )
    if dim is None:
        values, ok = scores.reshape(1, -1), None if allowed is None else allowed.reshape(1, -1)
    else:
        values = scores.movedim(dim, -1)
        ok = None if allowed is None else allowed.movedim(dim, -1)
    if not torch.is_floating_point(values):
        values = values.double()
    values = values.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    if ok is not None:
        values = values.masked_fill(~ok, float("-inf"))
    size = values.shape[-1]
    if min(k, size) == 0 or values.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = values.topk(min(k, size), dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above, equal = values > kth, values == kth
    if ok is not None:
        above, equal = above & ok, equal & ok
        budget = ok.sum(-1, keepdim=True).clamp(max=k)
    else:
        budget = min(k, size)
    need = budget - above.sum(-1, keepdim=True)
    if bool((equal.sum(-1, keepdim=True) > need).any()):  # more ties than room: first ones
        equal &= equal.cumsum(-1) <= need
    kept = above | equal
    return kept.reshape(scores.shape) if dim is None else kept.movedim(-1, dim)
