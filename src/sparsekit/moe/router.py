"""Router: a small low-rank MLP that scores, from an FFN's input, the units a token needs.

MoEfication's expert router and Deja Vu's neuron predictor are the same thing at two
granularities: ``x -> W2 relu(W1 x)`` with a hidden width (``rank``) far below the FFN's,
trained with binary cross-entropy on what each calibration token needed: MoEfication's
experts scored by their activation mass (soft targets in [0, 1]) or Deja Vu's 0/1 labels of
the neurons whose output contributions were largest. Its cost is
``rank * (d + units)`` multiply-adds per token, a few percent of the FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import check_int

__all__ = ["Router", "fit"]


class Router(nn.Module):
    """Scores ``(..., units)`` of the units of an FFN for its inputs ``(..., features)``."""

    def __init__(self, features: int, units: int, rank: int) -> None:
        super().__init__()
        for name, value in (("features", features), ("units", units), ("rank", rank)):
            check_int(name, value, minimum=1)
        self.project = nn.Linear(features, rank)
        self.score = nn.Linear(rank, units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(F.relu(self.project(x.to(self.project.weight.dtype))))


def fit(router: Router, x: torch.Tensor, labels: torch.Tensor, *, steps: int = 300,
        lr: float = 3e-3, batch: int = 256, balance: bool = True, seed: int = 0) -> Router:
    """Train ``router`` to predict ``labels`` (T, units; in [0, 1], 1 where a unit is
    needed most) from FFN inputs ``x`` (T, features): Adam on minibatches of ``batch`` rows
    drawn with ``seed``, binary cross-entropy; with ``balance``, weighted so that the
    positives count as much as the rest (for sparse 0/1 labels)."""
    check_int("steps", steps, minimum=1)
    check_int("batch", batch, minimum=1)
    x, labels = x.float(), labels.float()
    positive = float(labels.mean().clamp(1e-6, 1 - 1e-6))
    weight = torch.tensor((1 - positive) / positive if balance else 1.0)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    router.train()
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(x.shape[0], (min(batch, x.shape[0]),), generator=generator)
            loss = F.binary_cross_entropy_with_logits(router(x[rows]), labels[rows],
                                                      pos_weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return router.eval().requires_grad_(False)
