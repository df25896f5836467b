"""Hostile inputs to ``llm.prune`` and ``llm.perplexity`` (issue 17, items 3 and 9).

Each is a clear ``ValueError`` naming the argument (or the layer) and what is accepted,
raised before any weight changes. Before: ``seqlen=0`` meant the default, a ``seqlen``
past the model's context was accepted, out-of-vocabulary ids raised a bare
``IndexError``, and one NaN in the calibration activations pruned silently (Wanda) or
failed deep inside SparseGPT's Cholesky factorisation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from sparsekit import llm  # noqa: E402
from sparsekit._checks import ArgumentTypeError  # noqa: E402
from sparsekit.blocks import find_blocks  # noqa: E402
from sparsekit.observe import InputStats  # noqa: E402
from sparsekit.patterns import parse_pattern  # noqa: E402

VOCAB, CONTEXT = 256, 64
METHODS = ("magnitude", "wanda", "sparsegpt")


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=CONTEXT)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    # NaN != NaN: compare bit patterns (equal_nan) so a planted NaN counts as unchanged.
    return all(torch.allclose(before[k], v, rtol=0, atol=0, equal_nan=True)
               for k, v in model.state_dict().items())


# -- arguments -----------------------------------------------------------------------------

ARGUMENTS = [
    # name, calibration, kwargs, phrases the message must hold
    ("seqlen=0 is not the default", tokens(), dict(seqlen=0), ["seqlen", "0", "≥ 1"]),
    ("negative seqlen", tokens(), dict(seqlen=-4), ["seqlen", "-4"]),
    ("fractional seqlen", tokens(), dict(seqlen=8.5), ["seqlen", "8.5"]),
    ("seqlen past the context", torch.randint(0, VOCAB, (500,)), dict(seqlen=CONTEXT + 1),
     ["seqlen 65", f"context of {CONTEXT}", f"1 to {CONTEXT}"]),
    ("token id past the vocabulary", tokens() + VOCAB, {},
     ["calibration", "token id", f"[0, {VOCAB})"]),
    ("negative token id", tokens() - VOCAB, {}, ["calibration", "token id -", f"[0, {VOCAB})"]),
    ("one bad id in a stream", torch.cat([torch.zeros(40, dtype=torch.long),
                                          torch.tensor([VOCAB])]), dict(seqlen=8),
     ["calibration", f"token id {VOCAB}"]),
    ("fractional batch_size", tokens(), dict(batch_size=2.5), ["batch_size", "2.5"]),
    ("bool batch_size", tokens(), dict(batch_size=True), ["batch_size", "True"]),
    ("bool nsamples", tokens(), dict(nsamples=True), ["nsamples", "True"]),
]


@pytest.mark.parametrize("calibration, kwargs, phrases", [c[1:] for c in ARGUMENTS],
                         ids=[c[0] for c in ARGUMENTS])
def test_bad_arguments_are_clear_errors_and_change_nothing(calibration, kwargs, phrases):
    model = llama()
    before = state(model)
    with pytest.raises(ValueError) as err:
        llm.prune(model, calibration, **kwargs)
    assert all(p in str(err.value) for p in phrases), str(err.value)
    assert unchanged(model, before)


def test_seqlen_up_to_the_context_is_accepted():
    stream = torch.randint(0, VOCAB, (500,), generator=torch.Generator().manual_seed(0))
    masks = llm.prune(llama(), stream, seqlen=CONTEXT, nsamples=2)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)


def test_perplexity_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=rf"tokens_or_text holds token id {VOCAB}\b"):
        llm.perplexity(llama(), torch.full((40,), VOCAB), seqlen=16)


@pytest.mark.parametrize("kwargs, param", [
    (dict(seqlen=16.0), "seqlen"), (dict(seqlen=1), "seqlen"), (dict(seqlen=16, stride=0),
                                                                "stride"),
    (dict(seqlen=16, stride=True), "stride"), (dict(seqlen=16, batch_size=0), "batch_size"),
])
def test_perplexity_options_are_checked(kwargs, param):
    with pytest.raises(ValueError, match=param):
        llm.perplexity(llama(), tokens().reshape(-1), **kwargs)


@pytest.mark.parametrize("ids", [tokens().reshape(-1).float() + 0.7, tokens().reshape(-1) > 9,
                                 tokens().reshape(-1).to(torch.complex64)],
                         ids=["float", "bool", "complex"])
def test_perplexity_refuses_token_tensors_that_are_not_integers(ids):
    # Before: .long() scored 3.7 as token 3, and bools as tokens 0 and 1.
    with pytest.raises(ArgumentTypeError, match=rf"tokens_or_text tensor .*integer.*{ids.dtype}"):
        llm.perplexity(llama(), ids, seqlen=16)


def test_perplexity_refuses_seqlen_past_the_context():
    # GPT-2's context is config.n_positions; past it the position embedding raised IndexError.
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=4)).eval()
    with pytest.raises(ValueError) as err:
        llm.perplexity(model, torch.randint(0, VOCAB, (100,)), seqlen=64)
    message = str(err.value)
    assert all(p in message for p in ["seqlen 64", "context of 32", "2 to 32"]), message
    assert "None" not in message  # perplexity has no default seqlen


def test_vocab_size_and_token_id_check():
    from sparsekit.llm.calibration import check_token_ids, vocab_size

    model = llama()
    assert vocab_size(model) == VOCAB
    assert vocab_size(nn.Linear(2, 2)) is None
    check_token_ids(torch.tensor([0, VOCAB - 1]), model)
    check_token_ids(torch.tensor([10**9]), nn.Linear(2, 2))  # no vocabulary: nothing to check
    with pytest.raises(ValueError, match="ids in"):
        check_token_ids(torch.tensor([VOCAB]), model)


# -- non-finite values (item 3) ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_nan_in_the_embeddings_of_a_calibration_token(method):
    model = llama()
    calib = tokens()
    model.model.embed_tokens.weight.data[calib[0, 3]] = float("nan")
    before = state(model)
    with pytest.raises(ValueError, match=r"first transformer block.*non-finite.*not changed"):
        llm.prune(model, calib, method=method)
    assert unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["model.layers.1.mlp.up_proj.weight",
                                   "model.layers.1.input_layernorm.weight"])
def test_nan_in_a_later_block_is_caught_before_the_first_block_changes(method, where):
    model = llama()
    dict(model.named_parameters())[where].data.view(-1)[0] = float("inf")
    before = state(model)
    with pytest.raises(ValueError, match=rf"parameter '{where}'.*non-finite.*not changed"):
        llm.prune(model, tokens(), method=method)
    assert unchanged(model, before)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nan_activations_name_the_layer_before_its_block_changes(method):
    # A NaN that only shows inside block 0 (here injected into one layer's input).
    model = llama()
    layer = model.model.layers[0].mlp.down_proj
    layer.register_forward_pre_hook(lambda _m, args: (args[0] * float("nan"),))
    before = state(model)
    with pytest.raises(ValueError) as err:
        llm.prune(model, tokens(), method=method)
    assert "'model.layers.0.mlp.down_proj.weight'" in str(err.value)
    assert "not changed" in str(err.value)
    assert unchanged(model, before)


def test_nan_activations_with_owl_are_caught_in_the_dense_pass():
    model = llama()
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: (args[0] * float("nan"),))
    before = state(model)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.*not changed"):
        llm.prune(model, tokens(), allocation="owl")
    assert unchanged(model, before)


def test_overflow_in_a_pruned_block_says_which_blocks_were_pruned():
    # Every parameter is finite, so only the pruned blocks' outputs can turn non-finite:
    # here block 0's output overflows once it runs for block 1's inputs.
    model = llama()
    block = find_blocks(model)[0]

    def overflow(_m, _args, out):
        return (out[0] * float("inf"), *out[1:]) if isinstance(out, tuple) else out * float("inf")

    block.register_forward_hook(overflow)
    with pytest.raises(ValueError, match=r"model.layers.1.*blocks 0 to 0 were already pruned"):
        llm.prune(model, tokens(), method="wanda")


def test_non_finite_new_weights_are_refused_before_their_block_is_written(monkeypatch):
    # An ill-conditioned reconstruction: SparseGPT's update turns the 3rd layer of block 0
    # into NaN. The block's first two layers, already computed, must not be written either.
    from sparsekit.llm import methods

    real, calls = methods.sparsegpt_prune, []

    def ill_conditioned(w, hessian, sparsity, pattern):
        calls.append(1)
        w, keep = real(w, hessian, sparsity, pattern)
        return (w * float("nan") if len(calls) == 3 else w), keep

    monkeypatch.setattr(methods, "sparsegpt_prune", ill_conditioned)
    model = llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"method 'sparsegpt' gave \d+ non-finite weight\(s\) "
                                         r"\(NaN or inf\) for 'model.layers.0.*not changed"):
        llm.prune(model, tokens(), method="sparsegpt")
    assert len(calls) == 3
    assert unchanged(model, before)


# -- sparsegpt_prune's arguments -----------------------------------------------------------


def layer_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A (8, 16) weight and the Hessian of 64 random inputs."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 16, generator=g), torch.randn(64, 16, generator=g)
    return W, 2 * X.t() @ X


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


W0, H0 = layer_problem()
SPARSEGPT_ARGUMENTS = [
    # name, W, H, kwargs, error type, phrases the message must hold
    ("N:M groups straddling blocks", W0, H0, dict(pattern="2:4", blocksize=6), ValueError,
     ["blocksize", "multiple of 4", "6"]),
    ("negative blocksize", W0, H0, dict(blocksize=-4), ValueError, ["blocksize", "≥ 1", "-4"]),
    ("zero blocksize", W0, H0, dict(blocksize=0), ValueError, ["blocksize", "0"]),
    ("fractional blocksize", W0, H0, dict(blocksize=4.0), ArgumentTypeError,
     ["blocksize", "4.0"]),
    ("columns not a multiple of M", W0, H0, dict(pattern="2:3"), ValueError,
     ["'2:3'", "'W'", "multiple of 3", "16 inputs"]),
    ("bool sparsity", W0, H0, dict(sparsity=True), ArgumentTypeError, ["sparsity", "True"]),
    ("sparsity past 1", W0, H0, dict(sparsity=1.5), ValueError, ["sparsity", "[0, 1)", "1.5"]),
    ("Hessian of the wrong shape", W0, torch.eye(8), {}, ValueError,
     ["H must be", "(16, 16)", "(8, 8)"]),
    ("1-D weight", W0[0], H0, {}, ValueError, ["W must be", "2-D", "(16,)"]),
    ("weight not a tensor", W0.tolist(), H0, {}, ArgumentTypeError, ["W", "Tensor", "list"]),
    ("negative percdamp", W0, H0, dict(percdamp=-1.0), ValueError, ["percdamp", "-1.0"]),
    ("NaN percdamp", W0, H0, dict(percdamp=float("nan")), ValueError, ["percdamp", "nan"]),
    ("NaN in W", with_nan(W0), H0, {}, ValueError, ["W holds non-finite", "finite"]),
    ("inf in H", W0, H0.masked_fill(torch.eye(16, dtype=torch.bool), float("inf")), {},
     ValueError, ["H holds non-finite"]),
    ("NaN scales", W0, H0, dict(scales=with_nan(torch.ones(8))), ValueError,
     ["scales holds non-finite"]),
]


@pytest.mark.parametrize("W, H, kwargs, error, phrases", [c[1:] for c in SPARSEGPT_ARGUMENTS],
                         ids=[c[0] for c in SPARSEGPT_ARGUMENTS])
def test_sparsegpt_prune_checks_every_argument(W, H, kwargs, error, phrases):
    kwargs = {"sparsity": 0.5, **kwargs}
    with pytest.raises(error) as err:
        llm.sparsegpt_prune(W, H, **kwargs)
    assert all(p in str(err.value) for p in phrases), str(err.value)


@pytest.mark.parametrize("pattern, blocksize", [("2:4", 8), ("2:4", None), ("1:3", None)])
def test_sparsegpt_nm_masks_are_valid_across_block_edges(pattern, blocksize):
    # The default block (128 columns) rounds up to whole groups: 129 for 1:3.
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(4, 264, generator=g), torch.randn(300, 264, generator=g)
    pat = parse_pattern(pattern)
    _, keep = llm.sparsegpt_prune(W, 2 * X.t() @ X, 0.0, pattern, blocksize=blocksize)
    assert (keep.reshape(-1, pat.m).sum(1) == pat.n).all()


# -- llm.prune's other arguments, all checked before block 0 --------------------------------

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
PRUNE_ARGUMENTS = [
    # kwargs, error type, phrases the message must hold
    pytest.param(dict(progress=3), ArgumentTypeError, ["progress", "callable", "3"],
                 id="progress not callable"),
    pytest.param(dict(device="cuda"), ValueError, ["device 'cuda'", "not available", "accepted"],
                 id="cuda on a CPU-only build", marks=NO_CUDA),
    pytest.param(dict(device="cuda:99"), ValueError, ["device 'cuda:99'", "accepted"],
                 id="no such GPU"),
    pytest.param(dict(device="bogus"), ValueError, ["device 'bogus'", "accepted"],
                 id="unknown device"),
    pytest.param(dict(device="meta"), ValueError, ["device 'meta'", "no values"],
                 id="meta device"),
    pytest.param(dict(device=1.5), ArgumentTypeError, ["device", "torch.device", "1.5"],
                 id="device a float"),
    pytest.param(dict(targets=[]), ValueError, ["targets=[]", "matches no layer"],
                 id="empty targets"),
    pytest.param(dict(targets=[nn.Embedding]), ValueError,
                 ["targets", "model.embed_tokens.weight", "not the weight of a Linear layer"],
                 id="targets not Linear"),
    pytest.param(dict(exclude=3), TypeError, ["exclude"], id="exclude an int"),
]


@pytest.mark.parametrize("kwargs, error, phrases", PRUNE_ARGUMENTS)
def test_prune_checks_every_argument_before_block_0(kwargs, error, phrases):
    # Before: progress=3 pruned block 0 and then raised; devices failed with a bare
    # AssertionError or RuntimeError; targets=[] blamed the default exclude 'lm_head'.
    model = llama()
    before = state(model)
    with pytest.raises(error) as err:
        llm.prune(model, tokens(), **kwargs)
    assert all(p in str(err.value) for p in phrases), str(err.value)
    assert unchanged(model, before)


def test_prune_refuses_a_model_that_is_not_a_module():
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module.*NoneType"):
        llm.prune(None, tokens())


def test_prune_takes_a_string_exclude_as_one_entry():
    # Before: exclude="*mlp*" was split into the entries '*', 'm', 'l', 'p', '*'.
    masks = llm.prune(llama(), tokens(), exclude="*mlp*")
    assert masks.masks and not any("mlp" in name for name in masks.masks)


def test_prune_drops_the_default_exclude_when_targets_name_other_layers():
    # Before: 'lm_head', excluded by default, matched none of these targets: an error.
    masks = llm.prune(llama(), tokens(), targets=["model.layers.0.mlp.up_proj"])
    assert list(masks.masks) == ["model.layers.0.mlp.up_proj.weight"]


def test_tiny_activations_that_underflow_the_hessian_are_refused_not_pruned_away():
    """Inputs around 1e-25 square to 0 in the float32 Gram matrix, so SparseGPT read every
    one as always zero and zeroed the whole layer while the masks said half was kept."""
    model = llama()
    layer = model.model.layers[0].mlp.down_proj
    layer.register_forward_pre_hook(lambda _m, args: (args[0] * 1e-25,))
    before = state(model)
    with pytest.raises(ValueError, match=r"inputs of 'model.layers.0.mlp.down_proj.weight' are "
                                         r"nonzero but too small for their float32 Hessian"):
        llm.prune(model, tokens(), method="sparsegpt")
    assert unchanged(model, before)
    stats = InputStats(4, gram=True)
    stats.add(torch.full((3, 4), 1e-30))
    assert stats.underflowed().tolist() == [True] * 4
    with pytest.raises(ValueError, match=r"4 of 4 of them so small that their squares "
                                         r"underflowed float32"):
        stats.hessian()
    plain = InputStats(4)
    plain.add(torch.full((3, 4), 1e-30))
    assert plain.underflowed().tolist() == [False] * 4  # no Gram matrix to lose them


def test_finite_activations_that_overflow_the_hessian_are_not_called_nan():
    # finite inputs above ~1.8e19 overflow float32 products: said so, not "NaN or inf"
    model = llama()
    layer = model.model.layers[0].mlp.down_proj
    layer.register_forward_pre_hook(lambda _m, args: (args[0] * 1e30,))
    before = state(model)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' are finite "
                                         r"but too large for their float32 Hessian"):
        llm.prune(model, tokens(), method="sparsegpt")
    assert unchanged(model, before)
