"""FLAP's adaptive structure search, FFN and heads pruned in one pass, and bit-identical
reloads of every pruned shape (uniform widths through plain ``AutoModel*``, per-layer
widths through ``sparsekit.llm.load_pretrained``)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsekit.llm import load_pretrained, prune_structured  # noqa: E402
from sparsekit.structured.adaptive import (  # noqa: E402
    adaptive_counts,
    channel_cost,
    standardized_importance,
)
from sparsekit.structured.dependency import Group, Slice  # noqa: E402
from sparsekit.structured.transformer import transformer_groups  # noqa: E402

VOCAB = 64


def llama(layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def tokens(n: int = 8, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def out(model, ids):
    with torch.no_grad():
        res = model(ids)
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def widths(model):
    layers = model.model.layers if hasattr(model, "model") else model.encoder.layer
    if hasattr(model, "model"):
        return [(b.mlp.up_proj.out_features, b.self_attn.k_proj.out_features) for b in layers]
    return [(b.intermediate.dense.out_features, b.attention.self.query.out_features)
            for b in layers]


def unit_params(model):
    """Parameters of the FFNs and attentions (the units ``amount`` is a share of)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if any(k in n for k in ("mlp.", "self_attn.", "attention.", "intermediate.",
                                       "output.dense")) and "LayerNorm" not in n)


# -- the stages ---------------------------------------------------------------------------


def test_standardized_importance_is_the_mean_z_score_of_each_channels_entries():
    group = Group("g", 3, (Slice("w", 0, "out", 0, 2), Slice("r", 1, "in", 0, 1)))
    w = torch.arange(12.0).reshape(6, 2)  # rows: entries, two per channel
    r = torch.tensor([[1.0, 5.0, 3.0], [3.0, 7.0, 3.0]])  # columns: one per channel
    entries = torch.cat([w.mean(1), r.mean(0)])  # 6 row entries, 3 column entries
    z = (entries - entries.mean()) / entries.std()
    expected = (z[:6].reshape(3, 2).sum(1) + z[6:]) / 3
    torch.testing.assert_close(standardized_importance(group, {"w": w, "r": r}), expected)
    readers = standardized_importance(group, {"w": w, "r": r}, readers_only=True)
    torch.testing.assert_close(readers, (r.mean(0) - r.mean(0).mean()) / r.mean(0).std())
    # scale and shift of a group's scores do not move its standardised ones
    torch.testing.assert_close(standardized_importance(group, {"w": 7 * w + 3, "r": 7 * r + 3}),
                               expected)
    flat = standardized_importance(group, {"w": torch.ones(6, 2), "r": torch.ones(2, 3)})
    assert torch.equal(flat, torch.zeros(3))
    assert standardized_importance(group, {}) is None


def test_channel_cost_counts_what_a_neuron_and_a_gqa_head_take_along():
    model = llama()
    ffn, heads = (transformer_groups(model, u)[0] for u in ("ffn", "heads"))
    assert channel_cost(model, ffn) == 3 * 32  # a row of gate and up, a column of down
    # a key/value head of 4 wide with its two query heads: 8 q rows, 4 k, 4 v, 8 o columns
    assert channel_cost(model, heads) == (8 + 4 + 4 + 8) * 32


def test_adaptive_counts_keep_the_top_ranked_until_the_cost_share_is_reached():
    importance = {"a": torch.tensor([3.0, -1.0]), "b": torch.tensor([2.0, 1.0, 0.0, -2.0])}
    # ranking: a0 (cost 4), b0 (1), b1 (1), b2 (1), a1 (4), b3 (1); total 12
    assert adaptive_counts(importance, {"a": 4, "b": 1}, 0.5) == {"a": 1, "b": 2}  # 6 of 12
    assert adaptive_counts(importance, {"a": 4, "b": 1}, 0.2) == {"a": 2, "b": 3}  # 11 ≈ 9.6
    assert adaptive_counts(importance, {"a": 1, "b": 1}, 0.5) == {"a": 1, "b": 2}


# -- prune_structured ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flap", "wanda", "magnitude"])
def test_joint_adaptive_pruning_removes_the_share_of_unit_parameters(method):
    model = llama()
    before = unit_params(model)
    prune_structured(model, tokens(), 0.3, unit=("ffn", "heads"), method=method,
                     allocation="adaptive")
    share = 1 - unit_params(model) / before
    assert share == pytest.approx(0.3, abs=0.06)  # a head is 768 parameters of 14 000
    assert len(set(widths(model))) > 1  # blocks differ: the search is adaptive


def test_adaptive_does_not_care_how_loud_a_block_is_but_global_does():
    """Scaling one block's output projections scales its FLAP scores by c²: the
    standardised ranking keeps the same units, the raw global one moves them."""
    ids = tokens()

    def pruned(allocation, scale):
        model = llama()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(scale)
        prune_structured(model, ids, 0.3, unit="ffn", method="flap", allocation=allocation)
        return widths(model)

    assert pruned("adaptive", 1.0) == pruned("adaptive", 10.0)
    assert pruned("global", 1.0) != pruned("global", 10.0)


def test_joint_uniform_matches_two_separate_calls_without_calibration_drift():
    """With magnitude (no data) pruning FFN and heads together equals two calls."""
    ids = tokens()
    together, apart = llama(), llama()
    prune_structured(together, ids, 0.25, unit=("ffn", "heads"), method="magnitude")
    for unit in ("ffn", "heads"):
        prune_structured(apart, ids, 0.25, unit=unit, method="magnitude")
    assert torch.equal(out(together, ids), out(apart, ids))
    assert widths(together) == [(36, 12)] * 3  # 3 of 4 key/value heads, 4 wide


@pytest.mark.parametrize("unit, error, match", [
    (("ffn", "ffn"), ValueError, "only 'ffn', 'heads' prune together, each named once"),
    (("ffn", "layers"), ValueError, "remove layers in a call of their own"),
    (("ffn", "experts"), ValueError, "unknown unit 'experts'"),
    ((), TypeError, "unit must be a unit name or a sequence of them"),
    (3, TypeError, "unit must be a unit name or a sequence of them, got 3"),
])
def test_bad_unit_sequences_are_refused_before_anything_changes(unit, error, match):
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        prune_structured(model, tokens(), 0.2, unit=unit)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_adaptive_that_empties_a_block_is_refused_and_the_model_untouched():
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"amount=0.99 would remove every ffn unit of \['model"):
        prune_structured(model, tokens(), 0.99, unit="ffn", method="magnitude",
                         allocation="adaptive")  # 1 % of 144 neurons: a block goes empty
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.intermediate_size == 48


# -- save / load: bit-identical -----------------------------------------------------------


@pytest.mark.parametrize("unit, amount", [("ffn", 0.25), ("heads", 0.5), ("layers", 0.25),
                                          (("ffn", "heads"), 0.5)])
def test_llama_uniform_widths_reload_bit_identical_with_plain_automodel(tmp_path, unit,
                                                                        amount):
    # (heads: 4 of 8 query heads; LLaMA's config refuses head counts that do not divide
    # the hidden size, and those reload through load_pretrained, tested below)
    model, ids = llama(4), tokens()
    prune_structured(model, ids, amount, unit=unit, method="magnitude" if unit != "layers"
                     else None)
    assert not hasattr(model.config, "sparsekit_shapes")
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(out(back, ids), out(model, ids))


@pytest.mark.parametrize("method, allocation", [("flap", "uniform"), ("flap", "adaptive"),
                                                ("wanda", "adaptive")])
def test_llama_per_layer_widths_reload_bit_identical_with_load_pretrained(tmp_path, method,
                                                                         allocation):
    model, ids = llama(), tokens()
    prune_structured(model, ids, 0.3, unit=("ffn", "heads"), method=method,
                     allocation=allocation)
    assert model.config.sparsekit_shapes
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    assert widths(back) == widths(model)
    assert torch.equal(out(back, ids), out(model, ids))


def test_bert_ffn_reloads_bit_identical_with_plain_automodel(tmp_path):
    model, ids = bert(), tokens()
    prune_structured(model, ids, 0.25, unit="ffn", method="wanda")
    assert model.config.intermediate_size == 36
    model.save_pretrained(tmp_path)
    back = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(out(back, ids), out(model, ids))


@pytest.mark.parametrize("method, allocation", [("wanda", "uniform"), ("flap", "adaptive")])
def test_bert_heads_and_ffn_reload_bit_identical_with_load_pretrained(tmp_path, method,
                                                                      allocation):
    model, ids = bert(), tokens()
    reference = copy.deepcopy(model)
    prune_structured(model, ids, 0.25, unit=("ffn", "heads"), method=method,
                     allocation=allocation)
    assert widths(model) != widths(reference)
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    assert [b.attention.self.num_attention_heads for b in back.encoder.layer] == \
        [b.attention.self.num_attention_heads for b in model.encoder.layer]
    assert torch.equal(out(back, ids), out(model, ids))
