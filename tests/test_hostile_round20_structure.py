"""Hostile inputs to graph structure and structured removal (round 20): arguments of the
wrong type, hooks and modes of the layers remove_dead_neurons cuts, computed weights,
complex weights in to_graph, and what structure_features names.

Every bad value is refused with an error naming it, before anything changes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from sparsekit import MaskSet
from sparsekit._checks import ArgumentTypeError
from sparsekit.graph import masks_from_graph, remove_dead_neurons, structure_features, to_graph
from sparsekit.models import LeNet300100
from sparsekit.structured import Group, Slice, dependency_groups, shrink
from sparsekit.structured.adaptive import channel_cost, standardized_importance
from sparsekit.structured.dependency import check_groups, trace
from sparsekit.structured.importance import group_importance
from sparsekit.structured.shrink import cut, removable_channels, remove_channels


def _mlp() -> nn.Sequential:
    """4 → 6 → 3 with neuron 1 input-less and neuron 3 output-less: both are dropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[2].weight[:, 3] = 0
    return model


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


@pytest.mark.parametrize("fn", [trace, dependency_groups])
@pytest.mark.parametrize("model", [lambda x: x, torch.zeros(3), None, nn.Linear],
                         ids=["function", "tensor", "None", "class"])
def test_tracing_names_a_model_that_is_no_module(fn, model):
    """Before: a plain TypeError, which ``except ValueError`` (every other bad argument of
    sparsekit) did not catch."""
    with pytest.raises(ArgumentTypeError, match=r"model must be an nn.Module, got"):
        fn(model)


def test_groups_and_masks_of_the_wrong_type_are_argument_type_errors():
    """Before: plain TypeErrors (not ``ValueError``) for groups and masks of the wrong type."""
    model = _mlp()
    with pytest.raises(ArgumentTypeError, match=r"groups must be a sequence of Group"):
        check_groups(3, model)
    with pytest.raises(ArgumentTypeError, match=r"groups\[0\] must be a Group, got NoneType"):
        shrink(model, groups=[None])
    with pytest.raises(ArgumentTypeError, match=r"masks must be a MaskSet.*got list"):
        shrink(model, [torch.ones(6, 4, dtype=torch.bool)])


@pytest.mark.parametrize("fn", [to_graph, remove_dead_neurons])
@pytest.mark.parametrize("model", [None, 3, "model.pt"])
def test_graph_functions_name_a_model_that_is_no_module(fn, model):
    with pytest.raises(ArgumentTypeError, match=r"model(_or_masks)? must be an nn.Module"):
        fn(model)


def test_remove_dead_neurons_names_a_module_it_does_not_support():
    """Before: "remove_dead_neurons supports ..." as a plain TypeError, naming no argument."""
    with pytest.raises(ArgumentTypeError, match=r"model must be an nn.Sequential MLP or a "
                                                r"LeNet300100.*got Linear"):
        remove_dead_neurons(nn.Linear(3, 3))


def test_structure_features_names_its_own_argument():
    """Before: "model_or_masks must be ..." — to_graph's parameter, not the one passed."""
    with pytest.raises(ArgumentTypeError, match=r"model_or_graph must be an nn.Module, a "
                                                r"MaskSet or a networkx.DiGraph.*NoneType"):
        structure_features(None)


def test_remove_dead_neurons_keeps_forward_hooks_and_pre_hooks():
    """Before: the cut layers were new ``nn.Linear`` s: the hooks on them were dropped."""
    model = _mlp()
    calls = []
    model[0].register_forward_hook(lambda m, args, out: calls.append(("fwd", out.shape[-1])))
    model[2].register_forward_pre_hook(lambda m, args: calls.append(("pre", args[0].shape[-1])))
    model[2].register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(("pre_kw", len(kwargs))), with_kwargs=True)
    small = remove_dead_neurons(model)
    assert small[0].out_features == 4 and small[2].in_features == 4
    x = torch.randn(2, 4)
    calls.clear()
    torch.testing.assert_close(small(x), model(x))
    assert calls[:3] == [("fwd", 4), ("pre", 4), ("pre_kw", 0)]  # the small model's, first
    assert calls[3:] == [("fwd", 6), ("pre", 6), ("pre_kw", 0)]  # then the original's


def test_remove_dead_neurons_of_a_model_in_eval_mode_stays_in_eval_mode():
    """Before: the cut layers came back in train mode inside a model in eval mode."""
    model = _mlp().eval()
    small = remove_dead_neurons(model)
    assert [m.training for m in small.modules()] == [False] * 4
    model = _mlp().train()
    assert all(m.training for m in remove_dead_neurons(model).modules())


def test_remove_dead_neurons_keeps_attributes_of_the_layers():
    model = _mlp()
    model[2].note = "head"
    small = remove_dead_neurons(model)
    assert small[2].note == "head" and small[2].weight.shape == (3, 4)


@pytest.mark.parametrize("compute", [
    lambda layer: parametrize.register_parametrization(layer, "weight", _Double()),
    lambda layer: nn.utils.weight_norm(layer),
    lambda layer: nn.utils.spectral_norm(layer),
    lambda layer: prune.l1_unstructured(layer, "weight", 0.3),
], ids=["parametrize", "weight_norm", "spectral_norm", "torch prune"])
def test_remove_dead_neurons_refuses_a_computed_weight(compute):
    """Before: a parametrization was silently baked into a plain weight, and weight_norm
    and torch.nn.utils.prune failed in ``copy.deepcopy`` with a raw RuntimeError."""
    model = _mlp()
    with warnings.catch_warnings():  # weight_norm is deprecated, but still in use
        warnings.simplefilter("ignore")
        compute(model[0])
    with pytest.raises(ValueError, match=r"model.0 computes its weight.*remove_parametrizations"):
        remove_dead_neurons(model)


def test_remove_dead_neurons_folds_no_inf_from_a_live_neuron():
    """Before: a live neuron's +inf bias times 0 made the folded bias NaN: every output NaN
    where the model computes inf."""
    model = _mlp()
    with torch.no_grad():
        model[0].bias[0] = float("inf")
        model[2].weight[:, 0] = 1.0
    x = torch.randn(2, 4)
    small = remove_dead_neurons(model)
    assert small[0].out_features == 4
    out = small(x)
    assert bool(torch.isposinf(out).all()) and torch.equal(out, model(x))


def test_to_graph_counts_a_complex_weight_by_its_magnitude():
    """Before: the imaginary part was dropped (with a warning): 1j counted as no edge."""
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.zero_()
    layer = layer.to(torch.complex64)
    with torch.no_grad():
        layer.weight[0, 1] = 3j
    g = to_graph(layer)
    assert list(g.edges(data="weight")) == [((0, 1), (1, 0), 3.0)]


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("cuts, match", [
    ([(("0.weight", 0), {1})], r"cuts must be a mapping of \(tensor name, dim\).*got list"),
    ({"0.weight": {1}}, r"cuts keys must be \(tensor name, dim\) pairs, got '0.weight'"),
    ({("0.weight", 0): 1}, r"cuts\[\('0.weight', 0\)\] must be a collection of indices, got int"),
    ({("0.weight", 0): "1"}, r"must be a collection of indices, got str"),
])
def test_cut_names_cuts_of_the_wrong_type(cuts, match):
    """Before: a raw AttributeError ('list' has no 'items'), an unpacking ValueError, a raw
    TypeError ('int' is not iterable)."""
    model = _chain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArgumentTypeError, match=match):
        cut(model, cuts)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_cut_reads_a_generator_of_indices_once():
    """Before: the range check consumed a generator, and nothing was cut, silently."""
    model = _chain()
    cut(model, {("0.weight", 0): (i for i in (1, 2))})
    assert model[0].weight.shape == (4, 4) and model[0].out_features == 4


@pytest.mark.parametrize("call", [
    lambda g: cut(None, {}),
    lambda g: remove_channels(None, [(g, torch.tensor([1]))]),
    lambda g: removable_channels(None, g, None),
], ids=["cut", "remove_channels", "removable_channels"])
def test_structured_functions_name_a_model_that_is_no_module(call):
    """Before: a raw AttributeError ('NoneType' has no 'named_parameters')."""
    group = dependency_groups(_chain())[0]
    with pytest.raises(ArgumentTypeError, match=r"model must be an nn.Module, got NoneType"):
        call(group)


@pytest.mark.parametrize("group, masks, error, match", [
    (None, None, ArgumentTypeError, r"group\[0\] must be a Group, got NoneType"),
    ("g", [1], ArgumentTypeError, r"masks must be a MaskSet.*got list"),
    ("g", {"2.weight": torch.ones(2, 2, dtype=torch.bool)}, ValueError,
     r"masks\['2.weight'\] has shape \(2, 2\), expected \(3, 6\)"),
    ("g", {"2.weight": torch.full((3, 6), float("nan"))}, ValueError,
     r"masks\['2.weight'\] must be a bool tensor"),
])
def test_removable_channels_checks_its_group_and_masks(group, masks, error, match):
    """Before: raw AttributeErrors (None has no 'channels', a list has no 'get'), a raw
    RuntimeError from reshape, and a NaN float mask read as "keep": nothing removable."""
    model = _chain()
    group = dependency_groups(model)[0] if group == "g" else group
    with pytest.raises(error, match=match):
        removable_channels(model, group, masks)


def test_removable_channels_refuses_a_group_of_another_model():
    """Before: a group of another model was read against this one's weights silently."""
    group = dependency_groups(_chain())[0]
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"does not fit model.*'2.weight'"):
        removable_channels(other, group, None)


def test_removable_channels_of_a_mask_set_dict_and_zeros_agree():
    model = _chain()
    with torch.no_grad():
        model[2].weight[:, 4] = 0
    group = dependency_groups(model)[0]
    keep = {"2.weight": model[2].weight != 0}
    assert removable_channels(model, group, keep).tolist() == [4]
    assert removable_channels(model, group, None).tolist() == [4]


def test_a_batchnorm_of_another_axis_keeps_the_channels_it_does_not_normalise():
    """BatchNorm1d(5) after a Linear of 6 outputs normalises the length axis of (N, 5, 4)
    inputs. Before: its entries were taken for the Linear's channels, and shrink cut the
    norm to a model that no longer ran ("running_mean should contain 5 elements not 4")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(6, 3)).eval()
    assert dependency_groups(model) == []
    keep = {"3.weight": torch.ones(3, 6, dtype=torch.bool)}
    keep["3.weight"][:, 1] = False
    small = shrink(model, keep)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        model[3].weight[:, 1] = 0
    torch.testing.assert_close(small(x), model(x))


def test_a_batchnorm_of_the_channels_still_shrinks_with_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    keep = {"3.weight": torch.ones(3, 6, dtype=torch.bool)}
    keep["3.weight"][:, 1] = False
    small = shrink(model, keep)
    assert small[1].num_features == 5 and small[1].running_mean.shape == (5,)


@pytest.mark.parametrize("slices, roles", [
    ((Slice("0.weight", 0, "out"), Slice("0.bias", 0, "out")), r"\['out'\]"),
    ((Slice("2.weight", 1, "in"),), r"\['in'\]"),
    ((), r"\[\]"),
], ids=["writers only", "readers only", "no slices"])
def test_shrink_and_remove_channels_refuse_a_group_without_writers_or_readers(slices, roles):
    """Before: a hand-built group without readers had every channel removable, and the
    writer alone was cut (without writers, the readers alone): a model that no longer ran
    ("mat1 and mat2 shapes cannot be multiplied")."""
    model = _chain()
    group = Group("0", 6, slices)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"groups\[0\] \(opened by '0'\) has slices of roles "
                                         rf"{roles}; accepted: groups with both"):
        shrink(model, groups=[group])
    with pytest.raises(ValueError, match=rf"removed\[0\]'s group .* roles {roles}"):
        remove_channels(model, [(group, torch.tensor([1, 2]))])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _twice() -> nn.Sequential:
    """2 → 3 → 3 → 3 → 2 with the middle layer used twice."""
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    return nn.Sequential(nn.Linear(2, 3), shared, shared, nn.Linear(3, 2))


def test_to_graph_of_a_layer_used_twice_has_it_twice():
    """Before: the layer was listed once: a 2-3-3-2 graph of a 2-3-3-3-2 network (36 input
    to output paths counted, not 108)."""
    g = to_graph(_twice())
    assert g.graph["widths"] == [2, 3, 3, 3, 2]
    assert [ly["name"] for ly in g.graph["layers"]] == ["0.weight", "1.weight", "2.weight",
                                                        "3.weight"]
    assert round(10 ** structure_features(g)["log10_paths"] - 1) == 108


def test_to_graph_of_a_block_used_twice_has_its_layers_twice():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model = nn.Sequential(nn.Linear(2, 3), block, block, nn.Linear(3, 2))
    assert to_graph(model).graph["widths"] == [2, 3, 3, 3, 2]


class _Alias(nn.Module):
    """A second name for a layer that runs once: ``head`` is ``layers[2]``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4))
        self.head = self.layers[2]
        self.again = nn.Sequential(self.layers)  # held twice, by different containers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_to_graph_lists_an_aliased_layer_once():
    g = to_graph(_Alias())
    assert g.graph["widths"] == [2, 3, 4]
    assert [ly["name"] for ly in g.graph["layers"]] == ["layers.0.weight", "layers.2.weight"]


def test_a_mask_set_of_a_layer_used_twice_masks_both_uses():
    """Before: the second name of the weight had no mask and counted the weight's zeros."""
    model = _twice()
    keep = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
            if n.endswith("weight")}
    keep["1.weight"][0] = False
    g = to_graph(MaskSet(model, keep))
    assert g.in_degree((2, 0)) == 0 and g.in_degree((3, 0)) == 0


@pytest.mark.parametrize("tie", [False, True], ids=["layer used twice", "tied weights"])
def test_masks_from_graph_gives_a_weight_held_twice_one_mask(tie):
    """Before: the second name of a tied weight was "not a parameter of the model"."""
    model = _twice()
    if tie:
        model[2] = nn.Linear(3, 3)
        model[2].weight = model[1].weight
    g = to_graph(model)
    g.remove_edge((1, 0), (2, 1))
    g.remove_edge((2, 0), (3, 1))
    masks = masks_from_graph(g, model)
    assert sorted(masks) == ["0.weight", "1.weight", "3.weight"]
    assert masks["1.weight"].sum() == 8 and not masks["1.weight"][1, 0]
    g.remove_edge((2, 1), (3, 1))  # one use of the weight loses a connection the other keeps
    with pytest.raises(ValueError, match=r"masks\['1.weight'\] and masks\['2.weight'\] name "
                                         r"the same weight"):
        masks_from_graph(g, model)


def test_to_graph_keeps_a_transposed_convolution_in_the_chain():
    """Before: a ConvTranspose2d was left out, and the layers around it were joined
    directly: a 3-4-2 graph of a 3-4-6-2 network (or a width error)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 6, 3, groups=2),
                          nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[3, 1] = 2.0  # input channel 3 (group 1) → output channel 3 + 1;
        # the edge weighs the kernel's L1 norm, 3 · 3 · 2
    g = to_graph(model)
    assert g.graph["widths"] == [3, 4, 6, 2]
    assert [(u, v, w) for u, v, w in g.edges(data="weight") if u[0] == 1] == [
        ((1, 3), (2, 4), 18.0)]


class _SigmoidLeNet(LeNet300100):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x)))))


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[2](torch.relu(self[0](x)) + x)


@pytest.mark.parametrize("make", [_SigmoidLeNet, lambda: _Residual(
    nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))], ids=["LeNet300100", "Sequential"])
def test_remove_dead_neurons_refuses_a_subclass_with_its_own_forward(make):
    """Before: a LeNet300100 with sigmoids had ReLU's constants folded into its biases (the
    outputs moved by 0.04, silently); a Sequential subclass was read as a plain chain."""
    torch.manual_seed(0)
    model = make()
    first = model.fc1 if isinstance(model, LeNet300100) else model[0]
    with torch.no_grad():
        first.weight[:2] = 0
    with pytest.raises(ValueError, match=r"model \(_\w+\) overrides \w+.forward"):
        remove_dead_neurons(model)


@pytest.mark.parametrize("fn", [group_importance, standardized_importance])
@pytest.mark.parametrize("group, error, match", [
    (None, ArgumentTypeError, r"group must be a Group, got NoneType"),
    ("0", ArgumentTypeError, r"group must be a Group, got str"),
    (Group("0", 6, (Slice("0.weight", 0, "out", -2),)), ValueError,
     r"group.slices\[0\].offset must be an int ≥ 0, got -2"),
], ids=["None", "a name", "negative offset"])
def test_importance_checks_the_group(fn, group, error, match):
    """Before: a raw AttributeError ('NoneType' has no 'channels'), or a raw RuntimeError
    from reshape for a negative offset."""
    scores = {n: p.detach().abs() for n, p in _chain().named_parameters()}
    with pytest.raises(error, match=match):
        fn(group, scores)


@pytest.mark.parametrize("fn", [group_importance, standardized_importance])
def test_importance_refuses_a_bool_mask_for_scores(fn):
    """Before: a keep-mask in place of scores ranked channels by their kept counts."""
    model = _chain()
    group = dependency_groups(model)[0]
    with pytest.raises(ValueError, match=r"scores\['0.weight'\] must be a real tensor, got "
                                         r"dtype torch.bool; accepted: float or int scores"):
        fn(group, {n: p != 0 for n, p in model.named_parameters()})


def test_channel_cost_names_a_model_that_is_no_module():
    """Before: a raw AttributeError ('NoneType' has no 'named_parameters')."""
    group = dependency_groups(_chain())[0]
    with pytest.raises(ArgumentTypeError, match=r"model must be an nn.Module, got NoneType"):
        channel_cost(None, group)


class _Lookup(nn.Module):
    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6, max_norm=max_norm)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens))


def test_an_embedding_with_max_norm_keeps_its_width():
    """Before: shrink cut channels whose reader columns were masked, but max_norm rescales
    each row by its norm over all of them: the outputs moved by 0.3, silently."""
    torch.manual_seed(0)
    model = _Lookup(max_norm=1.0)
    with torch.no_grad():
        model.emb.weight.mul_(5)
    assert dependency_groups(model) == []
    keep = {"head.weight": torch.ones(3, 6, dtype=torch.bool)}
    keep["head.weight"][:, :3] = False
    small = shrink(model, keep)
    tokens = torch.randint(0, 10, (2, 4))
    with torch.no_grad():
        model.head.weight.mul_(keep["head.weight"])
    torch.testing.assert_close(small(tokens), model(tokens))
    assert [g.channels for g in dependency_groups(_Lookup(max_norm=None))] == [6]


def test_named_tensors_lists_parameters_and_buffers_under_every_name():
    from sparsekit.structured.dependency import named_tensors

    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(2, 3), shared, shared)
    tensors = named_tensors(model)
    assert tensors["1.weight"] is tensors["2.weight"] is shared.weight
    assert tensors["2.running_mean"] is shared.running_mean
    assert set(tensors) == {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
        n for n, _ in model.named_buffers(remove_duplicate=False)}
