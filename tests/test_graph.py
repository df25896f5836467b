import math

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.graph import masks_from_graph, remove_dead_neurons, structure_features, to_graph
from sparsekit.models import LeNet300100


def set_weights(layer: nn.Linear, weight: list[list[float]]) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))


@pytest.fixture
def tiny() -> nn.Sequential:
    """2 inputs → 3 hidden → 2 outputs; hidden neuron 2 has no inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    set_weights(model[0], [[1, 0], [1, -1], [0, 0]])
    set_weights(model[2], [[1, 1, 0], [0, 1, 1]])
    return model


def test_graph_of_tiny_mlp(tiny):
    g = to_graph(tiny)
    assert g.graph["widths"] == [2, 3, 2]
    assert g.nodes[(1, 2)] == {"layer": 1, "index": 2}
    assert sorted(g.edges) == [
        ((0, 0), (1, 0)), ((0, 0), (1, 1)), ((0, 1), (1, 1)),
        ((1, 0), (2, 0)), ((1, 1), (2, 0)), ((1, 1), (2, 1)), ((1, 2), (2, 1)),
    ]
    assert g.edges[(0, 1), (1, 1)]["weight"] == -1.0


def test_features_of_tiny_mlp(tiny):
    f = structure_features(tiny)
    assert f["nodes"] == 7 and f["edges"] == 7
    assert f["density"] == pytest.approx(7 / 12)
    assert f["dead_neurons"] == 1 and f["dead_fraction"] == pytest.approx(1 / 3)
    # in0→h0→o0, in0→h1→o0, in0→h1→o1, in1→h1→o0, in1→h1→o1
    assert f["log10_paths"] == pytest.approx(math.log10(6))
    assert f["components"] == 1 and f["spectral_radius"] == 0
    assert f["0.weight.in_degree_mean"] == 1 and f["0.weight.in_degree_max"] == 2
    assert f["0.weight.in_degree_std"] == pytest.approx(math.sqrt(2 / 3))
    assert f["0.weight.out_degree_mean"] == 1.5 and f["0.weight.out_degree_max"] == 2
    assert f["2.weight.density"] == pytest.approx(4 / 6)
    assert f["2.weight.out_degree_max"] == 2 and f["2.weight.in_degree_std"] == 0
    assert f["clustering"] == 0  # bipartite layers have no triangles
    assert f["avg_shortest_path"] > 1 and -0.5 <= f["modularity"] <= 1


def test_path_count_in_log_space():
    model = nn.Sequential(*(nn.Linear(20, 20) for _ in range(40)))
    assert structure_features(model, max_edges=0)["log10_paths"] == pytest.approx(
        41 * math.log10(20)
    )  # 20^41 paths: beyond int64 and float32
    with torch.no_grad():
        model[20].weight.zero_()
    f = structure_features(model, max_edges=0)
    assert f["log10_paths"] == 0 and math.isnan(f["clustering"])


def test_mask_round_trip():
    model = LeNet300100()
    masks = sparsekit.prune(model, 0.9, method="random")
    back = masks_from_graph(to_graph(masks), model)
    assert back.keys() == masks.masks.keys()
    assert all(torch.equal(back[n], masks.masks[n]) for n in back)
    assert to_graph(model).number_of_edges() == sum(int(m.sum()) for m in back.values())


def test_masks_repeat_over_gate_blocks():
    model = nn.Sequential()
    model.rnn = nn.GRU(3, 4)
    model.fc = nn.Linear(4, 2)
    with torch.no_grad():
        model.rnn.weight_hh_l0.view(3, 4, 4)[:, 0, 1] = 0  # unit 1 → unit 0 in every gate
        model.rnn.weight_hh_l0.view(3, 4, 4)[1, 2, 3] = 0  # only one gate: edge survives
    g = to_graph(model)
    assert g.graph["widths"] == [3, 4, 2]
    assert not g.has_edge((1, 1), (1, 0)) and g.has_edge((1, 3), (1, 2))
    assert g.has_edge((1, 2), (1, 2))  # recurrent edges stay within their layer
    assert structure_features(g)["spectral_radius"] > 0
    hh = masks_from_graph(g, model)["rnn.weight_hh_l0"].view(3, 4, 4)
    assert not hh[:, 0, 1].any() and hh[:, 2, 3].all()


def test_conv_edges_are_channels_and_flatten_merges():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        model[0].weight[1].zero_()  # channel 1 has no input
        model[0].weight[0, 0, :2].zero_()  # part of a kernel: the edge survives
        model[3].weight[:, 16:].zero_()  # nothing reads channel 1
        model[3].weight[2, 5] = 0  # one position of channel 0: the edge survives
    g = to_graph(model)
    assert g.graph["widths"] == [1, 2, 3]
    assert sorted(g.edges)[:1] == [((0, 0), (1, 0))] and not g.has_edge((0, 0), (1, 1))
    assert all(g.has_edge((1, 0), (2, o)) for o in range(3))
    assert not any(g.has_edge((1, 1), (2, o)) for o in range(3))
    with pytest.raises(ValueError, match="cannot rebuild"):
        masks_from_graph(g, model)


def test_chain_and_type_errors():
    with pytest.raises(TypeError, match="model_or_masks"):
        to_graph("model")
    with pytest.raises(ValueError, match="chain"):
        to_graph(nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2)))


def test_remove_dead_neurons_folds_constants_and_shrinks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0] = 0  # hidden1[0]: no inputs, emits relu(bias) downstream
        model[0].bias[0] = 0.7
        model[2].weight[:, 1] = 0  # hidden1[1]: no outputs
        model[2].weight[2] = 0  # hidden2[2] reads only hidden1[0], so it goes constant too
        model[2].weight[2, 0] = 1.5
        model[4].weight[:, 3] = 0  # hidden2[3]: no outputs
    x = torch.randn(16, 6)
    small = remove_dead_neurons(model)
    assert [m.weight.shape for m in small if isinstance(m, nn.Linear)] == [
        (3, 6), (2, 3), (3, 2)
    ]
    assert torch.allclose(small(x), model(x), atol=1e-6)
    assert isinstance(model[0], nn.Linear) and model[0].out_features == 5  # original untouched


def test_remove_dead_neurons_lenet():
    torch.manual_seed(0)
    model = LeNet300100()
    sparsekit.prune(model, 0.985, method="random")
    small = remove_dead_neurons(model)
    assert small.fc1.out_features < 300 and small.fc2.out_features < 100
    assert small.fc1.in_features == 784 and small.fc3.out_features == 10
    assert structure_features(small, max_edges=0)["dead_neurons"] == 0
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_remove_dead_neurons_rejects_other_models():
    with pytest.raises(TypeError, match="nn.Sequential"):
        remove_dead_neurons(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="parameter-free"):
        remove_dead_neurons(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2)))


def test_a_sparse_linear_layer_is_part_of_the_chain():
    """A SparseLinear between two Linears was skipped, and the layers around it were joined
    into another network (widths [6, 5, 3]): it counts by its kept weights, like the masked
    nn.Linear it stands for."""
    from sparsekit import SparseLinear

    torch.manual_seed(0)
    mask = torch.rand(5, 5) > 0.5
    middle = nn.Linear(5, 5)
    sparse = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), SparseLinear.from_linear(middle, mask),
                           nn.ReLU(), nn.Linear(5, 3))
    masked = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    masked.load_state_dict({**sparse.state_dict(), "2.weight": middle.weight.detach() * mask,
                            "2.bias": middle.bias.detach()}, strict=False)
    assert structure_features(sparse) == structure_features(masked)
    graph = to_graph(sparse)
    assert graph.number_of_edges() == to_graph(masked).number_of_edges()
