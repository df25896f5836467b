"""Layer-wise pruning methods: ``fn(W, stats, sparsity, pattern) -> (W_new, kept_mask)``.

``W`` is the layer's weight in ``(out, in)`` layout; ``stats`` the statistics of its
inputs over the calibration data (:class:`sparsekit.observe.InputStats`; ``None`` for
data-free methods). The Wanda score is the one of :mod:`sparsekit.scores.wanda`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsekit.llm.sparsegpt import sparsegpt_prune
from sparsekit.observe import InputStats
from sparsekit.patterns import NM, Pattern
from sparsekit.registry import Registry
from sparsekit.scores.wanda import wanda_scores
from sparsekit.select import top_k

LayerPrune = Callable[[torch.Tensor, "InputStats | None", float, Pattern],
                      tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A layer-wise pruning rule and the input statistics it needs."""

    prune: LayerPrune
    stats: bool = True  # needs the inputs' per-feature norms
    gram: bool = False  # needs the full Gram matrix (Hessian)


METHODS: Registry = Registry("method")


def keep_mask(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, *, per_row: bool
) -> torch.Tensor:
    """Keep the highest ``scores``: exactly N of M for N:M patterns, else ``1 − sparsity`` of
    each row (``per_row``) or of the whole layer."""
    if isinstance(pattern, NM):
        return pattern.mask(scores, scores.numel())
    if not per_row:
        return pattern.mask(scores, round(scores.numel() * (1.0 - sparsity)))
    return top_k(scores, round(scores.shape[1] * (1.0 - sparsity)), dim=1)


def magnitude(W: torch.Tensor, _stats: InputStats | None, sparsity: float, pattern: Pattern):
    """Keep the largest |W| of the layer."""
    mask = keep_mask(W.abs(), sparsity, pattern, per_row=False)
    return W * mask, mask


def wanda(W: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern):
    """Keep the highest |W_ij| · ‖X_j‖₂ of each output row (Wanda's comparison group)."""
    mask = keep_mask(wanda_scores(W, stats), sparsity, pattern, per_row=True)
    return W * mask, mask


def sparsegpt(W: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern):
    """SparseGPT's OBS reconstruction with H = 2XXᵀ."""
    return sparsegpt_prune(W, stats.hessian(), sparsity, pattern)


METHODS.register("magnitude")(Method(magnitude, stats=False))
METHODS.register("wanda")(Method(wanda))
METHODS.register("sparsegpt")(Method(sparsegpt, gram=True))
