import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsekit.llm import load_pretrained, prune_structured  # noqa: E402
from sparsekit.llm.structured import block_influence  # noqa: E402
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


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def out(model, ids):
    with torch.no_grad():
        res = model(ids)
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def kept_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Which rows of ``old`` survive in ``new`` (rows are unique under random init)."""
    return (old[:, None] == new[None]).all(-1).nonzero()[:, 0]


def dropped(n: int, kept: torch.Tensor) -> torch.Tensor:
    alive = torch.zeros(n, dtype=torch.bool)
    alive[kept] = True
    return torch.nonzero(~alive).flatten()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_ffn_matches_the_masked_model_and_reloads_with_automodel(tmp_path, method):
    model, ids = llama(), tokens()
    reference = copy.deepcopy(model)
    prune_structured(model, ids, 0.25, unit="ffn", method=method)
    assert model.config.intermediate_size == 36
    for old, new in zip(reference.model.layers, model.model.layers):
        assert new.mlp.up_proj.out_features == new.mlp.down_proj.in_features == 36
        gone = dropped(48, kept_rows(old.mlp.up_proj.weight, new.mlp.up_proj.weight))
        assert len(gone) == 12
        with torch.no_grad():
            old.mlp.down_proj.weight[:, gone] = 0  # the masked model
    expected = out(model, ids)
    torch.testing.assert_close(expected, out(reference, ids), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(back, ids), expected)
    assert not hasattr(back.config, "sparsekit_shapes")


def test_gqa_heads_remove_key_value_groups_with_their_queries(tmp_path):
    model, ids = llama(), tokens()
    reference = copy.deepcopy(model)
    prune_structured(model, ids, 0.5, unit="heads")
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 4)
    for old, new in zip(reference.model.layers, model.model.layers):
        attn = new.self_attn
        assert attn.q_proj.out_features == attn.o_proj.in_features == 16
        assert attn.k_proj.out_features == attn.v_proj.out_features == 8
        kv = kept_rows(old.self_attn.k_proj.weight, attn.k_proj.weight) // 4  # kv heads kept
        kv = kv.unique()
        assert len(kv) == 2
        q = kept_rows(old.self_attn.q_proj.weight, attn.q_proj.weight) // 4  # query heads
        assert set(q.unique().tolist()) == {2 * h + i for h in kv.tolist() for i in (0, 1)}
        gone = dropped(32, kept_rows(old.self_attn.q_proj.weight, attn.q_proj.weight))
        with torch.no_grad():
            old.self_attn.o_proj.weight[:, gone] = 0
    expected = out(model, ids)
    torch.testing.assert_close(expected, out(reference, ids), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(back, ids), expected)


@pytest.mark.parametrize("unit, amount", [("ffn", 0.3), ("heads", 0.25)])
def test_uneven_widths_round_trip_through_load_pretrained(tmp_path, unit, amount):
    model, ids = llama(), tokens()
    prune_structured(model, ids, amount, unit=unit, allocation="global" if unit == "ffn"
                     else "uniform")
    shapes = model.config.sparsekit_shapes  # heads: 3 of 8 heads do not divide 32
    assert shapes and all(isinstance(v, list) for v in shapes.values())
    expected = out(model, ids)
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    torch.testing.assert_close(out(back, ids), expected)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr() or \
        not model.config.tie_word_embeddings


def test_layers_go_by_block_influence(tmp_path):
    model, ids = llama(4), tokens()
    with torch.no_grad():  # block 2 adds nothing to the residual stream: influence 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, ids)
    assert influence[2] == pytest.approx(0.0, abs=1e-6) and min(influence[:2]) > 1e-4
    expected = out(model, ids)
    prune_structured(model, ids, 0.25, unit="layers")
    assert model.config.num_hidden_layers == 3 == len(model.model.layers)
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    torch.testing.assert_close(out(model, ids), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(back, ids), expected, rtol=1e-4, atol=1e-5)
    # generation with a key-value cache runs on the renumbered layers
    back.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("unit", ["ffn", "heads"])
def test_bert_ffn_and_heads(tmp_path, unit):
    model, ids = bert(), tokens()
    reference = copy.deepcopy(model)
    prune_structured(model, ids, 0.5, unit=unit)
    for old, new in zip(reference.encoder.layer, model.encoder.layer):
        if unit == "ffn":
            assert new.intermediate.dense.out_features == 24
            gone = dropped(48, kept_rows(old.intermediate.dense.weight,
                                         new.intermediate.dense.weight))
            with torch.no_grad():
                old.output.dense.weight[:, gone] = 0
        else:
            assert new.attention.self.num_attention_heads == 2
            assert new.attention.self.all_head_size == 16
            gone = dropped(32, kept_rows(old.attention.self.query.weight,
                                         new.attention.self.query.weight))
            with torch.no_grad():
                old.attention.output.dense.weight[:, gone] = 0
    expected = out(model, ids)
    torch.testing.assert_close(expected, out(reference, ids), rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(out(load_pretrained(tmp_path), ids), expected)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"unit": "experts"}, ValueError, "unknown unit 'experts'; accepted: 'ffn', 'heads'"),
    ({"unit": "layers", "method": "wanda"}, ValueError, "unknown method 'wanda' for unit"),
    ({"allocation": "erk"}, ValueError, "unknown allocation 'erk'"),
    ({"amount": 1.0}, ValueError, "amount"),
    ({"amount": 0.0}, ValueError, "amount"),
    ({"amount": 0.99, "unit": "heads"}, ValueError, "would remove every heads unit"),
    ({"amount": 0.9, "unit": "layers"}, ValueError, "would remove all 3 layers"),
    # ignored for layers, silently
    ({"unit": "layers", "allocation": "global"}, ValueError,
     "allocation='global' does not apply to unit='layers'.*accepted: 'uniform'"),
    ({"unit": "layers", "allocation": "adaptive"}, ValueError, "allocation='adaptive' does not"),
    ({"unit": "layers", "round_to": 8}, ValueError, "round_to=8 does not apply to unit='layers'"),
    ({"calibration": None}, ValueError, "method 'wanda' needs calibration data"),
    ({"calibration": None, "unit": "layers"}, ValueError,
     r"method 'block_influence' needs calibration data \(token ids or texts\)$"),
    ({"calibration": torch.full((2, 4), VOCAB)}, ValueError, "calibration"),
    ({"calibration": None, "method": "flap"}, ValueError, "method 'flap' needs calibration"),
    ({"round_to": 0}, ValueError, "round_to must be an int ≥ 1"),
    ({"round_to": 8.0, "method": "flap"}, TypeError, "round_to must be an int ≥ 1"),
])
def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(kwargs, error, match):
    model = llama()
    before = state(model)
    args = {"calibration": tokens(), **kwargs}
    with pytest.raises(error, match=match):
        prune_structured(model, **args)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.intermediate_size == 48 and model.config.num_hidden_layers == 3


def test_a_model_without_the_unit_is_refused():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match="has no feed-forward network this knows"):
        prune_structured(model, tokens(), unit="ffn", method="magnitude")


class Wrapper(torch.nn.Module):
    """A module holding a transformers model: its ``__init__`` is not ``cls(config)``."""

    def __init__(self, inner: torch.nn.Module, share_config: bool):
        super().__init__()
        self.inner = inner
        if share_config:
            self.config = inner.config

    def forward(self, input_ids):
        return self.inner(input_ids)


@pytest.mark.parametrize("share_config", [True, False])
@pytest.mark.parametrize("unit, allocation", [("ffn", "global"), ("heads", "uniform"),
                                              ("layers", "uniform")])
def test_a_wrapped_model_updates_the_inner_config_and_reloads(tmp_path, share_config, unit,
                                                              allocation):
    """The config updated (and the shapes recorded) is the inner transformers model's:
    with the wrapper's ``.config``, rebuilding the wrapper's class raised a raw TypeError
    after the weights were cut; without one, the inner config stayed stale and reloaded
    the wrong sizes (or a removed layer, re-initialised)."""
    ids = tokens()
    model = Wrapper(llama(), share_config)
    method = None if unit == "layers" else "magnitude"
    prune_structured(model, ids, 0.34, unit=unit, method=method, allocation=allocation)
    config = model.inner.config
    assert config.num_hidden_layers == len(model.inner.model.layers)
    if unit == "ffn":
        assert config.sparsekit_shapes  # global: blocks of different widths
    model.inner.save_pretrained(tmp_path)
    torch.testing.assert_close(out(load_pretrained(tmp_path), ids), out(model.inner, ids))


def test_a_model_its_config_cannot_rebuild_is_refused_and_untouched():
    """Recording the pruned shapes rebuilds the model's class from its config: a class
    that is not ``cls(config)`` is refused before anything changes."""

    class Scaled(transformers.LlamaForCausalLM):
        def __init__(self, config, scale):
            super().__init__(config)
            self.scale = scale

    model = Scaled(llama().config, 2.0)
    before = state(model)
    with pytest.raises(ValueError, match=r"model: Scaled .* cannot be built from its "
                                         r"config \(TypeError.*not changed"):
        prune_structured(model, tokens(), 0.5, unit="heads", method="magnitude")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 4


def qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("unit, amount", [("heads", 0.5), ("layers", 0.34), ("ffn", 0.5)])
def test_qwen2_biases_and_layer_types_follow(tmp_path, unit, amount):
    model, ids = qwen2(), tokens()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    prune_structured(model, ids, amount, unit=unit)
    attn = model.model.layers[0].self_attn
    if unit == "heads":
        assert attn.q_proj.bias.shape == (16,) and attn.k_proj.bias.shape == (8,)
    if unit == "layers":
        assert len(model.config.layer_types) == model.config.num_hidden_layers == 2
    expected = out(model, ids)
    model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(out(back, ids), expected)


def test_head_pattern_through_prune_and_shrink():
    import sparsekit
    from sparsekit.structured import transformer_groups

    model, ids = llama(), tokens()
    masks = sparsekit.prune(model, 0.5, pattern="head", method="wanda", data=ids)
    assert masks.pattern == "head"
    q = masks.masks["model.layers.0.self_attn.q_proj.weight"]
    assert int(q.all(1).sum()) == 16 and masks.masks["lm_head.weight"].all()
    expected = out(model, ids)
    small = sparsekit.shrink(model, masks, groups=transformer_groups(model, "heads"))
    attn = small.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (16, 8)
    torch.testing.assert_close(out(small, ids), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown unit 'experts'"):
        transformer_groups(model, "experts")


@pytest.mark.parametrize("kv_heads, sparsity, match", [
    (4, 0.03, "every group's kept count rounds to all of its channels; use a larger sparsity"),
    (1, 0.5, "every group has a single channel .*multi-query attention.*no sparsity removes"),
])
def test_a_head_prune_that_removes_nothing_is_refused(kv_heads, sparsity, match):
    """pattern="head" that removes no head (too small a sparsity; multi-query attention,
    whose blocks keep their one key/value head) is a ValueError, the model untouched: a
    dense MaskSet came back, silently."""
    import sparsekit

    model = llama()
    if kv_heads == 1:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{**model.config.to_dict(), "num_key_value_heads": 1})).eval()
    before = state(model)
    with pytest.raises(ValueError, match=rf"sparsity={sparsity} removes no channel of any "
                                         rf"group: {match}"):
        sparsekit.prune(model, sparsity, pattern="head")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_multi_query_heads_say_no_amount_removes_one(amount, allocation):
    """With one key/value head per block no amount removes a head: the error says so (it
    said "use a larger amount" at 0.1 and "use a smaller amount" at 0.5)."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**llama().config.to_dict(), "num_key_value_heads": 1})).eval()
    before = state(model)
    with pytest.raises(ValueError, match=rf"amount={amount} removes no heads unit: every block "
                                         r"has a single one \(one key/value head: multi-query "
                                         r"attention\).*no amount removes one"):
        prune_structured(model, tokens(), amount, unit="heads", method="magnitude",
                         allocation=allocation)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("unit", ["ffn", "heads"])
def test_flap_compensates_into_new_biases_and_round_trips(tmp_path, unit):
    model, ids = llama(), tokens(8)
    reference = copy.deepcopy(model)
    prune_structured(model, ids, 0.5, unit=unit, method="flap")
    block, old = model.model.layers[0], reference.model.layers[0]
    reader = block.mlp.down_proj if unit == "ffn" else block.self_attn.o_proj
    assert reader.bias is not None and reader.bias.abs().sum() > 0
    assert (old.mlp.down_proj if unit == "ffn" else old.self_attn.o_proj).bias is None
    if unit == "ffn":
        assert reader.in_features == 24 == model.config.intermediate_size
    shapes = model.config.sparsekit_shapes
    assert shapes[f"model.layers.0.{'mlp.down_proj' if unit == 'ffn' else 'self_attn.o_proj'}"
                  ".bias"] == [32]
    expected = out(model, ids)
    model.save_pretrained(tmp_path)
    back = load_pretrained(tmp_path)
    torch.testing.assert_close(out(back, ids), expected)


def test_flap_compensation_beats_no_compensation_on_its_calibration_data():
    """Per block, the FFN output of the FLAP-pruned block is closer to the dense one with
    the bias it folded in than without it (the paper's compensation)."""
    model, ids = llama(1), tokens(8)
    reference = copy.deepcopy(model)
    prune_structured(model, ids, 0.5, unit="ffn", method="flap")
    hidden = reference.model.embed_tokens(ids)
    x = reference.model.layers[0].post_attention_layernorm(hidden).detach()  # an FFN input
    with torch.no_grad():
        dense = reference.model.layers[0].mlp(x)
        mlp = model.model.layers[0].mlp
        compensated = mlp(x)
        bias = mlp.down_proj.bias.clone()
        mlp.down_proj.bias.zero_()
        plain = mlp(x)
        mlp.down_proj.bias.copy_(bias)
    assert (compensated - dense).pow(2).mean() < (plain - dense).pow(2).mean()


def test_round_to_rounds_ffn_widths():
    model, ids = llama(), tokens()
    prune_structured(model, ids, 0.3, unit="ffn", method="magnitude", round_to=8)
    assert all(b.mlp.up_proj.out_features == 32 for b in model.model.layers)  # 33.6 -> 32
    model = llama()
    prune_structured(model, ids, 0.5, unit="heads", method="magnitude", round_to=8)
    assert model.model.layers[0].self_attn.k_proj.out_features == 8  # a head is 4 wide


def test_round_to_rounds_the_uniform_count_once():
    # 48 x (1 - 0.50625) = 23.7 per block: whole units by largest remainder give 24, 24, 23,
    # which rounded again to multiples of 16 would be 32, 32, 16; 23.7 itself rounds to 16
    model, ids = llama(), tokens()
    prune_structured(model, ids, 0.50625, unit="ffn", method="magnitude", round_to=16)
    assert [b.mlp.up_proj.out_features for b in model.model.layers] == [16, 16, 16]

# -- FLAP's adaptive structure search, FFN + heads in one pass, bit-identical reloads -----


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
    """Scaling the last block's FFN output projection scales its FLAP scores by c² (and
    no block's inputs): the standardised ranking keeps the same units, the raw global
    one moves them."""
    ids = tokens()

    def pruned(allocation, scale):
        model = llama()
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight.mul_(scale)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("unit", [("ffn", "heads"), "layers"])
def test_a_model_on_a_gpu_takes_calibration_tokens_made_on_the_cpu(unit):
    # calibration from texts is tokenized on the CPU; the model's first parameter says
    # where the tokens go (as llm.prune's block capture does): the run on an H200 raised
    # "Expected all tensors to be on the same device" before
    model, ids = llama().cuda(), tokens()
    reference = copy.deepcopy(model).cpu()
    prune_structured(model, ids, 0.5 if unit == "layers" else 0.25, unit=unit)
    prune_structured(reference, ids, 0.5 if unit == "layers" else 0.25, unit=unit)
    assert widths(model) == widths(reference)
    assert model.config.num_hidden_layers == reference.config.num_hidden_layers


def test_load_pretrained_names_weights_a_shrink_cut_under_the_full_config(tmp_path):
    """``shrink`` with transformer groups cuts heads but leaves the config (prune_structured
    updates it): reloading the saved model was transformers' raw ``RuntimeError`` about
    ``ignore_mismatched_sizes``; it names the cause and the two ways out."""
    import sparsekit

    model = llama()
    masks = sparsekit.prune(model, 0.25, pattern="head")
    small = sparsekit.shrink(model, masks, groups=transformer_groups(model, "heads"))
    small.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"do not have the shapes its config.json describes.*"
                                         r"sparsekit.shrink keeps its config.*prune_structured"):
        load_pretrained(tmp_path)


def test_load_pretrained_refuses_a_tie_the_saved_weights_do_not_hold(tmp_path):
    """A config.json edited to tie the embeddings after saving loaded silently, one of
    ``lm_head`` and ``embed_tokens`` overwriting the other (logits off by 1.6)."""
    import json

    model = llama()
    prune_structured(model, tokens(), 0.25, unit="heads")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"ties 'lm_head.weight' to 'model.embed_tokens.weight'"
                                         r", but the weights saved for them differ"):
        load_pretrained(tmp_path)
