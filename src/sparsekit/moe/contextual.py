"""Contextual sparsity: predict each token's active FFN neurons (Deja Vu, PowerInfer).

Deja Vu (Liu et al. 2023) trains a low-rank predictor per layer that reads the FFN input
and names the neurons whose contributions will matter for this token; only those run.
PowerInfer (Song et al. 2023) adds a hot/cold split: the few neurons active for most
tokens are *hot* — stored apart and always computed, without prediction — and only the
cold rest is predicted. A neuron's contribution is ``|h_j| * ||W_out[:, j]||``; a token
needs the ``keep`` fraction of neurons with the largest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit._checks import check_fraction
from sparsekit.moe.build import Layout, build, check_common
from sparsekit.moe.ffn import FFN

__all__ = ["contextual"]


def contextual(
    model: nn.Module,
    calibration: Any,
    *,
    keep: float = 0.3,
    hot: float = 0.0,
    rank: int = 128,
    steps: int = 300,
    max_rows: int = 2048,
    seed: int = 0,
    router: str = "mlp",
) -> nn.Module:
    """A copy of ``model`` whose FFNs run ``keep`` of their neurons per token.

    ``hot`` (in [0, keep)) is PowerInfer's share of neurons always computed: those most often
    among a token's top ``keep`` on ``calibration``; a low-rank router (``rank``) predicts the
    rest of each token's neurons from the FFN input (``router="lowrank"``: their values
    through a low-rank factorisation of the writers instead). Other arguments as in
    :func:`~sparsekit.moe.moefy`. ``model`` is left untouched.
    """
    layers = check_common(model, calibration, keep, rank, steps, max_rows, seed, router)
    check_fraction("hot", hot)
    if hot >= keep and keep < 1:
        raise ValueError(f"hot must be below keep={keep} (the rest is predicted), got {hot!r}")

    def plan(ffn: FFN, h: torch.Tensor) -> Layout:
        n = h.shape[1]
        w_out = model.get_submodule(ffn.reader).weight.detach().float()
        contribution = h.abs() * torch.linalg.vector_norm(w_out, dim=0)
        total = max(1, round(keep * n))
        top = contribution.topk(total, dim=1).indices
        frequency = torch.zeros(n).index_add_(0, top.flatten(), torch.ones(top.numel()))
        hot_count = min(round(hot * n), total - 1) if total < n else 0
        hot_set = frequency.argsort(descending=True, stable=True)[:hot_count]
        cold = torch.ones(n, dtype=torch.bool)
        cold[hot_set] = False
        order = torch.cat([hot_set, cold.nonzero().squeeze(1)])
        return Layout(order, hot_count, 1, total - hot_count)

    return build(model, calibration, layers, plan, rank=rank, steps=steps,
                 max_rows=max_rows, seed=seed, router=router)
