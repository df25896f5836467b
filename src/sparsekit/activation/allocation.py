"""How much activation sparsity each layer gets, for one model-wide target.

Model-wide sparsity is the mean of the layer sparsities weighted by layer size
(``in * out``): the fraction of weight reads a batch-1 decode skips. ``uniform`` gives every
layer the target. ``greedy`` (TEAL's search) starts from dense and repeatedly raises, by one
grid step, the layer whose step costs the least output error per unit of model-wide sparsity
gained, until the target is reached; the last step is cut short to land on it exactly.
"""

from __future__ import annotations

import torch

__all__ = ["ALLOCATIONS", "GREEDY_STEP", "greedy", "output_error", "uniform"]

GREEDY_STEP = 0.05
ALLOCATIONS = ("uniform", "greedy")


def uniform(sizes: dict[str, int], target: float) -> dict[str, float]:
    """Every layer at ``target``."""
    return {n: target for n in sizes}


def greedy(
    errors: dict[str, list[float]], sizes: dict[str, int], target: float
) -> dict[str, float]:
    """Per-layer sparsities reaching ``target`` at the least summed output error.

    ``errors[name][k]`` is the layer's relative output error at sparsity ``k * GREEDY_STEP``.
    """
    total = sum(sizes.values())
    weight = {n: s / total for n, s in sizes.items()}
    level = dict.fromkeys(sizes, 0)
    reached = 0.0
    while target - reached > 1e-9:
        open_ = [n for n in sizes if level[n] + 1 < len(errors[n])]
        if not open_:
            raise ValueError(f"sparsity={target} is above what greedy can reach ({reached:.3f})")
        best = min(
            open_, key=lambda n: (errors[n][level[n] + 1] - errors[n][level[n]]) / weight[n]
        )
        gain = GREEDY_STEP * weight[best]
        if gain >= target - reached:  # last step: only as far as the target
            return {
                n: level[n] * GREEDY_STEP + ((target - reached) / weight[n] if n == best else 0.0)
                for n in sizes
            }
        level[best] += 1
        reached += gain
    return {n: level[n] * GREEDY_STEP for n in sizes}


def output_error(x: torch.Tensor, sparse_x: torch.Tensor, weight: torch.Tensor) -> float:
    """``||(x - sparse_x) W^T||^2 / ||x W^T||^2``: the layer's relative output error."""
    w = weight.detach().float()
    ref = torch.linalg.vector_norm(x @ w.t()).square()
    return float(torch.linalg.vector_norm((x - sparse_x) @ w.t()).square() / ref.clamp_min(1e-30))
