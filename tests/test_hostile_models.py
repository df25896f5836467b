"""Models that hold their layers in unusual ways: parametrized weights, PyTorch's fused
Transformer fast path, mixed-precision layers under int8 compilation."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import sparsekit

compile_mod = importlib.import_module("sparsekit.engine.compile")

ORIGINAL = "0.parametrizations.weight.original"


class _Scale(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2.0


class _Cast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


def _mlp(kind: str = "scale") -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    if kind == "scale":
        parametrize.register_parametrization(m[0], "weight", _Scale())
    elif kind == "spectral":
        spectral_norm(m[0])
    elif kind == "weight_norm":
        weight_norm(m[0])
    return m


# -- 1. parametrized weights ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["scale", "spectral"])
@pytest.mark.parametrize("targets", [None, ["0"], ["0.weight"], [nn.Linear], [ORIGINAL]])
def test_a_single_tensor_parametrization_targets_its_stored_tensor(kind, targets) -> None:
    m = _mlp(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms = sparsekit.prune(m, 0.5, targets=targets)
    assert ORIGINAL in ms.masks
    assert (targets in (None, [nn.Linear])) == ("2.weight" in ms.masks)
    original = m[0].parametrizations.weight.original
    assert int((original == 0).sum()) >= original.numel() // 2
    if kind == "scale":
        assert torch.equal(m[0].weight == 0, ~ms.masks[ORIGINAL])


def test_masks_of_a_parametrized_weight_survive_an_optimizer_step() -> None:
    m = _mlp("scale")
    ms = sparsekit.prune(m, 0.5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ms.attach(opt)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    assert not bool(m[0].parametrizations.weight.original[~ms.masks[ORIGINAL]].any())
    assert not bool(m[0].weight[~ms.masks[ORIGINAL]].any())


def test_exclude_and_report_see_a_parametrized_weight_by_its_own_name() -> None:
    m = _mlp("scale")
    ms = sparsekit.prune(m, 0.5, exclude=["0.weight"])
    assert list(ms.masks) == ["2.weight"]
    m = _mlp("scale")
    masks = sparsekit.prune(m, 0.5, targets=["0"])
    with torch.no_grad():
        m[0].parametrizations.weight.original.fill_(1.0)  # masks not applied: read from them
    row = next(r for r in sparsekit.report(m, masks=masks).rows if r.name == "0")
    assert row.nonzeros == int(masks.masks[ORIGINAL].sum())


@pytest.mark.parametrize("spec", ["0", "0.weight"])
def test_an_explicit_multi_tensor_parametrization_is_refused(spec) -> None:
    m = _mlp("weight_norm")
    with pytest.raises(ValueError, match=r"layer '0'.*0\.parametrizations\.weight\.original0, "
                                         r"0\.parametrizations\.weight\.original1"):
        sparsekit.prune(m, 0.5, targets=[spec])


@pytest.mark.parametrize("targets", [None, [nn.Linear], ["*"]])
def test_a_multi_tensor_parametrization_is_skipped_with_one_warning(targets) -> None:
    m = _mlp("weight_norm")
    with pytest.warns(UserWarning, match=r"'0'.*original0, .*original1") as record:
        ms = sparsekit.prune(m, 0.5, targets=targets)
    assert len([w for w in record if "parametrized" in str(w.message)]) == 1
    assert list(ms.masks) == ["2.weight"]


def test_a_stored_tensor_of_a_multi_tensor_parametrization_can_be_named() -> None:
    m = _mlp("weight_norm")
    name = "0.parametrizations.weight.original1"
    ms = sparsekit.prune(m, 0.5, targets=[name])
    assert list(ms.masks) == [name]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    ms.attach(opt)
    m(torch.randn(8, 16)).sum().backward()
    opt.step()
    assert not bool(m[0].weight[~ms.masks[name]].any())


# -- 2. TransformerEncoderLayer fast path -----------------------------------------------

def _encoder_and_head() -> tuple[nn.Module, torch.Tensor]:
    """A 50 %-pruned TransformerEncoderLayer (batch first, eval: torch's fast path reads its
    feed-forward weights directly) and a Linear head, with an input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0),
        nn.Linear(64, 32),
    ).eval()
    sparsekit.prune(model, 0.5)
    return model, torch.randn(2, 10, 64)


def test_a_transformer_encoder_layer_compiles_with_its_feed_forward_dense() -> None:
    model, x = _encoder_and_head()
    compiled = sparsekit.compile(model, (x,), cache=False)
    layer = compiled[0]
    assert type(layer.linear1) is nn.Linear and type(layer.linear2) is nn.Linear
    for n in ("0.linear1", "0.linear2"):
        assert compiled.sparsekit_choices[n]["format"] == "dense"
        assert "TransformerEncoderLayer" in compiled.sparsekit_choices[n]["reason"]
    assert "1" in compiled.sparsekit_choices  # the rest still compiles
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    rows = {r.name: r for r in sparsekit.engine.report(compiled, (x,)).rows}
    assert "reads its weight" in rows["0.linear1"].extra["note"]
    bare = sparsekit.compile(model, cache=False)  # without example inputs: callable too
    with torch.no_grad():
        torch.testing.assert_close(bare(x), model(x), rtol=1e-4, atol=1e-4)


def test_forced_formats_do_not_count_the_transformer_layers_as_refused() -> None:
    model, x = _encoder_and_head()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = sparsekit.compile(model, (x,), formats=["csr16"], cache=False)
    assert compiled.sparsekit_choices["1"]["format"] == "csr16"


# -- 2b. tied weights (an lm_head tied to the input embedding) ------------------------

def _tied_lm() -> tuple[nn.Module, torch.Tensor]:
    """A tiny Hugging Face LLaMA with ``tie_word_embeddings`` (as Llama 3.2 1B, Qwen2.5
    0.5B, Gemma), 50 % pruned, and token ids."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    sparsekit.prune(model, 0.5)  # not the tied embedding (targets skip shared weights)
    return model, torch.randint(0, 256, (1, 8))


def _stored_bytes(model: nn.Module) -> int:
    """Bytes of the model's state, each shared tensor once."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in model.state_dict().values()}
    return sum(seen.values())


def test_compile_keeps_a_tied_lm_head_dense_and_tied() -> None:
    model, ids = _tied_lm()
    compiled = sparsekit.compile(model, (ids,), cache=False)
    assert type(compiled.lm_head) is nn.Linear
    assert compiled.lm_head.weight is compiled.model.embed_tokens.weight
    assert "tied to model.embed_tokens.weight" in compiled.sparsekit_choices["lm_head"]["reason"]
    assert _stored_bytes(compiled) <= _stored_bytes(model)  # not a second vocab matrix
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits,
                                   rtol=1e-4, atol=1e-4)
    rows = {r.name: r for r in sparsekit.engine.report(compiled, (ids,)).rows}
    assert "tied to" in rows["lm_head"].extra["note"]


def test_grow_or_forced_formats_compile_a_tied_layer_as_a_copy() -> None:
    model, ids = _tied_lm()
    grown = sparsekit.compile(model, (ids,), cache=False, grow=True)
    assert "reason" not in grown.sparsekit_choices["lm_head"]
    forced = sparsekit.compile(model, (ids,), cache=False, formats=["bitmap"])
    assert forced.sparsekit_choices["lm_head"]["format"] == "bitmap"
    with torch.no_grad():
        torch.testing.assert_close(forced(ids).logits, model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_two_linear_layers_sharing_a_weight_stay_tied_through_compile_save_and_load(
        tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.Linear(32, 8))
    model[2].weight = model[0].weight
    sparsekit.prune(model, 0.9, targets=["0.weight", "3.weight"])
    x = torch.randn(4, 32)
    compiled = sparsekit.compile(model, (x,), cache=False)
    assert compiled[2].weight is compiled[0].weight
    assert "tied to 2.weight" in compiled.sparsekit_choices["0"]["reason"]
    assert "3" in compiled.sparsekit_choices and "reason" not in compiled.sparsekit_choices["3"]
    path = sparsekit.save(compiled, tmp_path / "tied.safetensors")
    again = sparsekit.compile(model, (x,), cache=False)
    sparsekit.load(again, path)
    assert again[2].weight is again[0].weight
    with torch.no_grad():
        assert torch.equal(again(x), compiled(x))
    plain = sparsekit.engine.decompile(compiled)
    assert plain[2].weight is plain[0].weight


# -- 3. int8 compile of a bfloat16 layer feeding a float32 output -----------------------

def _mixed(tail: bool) -> nn.Sequential:
    torch.manual_seed(0)
    mods = [nn.Linear(64, 64).bfloat16(), _Cast()] + ([nn.Linear(64, 8)] if tail else [])
    m = nn.Sequential(*mods)
    sparsekit.prune(m, 0.6)
    return m


@pytest.mark.parametrize("fmt", ["csr16", "bitmap", "dense_lowp"])
@pytest.mark.parametrize("tail", [False, True])
def test_int8_compile_of_a_bf16_layer_with_fp32_output(fmt, tail) -> None:
    m = _mixed(tail)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    compiled = sparsekit.compile(m, (x,), formats=[fmt], weight_dtype="int8", cache=False)
    assert compiled.sparsekit_choices["0"]["format"] == fmt
    seen = compile_mod._observed(m, (x,))[0]
    reference = compile_mod._with_stored_weights(m, compiled, seen)
    with torch.no_grad():
        ref, out = reference(x), compiled(x)
    assert ref.dtype == out.dtype == torch.float32
    # the reference holds the dequantized int8 weights exactly (not rounded to bf16)
    bf16 = torch.finfo(torch.bfloat16).eps
    assert float((out - ref).abs().max() / ref.abs().max()) <= 4 * bf16


def _spy_rtol(monkeypatch) -> list[float]:
    seen: list[float] = []
    real = compile_mod._check_outputs

    def spy(model, compiled, inputs, rtol=compile_mod._CHECK_RTOL):
        seen.append(rtol)
        return real(model, compiled, inputs, rtol)

    monkeypatch.setattr(compile_mod, "_check_outputs", spy)
    return seen


def test_the_check_tolerance_follows_every_layers_dtype(monkeypatch) -> None:
    seen = _spy_rtol(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    sparsekit.compile(_mixed(True), (x,), formats=["csr16"], weight_dtype="int8", cache=False)
    assert seen[-1] == compile_mod._rtol(torch.bfloat16)
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    sparsekit.prune(fp32, 0.6)
    sparsekit.compile(fp32, (torch.randn(4, 64),), formats=["csr16"], weight_dtype="int8",
                      cache=False)
    assert seen[-1] == compile_mod._CHECK_RTOL  # all float32: the tight tolerance stays


def test_an_all_fp32_int8_compile_still_catches_a_wrong_result(monkeypatch) -> None:
    real = compile_mod._with_stored_weights

    def off(model, compiled, seen):
        reference = copy.deepcopy(real(model, compiled, seen))
        with torch.no_grad():
            reference[0].weight.mul_(1.001)  # a 0.1% error: far above float32 rounding
        return reference

    monkeypatch.setattr(compile_mod, "_with_stored_weights", off)
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    sparsekit.prune(fp32, 0.6)
    with pytest.raises(RuntimeError, match="differs from the original"):
        sparsekit.compile(fp32, (torch.randn(4, 64),), formats=["csr16"], weight_dtype="int8",
                          cache=False)
