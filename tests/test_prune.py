import copy
import math

import pytest
import torch
from torch import nn

from sparsekit import MaskSet, parse_pattern, prune
from sparsekit.scores import CRITERIA, ScoreContext
from sparsekit.targets import resolve_targets

ALLOCATIONS = ["uniform", "global", "erk", "er", "lamp", "owl"]
SHAPED = ["unstructured", "block:4x4", "row"]
NM_SPARSITY = {  # pattern -> (below 1 - N/M, exactly 1 - N/M, above)
    "2:4": (0.3, 0.5, 0.6),
    "4:8": (0.3, 0.5, 0.6),
    "1:4": (0.55, 0.75, 0.85),
}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def convnet() -> nn.Sequential:
    """Conv2d(8, 16, 3): 2-D view 16 x 72, so 2:4, 4:8, 1:4 and block:4x4 all fit."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16))


MODELS = {"mlp": mlp, "convnet": convnet}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {t.name: t.param.detach() for t in resolve_targets(model)}


def unit(pattern: str, w: torch.Tensor) -> int:
    """Elements in one unit of structure: one element, one block or one row."""
    if pattern == "row":
        return w[0].numel()
    if pattern.startswith("block:"):
        r, c = pattern[len("block:"):].split("x")
        return int(r) * int(c)
    return 1


def nm_group_counts(w: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros in every m consecutive weights along the flattened input dim (out, in·kh·kw)."""
    w2d = w.reshape(w.shape[0], -1)
    assert w2d.shape[1] % m == 0
    return (w2d.reshape(w.shape[0], -1, m) != 0).sum(-1)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def assert_bit_identical(before: dict, after: dict) -> None:
    assert list(before) == list(after)
    for k in before:
        a, b = before[k], after[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(
            a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
        ), k


# -- exact sparsity: unstructured, blocks, rows -------------------------------------------


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("pattern", SHAPED)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_exact_sparsity(model_name, allocation, pattern, sparsity):
    model = MODELS[model_name]()
    masks = prune(model, sparsity, allocation=allocation, pattern=pattern)
    w = weights(model)
    total = sum(t.numel() for t in w.values())
    kept = sum(int((t != 0).sum()) for t in w.values())
    assert kept == sum(int(m.sum()) for m in masks.masks.values())
    slack = sum(unit(pattern, t) for t in w.values())  # one unit per layer
    assert abs(kept - round(total * (1 - sparsity))) <= slack
    assert abs(masks.sparsity() - sparsity) <= slack / total
    pat = parse_pattern(pattern)
    for name, t in w.items():
        assert pat.is_valid(t != 0), name
    if allocation == "uniform":
        for name, t in w.items():
            assert abs(int((t != 0).sum()) - t.numel() * (1 - sparsity)) <= unit(pattern, t), name


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_unstructured_is_exact_to_one_element_per_layer(model_name, allocation):
    model = MODELS[model_name]()
    prune(model, 0.73, allocation=allocation)
    w = weights(model)
    total = sum(t.numel() for t in w.values())
    kept = sum(int((t != 0).sum()) for t in w.values())
    assert abs(kept - round(total * 0.27)) <= len(w)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_zero_sparsity_prunes_nothing(allocation):
    model = mlp()
    masks = prune(model, 0.0, allocation=allocation)
    assert all(m.all() for m in masks.masks.values())
    assert masks.sparsity() == 0.0
    masks = prune(model, 0, allocation=allocation, pattern="row")  # an int is accepted
    assert masks.sparsity() == 0.0


# -- N:M ----------------------------------------------------------------------------------


def _nm_params(regime: int) -> list:
    return [
        (model_name, allocation, pattern, NM_SPARSITY[pattern][regime])
        for model_name in MODELS
        for allocation in ALLOCATIONS
        for pattern in NM_SPARSITY
    ]


def check_nm_groups(model, pattern):
    n, m = (int(v) for v in pattern.split(":"))
    for name, t in weights(model).items():
        assert (nm_group_counts(t, m) <= n).all(), name
    return n, m


@pytest.mark.parametrize("model_name, allocation, pattern, sparsity", _nm_params(1))
def test_nm_at_pattern_density_is_exactly_n_over_m(model_name, allocation, pattern, sparsity):
    model = MODELS[model_name]()
    prune(model, sparsity, allocation=allocation, pattern=pattern)
    n, m = check_nm_groups(model, pattern)
    for name, t in weights(model).items():
        assert (nm_group_counts(t, m) == n).all(), name
        assert int((t != 0).sum()) * m == t.numel() * n, name


@pytest.mark.parametrize("model_name, allocation, pattern, sparsity", _nm_params(0))
def test_nm_below_pattern_density_pattern_decides(model_name, allocation, pattern, sparsity):
    model = MODELS[model_name]()
    masks = prune(model, sparsity, allocation=allocation, pattern=pattern)
    n, m = check_nm_groups(model, pattern)
    for name, t in weights(model).items():
        assert (nm_group_counts(t, m) == n).all(), name
    assert masks.sparsity() == pytest.approx(1 - n / m)


@pytest.mark.parametrize("model_name, allocation, pattern, sparsity", _nm_params(2))
def test_nm_above_pattern_density_is_exact_and_valid(model_name, allocation, pattern, sparsity):
    model = MODELS[model_name]()
    prune(model, sparsity, allocation=allocation, pattern=pattern)
    n, m = check_nm_groups(model, pattern)
    w = weights(model)
    total = sum(t.numel() for t in w.values())
    kept = sum(int((t != 0).sum()) for t in w.values())
    assert abs(kept - round(total * (1 - sparsity))) <= len(w)
    for name, t in w.items():
        assert int((t != 0).sum()) <= t.numel() * n // m, name
        if allocation == "uniform":
            assert abs(int((t != 0).sum()) - t.numel() * (1 - sparsity)) <= 1, name


def test_nm_groups_run_along_flattened_conv_input():
    model = convnet()
    prune(model, 0.5, pattern="2:4")
    w = model[0].weight.detach()
    counts = nm_group_counts(w, 4)
    assert counts.shape == (16, 18)
    assert (counts == 2).all()
    # the groups follow the (in, kh, kw) flattening, i.e. memory order of the weight
    flat = w.flatten()
    assert ((flat.reshape(-1, 4) != 0).sum(1) == 2).all()


def test_nm_keeps_top_magnitudes_per_group():
    model = mlp()
    before = model[0].weight.detach().clone()
    prune(model, 0.5, pattern="2:4")
    groups = before.abs().reshape(-1, 4)
    expected = torch.zeros_like(groups, dtype=torch.bool)
    expected.scatter_(1, groups.topk(2, dim=1).indices, True)
    assert torch.equal(model[0].weight.detach().reshape(-1, 4) != 0, expected)


# -- global vs uniform --------------------------------------------------------------------


def scaled_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():
        model[2].weight.mul_(10.0)
    return model


def test_global_prunes_small_layer_more():
    original = torch.cat([w.flatten() for w in weights(scaled_model()).values()]).abs()
    model = scaled_model()
    masks = prune(model, 0.5, allocation="global")
    layer = masks.layer_sparsity()
    # uniform init, second layer 10x wider: threshold ≈ b/1.1 → sparsity ≈ 0.91 vs 0.09
    assert layer["0.weight"] > 0.85
    assert layer["2.weight"] < 0.15
    assert masks.sparsity() == 0.5
    # the kept weights are exactly the 1024 largest magnitudes of the whole model
    top = torch.zeros(2048, dtype=torch.bool)
    top[original.topk(1024).indices] = True
    kept = torch.cat([masks.masks["0.weight"].flatten(), masks.masks["2.weight"].flatten()])
    assert torch.equal(kept, top)


def test_uniform_gives_equal_layer_sparsity():
    masks = prune(scaled_model(), 0.5, allocation="uniform")
    assert masks.layer_sparsity() == {"0.weight": 0.5, "2.weight": 0.5}


# -- re-pruning never revives -------------------------------------------------------------


@pytest.mark.parametrize("second", [0.3, 0.8])
@pytest.mark.parametrize("pattern", ["unstructured", "row", "block:4x4", "2:4"])
@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_repruning_never_revives(method, allocation, pattern, second):
    model = mlp()
    first = prune(model, 0.5, method=method, allocation=allocation, pattern=pattern, seed=1)
    old = {n: m.clone() for n, m in first.masks.items()}
    old_sparsity = first.sparsity()
    new = prune(model, second, method=method, allocation=allocation, pattern=pattern, seed=2)
    pat = parse_pattern(pattern)
    for n, m in new.masks.items():
        assert not (m & ~old[n]).any(), n  # new ⊆ old
        assert (dict(model.named_parameters())[n][~old[n]] == 0).all(), n
        assert pat.is_valid(m), n
    total = sum(m.numel() for m in new.masks.values())
    slack = sum(unit(pattern, m) for m in new.masks.values()) / total
    assert old_sparsity >= 0.5 - slack
    assert new.sparsity() >= old_sparsity
    if second == 0.3 and allocation in ("uniform", "global"):
        # the budget covers every live weight: the mask does not change at all
        assert all(torch.equal(new.masks[n], old[n]) for n in old)
    if second == 0.8:
        assert new.sparsity() >= 0.8 - slack


def test_repruning_with_random_scores_keeps_exact_uniform_sparsity():
    model = mlp()
    a = prune(model, 0.5, method="random", seed=1)
    b = prune(model, 0.8, method="random", seed=2)
    assert b.layer_sparsity() == pytest.approx({"0.weight": 0.8, "2.weight": 0.8}, abs=1 / 1024)
    assert all(not (b.masks[n] & ~a.masks[n]).any() for n in a.masks)


def test_existing_zeros_count_as_pruned():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0
    masks = prune(model, 0.0, method="random")
    assert not masks.masks["0.weight"][:, :3].any()
    assert masks.masks["0.weight"][:, 3:].all()
    assert masks.masks["2.weight"].all()


# -- the returned MaskSet -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"pattern": "2:4"},
        {"pattern": "block:4x4", "allocation": "global"},
        {"pattern": "row", "allocation": "erk"},
        {"method": "random", "allocation": "lamp"},
    ],
)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_mask_set_is_applied_and_biases_untouched(model_name, kwargs):
    model = MODELS[model_name]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune(model, 0.6, **kwargs)
    assert isinstance(masks, MaskSet)
    assert masks.model is model
    assert masks.pattern == str(parse_pattern(kwargs.get("pattern", "unstructured")))
    assert list(masks.masks) == [t.name for t in resolve_targets(model)]
    params = dict(model.named_parameters())
    for n, p in params.items():
        if n in masks.masks:
            m = masks.masks[n]
            assert m.dtype == torch.bool and m.shape == p.shape
            assert (p.detach()[~m] == 0).all()
            assert torch.equal(p.detach()[m], before[n][m])  # kept weights unchanged
            assert masks.params[n] is p
        else:
            assert torch.equal(p.detach(), before[n]), n  # biases untouched
    assert any(n.endswith("bias") for n in params)
    assert 0.6 - 0.05 < masks.sparsity() < 0.6 + 0.05


def test_masks_match_criterion_top_k():
    torch.manual_seed(1)
    model = mlp()
    x = torch.randn(20, 32)
    ctx = ScoreContext(model, resolve_targets(model), x)
    expected_scores = CRITERIA.get("wanda")(ctx)
    masks = prune(model, 0.75, method="wanda", data=x)
    for n, s in expected_scores.items():  # Wanda compares the weights of each output row
        k = round(s.shape[1] * 0.25)
        top = torch.zeros(s.shape, dtype=torch.bool).scatter_(1, s.topk(k, dim=1).indices, True)
        assert torch.equal(masks.masks[n], top), n


def test_wanda_keeps_an_equal_share_of_every_row_as_its_paper_does():
    """Sun et al. 2023 compare the weights per output: rows of small weights keep their
    share. Ranked across the layer (as magnitude is), row 1 kept one weight of eight."""
    lin = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(32.0).reshape(4, 8) - 10.5)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(1.0, 9.0)
    scores = lin.weight.detach().abs() * x.pow(2).sum(0).sqrt()
    expected = torch.zeros(4, 8, dtype=torch.bool).scatter_(1, scores.topk(4, 1).indices, True)
    mask = prune(nn.Sequential(copy.deepcopy(lin)), 0.5, method="wanda", data=x).masks["0.weight"]
    assert torch.equal(mask, expected)
    layerwide = torch.zeros(32, dtype=torch.bool)
    layerwide[scores.flatten().topk(16).indices] = True
    assert layerwide.reshape(4, 8).sum(1).tolist() == [3, 1, 5, 7]


@pytest.mark.parametrize("method", ["snip", "taylor", "grasp", "synflow", "wanda"])
def test_data_criteria_prune_exactly(method):
    model = mlp()
    torch.manual_seed(2)
    data = (torch.randn(12, 32), torch.randint(0, 16, (12,)))
    masks = prune(model, 0.5, method=method, data=data)
    assert masks.layer_sparsity() == {"0.weight": 0.5, "2.weight": 0.5}


def test_targets_and_exclude_are_honoured():
    model = mlp()
    bias_before = model[2].bias.detach().clone()
    masks = prune(model, 0.5, targets=["2", "2.bias"], exclude=["2.weight"])
    assert list(masks.masks) == ["2.bias"]
    assert int((model[2].bias != 0).sum()) == 8
    assert (model[0].weight != 0).all() and (model[2].weight != 0).all()
    kept = masks.masks["2.bias"]
    assert torch.equal(model[2].bias.detach()[kept], bias_before[kept])


# -- determinism --------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "row"])
def test_random_criterion_is_seeded(pattern):
    a = prune(mlp(), 0.5, method="random", pattern=pattern, seed=1)
    b = prune(mlp(), 0.5, method="random", pattern=pattern, seed=1)
    c = prune(mlp(), 0.5, method="random", pattern=pattern, seed=2)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert any(not torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


def test_random_criterion_ignores_global_rng():
    torch.manual_seed(5)
    a = prune(mlp(), 0.5, method="random", seed=3)
    torch.manual_seed(6)
    b = prune(mlp(), 0.5, method="random", seed=3)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


# -- bad input: raises and leaves the model bit-identical ---------------------------------

X = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))

BAD = [
    # (kwargs, exception, message fragments)
    ({"sparsity": -0.1}, ValueError, ["sparsity", "[0, 1)"]),
    ({"sparsity": 1.0}, ValueError, ["sparsity", "[0, 1)"]),
    ({"sparsity": 1.5}, ValueError, ["sparsity", "[0, 1)"]),
    ({"sparsity": "0.5"}, TypeError, ["sparsity", "[0, 1)"]),
    ({"sparsity": True}, TypeError, ["sparsity", "[0, 1)"]),
    ({"sparsity": None}, TypeError, ["sparsity"]),
    ({"sparsity": float("nan")}, ValueError, ["sparsity", "[0, 1)"]),
    ({"pattern": "3:2"}, ValueError, ["pattern", "'3:2'", "0 < N < M"]),
    ({"pattern": "2:2"}, ValueError, ["pattern", "'2:2'", "0 < N < M"]),
    ({"pattern": "0:4"}, ValueError, ["pattern", "'0:4'", "0 < N < M"]),
    ({"pattern": "a:b"}, ValueError, ["pattern", "'a:b'", "'2:4'"]),
    ({"pattern": "2.5:4"}, ValueError, ["pattern", "'2.5:4'", "'2:4'"]),
    ({"pattern": "block:3x3"}, ValueError, ["pattern", "'block:3x3'", "'0.weight'", "64x32"]),
    ({"pattern": "block:0x4"}, ValueError, ["pattern", "'block:0x4'", "block:RxC"]),
    ({"pattern": "nm"}, ValueError, ["pattern", "'nm'"]),
    ({"pattern": "diagonal"}, ValueError,
     ["pattern", "'diagonal'", "unstructured", "N:M", "block:RxC", "row"]),
    ({"pattern": 4}, TypeError, ["pattern", "unstructured"]),
    ({"method": "mag"}, ValueError,
     ["unknown method", "'mag'", "magnitude", "random", "wanda", "snip", "taylor", "grasp",
      "synflow"]),  # the argument's name: "criterion" is its deprecated spelling
    ({"method": None}, TypeError, ["method must be"]),
    ({"allocation": "erk2"}, ValueError,
     ["allocation", "'erk2'", "erk", "er,", "uniform", "global", "lamp"]),
    ({"method": "wanda"}, ValueError, ["criterion", "'wanda'", "data"]),
    ({"method": "snip"}, ValueError, ["criterion", "'snip'", "data"]),
    ({"method": "snip", "data": X}, ValueError, ["'snip'", "labels"]),
    ({"exclude": ["fc9"]}, ValueError, ["exclude", "'fc9'", "0.weight, 2.weight"]),
    ({"exclude": "fc9"}, ValueError, ["exclude", "'fc9'"]),
    ({"targets": ["2", "fc9"]}, ValueError, ["targets", "'fc9'"]),
    ({"targets": "nope.*"}, ValueError, ["targets", "'nope.*'"]),
    ({"seed": "1"}, TypeError, ["seed"]),
    ({"seed": 1.0}, TypeError, ["seed"]),
]


def _case_id(kwargs: dict) -> str:
    """A test id that names a tensor argument by its shape, not its values."""
    return repr({k: f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else v
                 for k, v in kwargs.items()})


@pytest.mark.parametrize("kwargs, exc, fragments", BAD, ids=[_case_id(b[0]) for b in BAD])
def test_bad_input_raises_and_changes_nothing(kwargs, exc, fragments):
    model = mlp()
    before = state(model)
    kwargs = {"sparsity": 0.5, **kwargs}
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(exc) as err:
        prune(model, sparsity, **kwargs)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert_bit_identical(before, state(model))


def test_integer_weight_is_type_error():
    model = mlp()
    model[0].weight = nn.Parameter(torch.arange(64 * 32).reshape(64, 32), requires_grad=False)
    before = state(model)
    with pytest.raises(TypeError, match=r"'0\.weight' has dtype torch\.int64"):
        prune(model, 0.5)
    assert_bit_identical(before, state(model))


@pytest.mark.parametrize(
    "layer, pattern",
    [(nn.Linear(6, 8), "2:4"), (nn.Linear(12, 8), "4:8"), (nn.Conv2d(4, 8, 3), "4:8")],
)
def test_nm_input_dim_not_multiple_of_m(layer, pattern):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), layer)
    before = state(model)
    with pytest.raises(ValueError) as err:
        prune(model, 0.5, pattern=pattern)
    msg = str(err.value)
    assert f"'{pattern}'" in msg and "'1.weight'" in msg and "multiple of" in msg
    assert_bit_identical(before, state(model))


def test_first_layer_valid_second_invalid_changes_nothing():
    # validation must cover every layer before any weight is zeroed
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))
    before = state(model)
    with pytest.raises(ValueError, match="'2.weight'"):
        prune(model, 0.5, pattern="2:4")
    assert_bit_identical(before, state(model))


def test_model_must_be_module():
    with pytest.raises(TypeError, match="model"):
        prune({"w": torch.zeros(2, 2)}, 0.5)


def test_very_high_sparsity():
    masks = prune(mlp(), 0.999)  # keeps round(3.072) = 3 weights: 2 + 1 by largest remainder
    assert [int(m.sum()) for m in masks.masks.values()] == [2, 1]
    assert math.isclose(masks.sparsity(), 1 - 3 / 3072)


class Tied(nn.Module):
    """An embedding whose weight is shared with the output Linear (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(8, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 8, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.hidden(self.emb(x)))


def test_tied_embedding_is_left_dense_by_default():
    model = Tied()
    masks = prune(model, 0.5)
    assert set(masks.masks) == {"hidden.weight"}
    assert (model.emb.weight == 0).sum() == 0
    assert (model.hidden.weight == 0).sum() == 8


def test_tied_weights_can_be_pruned_when_named():
    model = Tied()
    masks = prune(model, 0.5, targets=["out", "hidden"])
    assert set(masks.masks) <= {n for n, _ in model.named_parameters()}
    assert (model.emb.weight == 0).sum() == 16
    assert (model.hidden.weight == 0).sum() == 8


def test_owl_through_prune_spares_the_outlier_rich_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64))
    with torch.no_grad():
        model[4].weight[:, :3] *= 40  # a few outlier features in the last layer
    data = torch.randn(32, 16)
    uniform = prune(copy.deepcopy(model), 0.7, method="wanda", data=data)
    assert uniform.layer_sparsity()["4.weight"] == pytest.approx(0.7, abs=1e-3)
    masks = prune(model, 0.7, method="wanda", allocation="owl", data=data)
    per_layer = masks.layer_sparsity()
    assert per_layer["4.weight"] < 0.7 < min(per_layer["0.weight"], per_layer["2.weight"])
    assert masks.sparsity() == pytest.approx(0.7, abs=1 / 9216)


def test_criterion_is_the_deprecated_spelling_of_method():
    with pytest.warns(DeprecationWarning, match=r"criterion= is deprecated, use method="):
        old = prune(mlp(), 0.5, criterion="random", seed=4)
    new = prune(mlp(), 0.5, method="random", seed=4)
    assert all(torch.equal(old.masks[n], m) for n, m in new.masks.items())
    with pytest.raises(TypeError, match=r"both criterion= and method="):
        prune(mlp(), 0.5, method="random", criterion="random")
    model = mlp()
    before = state(model)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="criterion 'snip'"):
        prune(model, 0.5, criterion="snip")  # the old spelling keeps its error messages
    assert_bit_identical(before, state(model))
