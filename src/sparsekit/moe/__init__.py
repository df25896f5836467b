"""Sparse representations of FFNs: MoEfication and contextual sparsity.

:func:`moefy` splits every FFN of a Hugging Face model into experts by co-activation
clustering (:func:`balanced_kmeans`) and routes each token to a few of them, chosen by a
trained :class:`Router` or computed by a :class:`LowRankRouter`;
:func:`contextual` predicts each token's active neurons (Deja Vu), optionally with
PowerInfer's always-computed hot neurons. Both return a copy whose FFNs are
:class:`RoutedFFN` modules: a batch-1 decode step computes only the chosen neurons' rows
and reads only their reader columns through the engine's activation-sparse GEMV.
:func:`evaluate` measures how well the routers choose, and :func:`set_oracle` lets them
choose by the true activation mass (:func:`unit_mass`) instead, the bound they are measured
against; :func:`head_predictors` trains and measures Deja Vu's per-token predictors of
attention heads, and :func:`route_heads` executes them: a copy whose
:class:`RoutedAttention` decode steps compute only the predicted heads. :func:`relufy`
prepares a GELU or SiLU model for all of them: a copy with ReLU FFNs, distilled from the
original, whose left-out neurons are mostly exactly zero; :func:`distil` recovers what the
routing loses, fine-tuning a routed copy with its routing in place.
"""

from sparsekit.moe.cluster import balanced_kmeans
from sparsekit.moe.contextual import contextual
from sparsekit.moe.distillation import distil
from sparsekit.moe.evaluate import evaluate
from sparsekit.moe.heads import head_predictors
from sparsekit.moe.lowrank import LowRankRouter
from sparsekit.moe.moefication import moefy
from sparsekit.moe.relufication import relufy
from sparsekit.moe.routed import RoutedFFN, set_keep, set_oracle, unit_mass
from sparsekit.moe.routed_attention import RoutedAttention, route_heads
from sparsekit.moe.router import Router

__all__ = ["LowRankRouter", "RoutedAttention", "RoutedFFN", "Router", "balanced_kmeans",
           "contextual", "distil", "evaluate", "head_predictors", "moefy", "relufy", "route_heads",
           "set_keep", "set_oracle", "unit_mass"]
