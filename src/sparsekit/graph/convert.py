"""Masks as graphs: neurons are nodes, surviving weights are edges.

The weighted layers of a model are read in definition order as a chain: each layer's
outputs are the next layer's inputs. Node ``(l, i)`` is neuron ``i`` of node layer ``l``
(layer 0 holds the network inputs). ``nn.Linear`` and ``nn.Conv*`` weights connect layer
``l`` to ``l + 1`` (convolutions, transposed ones too, at channel level; a linear layer
after a flatten sees each channel as one input); a recurrent ``weight_ih`` does the same
and ``weight_hh`` connects a layer to itself. Skip connections are not represented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_materialized, check_module
from sparsekit.masks import MaskSet, first_names, one_mask

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)


@dataclass(frozen=True)
class Layer:
    """One weight tensor as a connection matrix between node layers ``source → target``."""

    name: str
    source: int
    target: int
    edges: torch.Tensor  # bool (n_target, n_source): the connection survives
    weights: torch.Tensor  # float64 (n_target, n_source): see ``to_graph``
    groups: int = 1  # a grouped convolution's: connections only within its diagonal blocks


def to_graph(model_or_masks: nn.Module | MaskSet) -> nx.DiGraph:
    """The connectivity of a model (nonzero weights) or of a ``MaskSet`` (kept entries;
    weights it does not mask count where nonzero).

    Nodes carry ``layer`` and ``index``; edges carry ``weight``: the weight for a single
    connection, the L1 norm of the weights it stands for when it merges several (a conv
    kernel, the gate blocks of a GRU/LSTM, the positions of a flattened channel).
    ``graph.graph["layers"]`` lists the weight tensors with their node layers and shapes
    (and ``groups``: a grouped or depthwise convolution connects each group of outputs to
    its group of inputs only, ``shape`` / ``groups`` possible connections), and
    ``graph.graph["widths"]`` the number of neurons per node layer.
    """
    return graph_of(model_or_masks, "model_or_masks")


def graph_of(source: nn.Module | MaskSet, param: str) -> nx.DiGraph:
    """:func:`to_graph` of ``source``, its errors naming it ``param`` (the caller's
    argument: :func:`~sparsekit.graph.structure_features` takes ``model_or_graph``)."""
    layers, widths = _chain(source, param)
    g = nx.DiGraph(
        layers=[
            {"name": ly.name, "source": ly.source, "target": ly.target,
             "shape": tuple(ly.edges.shape), "groups": ly.groups}
            for ly in layers
        ],
        widths=widths,
    )
    for layer, width in enumerate(widths):
        g.add_nodes_from(((layer, i), {"layer": layer, "index": i}) for i in range(width))
    for ly in layers:
        out, inp = ly.edges.nonzero(as_tuple=True)
        g.add_weighted_edges_from(
            ((ly.source, i), (ly.target, o), w)
            for o, i, w in zip(out.tolist(), inp.tolist(), ly.weights[out, inp].tolist())
        )
    return g


def masks_from_graph(graph: nx.DiGraph, model: nn.Module) -> dict[str, torch.Tensor]:
    """Rebuild the boolean masks of ``model``'s weights from a graph made by :func:`to_graph`.

    Exact for ``nn.Linear`` layers and plain ``nn.RNN`` matrices, where each edge is one
    weight; for GRU/LSTM matrices every gate block gets the graph. The graph is checked
    first (nodes within the widths, edges within its layers, layers of ``model``'s shapes).
    A weight the graph holds several times (tied, or a layer used twice) gets one mask,
    under its ``named_parameters()`` name; its layers must agree (``ValueError``).
    """
    check_module("model", model)
    params = dict(model.named_parameters(remove_duplicate=False))
    first = first_names(model)
    given: dict[str, torch.Tensor] = {}
    for spec, mask in layer_matrices(graph):
        name, (n_out, n_in) = spec["name"], spec["shape"]
        if name not in params:
            raise ValueError(f"graph layer {name!r} is not a parameter of the model")
        shape = params[name].shape
        if mask.shape == shape:
            given[name] = mask
        elif len(shape) == 2 and shape[1] == n_in and shape[0] % n_out == 0:  # gate blocks
            given[name] = mask.repeat(shape[0] // n_out, 1)
        else:
            raise ValueError(
                f"{name}: a graph of {n_out}x{n_in} connections cannot rebuild a weight of "
                f"shape {tuple(shape)} (conv kernels and flattened inputs are merged in the graph)"
            )
    # one mask per tensor, by its first name: a layer used twice or a tied weight is several
    # graph layers (its second name was "not a parameter of the model")
    names: dict[str, list[str]] = {}
    for name in given:
        names.setdefault(first[name], []).append(name)
    return {f: one_mask(given, ns, f"the tied weight {f!r}") for f, ns in names.items()}


def layer_matrices(graph: nx.DiGraph) -> list[tuple[dict, torch.Tensor]]:
    """Each entry of ``graph.graph["layers"]`` with its bool (n_target, n_source) edge matrix."""
    _check_graph(graph)
    by_layers: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (source, i), (target, o) in graph.edges:
        by_layers.setdefault((source, target), []).append((o, i))
    stray = sorted(by_layers.keys() - {(s["source"], s["target"]) for s in graph.graph["layers"]})
    if stray:
        (source, target), (o, i) = stray[0], by_layers[stray[0]][0]
        raise ValueError(
            f"graph edge {(source, i)} -> {(target, o)} joins node layers {source} -> {target}, "
            "which no entry of graph.graph['layers'] connects (skip connections are not "
            "represented)"
        )
    out = []
    for spec in graph.graph["layers"]:
        mask = torch.zeros(spec["shape"], dtype=torch.bool)
        edges = by_layers.get((spec["source"], spec["target"]))
        if edges:
            mask[tuple(torch.tensor(edges).T)] = True
        out.append((spec, mask))
    return out


def _check_graph(graph: Any) -> None:
    """Raise unless ``graph`` is shaped like one from :func:`to_graph`: node-layer widths,
    weights whose shapes match the node layers they join, and every node a neuron
    ``(layer, index)`` within those widths.

    Graphs are data a caller may edit or build: an index ``-1`` would otherwise wrap to the
    last neuron, and one past the width fail deep inside the mask rebuild.
    """
    if not isinstance(graph, nx.DiGraph):
        raise ArgumentTypeError(
            f"graph must be a networkx.DiGraph from sparsekit.graph.to_graph, "
            f"got {type(graph).__name__}"
        )
    if "layers" not in graph.graph or "widths" not in graph.graph:
        raise ValueError(
            "graph must come from sparsekit.graph.to_graph (it lacks 'layers' or 'widths')"
        )
    widths, specs = graph.graph["widths"], graph.graph["layers"]
    if not isinstance(widths, list) or not widths or not all(_natural(w) for w in widths):
        raise ValueError(f"graph.graph['widths'] must be a non-empty list of ints ≥ 0, "
                         f"got {widths!r}")
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"graph.graph['layers'] must be a non-empty list of weights, "
                         f"got {specs!r}")
    for spec in specs:
        if not _joins(spec, widths):
            raise ValueError(
                f"graph.graph['layers'] entry {spec!r} is not a weight as to_graph lists it: "
                "{'name': str, 'source': l, 'target': l', 'shape': (widths[l'], widths[l]), "
                "optionally 'groups': an int ≥ 1 dividing both} with node layers l, l' in "
                f"0..{len(widths) - 1} (widths {widths})"
            )
    for node in graph.nodes:
        if not (isinstance(node, tuple) and len(node) == 2 and _natural(node[0], len(widths))
                and _natural(node[1], widths[node[0]])):
            raise ValueError(
                f"graph node {node!r} is not a neuron (layer, index) with 0 ≤ layer < "
                f"{len(widths)} and 0 ≤ index < widths[layer] (widths {widths})"
            )


def _natural(value: Any, below: float = float("inf")) -> bool:
    """Whether ``value`` is an int (not a bool) in ``[0, below)``: a width, layer or index."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < below


def _joins(spec: Any, widths: list[int]) -> bool:
    """Whether ``spec`` names a weight whose shape matches the node layers it joins."""
    try:
        name, source, target, shape = spec["name"], spec["source"], spec["target"], spec["shape"]
        shape, groups = tuple(shape), spec.get("groups", 1)
    except (KeyError, TypeError, AttributeError):
        return False
    return (isinstance(name, str) and _natural(source, len(widths))
            and _natural(target, len(widths)) and shape == (widths[target], widths[source])
            and _natural(groups) and groups >= 1 and not shape[0] % groups
            and not shape[1] % groups)


def possible_connections(spec: dict) -> int:
    """The connections a ``graph.graph["layers"]`` entry can have: its shape's, over its
    ``groups`` (1 where a graph does not say)."""
    return math.prod(spec["shape"]) // spec.get("groups", 1)


def _chain(model_or_masks: nn.Module | MaskSet, param: str) -> tuple[list[Layer], list[int]]:
    """The chain of connection matrices and the node-layer widths (see the module
    docstring); errors name ``model_or_masks`` ``param``."""
    if isinstance(model_or_masks, MaskSet):
        model = model_or_masks.model
        # a tied weight's mask is that of all its names (a second name read the weight's zeros)
        params = dict(model.named_parameters(remove_duplicate=False))
        by_tensor = {id(params[n]): m.cpu() for n, m in model_or_masks.masks.items()
                     if n in params}
        kept = {n: by_tensor[id(p)] for n, p in params.items() if id(p) in by_tensor}
    elif isinstance(model_or_masks, nn.Module):
        model, kept = model_or_masks, {}
    else:
        raise ArgumentTypeError(
            f"{param} must be an nn.Module or a MaskSet, got {type(model_or_masks).__name__}"
        )
    layers: list[Layer] = []
    widths: list[int] = []
    for name, module, weight, recurrent in _weights(model):
        # a meta weight failed in the copy below with a raw NotImplementedError
        check_materialized(f"{param}: weight {name!r}", weight)
        # a complex weight counts by its magnitude (its real part alone made 1j no edge)
        w = weight.detach().cpu()
        w = (w.abs() if w.is_complex() else w).double()
        alive = kept.get(name, w != 0)
        edges, weights = _connections(module, w * alive, alive)
        n_out, n_in = edges.shape
        if not widths:
            widths.append(n_in)
        elif widths[-1] != n_in:
            edges, weights = _unflatten(name, edges, weights, widths[-1])
        if not recurrent:
            widths.append(n_out)
        layer = len(widths) - 1
        layers.append(Layer(name, layer if recurrent else layer - 1, layer, edges, weights,
                            getattr(module, "groups", 1)))
    if not layers:
        raise ValueError("no Linear, Conv or recurrent weights to build a graph from")
    return layers, widths


def _weights(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor, bool]]:
    """``(name, module, weight, is hidden-to-hidden)`` of every weight in the chain."""
    from sparsekit.engine.compiled_linear import CompiledLinear
    from sparsekit.engine.sparse_linear import SparseLinear

    out = []
    for mname, module in _uses(model):
        prefix = f"{mname}." if mname else ""
        if isinstance(module, (nn.Linear, *_CONV)):
            out.append((f"{prefix}weight", module, module.weight, False))
        elif isinstance(module, (SparseLinear, CompiledLinear)):
            # kept weights only (its dense weight, zeros where pruned): it was skipped, and
            # the layers before and after it were joined into another network
            out.append((f"{prefix}weight", module, module.to_dense(), False))
        elif isinstance(module, nn.RNNBase):
            if module.bidirectional or module.proj_size:
                raise ValueError(f"{mname}: bidirectional or projected RNNs are not supported")
            for k in range(module.num_layers):
                for kind in ("ih", "hh"):
                    pname = f"weight_{kind}_l{k}"
                    out.append((f"{prefix}{pname}", module, getattr(module, pname), kind == "hh"))
    return out


def _uses(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model``'s modules in definition order, one entry per use: a module an
    ``nn.Sequential`` holds twice (``nn.Sequential(a, lin, lin, b)``) runs twice, so it and
    its submodules are listed under both names (they were listed once: a chain one layer
    short of the model's). A second name anywhere else is taken for an alias
    (``self.head = self.layers[-1]``) and skipped."""
    first: dict[int, str] = {}
    again: list[str] = []  # the second names of modules a Sequential runs twice
    out = []
    for name, module in model.named_modules(remove_duplicate=False):
        earlier = first.setdefault(id(module), name)
        if earlier != name and not any(name.startswith(f"{a}.") for a in again):
            parent = name.rpartition(".")[0]
            if parent != earlier.rpartition(".")[0] or not isinstance(
                    model.get_submodule(parent), nn.Sequential):
                continue
            again.append(name)
        out.append((name, module))
    return out


def _connections(
    module: nn.Module, w: torch.Tensor, alive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(edges, weights)`` of one weight tensor as (n_out, n_in) matrices."""
    if not isinstance(module, (nn.RNNBase, *_CONV)):  # nn.Linear, SparseLinear, compiled
        return alive, w
    if isinstance(module, nn.RNNBase):
        hidden = module.hidden_size
        gates = w.shape[0] // hidden
        edges = alive.view(gates, hidden, -1).any(0)
        return edges, w.view(gates, hidden, -1).abs().sum(0) if gates > 1 else w
    # Convolution: channel to channel, block-diagonal over groups. A transposed one stores
    # (in, out / groups, …): its groups are blocks of rows, turned to (out, in / groups, …)
    # here (it was left out of the chain, and the layers around it joined directly)
    groups = module.groups
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        w, alive = (torch.cat([t.transpose(0, 1) for t in x.chunk(groups)]) for x in (w, alive))
    out_ch, in_per = w.shape[:2]
    edges = torch.zeros(out_ch, in_per * groups, dtype=torch.bool)
    weights = torch.zeros(out_ch, in_per * groups, dtype=torch.float64)
    out_per = out_ch // groups
    for g in range(groups):
        rows, cols = slice(g * out_per, (g + 1) * out_per), slice(g * in_per, (g + 1) * in_per)
        edges[rows, cols] = alive[rows].flatten(2).any(2)
        weights[rows, cols] = w[rows].flatten(2).abs().sum(2)
    return edges, weights


def _unflatten(
    name: str, edges: torch.Tensor, weights: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the inputs of a layer that follows a flatten into the ``width`` channels."""
    n_out, n_in = edges.shape
    if n_in % width:
        raise ValueError(
            f"{name} has {n_in} inputs but the previous layer has {width} outputs; to_graph "
            "needs the weighted layers to form a chain (a flatten of whole channels is fine)"
        )
    per = n_in // width
    return edges.view(n_out, width, per).any(2), weights.view(n_out, width, per).abs().sum(2)
