"""The documented pipeline on tiny random Hugging Face architectures (built from configs,
nothing downloaded): prune -> compile (fp32, bf16, int8, W8A8) -> generate -> report ->
save/load -> decompile -> torch.compile / torch.export, structured removal, and the
defects this found:

* ``decompile`` of a float32 model compiled with ``weight_dtype="bf16"`` gave bfloat16
  ``nn.Linear`` layers inside the float32 model (its first forward raised a dtype error),
  also after ``save_pretrained`` / ``from_pretrained``;
* ``decompile`` of a Phi model (q/k/v and ``mlp.fc1`` read one input and fuse into one
  group across two parents) raised ``AttributeError: 'Linear' object has no attribute
  'to_module'``: the walk converted the group's stacked layer before the member in the
  second parent read it;
* ``engine.report`` left the timing and ``quant err`` columns of a fused group's stacked
  layer empty (its choice is kept under its members' ``fused`` record);
* ``shrink`` with ``pattern="channel"`` removed nothing from GPT-2's and Phi's MLPs: the
  ``torch.fx`` trace went inside ``NewGELUActivation`` (``torch.pow``) and GPT-2's
  ``Conv1D`` (``addmm`` on views) and froze the channels there.

The autotuner's clock is scripted (as in ``test_fused.py``), so which layers fuse does not
depend on this machine's speed; formats are forced where a test needs a native kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, autotune, decisions, decompile
from sparsekit.engine.fused import FusedLinear, FusedProjections

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 77, 128]])
CALIB = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def _quiet_and_scripted(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A decision cache of this test; every candidate takes 1 ms, a fused group 1 ms
    against its separate members' sum (so groups always fuse)."""
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")

    def clock(module: nn.Module, x: torch.Tensor, reps: int) -> float:
        if isinstance(module, FusedProjections):
            return 1e-3
        return 1e-3 * (len(module) if isinstance(module, nn.ModuleList) else 1)

    monkeypatch.setattr(autotune, "_time_block", clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _config(name: str):  # type: ignore[no-untyped-def]
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128)
    if name == "llama":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            num_key_value_heads=2, **common)
    if name == "qwen2":  # q/k/v biases, lm_head tied to the embedding
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            num_key_value_heads=2, tie_word_embeddings=True, **common)
    if name == "phi":  # parallel attention and MLP: q/k/v and fc1 read one input
        return transformers.PhiForCausalLM, transformers.PhiConfig(**common)
    if name == "gpt2":  # Conv1D layers, tied lm_head
        return transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=0, eos_token_id=0)
    if name == "bert":
        return transformers.BertModel, transformers.BertConfig(**common)
    raise AssertionError(name)


def _model(name: str, *, pruned: bool = True) -> nn.Module:
    cls_name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "phi": "PhiForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertModel"}[name]
    if not hasattr(transformers, cls_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    torch.manual_seed(0)
    cls, config = _config(name)
    model = cls(config).eval()
    if pruned:
        sparsekit.prune(model, 0.5)
    return model


def _out(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _generate(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(IDS, max_new_tokens=5, do_sample=False)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


FOUR = ["gpt2", "qwen2", "bert", "llama"]
DTYPES = [{}, {"weight_dtype": "bf16"}, {"weight_dtype": "int8"},
          {"weight_dtype": "int8", "activation_dtype": "int8"}]


# -- the lifecycle ---------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("name", FOUR)
def test_compile_generate_save_load_decompile(name: str, tmp_path) -> None:
    model = _model(name)
    reference = _out(model)
    expected = None if name == "bert" else _generate(model)
    for options in DTYPES:
        compiled = sparsekit.compile(model, (IDS,), formats="bitmap", **options)
        assert {m.format.name for m in compiled.modules()
                if isinstance(m, CompiledLinear)} == {"bitmap"}
        out = _out(compiled)
        tol = {None: 1e-5, "bf16": 2e-2, "int8": 5e-2}[options.get("weight_dtype")]
        assert ((out - reference).abs().max() / reference.abs().max()).item() < tol, options
        if expected is not None:
            tokens = _generate(compiled)
            assert tokens.shape == expected.shape
            if not options:  # fp32: the same greedy tokens
                assert torch.equal(tokens, expected)
        assert len(str(sparsekit.engine.report(compiled, (IDS,)))) > 0
        path = sparsekit.save(compiled, tmp_path / f"{name}.safetensors")
        fresh = sparsekit.compile(model, (IDS,), formats="bitmap", **options)
        sparsekit.load(fresh, path)
        assert _same_state(fresh, compiled)
        assert torch.equal(_out(fresh), out)
        back = decompile(compiled)
        assert not any(hasattr(m, "format") for m in back.modules())
        assert {p.dtype for p in back.parameters()} == {torch.float32}
        torch.testing.assert_close(_out(back), out, rtol=0, atol=5e-2 if "activation_dtype"
                                   in options else 1e-5)


@pytest.mark.parametrize("name", FOUR)
def test_default_compile_matches_the_pruned_model(name: str) -> None:
    model = _model(name)
    compiled = sparsekit.compile(model, (IDS,))
    torch.testing.assert_close(_out(compiled), _out(model), rtol=1e-5, atol=1e-5)
    if name != "bert":
        assert torch.equal(_generate(compiled), _generate(model))
    if name in ("gpt2", "qwen2"):  # the tied lm_head stays the embedding's nn.Linear
        head = compiled.get_submodule("lm_head")
        assert type(head) is nn.Linear
        assert head.weight is compiled.get_input_embeddings().weight
        assert "reason" in compiled.sparsekit_choices["lm_head"]


@needs_kernels
@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_torch_compile_fullgraph_and_export(name: str) -> None:
    compiled = sparsekit.compile(_model(name), (IDS,), formats="bitmap", weight_dtype="int8",
                                 activation_dtype="int8")
    expected = _out(compiled)
    torch._dynamo.reset()
    traced = torch.compile(compiled, fullgraph=True, backend="eager")
    torch.testing.assert_close(_out(traced), expected, rtol=0, atol=0)
    exported = torch.export.export(compiled, (IDS,), kwargs={"use_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(IDS, use_cache=False).logits, expected,
                                   rtol=0, atol=0)


@needs_kernels
def test_generate_compiles_the_decode_step_over_a_static_cache() -> None:
    """The README's fast decode: generate with a static KV cache and a CompileConfig that
    lets transformers compile on the CPU gives the eager greedy tokens from one graph (the
    custom ops traced by their fake implementations, no graph break)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    compiled = sparsekit.compile(_model("llama"), (IDS,), formats="bitmap", weight_dtype="int8",
                                 activation_dtype="int8")
    with torch.no_grad():
        expected = compiled.generate(IDS, max_new_tokens=6, do_sample=False)
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on accelerators only otherwise
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the graph
            tokens = compiled.generate(IDS, max_new_tokens=6, do_sample=False,
                                       cache_implementation="static", compile_config=config)
            assert torch.equal(tokens, expected)
    assert counters["stats"]["unique_graphs"] == 1


# -- defect: the report of a fused group ------------------------------------------------------

@needs_kernels
def test_report_of_a_fused_group_has_its_stacked_choice() -> None:
    compiled = sparsekit.compile(_model("qwen2"), (IDS,), formats="bitmap", weight_dtype="int8")
    rows = {r.name: r for r in sparsekit.engine.report(compiled, (IDS,)).rows}
    prefix = "model.layers.0.self_attn."
    row = rows[f"{prefix}q_proj.group.linear"]  # q, k, v: 64 + 32 + 32 rows
    stacked = compiled.sparsekit_choices[f"{prefix}q_proj"]["fused"]["stacked"]
    assert row.shape == (128, 64) and row.extra["format"] == "bitmap"
    assert row.extra["values"] == "int8"
    assert row.extra["ms dense"] == stacked["ms_dense"]
    assert row.extra["speedup"] == stacked["speedup"]
    assert 0 < row.extra["quant err"] == stacked["quantization_error"] < 0.05
    assert row.extra["note"] == "fused: " + ", ".join(f"{prefix}{p}_proj" for p in "qkv")
    assert f"{prefix}k_proj" not in rows  # a member has no weight of its own


# -- defect: decompile of bf16 values in a float32 model ---------------------------------------

@needs_kernels
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "bert"])
def test_decompile_of_bf16_values_gives_float32_layers(name: str, tmp_path) -> None:
    compiled = sparsekit.compile(_model(name), (IDS,), formats="bitmap", weight_dtype="bf16")
    assert any(getattr(m, "format", None) is not None
               and m.format.value_dtype == torch.bfloat16 for m in compiled.modules())
    out = _out(compiled)
    for model in (compiled, _reloaded(compiled, tmp_path)):
        back = decompile(model)  # was: bf16 nn.Linear weights, the forward raised
        assert {p.dtype for p in back.parameters()} == {torch.float32}
        torch.testing.assert_close(_out(back), out, rtol=0, atol=1e-5)
        for layer in back.modules():
            if type(layer) is nn.Linear:  # the stored bf16 values, exactly
                assert torch.equal(layer.weight, layer.weight.bfloat16().float())


def _reloaded(compiled: nn.Module, tmp_path) -> nn.Module:
    sparsekit.save_pretrained(compiled, tmp_path / "dir")
    model = sparsekit.from_pretrained(tmp_path / "dir")
    assert _same_state(model, compiled)
    return model


# -- defect: decompile of a group fused across two parents (Phi) ----------------------------------

@needs_kernels
def test_decompile_of_phi_with_a_group_across_parents(tmp_path) -> None:
    model = _model("phi")
    compiled = sparsekit.compile(model, (IDS,), formats="bitmap")
    layer = compiled.model.layers[0]
    assert isinstance(layer.mlp.fc1, FusedLinear)  # q/k/v and fc1: one group, two parents
    assert layer.mlp.fc1._group is layer.self_attn.q_proj._group
    expected = _generate(model)
    assert torch.equal(_generate(compiled), expected)
    for source in (compiled, _reloaded(compiled, tmp_path)):
        back = decompile(source)  # was: AttributeError 'Linear' ... 'to_module'
        assert not any(hasattr(m, "format") or isinstance(m, FusedLinear)
                       for m in back.modules())
        for name, original in model.named_modules():
            if type(original) is nn.Linear:
                assert torch.equal(back.get_submodule(name).weight, original.weight), name
        assert torch.equal(_generate(back), expected)


# -- structured removal ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("unit", ["ffn", "heads", "layers"])
def test_prune_structured_reloads_identically(name: str, unit: str, tmp_path) -> None:
    model = _model(name, pruned=False)
    method = "block_influence" if unit == "layers" else "wanda"
    before = sum(p.numel() for p in model.parameters())
    # uniform widths: a quarter of two key/value groups rounds to none in every block
    amount = 0.5 if unit == "heads" else 0.25
    sparsekit.llm.prune_structured(model, CALIB, amount=amount, unit=unit, method=method)
    assert sum(p.numel() for p in model.parameters()) < before
    expected = _out(model)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    if "sparsekit_shapes" in config:  # widths the standard config cannot describe
        assert unit == "heads"
        reloaded = sparsekit.llm.load_pretrained(tmp_path)
    else:
        auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
        reloaded = auto.from_pretrained(tmp_path)
    assert torch.equal(_out(reloaded.eval()), expected)
    if name != "bert":
        assert torch.equal(_generate(reloaded), _generate(model))


def _mlp(name: str) -> nn.Module:
    model = _model(name, pruned=False)
    return {"gpt2": lambda: model.transformer.h[0].mlp, "phi": lambda: model.model.layers[0].mlp,
            "llama": lambda: model.model.layers[0].mlp}[name]()


@pytest.mark.parametrize("name", ["gpt2", "phi", "llama"])
def test_channel_shrink_of_an_hf_mlp(name: str) -> None:
    """An HF model as a whole does not trace with torch.fx; its MLP does. GPT-2's Conv1D
    and Phi's/GPT-2's NewGELUActivation used to freeze every channel (nothing removed)."""
    mlp = _mlp(name)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    masks = sparsekit.prune(mlp, 0.5, pattern="channel")
    with torch.no_grad():
        expected = mlp(x)
    small = sparsekit.shrink(mlp, masks)
    before = sum(p.numel() for p in mlp.parameters())
    after = sum(p.numel() for p in small.parameters())
    assert after < 0.6 * before  # half the hidden neurons gone (the output bias stays)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-6)
    if name == "gpt2":  # Conv1D's size attributes follow its (in, out) weight
        for conv in (small.c_fc, small.c_proj):
            assert (conv.nx, conv.nf) == tuple(conv.weight.shape)
        assert small.c_fc.nf == mlp.c_fc.nf // 2


def test_a_whole_hf_model_is_refused_by_channel_pruning() -> None:
    with pytest.raises(ValueError, match="cannot trace LlamaForCausalLM"):
        sparsekit.prune(_model("llama", pruned=False), 0.5, pattern="channel")


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
def test_head_masks_shrink_with_transformer_groups(name: str) -> None:
    from sparsekit.structured import transformer_groups

    model = _model(name, pruned=False)
    masks = sparsekit.prune(model, 0.5, pattern="head")
    expected = _out(model)
    small = sparsekit.shrink(model, masks, groups=transformer_groups(model, "heads"))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_out(small), expected, rtol=1e-5, atol=1e-6)
