"""Fused projections (issue 18, item 4): layers that read one input become one kernel call.

The clock of :mod:`sparsekit.engine.autotune` is scripted, so whether a group fuses does
not depend on this machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit import checkpoint
from sparsekit.engine import CompiledLinear, autotune, compile, decisions, decompile, fused
from sparsekit.engine.formats import DenseFormat
from sparsekit.engine.fused import FusedLinear, FusedProjections, shared_inputs, stack
from sparsekit.engine.fused import groups as fused_groups

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    return tmp_path / "decisions"


def _clock(monkeypatch: pytest.MonkeyPatch,
           fused_ms: float | Callable[[int], float]) -> list[int]:
    """Every layer format takes 1 ms (dense stays), a fused group ``fused_ms`` (or
    ``fused_ms(rows)``) against the 3 ms of its separate layers. Returns the list that
    counts measure() calls."""
    calls: list[int] = []
    measure = autotune.measure

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return measure(*args, **kwargs)

    def clock(module: nn.Module, x: torch.Tensor, reps: int) -> float:
        if isinstance(module, FusedProjections):
            rows = x.reshape(-1, x.shape[-1]).shape[0]
            return (fused_ms(rows) if callable(fused_ms) else fused_ms) * 1e-3
        return 1e-3 * (len(module) if isinstance(module, nn.ModuleList) else 1)

    monkeypatch.setattr(autotune, "_time_block", clock)
    monkeypatch.setattr(autotune, "measure", counted)
    return calls


def _llama(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    sparsekit.prune(model, 0.5)
    return model


IDS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
          ["mlp.gate_proj", "mlp.up_proj"]]


def test_shared_inputs_finds_the_projections_of_every_block() -> None:
    groups = shared_inputs(_llama(), (IDS,))
    assert groups == [[f"model.layers.{i}.{n}" for n in g] for i in range(2) for g in GROUPS]


def test_shared_inputs_skips_layers_that_cannot_stack() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2, bias=False)  # bias differs
            self.c, self.d = nn.Linear(4, 3), nn.Linear(4, 5)
            self.e = nn.Linear(4, 4)  # called twice

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.e(self.e(x))
            return torch.cat([self.a(x), self.b(x), self.c(y), self.d(y)], -1)

    assert shared_inputs(Net(), (torch.randn(2, 4),)) == [["c", "d"]]


def test_a_faster_fused_call_replaces_the_projections(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, fused_ms=1.5)
    model = _llama()
    compiled = compile(model, (IDS,))
    attn = compiled.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedLinear) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(attn.o_proj, CompiledLinear)
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group
    record = compiled.sparsekit_choices["model.layers.0.self_attn.k_proj"]["fused"]
    assert record["format"] == "fused" and record["reference"] == "separate"
    assert record["group"] == [f"model.layers.0.{n}" for n in GROUPS[0]]
    assert record["speedup"] == pytest.approx(2.0) and record["stacked"]["format"] == "dense"
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)
        expected = model.generate(IDS, max_new_tokens=10, do_sample=False)
        assert torch.equal(compiled.generate(IDS, max_new_tokens=10, do_sample=False), expected)


def test_fusing_that_wins_decoding_and_ties_the_prompt_replaces_the_projections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # q/k/v (3 ms separate): 2x faster for one row, for the 12-row prompt 2 % slower: noise
    # between equal work, which the separate layers do not win by the margin; gate/up (2 ms
    # separate) lose the prompt by 53 %: they stay separate
    _clock(monkeypatch, fused_ms=lambda rows: 1.5 if rows == 1 else 3.06)
    model = _llama()
    compiled = compile(model, (IDS,))
    fused_names = {n for n, m in compiled.named_modules() if isinstance(m, FusedLinear)}
    assert fused_names == {f"model.layers.{i}.{n}" for i in range(2) for n in GROUPS[0]}
    record = compiled.sparsekit_choices["model.layers.1.self_attn.v_proj"]["fused"]
    assert record["format"] == "fused" and record["rows"] == [1, 12]
    assert record["evidence"][12]["ratio"] == pytest.approx(1.02)
    assert compiled.sparsekit_choices["model.layers.1.mlp.up_proj"]["fused"]["format"] == (
        "separate")
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)
    # 10 % slower for the prompt: the separate q/k/v win there, so they stay
    _clock(monkeypatch, fused_ms=lambda rows: 1.5 if rows == 1 else 3.3)
    assert not any(isinstance(m, FusedLinear)
               for m in compile(_llama(), (IDS,), cache=False).modules())


def test_fusing_that_is_not_faster_keeps_the_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, fused_ms=2.9)  # 3 % faster than three separate calls: noise
    compiled = compile(_llama(), (IDS,))
    assert not any(isinstance(m, FusedLinear) for m in compiled.modules())
    record = compiled.sparsekit_choices["model.layers.1.mlp.up_proj"]["fused"]
    assert record["format"] == "separate"
    assert not any(isinstance(m, FusedLinear) for m in compile(
        _llama(), (IDS,), fuse=False).modules())


def test_a_fused_model_saves_loads_and_decompiles(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    _clock(monkeypatch, fused_ms=1.0)
    model = _llama()
    compiled = compile(model, (IDS,))
    state = compiled.state_dict()
    prefix = "model.layers.0.self_attn."
    assert f"{prefix}q_proj.group.linear.format.weight" in state
    assert not any(k.startswith((f"{prefix}k_proj", f"{prefix}v_proj")) for k in state)
    path = sparsekit.save(compiled, tmp_path / "fused.safetensors")
    fresh = compile(_llama(seed=1), (IDS,))
    sparsekit.load(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, compiled(IDS).logits)
    back = decompile(compiled)
    for name, layer in model.named_modules():
        if type(layer) is nn.Linear:
            restored = back.get_submodule(name)
            assert type(restored) is nn.Linear and torch.equal(restored.weight, layer.weight)


@pytest.mark.parametrize("saved_fused", [True, False])
def test_a_checkpoint_loads_into_a_copy_that_fused_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path, saved_fused: bool
) -> None:
    # Fusing is decided by timing, so a second compile of one model can fuse where the
    # saved one did not, or not where it did: the load conforms the copy to the file
    # (it had refused: "missing [...k_proj.format...], unexpected [...q_proj.group...]").
    model = _llama()
    _clock(monkeypatch, fused_ms=1.0 if saved_fused else 5.0)
    saved = compile(model, (IDS,), cache=False)
    path = sparsekit.save(saved, tmp_path / "saved.safetensors")
    _clock(monkeypatch, fused_ms=5.0 if saved_fused else 1.0)
    copy = compile(_llama(seed=1), (IDS,), cache=False)
    assert bool(fused_groups(copy)) != saved_fused
    sparsekit.load(copy, path)
    assert fused_groups(copy) == fused_groups(saved)
    assert list(copy.state_dict()) == list(saved.state_dict())
    with torch.no_grad():
        assert torch.equal(copy(IDS).logits, saved(IDS).logits)


def test_a_refused_load_leaves_the_copy_fused_as_it_was(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    _clock(monkeypatch, fused_ms=1.0)
    saved = compile(_llama(layers=1), (IDS,), cache=False)
    path = sparsekit.save(saved, tmp_path / "one_layer.safetensors")
    _clock(monkeypatch, fused_ms=5.0)
    copy = compile(_llama(), (IDS,), cache=False)  # two layers: not the file's model
    before = {n: type(m) for n, m in copy.named_modules()}
    with pytest.raises(ValueError, match="does not match"):
        sparsekit.load(copy, path)
    assert {n: type(m) for n, m in copy.named_modules()} == before


def test_a_bad_fused_record_is_refused_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    _clock(monkeypatch, fused_ms=1.0)
    saved = compile(_llama(), (IDS,), cache=False)
    path = sparsekit.save(saved, tmp_path / "fused.safetensors")
    assert json.loads(checkpoint.read_metadata(path)["fused"]) == fused_groups(saved)
    for text in ('["x"]', "{", "[[1, 2]]"):  # the header's record, malformed
        with pytest.raises(ValueError, match="groups of two or more"):
            checkpoint._fused_groups({"fused": text}, path)
    _clock(monkeypatch, fused_ms=5.0)
    copy = compile(_llama(), (IDS,), cache=False)
    before = {n: type(m) for n, m in copy.named_modules()}
    with pytest.raises(ValueError, match="names no layer"):
        fused.conform(copy, {}, [["model.layers.0.mlp.up_proj", "nothing.here"]])
    assert {n: type(m) for n, m in copy.named_modules()} == before


def test_the_second_compile_times_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _clock(monkeypatch, fused_ms=1.0)
    first = compile(_llama(layers=3), (IDS,))
    # one block is timed; the two others have the same shapes and density and reuse it
    # (so do the layers of one block alike: k/v, q/o, gate/up and the stacked q/k/v)
    assert 0 < len(calls) <= 5 + 2 + 2  # layers (lm_head too), stacked, fused or separate
    for name, choice in first.sparsekit_choices.items():
        if name.startswith(("model.layers.1.", "model.layers.2.")):  # reused, or stored
            for record in (choice, choice.get("fused", {"cached": True})):
                assert record["cached"] or record["reused"].startswith("model.layers.0.")
    calls.clear()
    second = compile(_llama(layers=3), (IDS,))
    assert calls == []
    assert all(c["cached"] for c in second.sparsekit_choices.values())
    assert sum(isinstance(m, FusedLinear) for m in second.modules()) == 15


def test_a_member_called_with_another_input_computes_its_own() -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(8, n) for n in (3, 5)]
    group = FusedProjections(CompiledLinear.from_linear(stack(layers)), [3, 5])
    first, second = group.members()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(first(x), layers[0](x))
        torch.testing.assert_close(second(y), layers[1](y))  # not x's kept output
        torch.testing.assert_close(first(x), layers[0](x))
        x.mul_(2)  # modified in place since: computed again
        torch.testing.assert_close(second(x), layers[1](x))
        assert group.__dict__["_kept"] is not None
        torch.testing.assert_close(first(x), layers[0](x))
        assert group.__dict__["_kept"] is None  # every member served: nothing kept
    with torch.inference_mode():  # inference tensors have no version counter
        x = torch.randn(2, 8)
        torch.testing.assert_close(first(x), layers[0](x))
        torch.testing.assert_close(second(x), layers[1](x))
    assert second(torch.randn(3, 4, 8)).shape == (3, 4, 5)
    assert second(torch.randn(3, 4, 8)).is_contiguous()
    assert "rows 3..8 of a fused group" in repr(second)
    assert torch.equal(second.to_linear().bias, layers[1].bias)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: FusedProjections(nn.Linear(4, 4), [2, 2]), TypeError, "linear must be a "),
        (lambda: FusedProjections(_stacked(), [8]), ValueError, "sizes must be two ints"),
        (lambda: FusedProjections(_stacked(), [3, 4]), ValueError, "summing to out_features=8"),
        (lambda: FusedProjections(_stacked(), [4.0, 4]), TypeError,
         r"sizes\[0\] must be an int ≥ 1, got 4.0"),
        (lambda: FusedProjections(_stacked(), [True, 7]), TypeError,
         r"sizes\[0\] must be an int ≥ 1, got True"),
        (lambda: FusedProjections(_stacked(), 8), TypeError, "sizes must be a sequence of ints"),
        (lambda: FusedLinear(_stacked(), 0), TypeError, "group must be FusedProjections"),
        (lambda: FusedLinear(FusedProjections(_stacked(), [4, 4]), 2), ValueError,
         r"index must be an int in \[0, 2\), got 2"),
        (lambda: FusedLinear(FusedProjections(_stacked(), [4, 4]), True), TypeError,
         "index must be an int, got True"),
        (lambda: stack([nn.Linear(4, 2), nn.Linear(5, 2)]), ValueError, "share in_features"),
        (lambda: compile(nn.Linear(3, 3), fuse="yes"), TypeError, "fuse must be a bool"),
    ],
)
def test_bad_fusion_arguments_are_refused(build, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def _stacked() -> CompiledLinear:
    return CompiledLinear(DenseFormat.from_dense(torch.randn(8, 4)))


class _Projections(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x).repeat(1, 2) * self.v(x).repeat(1, 2)], -1)


@needs_kernels
def test_a_fused_group_traces_as_one_kernel_call(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, fused_ms=1.0)
    model = _Projections()
    sparsekit.prune(model, 0.9)
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled = compile(model, x, formats="csr16")
    assert isinstance(compiled.q, FusedLinear)
    program = torch.export.export(compiled, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("sparsekit.csr_linear.default") == 1, targets
    torch.testing.assert_close(program.module()(x), compiled(x))
    torch._dynamo.reset()
    traced = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), compiled(x))
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_stack_carries_the_int8_scales_of_its_layers() -> None:
    from sparsekit.quantize import attach_scales, attached_scales, int8_scales

    layers = [nn.Linear(8, n) for n in (3, 5)]
    for layer in layers:
        attach_scales(layer, int8_scales(layer.weight))
    stacked = stack(layers)
    assert torch.equal(attached_scales(stacked),
                       torch.cat([attached_scales(layer) for layer in layers]))
    attach_scales(layers[1], int8_scales(layers[1].weight))
    del layers[1]._buffers["weight_scale"]
    with pytest.raises(ValueError, match=r"int8 scales \(none, per row or their number"):
        stack(layers)
    attach_scales(layers[1], int8_scales(layers[1].weight, 4))  # per group of 4 inputs
    with pytest.raises(ValueError, match=r"int8 scales \(none, per row or their number"):
        stack(layers)
    attach_scales(layers[0], int8_scales(layers[0].weight, 4))
    assert attached_scales(stack(layers)).shape == (8, 2)


def test_an_int8_quantized_llama_fuses_on_its_own_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekit import llm

    _clock(monkeypatch, fused_ms=1.5)
    model = _llama()
    llm.prune(model, IDS.repeat(4, 1), method="magnitude", quantize="int8", seqlen=IDS.shape[1])
    compiled = compile(model, (IDS,), formats="csr16")  # forced: int8 values on every layer
    attn = compiled.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedLinear)
    stacked = attn.q_proj.group.linear.format
    assert stacked.value_dtype == torch.int8
    assert torch.equal(stacked.to_dense(), torch.cat(
        [model.model.layers[0].get_submodule(n).weight for n in GROUPS[0]]))
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


class _Thresholds:
    """Input thresholds by layer name (the InputThresholds protocol of compile)."""

    def __init__(self, thresholds: dict[str, torch.Tensor]) -> None:
        self.thresholds = thresholds


def _teal(model: nn.Module, odd_k: bool = False) -> _Thresholds:
    """One threshold per input of every projection (q/k/v and gate/up share theirs); with
    ``odd_k`` the k projections get their own."""
    thresholds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            value = 0.4 if odd_k and name.endswith("k_proj") else 0.3
            thresholds[name] = torch.full((module.in_features,), value)
    return _Thresholds(thresholds)


def _act_clock(monkeypatch: pytest.MonkeyPatch, act_s: Callable[[nn.Module], float] = (
        lambda _layer: 0.5e-3), separate_s: float = 0.5e-3) -> None:
    """Activation-sparse layers take ``act_s(layer)`` (by default half the time of a
    weight-only one, 1 ms), a fused group 0.5 ms, its separate layers ``separate_s`` each."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    def clock(module: nn.Module, x: torch.Tensor, reps: int) -> float:
        if isinstance(module, FusedProjections):
            return 0.5e-3
        if isinstance(module, nn.ModuleList):
            return separate_s * len(module)
        return act_s(module) if isinstance(module, ActivationSparseLinear) else 1e-3

    monkeypatch.setattr(autotune, "_time_block", clock)


@needs_kernels
def test_activation_sparse_projections_fuse_into_one_thresholded_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    _act_clock(monkeypatch)
    model = _llama()
    teal = _teal(model)
    compiled = compile(model, (IDS,), activation_sparsity=teal, cache=False)
    block = compiled.model.layers[0]
    members = [getattr(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    assert all(isinstance(m, FusedLinear) for m in members)
    assert isinstance(members[0].group.linear, ActivationSparseLinear)  # one call, one threshold
    assert isinstance(block.mlp.gate_proj, FusedLinear) and isinstance(
        block.mlp.gate_proj.group.linear, ActivationSparseLinear)
    assert isinstance(block.mlp.down_proj, ActivationSparseLinear)
    record = compiled.sparsekit_choices["model.layers.0.mlp.up_proj"]["fused"]
    assert record["format"] == "fused" and record["stacked"]["activation"]["chosen"]
    with _thresholded(model, teal.thresholds), torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)
        expected = model.generate(IDS, max_new_tokens=6, do_sample=False)
        assert torch.equal(compiled.generate(IDS, max_new_tokens=6, do_sample=False), expected)
    plain = decompile(compiled)
    q = plain.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear
    torch.testing.assert_close(q.weight, model.model.layers[0].self_attn.q_proj.weight)


@needs_kernels
def test_groups_alike_take_over_the_first_blocks_decisions_on_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    _act_clock(monkeypatch)
    calls = []
    measure = autotune.measure

    def counted(modules, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(sorted(modules))
        return measure(modules, *args, **kwargs)
    monkeypatch.setattr(autotune, "measure", counted)
    model = _llama(layers=3)
    teal = _Thresholds({n: torch.zeros(m.in_features) for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and ".layers." in n})  # every input kept
    compiled = compile(model, (IDS,), activation_sparsity=teal)
    for i in range(3):
        block = compiled.model.layers[i]
        assert isinstance(block.self_attn.q_proj.group.linear, ActivationSparseLinear)
        assert isinstance(block.mlp.up_proj.group.linear, ActivationSparseLinear)
        for first, name in (("self_attn.q_proj", "self_attn.v_proj"),
                            ("mlp.gate_proj", "mlp.up_proj")):
            record = compiled.sparsekit_choices[f"model.layers.{i}.{name}"]["fused"]
            source = record.get("reused")
            assert record["format"] == "fused"
            assert source == (None if i == 0 else "+".join(
                f"model.layers.0.{n}" for n in GROUPS[0 if first.startswith("self") else 1]))
    # the fused-against-separate timing ran once per kind of group, not once per block
    assert calls.count(["fused", "separate"]) == 2
    with _thresholded(model, teal.thresholds), torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)
    # every decision on these inputs is on disk: a second compile times nothing
    calls.clear()
    again = compile(model, (IDS,), activation_sparsity=teal)
    assert calls == []
    for choice in again.sparsekit_choices.values():
        assert choice["cached"] and choice.get("activation", {"cached": True})["cached"]
        fused_record = choice.get("fused")
        if fused_record is not None:
            assert fused_record["cached"] and fused_record["stacked"]["activation"]["cached"]
    assert [type(m) for m in again.modules()] == [type(m) for m in compiled.modules()]
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, compiled(IDS).logits)


@needs_kernels
def test_the_output_check_compares_activation_sparse_layers_with_every_input_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A threshold turns float rounding into inputs kept on one side and dropped on the
    other, compounding over layers: the compile of the benchmark LLaMA (2048/5632, 4 layers)
    with TEAL 50 % failed its own output check by 7e-2. The check runs with the compiled
    activation-sparse layers' thresholds at zero against the plain model, and gives the
    thresholds back bit for bit."""
    import importlib

    from sparsekit.engine.activation_linear import ActivationSparseLinear

    compile_module = importlib.import_module("sparsekit.engine.compile")
    check = compile_module._check_outputs
    seen = {}

    def spy(reference: nn.Module, compiled: nn.Module, *args: object) -> None:
        layers = [m for m in compiled.modules() if isinstance(m, ActivationSparseLinear)]
        seen["layers"] = len(layers)
        seen["zero"] = all(not bool(m.threshold.any()) for m in layers)
        seen["hooks"] = any(m._forward_pre_hooks for m in reference.modules())
        check(reference, compiled, *args)

    monkeypatch.setattr(compile_module, "_check_outputs", spy)
    _act_clock(monkeypatch)
    model = _llama()
    teal = _teal(model)
    compiled = compile(model, (IDS,), activation_sparsity=teal, cache=False)
    # per block: q/k/v as one, o, gate/up as one, down
    assert seen == {"layers": 8, "zero": True, "hooks": False}
    thresholds = {n: m.threshold for n, m in compiled.named_modules()
                  if isinstance(m, ActivationSparseLinear)}
    assert all(torch.equal(t, torch.full_like(t, 0.3)) for t in thresholds.values())


@contextlib.contextmanager
def _thresholded(model: nn.Module, thresholds: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model`` with its layers' inputs sparsified by ``thresholds``, as compiled."""
    from sparsekit.engine.activation_linear import sparsify_input

    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, t=t: (sparsify_input(args[0], t),)) for n, t in thresholds.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@needs_kernels
def test_projections_that_lose_alone_fuse_into_one_activation_sparse_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each projection's activation-sparse kernel is no faster than its weight-only format
    # (small layers on two threads); the stacked layer's is twice as fast, so the group
    # becomes one thresholded call although no member won on its own.
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    model = _llama(layers=1)
    widest = model.model.layers[0].self_attn.q_proj.out_features  # the widest projection
    _act_clock(monkeypatch, act_s=lambda layer: 0.5e-3 if layer.out_features > widest else 1e-3,
               separate_s=1e-3)
    teal = _teal(model)
    compiled = compile(model, (IDS,), activation_sparsity=teal, cache=False)
    attn = compiled.model.layers[0].self_attn
    members = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    assert all(isinstance(m, FusedLinear) for m in members)
    assert isinstance(members[0].group.linear, ActivationSparseLinear)
    choice = compiled.sparsekit_choices["model.layers.0.self_attn.q_proj"]
    assert not choice["activation"]["chosen"]  # alone it lost
    assert choice["fused"]["format"] == "fused" and choice["fused"]["stacked"]["activation"][
        "chosen"]
    assert isinstance(compiled.model.layers[0].mlp.down_proj, CompiledLinear)  # alone: lost
    applied = {n: t for n, t in teal.thresholds.items()  # o_proj and down_proj lost
               if not n.endswith(("o_proj", "down_proj"))}
    with _thresholded(model, applied), torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)


@needs_kernels
def test_projections_of_which_some_won_alone_fuse_into_one_activation_sparse_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # q_proj's activation-sparse kernel wins alone, k_proj's and v_proj's (half as wide) do
    # not: a mixed group, as the noise of close single-row timings makes it, still gets its
    # one thresholded call, which is faster than the three separate ones.
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    model = _llama(layers=1)
    narrow = model.model.layers[0].self_attn.k_proj.out_features
    _act_clock(monkeypatch, act_s=lambda layer: 1e-3 if layer.out_features == narrow else 0.5e-3)
    teal = _teal(model)
    compiled = compile(model, (IDS,), activation_sparsity=teal, cache=False)
    attn = compiled.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedLinear) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(attn.q_proj.group.linear, ActivationSparseLinear)
    choices = compiled.sparsekit_choices
    assert choices["model.layers.0.self_attn.q_proj"]["activation"]["chosen"]  # alone: won
    assert not choices["model.layers.0.self_attn.k_proj"]["activation"]["chosen"]  # lost
    record = choices["model.layers.0.self_attn.k_proj"]["fused"]
    assert record["format"] == "fused" and record["stacked"]["activation"]["chosen"]
    with _thresholded(model, teal.thresholds), torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)


@needs_kernels
def test_projections_whose_stack_loses_with_thresholds_fuse_weight_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Activation sparsity loses everywhere, alone and stacked; the weight-only stack (the
    # one compiled while trying the thresholded one) still wins as a fused call.
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    _act_clock(monkeypatch, act_s=lambda _layer: 2e-3, separate_s=1e-3)
    model = _llama(layers=1)
    compiled = compile(model, (IDS,), activation_sparsity=_teal(model), cache=False)
    q = compiled.model.layers[0].self_attn.q_proj
    assert isinstance(q, FusedLinear) and isinstance(q.group.linear, CompiledLinear)
    record = compiled.sparsekit_choices["model.layers.0.self_attn.q_proj"]["fused"]
    assert record["format"] == "fused" and not record["stacked"]["activation"]["chosen"]
    assert not any(isinstance(m, ActivationSparseLinear) for m in compiled.modules())
    with torch.no_grad():  # no thresholds applied
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)


@needs_kernels
def test_activation_sparse_members_give_way_to_a_faster_weight_only_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gate_proj and up_proj each win as activation-sparse layers alone, their stack loses as
    # one (its kernel is slow at that width); one weight-only call for both is faster still
    # than the two activation-sparse calls, so the group fuses weight-only and the two
    # layers lose their thresholds (they had stayed separate, untimed against the stack).
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    model = _llama(layers=1)
    stacked = 2 * model.model.layers[0].mlp.gate_proj.out_features
    _act_clock(monkeypatch, act_s=lambda layer: 2e-3 if layer.out_features >= stacked else 0.5e-3,
               separate_s=1e-3)
    teal = _teal(model)
    compiled = compile(model, (IDS,), activation_sparsity=teal, cache=False)
    mlp = compiled.model.layers[0].mlp
    for n in ("gate_proj", "up_proj"):
        member = getattr(mlp, n)
        assert isinstance(member, FusedLinear) and isinstance(member.group.linear, CompiledLinear)
        choice = compiled.sparsekit_choices[f"model.layers.0.mlp.{n}"]
        assert choice["activation"]["chosen"]  # alone it won
        assert choice["fused"]["format"] == "fused"
        assert not choice["fused"]["stacked"]["activation"]["chosen"]
    assert isinstance(mlp.down_proj, ActivationSparseLinear)
    applied = {n: t for n, t in teal.thresholds.items()
               if not n.endswith(("gate_proj", "up_proj"))}
    with _thresholded(model, applied), torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits)


@needs_kernels
def test_activation_sparse_projections_with_their_own_thresholds_stay_separate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    _act_clock(monkeypatch)
    model = _llama(layers=1)
    compiled = compile(model, (IDS,), activation_sparsity=_teal(model, odd_k=True), cache=False)
    attn, mlp = compiled.model.layers[0].self_attn, compiled.model.layers[0].mlp
    assert all(isinstance(getattr(attn, n), ActivationSparseLinear)
               for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(mlp.up_proj, FusedLinear)  # gate/up still share their threshold
