"""GPT-2's transformers Conv1D (a linear layer storing its weight as (in, out)) is a target,
a report row and a compile target like nn.Linear; the tied embedding stays dense."""

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.patterns import parse_pattern
from sparsekit.targets import linear_types, resolve_targets, stores_transposed

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 64
PROJECTIONS = [f"transformer.h.{i}.{p}.weight" for i in range(2)
               for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2,
                                  n_head=2, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids(rows: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))


def test_prune_gpt2_prunes_every_conv1d_and_leaves_the_tied_embedding_dense():
    """sparsekit.prune(gpt2, 0.5) pruned only the tied lm_head (half the token embedding
    zero) and left every c_attn/c_fc dense; then it found no target at all."""
    model = _gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    masks = sparsekit.prune(model, 0.5)
    assert list(masks.masks) == PROJECTIONS
    assert masks.layer_sparsity() == pytest.approx(dict.fromkeys(PROJECTIONS, 0.5))
    assert torch.equal(model.transformer.wte.weight, wte)  # lm_head shares it: untouched


def test_an_embedding_is_pruned_once_and_only_when_asked():
    model = _gpt2()
    masks = sparsekit.prune(model, 0.5, targets=["transformer.wte"])
    assert list(masks.masks) == ["transformer.wte.weight"]  # pruned once, not via lm_head
    assert model.lm_head.weight is model.transformer.wte.weight
    assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_conv1d_targets_are_transposed_and_linear_types_shared():
    model = _gpt2()
    chosen = {t.name: t for t in resolve_targets(model)}
    c_attn = chosen["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.transposed and stores_transposed(c_attn.module)
    assert c_attn.out_in(c_attn.param).shape == (96, 32)  # (out, in)
    assert Conv1D in linear_types()
    from sparsekit.blocks import layer_types
    from sparsekit.llm.blocks import Layer

    assert layer_types is linear_types  # llm.prune and the pipeline share one definition
    assert Layer("c_attn.weight", c_attn.module).transposed
    assert not resolve_targets(nn.Linear(4, 4))[0].transposed


@pytest.mark.parametrize("pattern", ["2:4", "row", "block:4x4"])
def test_patterns_act_on_inputs_per_output_as_for_linear(pattern):
    """N:M groups, rows and blocks of a Conv1D run along the inputs of each output: its
    mask transposed is the mask nn.Linear with the transposed weight gets."""
    model = _gpt2()
    conv = model.transformer.h[0].attn.c_attn
    linear = nn.Linear(32, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
    masks = sparsekit.prune(model, 0.5, pattern=pattern, targets=["transformer.h.0.attn.c_attn"])
    reference = sparsekit.prune(linear, 0.5, pattern=pattern)
    mask = masks.masks["transformer.h.0.attn.c_attn.weight"]
    assert mask.shape == conv.weight.shape and mask.is_contiguous()
    assert torch.equal(mask.t(), reference.masks["weight"])
    assert parse_pattern(pattern).is_valid(mask.t())


def test_wanda_scores_conv1d_inputs():
    model = _gpt2()
    ids = _ids()
    masks = sparsekit.prune(model, 0.5, method="wanda", data=ids, pattern="2:4")
    assert list(masks.masks) == PROJECTIONS
    for n, m in masks.masks.items():
        assert parse_pattern("2:4").is_valid(m.t()), n


def test_report_lists_conv1d_rows_with_their_flops():
    model = _gpt2()
    sparsekit.prune(model, 0.5)
    ids = _ids(rows=2, length=8)
    rows = {r.name: r for r in sparsekit.report(model, ids).rows}
    c_fc = rows["transformer.h.0.mlp.c_fc"]
    assert (c_fc.kind, c_fc.shape, c_fc.sparsity) == ("Conv1D", (32, 128), 0.5)
    assert c_fc.dense_flops == 2 * 16 * 32 * 128  # 16 token rows, in 32, out 128
    assert {n for n, r in rows.items() if r.kind == "Conv1D"} == {
        p.removesuffix(".weight") for p in PROJECTIONS}
    assert sparsekit.report(model).rows[0].dense_flops == 2 * 32 * 96  # c_attn, one row


def test_compile_turns_conv1d_into_compiled_linears_with_identical_output():
    model = _gpt2()
    sparsekit.prune(model, 0.5)
    ids = _ids()
    compiled = sparsekit.compile(model, ids, formats="csr16", cache=False, fuse=False)
    assert not any(isinstance(m, Conv1D) for m in compiled.modules())
    assert isinstance(compiled.transformer.h[0].attn.c_attn, sparsekit.engine.CompiledLinear)
    assert any(isinstance(m, Conv1D) for m in model.modules())  # the input model is unchanged
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5,
                                   atol=1e-5)



def test_save_pretrained_stores_the_tied_embedding_once(tmp_path):
    """GPT-2's wte and lm_head are one tensor: the directory holds it once, and the
    reloaded model is tied again and computes the same logits."""
    model = _gpt2()
    masks = sparsekit.prune(model, 0.5)
    path = sparsekit.save_pretrained(model, tmp_path / "gpt2", masks)
    meta, infos = sparsekit.checkpoint.read_header(path / "sparsekit.safetensors")
    assert "lm_head.weight" not in infos
    assert "lm_head.weight" in meta["tied"]
    loaded = sparsekit.from_pretrained(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits,
                                   rtol=0, atol=0)


def test_a_two_four_gpt2_saves_loads_and_reads(tmp_path):
    """MaskSet and load check a Conv1D mask's pattern along its inputs (the weight is stored
    (in, out)): a 2:4 GPT-2 failed both checks, which read the stored layout."""
    model = _gpt2()
    masks = sparsekit.prune(model, 0.5, pattern="2:4")
    path = sparsekit.save(model, tmp_path / "gpt2.safetensors", masks)
    loaded = sparsekit.load(_gpt2(), path)
    assert loaded.pattern == "2:4"
    assert all(torch.equal(loaded.masks[n], m) for n, m in masks.masks.items())
    assert set(sparsekit.checkpoint.read(path).kept) >= set(masks.masks)
