"""More hostile inputs to the LLM tools: structured pruning and its reloads, SparseGPT's
Hessian, perplexity, calibration texts and ``save_pretrained`` directories.

Each was a bare error from deep inside (``RuntimeError``, ``LinAlgError``,
``ZeroDivisionError``, ``AttributeError``, ``KeyError``) or a silent wrong result (layers
removed by NaN influences, complex weights losing their imaginary part, float token ids
truncated); each is now a ``ValueError`` (or an ``ArgumentTypeError``) naming what is wrong,
raised before anything changes.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

transformers = pytest.importorskip("transformers")

import sparsekit  # noqa: E402
from sparsekit import llm  # noqa: E402
from sparsekit._checks import ArgumentTypeError  # noqa: E402

VOCAB, CONTEXT = 64, 64


def llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=CONTEXT)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


# -- prune_structured ----------------------------------------------------------------------


def test_layers_refuse_a_non_finite_block_influence():
    # Before: NaN hidden states gave NaN influences, sorted anywhere: arbitrary layers went.
    model = llama()
    model.model.embed_tokens.weight.data[:] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"block influence of block\(s\) \[0, 1, 2\] is not "
                                         r"finite.*not changed"):
        llm.prune_structured(model, tokens(), 0.34, unit="layers")
    assert unchanged(model, before) and model.config.num_hidden_layers == 3


def test_prune_structured_refuses_seqlen_past_the_context():
    # Before: accepted (llm.prune refuses it); RoPE ran past its positions without a word.
    model = llama()
    before = snapshot(model)
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"seqlen 1000 exceeds the model's context of "
                                         rf"{CONTEXT}"):
        llm.prune_structured(model, stream, 0.25, seqlen=1000)
    assert unchanged(model, before) and model.config.intermediate_size == 48


def test_prune_structured_windows_a_long_stream_at_the_context_length():
    # Before: seqlen=None made one window of the whole stream; GPT-2 then failed with an
    # IndexError of its position embedding ("index out of range in self").
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=3, n_head=4)).eval()
    stream = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0))
    llm.prune_structured(model, stream, 0.34, unit="layers", nsamples=4)
    assert len(model.transformer.h) == 2


# -- load_pretrained of a tampered config.json ----------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Directories of pruned models with per-layer shapes: FFN (global) and GQA heads."""
    root = tmp_path_factory.mktemp("structured")
    for unit, amount, allocation in [("ffn", 0.3, "global"), ("heads", 0.25, "uniform")]:
        model = llama()
        llm.prune_structured(model, tokens(), amount, unit=unit, allocation=allocation)
        assert model.config.sparsekit_shapes
        model.save_pretrained(root / unit)
    return root


def tampered(saved, tmp_path, unit, edit):
    target = tmp_path / unit
    shutil.copytree(saved / unit, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def first_shape(suffix):
    def edit(config):
        shapes = config["sparsekit_shapes"]
        return shapes, next(k for k in sorted(shapes) if k.endswith(suffix))
    return edit


def drop_entry(config):
    shapes, key = first_shape("down_proj.weight")(config)
    del shapes[key]


def shrink_entry(config):
    shapes, key = first_shape("up_proj.weight")(config)
    shapes[key][0] -= 1


def inconsistent_entry(config):  # down_proj reads one column fewer than up_proj writes
    shapes, key = first_shape("down_proj.weight")(config)
    shapes[key][1] -= 1


def drop_head_entry(config):
    shapes, key = first_shape("k_proj.weight")(config)
    del shapes[key]


@pytest.mark.parametrize("unit, edit, name", [
    ("ffn", drop_entry, "down_proj.weight"),
    ("ffn", shrink_entry, "up_proj.weight"),
    ("ffn", inconsistent_entry, "down_proj.weight"),
    ("ffn", lambda c: c.update(sparsekit_shapes={}), "down_proj.weight"),
    ("heads", drop_head_entry, "k_proj.weight"),
], ids=["entry missing", "entry smaller", "entries inconsistent", "shapes emptied",
        "gqa entry missing"])
def test_load_pretrained_names_recorded_shapes_that_do_not_fit_the_weights(
        saved, tmp_path, unit, edit, name):
    # Before: a bare RuntimeError of load_state_dict ("size mismatch for ..."), or for {}
    # plain from_pretrained's RuntimeError about ignore_mismatched_sizes.
    path = tampered(saved, tmp_path, unit, edit)
    with pytest.raises(ValueError, match=rf"do not fit its config.json: '[^']*{name}' is "
                                         r"saved as \[\d+, \d+\] but the config"):
        llm.load_pretrained(path)


def test_load_pretrained_refuses_shapes_that_are_not_a_mapping(saved, tmp_path):
    # Before: an empty list counted as "no shapes": plain from_pretrained, a RuntimeError.
    path = tampered(saved, tmp_path, "ffn", lambda c: c.update(sparsekit_shapes=[]))
    with pytest.raises(ValueError, match="sparsekit_shapes must map parameter names"):
        llm.load_pretrained(path)


@pytest.mark.parametrize("unit, change", [
    ("ffn", {"intermediate_size": -3}), ("ffn", {"intermediate_size": 4.5}),
    ("heads", {"num_key_value_heads": 0}), ("heads", {"head_dim": 0}),
])
def test_load_pretrained_refuses_sizes_no_model_can_have(saved, tmp_path, unit, change):
    # Before: RuntimeError (negative dimension), ZeroDivisionError, huggingface_hub's
    # StrictDataclassFieldValidationError.
    path = tampered(saved, tmp_path, unit, lambda c: c.update(change))
    with pytest.raises(ValueError, match="describes no model this transformers can build"):
        llm.load_pretrained(path)


@pytest.mark.parametrize("architectures, match", [
    (["AutoConfig"], "names no transformers model class"),
    ([5], "names no transformers model class"),
    ("LlamaForCausalLM", "names no transformers model class"),
    (["BertModel"], "names BertModel, which takes a BertConfig, but the config is a "
                    "LlamaConfig"),
])
def test_load_pretrained_refuses_architectures_that_build_no_model(saved, tmp_path,
                                                                   architectures, match):
    # Before: TypeError (AutoConfig(config); getattr with an int) and AttributeError
    # ('LlamaConfig' object has no attribute 'type_vocab_size').
    path = tampered(saved, tmp_path, "ffn", lambda c: c.update(architectures=architectures))
    with pytest.raises(ValueError, match=match):
        llm.load_pretrained(path)


# -- sparsegpt_prune ----------------------------------------------------------------------


def layer_problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    return W, 2 * X.t() @ X


def test_sparsegpt_refuses_a_hessian_with_a_negative_diagonal():
    # Before: one negative entry failed in Cholesky with a bare LinAlgError, and -H (a
    # negative mean diagonal) was silently flipped into a positive definite matrix.
    W, H = layer_problem()
    for bad in (-H, H.clone().index_put_((torch.tensor([0]), torch.tensor([0])),
                                         torch.tensor(-5.0))):
        with pytest.raises(ValueError, match=r"H has \d+ negative diagonal entries"):
            llm.sparsegpt_prune(W, bad, 0.5)


def test_sparsegpt_names_percdamp_when_the_damped_hessian_does_not_factor():
    # A singular (rank-1) Hessian with too little damping: a bare LinAlgError before.
    W, _ = layer_problem()
    with pytest.raises(ValueError, match=r"percdamp=1e-12 .*not positive definite.*raise "
                                         "percdamp"):
        llm.sparsegpt_prune(W, torch.ones(16, 16), 0.5, percdamp=1e-12)
    w, keep = llm.sparsegpt_prune(W, torch.ones(16, 16), 0.5)  # the default damping factors
    assert torch.isfinite(w).all() and keep.float().mean() == 0.5


@pytest.mark.parametrize("which, dtype", [
    ("W", torch.complex64), ("W", torch.bool), ("W", torch.int64),
    ("H", torch.complex64), ("H", torch.bool), ("H", torch.int64),
])
def test_sparsegpt_refuses_tensors_that_are_not_real_floats(which, dtype):
    # Before: complex inputs lost their imaginary part with a warning, bools pruned as 0/1.
    W, H = layer_problem()
    args = {"W": W, "H": H}
    args[which] = args[which].to(dtype)
    with pytest.raises(ArgumentTypeError, match=rf"{which} must be a real floating-point "
                                                rf"tensor, got {dtype}"):
        llm.sparsegpt_prune(args["W"], args["H"], 0.5)


# -- perplexity and embedding_similarity ---------------------------------------------------


def test_perplexity_refuses_a_model_that_is_not_a_module():
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module.*NoneType"):
        llm.perplexity(None, tokens().reshape(-1), seqlen=16)


def test_perplexity_names_a_model_that_is_no_causal_lm():
    # Before: AttributeError ('...Output' object has no attribute 'logits') and a bare
    # RuntimeError of a Linear layer fed token ids.
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=32)).eval()
    with pytest.raises(ValueError, match=r"model must be a causal language model whose "
                                         r"output has .logits.*BertModel"):
        llm.perplexity(bert, tokens().reshape(-1), seqlen=16)
    with pytest.raises(ValueError, match=r"model: it cannot run on token ids"):
        llm.perplexity(nn.Linear(4, 4), tokens().reshape(-1), seqlen=16)


def test_embedding_similarity_checks_its_arguments():
    # Before: a string passed as sentences was embedded character by character, and a
    # missing tokenizer was "'NoneType' object is not callable".
    model = llama()
    with pytest.raises(ArgumentTypeError, match="sentences must be a non-empty list of "
                                                "strings, got str"):
        llm.embedding_similarity(model, llm.byte_tokenizer(), "a sentence", model)
    with pytest.raises(ArgumentTypeError, match="tokenizer must be callable.*NoneType"):
        llm.embedding_similarity(model, None, ["a sentence"], model)
    with pytest.raises(ArgumentTypeError, match="dense_model must be an nn.Module"):
        llm.embedding_similarity(model, llm.byte_tokenizer(), ["a sentence"], "dense")


# -- calibration texts ----------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer, error, match", [
    (lambda t: {"input_ids": [[1.7, 2.0, 3.9]]}, ArgumentTypeError,
     "tokenizer: .*'input_ids' .*got torch.float32"),
    (lambda t: {"ids": [[1, 2, 3]]}, ValueError, r"tokenizer: .*KeyError: 'input_ids'"),
    (lambda t: [[1, 2, 3]], ValueError, r"tokenizer: tokenizing calibration failed"),
    (lambda t: {"input_ids": [[2**70, 2]]}, ValueError, r"tokenizer: .*Overflow"),
], ids=["float ids", "no input_ids", "a list", "ids past int64"])
def test_a_tokenizer_that_returns_no_integer_ids_is_named(tokenizer, error, match):
    # Before: float ids were truncated (1.7 to 1), the others a bare KeyError, TypeError or
    # an unnamed "Overflow when unpacking long long".
    model = llama()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        llm.prune(model, ["some text"], tokenizer=tokenizer)
    assert unchanged(model, before)


def test_a_calibration_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match=r"calibration: the text file .*corpus.txt' is not "
                                         r"UTF-8 text"):
        llm.prune(llama(), str(path), tokenizer=llm.byte_tokenizer())


# -- sparsekit.save_pretrained / from_pretrained ---------------------------------------------


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrained") / "model"
    model = llama()
    sparsekit.save_pretrained(model, path, llm.prune(model, tokens(), method="magnitude"))
    return path


def edited(source, tmp_path, edit):
    target = tmp_path / "model"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config = edit(config) or config
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("edit", [
    lambda c: c.update(intermediate_size=-3), lambda c: c.update(num_key_value_heads=0),
    lambda c: c.update(hidden_size=4.5), lambda c: c.update(rope_scaling={"rope_type": "x"}),
], ids=["negative width", "no key-value heads", "float width", "unknown rope type"])
def test_from_pretrained_refuses_sizes_no_model_can_have(pretrained_dir, tmp_path, edit):
    # Before: RuntimeError, ZeroDivisionError, StrictDataclassFieldValidationError, KeyError.
    path = edited(pretrained_dir, tmp_path, edit)
    with pytest.raises(ValueError, match="config.json describes no model this transformers "
                                         "can build"):
        sparsekit.from_pretrained(path)


def test_from_pretrained_refuses_an_architecture_for_another_config(pretrained_dir, tmp_path):
    # Before: AttributeError ('LlamaConfig' object has no attribute 'type_vocab_size').
    path = edited(pretrained_dir, tmp_path, lambda c: c.update(architectures=["BertModel"]))
    with pytest.raises(ValueError, match="names BertModel, which takes a BertConfig"):
        sparsekit.from_pretrained(path)


def test_from_pretrained_builds_the_base_model_of_an_unknown_architecture(tmp_path):
    # A subclass of the user's own is saved under its name, which transformers lacks. Before:
    # "type object 'AutoModel' has no attribute '_from_config'".
    torch.manual_seed(0)
    model = transformers.LlamaModel(llama().config).eval()
    sparsekit.save_pretrained(model, tmp_path / "base")
    path = edited(tmp_path / "base", tmp_path,
                  lambda c: c.update(architectures=["MyOwnLlamaModel"]))
    back = sparsekit.from_pretrained(path)
    assert type(back) is transformers.LlamaModel
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_from_pretrained_refuses_a_config_that_is_not_an_object(pretrained_dir, tmp_path):
    # Before: "pop expected at most 1 argument, got 2", a bare TypeError.
    path = edited(pretrained_dir, tmp_path, lambda c: [c])
    with pytest.raises(ValueError, match=r"config.json: not a JSON object \(a list\)"):
        sparsekit.from_pretrained(path)


def test_from_pretrained_names_a_config_json_that_is_a_directory(tmp_path):
    # Before: "no config.json", though there was one in the way.
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match="its config.json is no regular file"):
        sparsekit.from_pretrained(tmp_path)
    (tmp_path / "config.json").rmdir()
    with pytest.raises(ValueError, match=r"\(no config.json\)"):
        sparsekit.from_pretrained(tmp_path)


def test_pretrained_directories_must_be_paths():
    # Before: Path(None)'s bare TypeError, which named no argument.
    with pytest.raises(ArgumentTypeError, match="directory must be a str or os.PathLike"):
        sparsekit.from_pretrained(None)
    with pytest.raises(ArgumentTypeError, match="directory must be a str or os.PathLike"):
        sparsekit.save_pretrained(llama(), None)


# -- score functions --------------------------------------------------------------------------


def test_wanda_scores_a_layer_of_zero_inputs():
    # Before: "data: the model cannot run on its inputs: cannot reshape tensor of 0
    # elements into shape [-1, 0]", though the model runs and magnitude prunes it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 0), nn.Linear(0, 4), nn.Linear(4, 4))
    masks = sparsekit.prune(model, 0.5, method="wanda", data=torch.randn(32, 8))
    assert masks.masks["1.weight"].shape == (0, 16) and masks.masks["2.weight"].shape == (4, 0)
    assert masks.masks["0.weight"].float().mean() == 0.5


def test_load_pretrained_refuses_options_it_cannot_apply(saved):
    # Before: ignored without a word; torch_dtype=torch.float16 returned a float32 model.
    with pytest.raises(ValueError, match=r"\['torch_dtype'\]: from_pretrained's options do not "
                                         r"apply .*sparsekit_shapes"):
        llm.load_pretrained(saved / "ffn", torch_dtype=torch.float16)
    assert llm.load_pretrained(saved / "ffn").dtype == torch.float32


@pytest.mark.parametrize("unit, kwargs, match", [
    ("ffn", dict(amount=1e-9), r"amount=1e-09 removes no ffn unit in any block"),
    ("heads", dict(amount=1e-9), r"amount=1e-09 removes no heads unit in any block"),
    ("ffn", dict(amount=0.25, round_to=64), r"removes no ffn unit .*with round_to=64.*"
                                             r"smaller round_to"),
], ids=["tiny ffn amount", "tiny heads amount", "round_to past the width"])
def test_an_amount_that_removes_nothing_is_refused(unit, kwargs, match):
    # Before: a silent no-op (removing layers already refused one).
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match + ".*not changed"):
        llm.prune_structured(model, tokens(), unit=unit, **kwargs)
    assert unchanged(model, before) and "sparsekit_shapes" not in model.config.to_dict()


def test_perplexity_past_floats_range_is_inf():
    # Before: OverflowError "math range error" from math.exp of a mean NLL above ~709.
    model = llama()
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    assert llm.perplexity(model, tokens().reshape(-1), seqlen=16) == float("inf")
