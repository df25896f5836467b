import networkx as nx
import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.graph import KINDS, prior_masks

N = 120  # hidden units of the recurrent test graphs


def recurrent_graph(kind: str, density: float, seed: int = 0) -> nx.Graph:
    """The undirected hidden-to-hidden graph a prior gives an RNN."""
    rnn = nn.RNN(3, N)
    masks = sparsekit.prune(rnn, 1 - density, method=f"graph:{kind}",
                            targets=["weight_hh_l0"], seed=seed)
    adjacency = masks.masks["weight_hh_l0"]
    return nx.from_numpy_array((adjacency | adjacency.T).numpy().astype(int))


@pytest.mark.parametrize("kind", list(KINDS))
def test_density_is_exact_in_every_layer(kind):
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 10))
    masks = sparsekit.prune(model, 0.75, method=f"graph:{kind}")
    assert masks.layer_sparsity() == {"0.weight": 0.75, "2.weight": 0.75}


@pytest.mark.parametrize("kind", list(KINDS))
def test_gate_blocks_share_one_graph_without_self_loops(kind):
    model = nn.Sequential()
    model.rnn = nn.LSTM(5, 16)
    model.fc = nn.Linear(16, 5)
    masks = prior_masks(model, 0.25, kind, seed=3)
    assert set(masks.masks) == {"rnn.weight_hh_l0", "fc.weight"}  # the default targets
    blocks = masks.masks["rnn.weight_hh_l0"].view(4, 16, 16)
    assert all(torch.equal(blocks[0], b) for b in blocks[1:])
    assert int(blocks[0].sum()) == 64 and not blocks[0].diagonal().any()


@pytest.mark.parametrize("density", [0.03, 0.06, 0.1])
def test_watts_strogatz_clusters_more_than_erdos_renyi(density):
    ws = nx.average_clustering(recurrent_graph("watts_strogatz", density))
    er = nx.average_clustering(recurrent_graph("erdos_renyi", density))
    assert ws > 2 * er


@pytest.mark.parametrize("density", [0.03, 0.06, 0.12])
def test_barabasi_albert_has_hubs(density):
    ba = max(d for _, d in recurrent_graph("barabasi_albert", density).degree)
    er = max(d for _, d in recurrent_graph("erdos_renyi", density).degree)
    assert ba > 2 * er


def test_any_top_k_is_of_the_family():
    """The allocation picks k: nested densities of one seed are nested graphs."""
    small = recurrent_graph("watts_strogatz", 0.05)
    large = recurrent_graph("watts_strogatz", 0.15)
    assert set(small.edges) <= set(large.edges)


@pytest.mark.parametrize("kind", list(KINDS))
def test_seeds_reproduce(kind):
    a, b, c = (recurrent_graph(kind, 0.1, seed) for seed in (1, 1, 2))
    assert set(a.edges) == set(b.edges) != set(c.edges)


def test_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="neither"):
        sparsekit.prune(model, 0.5, method="graph:erdos_renyi")
    with pytest.raises(ValueError, match="unknown kind"):
        prior_masks(nn.Linear(3, 3), 0.5, "small_world")
    with pytest.raises(ValueError, match="density"):
        prior_masks(nn.Linear(3, 3), 0.0, "erdos_renyi")


def test_sparsity_and_method_spell_the_same_masks_as_density_and_kind():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    new = prior_masks(build(), sparsity=0.75, method="watts_strogatz", seed=3).masks
    with pytest.warns(DeprecationWarning, match=r"density is deprecated.*sparsity=0.75"):
        positional = prior_masks(build(), 0.25, "watts_strogatz", seed=3).masks
    with pytest.warns(DeprecationWarning, match=r"kind= is deprecated, use method="):
        keyword = prior_masks(build(), density=0.25, kind="watts_strogatz", seed=3).masks
    assert all(torch.equal(new[k], positional[k]) and torch.equal(new[k], keyword[k])
               for k in new)


def test_prior_masks_spellings_cannot_be_mixed_or_missing():
    model = nn.Linear(6, 6)
    with pytest.raises(TypeError, match="both density and sparsity="):
        prior_masks(model, 0.25, sparsity=0.75, method="erdos_renyi")
    with pytest.raises(TypeError, match="both kind= and method="):
        prior_masks(model, sparsity=0.5, kind="erdos_renyi", method="erdos_renyi")
    with pytest.raises(TypeError, match="needs sparsity= and method="):
        prior_masks(model, sparsity=0.5)
    with pytest.raises(TypeError, match="needs sparsity= and method="):
        prior_masks(model, method="erdos_renyi")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        prior_masks(model, sparsity=1.0, method="erdos_renyi")
    with pytest.raises(ValueError, match="method must be a random-graph family"):
        prior_masks(model, sparsity=0.5, method="small_world")
