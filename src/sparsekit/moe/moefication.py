"""MoEfication (Zhang et al. 2022): split each dense FFN into experts and route tokens.

A transformer's FFN neurons fire sparsely and in groups. Each FFN's neurons are clustered by
co-activation — balanced k-means over their activation patterns: over the calibration
tokens, whether the neuron's contribution ``|h_j| * ||W_out[:, j]||`` is among the token's
top ``keep`` fraction (scaled to unit norm, so neurons active on the same tokens meet) —
into ``experts`` equal experts; a per-layer :class:`~sparsekit.moe.router.Router`
learns from the FFN input to rank the experts by their activation mass for the token (the
paper's MLP selection, trained with a listwise loss on :func:`~sparsekit.moe.routed.unit_mass`),
and the ``k`` experts it scores highest run; ``router="lowrank"`` computes the mass through a
low-rank factorisation of the writers instead
(:class:`~sparsekit.moe.lowrank.LowRankRouter`, Deja Vu's predictor at expert granularity:
more MACs, better choices). :func:`~sparsekit.moe.set_oracle` chooses by the true
mass instead (the paper's ground-truth selection): the bound the router is measured
against. The paper keeps 10-30 % of the FFN at over 95 % of the dense model's performance
with ReLU models, where most neurons are exactly zero; GELU and SiLU neurons are rarely
zero, so the neurons left out always cost something. On the benchmark LLaMA (SiLU-gated, 16
experts) these binary patterns beat clustering the magnitudes ``|h_j|`` themselves: 1.043
against 1.069 times the dense perplexity at 30 % kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit._checks import check_int
from sparsekit.moe.build import Layout, build, check_common
from sparsekit.moe.cluster import balanced_kmeans
from sparsekit.moe.ffn import FFN

__all__ = ["moefy"]


def moefy(
    model: nn.Module,
    calibration: Any,
    *,
    experts: int = 16,
    keep: float = 0.25,
    rank: int = 128,
    steps: int = 300,
    max_rows: int = 2048,
    seed: int = 0,
    router: str = "mlp",
) -> nn.Module:
    """A copy of ``model`` whose FFNs run ``keep`` of their ``experts`` per token.

    ``calibration`` is a tensor of model inputs (token ids for Hugging Face models) or a
    list of them; at most ``max_rows`` FFN input rows per layer, sampled with ``seed``, are
    clustered and fit the routers: with ``router="mlp"`` a trained
    :class:`~sparsekit.moe.Router` (``rank`` hidden units, ``steps`` Adam steps), with
    ``"lowrank"`` a :class:`~sparsekit.moe.LowRankRouter` (writers of rank ``rank``,
    below the inputs' width refined on the mass in ``steps`` Adam steps). Each FFN
    of a LLaMA- or BERT-style model becomes a :class:`~sparsekit.moe.RoutedFFN` running
    ``k = round(keep * experts)`` experts (at least one; change it with
    :func:`~sparsekit.moe.set_keep`). ``experts`` must divide every FFN's width. ``model``
    is left untouched; with ``keep=1`` the copy computes what ``model`` does.
    """
    layers = check_common(model, calibration, keep, rank, steps, max_rows, seed, router)
    check_int("experts", experts, minimum=1)
    widths = {f.name: model.get_submodule(f.reader).in_features for f in layers}
    bad = {n: w for n, w in widths.items() if w % experts}
    if bad:
        raise ValueError(f"experts must divide every FFN's width, got experts={experts} for "
                         f"widths {sorted(set(bad.values()))} (e.g. {next(iter(bad))!r})")
    k = max(1, round(keep * experts))

    def plan(ffn: FFN, h: torch.Tensor) -> Layout:
        w_out = model.get_submodule(ffn.reader).weight.detach().float()
        contribution = h.abs() * torch.linalg.vector_norm(w_out, dim=0)
        cut = contribution.topk(max(1, round(keep * h.shape[1])), dim=1).values[:, -1:]
        # (neurons, tokens): 1 where active; a zero is not, even where a token has fewer
        # nonzero neurons than keep (a ReLU FFN's): at a cut of 0 every neuron had been
        # active on such a token, and the clustering saw identical patterns
        patterns = ((contribution >= cut) & (contribution > 0)).float().t()
        patterns = patterns / torch.linalg.vector_norm(patterns, dim=1, keepdim=True).clamp_min(
            1e-12)
        labels = balanced_kmeans(patterns, experts, seed=seed)
        order = labels.argsort(stable=True)
        return Layout(order, 0, h.shape[1] // experts, k, soft=True)

    return build(model, calibration, layers, plan, rank=rank, steps=steps,
                 max_rows=max_rows, seed=seed, router=router)
