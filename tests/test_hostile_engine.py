"""Hostile inputs to the engine helpers, ``llm.prune(quantize=...)``, ``distributed`` and the
framework integrations: each is a clear error naming the parameter, the bad value and what
is accepted (:class:`~sparsekit._checks.ArgumentTypeError` for a wrong type), raised
before anything changes. Before, most were raw ``AttributeError``/``KeyError``/
``StopIteration`` from deep inside, and some changed state first.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparsekit import distributed
from sparsekit._checks import ArgumentTypeError
from sparsekit.engine import autotune
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.fused import shared_inputs, stack
from sparsekit.engine.report import report
from sparsekit.engine.sparse_linear import SparseLinear
from sparsekit.engine.structure_set import StructureSet

# -- StructureSet ------------------------------------------------------------------------


def two_sparse_layers() -> nn.Sequential:
    return nn.Sequential(SparseLinear(4, 3, torch.ones(3, 4, dtype=torch.bool)),
                         SparseLinear(3, 3, torch.ones(3, 3, dtype=torch.bool)))


def test_structure_set_checks_every_mask_before_resizing_any_layer() -> None:
    model = two_sparse_layers()
    masks = StructureSet(model)
    before = [(layer.nnz, layer.values.detach().clone()) for layer in model]
    bad = {"0.weight": torch.zeros(3, 4, dtype=torch.bool),
           "1.weight": torch.zeros(3, 3, dtype=torch.bool, device="meta")}
    with pytest.raises(ValueError, match=r"masks\['1.weight'\] is on the meta device"):
        masks.update(bad)
    for layer, (nnz, values) in zip(model, before, strict=True):
        assert layer.nnz == nnz and torch.equal(layer.values.detach(), values)
    assert all(bool(m.all()) for m in masks.masks.values())


@pytest.mark.parametrize("mask, error, phrase", [
    (torch.zeros(3, 4), ArgumentTypeError, "must be a bool tensor"),
    (torch.zeros(4, 3, dtype=torch.bool), ValueError, r"has shape \(4, 3\), expected \(3, 4\)"),
])
def test_structure_set_second_mask_of_wrong_dtype_or_shape_changes_nothing(
    mask, error, phrase
) -> None:
    model = two_sparse_layers()
    masks = StructureSet(model)
    with pytest.raises(error, match=phrase):
        masks.update({"1.weight": torch.zeros(3, 3, dtype=torch.bool), "0.weight": mask})
    assert model[0].nnz == 12 and model[1].nnz == 9


def test_structure_set_refuses_a_model_that_is_not_a_module() -> None:
    with pytest.raises(ArgumentTypeError, match="model must be a torch.nn.Module.*NoneType"):
        StructureSet(None)


def test_structure_set_update_refuses_a_non_mapping() -> None:
    masks = StructureSet(two_sparse_layers())
    with pytest.raises(ArgumentTypeError, match="masks must be a dict.*got list"):
        masks.update([("0.weight", torch.ones(3, 4, dtype=torch.bool))])


@pytest.mark.parametrize("saved", [None, [1], "masks"])
def test_structure_set_load_state_dict_refuses_masks_that_are_not_a_dict(saved) -> None:
    masks = StructureSet(two_sparse_layers())
    with pytest.raises(ArgumentTypeError, match=r"state\['masks'\] must be a dict"):
        masks.load_state_dict({"masks": saved})


@pytest.mark.parametrize("on", ["no", 0, 1, None])
def test_structure_set_capture_needs_a_bool(on) -> None:
    model = two_sparse_layers()
    masks = StructureSet(model)
    with pytest.raises(ArgumentTypeError, match=f"on must be a bool.*got {on!r}"):
        masks.capture(on)
    assert not any(layer.capture_dense_grad for layer in model)
    masks.capture(True)
    assert all(layer.capture_dense_grad for layer in model)


# -- llm.prune(quantize="int8") ----------------------------------------------------------


@pytest.mark.parametrize("quantize", ["int8", None])
def test_llm_prune_refuses_a_float64_weight_beyond_float32_before_block_0(quantize) -> None:
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 1e300
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' holds a "
                                         r"magnitude of 1e\+300, beyond float32's largest"):
        llm.prune(model, tokens, nsamples=4, seqlen=16, method="magnitude", quantize=quantize)
    after = model.state_dict()
    assert after.keys() == before.keys()  # no weight_scale attached
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- distributed --------------------------------------------------------------------------


@pytest.mark.parametrize("ddp", [nn.Linear(2, 2), None, "model"])
def test_rebuild_reducer_refuses_a_model_that_is_not_ddp_and_leaves_it_alone(ddp) -> None:
    with pytest.raises(ArgumentTypeError, match="ddp must be a torch.nn.parallel."
                                                "DistributedDataParallel"):
        distributed.rebuild_reducer(ddp)
    if isinstance(ddp, nn.Module):
        assert "reducer" not in ddp.__dict__ and "logger" not in ddp.__dict__


def test_unsharded_and_is_sharded_refuse_a_non_module() -> None:
    with pytest.raises(ArgumentTypeError, match="model must be a torch.nn.Module, got str"):
        distributed.is_sharded("x")
    with (pytest.raises(ArgumentTypeError, match="model must be a torch.nn.Module, got str"),
          distributed.unsharded("x")):
        pass


# -- autotune -----------------------------------------------------------------------------

GOOD = {1: {"dense": [1.0] * 5, "csr": [0.5] * 5}}


def test_autotune_choose_still_takes_good_samples() -> None:
    assert autotune.choose(GOOD, ["csr"])[0] == "csr"
    assert autotune.choose(GOOD, ("dense", "csr"))[0] == "csr"


@pytest.mark.parametrize("samples, allowed, kwargs, error, phrase", [
    ({}, ["dense"], {}, ValueError, "samples must be a non-empty dict.*got an empty one"),
    ([1], ["dense"], {}, ArgumentTypeError, "samples must be a non-empty dict.*got list"),
    ({1: {"csr": [1.0]}}, ["csr"], {}, ValueError, "reference 'dense' was not timed"),
    ({1: {"dense": [1.0], "csr": [0.5]}, 2: {"dense": [1.0]}}, ["csr"], {}, ValueError,
     "the same formats at every row count"),
    (GOOD, ["bogus"], {}, ValueError, r"allowed names 'bogus'.*\['csr', 'dense'\]"),
    (GOOD, "csr", {}, ArgumentTypeError, "allowed must be a sequence of format names"),
    ({1: {"dense": [math.nan], "csr": [0.5]}}, ["csr"], {}, ValueError,
     r"samples\[1\]\['dense'\] must hold finite times ≥ 0 \(ms\), got nan"),
    ({1: {"dense": [1.0], "csr": [math.inf]}}, ["csr"], {}, ValueError, "got inf"),
    ({1: {"dense": [1.0], "csr": [-5.0]}}, ["csr"], {}, ValueError, "got -5.0"),
    ({1: {"dense": [], "csr": []}}, ["csr"], {}, ValueError, "at least one time"),
    ({1: {"dense": [1.0, 1.0], "csr": [0.5]}}, ["csr"], {}, ValueError, "as many rounds"),
    ({1: {"dense": ["1"], "csr": [0.5]}}, ["csr"], {}, ArgumentTypeError, "times in ms"),
    ({0: {"dense": [1.0], "csr": [0.5]}}, ["csr"], {}, ValueError, "row counts must be an int"),
    ({1: {"dense": [1.0]}}, ["dense"], {"dense_allowed": False}, ValueError,
     "dense_allowed=False needs a format other than the reference 'dense'"),
    (GOOD, ["csr"], {"dense_allowed": "no"}, ArgumentTypeError, "dense_allowed must be a bool"),
    (GOOD, ["csr"], {"split": 1}, ArgumentTypeError, "split must be a bool"),
])
def test_autotune_choose_checks_its_arguments(samples, allowed, kwargs, error, phrase) -> None:
    with pytest.raises(error, match=phrase):
        autotune.choose(samples, allowed, **kwargs)


def test_autotune_choose_nan_reference_is_not_silently_ignored() -> None:
    # before: the NaN median compared False everywhere and "dense" was returned
    with pytest.raises(ValueError, match="nan"):
        autotune.choose({1: {"dense": [math.nan], "csr": [0.5]}}, ["csr"])


@pytest.mark.parametrize("rows, inputs, error, phrase", [
    ([-1], None, ValueError, "rows must be an int ≥ 1, got -1"),
    ([0], None, ValueError, "rows must be an int ≥ 1, got 0"),
    (1, None, ArgumentTypeError, "rows must be a sequence of row counts"),
    ("1", None, ArgumentTypeError, "rows must be a sequence of row counts"),
    ([1.5], None, ArgumentTypeError, "rows must be an int ≥ 1, got 1.5"),
    ([1], torch.zeros(0, 4), ValueError, r"inputs must be None or a tensor.*shape \(0, 4\)"),
    ([1], [[0.0] * 4], ArgumentTypeError, "inputs must be None or a tensor.*got list"),
])
def test_autotune_measure_checks_rows_and_inputs(rows, inputs, error, phrase) -> None:
    with pytest.raises(error, match=phrase):
        autotune.measure({"dense": nn.Linear(4, 4)}, (4,), rows, torch.float32,
                         torch.device("cpu"), inputs)


def test_autotune_measure_checks_modules_and_every_round() -> None:
    with pytest.raises(ArgumentTypeError, match="modules must be a dict"):
        autotune.measure([nn.Linear(4, 4)], (4,), [1], torch.float32, torch.device("cpu"))
    with pytest.raises(ArgumentTypeError, match="every_round must be a bool"):
        autotune.measure({"dense": nn.Linear(4, 4)}, (4,), [1], torch.float32,
                         torch.device("cpu"), every_round="yes")


@pytest.mark.parametrize("enabled", ["no", 0, None])
def test_autotune_cold_cache_needs_a_bool(enabled) -> None:
    with (pytest.raises(ArgumentTypeError, match="enabled must be a bool"),
          autotune.cold_cache(enabled)):
        pass
    assert not autotune.cold()
    with autotune.cold_cache(False):
        assert not autotune.cold()


# -- integrations without their framework -----------------------------------------------


@pytest.mark.parametrize("module, missing, phrase", [
    ("hf", "transformers", "pip install 'sparsekit[llm]'"),
    ("lightning", "lightning", "pip install 'lightning>=2.4'"),
])
def test_integration_without_its_framework_names_what_to_install(module, missing,
                                                                  phrase) -> None:
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            f"try:\n    import sparsekit.integrations.{module}\n"
            f"except ImportError as e:\n    print(type(e).__name__, '|', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.startswith("ImportError |"), out
    assert f"sparsekit.integrations.{module} needs" in out and phrase in out


# -- fused, compiled convolutions, report -------------------------------------------------


def test_fused_stack_checks_its_layers() -> None:
    with pytest.raises(ArgumentTypeError, match=r"layers\[0\] must be an nn.Linear, got Conv1d"):
        stack([nn.Conv1d(2, 2, 1), nn.Conv1d(2, 2, 1)])
    with pytest.raises(ArgumentTypeError, match=r"layers\[1\] must be an nn.Linear, got str"):
        stack([nn.Linear(2, 2), "x"])
    with pytest.raises(ValueError, match="non-empty sequence of nn.Linear layers, got none"):
        stack([])
    with pytest.raises(ArgumentTypeError, match="sequence of nn.Linear layers, got Linear"):
        stack(nn.Linear(2, 2))
    assert stack(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 3)])).out_features == 5


def test_fused_shared_inputs_checks_model_and_inputs() -> None:
    with pytest.raises(ArgumentTypeError, match="model must be a torch.nn.Module, got str"):
        shared_inputs("m", (torch.randn(1, 4),))
    with pytest.raises(ArgumentTypeError, match="inputs must be a tuple.*got Tensor"):
        shared_inputs(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4))


def test_compiled_conv2d_checks_the_layer_and_the_input() -> None:
    with pytest.raises(ArgumentTypeError, match="conv must be an nn.Conv2d, got Linear"):
        CompiledConv2d.from_conv2d(nn.Linear(2, 2))
    conv = CompiledConv2d.from_conv2d(nn.Conv2d(2, 3, 3))
    with pytest.raises(ArgumentTypeError, match=r"x must be a torch.Tensor of shape "
                                                r"\(N, in_channels=2, H, W\).*got list"):
        conv([1, 2])


def test_engine_report_refuses_a_model_that_is_not_a_module() -> None:
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module, got str"):
        report("x")
