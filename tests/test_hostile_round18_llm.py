"""Hostile inputs, round 18: LLM pruning and quantization (``llm.prune``, its calibration,
``perplexity`` / ``embedding_similarity``, ``save_pretrained`` / ``from_pretrained``).

- a token tensor on the meta device (``llm.prune``'s ``calibration``, ``perplexity``'s
  ``tokens_or_text``) failed in the vocabulary check with a raw ``Tensor.item()``
  ``RuntimeError``;
- ``llm.prune`` of a model on the meta device (not loaded yet) failed with a raw
  ``Tensor.item()`` ``RuntimeError`` (its embeddings alone on meta: an error blaming the
  ``inputs``); so did ``perplexity`` and ``embedding_similarity``;
- ``llm.prune`` (magnitude, Wanda) of a float64 model rounded every kept weight to float32,
  silently: the layer was pruned on a float32 copy (``sparsekit.prune`` keeps them exact);
- ``quantize.fake_quantize`` of an integer weight cast the grid's (fractional) values back
  to integers, truncating them off the grid (7.83 to 7) silently: it returns float32;
- ``llm.methods.prune_layer`` took a pattern string (``"2:4"``) and pruned unstructured,
  silently; a method name, a list ``W`` or statistics without the Gram matrix were raw
  ``AttributeError`` or ``RuntimeError`` errors, a sparsity of 1.5 a bare "k must be ≥ 0", NaN a
  raw conversion error, and a 1-D or NaN ``W`` was pruned;
- a targeted layer the calibration never runs (no input rows: a branch not taken) was
  pruned from nothing: SparseGPT zeroed every weight of it (its Hessian all "dead"
  inputs) while the returned mask said half were kept, Wanda kept arbitrary ones (all
  scores 0); it is refused, naming the layer, before anything changes;
- ids that a model without a config (no vocabulary to check them against) cannot embed
  were an error naming ``inputs``, an argument ``llm.prune`` does not have;
- ``batch_size`` as a NumPy int passed the check and failed in ``Tensor.split`` with a raw
  ``TypeError``;
- ``llm.prune(quantize="int8")`` of a model whose targeted layer already has a
  ``weight_scale`` that is not int8 scales (a compressed-tensors parameter) pruned and
  rounded every block and only then failed to attach the grid: the model changed, the
  masks were lost and the error named no layer;
- an error from outside the library in block k (a hook, ``progress``, ``KeyboardInterrupt``)
  left blocks 0 to k - 1 pruned without a word: it now warns which are; and a block moved to
  ``device`` stayed there when its block failed (the model split across devices, though
  the error said the model was not changed);
- ``embedding_similarity``: token ids past the model's vocabulary were a bare
  ``IndexError``, a sentence longer than the model's context (a tokenizer that does not
  truncate to it, such as ``byte_tokenizer``) or of no token a raw ``RuntimeError`` — or,
  with other sentences in the batch, a silent cosine of 0 between identical models —,
  models of different widths a raw broadcasting ``RuntimeError``, a tokenizer returning
  no batch a raw ``TypeError`` and one returning a plain dict a raw ``AttributeError``;
- ``from_pretrained`` of a directory whose ``generation_config.json`` is a JSON list or
  holds a value ``GenerationConfig`` refuses was a raw ``TypeError`` / ``ValueError`` not
  naming the file;
- ``from_pretrained`` of a ``config.json`` whose sizes were changed built (allocated and
  initialised) the model at those sizes before the weights' shapes were compared: an
  ``intermediate_size`` of ``10**8`` took tens of gigabytes or the process; the sizes are
  now checked on a skeleton on the meta device, naming ``config.json`` and the tensor;
- ``save_pretrained`` into a directory holding ``transformers``' own weights (a
  ``model.save_pretrained`` there before) left them beside the new ``config.json``: a
  concrete class (``LlamaForCausalLM.from_pretrained``), which only warns about the
  refusal ``model_type``, built its default-sized model and loaded those stale weights —
  silently for a model of the default size, else an out-of-memory kill or a size error;
  it is refused before anything is written;
- ``save_pretrained`` into ``""`` wrote into the working directory; a NUL character was a
  ``ValueError`` naming nothing, a dangling link or a path under a file a raw ``OSError``;
  a model on the meta device failed with a raw ``NotImplementedError`` after the directory
  was created.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit._checks import ArgumentTypeError
from sparsekit.llm.methods import METHODS, prune_layer
from sparsekit.observe import InputStats
from sparsekit.pretrained import WEIGHTS_NAME
from sparsekit.quantize import dequantize_int8, fake_quantize, int8_scales, quantize_int8

transformers = pytest.importorskip("transformers")

from sparsekit import llm  # noqa: E402

VOCAB, CONTEXT = 64, 64


def llama(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                   **kwargs)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert(hidden: int = 32, vocab: int = 300) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=CONTEXT)
    return transformers.BertModel(cfg).eval()


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def byte_tokenizer():
    tok = llm.byte_tokenizer()
    tok.pad_token = tok.convert_ids_to_tokens(0)
    return tok


# -- token tensors and models on the meta device ----------------------------------------------


@pytest.mark.parametrize("call, name", [
    (lambda m: llm.prune(m, tokens().to("meta")), "calibration"),
    (lambda m: llm.prune(m, torch.arange(40).to("meta"), seqlen=8), "calibration"),
    (lambda m: llm.perplexity(m, tokens().to("meta"), seqlen=8), "tokens_or_text"),
], ids=["prune 2-D", "prune stream", "perplexity"])
def test_token_tensor_on_the_meta_device_is_named(call, name):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{name} is on the meta device"):
        call(model)
    assert unchanged(model, before)


@pytest.mark.parametrize("build, call", [
    (llama, lambda m: llm.prune(m, tokens())),
    (llama, lambda m: llm.perplexity(m, tokens(), seqlen=8)),
    (bert, lambda m: llm.embedding_similarity(m, byte_tokenizer(), ["hi"], bert())),
    (bert, lambda m: llm.embedding_similarity(bert(), byte_tokenizer(), ["hi"], m)),
], ids=["prune", "perplexity", "embedding_similarity model", "embedding_similarity dense"])
def test_a_model_on_the_meta_device_is_named(build, call):
    with pytest.raises(ValueError, match=r"model: .*weight is on the meta device"):
        call(build().to("meta"))


def test_embeddings_alone_on_the_meta_device_are_named_not_blamed_on_the_inputs():
    model = llama()
    model.model.embed_tokens.to("meta")
    with pytest.raises(ValueError, match=r"model: model\.embed_tokens\.weight is on the meta"):
        llm.prune(model, tokens())


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Toy(nn.Module):
    """A transformer-like model without a config: no vocabulary to check ids against."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.blocks = nn.Embedding(50, 16), nn.ModuleList([_Block(), _Block()])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return x


def test_ids_a_model_without_config_cannot_embed_are_blamed_on_calibration():
    model = _Toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match="^calibration: the model cannot run on it: index"):
        llm.prune(model, torch.arange(32).view(4, 8) + 40, seqlen=8)
    assert unchanged(model, before)


# -- float64 models ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_float64_model_keeps_its_kept_weights_exactly(method):
    model = llama().double()
    with torch.no_grad():  # values float32 cannot hold exactly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-12)
    before = snapshot(model)
    masks = llm.prune(model, tokens(), method=method)
    for name, keep in masks.masks.items():
        after = model.state_dict()[name]
        assert after.dtype == torch.float64
        assert torch.equal(after[keep], before[name][keep]), name
        assert not after[~keep].any(), name


def test_float64_model_quantizes_onto_its_float32_grid():
    model = llama().double()
    llm.prune(model, tokens(), method="wanda", quantize="int8", group_size=8)
    layer = model.model.layers[0].mlp.up_proj
    on_grid = fake_quantize(layer.weight.detach().float(), layer.weight_scale, 8)
    assert layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, on_grid.double())


@pytest.mark.parametrize("weight, scales", [
    (torch.arange(0, 1000, 7).view(1, -1), None),
    (torch.tensor([[3, -5, 100, 127]], dtype=torch.int8), torch.tensor([0.5])),
], ids=["int64 on its own grid", "int8 on a finer grid"])
def test_fake_quantize_of_an_integer_weight_lies_on_the_grid(weight, scales):
    scales = int8_scales(weight) if scales is None else scales
    codes, _ = quantize_int8(weight, scales)
    values = fake_quantize(weight, scales)
    assert values.dtype == torch.float32
    assert torch.equal(values, dequantize_int8(codes, scales))


# -- prune_layer ------------------------------------------------------------------------------


def _stats(features: int = 16, gram: bool = True) -> InputStats:
    stats = InputStats(features, gram=gram)
    stats.add(torch.randn(32, features, generator=torch.Generator().manual_seed(0)))
    return stats


def test_prune_layer_reads_a_pattern_string():
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    _, keep, _ = prune_layer(METHODS.get("wanda"), W, _stats(), 0.5, "2:4")
    assert torch.equal(keep.view(8, 4, 4).sum(-1), torch.full((8, 4), 2))


@pytest.mark.parametrize("args, error, match", [
    (("wanda", torch.randn(8, 16), _stats(), 0.5, "unstructured"), ArgumentTypeError,
     "method must be a Method"),
    ((METHODS.get("magnitude"), torch.randn(8, 16), None, 1.5, "unstructured"), ValueError,
     r"sparsity must be in \[0, 1\), got 1.5"),
    ((METHODS.get("magnitude"), torch.randn(8, 16), None, float("nan"), "unstructured"),
     ValueError, "sparsity must be in"),
    ((METHODS.get("magnitude"), [[1.0, 2.0]], None, 0.5, "unstructured"), ArgumentTypeError,
     "W must be a real floating-point tensor, got list"),
    ((METHODS.get("magnitude"), torch.randn(16), None, 0.5, "unstructured"), ValueError,
     r"W must be a 2-D \(out, in\) weight"),
    ((METHODS.get("magnitude"), torch.full((4, 4), float("nan")), None, 0.5, "unstructured"),
     ValueError, "W holds non-finite values"),
    ((METHODS.get("magnitude"), torch.randn(4, 4, device="meta"), None, 0.5, "unstructured"),
     ValueError, "W is on the meta device"),
    ((METHODS.get("sparsegpt"), torch.randn(8, 16), _stats(gram=False), 0.5, "unstructured"),
     ValueError, "stats: this method needs the inputs' Gram matrix"),
    ((METHODS.get("wanda"), torch.randn(8, 16), {"norms": 1}, 0.5, "unstructured"),
     ValueError, "stats: this method needs the input statistics .* got dict"),
], ids=["method name", "sparsity 1.5", "sparsity NaN", "W list", "W 1-D", "W NaN", "W meta",
        "no Gram matrix", "stats dict"])
def test_prune_layer_checks_its_arguments(args, error, match):
    with pytest.raises(error, match=match):
        prune_layer(*args)


# -- a layer the calibration never runs -------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_layer_the_calibration_never_runs_is_refused(method):
    model = llama()
    for b in model.model.layers:
        b.unused = nn.Linear(32, 32)  # in every block, called by none
    before = snapshot(model)
    name = "model.layers.0.unused.weight"
    with pytest.raises(ValueError, match=f"calibration: '{name}' received no inputs.*exclude="
                                         r"'model\.layers\.0\.unused'.*model was not changed"):
        llm.prune(model, tokens(), method=method)
    assert unchanged(model, before)
    masks = llm.prune(model, tokens(), method=method, exclude="model.layers.*.unused")
    assert name not in masks.masks
    assert torch.equal(model.model.layers[0].unused.weight, before[name])


def test_a_layer_never_run_in_a_later_block_says_which_blocks_are_pruned():
    model = llama()
    model.model.layers[1].unused = nn.Linear(32, 32)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.unused\.weight' received no "
                                         "inputs.*blocks 0 to 0 were already pruned"):
        llm.prune(model, tokens(), method="sparsegpt")
    assert torch.equal(model.model.layers[1].unused.weight != 0,
                       torch.ones(32, 32, dtype=torch.bool))


def test_magnitude_prunes_a_layer_the_calibration_never_runs():
    model = llama()
    model.model.layers[0].unused = nn.Linear(32, 32)
    model.model.layers[1].unused = nn.Linear(32, 32)
    masks = llm.prune(model, tokens(), method="magnitude")
    kept = masks.masks["model.layers.0.unused.weight"]
    assert kept.float().mean() == 0.5
    assert model.model.layers[0].unused.weight[kept].all()


# -- NumPy integers ---------------------------------------------------------------------------


def test_numpy_batch_size_is_taken():
    a, b = llama(), llama()
    ma = llm.prune(a, tokens(), batch_size=np.int64(2))
    mb = llm.prune(b, tokens(), batch_size=2)
    assert all(torch.equal(ma.masks[k], mb.masks[k]) for k in mb.masks)


# -- a weight_scale that is not int8 scales ---------------------------------------------------


@pytest.mark.parametrize("foreign", [nn.Parameter(torch.ones(64)), 5.0],
                         ids=["parameter", "attribute"])
def test_a_foreign_weight_scale_is_refused_before_pruning(foreign):
    model = llama()
    model.model.layers[1].mlp.up_proj.weight_scale = foreign
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"quantize='int8': the layer of "
                                         r"'model\.layers\.1\.mlp\.up_proj\.weight' already "
                                         "has a weight_scale"):
        llm.prune(model, tokens(), quantize="int8")
    assert unchanged(model, before)


# -- interrupted pruning ----------------------------------------------------------------------


def test_an_error_from_outside_in_a_later_block_says_which_blocks_are_pruned():
    model = llama()
    calls = []  # the capture's whole first pass (it counts each block's calls) runs block 1

    def fail_when_replayed(module, args):
        calls.append(1)
        if len(calls) > 1:
            raise ZeroDivisionError("division by zero")

    model.model.layers[1].register_forward_pre_hook(fail_when_replayed)
    stated = r"stopped after 1 of 2 blocks \(ZeroDivisionError\): blocks 0 to 0 were already"
    with pytest.warns(RuntimeWarning, match=stated), pytest.raises(ZeroDivisionError):
        llm.prune(model, tokens())


def test_a_failing_progress_callback_says_which_blocks_are_pruned():
    def progress(done: int, total: int) -> None:
        raise KeyboardInterrupt

    stated = r"after 1 of 2 blocks \(KeyboardInterrupt\)"
    with pytest.warns(RuntimeWarning, match=stated), pytest.raises(KeyboardInterrupt):
        llm.prune(llama(), tokens(), progress=progress)


def test_an_error_in_the_first_block_changes_nothing_and_does_not_warn():
    model = llama()
    model.model.layers[0].register_forward_pre_hook(lambda module, args: 1 / 0)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ZeroDivisionError):
            llm.prune(model, tokens())
    assert unchanged(model, before)


def test_a_block_that_fails_goes_back_to_its_device():
    model = llama()
    model.model.layers[0].unused = nn.Linear(32, 32)
    model.model.layers[1].unused = nn.Linear(32, 32)
    block = model.model.layers[0]
    moves: list[torch.device] = []
    move = block.to

    def spy(*args, **kwargs):  # the test has one device: record where the block is sent
        moves.append(torch.device(args[0]))
        return move(*args, **kwargs)

    block.to = spy
    with pytest.raises(ValueError, match="received no inputs"):
        llm.prune(model, tokens(), method="wanda", device="cpu")
    assert len(moves) == 2 and moves[-1] == torch.device("cpu")  # there and back


# -- embedding_similarity ---------------------------------------------------------------------


@pytest.mark.parametrize("model, sentences, dense, match", [
    (lambda: llama(), ["hello"], lambda: bert(), r"sentences holds token id \d+, outside the "
                                                 r"model's vocabulary; accepted: ids in \[0, 64\)"),
    (lambda: bert(), ["hi", "x" * 200], lambda: bert(),
     r"sentences: 'x+' tokenizes to 200 tokens; accepted: 1 to 64"),
    (lambda: bert(), [""], lambda: bert(), "sentences: '' tokenizes to 0 tokens"),
    (lambda: bert(), ["", "ab"], lambda: bert(), "sentences: '' tokenizes to 0 tokens"),
    (lambda: bert(), ["hello"], lambda: bert(hidden=16),
     "dense_model embeds in 16 dimensions, model in 32"),
], ids=["id past the vocabulary", "past the context", "no token", "no token among others",
        "another width"])
def test_embedding_similarity_refuses_what_the_models_cannot_embed(model, sentences, dense,
                                                                  match):
    with pytest.raises(ValueError, match=match):
        llm.embedding_similarity(model(), byte_tokenizer(), sentences, dense())


def test_embedding_similarity_names_a_tokenizer_returning_no_batch():
    with pytest.raises(ValueError, match=r"tokenizer: tokenizing sentences failed \(TypeError"):
        llm.embedding_similarity(bert(), lambda s, **k: None, ["hi"], bert())


def test_embedding_similarity_takes_a_tokenizer_returning_a_plain_dict():
    tok = byte_tokenizer()

    def plain(sentences, **kwargs):  # its batch has no .to(device)
        return dict(tok(sentences, **kwargs))

    assert llm.embedding_similarity(bert(), plain, ["ab", "hello"], bert()) == pytest.approx(1.0)


def test_embedding_similarity_of_a_model_to_itself_is_one():
    assert llm.embedding_similarity(bert(), byte_tokenizer(), ["ab", "hello"],
                                    bert()) == pytest.approx(1.0)


# -- save_pretrained / from_pretrained --------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = llama()
    masks = llm.prune(model, tokens(), quantize="int8")
    return model, sparsekit.save_pretrained(model, tmp_path_factory.mktemp("s") / "m", masks)


@pytest.mark.parametrize("content", ["[1, 2]", '{"max_new_tokens": -5}'],
                         ids=["a list", "a refused value"])
def test_from_pretrained_names_a_bad_generation_config(saved, tmp_path, content):
    import shutil

    target = shutil.copytree(saved[1], tmp_path / "m")
    (target / "generation_config.json").write_text(content)
    with pytest.raises(ValueError, match=r"generation_config\.json describes no generation "
                                         "config"):
        sparsekit.from_pretrained(target)


def test_from_pretrained_reloads_an_int8_pruned_model_bit_identically(saved):
    model, path = saved
    back = sparsekit.from_pretrained(path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_pretrained_refuses_odd_directories(saved, tmp_path, monkeypatch):
    model = saved[0]
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    monkeypatch.chdir(tmp_path)
    cases = [("", "is empty"), (str(tmp_path / "a\0b"), "NUL"),
             (tmp_path / "dangling", "exists and is not a directory"),
             (tmp_path / "file" / "sub", "lies under .*file', a file"),
             (tmp_path / "dangling" / "sub", "lies under .*dangling', a broken symbolic link")]
    for directory, what in cases:
        with pytest.raises(ValueError, match=f"directory .*{what}"):
            sparsekit.save_pretrained(model, directory)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


@pytest.mark.parametrize("stale", ["model.safetensors", "pytorch_model.bin.index.json"])
def test_save_pretrained_refuses_a_directory_holding_transformers_weights(saved, tmp_path,
                                                                          stale):
    (tmp_path / stale).write_bytes(b"dense weights of an earlier model.save_pretrained")
    with pytest.raises(ValueError, match=f"directory .* holds transformers weights "
                                         rf"\({stale}\), which a transformers class would"):
        sparsekit.save_pretrained(saved[0], tmp_path)
    assert os.listdir(tmp_path) == [stale]


def test_save_pretrained_of_a_meta_model_is_refused_before_the_directory(tmp_path):
    with pytest.raises(ValueError, match=r"model: .* is on the meta device"):
        sparsekit.save_pretrained(llama().to("meta"), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_save_pretrained_into_the_working_directory_by_dot(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sparsekit.save_pretrained(saved[0], ".")
    assert (tmp_path / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "config.json").read_text())["sparsekit"]["model_type"] == \
        "llama"


@pytest.mark.parametrize("change, key, shape", [
    (dict(intermediate_size=10**12), "model.layers.0.mlp.gate_proj.weight", (10**12, 32)),
    (dict(vocab_size=65), "model.embed_tokens.weight", (65, 32)),
], ids=["huge", "one more token"])
def test_from_pretrained_checks_the_configs_sizes_before_building(saved, tmp_path, monkeypatch,
                                                                 change, key, shape):
    import shutil

    target = shutil.copytree(saved[1], tmp_path / "m")
    data = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**data, **change}))
    built = []  # where each model was built: on the meta device only
    real = transformers.LlamaForCausalLM._from_config.__func__

    def spy(cls, config, **kwargs):
        built.append(torch.get_default_device().type)
        return real(cls, config, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "_from_config", classmethod(spy))
    with pytest.raises(ValueError, match=rf"config\.json: the model it describes has '{key}' "
                                         rf"of shape \({shape[0]}, {shape[1]}\), but "
                                         rf"{WEIGHTS_NAME} holds"):
        sparsekit.from_pretrained(target)
    assert built == ["meta"]
