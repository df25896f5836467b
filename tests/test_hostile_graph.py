"""Hostile inputs to sparsekit.graph: modules that mix neurons in remove_dead_neurons,
hand-edited or foreign graphs in masks_from_graph and structure_features, bad max_edges.

Every bad value is refused with an error naming it, before anything changes.
"""

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit._checks import ArgumentTypeError
from sparsekit.graph import masks_from_graph, remove_dead_neurons, structure_features, to_graph


def _mlp(*between: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), *between, nn.Linear(6, 3))


@pytest.mark.parametrize("module", [
    nn.Softmax(-1), nn.LogSoftmax(-1), nn.Softmin(-1), nn.LayerNorm(6),
    nn.BatchNorm1d(6, affine=False), nn.PReLU(6), nn.Sequential(nn.ReLU()),
    type("MyReLU", (nn.ReLU,), {"forward": lambda self, x: x.softmax(-1)})(),
], ids=lambda m: type(m).__name__)
def test_remove_dead_neurons_refuses_modules_that_mix_neurons(module):
    model = _mlp(module)
    with torch.no_grad():
        model[0].weight[2].zero_()  # a dead neuron, so something would be dropped
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"model\[1\] \({type(module).__name__}\).*elementwise"):
        remove_dead_neurons(model)
    assert unchanged(model, before)


def test_remove_dead_neurons_keeps_elementwise_chains():
    model = _mlp(nn.GELU(), nn.Dropout(0.5), nn.Tanh())
    with torch.no_grad():
        model[0].weight[2].zero_()
    model.eval()
    x = torch.randn(5, 4)
    small = remove_dead_neurons(model)
    assert small[0].out_features == 5
    assert torch.allclose(small(x), model(x), atol=1e-6)


def _pruned() -> nn.Sequential:
    model = _mlp(nn.ReLU())
    sparsekit.prune(model, 0.5)
    return model


def _edited(edit) -> tuple[nn.Sequential, object]:
    model = _pruned()
    g = to_graph(model)
    edit(g)
    return model, g


@pytest.mark.parametrize("edit, match", [
    (lambda g: g.add_edge((0, -1), (1, 0)), r"node \(0, -1\)"),  # would wrap to input 3
    (lambda g: g.add_edge((0, 99), (1, 0)), r"node \(0, 99\)"),
    (lambda g: g.add_edge((5, 0), (6, 0)), r"node \(5, 0\)"),
    (lambda g: g.add_edge((0, "1"), (1, 0)), r"node \(0, '1'\)"),
    (lambda g: g.add_edge("a", "b"), r"node 'a'"),
    (lambda g: g.add_edge((0, 1), (2, 0)), r"edge \(0, 1\) -> \(2, 0\)"),  # a skip connection
    (lambda g: g.graph.update(layers=[]), r"graph\.graph\['layers'\]"),
    (lambda g: g.graph.update(widths=[4, -6, 3]), r"graph\.graph\['widths'\]"),
    (lambda g: g.graph.pop("widths"), "to_graph"),
    (lambda g: g.graph["layers"][0].update(source=-3), r"graph\.graph\['layers'\] entry"),
    (lambda g: g.graph["layers"][0].update(shape=(7, 4)), r"graph\.graph\['layers'\] entry"),
    (lambda g: g.graph["layers"].append("2.weight"), r"graph\.graph\['layers'\] entry"),
])
def test_masks_from_graph_refuses_edited_graphs(edit, match):
    model, g = _edited(edit)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        masks_from_graph(g, model)
    with pytest.raises(ValueError, match=match):
        structure_features(g)  # layers=[] divided by zero here
    assert unchanged(model, before)


def test_masks_from_graph_refuses_wrong_types():
    model = _pruned()
    with pytest.raises(ArgumentTypeError, match="graph must be a networkx.DiGraph.*dict"):
        masks_from_graph({}, model)
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module.*dict"):
        masks_from_graph(to_graph(model), {})


@pytest.mark.parametrize("max_edges, error", [
    (-1, ValueError), (True, ArgumentTypeError), (1.5, ArgumentTypeError),
    (None, ArgumentTypeError),
])
def test_structure_features_refuses_bad_max_edges(max_edges, error):
    with pytest.raises(error, match=rf"max_edges must be an int ≥ 0, got {max_edges!r}"):
        structure_features(_pruned(), max_edges=max_edges)
