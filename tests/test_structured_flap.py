"""FLAP's fluctuation metric and bias compensation, and rounding of kept channel counts."""

import copy

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.models import ResNetSmall
from sparsekit.patterns import Channel, parse_pattern
from sparsekit.prune import compute_masks
from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext
from sparsekit.scores.flap import Moments, fluctuation_scores, input_moments
from sparsekit.structured import dependency_groups, shrink
from sparsekit.structured.compensate import fold_means, reader_means, with_biases
from sparsekit.structured.importance import group_importance, round_count, rounding_step
from sparsekit.structured.shrink import removable_channels
from sparsekit.targets import resolve_targets


def _mlp(hidden=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 8)).eval()


def _resnet(x):
    torch.manual_seed(0)
    model = ResNetSmall(width=8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, before):
    return model.state_dict().keys() == before.keys() and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- the fluctuation metric ---------------------------------------------------------------


def test_moments_are_the_sample_mean_and_variance_per_channel():
    x = torch.randn(50, 6) * torch.arange(1, 7) + 3
    layer = nn.Linear(6, 2)
    m = Moments(6)
    m.observe(layer, x[:20])
    m.observe(layer, x[20:])
    torch.testing.assert_close(m.mean(), x.mean(0))
    torch.testing.assert_close(m.variance(), x.var(0))
    conv = nn.Conv2d(3, 4, 3)
    images = torch.randn(5, 3, 7, 7) + torch.tensor([1.0, -2.0, 0.5])[:, None, None]
    c = Moments(3)
    c.observe(conv, images)
    rows = images.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(c.mean(), rows.mean(1))
    torch.testing.assert_close(c.variance(), rows.var(1))
    with pytest.raises(ValueError, match="at least 2 calibration rows"):
        Moments(3).variance()  # no variance: every channel would tie


def test_fluctuation_score_is_variance_times_squared_column_norm():
    model = _mlp()
    x = torch.randn(64, 16) + 1
    moments = input_moments(model, {"2.weight": model[2]}, x)
    scores = fluctuation_scores(model[2].weight, moments["2.weight"])
    hidden = torch.relu(model[0](x)).detach()
    torch.testing.assert_close(scores.sum(0), hidden.var(0) * model[2].weight.detach().pow(2)
                               .sum(0), rtol=1e-4, atol=1e-6)
    # a grouped convolution: every output row sees the variance of its own group's inputs
    conv = nn.Conv2d(4, 6, 3, groups=2)
    m = Moments(4)
    m.observe(conv, torch.randn(2, 4, 5, 5) * torch.tensor([1.0, 2, 3, 4])[:, None, None])
    s = fluctuation_scores(conv.weight, m)
    assert s.shape == conv.weight.shape
    var = m.variance()
    torch.testing.assert_close(s[4, 1], conv.weight.detach()[4, 1] ** 2 * var[3])


def test_flap_is_a_registered_data_driven_criterion_ranking_readers():
    assert CRITERIA.meta("flap")["data_driven"] and CRITERIA.meta("flap")["readers_only"]
    assert not CRITERIA.meta("magnitude")["readers_only"]
    model = _mlp()
    x = torch.randn(64, 16) + 1
    masks, _ = compute_masks(model, 0.5, method="flap", pattern="channel", data=x)
    group = dependency_groups(model)[0]
    hidden = torch.relu(model[0](x)).detach()
    metric = hidden.var(0) * model[2].weight.detach().pow(2).sum(0)
    expected = torch.topk(metric, 16).indices.sort().values
    assert torch.equal(masks["2.weight"].any(0).nonzero().flatten(), expected)
    scores = {"0.weight": torch.ones(32, 16), "2.weight": torch.zeros(8, 32)}
    assert torch.equal(group_importance(group, scores, readers_only=True), torch.zeros(32))
    assert group_importance(group, scores).sum() > 0


def test_flap_without_calibration_data_is_a_clear_error_and_leaves_the_model_untouched():
    model = _mlp()
    before = _state(model)
    with pytest.raises(ValueError, match="criterion 'flap' needs data="):
        sparsekit.prune(model, 0.5, method="flap", pattern="channel")
    with pytest.raises(ValueError, match="criterion 'flap' scores Linear/Conv1D/Conv weights only; "
                       "target '0.bias'"):
        sparsekit.prune(model, 0.5, method="flap", targets="0.bias", data=torch.randn(4, 16))
    with pytest.raises(TypeError, match=r"layers\['act'\] must be a Linear, GPT-2 Conv1D or Conv "
                                       r"layer"):
        input_moments(model, {"act": model[1]}, torch.randn(4, 16))
    with pytest.raises(ValueError, match="never reached"):
        input_moments(model, {"x": nn.Linear(16, 2)}, torch.randn(4, 16))
    assert _same(model, before)


# -- bias compensation --------------------------------------------------------------------


def test_compensation_reduces_the_output_error_on_nonzero_mean_inputs():
    """The paper's claim on a tiny case: with the removed channels' means folded into the
    reader's bias, the pruned output is unbiased over the calibration data and closer to
    the dense one than without."""
    model = _mlp()
    x = torch.randn(512, 16) + 1.0  # the hidden ReLU channels have nonzero means
    before = _state(model)
    masks, _ = compute_masks(model, 0.5, method="flap", pattern="channel", data=x)
    plain = shrink(model, masks)
    compensated = shrink(model, masks, compensate=x)
    assert _same(model, before)
    with torch.no_grad():
        dense = model(x)
        err_plain = plain(x) - dense
        err_comp = compensated(x) - dense
    assert compensated[2].in_features == plain[2].in_features == 16
    assert err_comp.pow(2).mean() < 0.9 * err_plain.pow(2).mean()
    assert err_comp.mean(0).abs().max() < 1e-5 < err_plain.mean(0).abs().max()
    held_out = torch.randn(512, 16) + 1.0  # and on data it never saw
    with torch.no_grad():
        assert (compensated(held_out) - model(held_out)).pow(2).mean() < (
            plain(held_out) - model(held_out)).pow(2).mean()


def test_compensation_adds_a_bias_that_shrinks_with_its_layer():
    x = torch.randn(16, 1, 28, 28) + 0.5
    model = _resnet(x)
    assert model.layer1[0].conv2.bias is None
    masks, _ = compute_masks(model, 0.5, method="flap", pattern="channel", data=x)
    small = shrink(model, masks, compensate=x)
    conv = small.layer1[0].conv2  # reads a pruned group; writes the residual stream
    assert conv.bias is not None and conv.bias.shape == (conv.out_channels,)
    with torch.no_grad():
        plain = shrink(model, masks)(x)
        dense = model(x)
        got = small(x)
    assert (got - dense).pow(2).mean() < (plain - dense).pow(2).mean()


def test_fold_means_and_with_biases():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 2))
    groups = dependency_groups(model)
    first = next(g for g in groups if g.name == "0")
    means = {"2.weight": torch.arange(6.0)}
    gone = torch.tensor([1, 4])
    weight = model[2].weight.detach().clone()
    added = fold_means(model, [(first, gone)], means)
    assert added == {"2"}
    torch.testing.assert_close(model[2].bias.detach(), weight[:, 1] * 1 + weight[:, 4] * 4)
    second = next(g for g in groups if g.name == "2")
    names = {s.name for s in with_biases(second, added).slices}
    assert "2.bias" in names and "2.bias" not in {s.name for s in second.slices}
    assert with_biases(first, added) is first
    assert reader_means(model, [(first, torch.empty(0, dtype=torch.long))], None) == {}


def test_compensation_refuses_what_it_cannot_do_and_leaves_the_model_untouched():
    model = _mlp()
    x = torch.randn(64, 16)
    masks, _ = compute_masks(model, 0.5, pattern="channel")
    before = _state(model)
    with pytest.raises(ValueError, match="compensate needs masks"):
        shrink(model, None, compensate=x)
    # the errors name the argument, compensate (they said "data" until session 40)
    with pytest.raises(ValueError, match="^compensate: the model cannot run"):
        shrink(model, masks, compensate=torch.randn(4, 3))
    with pytest.raises(ValueError, match="^compensate holds no"):
        shrink(model, masks, compensate=[])
    assert _same(model, before)
    applied = copy.deepcopy(model)
    sparsekit.MaskSet(applied, masks).apply()
    with pytest.raises(ValueError, match="were the masks applied"):
        shrink(applied, masks, compensate=x)


# -- rounding -----------------------------------------------------------------------------


def test_round_count():
    group = dependency_groups(_mlp(hidden=30))[0]
    assert rounding_step(group, 8) == 8
    assert [round_count(k, group, 8) for k in (1, 4, 11, 12, 13, 25, 27, 30)] == \
        [8, 8, 8, 16, 16, 24, 30, 30]
    assert round_count(13, group, 1) == 13
    narrow = dependency_groups(_mlp(hidden=6))[0]
    assert round_count(3, narrow, 8) == 6  # narrower than one step: keeps its width


def test_round_count_rounds_the_unrounded_count_once():
    group = dependency_groups(_mlp(hidden=64))[0]
    # 64 × (1 − 0.382) = 39.55: 40 is the tie between 32 and 48, 39 is nearer 32
    assert [round_count(k, group, 16) for k in (39, 40)] == [32, 48]
    assert [round_count(k, group, 16, near=39.55) for k in (39, 40)] == [32, 32]
    assert round_count(41, group, 16, near=39.55) == 48  # a count of its own: rounded itself
    assert round_count(40, group, 16, near=40.0) == 48  # a true tie still keeps more


def test_uniform_channel_pruning_gives_groups_of_one_width_one_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    # three 4-wide groups at sparsity 0.3: 2.8 channels each; largest remainder makes
    # that 3, 3, 2 (8 of 8.4), which rounding to pairs made 4, 4, 2; 2.8 rounds to 2
    masks, _ = compute_masks(model, 0.3, pattern="channel:2")
    assert [int(masks[f"{i}.weight"].any(1).sum()) for i in (0, 2, 4)] == [2, 2, 2]
    # another allocation's counts are its own: 3 rounds to 4 (a tie keeps more), not to
    # the uniform 2.8's 2
    targets = resolve_targets(model, None, ())
    scores = CRITERIA.get("magnitude")(ScoreContext(model, targets, None, None, None))
    masks = Channel(round_to=2).select(model, targets, scores,
                                       lambda imp, _s: dict.fromkeys(imp, 3), 0.3)
    assert [int(masks[f"{i}.weight"].any(1).sum()) for i in (0, 2, 4)] == [4, 4, 4]


@pytest.mark.parametrize("spec", ["channel:8", Channel(round_to=8)])
def test_rounded_channel_counts_match_the_masked_model(spec):
    x = torch.randn(8, 1, 28, 28)
    model = _resnet(x)
    masks = sparsekit.prune(model, 0.3, pattern=spec)
    assert masks.pattern == "channel:8"
    small = shrink(model, masks)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert any(c.out_channels < d.out_channels for c, d in zip(
        convs, [m for m in model.modules() if isinstance(m, nn.Conv2d)]))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_shrink_round_to_keeps_inert_channels():
    x = torch.randn(8, 1, 28, 28)
    model = _resnet(x)
    masks = sparsekit.prune(model, 0.3, pattern="channel")
    groups = dependency_groups(model)
    odd = [g.channels - removable_channels(model, g, masks.masks).numel() for g in groups]
    assert any(k % 8 for k in odd)
    small = shrink(model, masks, round_to=8)
    assert all(g.channels % 8 == 0 for g in dependency_groups(small))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("round_to, error", [
    (0, ValueError), (-8, ValueError), (2.5, TypeError), ("8", TypeError), (True, TypeError)])
def test_bad_round_to_is_a_clear_error_and_leaves_the_model_untouched(round_to, error):
    model = _mlp()
    masks, _ = compute_masks(model, 0.5, pattern="channel")
    before = _state(model)
    with pytest.raises(error, match="round_to must be an int ≥ 1"):
        shrink(model, masks, round_to=round_to)
    with pytest.raises(error, match="round_to must be an int ≥ 1"):
        sparsekit.prune(model, 0.5, pattern=Channel(round_to=round_to))
    assert _same(model, before)
    for spec in ("channel:0", "channel:x", "head:-1"):
        with pytest.raises(ValueError, match="must be an int ≥ 1"):
            parse_pattern(spec)


# -- FLAP, stage by stage, against the paper (and its authors' code) ----------------------


def test_standardized_importance_raises_entries_to_the_power_before_the_z_score():
    from sparsekit.structured.adaptive import standardized_importance
    from sparsekit.structured.dependency import Group, Slice

    group = Group("g", 2, (Slice("o", 1, "in", 0, 3),))  # two heads of three columns
    o = torch.tensor([[4.0, 0.0, 0.0, 3.0, 2.0, 1.0], [4.0, 0.0, 0.0, 1.0, 2.0, 3.0]])
    entries = o.mean(0)  # [4, 0, 0, 2, 2, 2]: head 0 is one loud column, head 1 even
    for power, winner in ((1.0, 1), (2.0, 0)):
        raised = entries ** power
        z = (raised - raised.mean()) / raised.std()
        got = standardized_importance(group, {"o": o}, power=power)
        torch.testing.assert_close(got, z.reshape(2, 3).mean(1))
        assert int(got.argmax()) == winner


def test_group_importance_power_squares_each_entry_once_per_weight():
    from sparsekit.structured.dependency import Group, Slice

    group = Group("g", 2, (Slice("w", 0, "out", 0, 1), Slice("o", 1, "in", 0, 2)))
    w = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # rows: one per channel
    o = torch.tensor([[1.0, 3.0, 0.0, 2.0]])  # columns: two per channel
    plain = group_importance(group, {"w": w, "o": o})
    torch.testing.assert_close(plain, torch.tensor([(1 + 3 + 1 + 3) / 4, (2 + 2 + 0 + 2) / 4]))
    assert torch.equal(group_importance(group, {"w": w, "o": o}, power=1.0), plain)
    squared = group_importance(group, {"w": w, "o": o}, power=2.0)
    # row entries: means 2 and 2 (two weights each); column entries: 1, 3, 0, 2 (one each)
    torch.testing.assert_close(squared, torch.tensor([(2 * 4 + 1 + 9) / 4, (2 * 4 + 0 + 4) / 4]))


def test_flap_structure_is_the_papers_adaptive_search_over_squared_head_metrics():
    """FLAP by hand on a tiny GQA LLaMA: the fluctuation metric of every column of
    o_proj / down_proj (Var(x_j)·‖W[:, j]‖², from the dense model), squared for heads,
    standardised per block and module, a head scored by the mean over its columns, one
    ranking over everything weighted by the parameters each unit takes along, and the
    bias of o_proj / down_proj compensated with the removed columns' mean input."""
    transformers = pytest.importorskip("transformers")
    from sparsekit.llm import prune_structured
    from sparsekit.structured.adaptive import channel_cost
    from sparsekit.structured.transformer import transformer_groups

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    blocks = model.model.layers
    layers = {f"{i}.{p}": b.get_submodule(p) for i, b in enumerate(blocks)
              for p in ("self_attn.o_proj", "mlp.down_proj")}
    moments = input_moments(model, layers, ids)
    metric = {n: moments[n].variance() * m.weight.detach().pow(2).sum(0)
              for n, m in layers.items()}

    def z(x):
        return (x - x.mean()) / x.std()

    per_kv = 8 // 4 * 4  # two query heads of four columns read each key/value head
    scores, costs, owner = [], [], []
    head_cost = channel_cost(model, transformer_groups(model, "heads")[0])
    ffn_cost = channel_cost(model, transformer_groups(model, "ffn")[0])
    for i in range(3):
        heads = z(metric[f"{i}.self_attn.o_proj"] ** 2).reshape(4, per_kv).mean(1)
        ffn = z(metric[f"{i}.mlp.down_proj"])
        scores += [heads, ffn]
        costs += [torch.full((4,), float(head_cost)), torch.full((48,), float(ffn_cost))]
        owner += [torch.full((4,), 2 * i), torch.full((48,), 2 * i + 1)]
    scores, costs, owner = torch.cat(scores), torch.cat(costs), torch.cat(owner)
    order = torch.argsort(scores, descending=True, stable=True)
    n_keep = int(torch.argmin((costs[order].cumsum(0) - 0.7 * costs.sum()).abs())) + 1
    kept = torch.bincount(owner[order[:n_keep]], minlength=6)
    o_means = {i: moments[f"{i}.self_attn.o_proj"].mean() for i in range(3)}
    reference = copy.deepcopy(model)

    prune_structured(model, ids, 0.3, unit=("ffn", "heads"), method="flap",
                     allocation="adaptive")
    for i, (old, new) in enumerate(zip(reference.model.layers, model.model.layers)):
        assert new.self_attn.o_proj.in_features == int(kept[2 * i]) * per_kv
        assert new.mlp.down_proj.in_features == int(kept[2 * i + 1])
        # compensation: o_proj's bias is what its removed columns carried on average
        w = old.self_attn.o_proj.weight.detach()
        alive = (w[:, :, None] == new.self_attn.o_proj.weight.detach()[:, None]).all(0).any(1)
        if alive.all():
            assert new.self_attn.o_proj.bias is None
            continue
        expected = w[:, ~alive] @ o_means[i][~alive]
        torch.testing.assert_close(new.self_attn.o_proj.bias.detach(), expected)
    assert kept[0::2].tolist() != [4, 4, 4]  # some block lost heads
