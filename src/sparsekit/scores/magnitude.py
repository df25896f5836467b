"""Data-free criteria: weight magnitude and random scores."""

from __future__ import annotations

import torch

from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext


@CRITERIA.register("magnitude")
def magnitude(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|w| — keep the largest weights (Han et al. 2015); also |γ| of ``ctx.scales``, so
    that a channel's group magnitude counts its BatchNorm scale as Torch-Pruning's does."""
    return {t.name: t.param.detach().abs().float() for t in (*ctx.targets, *ctx.scales)}


@CRITERIA.register("random")
def random(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Uniform random scores drawn from ``ctx.generator`` (the baseline every paper needs)."""
    return {
        t.name: torch.rand(t.param.shape, generator=ctx.generator).to(t.param.device)
        for t in ctx.targets
    }
