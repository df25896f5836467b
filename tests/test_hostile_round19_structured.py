"""Hostile inputs to structured removal (round 19): the channels a group loses, raw cuts,
scoring options, FLAP's adaptive counts and compensation, and groups passed to shrink."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sparsekit.structured import dependency_groups, shrink, transformer_groups
from sparsekit.structured.adaptive import adaptive_counts, channel_cost, standardized_importance
from sparsekit.structured.compensate import fold_means, reader_means, with_biases
from sparsekit.structured.importance import group_importance
from sparsekit.structured.shrink import cut, remove_channels


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


@pytest.mark.parametrize("gone, error, match", [
    (torch.tensor([True, False, False, False, False, True]), TypeError, "not a bool mask"),
    (torch.tensor([1.0]), TypeError, "float32"),
    ([1, 2], TypeError, "got a list"),
    (torch.tensor([[1, 2]]), TypeError, "2-D"),
    (torch.tensor([7]), ValueError, r"in \[0, 6\).*got \[7\]"),
    (torch.tensor([-1]), ValueError, r"in \[0, 6\).*got \[-1\]"),
    (torch.tensor([2, 2]), ValueError, "distinct"),
])
def test_remove_channels_refuses_channels_that_are_not_indices_of_the_group(gone, error, match):
    """Before: a bool mask cut channels 0 and 1, an index outside the group was skipped
    silently, a float was truncated, a list was a raw AttributeError."""
    model = _mlp()
    group = dependency_groups(model)[0]
    before = _state(model)
    with pytest.raises(error, match=match):
        remove_channels(model, [(group, gone)])
    assert _same(model, before)


def test_remove_channels_checks_every_group_before_cutting_any():
    """A bad second entry leaves the first group's channels in place."""
    model = _mlp()
    group = dependency_groups(model)[0]
    before = _state(model)
    with pytest.raises(ValueError, match="removed of group 1"):
        remove_channels(model, [(group, torch.tensor([0])), (group, torch.tensor([9]))])
    assert _same(model, before) and model[0].out_features == 6


@pytest.mark.parametrize("call", ["remove_channels", "fold_means", "reader_means"])
@pytest.mark.parametrize("removed, match", [
    ("dict", r"removed must be a sequence of \(Group, channels\) pairs, got dict"),
    ("group", r"removed must be a sequence of \(Group, channels\) pairs, got Group"),
    ("pair of names", r"removed\[0\] must be a \(Group, channels\) pair, got tuple"),
])
def test_removed_that_is_no_sequence_of_group_channel_pairs_is_named(call, removed, match):
    """Before: a raw unpacking TypeError (a dict's keys, a Group's fields)."""
    model = _mlp()
    group = dependency_groups(model)[0]
    removed = {"dict": {group: torch.tensor([0])}, "group": group,
               "pair of names": [("0", torch.tensor([0]))]}[removed]
    before = _state(model)
    with pytest.raises(TypeError, match=match):
        if call == "remove_channels":
            remove_channels(model, removed)
        elif call == "fold_means":
            fold_means(model, removed, {})
        else:
            reader_means(model, removed, torch.randn(2, 4))
    assert _same(model, before)


def test_remove_channels_refuses_to_remove_every_channel_of_a_group():
    """Before: the layers were left 0 wide there (shrink keeps one channel itself)."""
    model = _mlp()
    group = dependency_groups(model)[0]
    before = _state(model)
    with pytest.raises(ValueError, match=r"removed\[0\] removes every channel of group .* "
                                         r"\(6\); accepted: at most 5"):
        remove_channels(model, [(group, torch.arange(6))])
    assert _same(model, before)


@pytest.mark.parametrize("gone, error", [
    (torch.tensor([True, False, False, False, False, True]), TypeError),
    (torch.tensor([0, 0]), ValueError),
])
def test_fold_means_refuses_masks_and_repeated_channels(gone, error):
    """Before: a bool mask folded channel 0 four times and channel 1 twice; a repeated
    index folded its channel twice — biases changed silently."""
    model = _mlp()
    group = dependency_groups(model)[0]
    before = _state(model)
    with pytest.raises(error, match="channels removed of group 0"):
        fold_means(model, [(group, gone)], {"2.weight": torch.ones(6)})
    assert _same(model, before)


def test_fold_means_refuses_a_meta_mean():
    """Before: a raw NotImplementedError ("Cannot copy out of meta tensor")."""
    model = _mlp()
    group = dependency_groups(model)[0]
    with pytest.raises(ValueError, match=r"means\['2.weight'\] is on the meta device"):
        fold_means(model, [(group, torch.tensor([1]))],
                   {"2.weight": torch.ones(6, device="meta")})


def test_reader_means_refuses_a_list_of_channels():
    """Before: a raw AttributeError ('list' object has no attribute 'numel')."""
    model = _mlp()
    group = dependency_groups(model)[0]
    with pytest.raises(TypeError, match="1-D integer tensor"):
        reader_means(model, [(group, [0])], [torch.randn(2, 4)])


def test_with_biases_refuses_one_name_in_place_of_a_collection():
    """Before: a name was read as its characters, and matched no layer silently."""
    group = dependency_groups(_mlp())[0]
    with pytest.raises(TypeError, match="collection of layer names"):
        with_biases(group, "2")


@pytest.mark.parametrize("cuts, match", [
    ({("9.weight", 0): {1}}, "'9.weight', which is not a parameter or buffer"),
    ({("0.weight", 5): {1}}, r"must be in \[-2, 2\).*got 5"),
    ({("0.weight", True): {1}}, "must be an int"),
    ({("0.weight", 0): {99}}, r"indices in \[0, 6\), got \[99\]"),
    ({("0.weight", 0): {-1}}, r"indices in \[0, 6\), got \[-1\]"),
    ({("0.bias", 0): {1}, ("0.weight", 0): {1.5}}, r"got \[1.5\]"),
])
def test_cut_refuses_entries_that_do_not_fit_before_cutting_anything(cuts, match):
    """Before: an index outside the tensor (or a negative one) was skipped silently, a bad
    dim a raw IndexError, an unknown name a raw AttributeError."""
    model = _mlp()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        cut(model, cuts)
    assert _same(model, before)


def test_cut_takes_a_negative_dim_as_its_positive_twin():
    """dim -1 of a (3, 6) weight is dim 1: both name the same columns, cut once."""
    model = _mlp()
    cut(model, {("2.weight", -1): {0}, ("2.weight", 1): {0, 1}})
    assert model[2].weight.shape == (3, 4) and model[2].in_features == 4


@pytest.mark.parametrize("fn", [group_importance, standardized_importance])
def test_importance_of_meta_scores_names_them(fn):
    """Before: a raw NotImplementedError ("Cannot copy out of meta tensor; no data!")."""
    group = dependency_groups(_mlp())[0]
    with pytest.raises(ValueError, match=r"scores\['0.weight'\] is on the meta device"):
        fn(group, {"0.weight": torch.ones(6, 4, device="meta")})


@pytest.mark.parametrize("fn", [group_importance, standardized_importance])
@pytest.mark.parametrize("kwargs, error, match", [
    ({"power": float("nan")}, ValueError, "power must be a positive finite float, got nan"),
    ({"power": -1}, ValueError, "power must be a positive finite float, got -1"),
    ({"power": "2"}, TypeError, "power must be a positive finite float"),
    ({"readers_only": "no"}, TypeError, "readers_only must be a bool"),
])
def test_importance_refuses_bad_options(fn, kwargs, error, match):
    """Before: power NaN gave NaN importance, -1 of zero scores a tie of infs, "2" a raw
    TypeError; readers_only="no" read only the readers."""
    group = dependency_groups(_mlp())[0]
    with pytest.raises(error, match=match):
        fn(group, {"0.weight": torch.zeros(6, 4)}, **kwargs)


@pytest.mark.parametrize("fn", [group_importance, standardized_importance])
def test_importance_refuses_scores_that_are_not_a_mapping(fn):
    """Before: a list of score tensors scored nothing, and the group was silently skipped."""
    group = dependency_groups(_mlp())[0]
    with pytest.raises(TypeError, match="scores must be a mapping"):
        fn(group, [torch.rand(6, 4)])


def test_importance_refuses_complex_scores():
    """Before: the imaginary part was dropped with a warning only."""
    group = dependency_groups(_mlp())[0]
    with pytest.raises(ValueError, match="must be a real tensor, got dtype torch.complex64"):
        group_importance(group, {"0.weight": torch.rand(6, 4, dtype=torch.complex64)})


@pytest.mark.parametrize("fn", [group_importance, standardized_importance])
def test_importance_of_sparse_scores_is_that_of_dense_ones(fn):
    """Before: a raw NotImplementedError from the sparse backend ('aten::as_strided')."""
    group = dependency_groups(_mlp())[0]
    dense = torch.rand(6, 4)
    assert torch.equal(fn(group, {"0.weight": dense.to_sparse()}),
                       fn(group, {"0.weight": dense}))


def test_adaptive_counts_refuses_a_group_without_channels():
    """Before: a raw IndexError from argmin of an empty tensor."""
    with pytest.raises(ValueError, match=r"at least one.*got shape \(0,\)"):
        adaptive_counts({"a": torch.empty(0)}, {"a": 1.0}, 0.5)


def test_adaptive_counts_refuses_meta_importance():
    with pytest.raises(ValueError, match=r"importance\['a'\] is on the meta device"):
        adaptive_counts({"a": torch.ones(3, device="meta")}, {"a": 1.0}, 0.5)


def test_adaptive_counts_of_huge_costs_is_that_of_their_ratios():
    """Before: costs near float64's max summed to inf, and every group kept one channel."""
    importance = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([2.5, 1.5, 0.5])}
    small = adaptive_counts(importance, {"a": 1.0, "b": 1.0}, 0.5)
    assert adaptive_counts(importance, {"a": 1e308, "b": 1e308}, 0.5) == small == {"a": 2, "b": 1}


@pytest.mark.parametrize("other", [lambda g: g, lambda g: dataclasses.replace(g, name="x")])
def test_shrink_refuses_groups_that_share_channels(other):
    """Before: a group passed twice had its compensation folded twice into the bias, and
    two groups over the same entries silently shrank."""
    model = _mlp()
    group = dependency_groups(model)[0]
    masks = {"2.weight": torch.ones(3, 6, dtype=torch.bool)}
    masks["2.weight"][:, 0] = False
    before = _state(model)
    with pytest.raises(ValueError, match=r"groups\[0\] and groups\[1\].*same entries of "
                                         r"'0.weight'"):
        shrink(model, masks, groups=[group, other(group)], compensate=[torch.randn(8, 4)])
    assert _same(model, before)
    assert shrink(model, masks, groups=[group])[0].out_features == 5


def test_shrink_with_compensation_of_a_meta_model_names_its_weight():
    """Before: a raw RuntimeError ("Tensor.item() cannot be called on meta tensors")."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = {"2.weight": torch.ones(3, 6, dtype=torch.bool)}
    masks["2.weight"][:, 0] = False
    with pytest.raises(ValueError, match="model's weights: 0.weight is on the meta device"):
        shrink(model, masks, compensate=[torch.randn(2, 4)])


def test_channel_cost_of_a_group_of_another_model_is_named():
    """Before: a raw AttributeError ("Sequential has no attribute `2`")."""
    group = dependency_groups(_mlp())[0]
    with pytest.raises(ValueError, match=r"group\[0\].*does not fit model"):
        channel_cost(nn.Sequential(nn.Linear(2, 2)), group)
    assert channel_cost(_mlp(), group) == 4 + 1 + 3


def test_a_numpy_head_size_groups_heads_like_an_int():
    """Before: head_dim=np.int64(8) was refused as "no whole heads to group"."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    expected = transformer_groups(model, "heads")
    model.model.layers[0].self_attn.head_dim = np.int64(8)
    groups = transformer_groups(model, "heads")
    assert groups == expected and type(groups[0].slices[1].repeat) is int


def test_fold_means_refuses_means_that_are_not_a_mapping():
    """Before: a list of means named no reader, and nothing was folded, silently."""
    model = _mlp()
    group = dependency_groups(model)[0]
    before = _state(model)
    with pytest.raises(TypeError, match="means must be a mapping"):
        fold_means(model, [(group, torch.tensor([1]))], [torch.ones(6)])
    assert _same(model, before)
