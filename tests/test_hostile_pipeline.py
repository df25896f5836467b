"""Hostile inputs to the core pruning pipeline: targets → scores → allocation → pattern →
masks, model soups and the attention patterns' tiling.

Each test names the defect it pins ("Before, …"): a crash deep inside, a silently wrong
result or a huge allocation from a small argument. Bad inputs are refused with an error
naming the argument, before anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit.attention as A
from sparsekit._checks import ArgumentTypeError
from sparsekit.allocation import outlier_ratio, owl_sparsities
from sparsekit.patterns import parse_pattern
from sparsekit.prune import compute_masks, prune
from sparsekit.schedules.soup import soup
from sparsekit.targets import resolve_targets


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g))]


def _with_empty_layer() -> nn.Module:
    """A model holding a layer of no weights (zero input features) next to a real one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 8))


# -- allocation --------------------------------------------------------------------------

def test_outlier_ratio_of_no_tensors_is_zero():
    """Before, ``outlier_ratio([])`` raised IndexError; no tensor has no finite entry."""
    assert outlier_ratio([]) == 0.0


@pytest.mark.parametrize("sparsity", [0.0, 0.02, 0.5, 0.95, 0.99, 0.995])
@pytest.mark.parametrize("weights", [None, [1, 3, 1, 2]])
def test_owl_sparsities_keep_the_mean_at_the_ends(sparsity, weights):
    """Before, clipping to [0, 0.99] moved the mean: llm.prune(sparsity=0.0,
    allocation="owl") pruned 3 %, and 0.99 gave 0.968."""
    ratios = [0.01, 0.05, 0.02, 0.08]
    s = owl_sparsities(ratios, sparsity, weights=weights)
    w = weights or [1] * 4
    assert sum(x * v for x, v in zip(s, w)) / sum(w) == pytest.approx(sparsity, abs=1e-12)
    assert all(0.0 <= x <= max(0.99, sparsity) for x in s)
    if 0.08 <= sparsity <= 0.5:  # room for the whole band: unchanged
        assert max(s) - min(s) == pytest.approx(0.16)


def test_owl_sparsity_zero_prunes_nothing():
    ratios = [0.0, 0.3, 0.1]
    assert owl_sparsities(ratios, 0.0) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("allocation", ["erk", "er"])
def test_erdos_renyi_with_a_zero_width_layer(allocation):
    """Before, a layer of no weights divided by its size: ZeroDivisionError."""
    model = _with_empty_layer()
    masks = prune(model, 0.5, allocation=allocation)
    assert masks.masks["0.weight"].shape == (4, 0)
    assert int(masks.masks["1.weight"].sum()) == 16


# -- patterns ----------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["row", "block:2x2", "fanin"])
@pytest.mark.parametrize("empty", [nn.Linear(0, 4), nn.Linear(4, 0)])
def test_patterns_on_a_zero_width_layer(pattern, empty):
    """Before, "row" divided by zero, "block" could not reshape a tensor of no elements and
    "fanin" took the max of an empty row (IndexError)."""
    torch.manual_seed(0)
    model = nn.Sequential(empty, nn.Linear(4, 8))
    masks, pat = compute_masks(model, 0.5, pattern=pattern)
    assert masks["0.weight"].shape == empty.weight.shape
    assert int(masks["1.weight"].sum()) == 16
    assert pat.is_valid(masks["0.weight"])
    assert parse_pattern(pattern).mask(torch.rand(3, 0), 0).shape == (3, 0)


# -- prune / compute_masks ---------------------------------------------------------------

def test_a_model_on_the_meta_device_is_refused_by_name():
    """Before: "Tensor.item() cannot be called on meta tensors" from inside check_scores."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^model: target '0.weight' is on the meta device"):
        prune(model, 0.5)


@pytest.mark.parametrize("method", ["taylor", "snip", "taylor:accumulated", "gradient", "grasp"])
def test_gradient_criteria_with_no_gradient_are_refused(method):
    """Before, a loss that does not depend on the weights scored every weight 0, and the
    masks kept weights by position (the first half of every layer)."""
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^data: criterion '{method}' scores every weight "
                                         r"of '0.weight' zero"):
        prune(model, 0.5, method=method, data=_data(), loss_fn=lambda out, y: out.sum() * 0)
    assert unchanged(model, before)


def test_taylor_on_a_layer_the_loss_never_sees_is_refused():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 4)

        def forward(self, x):
            return self.b(self.a(x) * 0)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"scores every weight of 'a.weight' zero"):
        prune(Dead(), 0.5, method="taylor", data=_data())


def test_gradient_criteria_accept_an_already_zero_layer():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    masks = prune(model, 0.5, method="taylor", data=_data())
    assert not masks.masks["0.weight"].any()


def test_flap_on_a_layer_of_no_inputs():
    """Before: "data: the model cannot run on its inputs: cannot reshape tensor of 0
    elements" — blaming data for a layer of zero input features."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 0), nn.Linear(0, 3), nn.ReLU(), nn.Linear(3, 4))
    masks = prune(model, 0.5, method="flap", data=[torch.randn(8, 6)])
    assert masks.masks["1.weight"].shape == (3, 0)
    assert int(masks.masks["3.weight"].sum()) == 6


def test_flap_on_unbatched_conv_inputs_reads_channels():
    """Before, a Conv1d input without a batch axis (C, L) was reshaped across its
    channels, mixing them into every channel's variance."""
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    x = x * torch.tensor([[0.1], [1.0], [10.0]])
    torch.manual_seed(0)
    unbatched = prune(nn.Sequential(nn.Conv1d(3, 4, 3)), 0.5, method="flap", data=[x])
    torch.manual_seed(0)
    batched = prune(nn.Sequential(nn.Conv1d(3, 4, 3)), 0.5, method="flap", data=[x[None]])
    assert torch.equal(unbatched.masks["0.weight"], batched.masks["0.weight"])


# -- targets -----------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)


@pytest.mark.parametrize("exclude", [["fc*", "fc1"], ["fc1", "fc1"], ["out", "out.weight"]])
def test_overlapping_exclude_entries(exclude):
    """Before, an entry covered by an earlier one raised "matches none of the targeted
    parameters" (the earlier one had removed what it matches)."""
    kept = [t.name for t in resolve_targets(_Net(), exclude=exclude)]
    assert kept and not any(n.startswith(exclude[1].split(".")[0]) for n in kept)


def test_exclude_entry_matching_nothing_still_raises():
    with pytest.raises(ValueError, match="exclude entry 'fc3' matches none"):
        resolve_targets(_Net(), exclude=["fc1", "fc3"])


def test_a_model_without_default_targets_says_so():
    """Before: "no parameters left to sparsify (check targets and exclude)" though neither
    was passed (a tied lm_head is no default target)."""
    emb = nn.Embedding(4, 4)
    head = nn.Linear(4, 4, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    with pytest.raises(ValueError, match=r"^targets: the model has no default targets .* "
                                         r"targets=$"):
        prune(model, 0.5)
    assert [t.name for t in resolve_targets(model, ["head"])] == ["emb.weight"]


# -- soups -------------------------------------------------------------------------------

def test_soup_of_models_without_targets_averages_them():
    """Before: "targets: no parameters left to sparsify (check targets and exclude)", an
    error about arguments soup does not take."""
    a, b = nn.LayerNorm(4), nn.LayerNorm(4)
    with torch.no_grad():
        b.weight.fill_(3.0)
    assert torch.equal(soup([a, b]).weight, torch.full((4,), 2.0))


def test_soup_refuses_sparse_linear_layers_of_other_masks():
    """A SparseLinear's mask lives in integer index buffers, which soup takes from models[0]
    rather than averaging: two layers of disjoint masks (same count) were averaged value by
    unrelated value onto models[0]'s structure. Equal masks still average."""
    from sparsekit import SparseLinear

    torch.manual_seed(0)
    dense = nn.Linear(4, 2)
    a = nn.Sequential(SparseLinear.from_linear(dense, torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]],
                                                                    dtype=torch.bool)))
    b = nn.Sequential(SparseLinear.from_linear(dense, torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]],
                                                                    dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"models\[1\] has a different mask than models\[0\] "
                                         r"for the SparseLinear '0'"):
        soup([a, b])
    c = copy.deepcopy(a)
    with torch.no_grad():
        c[0].values.mul_(3.0)
    assert torch.equal(soup([a, c])[0].to_dense(), a[0].to_dense() * 2)


def test_soup_names_torch_prune_reparametrizations():
    """Models pruned with torch.nn.utils.prune passed the mask check (their weight is
    computed) and failed in deepcopy with a raw RuntimeError; made permanent they soup."""
    from torch.nn.utils import prune as torch_prune

    a, b = _mlp(), _mlp()
    for m in (a, b):
        torch_prune.l1_unstructured(m[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"models\[0\] holds torch.nn.utils.prune "
                                         r"reparametrizations"):
        soup([a, b])
    for m in (a, b):
        torch_prune.remove(m[0], "weight")
    assert torch.equal(soup([a, b])[0].weight, a[0].weight)


def test_soup_refuses_nan_parameters():
    """Before, a NaN in one model became a NaN in the soup without a word."""
    a = _mlp()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"^models\[1\] holds NaN or inf in '2.bias'"):
        soup([a, b])


def test_soup_keeps_infinite_buffers():
    a, b = _mlp(), _mlp()
    for m in (a, b):
        m.register_buffer("causal", torch.full((2, 2), float("-inf")))
    assert torch.isneginf(soup([a, b]).causal).all()


def test_soup_refuses_meta_models_by_name():
    """Before: NotImplementedError for aten::equal on meta tensors."""
    with torch.device("meta"):
        a = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^models\[0\] holds '0.weight' on the meta device"):
        soup([a, copy.deepcopy(a)])
    b = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"^models\[1\] holds '0.weight' on the meta device"):
        soup([b, copy.deepcopy(b).to("meta")])


# -- attention patterns ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense", "sink_window", "top_k", "vertical_slash",
                                  "antidiagonal", "exact"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (5, 9)])
def test_a_huge_block_size_is_one_tile_not_a_huge_padding(name, causal, q_len, kv_len):
    """Before, 2**31 passed the checks and then padded q, k (or the scores) to 2**31
    positions: RuntimeError asking for 100 GB (antidiagonal already at 2**20)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, q_len, 8, generator=g), torch.randn(1, 2, kv_len, 8, generator=g)
    pattern = A.resolve_pattern(name)
    for block_size in (2**20, 2**31):
        got = pattern.block_mask(q, k, block_size=block_size, causal=causal)
        want = pattern.block_mask(q, k, block_size=16, causal=causal)
        assert torch.equal(got, want)
        cov, ref = (pattern.coverage(q, k, block_size=b, causal=causal) for b in (block_size, 16))
        assert (cov.density, cov.recall) == pytest.approx((ref.density, ref.recall))


@pytest.mark.parametrize("causal", [True, False])
def test_a_huge_sink_window_is_as_wide_as_the_sequence(causal):
    """Before, window=2**63-1 overflowed int64 without causal (4 tiles of 16 kept) and
    2**64 (or sinks=2**64) raised OverflowError from inside torch."""
    q = k = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0))
    want = A.SinkWindow(sinks=0, window=128).block_mask(q, k, block_size=16, causal=causal)
    for window in (2**63 - 1, 2**64):
        got = A.SinkWindow(sinks=0, window=window).block_mask(q, k, block_size=16,
                                                             causal=causal)
        assert torch.equal(got, want)
    sinks = A.SinkWindow(sinks=2**64, window=1).block_mask(q, k, block_size=16, causal=causal)
    assert torch.equal(sinks, A.SinkWindow(sinks=64, window=1).block_mask(
        q, k, block_size=16, causal=causal))


def test_a_block_size_beyond_int64_is_one_tile():
    """Before, 2**63 overflowed the tile positions: dense attention got an empty mask."""
    q = k = torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    for name in ("dense", "sink_window", "top_k", "vertical_slash", "exact"):
        assert A.resolve_pattern(name).block_mask(q, k, block_size=2**63).all()
    assert A.Antidiagonal(stride=8).block_mask(q, k, block_size=2**63).all()


def test_a_huge_antidiagonal_stride_does_not_pad_to_it():
    """Before, stride=2**40 (block_size alike) padded q and k to 2**40 positions (64 TB)."""
    q = k = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0))
    got = A.Antidiagonal(stride=2**40).block_mask(q, k, block_size=2**40)
    assert got.shape == (1, 2, 1, 1) and got.all()


# -- more of the pipeline ----------------------------------------------------------------

@pytest.mark.parametrize("pattern", [None, 4, ("2:4",)])
def test_a_pattern_of_the_wrong_type_is_an_argument_type_error(pattern):
    """Before, a plain TypeError, which ``except ValueError`` (the convention) misses."""
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(ArgumentTypeError, match=r"^pattern must be a string"):
        prune(model, 0.5, pattern=pattern)
    assert unchanged(model, before)


@pytest.mark.parametrize("kind", ["erdos_renyi", "watts_strogatz", "barabasi_albert"])
def test_graph_priors_score_a_spectral_normed_linear(kind):
    """Before: "'0.parametrizations.weight.original' is neither" a Linear weight nor a
    recurrent one — the target of a parametrized Linear weight is its stored tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    nn.utils.parametrizations.spectral_norm(model[0])
    masks = prune(model, 0.5, method=f"graph:{kind}")
    assert int(masks.masks["0.parametrizations.weight.original"].sum()) == 12


@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_llm_owl_meets_the_target_at_the_low_end(sparsity):
    """Before, llm.prune(sparsity=0.0, allocation="owl") pruned about 4 % of the weights:
    the band's clipping at 0 raised the mean."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # outliers in the first block only: the ratios differ
        model.model.layers[0].self_attn.q_proj.weight[:, :2] *= 50
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    masks = llm.prune(model, tokens, method="wanda", sparsity=sparsity, allocation="owl")
    assert masks.sparsity() == pytest.approx(sparsity, abs=0.005)


@pytest.mark.parametrize("pattern", ["row", "fanin", "block:1x1"])
def test_a_row_pattern_on_a_scalar_parameter_is_refused_by_name(pattern):
    """Before: IndexError ("tuple index out of range") from inside the pattern."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale = nn.Linear(4, 4), nn.Parameter(torch.tensor(2.0))

    model = Scaled()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^pattern '{pattern}' keeps or prunes whole rows "
                                         r".* 'scale' is a scalar \(shape \(\)\)"):
        prune(model, 0.5, targets=["fc", "scale"], pattern=pattern)
    assert unchanged(model, before)
