"""Hostile inputs, round 23: LLM pruning, int8 quantization and reloading pruned models.

Each case was a raw error from inside PyTorch or transformers, or a silent wrong result
(an int8 grid that decodes to inf, a perplexity of NaN, a batch scored as one stream, a
shared layer calibrated on one block's inputs, integer tensors cast into weights, a stale
shard or a stale grid used without a word, a saved model that does not reload); each is
now a ``ValueError`` (or an ``ArgumentTypeError``) naming what is wrong, raised before
anything changes, or a correct result. Models are checked bit for bit after a refusal.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import sparsekit  # noqa: E402
from sparsekit import llm  # noqa: E402
from sparsekit import quantize as q  # noqa: E402
from sparsekit._checks import ArgumentTypeError  # noqa: E402

VOCAB, CONTEXT = 64, 64
F32_MAX = torch.finfo(torch.float32).max


def llama(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def qwen() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=CONTEXT)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=CONTEXT)
    return transformers.BertModel(cfg).eval()


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().flatten().view(torch.uint8) if t.numel() else t


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether ``model`` holds ``before``'s tensors bit for bit (NaN, -0.0 and dtypes too)."""
    after = model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].shape == v.shape and after[k].dtype == v.dtype
        and torch.equal(_bits(after[k]), _bits(v)) for k, v in before.items())


# -- quantize: scales whose codes decode beyond float32 -------------------------------------


def test_a_row_holding_float32s_largest_magnitude_decodes_finite():
    # Before: its scale, float32's max over 127, rounded up: code 127 decoded to inf.
    w = torch.tensor([[F32_MAX, 1.0, -F32_MAX / 2], [-F32_MAX, 0.0, 3.0]])
    codes, scales = q.quantize_int8(w)
    assert bool((scales <= q.MAX_SCALE).all())
    back = q.dequantize_int8(codes, scales)
    assert bool(back.isfinite().all())
    assert back[0, 0] == pytest.approx(F32_MAX, rel=1e-6)
    assert back[1, 0] == pytest.approx(-F32_MAX, rel=1e-6)
    assert bool(q.fake_quantize(w, scales).isfinite().all())


def test_max_scale_is_the_largest_whose_127_multiple_float32_holds():
    s = torch.tensor(q.MAX_SCALE, dtype=torch.float32)
    assert float(s) == q.MAX_SCALE
    assert bool(torch.isfinite(s * 127)) and not bool(torch.isfinite(torch.nextafter(
        s, torch.tensor(float("inf"))) * 127))


@pytest.mark.parametrize("value", [3e38, 1e37])
def test_scales_too_large_for_code_127_are_refused(value):
    # Before: accepted; code 127 (or any beyond 1) decoded to inf, NaN in every product.
    codes = torch.tensor([[127, -3], [1, 0]], dtype=torch.int8)
    scales = torch.tensor([1.0, value])
    shown = re.escape(f"{value:g}")
    with pytest.raises(ValueError, match=rf"^scales must be positive and finite .*at most "
                                         rf"2\.67939e\+36.*got scales\[1\] = {shown}$"):
        q.dequantize_int8(codes, scales)
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"scales must be positive and finite"):
        q.attach_scales(layer, scales)
    assert q.SCALE_NAME not in layer._buffers


def test_loading_a_scale_too_large_for_code_127_changes_nothing():
    # Before: load_state_dict's guard let it in; the layer's grid decoded to inf.
    layer = nn.Linear(4, 2)
    q.attach_scales(layer, torch.ones(2))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"].fill_(0.5)
    state[q.SCALE_NAME] = torch.tensor([1.0, 1e38])
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"state_dict\['weight_scale'\]\[1\] = 1e\+38"):
        layer.load_state_dict(state)
    assert unchanged(layer, before)


def test_dequantize_grid_names_codes_not_weight():
    # Before: "weight must be 2-D (out, in), got list ()" for grouped scales.
    with pytest.raises(ArgumentTypeError, match=r"^codes must be a 2-D floating-point \(16 "
                                                r"bits or more\) or integer tensor, got list"):
        q.dequantize_grid([[1, 2]], torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"^codes must be 2-D \(out, in\), got shape \(4,\)"):
        q.dequantize_grid(torch.ones(4, dtype=torch.int8), torch.ones(4, 2))


# -- perplexity ------------------------------------------------------------------------------


def test_perplexity_refuses_nan_logits():
    # Before: returned nan as the perplexity.
    model = llama()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^model: its logits on the window of tokens_or_text "
                                         r"from token \d+ hold \d+ NaN or \+inf value"):
        llm.perplexity(model, tokens(1, 40), seqlen=16)


def test_perplexity_of_a_label_with_minus_inf_logit_is_inf_not_an_error():
    model = llama()
    ids = tokens(1, 20)
    model.lm_head.register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, ids[0, 1:].unique(), float("-inf")))
    assert llm.perplexity(model, ids, seqlen=16) == float("inf")


@pytest.mark.parametrize("shape", [(2, 20), (1, 2, 20)])
def test_perplexity_refuses_a_batch_of_several_streams(shape):
    # Before: the rows were concatenated: each row's first tokens were scored as
    # continuing the row before (a padded batch's pad tokens too).
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^tokens_or_text must be one token stream, of "
                                         r"shape \(L,\) or \(1, L\), got a tensor of shape "
                                         + re.escape(str(tuple(shape)))):
        llm.perplexity(llama(), ids, seqlen=16)


def test_perplexity_takes_one_row_as_a_stream():
    model = llama()
    ids = tokens(1, 40)
    assert llm.perplexity(model, ids, seqlen=16) == llm.perplexity(model, ids[0], seqlen=16)


def test_perplexity_of_a_model_built_in_inference_mode():
    # Before: a raw "Inplace update to inference tensor outside InferenceMode" (restoring
    # buffers, which eval mode without autograd never changes).
    with torch.inference_mode():
        model = llama()
    ref = llama()
    ids = tokens(1, 40)
    assert llm.perplexity(model, ids, seqlen=16) == llm.perplexity(ref, ids, seqlen=16)


# -- llm.prune and prune_structured ------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda m: llm.prune(m, tokens()),
    lambda m: llm.prune(m, tokens(), quantize="int8"),
    lambda m: llm.prune_structured(m, tokens()),
    lambda m: llm.prune_structured(m, tokens(), unit="layers", amount=0.5),
], ids=["prune", "prune int8", "structured", "layers"])
def test_a_model_built_in_inference_mode_is_named(call):
    # Before: PyTorch's raw "Inplace update to inference tensor outside InferenceMode".
    with torch.inference_mode():
        model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^model: model\.embed_tokens\.weight is an inference "
                                         r"tensor .*or this call inside inference mode"):
        call(model)
    assert unchanged(model, before) and model.config.num_hidden_layers == 2


def test_a_model_built_in_inference_mode_prunes_inside_it():
    with torch.inference_mode():
        model = llama()
        masks = llm.prune(model, tokens())
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("share", ["layer", "block"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_shared_by_two_blocks_is_refused(share, method):
    # Before: pruned once, as the last block's layer, calibrated on that block's inputs only
    # (and a shared block pruned twice), without a word.
    model = llama()
    if share == "layer":
        model.model.layers[1].mlp.up_proj = model.model.layers[0].mlp.up_proj
    else:
        model.model.layers[1] = model.model.layers[0]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^targets: 'model\.layers\.0\.(mlp\.up_proj|self_attn"
                                         r"\.q_proj)\.weight' is one layer shared by blocks "
                                         r"\[0, 1\].*untie them first.*exclude="):
        llm.prune(model, tokens(), method=method)
    assert unchanged(model, before)


def test_a_shared_layer_left_out_with_exclude_prunes_the_rest():
    model = llama()
    model.model.layers[1].mlp.up_proj = model.model.layers[0].mlp.up_proj
    masks = llm.prune(model, tokens(), exclude="model.layers.0.mlp.up_proj")
    assert not any("up_proj" in name for name in masks.masks)
    assert len(masks.masks) == 12  # 14 layers, one shared (counted once), left out


@pytest.mark.parametrize("nsamples", [0, True, 2.0])
def test_prune_structured_checks_nsamples_without_calibration(nsamples):
    # Before: read only with calibration data: method="magnitude" took nsamples=0 silently.
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^nsamples must be an int ≥ 1, got {nsamples!r}$"):
        llm.prune_structured(model, None, method="magnitude", nsamples=nsamples)
    assert unchanged(model, before)


# -- llm.load_pretrained -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """A LLaMA pruned with per-block widths (config records sparsekit_shapes), saved by
    transformers' save_pretrained, and its model."""
    model = llama()
    llm.prune_structured(model, tokens(), 0.5, allocation="global")
    assert hasattr(model.config, "sparsekit_shapes")
    path = tmp_path_factory.mktemp("round23") / "pruned"
    model.save_pretrained(path)
    return path, model


def _copy(saved, tmp_path, name: str = "copy"):
    path = tmp_path / name
    shutil.copytree(saved[0], path)
    return path


@pytest.mark.parametrize("target", ["config.json", "model.safetensors", "link"])
def test_load_pretrained_refuses_a_path_that_is_no_directory(saved, tmp_path, monkeypatch,
                                                              target):
    # Before: FileNotFoundError "no such directory" for an existing file; a relative one
    # (no os.sep) was read as a config file, then "holds no *.safetensors weights", or
    # an OSError "not a valid JSON file".
    path = _copy(saved, tmp_path)
    if target == "link":
        os.symlink(tmp_path / "nowhere", path / "link")
    monkeypatch.chdir(path)
    for given in (target, str(path / target)):
        with pytest.raises(ValueError, match=rf"^path '{given}' is not a directory"):
            llm.load_pretrained(given)


def test_load_pretrained_refuses_an_empty_path():
    # Before: huggingface_hub's OSError "Repo id must use alphanumeric chars ...: ''".
    with pytest.raises(ValueError, match=r"^path is empty; .*'\.' for the working directory"):
        llm.load_pretrained("")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_load_pretrained_refuses_weights_saved_as_integers(saved, tmp_path, dtype):
    # Before: load_state_dict cast them into the float weights without a word.
    path = _copy(saved, tmp_path)
    file = path / "model.safetensors"
    state = safetensors_torch.load_file(file)
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'model\.norm\.weight' is saved as {dtype} but the "
                                         rf"model holds torch\.float32 \(1 tensor"):
        llm.load_pretrained(path)


def test_load_pretrained_takes_weights_of_another_float_dtype(saved, tmp_path):
    path = _copy(saved, tmp_path)
    file = path / "model.safetensors"
    state = safetensors_torch.load_file(file)
    safetensors_torch.save_file({k: v.double() for k, v in state.items()}, file,
                                metadata={"format": "pt"})
    model = llm.load_pretrained(path)
    assert unchanged(model, snapshot(saved[1]))


def test_load_pretrained_refuses_a_tensor_saved_in_two_files(saved, tmp_path):
    # Before: the file sorted last won: a stale copy replaced the saved weight silently.
    path = _copy(saved, tmp_path)
    norm = saved[1].model.norm.weight.detach()
    safetensors_torch.save_file({"model.norm.weight": torch.zeros_like(norm)},
                                path / "stale.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' is saved both in .*"
                                         r"model\.safetensors' and in .*stale\.safetensors' "
                                         r"\(1 tensor\(s\) twice\).*stale files"):
        llm.load_pretrained(path)


@pytest.fixture
def sharded(saved, tmp_path):
    path = tmp_path / "sharded"
    saved[1].save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_load_pretrained_reads_the_shards_its_index_lists(saved, sharded):
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    # a stray file the index does not name is not read (transformers ignores it too)
    safetensors_torch.save_file({"model.norm.weight": torch.zeros(32)},
                                sharded / "stray.safetensors", metadata={"format": "pt"})
    model = llm.load_pretrained(sharded)
    assert unchanged(model, snapshot(saved[1]))


def test_load_pretrained_names_a_shard_missing_from_its_index(sharded):
    # Before: its tensors were reported as "missing" from "the recorded shapes".
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(ValueError, match=rf"index\.json' lists the shard '{shards[-1].name}' "
                                         rf"\(1 of {len(shards)} missing\).*save the model "
                                         "again"):
        llm.load_pretrained(sharded)


@pytest.mark.parametrize("content", ['{"weight_map": 3}', "[", '{"weight_map": {"a": "../x"}}',
                                     '{"weight_map": {}}'])
def test_load_pretrained_names_an_index_that_is_no_index(sharded, content):
    (sharded / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=r"index\.json' (is no safetensors index|names no "
                                         r"shard files)"):
        llm.load_pretrained(sharded)


# -- sparsekit.save_pretrained / from_pretrained -------------------------------------------


@pytest.mark.parametrize("build, kwargs", [
    (llama, dict(allocation="global")),
    (llama, dict(unit=("ffn", "heads"), method="flap", allocation="adaptive")),
    (qwen, dict(unit="heads", allocation="global", amount=0.25)),
    (bert, dict(unit="heads", amount=0.5)),
], ids=["ffn global", "flap biases", "gqa heads global", "bert heads"])
def test_from_pretrained_reloads_a_model_pruned_to_per_block_shapes(tmp_path, build, kwargs):
    # Before: save_pretrained wrote it, from_pretrained refused its own save ("the model it
    # describes has ... of shape (34, 32), but sparsekit.safetensors holds (30, 32)").
    model = build()
    llm.prune_structured(model, tokens(), **kwargs)
    assert hasattr(model.config, "sparsekit_shapes")
    sparsekit.save_pretrained(model, tmp_path / "m")
    back = sparsekit.from_pretrained(tmp_path / "m")
    assert unchanged(back, snapshot(model))
    x = tokens()
    with torch.no_grad():
        assert torch.equal(back(x)[0], model(x)[0])


def test_from_pretrained_names_recorded_shapes_that_do_not_fit(tmp_path):
    model = llama()
    llm.prune_structured(model, tokens(), 0.5, allocation="global")
    sparsekit.save_pretrained(model, tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    data = json.loads(config.read_text())
    name = next(iter(data["sparsekit_shapes"]))
    data["sparsekit_shapes"][name] = [10**6, 32]
    config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"^directory: config\.json's sparsekit_shapes records "
                                         rf"'{name}' as \[1000000, 32\]; expected"):
        sparsekit.from_pretrained(tmp_path / "m")


def test_int8_dense_save_of_a_weight_moved_off_its_grid_is_not_clamped(tmp_path):
    # Before: the weight was rounded to the grid llm.prune recorded, though fine-tuning had
    # moved it: values beyond that grid's range were clamped to code ±127 (errors of 0.15
    # where a fresh grid's half step is 0.001), without a word.
    model = llama()
    llm.prune(model, tokens(), sparsity=0.0, quantize="int8")
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(1e-3)
    sparsekit.save_pretrained(model, tmp_path / "m", dense_dtype="int8")
    back = sparsekit.from_pretrained(tmp_path / "m").model.layers[0].mlp.up_proj.weight
    half_step = layer.weight.detach().abs().amax(1, keepdim=True) / 254
    assert bool(((back - layer.weight.detach()).abs() <= half_step * (1 + 1e-5)).all())


def test_int8_dense_save_of_a_weight_on_its_grid_stays_exact(tmp_path):
    model = llama()
    llm.prune(model, tokens(), sparsity=0.0, quantize="int8", group_size=16)
    sparsekit.save_pretrained(model, tmp_path / "m", dense_dtype="int8")
    back = sparsekit.from_pretrained(tmp_path / "m").state_dict()
    on_grid = [k.removesuffix("_scale") for k in back if k.endswith(".weight_scale")]
    assert len(on_grid) == 14
    for key in on_grid:  # the embeddings and lm_head get grids of their own: lossy
        for k in (key, key + "_scale"):
            assert torch.equal(_bits(back[k]), _bits(model.state_dict()[k])), k


# -- embedding_similarity -------------------------------------------------------------------


class _CharTokenizer:
    """A padded batch of character ids (1 to 60), as a Hugging Face tokenizer returns it."""

    def __call__(self, sentences, padding=True, truncation=True, return_tensors="pt"):
        width = max(len(s) for s in sentences)
        ids = torch.tensor([[ord(c) % 60 + 1 for c in s] + [0] * (width - len(s))
                            for s in sentences])
        mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in sentences])[:, None])
        return {"input_ids": ids, "attention_mask": mask.long()}


SENTENCES = ["a pruned model", "its dense twin"]


def test_embedding_similarity_of_a_model_built_in_inference_mode():
    # Before: a raw "Inplace update to inference tensor outside InferenceMode" (restoring
    # buffers, which eval mode without autograd never changes).
    with torch.inference_mode():
        model = bert()
    assert llm.embedding_similarity(model, _CharTokenizer(), SENTENCES, bert()) == \
        pytest.approx(1.0)


@pytest.mark.parametrize("which", ["model", "dense_model"])
def test_embedding_similarity_refuses_nan_embeddings(which):
    # Before: returned nan as the similarity.
    models = {"model": bert(), "dense_model": bert()}
    with torch.no_grad():
        models[which].encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"^{which}'s sentence embeddings must be finite, got "
                                         rf"64 NaN or inf among 64 values; check {which}'s "
                                         "parameters"):
        llm.embedding_similarity(models["model"], _CharTokenizer(), SENTENCES,
                                 models["dense_model"])


# -- prune_structured of a model llm.prune quantized -----------------------------------------


@pytest.mark.parametrize("unit", ["ffn", "heads", ("ffn", "heads")])
def test_structured_pruning_cuts_the_int8_scales_with_their_rows(tmp_path, unit):
    # Before: the weights lost rows, their weight_scale kept them ((64,) scales for 32
    # rows): the model's grids no longer fit its layers, and its save did not reload.
    model = llama()
    llm.prune(model, tokens(), quantize="int8")
    llm.prune_structured(model, tokens(), 0.5, unit=unit, method="magnitude")
    layers = [m for m in model.modules() if q.attached_scales(m) is not None]
    assert len(layers) == 14
    for layer in layers:
        scales = q.attached_scales(layer)
        assert scales.shape == layer.weight.shape[:1]
        assert torch.equal(q.fake_quantize(layer.weight, scales), layer.weight)
    sparsekit.save_pretrained(model, tmp_path / "m")
    assert unchanged(sparsekit.from_pretrained(tmp_path / "m"), snapshot(model))


@pytest.mark.parametrize("unit, layer", [("ffn", "mlp.down_proj"), ("heads", "self_attn.o_proj")])
def test_structured_pruning_refuses_to_split_groups_of_int8_scales(unit, layer):
    # Before: the inputs were cut out of the middle of the scales' groups: the weight lay on
    # no grid of equal groups, its (rows, groups) scales of the old width kept.
    model = llama()
    llm.prune(model, tokens(), quantize="int8", group_size=8)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^'model\.layers\.0\.{layer}' carries int8 scales "
                                         r"per group of inputs .*splits those groups.*the "
                                         "model was not changed"):
        llm.prune_structured(model, tokens(), 0.5, unit=unit, method="flap")
    assert unchanged(model, before) and model.config.intermediate_size == 64


# -- prune_layer and sparsegpt_prune -------------------------------------------------------------


def test_sparsegpt_takes_a_hessian_of_any_strides():
    # Before: a raw "view size is not compatible with input tensor's size and stride" from
    # the symmetry check of a transposed (symmetric) H.
    from sparsekit.llm.sparsegpt import sparsegpt_prune

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    H = 2 * x.T @ x
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    for h in (H.t(), H.mT, torch.stack([H, H], -1)[..., 0]):
        assert not h.is_contiguous() or h is H
        got, keep = sparsegpt_prune(W, h, 0.5)
        want = sparsegpt_prune(W, h.contiguous(), 0.5)
        assert torch.equal(got, want[0]) and torch.equal(keep, want[1])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_layer_refuses_statistics_of_no_inputs(method):
    # Before: SparseGPT zeroed every weight (all inputs "dead") and Wanda kept arbitrary ones
    # (all scores 0), the masks saying half were kept.
    from sparsekit.llm.methods import METHODS, prune_layer
    from sparsekit.observe import InputStats

    with pytest.raises(ValueError, match=r"^stats: holds no input rows \(the calibration never "
                                         r"ran the layer\)"):
        prune_layer(METHODS.get(method), torch.randn(4, 8), InputStats(8, gram=True), 0.5,
                    "unstructured")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_layer_refuses_statistics_of_non_finite_inputs(method):
    """Wanda ranked NaN input norms as they came and returned a half-kept mask without a
    word (SparseGPT refused its NaN Hessian); both name the statistics."""
    from sparsekit.llm.methods import METHODS, prune_layer
    from sparsekit.observe import InputStats

    stats = InputStats(8, gram=True)
    stats.add(torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match=r"stats.sq must be finite, got 8 NaN or inf"):
        prune_layer(METHODS.get(method), torch.randn(4, 8), stats, 0.5, "unstructured")


def test_prune_layer_names_a_float64_weight_int8_cannot_hold():
    # Before: "weight holds NaN or infinite values" for a finite W (its float32 copy was not).
    from sparsekit.llm.methods import METHODS, prune_layer

    W = torch.full((2, 4), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^W holds a magnitude of 1e\+300, beyond float32's "
                                         r"largest .*or quantize=None$"):
        prune_layer(METHODS.get("magnitude"), W, None, 0.5, "unstructured", "int8")
    assert prune_layer(METHODS.get("magnitude"), W, None, 0.5, "unstructured")[0].abs().max() \
        == 1e300


@pytest.mark.parametrize("dtype, value, scale", [(torch.float16, 65504.0, 1000.0),
                                                 (torch.float16, -65000.0, 3000.0)])
def test_fake_quantize_refuses_grid_values_half_precision_cannot_hold(dtype, value, scale):
    # Before: the weight, rounded up to the next code, became inf in its dtype silently.
    w = torch.tensor([[1.0, value]], dtype=dtype)
    with pytest.raises(ValueError, match=rf"^scales: weight\[0, 1\] = .* beyond {dtype}'s "
                                         r"range .*int8_scales\(weight\)"):
        q.fake_quantize(w, torch.tensor([scale]))
    assert bool(q.fake_quantize(w, q.int8_scales(w)).isfinite().all())


# -- load_pretrained of a model llm.prune quantized ------------------------------------------


@pytest.mark.parametrize("structured", [False, True], ids=["plain", "per-block shapes"])
def test_load_pretrained_keeps_the_int8_grids_of_a_quantized_model(tmp_path, structured):
    # Before: from_pretrained dropped every weight_scale as an unexpected key (the model no
    # longer said its weights lie on an int8 grid); with recorded shapes the directory was
    # refused ("do not fit the recorded shapes (unexpected: [...weight_scale, ...])").
    model = llama()
    group = None if structured else 16  # a grid per group of inputs cannot lose inputs
    llm.prune(model, tokens(), quantize="int8", group_size=group)
    if structured:
        llm.prune_structured(model, tokens(), 0.5, allocation="global", method="magnitude")
        assert hasattr(model.config, "sparsekit_shapes")
    model.save_pretrained(tmp_path / "m")
    back = llm.load_pretrained(tmp_path / "m")
    assert unchanged(back, snapshot(model))
    layer = back.model.layers[0].mlp.up_proj
    grid = q.attached_scales(layer)
    assert torch.equal(q.fake_quantize(layer.weight, grid, group), layer.weight)
    state = {k: v.clone() for k, v in back.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight_scale"].zero_()
    at = r"\[\[0, 0\]\]" if group else r"\[0\]"
    with pytest.raises(ValueError, match=rf"weight_scale'\]{at} = 0"):
        back.load_state_dict(state)  # the loaded grids are guarded


def test_load_pretrained_names_saved_scales_that_do_not_fit_their_layer(saved, tmp_path):
    path = _copy(saved, tmp_path)
    file = path / "model.safetensors"
    state = safetensors_torch.load_file(file)
    state["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(3)
    safetensors_torch.save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^path: 'model\.layers\.0\.mlp\.up_proj\.weight_scale'"
                                         r" in .* is no int8 grid of its layer \(scales must"):
        llm.load_pretrained(path)
