"""Hostile inputs, round 29: compiled layers under torch.compile's autograd, fused
projections under ``torch.inference_mode``, structured removal on more architectures, and
int8 grids left behind by a fine-tune.

- Under ``torch.compile`` a backward through a compiled layer's product completed and left
  the layers before it without a gradient (``None``), with only torch's warning that no
  autograd kernel was registered; eager raised the documented ``ValueError``. The recording
  that raises is traced now, with ``fullgraph=True`` too.
- A fused group's member called twice with one inference tensor (a static input buffer
  refilled in place between two decode steps, the first of which called only that member)
  returned the first step's kept output.
- ``llm.prune_structured(unit="heads")`` cut q/k/v/o but not OLMo-2's q/k norms over the
  whole projection (nor Cohere's per-head norms, StableLM's norm per head), and left
  StableLM's own ``num_heads``: the model it returned no longer ran. Those are refused now,
  before anything changes; StableLM's head counts follow the cut (and its config, from
  which it derives its head size, keeps its widths: the shapes are recorded).
- ``unit="layers"`` left every per-layer config entry but ``layer_types`` as it was:
  SmolLM3's ``no_rope_layers`` and Qwen2-MoE's ``mlp_only_layers`` reloaded other blocks
  (silently different outputs); DeepSeek-V3's ``first_k_dense_replace`` and ESMC's residual
  scaling (from the layer count) cannot follow and are refused before anything changes.
- A ``num_key_value_heads`` left in a BERT config took BERT for grouped-query attention:
  a raw transformers error after the weights were cut.
- A one-block model was told "amounts from 0.5 remove one", then "would remove all 1
  layers".
- ``llm.prune`` calibrated ALBERT's one block, run at every depth, on its first depth's
  inputs only; a block run more than once per forward pass is refused by name now.
- ``compile`` of an ``llm.prune(..., quantize="int8")`` model after a LoRA merge (or any
  fine-tune) rounded the weights back onto the stale grid: the fine-tune was gone.
- ``sparsekit.shrink`` of an int8 model cut the weights' rows but not their
  ``weight_scale``: the copy did not compile (an error naming neither layer nor cause).
- ``sparsekit.diff`` of a ``save_pretrained(..., dense_dtype="int8")`` directory compared
  the int8 codes (an embedding doubled: "0 changed") and took the row scales for tensors of
  another architecture.
- ``prune``, ``GradualPruner``, ``llm.prune``, ``prune_structured``, ``activation.calibrate``
  and ``sparse_lora`` of a compiled model said "no default targets", "no list of
  transformer blocks", or printed peft's repr of a fused group; they name the compiled
  layer and ``decompile`` now. ``compile`` of a model with activation thresholds applied
  failed its output check ("differs by 3.5e-01"); masks of a model made smaller since, or
  of a compiled model, were "made for another model?".
- A BatchTopK SAE kept how far its inference threshold had run in a plain attribute: a
  resume from ``state_dict`` restarted it at 0, and the next batch's smallest kept value
  replaced the learned threshold. ``sae.metrics`` summed squares around 0: activations
  sharing a large offset (3e6 + noise) were refused as not varying.
- ``sparsekit prune --pattern block:7x7`` / ``--exclude x`` that the model cannot take were
  refused in the library's words, naming no flag.
- ``sparse_lora`` with ``lora_bias=True`` never trained the adapter's bias, then merged it
  (4.0 off the trained model); ``quantize.scales_at`` read uint8 indices as a boolean mask;
  ``soup`` averaged embeddings pruned to other masks into their union, and kept an int8
  grid its averaged weights no longer lie on; ``masked_delta`` of a density that rounds to
  no entry trained nothing; ``SoftThreshold`` under an LR scheduler could not be saved;
  ``GroupEnvelope`` rounded its kept channels half to even (2 of 5 at 0.5) where the
  channel pruning keeps 3; FLAP refused GPT-2's Conv1D with a raw ``TypeError`` (it
  scores it now), GraSP a model returning a tuple.
- ``compile`` fused two layers whose shared input the model changed in place between their
  calls (under ``torch.inference_mode`` the second returned its slice of the old input);
  a fused group whose first member was replaced (by its ``to_linear()``) saved without the
  others' weights; ``compile`` of a bare ``nn.Linear`` returned it uncompiled, even with
  ``formats=`` forced. ``rows=`` of bytes or a mapping was read as its bytes or keys, a
  0-d tensor failed raw; ``engine.report`` of a model that loaded another format showed
  the compile's timings and rounding error beside the loaded format.
- ``sparsekit.diff`` compared integers as doubles (2**60 + 1 against 2**60: no change at
  any ``atol > 0``, an update of norm 0) and reported an entry that became NaN as an update
  of norm 0, an infinite one as float64's largest value.
- ``allocation.erdos_renyi_densities`` took a sparsity of 1.5 (a density of -0.5),
  ``owl_sparsities`` a sparsity of 1.5 and ``lam=-5``.
- ``decompile`` of a compiled GPT-2 gave ``nn.Linear`` where ``Conv1D`` stood: a weight of
  the transposed shape, which no GPT-2 loaded.
- ``kernels.use_isa("scalar")`` as a statement, without ``with``, changed nothing without a
  word (and took any name).

Report-only probes found these (repros in the session's scratch directory); each test here
fails with the files before the fix.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _cli import user_error
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit import llm
from sparsekit.blocks import check_runs_once, find_blocks
from sparsekit.engine import CompiledLinear
from sparsekit.engine.fused import FusedProjections, stack
from sparsekit.quantize import attach_scales, attached_scales, int8_scales, quantize_int8
from sparsekit.structured import transformer_groups

transformers = pytest.importorskip("transformers")

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0)


def _pruned(rows: int, cols: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.5)
    return linear


@needs_kernels
@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("format", ["bitmap", "csr16"])
def test_backward_through_a_compiled_layer_raises_under_torch_compile(fullgraph, format):
    head = nn.Linear(16, 32)
    model = nn.Sequential(head, CompiledLinear.from_linear(_pruned(8, 32), format))
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph, backend="eager")
    y = compiled(x)  # the forward runs where autograd records
    with torch.no_grad():
        assert torch.allclose(y, model(x), atol=1e-6)
    with pytest.raises(ValueError, match=f"the {format} kernel has no backward"):
        y.sum().backward()
    assert head.weight.grad is None
    with pytest.raises(ValueError, match=f"the {format} kernel has no backward"):
        model(x).sum().backward()  # eager, as before


@needs_kernels
def test_fused_member_called_again_with_a_refilled_inference_buffer_recomputes():
    q, k = _pruned(16, 32, seed=1), _pruned(8, 32, seed=2)
    group = FusedProjections(CompiledLinear.from_linear(stack([q, k]), "bitmap"), [16, 8])
    fq, fk = group.members()
    with torch.inference_mode():
        buffer = torch.randn(1, 32)
        first = fq(buffer)  # a step that calls only q
        buffer.copy_(torch.randn(1, 32))  # the next step's input, in place
        second, other = fq(buffer), fk(buffer)
        assert not torch.equal(first, second)
        assert torch.allclose(second, q(buffer), atol=1e-5)
        assert torch.allclose(other, k(buffer), atol=1e-5)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())


def test_heads_beside_whole_width_qk_norms_are_refused_before_anything_changes():
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**BASE)).eval()
    before = _state(model)
    with pytest.raises(ValueError, match=r"self_attn.q_norm.weight of shape \(32,\) beside"):
        llm.prune_structured(model, amount=0.5, unit="heads", method="magnitude")
    assert _unchanged(model, before)


def test_stablelm_heads_run_and_reload(tmp_path):
    torch.manual_seed(0)
    model = transformers.StableLmForCausalLM(transformers.StableLmConfig(**BASE)).eval()
    llm.prune_structured(model, amount=0.5, unit="heads", method="magnitude")
    ids = _ids()
    y = _logits(model, ids)  # its view by self.num_heads failed
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(llm.load_pretrained(tmp_path).eval(), ids), y)


def test_a_stray_kv_head_count_in_a_bert_config_is_no_raw_error(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4)
    config.num_key_value_heads = 2
    model = transformers.BertModel(config).eval()
    llm.prune_structured(model, amount=0.25, unit="heads", method="magnitude")
    assert model.encoder.layer[0].attention.self.query.out_features == 24
    with torch.no_grad():
        y = model(_ids()).last_hidden_state
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(llm.load_pretrained(tmp_path).eval()(_ids()).last_hidden_state, y)


def _first_block_idle(model: nn.Module) -> None:
    """Block 0 an identity (its output projections zero): ShortGPT removes it."""
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        for name, p in layer.mlp.named_parameters():
            if "down" in name:
                p.zero_()


@pytest.mark.parametrize("make", [
    lambda: transformers.SmolLM3ForCausalLM(
        transformers.SmolLM3Config(**BASE, no_rope_layers=[1, 0, 1])),
    lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, mlp_only_layers=[1])),
], ids=["smollm3-no-rope-layers", "qwen2moe-mlp-only-layers"])
def test_removed_layers_take_their_per_layer_config_entries_along(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    _first_block_idle(model)
    ids = _ids()
    llm.prune_structured(model, ids, amount=0.34, unit="layers")
    assert len(model.model.layers) == 2
    y = _logits(model, ids)
    model.save_pretrained(tmp_path)
    for load in (llm.load_pretrained, transformers.AutoModelForCausalLM.from_pretrained):
        assert torch.equal(_logits(load(tmp_path).eval(), ids), y)


def test_a_list_as_long_as_the_layer_count_but_not_per_layer_stays():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **BASE, eos_token_id=[1, 2, 3])).eval()
    _first_block_idle(model)
    llm.prune_structured(model, _ids(), amount=0.34, unit="layers")
    assert model.config.num_hidden_layers == 2 and model.config.eos_token_id == [1, 2, 3]


def test_layers_an_architecture_builds_from_a_per_layer_rule_are_refused():
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, max_position_embeddings=64, pad_token_id=0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    _first_block_idle(model)
    before, ids = _state(model), _ids()
    with pytest.raises(ValueError, match="block 1 of DeepseekV3ForCausalLM would reload as "
                                         "another block once .0. are removed"):
        llm.prune_structured(model, ids, amount=0.34, unit="layers")
    assert _unchanged(model, before) and model.config.num_hidden_layers == 3


def test_a_one_block_model_is_told_no_amount_removes_a_layer():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**BASE, "num_hidden_layers": 1})).eval()
    for amount in (0.3, 0.5):
        with pytest.raises(ValueError, match="the model has one block, which no amount can "
                                             "remove"):
            llm.prune_structured(model, _ids(), amount=amount, unit="layers")


def test_a_block_shared_by_every_depth_is_refused_by_llm_prune():
    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(transformers.AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)).eval()
    before = _state(model)
    with pytest.raises(ValueError, match=r"block 0 \(AlbertLayerGroup\) runs 3 times in one "
                                         "forward pass"):
        llm.prune(model, _ids(), method="wanda", sparsity=0.5)
    assert _unchanged(model, before)
    check_runs_once(model, find_blocks(_llama()), _ids())  # another model's blocks: never run
    llama = _llama()
    check_runs_once(llama, find_blocks(llama), _ids())  # each once: no error


def test_moe_ffns_are_named_in_the_refusal():
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **BASE, num_local_experts=4, num_experts_per_tok=2)).eval()
    with pytest.raises(ValueError, match="mixture-of-experts FFNs"):
        llm.prune_structured(model, amount=0.5, unit="ffn", method="magnitude")


def _int8_layer() -> nn.Linear:
    """A layer whose weight lies on the int8 grid it carries (as llm.prune(quantize=) does)."""
    layer = _pruned(16, 32, seed=4)
    scales = int8_scales(layer.weight.detach())
    codes, scales = quantize_int8(layer.weight.detach(), scales)
    with torch.no_grad():
        layer.weight.copy_(codes.float() * scales[:, None])
    attach_scales(layer, scales)
    return layer


@needs_kernels
def test_compile_refuses_a_weight_moved_off_its_int8_grid():
    layer = _int8_layer()
    x = torch.randn(3, 32)
    sparsekit.compile(nn.Sequential(layer), x, formats=["bitmap"], cache=False)  # on its grid
    with torch.no_grad():  # a merged LoRA: a change far below half a step
        layer.weight.add_(1e-5 * (layer.weight != 0))
    with pytest.raises(ValueError, match=r"model: 0: the weight lies off its int8 grid "
                                         r"\(weight_scale\)"):
        sparsekit.compile(nn.Sequential(layer), x, formats=["bitmap"], cache=False)
    sparsekit.compile(nn.Sequential(layer), x, formats=["dense"], cache=False)  # kept float


def _llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE)).eval()


def test_shrink_cuts_the_int8_scales_with_their_rows():
    model = _llama()
    llm.prune(model, _ids(), method="magnitude", sparsity=0.5, quantize="int8")
    masks = sparsekit.prune(model, 0.5, pattern="head")
    small = sparsekit.shrink(model, masks, groups=transformer_groups(model, "heads"))
    q = small.model.layers[0].self_attn.q_proj
    assert q.out_features < 32 and attached_scales(q).shape == (q.out_features,)
    ids = _ids()
    y = _logits(small, ids)
    assert torch.allclose(_logits(sparsekit.compile(small, ids, cache=False), ids), y,
                          atol=1e-4)


def test_diff_reads_an_int8_directory_as_its_values(tmp_path):
    model = _llama()
    sparsekit.prune(model, 0.5)
    sparsekit.save_pretrained(model, tmp_path / "a", dense_dtype="int8")
    reloaded = sparsekit.from_pretrained(tmp_path / "a")
    assert sparsekit.diff(reloaded, tmp_path / "a").totals["changed"] == 0
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2.0)
    sparsekit.save_pretrained(model, tmp_path / "b", dense_dtype="int8")
    rows = {r.name: r for r in sparsekit.diff(tmp_path / "a", tmp_path / "b").rows}
    assert rows["model.embed_tokens.weight"].relative_norm == pytest.approx(1.0, rel=1e-3)
    before = _llama()  # a model against itself quantized: its grids are no other tensors
    quantized = _llama()
    llm.prune(quantized, _ids(), method="magnitude", sparsity=0.5, quantize="int8")
    rows = {r.name for r in sparsekit.diff(before, quantized).rows}
    assert "model.layers.0.mlp.up_proj.weight" in rows and not any("weight_scale" in r
                                                                     for r in rows)
    grid = _llama()  # weights on their own int8 grid: stored on it
    llm.prune(grid, _ids(), method="magnitude", sparsity=0.5, quantize="int8")
    sparsekit.save_pretrained(grid, tmp_path / "c", dense_dtype="int8")
    assert sparsekit.diff(sparsekit.from_pretrained(tmp_path / "c"),
                          tmp_path / "c").totals["changed"] == 0


@needs_kernels
def test_calls_on_a_compiled_model_name_the_compiled_layer():
    model = _llama()
    sparsekit.prune(model, 0.5)
    compiled = sparsekit.compile(model, _ids(), formats=["csr16"], cache=False)
    calls = [lambda: sparsekit.prune(compiled, 0.7),
             lambda: sparsekit.GradualPruner(compiled, 0.8, start_step=0, end_step=10, every=1),
             lambda: llm.prune(compiled, _ids()),
             lambda: llm.prune_structured(compiled, amount=0.5, method="magnitude"),
             lambda: sparsekit.activation.calibrate(compiled, _ids())]
    for call in calls:
        with pytest.raises(ValueError, match=r"model: model\.layers\.0\..* is compiled "
                                             r"\(\w+\); .* sparsekit\.engine\.decompile"):
            call()


def test_compile_of_a_model_with_thresholds_applied_says_so():
    model = _llama()
    act = sparsekit.activation.calibrate(model, _ids(), sparsity=0.5)
    act.apply(model)
    with pytest.raises(ValueError, match=r"have activation thresholds applied .* remove\(\) "
                                         r"them and pass the thresholds to compile"):
        sparsekit.compile(model, _ids(), cache=False)


def test_masks_of_a_model_made_smaller_name_both_shapes(tmp_path):
    model = _llama()
    masks = sparsekit.prune(model, 0.5)
    llm.prune_structured(model, amount=0.5, unit="heads", method="magnitude")
    with pytest.raises(ValueError, match=r"\(32, 32\) does not fit the model's tensor of "
                                         r"shape \(16, 32\) .* made smaller"):
        sparsekit.save(model, tmp_path / "m.safetensors", masks)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_batchtopk_sae_resumes_from_its_state_dict():
    from sparsekit.sae import SAE

    torch.manual_seed(0)
    sae = SAE(16, 32, activation="batchtopk", k=4).train()
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.no_grad():
        for x in batches[:5]:
            sae(x)
        resumed = SAE(16, 32, activation="batchtopk", k=4).train()
        resumed.load_state_dict(sae.state_dict())
        sae(batches[5])
        resumed(batches[5])
    assert int(resumed.threshold_updates) == 6
    assert torch.equal(resumed.threshold, sae.threshold)


def test_sae_metrics_of_activations_with_a_large_offset():
    from sparsekit.sae import SAE, metrics

    torch.manual_seed(0)
    sae = SAE(16, 32, activation="topk", k=4)
    x = 3e6 + torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        recon = sae(x).double()
    y = x.double()
    expected = float((recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert metrics(sae, [x[:50], x[50:]])["fvu"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--pattern", "block:7x7"], "error: --pattern 'block:7x7': pattern 'block:7x7' does not "
                                 "divide 'fc1.weight'"),
    (["--exclude", "nonexist"], "error: --exclude: exclude entry 'nonexist' matches none"),
])
def test_cli_prune_names_the_flag_the_model_cannot_take(capsys, tmp_path, lenet_checkpoint,
                                                        flags, expected):
    out = tmp_path / "out.safetensors"
    err = user_error(capsys, "prune", str(lenet_checkpoint), "--sparsity", "0.5", *flags,
                     "--out", str(out))
    assert expected in err and not out.exists()


def test_sparse_lora_refuses_an_adapter_bias():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora

    model = _llama()
    before = _state(model)
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(ValueError, match="config.lora_bias=True: the adapter's bias"):
        sparse_lora(model, config)
    assert _unchanged(model, before)


def test_scales_at_takes_int32_and_int64_indices_only():
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.quantize import scales_at

    scales = torch.tensor([10.0, 20.0])
    rows, cols = torch.tensor([1, 1]), torch.tensor([0, 1])
    assert scales_at(scales, rows.to(torch.int32), cols, 4).tolist() == [20.0, 20.0]
    for dtype in (torch.uint8, torch.int8, torch.int16):
        with pytest.raises(ArgumentTypeError, match="rows must be an int32 or int64 tensor"):
            scales_at(scales, rows.to(dtype), cols, 4)
    with pytest.raises(ValueError, match="divided by the 0 groups"):
        scales_at(torch.ones(2, 0), rows, cols, 4)


def test_soup_compares_every_pruned_weight_and_drops_stale_grids():
    from sparsekit.quantize import check_on_grid, fake_quantize
    from sparsekit.schedules import soup

    def embedding(seed: int) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 4))
        sparsekit.prune(model, 0.5, method="random", targets=["0.weight"], seed=seed)
        return model

    with pytest.raises(ValueError, match="models.1. has a different mask than models.0. for "
                                         "'0.weight'"):
        soup([embedding(0), embedding(1)])
    first = nn.Sequential(_int8_layer())
    second = copy.deepcopy(first)
    with torch.no_grad():
        second[0].weight.mul_(1.5)
    attach_scales(second[0], int8_scales(second[0].weight.detach()))
    second[0].weight.data = fake_quantize(second[0].weight, second[0].weight_scale)
    mixed = soup([first, second])
    assert attached_scales(mixed[0]) is None  # the mean lies on neither grid
    same = soup([first, copy.deepcopy(first)])
    check_on_grid("soup", same[0].weight, attached_scales(same[0]))  # kept where equal


def test_check_on_grid_refuses_what_is_no_weight():
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.quantize import check_on_grid

    scales = torch.ones(3)
    for weight, kind in ([[1.0]], ArgumentTypeError), (torch.tensor(1.0), ValueError), \
            (torch.ones(3, dtype=torch.int8), ValueError), \
            (torch.ones(3, 2, dtype=torch.int8), ArgumentTypeError):
        with pytest.raises(kind, match="l: weight must be"):
            check_on_grid("l", weight, scales)


def test_masked_delta_refuses_a_density_of_no_entry():
    from sparsekit.finetune import masked_delta

    model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"density=0.001 of 128 targeted entries rounds to "
                                         r"none that train; accepted: at least 0.00781"):
        masked_delta(model, 1e-3, method="magnitude")
    assert all(p.requires_grad for p in model.parameters())


def test_soft_threshold_saves_under_an_lr_scheduler():
    import io

    from sparsekit.regularize import SoftThreshold

    model = nn.Linear(4, 4)
    opt = SoftThreshold(torch.optim.SGD(model.parameters(), lr=0.1), 0.01)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    assert back.strength == 0.01


def test_group_envelope_keeps_as_many_channels_as_the_channel_pruning():
    from sparsekit.regularize import GroupEnvelope

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    kept = int(sparsekit.prune(copy.deepcopy(model), 0.5, pattern="channel")
               .masks["0.weight"].any(1).sum())
    norms = (model[0].weight.pow(2).sum(1) + model[0].bias.pow(2)
             + model[2].weight.pow(2).sum(0)).detach()
    weakest = norms.sort().values[:5 - kept]
    assert kept == 3
    assert float(GroupEnvelope(model, 1.0, 0.5)()) == pytest.approx(0.5 * float(weakest.sum()))


def test_flap_scores_gpt2_conv1d_and_grasp_names_a_tuple_output():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    masks = sparsekit.prune(gpt2, 0.5, method="flap", data=ids)
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-3)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="criterion 'grasp' divides the model's outputs by "
                                         "its temperature, so the model must return a tensor"):
        sparsekit.prune(Pair(), 0.5, method="grasp", data=[(x, x[:, :3].argmax(1))],
                        loss_fn=lambda out, y: F.cross_entropy(out[0], y))


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = _pruned(16, 32, seed=1), _pruned(8, 32, seed=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        a = self.q(x)
        x.mul_(2)  # the input k reads is another one
        return torch.cat([a, self.k(x)], -1)


def test_an_input_changed_in_place_between_two_layers_is_not_shared():
    from sparsekit.engine.fused import shared_inputs

    model = _InPlace()
    assert shared_inputs(model, (torch.randn(2, 32),)) == []
    model.forward = lambda x: torch.cat([model.q(x), model.k(x)], -1)
    assert shared_inputs(model, (torch.randn(2, 32),)) == [["q", "k"]]


@needs_kernels
def test_a_fused_group_without_its_first_member_is_refused_by_save(tmp_path):
    from sparsekit.engine import fused

    q, k = _pruned(16, 32, seed=1), _pruned(8, 32, seed=2)
    model = nn.Module()
    model.q, model.k = FusedProjections(CompiledLinear.from_linear(stack([q, k]), "bitmap"),
                                        [16, 8]).members()
    assert fused.groups(model) == [["q", "k"]]
    model.q = model.q.to_linear()
    with pytest.raises(ValueError, match=r"the fused group of \['k'\] lost its first member"):
        sparsekit.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_compile_of_a_bare_layer_is_refused():
    with pytest.raises(ValueError, match=r"model is itself a layer \(Linear\)"):
        sparsekit.compile(_pruned(8, 16), torch.randn(2, 16), formats=["csr16"], cache=False)


def test_rows_of_one_odd_value_are_refused():
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.engine.compile import check_rows

    for rows in (torch.tensor(4), b"\x04", {1: 2, 4: 3}):
        with pytest.raises(ArgumentTypeError, match="rows must be an int ≥ 1, got"):
            check_rows(rows)
    assert sorted(check_rows([4, 1, 4])) == [1, 4]


@needs_kernels
def test_report_drops_the_timings_of_a_format_loaded_over(tmp_path):
    from sparsekit.engine import report

    torch.manual_seed(0)
    model = nn.Sequential(_pruned(64, 128))
    x = torch.randn(4, 128)
    first = sparsekit.compile(model, x, formats=["csr16"], cache=False)
    second = sparsekit.compile(model, x, formats=["bitmap"], weight_dtype="int8", cache=False)
    sparsekit.load(second, sparsekit.save(first, tmp_path / "a.safetensors"))
    row = report(second, x).rows[0]
    assert row.extra["format"] == "csr16" and "quant err" not in row.extra
    assert row.extra["note"] == "timed as bitmap at compile; loaded as csr16"
    assert "quant err" in report(first, x).rows[0].extra


def test_diff_compares_integers_exactly_and_keeps_non_finite_norms():
    big = {"w": torch.tensor([2**60])}
    row = sparsekit.diff(big, {"w": torch.tensor([2**60 + 1])}, atol=0.5).rows[0]
    assert (row.changed, row.norm) == (1, 1.0)
    row = sparsekit.diff({"w": torch.tensor([1.0, 2.0])},
                         {"w": torch.tensor([1.0, float("nan")])}).rows[0]
    assert row.changed == 1 and math.isnan(row.norm)
    row = sparsekit.diff({"w": torch.tensor([-1.7e308], dtype=torch.float64)},
                         {"w": torch.tensor([1.7e308], dtype=torch.float64)}).rows[0]
    assert row.norm == float("inf")
    row = sparsekit.diff({"w": torch.tensor([float("nan"), 1.0])},
                         {"w": torch.tensor([float("nan"), 1.0])}).rows[0]
    assert (row.changed, row.norm) == (0, 0.0)


def test_allocation_helpers_check_their_sparsity():
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.allocation import erdos_renyi_densities, owl_sparsities

    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        erdos_renyi_densities({"a": torch.Size([4, 4])}, 1.5)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.5"):
        owl_sparsities([0.1, 0.2], 1.5)
    with pytest.raises(ValueError, match="lam"):
        owl_sparsities([0.1, 0.2], 0.5, lam=-5)
    with pytest.raises(ArgumentTypeError, match="sparsity must be a float"):
        owl_sparsities([0.1, 0.2], "0.5")
    assert owl_sparsities([0.1, 0.1], 0.5) == [0.5, 0.5]


@needs_kernels
def test_use_isa_checks_its_name_at_once_and_warns_when_never_entered():
    from sparsekit.engine import kernels

    with pytest.raises(ValueError, match="isa must be one of"):
        kernels.use_isa("nope")
    with pytest.warns(RuntimeWarning, match="the isa 'scalar' was never entered"):
        kernels.use_isa("scalar")
    with kernels.use_isa("scalar"):
        pass


@needs_kernels
def test_decompile_gives_gpt2_its_conv1d_back(tmp_path):
    from transformers.pytorch_utils import Conv1D

    from sparsekit.engine import decompile

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    sparsekit.prune(gpt2, 0.5)
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    back = decompile(sparsekit.compile(gpt2, ids, formats=["csr16", "dense"], cache=False))
    layer = back.transformer.h[0].attn.c_attn
    assert type(layer) is Conv1D and layer.weight.shape == (32, 96)
    assert torch.allclose(_logits(back, ids), _logits(gpt2, ids), atol=1e-5)
    back.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(reloaded, ids), _logits(gpt2, ids), atol=1e-5)


def test_check_pattern_sees_every_target_as_out_by_in():
    from sparsekit.patterns import parse_pattern
    from sparsekit.prune import check_pattern
    from sparsekit.targets import resolve_targets

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    targets = resolve_targets(gpt2)
    check_pattern(parse_pattern("2:4"), targets)  # Conv1D (in, out) weights as (out, in)
    with pytest.raises(ValueError, match="does not divide 'transformer.h.0.attn.c_attn.weight'"):
        check_pattern(parse_pattern("block:5x5"), targets)
