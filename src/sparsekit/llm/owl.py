"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023).

Blocks whose Wanda scores hold more outliers (scores above ``m`` times their mean) matter
more and get a lower sparsity; the per-block sparsities span ``target ± lam`` and keep
the mean at the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of the scores (all layers of one block together) above ``m`` × their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-block sparsity: ``sparsity − lam · (2·r̂ − 1)`` with r̂ the min-max normalised
    outlier ratio, shifted so that the mean is ``sparsity``, clipped to [0, 0.99]."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = float(r.max() - r.min())
    if span == 0:
        return [float(sparsity)] * len(ratios)
    shift = (r - r.min()) / span * (2 * lam)
    shift -= shift.mean()
    return [min(max(sparsity - float(s), 0.0), 0.99) for s in shift]
