"""Hostile inputs, round 17: the compiled-model lifecycle (compile, decompile, save/load,
the decision cache).

- ``decompile`` of a layer compile left in the ``dense`` format dropped its ``weight_scale``
  (int8 grid per row or per group), so compiling the decompiled model again stored
  float values (or per-row scales of its own): the dense format now keeps the grid, which
  saves, loads and decompiles bit-identically (files without it still load; the report
  shows its values as float32, not as int8 codes per group);
- a decision cache file holding a key no timing records (``activation``) crashed the next
  compile with a raw ``KeyError``; it is ignored as corrupt;
- a linear layer of no outputs (``nn.Linear(4, 0)``) failed to compile with a raw reshape
  (and then output-check) ``RuntimeError``;
- a model whose layers are on the meta device, or ``example_inputs`` on the meta device,
  failed with a raw ``Tensor.item()`` ``RuntimeError``; both are named;
- ``rows`` or ``threads`` given as NumPy ints failed in the decision cache with a raw JSON
  ``TypeError``;
- a layer under ``torch.nn.utils.spectral_norm`` (weight recomputed by a hook) failed
  with a raw ``KeyError``, and compiled without ``example_inputs`` stored the stale,
  unnormalized weight silently; it is left as it is, with the reason in its choice;
- a compiled model cast with ``.to(torch.bfloat16)`` decompiled to float32 layers the rest
  of the cast model could not feed;
- ``decompile`` of a compiled model on the meta device failed inside PyTorch;
- the output check compared a bare tensor output only: a model returning a tuple or a dict
  (a Hugging Face ``ModelOutput``) was never checked, so a wrong kernel passed silently;
- the output check's int8 reference dequantized a tied head's weight in place, which
  quantized the embedding tied to it as well: a correct int8 compile of a tied LM head
  (``formats`` without dense, or ``grow=True``) failed with "output differs";
- ``compile`` under ``torch.inference_mode`` failed with a raw ``RuntimeError`` (its formats'
  tensors were inference tensors, which keep no version counter);
- ``example_inputs`` whose row count exceeds ``MAX_ROWS`` were timed anyway (``rows=``
  refuses them: the timing inputs can exhaust the memory);
- a compiled layer of an eval-mode model was in training mode, and so was its decompiled
  ``nn.Linear``;
- ``CompiledLinear`` took a bias that is no tensor, and ``from_linear`` a module that is no
  ``nn.Linear``, failing with raw ``AttributeError``s;
- ``autotune.measure`` took any ``in_shape``, ``dtype`` and ``inputs`` width, and failed
  with raw errors of ``torch.randn`` or of the first timed call.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from _kernels import needs_kernels
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, autotune, decisions, decompile
from sparsekit.engine.formats import FORMATS
from sparsekit.engine.fused import FusedProjections, stack
from sparsekit.quantize import attach_scales, attached_scales, fake_quantize, int8_scales


def _scaled(layer: nn.Linear, group_size: int | None) -> nn.Linear:
    """``layer`` with its weight on an int8 grid and that grid attached."""
    scales = int8_scales(layer.weight.detach(), group_size)
    with torch.no_grad():
        layer.weight.copy_(fake_quantize(layer.weight, scales, group_size))
    attach_scales(layer, scales)
    return layer


def _model(group_size: int | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(_scaled(nn.Linear(32, 16), group_size), nn.ReLU(), nn.Linear(16, 4))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return unchanged(a, snapshot(b))


# -- the int8 grid of a layer left dense --------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 8])
def test_decompile_of_a_dense_layer_keeps_its_int8_grid(tmp_path, group_size):
    model = _model(group_size)
    compiled = sparsekit.compile(model, formats=["dense"], cache=False)
    assert compiled[0].format.name == "dense"
    back = decompile(compiled)
    assert _same(back, model)  # weight_scale included, bit for bit
    assert torch.equal(attached_scales(back[0]), attached_scales(model[0]))
    # saved and loaded into a skeleton: the same state, the same decompiled model
    path = sparsekit.save(compiled, tmp_path / "c.safetensors")
    skeleton = sparsekit.compile(_model(group_size), formats=["dense"], cache=False)
    sparsekit.load(skeleton, path)
    assert _same(skeleton, compiled)
    assert _same(decompile(skeleton), model)
    # compiled again: the same state as the first compile
    assert _same(sparsekit.compile(back, formats=["dense"], cache=False), compiled)


@pytest.mark.parametrize("group_size", [None, 8])
def test_a_model_cast_to_bfloat16_keeps_its_grid(group_size):
    model = _model(group_size).to(torch.bfloat16)  # casts weight_scale too
    compiled = sparsekit.compile(model, formats=["dense"], cache=False)
    back = decompile(compiled)
    assert torch.equal(back[0].weight, model[0].weight)
    assert torch.equal(attached_scales(back[0]), model[0].weight_scale.float())  # as stored


def test_a_file_without_the_grid_still_loads(tmp_path):
    plain = _model()
    del plain[0]._buffers["weight_scale"]
    path = sparsekit.save(sparsekit.compile(plain, formats=["dense"], cache=False),
                          tmp_path / "old.safetensors")
    skeleton = sparsekit.compile(_model(), formats=["dense"], cache=False)
    sparsekit.load(skeleton, path)  # takes the file's format: no grid
    assert "0.format.scales" not in skeleton.state_dict()
    assert attached_scales(decompile(skeleton)[0]) is None


def test_the_dense_grid_is_checked():
    weight = torch.randn(4, 8)
    for bad, match in [(torch.ones(4, 3), r"dense .* groups dividing 8, got torch.float32"),
                       (torch.ones(5), r"must be float32 of shape \(4,\) .* got torch.float32"),
                       (-torch.ones(4), "positive and finite")]:
        with pytest.raises(ValueError, match=match):
            FORMATS["dense"].from_dense(weight, scales=bad)
    with pytest.raises(TypeError, match="scales must be None or a floating tensor, got "):
        FORMATS["dense"].from_dense(weight, scales=torch.ones(4, dtype=torch.int64))
    layer = CompiledLinear.from_linear(_scaled(nn.Linear(8, 4), None))
    state = layer.state_dict()
    state["format.scales"] = torch.full((4,), float("nan"))
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="positive and finite"):
        layer.load_state_dict(state)
    assert unchanged(layer, before)


def test_a_fused_dense_group_gives_back_each_members_grid():
    torch.manual_seed(0)
    members = [_scaled(nn.Linear(8, 4), None), _scaled(nn.Linear(8, 6), None)]
    group = FusedProjections(CompiledLinear.from_linear(stack(members)), [4, 6])
    for member, original in zip(group.members(), members, strict=True):
        assert _same(member.to_linear(), original)


# -- the decision cache ---------------------------------------------------------------


def test_a_decision_file_with_a_key_no_timing_records_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 16)
    sparsekit.compile(model, x, formats=["dense"], fuse=False)
    files = list((tmp_path / "decisions").glob("*.json"))
    assert files
    for file in files:
        data = json.loads(file.read_text())
        data["choice"]["activation"] = {"chosen": True}
        file.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match=r"keys \['activation'\] are no timing's record"):
        compiled = sparsekit.compile(model, x, formats=["dense"], fuse=False)
    assert not any(c["cached"] for c in compiled.sparsekit_choices.values())


# -- odd layers and inputs ------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"weight_dtype": "int8"}])
def test_a_layer_without_outputs_compiles(options):
    model = nn.Sequential(nn.Linear(4, 0), nn.ReLU())
    x = torch.randn(2, 4)
    compiled = sparsekit.compile(model, x, formats=["dense"], cache=False, **options)
    assert compiled(x).shape == (2, 0)
    assert _same(decompile(compiled), model)


def test_meta_layers_and_meta_inputs_are_named():
    model = nn.Sequential(nn.Linear(4, 4)).to("meta")
    with pytest.raises(ValueError, match=r"model: 0\.weight is on the meta device"):
        sparsekit.compile(model)
    model = nn.Sequential(nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="example_inputs is on the meta device"):
        sparsekit.compile(model, torch.randn(2, 4, device="meta"))
    assert unchanged(model, before)


def test_numpy_rows_and_threads_are_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    model = nn.Sequential(nn.Linear(8, 4))
    compiled = sparsekit.compile(model, rows=np.array([1, 2]), threads=np.int64(1),
                                 formats=["dense"])
    assert compiled.sparsekit_choices["0"]["rows"] == [1, 2]
    assert list((tmp_path / "decisions").glob("*.json"))


@pytest.mark.parametrize("example", [False, True])
def test_a_spectral_norm_layer_is_left_as_it_is(example):
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 8)), nn.ReLU(),
                          nn.Linear(8, 2)).eval()
    x = torch.randn(2, 8)
    compiled = sparsekit.compile(model, x if example else None, formats=["dense"], cache=False)
    assert compiled[0].__class__ is nn.Linear  # its hook still normalizes the weight
    assert "computed by a hook" in compiled.sparsekit_choices["0"]["reason"]
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x))


def test_decompile_gives_back_the_dtype_the_model_was_cast_to():
    torch.manual_seed(0)
    compiled = sparsekit.compile(nn.Sequential(nn.Linear(8, 4)), formats=["dense"],
                                 cache=False).to(torch.bfloat16)
    back = decompile(compiled)
    assert back[0].weight.dtype == torch.bfloat16
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert torch.equal(back(x), compiled(x))


@needs_kernels
def test_decompile_of_a_meta_model_is_named():
    model = nn.Sequential(nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    compiled = sparsekit.compile(model, formats=["bitmap"], cache=False).to("meta")
    with pytest.raises(ValueError, match=r"model: 0\.\S+ is on the meta device"):
        decompile(compiled)


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"in_shape": 8}, TypeError, r"in_shape must be a tuple of ints ≥ 0 .* got 8"),
    ({"in_shape": (-1,)}, ValueError, r"in_shape must be an int ≥ 0, got -1"),
    ({"dtype": torch.int64}, TypeError, r"dtype must be a floating torch.dtype .* torch.int64"),
    ({"inputs": torch.randn(3, 7)}, ValueError, r"inputs must be .* in_shape=\(8,\), got shape"),
])
def test_measure_checks_its_shapes_and_dtype(options, error, match):
    arguments = {"modules": {"dense": nn.Linear(8, 4)}, "in_shape": (8,), "rows": [1],
                 "dtype": torch.float32, "device": torch.device("cpu")} | options
    with warnings.catch_warnings(), pytest.raises(error, match=match):
        autotune.measure(**arguments)


def test_report_shows_a_dense_layer_with_a_grid_as_float_values():
    compiled = sparsekit.compile(_model(8), formats=["dense"], cache=False)
    row = next(r for r in sparsekit.engine.report(compiled).rows if r.name == "0")
    assert row.extra["values"] == "float32"  # not "float32 g8": no int8 codes are stored


def test_compiled_linear_names_a_bias_or_layer_of_the_wrong_type():
    fmt = FORMATS["dense"].from_dense(torch.randn(4, 8))
    with pytest.raises(TypeError, match=r"bias must be None or a tensor of shape \(4,\), got list"):
        CompiledLinear(fmt, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv2d"):
        CompiledLinear.from_linear(nn.Conv2d(8, 4, 1))


def test_compiled_layers_keep_the_mode_of_the_layers_they_replace():
    model = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5)).eval()
    compiled = sparsekit.compile(model, torch.randn(2, 8), formats=["dense"], cache=False)
    assert not any(m.training for m in compiled.modules())
    assert not any(m.training for m in decompile(compiled).modules())


def test_example_inputs_of_more_rows_than_max_rows_are_refused():
    from sparsekit.engine.compile import MAX_ROWS

    model = nn.Sequential(nn.Linear(4, 2))
    x = torch.randn(1, 4).expand(MAX_ROWS + 1, 4)
    with pytest.raises(ValueError, match=rf"example_inputs give layer '0' {MAX_ROWS + 1} rows"):
        sparsekit.compile(model, x, formats=["dense"], cache=False)
    compiled = sparsekit.compile(model, x, rows=[1, 2], formats=["dense"], cache=False)
    assert compiled.sparsekit_choices["0"]["rows"] == [1, 2]


@pytest.mark.parametrize("formats", [["dense"], ["torch_csr"]])
def test_compile_runs_under_inference_mode(formats):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4))
    with torch.no_grad():
        model[0].weight[:, ::2] = 0
    x = torch.randn(2, 8)
    with torch.inference_mode():
        compiled = sparsekit.compile(model, x, formats=formats, cache=False)
        assert compiled[0].format.name == formats[0]
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    compiled(x).sum().backward()  # its other layers are no inference tensors either


class _TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"logits": self.a(x)}, x


def test_the_output_check_reads_tuple_and_dict_outputs(monkeypatch):
    module = sys.modules["sparsekit.engine.compile"]  # the package exports the function
    assemble = module._assemble

    def wrong(*args):  # a kernel that computes the wrong product
        layer = assemble(*args)
        with torch.no_grad():
            layer.format.weight.mul_(2)
        return layer

    monkeypatch.setattr(module, "_assemble", wrong)
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="compiled model output differs"):
        sparsekit.compile(_TupleOutput(), torch.randn(2, 8), formats=["dense"], cache=False)


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


@needs_kernels
def test_the_int8_reference_of_a_tied_head_leaves_the_embedding_alone():
    torch.manual_seed(0)
    model = _TiedLM()
    ids = torch.randint(0, 32, (1, 6))
    # the head (tied: compiled as a copy, formats without dense) holds int8 codes; the check
    # compares with a reference whose head, not whose embedding, is dequantized
    compiled = sparsekit.compile(model, ids, formats=["bitmap"], weight_dtype="int8",
                                 cache=False)
    assert compiled.head.format.value_dtype == torch.int8
    assert torch.equal(compiled.embed.weight, model.embed.weight)
