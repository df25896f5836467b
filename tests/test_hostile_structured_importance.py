"""Hostile inputs to group importance, FLAP's adaptive allocation and bias compensation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit.structured.adaptive import adaptive_counts, standardized_importance
from sparsekit.structured.compensate import fold_means
from sparsekit.structured.dependency import Group, Slice, dependency_groups
from sparsekit.structured.importance import group_importance

GROUP = Group("a", 4, (Slice("w", 0, "out"), Slice("v", 1, "in")))


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))


def test_group_importance_of_huge_finite_scores_does_not_overflow():
    """Before: finite scores near float32's max summed to inf, every channel tied at inf."""
    scores = {"w": torch.full((4, 3), 3e38), "v": torch.full((2, 4), 3e38)}
    scores["w"][2] = 1e38
    imp = group_importance(GROUP, scores)
    assert torch.isfinite(imp).all() and imp.dtype == torch.float32
    assert int(imp.argmin()) == 2


def test_group_importance_power_of_large_scores_stays_finite():
    """Before: FLAP's squared head metric of 1e20-sized scores overflowed to a tie of infs."""
    scores = {"w": torch.full((4, 3), 1e20)}
    scores["w"][1] = 2e20
    imp = group_importance(GROUP, scores, power=2)
    assert torch.isfinite(imp).all() and int(imp.argmax()) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_group_importance_rejects_non_finite_scores(bad):
    """Before: NaN/inf scores gave NaN importance that ranked channels arbitrarily."""
    scores = {"w": torch.rand(4, 3), "v": torch.rand(2, 4)}
    scores["w"][0, 0] = bad
    with pytest.raises(ValueError, match=r"scores\['w'\].*finite"):
        group_importance(GROUP, scores)


def test_group_importance_rejects_scores_of_the_wrong_shape():
    """Before: a raw RuntimeError from reshape ('shape [4, -1] is invalid')."""
    with pytest.raises(ValueError, match=r"scores\['w'\] does not fit group 'a'.*\(2, 3\)"):
        group_importance(GROUP, {"w": torch.rand(2, 3)})


def test_standardized_importance_of_huge_finite_scores_is_finite():
    """Before: z-scores of finite scores near 3e38 (or 1e20 squared) came out NaN/-inf."""
    torch.manual_seed(0)
    huge = {"w": torch.rand(4, 3) * 3e38, "v": torch.rand(2, 4) * 3e38}
    assert torch.isfinite(standardized_importance(GROUP, huge)).all()
    big = {"w": torch.rand(4, 3) * 1e20}
    z = standardized_importance(GROUP, big, power=2)
    assert torch.isfinite(z).all() and z.dtype == torch.float32


def test_standardized_importance_rejects_inf_scores():
    """Before: one inf score made the whole group's z-scores NaN/-inf (arbitrary ranking)."""
    scores = {"w": torch.rand(4, 3)}
    scores["w"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        standardized_importance(GROUP, scores)


IMP = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 4.0])}
COSTS = {"a": 10, "b": 20}


@pytest.mark.parametrize("amount", [1.0, 1.5, -0.5, float("nan")])
def test_adaptive_counts_rejects_amounts_outside_the_unit_interval(amount):
    """Before: NaN, 1.5 or -0.5 silently gave counts (NaN kept one channel in all)."""
    with pytest.raises(ValueError, match="amount must be in"):
        adaptive_counts(IMP, COSTS, amount)


def test_adaptive_counts_rejects_nan_importance():
    """Before: a NaN importance was sorted arbitrarily and decided which channels stay."""
    with pytest.raises(ValueError, match=r"importance\['a'\] holds NaN"):
        adaptive_counts({**IMP, "a": torch.tensor([float("nan"), 1.0, 2.0])}, COSTS, 0.5)


@pytest.mark.parametrize("importance, costs, match", [
    ({}, {}, "at least one group"),
    ({**IMP, "a": None}, COSTS, r"importance\['a'\] must be a 1-D float tensor"),
    (IMP, {"a": 10}, r"costs\['b'\] must be a positive finite number"),
    (IMP, {"a": 0, "b": 0}, r"costs\['a'\] must be a positive"),
])
def test_adaptive_counts_rejects_malformed_inputs(importance, costs, match):
    """Before: torch.cat's ValueError, AttributeError on None, KeyError, or zero costs
    silently keeping a single channel."""
    with pytest.raises(ValueError, match=match):
        adaptive_counts(importance, costs, 0.5)


def test_adaptive_counts_near_zero_keeps_everything():
    """Amounts near 0 keep every channel (a boundary check, passed before as well)."""
    assert adaptive_counts(IMP, COSTS, 1e-12) == {"a": 3, "b": 2}


def test_fold_means_rejects_non_finite_means_and_leaves_the_model_alone():
    """Before: an inf mean became a -inf bias in place, silently."""
    model = _mlp()
    group = dependency_groups(model)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not finite.*not changed"):
        fold_means(model, [(group, torch.tensor([0, 1]))],
                   {"2.weight": torch.tensor([float("inf"), 1.0, 2.0, 3.0])})
    assert model[2].bias is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_means_checks_every_layer_before_changing_any():
    """Before: a NaN mean of the second reader was folded in silently (a NaN bias)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 2))
    groups = dependency_groups(model)
    assert len(groups) == 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'4' is not finite"):
        fold_means(model, [(groups[0], torch.tensor([0])), (groups[1], torch.tensor([0]))],
                   {"2.weight": torch.ones(4), "4.weight": torch.full((4,), float("nan"))})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fold_means_rejects_means_and_channels_that_do_not_fit():
    """Before: a raw IndexError (short means) or RuntimeError (channel out of range)."""
    model = _mlp()
    group = dependency_groups(model)[0]
    with pytest.raises(ValueError, match=r"means\['2.weight'\] must be a tensor of shape \(4,\)"):
        fold_means(model, [(group, torch.tensor([0, 3]))], {"2.weight": torch.tensor([1.0, 2.0])})
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\), got \[7\]"):
        fold_means(model, [(group, torch.tensor([7]))], {"2.weight": torch.ones(4)})
    assert model[2].bias is None


def test_fold_means_of_large_means_adds_the_exact_shift():
    """Compensation of finite means is still added (float64 accumulation, same result)."""
    model = _mlp()
    group = dependency_groups(model)[0]
    means = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = model[2].weight.detach()[:, [1, 2]] @ means[[1, 2]]
    assert fold_means(model, [(group, torch.tensor([1, 2]))], {"2.weight": means}) == {"2"}
    torch.testing.assert_close(model[2].bias.detach(), expected)


def test_prune_structured_with_nan_weight_raises_before_changing_the_model():
    """Before: a NaN weight ranked its FFN neuron as most important and pruning went on."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.llm import prune_structured

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        prune_structured(model, amount=0.5, unit="ffn", method="magnitude")
    assert model.model.layers[0].mlp.down_proj.in_features == 64
    assert model.config.intermediate_size == 64
