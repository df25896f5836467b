"""How much activation sparsity each layer gets, for one model-wide target.

Model-wide sparsity is the mean of the layer sparsities weighted by layer size
(``in * out``): the fraction of weight reads a batch-1 decode skips. ``uniform`` gives every
layer the target. ``greedy`` is TEAL's block-wise search (Liu et al. 2024, section 4.2):
within each transformer block, start from dense and repeatedly raise by one step the group of
layers (layers reading the same input, e.g. q/k/v, share one level) whose step raises the
block's output error least, until the block reaches the target; the last step is cut short
to land on it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sparsekit.registry import Registry

__all__ = ["ALLOCATIONS", "GREEDY_STEP", "greedy", "uniform"]

GREEDY_STEP = 0.05
ALLOCATIONS: Registry = Registry("allocation", meta={"blockwise": False}, ordered=True)
"""``uniform(sizes, target)``; ``blockwise`` entries take ``(groups, sizes, target, error)``
per transformer block and need the block outputs replayed."""

BlockError = Callable[[dict[str, float]], float]


@ALLOCATIONS.register("uniform")
def uniform(sizes: dict[str, int], target: float) -> dict[str, float]:
    """Every layer at ``target``."""
    return {n: target for n in sizes}


@ALLOCATIONS.register("greedy", blockwise=True)
def greedy(
    groups: Sequence[Sequence[str]], sizes: dict[str, int], target: float, error: BlockError
) -> dict[str, float]:
    """Per-layer sparsities of one block reaching ``target`` (size-weighted), chosen greedily.

    ``groups`` partitions the block's layers into sets that share a sparsity level;
    ``error(sparsities)`` is the block's output error with those layer sparsities.
    """
    total = sum(sizes.values())
    weight = [sum(sizes[n] for n in g) / max(total, 1) for g in groups]
    # a group without weights (an nn.Linear with no outputs) skips no reads and cannot move
    # the block towards the target (its step divided by zero): it gets the target, as in
    # uniform, and the search runs over the others
    level = [0.0 if w else target for w in weight]

    def spread(levels: list[float]) -> dict[str, float]:
        return {n: s for g, s in zip(groups, levels) for n in g}

    reached = 0.0 if total else target  # a block of no weights is at any sparsity already
    while target - reached > 1e-9:
        steps = {}
        for i, s in enumerate(level):
            if weight[i] and s + GREEDY_STEP < 1:
                step = min(GREEDY_STEP, (target - reached) / weight[i])  # land on the target
                trial = level.copy()
                trial[i] = s + step
                steps[i] = (error(spread(trial)), step)
        if not steps:
            raise ValueError(f"sparsity={target} is above what greedy can reach ({reached:.3f})")
        best = min(steps, key=lambda i: steps[i][0])
        # rounded off float sums: ten steps of 0.05 were a level of 0.49999999999999994,
        # whose quantile took the input below the target's (a threshold one row short)
        level[best] = round(level[best] + steps[best][1], _DIGITS)
        reached += steps[best][1] * weight[best]
    return spread(level)


_DIGITS = 12
"""Decimal digits a greedy level keeps: far below any quantile's resolution, far above
the error of summing steps of :data:`GREEDY_STEP`."""
