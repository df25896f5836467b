"""Structure features: numbers that describe the graph of a sparse network.

Stier et al. (2021) predict how well a sparse RNN learns from such numbers alone. All
features are computed on the unweighted graph of :func:`sparsekit.graph.to_graph`; those
costing more than linear time (shortest paths, clustering, communities, the eigenvalues of
a recurrent layer) are NaN on graphs with more than ``max_edges`` edges. A ratio or
statistic over nothing is NaN too: the densities where no connection is possible and the
degree statistics of a layer side with no neurons (a zero-width layer, such as pruning all
of a layer's neurons leaves).
"""

from __future__ import annotations

import math

import networkx as nx
import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int
from sparsekit.graph.convert import graph_of, layer_matrices, possible_connections
from sparsekit.masks import MaskSet

FEATURES: dict[str, str] = {
    "nodes": "neurons (channels for convolutions), inputs and outputs included",
    "edges": "surviving connections",
    "density": "edges over possible connections, all layers together",
    "dead_neurons": "hidden neurons with no incoming or no outgoing edge (self-loops aside)",
    "dead_fraction": "dead_neurons over hidden neurons",
    "log10_paths": "log10(1 + input→output paths along feed-forward edges), by dynamic programming",
    "components": "weakly connected components, isolated neurons included",
    "avg_shortest_path": "mean shortest-path length in the largest component, undirected",
    "clustering": "average clustering coefficient of the undirected graph",
    "modularity": "modularity of the Louvain communities (seed 0) of the undirected graph",
    "spectral_radius": "largest |eigenvalue| of a binary recurrent adjacency (0 if none)",
    "<layer>.density": "kept fraction of the layer's possible connections",
    "<layer>.in_degree_{mean,std,max}": "edges into each target neuron of the layer",
    "<layer>.out_degree_{mean,std,max}": "edges out of each source neuron of the layer",
}
"""One line per feature; ``<layer>`` is the weight's parameter name."""


def structure_features(
    model_or_graph: nn.Module | MaskSet | nx.DiGraph, *, max_edges: int = 20_000
) -> dict[str, float]:
    """The :data:`FEATURES` of a model, a ``MaskSet`` or a graph from ``to_graph``."""
    check_int("max_edges", max_edges, minimum=0)
    if not isinstance(model_or_graph, (nn.Module, MaskSet, nx.DiGraph)):
        # was named "model_or_masks", to_graph's parameter
        raise ArgumentTypeError(
            f"model_or_graph must be an nn.Module, a MaskSet or a networkx.DiGraph from "
            f"sparsekit.graph.to_graph, got {type(model_or_graph).__name__}")
    g = (model_or_graph if isinstance(model_or_graph, nx.DiGraph)
         else graph_of(model_or_graph, "model_or_graph"))
    layers = layer_matrices(g)
    widths = g.graph["widths"]
    possible = sum(possible_connections(spec) for spec, _ in layers)
    hidden = [n for n, layer in g.nodes(data="layer") if 0 < layer < len(widths) - 1]
    dead = sum(1 for n in hidden if not set(g.pred[n]) - {n} or not set(g.succ[n]) - {n})
    out = {
        "nodes": float(g.number_of_nodes()),
        "edges": float(g.number_of_edges()),
        "density": g.number_of_edges() / possible if possible else math.nan,
        "dead_neurons": float(dead),
        "dead_fraction": dead / len(hidden) if hidden else 0.0,
        "log10_paths": _log10_paths(layers, widths[0]),
        "components": float(nx.number_weakly_connected_components(g)),
        **_costly(g, max_edges),
        "spectral_radius": _spectral_radius(layers, g.number_of_edges() > max_edges),
    }
    for spec, m in layers:
        out.update(_layer_features(spec["name"], m, possible_connections(spec)))
    return out


def _log10_paths(layers: list[tuple[dict, torch.Tensor]], n_inputs: int) -> float:
    """log10(1 + paths) through the feed-forward layers, in log space so nothing overflows.

    ``log p_{l+1}[o] = logsumexp_i(log A[o, i] + log p_l[i])`` counts the paths ending at
    each neuron: a product of binary connection matrices, one layer at a time.
    """
    log_paths = torch.zeros(n_inputs, dtype=torch.float64)  # one (empty) path per input
    for spec, m in layers:
        if spec["source"] != spec["target"]:
            log_a = torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf"))
            log_paths = torch.logsumexp(log_a + log_paths, dim=1)
    total = float(torch.logsumexp(log_paths, 0))
    zero = torch.tensor(0.0, dtype=torch.float64)  # float64 as the count (float32: 3.7e-7 off)
    return float(torch.logaddexp(zero, torch.tensor(total, dtype=torch.float64))) / math.log(10)


def _costly(g: nx.DiGraph, max_edges: int) -> dict[str, float]:
    if g.number_of_edges() > max_edges or not g:  # too costly, or no neuron to measure
        return dict.fromkeys(("avg_shortest_path", "clustering", "modularity"), math.nan)
    u = g.to_undirected(as_view=False)
    u.remove_edges_from(list(nx.selfloop_edges(u)))
    largest = u.subgraph(max(nx.connected_components(u), key=len))
    communities = nx.community.louvain_communities(u, weight=None, seed=0)
    return {
        "avg_shortest_path": nx.average_shortest_path_length(largest) if len(largest) > 1 else 0.0,
        "clustering": nx.average_clustering(u),
        "modularity": (
            nx.community.modularity(u, communities, weight=None) if u.number_of_edges() else 0.0
        ),
    }


def _spectral_radius(layers: list[tuple[dict, torch.Tensor]], too_costly: bool) -> float:
    """The largest |eigenvalue| over the recurrent layers' adjacencies (0 without one); NaN
    when ``too_costly`` (over ``max_edges``): ``eigvals`` of an n-neuron layer takes O(n³)
    time, and it ran on every graph, whatever ``max_edges`` promised."""
    recurrent = [m for spec, m in layers if spec["source"] == spec["target"]]
    if recurrent and too_costly:
        return math.nan
    return max((float(torch.linalg.eigvals(m.double()).abs().max()) for m in recurrent),
               default=0.0)


def _layer_features(name: str, m: torch.Tensor, possible: int) -> dict[str, float]:
    """The ``<layer>.*`` features of the layer ``name``'s ``(targets, sources)`` connection
    matrix ``m`` of ``possible`` connections; NaN for statistics over no connections or no
    neurons."""
    out = {f"{name}.density": int(m.sum()) / possible if possible else math.nan}
    for kind, degree in (("in", m.sum(1)), ("out", m.sum(0))):
        d = degree.double()
        stats = (d.mean(), d.std(correction=0), d.max()) if d.numel() else (math.nan,) * 3
        for stat, value in zip(("mean", "std", "max"), stats, strict=True):
            out[f"{name}.{kind}_degree_{stat}"] = float(value)
    return out
