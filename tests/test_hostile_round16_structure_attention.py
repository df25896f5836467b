"""Hostile inputs, round 16: structured pruning and sparse attention.

- only ``x.view(x.size(0), -1)`` (or ``x.shape[0]``) is followed as a flatten: a
  ``reshape(4, -1)`` of a batch of 2 moves channels between rows and freezes them;
- a layer whose weight is computed (``weight_norm``, ``spectral_norm``) keeps its width;
- hand-built groups with fields no traced group has (``channels=0``, a negative offset, a
  role other than "in"/"out", a float dim) are refused by ``shrink``, not followed into
  wrong removals or raw PyTorch errors;
- meta tensors (a model, masks, queries, keys, block masks, masses) are a ``ValueError``
  naming them wherever their values are read;
- grouped-query heads that do not divide, FFN writers and readers of different widths,
  and layers shared between blocks, are refused by ``transformer_groups`` /
  ``prune_structured`` before the model changes;
- ``load_pretrained`` keeps a bfloat16 model bfloat16, and refuses a null
  ``sparsekit_shapes`` and an unreadable weights file with a ``ValueError``;
- tile masses and patterns of an empty batch are empty, not a ``ZeroDivisionError``, and
  ``density`` checks its mask before it counts the pairs of lengths the mask does not fit;
- a softcapped model (Gemma 2) switched to sparse attention runs, as its eager attention;
  a model transformers cannot switch (XLNet) is refused, not left silently dense.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

from sparsekit.attention import (
    ATTENTION_PATTERNS,
    Dense,
    UserMask,
    density,
    mass_recall,
    tile_mass,
)
from sparsekit.structured import Group, Slice, dependency_groups, shrink

transformers = pytest.importorskip("transformers")

from sparsekit import attention  # noqa: E402
from sparsekit.llm import load_pretrained, prune_structured  # noqa: E402
from sparsekit.structured.transformer import transformer_groups  # noqa: E402

VOCAB = 64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def llama(**overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **overrides})).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def qk(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 32, 8, generator=g), torch.randn(batch, 2, 32, 8, generator=g)


# -- shrink: groups and meta tensors -----------------------------------------------------------


def _edited(group: Group, **fields) -> Group:
    """``group`` with every slice given ``fields``, or the group's channels."""
    channels = fields.pop("channels", group.channels)
    slices = tuple(Slice(**{**vars(s), **fields}) for s in group.slices)
    return Group(group.name, channels, slices)


@pytest.mark.parametrize("fields, error, match", [
    ({"channels": 0}, ValueError, r"groups\[0\]\.channels must be an int ≥ 1, got 0"),
    ({"channels": -1}, ValueError, r"channels must be an int ≥ 1, got -1"),
    ({"channels": 2.5}, TypeError, r"channels must be an int ≥ 1, got 2.5"),
    ({"offset": -2}, ValueError, r"slices\[0\]\.offset must be an int ≥ 0, got -2"),
    ({"repeat": 0}, ValueError, r"repeat must be an int ≥ 1, got 0"),
    ({"role": "x"}, ValueError, r"role must be 'in' .* or 'out' .*, got 'x'"),
    ({"dim": 1.0}, TypeError, r"dim must be an int, got 1.0"),
    ({"dim": True}, TypeError, r"dim must be an int, got True"),
])
def test_shrink_refuses_groups_with_fields_no_traced_group_has(fields, error, match):
    # a negative offset or an unknown role removed the wrong channels without a sign of it
    model = Net()
    before = snapshot(model)
    group = _edited(dependency_groups(model)[0], **fields)
    with pytest.raises(error, match=match):
        shrink(model, groups=[group])
    assert unchanged(model, before)


def test_shrink_of_a_meta_model_by_its_zeros_names_the_weight():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"model's 'b.weight' is on the meta device"):
        shrink(model)


def test_shrink_refuses_a_meta_mask():
    model = Net()
    mask = torch.ones(3, 6, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"masks\['b.weight'\] is on the meta device"):
        shrink(model, {"b.weight": mask})


class Reshaped(nn.Module):
    """A conv whose output is reshaped to ``rows`` rows (a batch of 2: ``x.size(0)``)."""

    def __init__(self, rows: str) -> None:
        super().__init__()
        self.rows = rows
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(16 if rows != "4" else 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.rows == "4":
            return self.fc(y.reshape(4, -1))
        if self.rows == "shape":
            return self.fc(y.view(y.shape[0], -1))
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("rows, groups", [("4", 0), ("size", 1), ("shape", 1)])
def test_only_a_view_by_the_batch_size_is_a_flatten(rows, groups):
    # reshape(4, -1) of a batch of 2 puts two channels' pixels in one row: it was followed
    # as a flatten, and shrink changed the outputs
    model = Reshaped(rows).eval()
    assert len(dependency_groups(model)) == groups
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(model.fc.weight, dtype=torch.bool)
    mask[:, : mask.shape[1] // 2] = False
    with torch.no_grad():
        expected = nn.functional.linear(model.conv(x).reshape(2 if rows != "4" else 4, -1),
                                        model.fc.weight * mask, model.fc.bias)
        torch.testing.assert_close(shrink(model, {"fc.weight": mask})(x), expected)


# -- transformer groups and prune_structured ---------------------------------------------------


def test_gqa_heads_that_do_not_divide_are_refused_before_anything_changes():
    # 8 query heads over 3 key/value heads grouped 10 query rows per head, silently
    model = llama(num_key_value_heads=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="has no whole heads to group"):
        transformer_groups(model, "heads")
    with pytest.raises(ValueError, match="query heads a multiple of the key/value heads"):
        prune_structured(model, None, 0.34, unit="heads", method="magnitude")
    assert unchanged(model, before)


@pytest.mark.parametrize("shared", ["mlp.up_proj", "mlp"])
def test_a_layer_shared_by_two_blocks_is_refused_before_anything_changes(shared):
    # a shared up_proj lost the neurons of both blocks: a model that no longer ran
    model = llama()
    first, second = model.model.layers[0], model.model.layers[1]
    if shared == "mlp":
        second.mlp = first.mlp
    else:
        second.mlp.up_proj = first.mlp.up_proj
    before = snapshot(model)
    with pytest.raises(ValueError, match="shared by several blocks"):
        prune_structured(model, None, 0.5, unit="ffn", method="magnitude")
    assert unchanged(model, before)
    assert model(tokens()).logits.shape == (4, 16, VOCAB)


def test_prune_structured_of_a_meta_model_names_the_parameter():
    with torch.device("meta"):
        model = llama()
    with pytest.raises(ValueError, match="model's parameter .* is on the meta device"):
        prune_structured(model, None, 0.5, method="magnitude")


# -- load_pretrained ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_global(tmp_path_factory):
    model = llama()
    prune_structured(model, tokens(), 0.5, unit="ffn", allocation="global")
    path = tmp_path_factory.mktemp("global")
    model.save_pretrained(path)
    assert "sparsekit_shapes" in json.loads((path / "config.json").read_text())
    return path


def test_load_pretrained_keeps_a_bfloat16_model_bfloat16(tmp_path):
    # with recorded shapes the model was built float32 whatever the saved dtype
    model = llama().to(torch.bfloat16)
    prune_structured(model, tokens(), 0.5, unit="ffn", allocation="global")
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    for (name, p), (_, r) in zip(model.named_parameters(), loaded.named_parameters()):
        assert r.dtype == p.dtype and torch.equal(r, p), name


def test_load_pretrained_refuses_null_recorded_shapes(saved_global, tmp_path):
    # was a transformers RuntimeError from from_pretrained's size-mismatch report
    path = tmp_path / "null"
    shutil.copytree(saved_global, path)
    config = json.loads((path / "config.json").read_text())
    config["sparsekit_shapes"] = None
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sparsekit_shapes must map parameter names to shapes"):
        load_pretrained(path)


def test_load_pretrained_names_an_unreadable_weights_file(saved_global, tmp_path):
    path = tmp_path / "garbage"
    shutil.copytree(saved_global, path)
    for f in path.glob("*.safetensors"):
        f.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors' is not a readable safetensors"):
        load_pretrained(path)


# -- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["top_k", "antidiagonal", "vertical_slash", "exact"])
def test_scored_patterns_of_meta_queries_name_them(name):
    q, k = qk()
    with pytest.raises(ValueError, match="q is on the meta device"):
        ATTENTION_PATTERNS.get(name)().block_mask(q.to("meta"), k.to("meta"), block_size=8)


def test_static_patterns_still_take_meta_queries():
    q, k = qk()
    assert Dense().block_mask(q.to("meta"), k.to("meta"), block_size=8).is_meta


def test_meta_masks_and_masses_are_named():
    q, k = qk()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="q is on the meta device"):
        tile_mass(q.to("meta"), k.to("meta"), block_size=8)
    with pytest.raises(ValueError, match="block_mask is on the meta device"):
        density(mask.to("meta"), 32, 32, block_size=8, causal=True)
    with pytest.raises(ValueError, match=r"block_mask must be on q's device \(cpu\), got meta"):
        mass_recall(q, k, mask.to("meta"), block_size=8)
    mass = torch.zeros(1, 4, 4, 4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"mass must be on q's device \(cpu\), got meta"):
        mass_recall(q, k, mask, block_size=8, mass=mass)
    with pytest.raises(ValueError, match="mask is on the meta device"):
        UserMask(mask.to("meta")).block_mask(q, k, block_size=8)


@pytest.mark.parametrize("name", ["top_k", "antidiagonal", "vertical_slash", "exact", "dense"])
def test_patterns_and_masses_of_an_empty_batch_are_empty(name):
    # tile_mass divided by batch · heads · kv_len; vertical_slash reshaped 0 entries to -1
    q, k = qk(batch=0)
    mask = ATTENTION_PATTERNS.get(name)().block_mask(q, k, block_size=8)
    assert mask.shape[0] in (0, 1) and mask.shape[2:] == (4, 4)
    assert tile_mass(q, k, block_size=8).shape == (0, 4, 4, 4)
    assert mass_recall(q, k, torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=8) == 0.0


def test_tile_mass_of_no_keys_is_empty():
    q, k = qk()
    assert tile_mass(q, k[:, :, :0], block_size=8).shape == (1, 4, 4, 0)


def test_a_softcapped_model_runs_as_its_eager_attention():
    # transformers' SDPA refuses a softcap: Gemma 2 failed on every call once switched
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=256, sliding_window=16)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    with torch.no_grad():
        expected = model(ids).logits
        expected_padded = model(ids, attention_mask=padding).logits
        attention.apply(model, "dense", block_size=8, min_length=0)
        try:
            torch.testing.assert_close(model(ids).logits, expected)
            torch.testing.assert_close(model(ids, attention_mask=padding).logits[1],
                                       expected_padded[1])
            assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (2, 42)
        finally:
            attention.remove(model)


def test_apply_to_a_model_transformers_cannot_switch_is_refused():
    # transformers only logged a warning: apply returned a model that never went sparse
    cfg = transformers.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, d_inner=48)
    model = transformers.XLNetLMHeadModel(cfg).eval()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="XLNetLMHeadModel does not run its attention through"):
        attention.apply(model, "dense", block_size=8)
    assert model.config._attn_implementation == before
    assert not any("sparse_attention" in vars(m) for m in model.modules())
    assert "_sparsekit_dense_attention" not in vars(model)


@pytest.mark.parametrize("length", [2**20, 2**40])
def test_density_checks_the_mask_before_counting_pairs_it_does_not_fit(length):
    # the pairs of 2**20 tokens in tiles of 8 (137 GB of int64) were allocated first
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"block_mask must be a bool tensor .* got torch.bool"):
        density(mask, length, length, block_size=8, causal=True)
    assert density(mask, 32, 32, block_size=8, causal=True) == 1.0


@pytest.mark.parametrize("norm", ["weight_norm reader", "weight_norm writer", "spectral_norm"])
def test_a_layer_with_a_computed_weight_keeps_its_width(norm):
    # shrink failed with a raw AttributeError for a parametrized reader, and cut a
    # parametrized writer's reader alone: a model that no longer ran
    model = Net().eval()
    if norm == "weight_norm reader":
        nn.utils.parametrizations.weight_norm(model.b)
    elif norm == "weight_norm writer":
        nn.utils.parametrizations.weight_norm(model.a)
    else:
        nn.utils.spectral_norm(model.b)
    assert dependency_groups(model) == []
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        small = shrink(model)
        torch.testing.assert_close(small(x), expected)
    assert small.a.out_features == small.b.in_features == 6


def test_ffn_writers_wider_than_their_reader_are_refused_before_anything_changes():
    # the group took its width from down_proj: the extra rows of gate_proj stayed
    model = llama()
    model.model.layers[1].mlp.gate_proj = nn.Linear(32, 50, bias=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="mlp.down_proj reads 48 inputs but mlp.gate_proj "
                                         "writes 50, mlp.up_proj writes 48"):
        prune_structured(model, None, 0.5, unit="ffn", method="magnitude")
    assert unchanged(model, before)
