"""Hostile inputs, round 30.

- ``from_pretrained`` of a compiled GPT-2 rebuilt its compiled layers without recording
  that they had been ``Conv1D``: ``decompile`` of the reloaded model gave ``nn.Linear``
  weights of the transposed shape (which no GPT-2 loads), where ``decompile`` of the model
  before saving gave ``Conv1D``.
- A language model's ``lm_head`` tied to its input embedding, compiled by a forced format
  (a copy of the tied weight, as documented), came back from ``decompile`` untied: a
  fine-tune then trained two tensors where the model had one, and ``save_pretrained``
  kept one of them.
- A compiled model's file was refused by another compiled copy of the same model ("another
  architecture?") when one compile had replaced a layer the other left plain (a tied
  ``lm_head`` under a forced format, convolutions with or without ``example_inputs``);
  the README promises every compiled copy takes the saved formats. And a file of the model
  before compile, loaded into its compiled copy (or the reverse), was "another
  architecture?" too; the message says which side is compiled now.
- ``compile`` of a moefied model refused it as "already compiled" (the ``RoutedFFN``'s
  reader is an activation-sparse layer) and advised ``decompile``, which replaced that
  reader by an ``nn.Linear``: ``moe.evaluate`` then failed raw, and ``compile`` of the copy
  replaced the router's projection, failing raw at its first call. ``decompile`` copies a
  routed layer whole now, and ``compile`` refuses it by name. ``moefy`` of a GPT-2 named
  ``unit 'ffn'``, an argument of ``prune_structured`` it does not have.
- Every attention pattern kept, per query block, the key block of its last row only: with
  an offset ``kv_len - q_len`` that is no multiple of the block size (chunked prefill over
  a cache) the block's earlier rows lost their own keys, and under ``TopKBlocks`` 14 of 64
  causal rows were left with no key at all (an output of 0). ``torch.compile`` of a model
  switched to the ``"sparsekit"`` attention failed inside inductor (the tile counts of
  ``visible_pairs``, traced); ``output_attentions=True`` gave ``()`` without a word.
- A weight added to the optimizer after ``attach`` (``add_param_group``: Lightning's
  ``BackboneFinetuning``) or unfrozen after it never had its gradient masked as it
  accumulated: clipping measured masked entries (0.242 against 0.163) for good. The hooks
  follow from the next step on.
- A ``GradualPruner`` (or any MaskSet) attached to an optimizer a ``DynamicSparsity`` of the
  same weights already drove was accepted: its after-step hook zeroed every connection
  RigL regrew (614 of 1024 kept weights at 0). Built in the other order it was refused;
  it is refused in both now, and so is a second schedule of the same weights (two
  ``GradualPruner``, a notebook cell run twice: the weights followed the union of both
  masks, the first at 0.893 sparsity for its target of 0.5).
- ``run_recipe`` reseeded the caller's global generator; YAML 1.1 keys such as ``on:`` or
  ``yes:`` were refused as "Keys should be strings, got True", naming no key.
- ``sparsekit.report`` with masks counted a weight its mask keeps as a nonzero even when
  it was 0 (re-pruning an unstructured prune with a row pattern: "70.06 %" for a file of
  89.56 % zeros), and ``prune``'s closing line gave the masks' sparsity beside a table of
  another total (``--exclude``): it counts the pruned tensors' zeros and says so now.
- ``llm-prune --out`` into a directory holding a ``model.safetensors`` left it there beside
  the new config (a concrete class loaded it, on a default-sized config: killed for
  memory); it is refused before pruning, as ``save_pretrained`` refuses it.
- The table-printing commands with standard output closed (``>&-``) ended in a traceback
  (``sys.stdout`` is None); a recipe's ``report: {markdown: false}`` printed Markdown
  anyway; ``--device cuda`` on a machine without CUDA listed ``'cuda'`` as accepted;
  ``prune`` of a model with nothing to prune blamed ``--exclude``, which was not given;
  ``demo --sparsities 0.1234561,0.1234564`` said the second "repeats" the first; an
  ``--out`` link that loops to itself was refused only after the work, naming ``path``.
- ``SparseLinear``'s output was a view made inside its autograd function: an in-place op
  after it (``nn.ReLU(inplace=True)``) failed the backward. A gradient taken with
  ``create_graph=True`` (an input-gradient penalty) came back without a graph, so the
  penalty's share of the weights' gradient was silently dropped (2.4 off); a constant
  incoming gradient, where no second backward could raise, is refused at once now. Under
  ``torch.autocast`` a bf16 input was refused naming a dtype the caller never chose; it
  runs in the weight's dtype, as autocast's float32 ops do.
- A bf16 model compiled with thresholds whose bias-free q/k (or gate/up) fused into one
  activation-sparse group saved a file no other compile of the model could load (its
  skeleton was float32: "weight_t must be torch.float32 … got torch.bfloat16"). With
  ``weight_dtype="bf16"``, an activation-sparse layer whose prompt rows float32 dense
  served rounded its one-row values to bf16 anyway: a row alone and among many differed
  by 3.8e-3.
- ``llm.prune(allocation="owl")`` with a block whose layers were all excluded let that
  block take OWL's sparsest share (its outlier ratio 0): the others missed the target
  (0.572 for 0.6). SparseGPT zeroed the weights of inputs the calibration never activated
  even at sparsity 0, its masks calling them kept: the model changed wherever they fired.
- ``llm.prune`` of a list of tokenizer outputs said "got list" (the items were wrong, and
  padding masks are not read), and ``targets="lm_head"`` of a tied model named the
  embedding's weight.
- ``engine.report`` showed an activation-sparse layer's weight-only timings as its own.
- A decision-cache record whose ``chosen`` was edited against its own timings (the
  activation-sparse layer lost) was taken: compile installed the layer, marked cached.
- ``activation.calibrate`` of a GPT-2 said it had "no nn.Linear modules", naming none of its
  Conv1D layers.
- The N:M ops took 1:8 (and 2:8), which no format builds, and the AVX-512 kernel summed 1:8
  wrongly at 1-3 rows (5.98 off): they take 1:4, 2:4 and 4:8 now. A thread count the
  system could not start (2000) made libgomp end the process; the kernels run at most as
  many threads as the process has processors.
- ``sparsekit.shrink`` took a BatchNorm1d without weights or statistics after a Linear
  layer for one per feature; over an ``(N, L, C)`` output with ``L == C`` it normalises
  each position over the features, and the shrunk model ran, silently wrong (0.4 off).
  Such a BatchNorm freezes its space now (one with weights or statistics fails at the
  shrunk model's first call; the README states the reading).
- ``prune_structured(unit="layers")`` of a Qwen2 left ``max_window_layers`` as it was,
  contradicting the ``layer_types`` it had cut.

Each test here fails with the files before the fix.
"""

from __future__ import annotations

import sys

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit.attention import (
    Antidiagonal,
    Exact,
    TopKBlocks,
    VerticalSlash,
    dense_block_mask,
)
from sparsekit.engine import decompile

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    sparsekit.prune(model, 0.5)
    return model


IDS = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))


@needs_kernels
def test_decompile_of_a_reloaded_compiled_gpt2_gives_conv1d(tmp_path):
    from transformers.pytorch_utils import Conv1D

    compiled = sparsekit.compile(_gpt2(), IDS, formats=["csr16", "dense"], cache=False)
    sparsekit.save_pretrained(compiled, tmp_path)
    back = decompile(sparsekit.from_pretrained(tmp_path))
    layer = back.transformer.h[0].mlp.c_fc
    assert type(layer) is Conv1D and layer.weight.shape == (32, 128)
    assert torch.equal(back(IDS).logits, decompile(compiled)(IDS).logits)


@needs_kernels
@pytest.mark.parametrize("reload", [False, True])
def test_decompile_ties_a_forced_lm_head_again(tmp_path, reload):
    model = _gpt2()
    compiled = sparsekit.compile(model, IDS, formats=["csr16"], cache=False)
    assert type(compiled.lm_head).__name__ == "CompiledLinear"  # a copy, as documented
    if reload:
        sparsekit.save_pretrained(compiled, tmp_path)
        compiled = sparsekit.from_pretrained(tmp_path)
    back = decompile(compiled)
    assert back.lm_head.weight is back.transformer.wte.weight
    assert torch.allclose(back(IDS).logits, model(IDS).logits, atol=1e-5)


@needs_kernels
def test_decompile_leaves_an_int8_copy_of_a_tied_weight_untied():
    model = _gpt2()
    compiled = sparsekit.compile(model, IDS, formats=["csr16"], weight_dtype="int8",
                                 cache=False)
    back = decompile(compiled)
    # its values are the int8 grid's, not the embedding's: tying would change one of them
    assert back.lm_head.weight is not back.transformer.wte.weight
    assert torch.equal(back.transformer.wte.weight, model.transformer.wte.weight)


def test_shrink_keeps_a_stateless_batchnorm1d_of_a_linear_whole():
    class SequenceNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 8)
            self.bn = nn.BatchNorm1d(8, affine=False, track_running_stats=False)
            self.b = nn.Linear(8, 3)

        def forward(self, x):  # x: (N, L=8, 5): bn normalises each position over (N, C)
            return self.b(self.bn(self.a(x)))

    from sparsekit.structured import dependency_groups

    torch.manual_seed(0)
    assert dependency_groups(SequenceNorm()) == []
    with_stats = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    assert len(dependency_groups(with_stats)) == 1  # an (N, C) MLP keeps its group


def test_removing_qwen2_layers_recounts_max_window_layers():
    from sparsekit.llm import prune_structured

    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = transformers.Qwen2ForCausalLM(config).eval()
    prune_structured(model, torch.randint(0, 64, (4, 16)), amount=0.25, unit="layers",
                     seqlen=16)
    kept = model.config.layer_types
    assert len(kept) == 3 and model.config.max_window_layers == kept.count("full_attention")
    derived = transformers.Qwen2Config(**{k: v for k, v in model.config.to_dict().items()
                                          if k != "layer_types"})
    assert derived.layer_types == kept


def _tied_llama():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    sparsekit.prune(model, 0.5)
    return model


LLAMA_IDS = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))


@needs_kernels
def test_a_compiled_copy_takes_layers_the_saved_one_compiled_or_left_plain(tmp_path):
    forced = sparsekit.compile(_tied_llama(), LLAMA_IDS, formats=["bitmap"], cache=False)
    auto = sparsekit.compile(_tied_llama(), LLAMA_IDS, formats=["dense", "bitmap"],
                             cache=False)
    assert type(forced.lm_head).__name__ == "CompiledLinear"
    assert auto.lm_head.weight is auto.model.embed_tokens.weight  # left plain: tied
    expected = {"forced": forced(LLAMA_IDS).logits, "auto": auto(LLAMA_IDS).logits}
    sparsekit.save(forced, tmp_path / "forced.safetensors")
    sparsekit.save(auto, tmp_path / "auto.safetensors")
    sparsekit.load(auto, tmp_path / "forced.safetensors")
    assert type(auto.lm_head).__name__ == "CompiledLinear"
    assert torch.equal(auto(LLAMA_IDS).logits, expected["forced"])
    sparsekit.load(forced, tmp_path / "auto.safetensors")
    assert forced.lm_head.weight is forced.model.embed_tokens.weight  # tied again
    assert torch.equal(forced(LLAMA_IDS).logits, expected["auto"])


@needs_kernels
def test_a_conv_compiled_in_the_file_and_plain_here_loads_and_a_refusal_changes_nothing(
        tmp_path):
    def cnn():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4))
        sparsekit.prune(model, 0.5)
        return model

    x = torch.randn(2, 3, 8, 8)
    with_conv = sparsekit.compile(cnn(), (x,), formats=["bitmap"], cache=False)
    without = sparsekit.compile(cnn(), formats=["bitmap"], cache=False)
    assert type(with_conv[0]).__name__ == "CompiledConv2d" and type(without[0]) is nn.Conv2d
    sparsekit.save(with_conv, tmp_path / "c.safetensors")
    other = cnn()
    other[3] = nn.Linear(288, 5)  # refused on the shape: the conv must stay as it was
    broken = sparsekit.compile(other, formats=["bitmap"], cache=False)
    with pytest.raises(ValueError, match="out_features=5"):
        sparsekit.load(broken, tmp_path / "c.safetensors")
    assert type(broken[0]) is nn.Conv2d
    sparsekit.load(without, tmp_path / "c.safetensors")
    assert type(without[0]).__name__ == "CompiledConv2d"
    assert torch.equal(without(x), with_conv(x))


@needs_kernels
def test_loading_across_compile_says_which_side_is_compiled(tmp_path):
    def mlp():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        sparsekit.prune(model, 0.5)
        return model

    compiled = sparsekit.compile(mlp(), formats=["bitmap"], cache=False)
    sparsekit.save(compiled, tmp_path / "compiled.safetensors")
    sparsekit.save(mlp(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="holds compiled layers and this model none"):
        sparsekit.load(mlp(), tmp_path / "compiled.safetensors")
    with pytest.raises(ValueError, match="holds no compiled layer and this model is compiled"):
        sparsekit.load(compiled, tmp_path / "plain.safetensors")


def test_compile_refuses_a_routed_ffn_and_decompile_copies_it_whole():
    from sparsekit import moe

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    routed = moe.moefy(llama, ids, experts=8, keep=0.5, steps=2, rank=8)
    with pytest.raises(ValueError, match="model.layers.0.mlp is a RoutedFFN, which runs"):
        sparsekit.compile(routed, ids[:1, :4])
    copy = decompile(routed)
    assert type(copy.model.layers[0].mlp.w_out) is type(routed.model.layers[0].mlp.w_out)
    assert moe.evaluate(copy, ids) == moe.evaluate(routed, ids)
    with pytest.raises(ValueError, match="is a RoutedFFN"):
        sparsekit.compile(copy, ids[:1, :4])


def test_moefy_names_the_model_not_a_unit_argument():
    from sparsekit import moe

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    with pytest.raises(ValueError, match=r"^model: block 'transformer.h.0' \(GPT2Block\)"):
        moe.moefy(gpt2, IDS, experts=4, keep=0.5, steps=1)


@pytest.mark.parametrize("pattern", [
    TopKBlocks(density=0.05), Exact(threshold=0.5), Antidiagonal(threshold=0.5, stride=4),
    VerticalSlash(threshold=0.5, last_queries=8)], ids=repr)
def test_every_pattern_keeps_each_rows_own_keys_at_any_offset(pattern):
    torch.manual_seed(0)
    q_len, kv_len, block = 32, 65, 8  # offset 33: a query block's rows lie in two key blocks
    q, k = torch.randn(1, 2, q_len, 16), torch.randn(1, 2, kv_len, 16)
    mask = pattern.block_mask(q, k, block_size=block, causal=True)
    pairs = dense_block_mask(mask, q_len, kv_len, causal=True, block_size=block)
    rows = torch.arange(q_len)
    assert pairs.expand(1, 2, q_len, kv_len)[..., rows, rows + kv_len - q_len].all()


def _switched_llama(min_length: int = 0):
    from sparsekit import attention

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")).eval()
    attention.apply(model, pattern="sink_window", sinks=16, window=32, block_size=16,
                    min_length=min_length)
    return model


def test_torch_compile_runs_a_switched_model():
    model = _switched_llama()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(ids).logits, model(ids).logits, atol=1e-5)


def test_output_attentions_on_a_switched_model_warns():
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="computes no attention weights"), torch.no_grad():
        assert _switched_llama()(ids, output_attentions=True).attentions == ()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _masked_grad(model, masks, name="2.weight"):
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return model.get_parameter(name).grad[~masks.masks[name]].abs().sum().item()


@pytest.mark.parametrize("late", ["param_group", "unfrozen"])
def test_a_weight_the_optimizer_takes_after_attach_is_masked_as_it_accumulates(late):
    model = _mlp()
    masks = sparsekit.prune(model, 0.5)
    if late == "param_group":
        opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    else:
        model[2].weight.requires_grad_(False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks.attach(opt)
    if late == "param_group":
        opt.add_param_group({"params": list(model[2].parameters())})
    else:
        model[2].weight.requires_grad_(True)
    _masked_grad(model, masks)
    opt.step()  # the step that finds it masks it, and hooks it
    opt.zero_grad()
    assert _masked_grad(model, masks) == 0.0


def test_a_maskset_refuses_an_optimizer_a_dynamic_sparsity_drives():
    from sparsekit import DynamicSparsity, GradualPruner

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    DynamicSparsity(model, opt, method="rigl", sparsity=0.5, every=2, end_step=10)
    with pytest.raises(ValueError, match="driven by a DynamicSparsity of these weights"):
        GradualPruner(model, 0.8, start_step=0, end_step=4, every=1, optimizer=opt)


def test_a_second_schedule_of_the_same_weights_is_refused():
    from sparsekit import GradualPruner

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    GradualPruner(model, 0.5, start_step=0, end_step=4, every=2, optimizer=opt)
    with pytest.raises(ValueError, match="keeps the masks of a GradualPruner of these weights"):
        GradualPruner(model, 0.9, start_step=0, end_step=4, every=2, optimizer=opt,
                      method="random")
    sparsekit.prune(model, 0.6).attach(opt)  # a plain MaskSet beside it is no schedule


def test_run_recipe_leaves_the_callers_generator_alone(tmp_path):
    from sparsekit.recipe import load_recipe, run_recipe

    (tmp_path / "r.yaml").write_text("model: lenet_300_100\nseed: 3\nprune: {sparsity: 0.5}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_recipe(recipe, log=lambda _: None)
    assert torch.equal(torch.rand(3), expected)


def test_a_recipe_key_yaml_reads_as_a_boolean_is_named(tmp_path):
    from sparsekit.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("model: lenet_300_100\nprune: {sparsity: 0.5, on: 2}\n")
    with pytest.raises(ValueError, match="prune.on: Extra inputs are not permitted"):
        load_recipe(tmp_path / "r.yaml")


def test_report_counts_the_nonzeros_a_mask_keeps():
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 4.0]]))
    keep = torch.tensor([[True, True, False, False], [True, True, True, True]])
    model = nn.Sequential(layer)
    row = sparsekit.report(model, masks=sparsekit.MaskSet(model, {"0.weight": keep})).rows[0]
    assert row.nonzeros == 3  # 1.0, 3.0, 4.0: a kept 0 is no nonzero, a dropped 2.0 gone


def _lenet_file(tmp_path):
    from sparsekit.models import lenet_300_100

    torch.manual_seed(0)
    path = tmp_path / "dense.safetensors"
    sparsekit.save(lenet_300_100(), path)
    return path


def test_prune_says_the_sparsity_of_the_tensors_it_pruned(tmp_path, capsys):
    from sparsekit.cli.main import main
    from sparsekit.models import lenet_300_100

    out = tmp_path / "excl.safetensors"
    assert main(["prune", str(_lenet_file(tmp_path)), "--sparsity", "0.9", "--exclude", "fc1",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    model = lenet_300_100()
    masks = sparsekit.load(model, out)
    zeros = sum(int((p == 0).sum()) for p in masks.params.values())
    total = sum(p.numel() for p in masks.params.values())
    assert f"sparsity {zeros / total:.2%} of the {len(masks.masks)} pruned tensors" in line


def test_cli_tables_with_standard_output_closed(tmp_path, capsys, monkeypatch):
    from sparsekit.cli.main import main

    path = _lenet_file(tmp_path)
    monkeypatch.setattr("sys.stdout", None)
    assert main(["report", str(path)]) == 0
    assert main(["diff", str(path), str(path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_llm_prune_refuses_an_output_holding_transformers_weights(tmp_path, capsys):
    from _cli import user_error

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "out")
    (tmp_path / "calib.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    capsys.readouterr()  # transformers' own progress bars
    err = user_error(capsys, "llm-prune", str(tmp_path / "model"), "--calib",
                     str(tmp_path / "calib.txt"), "--out", str(tmp_path / "out"))
    assert "--out:" in err and "holds transformers weights (model.safetensors)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_a_recipe_report_without_markdown_is_a_plain_table(tmp_path):
    from sparsekit.recipe import load_recipe, run_recipe

    (tmp_path / "r.yaml").write_text("model: lenet_300_100\nprune: {sparsity: 0.5}\n"
                                     "report: {markdown: false}\n")
    lines: list[str] = []
    run_recipe(load_recipe(tmp_path / "r.yaml"), log=lines.append)
    table = lines[-1]
    assert "fc1" in table and "| --- " not in table and "---:" not in table


def test_cli_messages_name_what_was_wrong():
    import argparse

    from sparsekit.cli._errors import UsageError
    from sparsekit.cli.demo import _parse_sparsities
    from sparsekit.cli.prune import _check_fits

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"accepted: None or a device this machine has: "
                                             r"'cpu'$"):
            sparsekit.llm.prune(_tied_llama(), torch.randint(0, 64, (1, 8)), device="cuda")
    with pytest.raises(ValueError, match="names the same checkpoint \\(0.123456\\) as entry 1"):
        _parse_sparsities("0.1234561,0.1234564")
    with pytest.raises(ValueError, match="repeats 0.5 \\(entry 1\\)"):
        _parse_sparsities("0.5,0.50")
    with pytest.raises(UsageError, match="^model: .*no default targets"):
        _check_fits(argparse.Namespace(exclude=[], pattern="unstructured"),
                    nn.Sequential(nn.ReLU()))


def _sparse_pair(seed: int = 0):
    import copy

    from sparsekit.engine.sparse_linear import SparseLinear

    torch.manual_seed(seed)
    dense = nn.Linear(8, 6)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.5)
    return dense, SparseLinear.from_linear(copy.deepcopy(dense))


@needs_kernels
@pytest.mark.parametrize("shape", [(4, 8), (2, 4, 8)])
def test_an_in_place_op_after_a_sparse_linear_trains(shape):
    dense, sparse = _sparse_pair()
    x = torch.randn(*shape)
    grads = []
    for layer in (dense, sparse):
        model = nn.Sequential(layer, nn.ReLU(inplace=True), nn.Linear(6, 2))
        torch.manual_seed(1)
        model[2].reset_parameters()
        model(x).square().sum().backward()
        grads.append(layer.bias.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@needs_kernels
def test_a_second_order_gradient_through_a_sparse_linear_is_refused():
    _, sparse = _sparse_pair()
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="SparseLinear is differentiable once"):
        torch.autograd.grad(sparse(x).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(sparse(x).sum(), x)  # once is fine
    assert g.shape == x.shape


@needs_kernels
def test_a_sparse_linear_runs_under_autocast():
    dense, sparse = _sparse_pair()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, dense(x.float()), atol=1e-5)


def _activation_always_wins(monkeypatch):
    """compile's timing rule, told that the activation-sparse layer won (tiny layers never
    win it), so that the paths after the decision run as on a large model."""
    compile_module = sys.modules["sparsekit.engine.compile"]
    real = compile_module._activation_wins
    monkeypatch.setattr(compile_module, "_activation_wins",
                        lambda *args: {**real(*args), "chosen": True})
    return real


@needs_kernels
def test_a_bf16_fused_activation_group_loads_into_another_compile(tmp_path, monkeypatch):
    from sparsekit import activation

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
            self.o = nn.Linear(64, 32)

        def forward(self, x):
            return self.o(torch.relu(self.q(x)) * self.k(x))

    torch.manual_seed(0)
    model = Gated().eval().to(torch.bfloat16)
    thresholds = activation.calibrate(model, torch.randn(32, 64).bfloat16(), sparsity=0.5)
    x = torch.randn(4, 64).bfloat16()
    real = _activation_always_wins(monkeypatch)
    saved = sparsekit.compile(model, x, activation_sparsity=thresholds, cache=False)
    monkeypatch.setattr(sys.modules["sparsekit.engine.compile"], "_activation_wins", real)
    assert type(saved.q).__name__ == "FusedLinear"
    sparsekit.save(saved, tmp_path / "c.safetensors")
    other = sparsekit.compile(model, x, cache=False)
    assert type(other.q).__name__ == "CompiledLinear"
    sparsekit.load(other, tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(other(x), saved(x))


def _mlp_with_thresholds():
    from sparsekit import activation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    return model, activation.calibrate(model, torch.randn(64, 128), sparsity=0.5)


@needs_kernels
def test_a_bf16_activation_layer_computes_one_row_as_among_many(monkeypatch):
    model, thresholds = _mlp_with_thresholds()
    _activation_always_wins(monkeypatch)
    compiled = sparsekit.compile(model, torch.randn(8, 128), activation_sparsity=thresholds,
                                 weight_dtype="bf16", formats=["dense"], cache=False)
    layer = compiled[0]
    assert type(layer).__name__ == "ActivationSparseLinear"
    x = torch.randn(8, 128)
    with torch.no_grad():
        many = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(8)])
    assert torch.allclose(alone, many, atol=1e-5)


def _llama4():
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            block.input_layernorm.weight[: 4 * i] *= 20  # outliers that differ per block
    return model


def test_owl_keeps_the_target_over_the_blocks_it_prunes():
    from sparsekit import llm

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    masks = llm.prune(_llama4(), ids, method="wanda", sparsity=0.6, allocation="owl",
                      nsamples=4, exclude="model.layers.0.*")
    assert not any("layers.0." in name for name in masks.masks)
    assert masks.sparsity() == pytest.approx(0.6, abs=0.005)


def test_sparsegpt_keeps_the_weights_of_inputs_calibration_never_saw():
    from sparsekit.llm.sparsegpt import sparsegpt_prune

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    x[:, 3] = 0  # a ReLU neuron that never fired on the calibration data
    weight = torch.randn(4, 8)
    pruned, keep = sparsegpt_prune(weight, 2 * x.T @ x, sparsity=0.0)
    assert bool(keep.all()) and torch.equal(pruned[:, 3], weight[:, 3])


def test_llm_prune_messages_name_the_items_and_the_layer():
    from sparsekit import llm

    model = _tied_llama()
    batch = {"input_ids": torch.randint(0, 64, (1, 8)), "attention_mask": torch.ones(1, 8)}
    with pytest.raises(TypeError, match="got a list holding a dict .*attention_mask"):
        llm.prune(model, [batch])
    with pytest.raises(ValueError, match=r"targets: \['lm_head.weight'\] lie outside"):
        llm.prune(model, torch.randint(0, 64, (2, 8)), targets="lm_head")


@needs_kernels
def test_engine_report_shows_an_activation_layers_own_one_row_time(monkeypatch):
    from sparsekit.engine import report

    model, thresholds = _mlp_with_thresholds()
    _activation_always_wins(monkeypatch)
    compiled = sparsekit.compile(model, torch.randn(8, 128), activation_sparsity=thresholds,
                                 cache=False)
    choice = compiled.sparsekit_choices["0"]
    own = choice["activation"]["decode"]["times_ms"]["activation"][1]
    row = report(compiled).rows[0]
    assert row.extra["format"] == "activation" and row.extra["ms sparse"] == own
    dense = choice["times_ms"]["dense"][1]
    assert row.extra["ms dense"] == dense and row.extra["speedup"] == pytest.approx(dense / own)


@needs_kernels
@pytest.mark.parametrize("n, m", [(1, 8), (2, 8), (3, 4)])
def test_nm_ops_take_only_the_patterns_formats_build(n, m):
    ops = torch.ops.sparsekit
    values = torch.randn(4, 128 // m * n)
    fields = torch.zeros(4, 128 // m * n // (32 // (2 if m == 4 else 4)) + 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=f"unsupported N:M {n}:{m}"):
        ops.nm_linear(values, fields, torch.randn(1, 128), None, n, m, 128, 1, None)


@needs_kernels
def test_a_thread_count_the_system_cannot_start_runs_on_its_processors(tmp_path):
    import subprocess
    import textwrap

    script = tmp_path / "threads.py"
    script.write_text(textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
        import torch
        from sparsekit.engine.formats import FORMATS
        w = torch.randn(64, 256) * (torch.rand(64, 256) < 0.3)
        y = FORMATS["csr16"].from_dense(w, threads=2000).matmul(torch.randn(8, 256))
        print("returned", tuple(y.shape))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "returned (8, 64)" in done.stdout, done.stderr[-500:]


@needs_kernels
def test_a_cached_activation_choice_that_contradicts_its_timings_is_ignored(tmp_path,
                                                                            monkeypatch):
    import json

    from sparsekit import activation
    from sparsekit.engine import decisions

    monkeypatch.setattr(decisions, "directory", lambda: tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    thresholds = activation.calibrate(model, torch.randn(32, 128), sparsity=0.5)
    x = torch.randn(8, 128)
    first = sparsekit.compile(model, x, activation_sparsity=thresholds)
    lost = [n for n in ("0", "2") if not first.sparsekit_choices[n]["activation"]["chosen"]]
    edited = 0
    for file in tmp_path.glob("*.json"):
        data = json.loads(file.read_text())
        record = data["choice"].get("activation") if isinstance(data["choice"], dict) else None
        if data["key"].get("kind") == "activation" and not record["chosen"]:
            record["chosen"] = True
            file.write_text(json.dumps(data))
            edited += 1
    assert lost and edited
    with pytest.warns(RuntimeWarning, match="chosen True contradicts its timings"):
        second = sparsekit.compile(model, x, activation_sparsity=thresholds)
    for name in lost:
        assert type(second.get_submodule(name)).__name__ != "ActivationSparseLinear"


def test_calibrating_a_gpt2_names_its_conv1d_layers():
    from sparsekit import activation

    with pytest.raises(ValueError, match="GPT-2 Conv1D layers are no nn.Linear"):
        activation.calibrate(_gpt2(), IDS, sparsity=0.5)


def test_an_output_link_that_loops_is_refused_first(tmp_path):
    from sparsekit.cli._errors import UsageError
    from sparsekit.cli._output import check_output

    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop.name)
    with pytest.raises(UsageError, match="^--out .* is a symbolic link that loops"):
        check_output(loop, inputs=[])
