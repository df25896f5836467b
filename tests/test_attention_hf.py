"""The Hugging Face switch: transformers' attention interface onto block-sparse patterns."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsekit
from sparsekit.attention import SinkWindow, SparseAttention, apply, hf, register, remove


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def ids(n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(n))


def test_full_mask_gives_the_sdpa_outputs_in_prefill_and_generate(llama, monkeypatch):
    model = copy.deepcopy(llama)
    x = ids(100, batch=2)
    with torch.no_grad():
        dense = model(x).logits
        dense_gen = model.generate(x, max_new_tokens=6, do_sample=False)
        apply(model, "dense", block_size=16, min_length=0)
        assert model.config._attn_implementation == "sparsekit"
        calls, real = [], hf.block_sparse_attention
        monkeypatch.setattr(hf, "block_sparse_attention",
                            lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
        sparse = model(x).logits
        sparse_gen = model.generate(x, max_new_tokens=6, do_sample=False)
    assert 100 in calls and 1 in calls  # prefill and decode both ran the sparse kernel
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse_gen, dense_gen)


def test_a_sparse_pattern_changes_the_output_and_remove_restores_sdpa(llama):
    model = copy.deepcopy(llama)
    x = ids(128)
    with torch.no_grad():
        dense = model(x).logits
        apply(model, SinkWindow(sinks=0, window=16), block_size=16, min_length=0)
        sparse = model(x).logits
        remove(model)
        back = model(x).logits
    assert not torch.allclose(sparse, dense, atol=1e-3)
    assert torch.equal(back, dense) and model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, hf.ATTRIBUTE) for m in model.modules())


def test_short_inputs_and_padding_fall_back_to_sdpa(llama):
    model = copy.deepcopy(llama)
    x = ids(64, batch=2)
    pad = torch.ones_like(x)
    pad[0, :5] = 0
    with torch.no_grad():
        dense, padded = model(x).logits, model(x, attention_mask=pad).logits
        apply(model, SinkWindow(sinks=0, window=8), block_size=16, min_length=65)
        torch.testing.assert_close(model(x).logits, dense)  # 64 keys < min_length
        apply(model, SinkWindow(sinks=0, window=8), block_size=16, min_length=0)
        torch.testing.assert_close(model(x, attention_mask=pad).logits, padded)


def test_config_switch_after_register_uses_the_defaults(llama):
    model = copy.deepcopy(llama)
    x = ids(40)
    register()
    with torch.no_grad():
        dense = model(x).logits
        model.config._attn_implementation = "sparsekit"
        torch.testing.assert_close(model(x).logits, dense)  # 40 keys < two blocks: dense


def test_bad_arguments_fail_before_the_model_changes(llama):
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match="unknown pattern 'nope'"):
        apply(model, "nope")
    with pytest.raises(ValueError, match="block_size must be an int ≥ 1, got 0"):
        apply(model, "dense", block_size=0)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        apply(model, "antidiagonal", threshold=2.0)
    with pytest.raises(ValueError, match="min_length must be an int ≥ 0"):
        apply(model, "dense", min_length=-1)
    with pytest.raises(ValueError, match="multiple of stride=8, got 12"):
        apply(model, "antidiagonal", block_size=12)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="pattern must be an AttentionPattern"):
        SparseAttention(pattern="dense")
    with pytest.raises(TypeError, match="break_even must be a BreakEven, got float"):
        SparseAttention(break_even=0.1)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, hf.ATTRIBUTE) for m in model.modules())


def test_reachable_from_the_package():
    assert sparsekit.attention.apply is apply
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sparsekit.attention.nope  # noqa: B018
