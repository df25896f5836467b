"""Hostile inputs found by probing the public API (session 30): each is a clear error that
names the argument, raised before anything changes.

Every case here was accepted (computing on NaN, silently ignoring the argument) or failed
with a raw error from deep inside before.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit import activation
from sparsekit._checks import ArgumentTypeError
from sparsekit.activation import ActivationSparsity
from sparsekit.regularize import GroupEnvelope, GroupLasso, SoftThreshold
from sparsekit.structured import dependency_groups
from sparsekit.structured.dependency import check_groups


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


# -- activation sparsity ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_calibration_with_non_finite_activations_is_an_error(value):
    """NaN inputs used to give all-zero thresholds while reporting 50 % sparsity."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="calibration.*NaN or infinite"):
        activation.calibrate(model, torch.full((32, 8), value))
    assert unchanged(model, before)


def test_calibration_seed_must_be_an_int():
    with pytest.raises(TypeError, match=r"seed must be an int in \[0, 2\*\*63 - 1\], got 1.5"):
        activation.calibrate(mlp(), torch.randn(32, 8), seed=1.5)


def thresholds(**layers: object) -> ActivationSparsity:
    return ActivationSparsity("teal", "uniform", 0.5, dict.fromkeys(layers, 0.5), layers,
                              dict.fromkeys(layers, 128))


@pytest.mark.parametrize("bad, match", [
    ("oops", r"thresholds\['2'\] must be a 1-D float tensor.*got str"),
    (torch.zeros(2, 16), r"thresholds\['2'\] must be a 1-D float tensor.*shape \(2, 16\)"),
    (torch.zeros(16, dtype=torch.long), r"thresholds\['2'\] must be a 1-D float tensor"),
    (torch.full((16,), float("nan")), r"thresholds\['2'\] must hold thresholds ≥ 0"),
    (torch.full((16,), -1.0), r"thresholds\['2'\] must hold thresholds ≥ 0"),
])
def test_activation_sparsity_rejects_bad_thresholds(bad, match):
    """A NaN threshold used to zero every input once applied; a string failed in apply()
    after the first layer's hook was installed."""
    with pytest.raises(ValueError, match=match):
        thresholds(**{"0": torch.zeros(8), "2": bad})


def test_apply_checks_every_layer_before_installing_a_hook():
    """Thresholds of the wrong width used to be installed and fail at the next forward."""
    model = mlp()
    sparsity = thresholds(**{"0": torch.zeros(8), "2": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"thresholds\['2'\] has 3 thresholds.*takes 16"):
        sparsity.apply(model)
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    sparsity.thresholds["2"] = torch.zeros(16)
    sparsity.apply(model).remove()  # not left "already applied"


def test_apply_needs_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        thresholds(**{"0": torch.zeros(8)}).apply("abc")


def test_model_sparsity_names_unknown_layers():
    with pytest.raises(ValueError, match=r"per_layer names layers \['zzz'\]"):
        thresholds(**{"0": torch.zeros(8)}).model_sparsity({"zzz": 0.5})


# -- compile ---------------------------------------------------------------------------------


def compile_(model: nn.Module, *args: object, **kwargs: object) -> nn.Module:
    return sparsekit.compile(model, *args, cache=False, **kwargs)


@pytest.mark.parametrize("example, match", [
    (torch.full((2, 8), float("nan")), "example_inputs must be finite"),
    (torch.full((2, 8), float("inf")), "example_inputs must be finite"),
    (torch.empty(0, 8), r"example_inputs must not be empty.*\(0, 8\)"),
])
def test_compile_rejects_example_inputs_it_cannot_tune_on(example, match):
    with pytest.raises(ValueError, match=match):
        compile_(mlp(), example)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(formats=5), TypeError, "formats must be 'auto' or names from .* got 5"),
    (dict(threads=10**6), ValueError, r"threads must be an int in \[1, 65536\].* got 1000000"),
    (dict(activation_sparsity=5), TypeError, "activation_sparsity must be calibrated input"),
    (dict(activation_dtype="int8"), ValueError,
     "no layer of model carries int8 scales: pass weight_dtype='int8'"),
])
def test_compile_names_the_bad_argument(kwargs, error, match):
    """Each was a raw TypeError / AttributeError / RuntimeError from deep inside, or (int8
    inputs for a float model) silently ignored."""
    with pytest.raises(error, match=match):
        compile_(mlp(), torch.randn(2, 8), **kwargs)


@pytest.mark.parametrize("layers, match", [
    ({"zz": torch.zeros(8)}, r"activation_sparsity.thresholds: model has no modules named "
                             r"\['zz'\]"),
    ({"0": torch.zeros(3)}, r"activation_sparsity.thresholds\['0'\] has 3 thresholds.*takes 8"),
])
def test_compile_checks_the_thresholds_against_the_model(layers, match):
    """Thresholds of an unknown layer used to be ignored, of the wrong width to fail inside
    the forward pass with a raw RuntimeError."""
    with pytest.raises(ValueError, match=match):
        compile_(mlp(), torch.randn(2, 8), activation_sparsity=thresholds(**layers))


# -- structured removal and its regularisers -------------------------------------------------


def other_groups() -> list:
    """Dependency groups of a wider model than :func:`mlp` (32 hidden channels, not 16)."""
    return dependency_groups(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)))


def half_mask() -> dict[str, torch.Tensor]:
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :8] = True
    return {"2.weight": mask}


def test_shrink_rejects_groups_of_another_model():
    """They were accepted and removed nothing (16 channels kept instead of 8)."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"groups\[0\] \(opened by '0'\) does not fit model: "
                                         r"it needs 32 entries along dim 0 of '0.weight'"):
        sparsekit.shrink(model, half_mask(), groups=other_groups())
    assert unchanged(model, before)
    small = sparsekit.shrink(model, half_mask(), groups=dependency_groups(model))
    assert small[0].out_features == 8


@pytest.mark.parametrize("groups, match", [
    ([1], r"groups\[0\] must be a Group, got int"),
    ("abc", "groups must be a sequence of Group"),
])
def test_shrink_names_groups_of_the_wrong_type(groups, match):
    with pytest.raises(TypeError, match=match):
        sparsekit.shrink(mlp(), half_mask(), groups=groups)


@pytest.mark.parametrize("mask", [torch.full((4, 16), float("nan")), torch.full((4, 16), 0.3),
                                  torch.full((4, 16), 2)])
def test_shrink_masks_must_be_bool(mask):
    """A float mask's NaN or 0.3 used to count as "keep"."""
    with pytest.raises(ValueError, match=r"masks\['2.weight'\] must be a bool tensor"):
        sparsekit.shrink(mlp(), {"2.weight": mask})


def test_shrink_compensation_refuses_non_finite_means():
    """NaN calibration data used to be folded into the readers' biases."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="compensate: .* NaN or infinite mean inputs"):
        sparsekit.shrink(model, half_mask(), compensate=[torch.full((2, 8), float("nan"))])
    assert unchanged(model, before)


def test_check_groups_passes_fitting_groups_through():
    model = mlp()
    groups = dependency_groups(model)
    assert check_groups(iter(groups), model) == groups


@pytest.mark.parametrize("build", [
    lambda m, opt: GroupLasso(m, float("inf")),
    lambda m, opt: SoftThreshold(opt, float("inf")),
])
def test_regularisers_reject_an_infinite_strength(build):
    """SoftThreshold(opt, inf) used to zero every weight at the first step."""
    model = mlp()
    with pytest.raises(ValueError, match="strength must be a finite float ≥ 0, got inf"):
        build(model, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("build", [
    lambda m, opt, g: GroupLasso(m, 0.1, groups=g),
    lambda m, opt, g: GroupEnvelope(m, 0.1, 0.5, groups=g),
    lambda m, opt, g: SoftThreshold(opt, 0.1, model=m, groups=g),
])
def test_regularisers_check_their_groups_when_built(build):
    """Groups of another model used to fail inside step(), after the optimizer had stepped."""
    model = mlp()
    with pytest.raises(ValueError, match=r"groups\[0\] .* does not fit model"):
        build(model, torch.optim.SGD(model.parameters(), lr=0.1), other_groups())


# -- LLM calibration, structured pruning and loading -----------------------------------------


def llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed=1.5), TypeError, r"seed must be an int in \[0, 2\*\*63 - 1\], got 1.5"),
    (dict(seed=True), TypeError, r"seed must be an int in \[0, 2\*\*63 - 1\], got True"),
    (dict(seed=2**70), ValueError, r"seed must be an int in \[0, 2\*\*63 - 1\], got \d+"),
    (dict(calibration=torch.ones(2, 8, dtype=torch.bool)), ValueError,
     "calibration tensor must hold token ids.*torch.bool"),
    (dict(calibration=["some text"], tokenizer=5), TypeError, "tokenizer must be callable"),
    (dict(calibration="hello world " * 40), FileNotFoundError,
     "calibration: no such text file .*pass texts as a list of strings"),
    (dict(unit="layers", amount=0.1), ValueError,
     "amount=0.1 of 2 layers rounds to no layer removed; amounts from 0.25 remove one"),
])
def test_prune_structured_names_the_bad_argument(kwargs, error, match):
    """A float seed was a raw RuntimeError from manual_seed, bool token ids were accepted, a
    long text passed as a path an OSError, and removing 0.1 of 2 layers a silent no-op."""
    from sparsekit import llm

    model = llama()
    before = snapshot(model)
    args = dict(calibration=torch.randint(0, 64, (2, 8)), amount=0.5) | kwargs
    with pytest.raises(error, match=match):
        llm.prune_structured(model, **args)
    assert unchanged(model, before)


@pytest.mark.parametrize("path, error, match", [
    (None, TypeError, "path must be a directory written by save_pretrained"),
    (5, TypeError, "path must be a directory written by save_pretrained"),
    ("/nonexistent/model", FileNotFoundError, "path: no such directory"),
])
def test_load_pretrained_names_a_bad_path(path, error, match):
    """None and 5 used to retry huggingface.co for half a minute."""
    from sparsekit import llm

    with pytest.raises(error, match=match):
        llm.load_pretrained(path)


def test_load_pretrained_names_a_missing_relative_path(tmp_path, monkeypatch):
    """A bare relative name that is no directory gets the error "./name" gets, naming
    path: it was passed on as a hub id, a raw OSError about connecting to huggingface.co."""
    import transformers

    from sparsekit import llm

    def hub_miss(name, *args, **kwargs):  # the hub's answer, offline or not: no network here
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub_miss)
    with pytest.raises(FileNotFoundError, match="path: no such directory 'my_pruned_model'"):
        llm.load_pretrained("my_pruned_model")


@pytest.mark.parametrize("shapes, match", [
    ("garbage", "sparsekit_shapes must map parameter names to shapes, got str"),
    ({"model.nope.weight": [5, 16]}, "'model.nope.weight' as \\[5, 16\\].*no such parameter"),
    ({"model.layers.0.mlp.up_proj.weight": [-5, 16]}, r"as \[-5, 16\]; expected a list of "
                                                      r"positive ints, at most \[\d+, 16\]"),
    ({"model.layers.0.mlp.up_proj.weight": [5, 16, 3]}, "as \\[5, 16, 3\\]"),
    ({"model.layers.0.mlp.up_proj.weight": [10**9, 16]}, r"at most \[\d+, 16\]"),
])
def test_load_pretrained_checks_the_recorded_shapes(tmp_path, shapes, match):
    """They were raw AttributeErrors and RuntimeErrors, and a shape larger than the config
    builds loaded without a word."""
    import json

    from sparsekit import llm

    model = llama()
    llm.prune_structured(model, amount=0.5, method="magnitude", allocation="global")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sparsekit_shapes"]
    (tmp_path / "config.json").write_text(json.dumps(config | {"sparsekit_shapes": shapes}))
    with pytest.raises(ValueError, match=match):
        llm.load_pretrained(tmp_path)


# -- kernel ops called directly --------------------------------------------------------------


@pytest.mark.parametrize("moved", ["k", "v", "block_mask"])
def test_an_op_given_tensors_on_two_devices_raises(moved):
    """A CPU call with one meta tensor dispatches to the op's fake (meta) implementation,
    which returned uninitialised memory as the attention output."""
    from sparsekit.engine import kernels

    if not kernels.available():
        pytest.skip("native kernels not built")
    args = dict(q=torch.randn(1, 2, 8, 4), k=torch.randn(1, 2, 8, 4), v=torch.randn(1, 2, 8, 4),
                block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))
    args[moved] = args[moved].to("meta")
    with pytest.raises(RuntimeError, match=r"every tensor argument must be on one device, got "
                                           r"\['cpu', 'meta'\]"):
        torch.ops.sparsekit.block_sparse_attention(*args.values(), True, 4, 0.5, 1)


# -- int8 quantization, save_pretrained, report ----------------------------------------------


@pytest.mark.parametrize("scales", [torch.zeros(2), -torch.ones(2), torch.full((2,), float("nan")),
                                    torch.full((2,), float("inf"))])
def test_quantize_int8_refuses_scales_that_are_no_grid(scales):
    """Zero scales used to give ±127 codes, NaN ones all-zero codes."""
    from sparsekit.quantize import attach_scales, quantize_int8

    with pytest.raises(ValueError, match="scales must be positive and finite"):
        quantize_int8(torch.randn(2, 4), scales)
    with pytest.raises(ValueError, match="scales must be positive and finite"):
        attach_scales(nn.Linear(4, 2), scales)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_int8_scales_refuse_non_finite_weights(value):
    """An infinite weight gave an infinite scale (its row decoded as NaN), a NaN row scale 1."""
    from sparsekit.quantize import int8_scales, quantize_int8

    weight = torch.randn(2, 4)
    weight[1, 2] = value
    with pytest.raises(ValueError, match="weight holds NaN or infinite values"):
        int8_scales(weight)
    with pytest.raises(ValueError, match="weight holds NaN or infinite values"):
        quantize_int8(weight, torch.ones(2))


def test_save_pretrained_refuses_an_infinite_weight_for_int8_and_keeps_the_earlier_save(tmp_path):
    """One inf in the embedding saved silently and came back as a row of NaN; and a refused
    save used to delete the config.json of the save before it."""
    model = llama()
    sparsekit.save_pretrained(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="dense_dtype='int8': 'model.embed_tokens.weight' "
                                         "holds NaN or infinite values"):
        sparsekit.save_pretrained(model, tmp_path, dense_dtype="int8")
    masks = sparsekit.MaskSet(model, {"model.layers.0.mlp.up_proj.weight":
                                      torch.zeros(32, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks"):  # weights not zero where masked
        sparsekit.save_pretrained(model, tmp_path, masks)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    sparsekit.from_pretrained(tmp_path)


def test_report_names_example_inputs_the_model_cannot_run():
    with pytest.raises(ValueError, match="example_inputs: the model cannot run on them"):
        sparsekit.report(mlp(), torch.randn(2, 7))


def test_diff_counts_integer_changes_exactly():
    """Compared as doubles, 2**62 + 1 and 2**62 counted as unchanged."""
    a = {"step": torch.tensor([2**62, 5], dtype=torch.int64)}
    b = {"step": torch.tensor([2**62 + 1, 5], dtype=torch.int64)}
    assert sparsekit.diff(a, b).rows[0].changed == 1
    assert sparsekit.diff(a, b, atol=2.0).rows[0].changed == 0


# -- ActivationSparseLinear built directly ---------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(threshold=float("nan")), "threshold must hold thresholds ≥ 0"),
    (dict(threshold=torch.zeros(2, 16)), r"threshold must be a scalar or have in_features=32"),
    (dict(bias=torch.ones(15)), r"bias must be None or of shape \(out_features=16,\)"),
    (dict(weight=torch.ones(16, 32, dtype=torch.int8), scales=torch.full((16,), float("nan"))),
     "scales must be positive and finite"),
    (dict(weight=torch.ones(16, 32, dtype=torch.int8), scales=-torch.ones(16)),
     "scales must be positive and finite"),
])
def test_activation_sparse_linear_checks_what_it_is_built_from(kwargs, match):
    """A NaN threshold made one row return the bias alone, NaN or negative int8 scales NaN
    or sign-flipped outputs, a (15,) bias failed at the first call."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    args = dict(weight=torch.randn(16, 32), bias=torch.randn(16), threshold=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        ActivationSparseLinear(args.pop("weight"), args.pop("bias"), args.pop("threshold"),
                               **args)


@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
def test_activation_sparse_linear_takes_no_rows(kernel):
    """Zero rows raised "stack expects a non-empty TensorList" without a prefill layer."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    layer = ActivationSparseLinear(torch.randn(16, 32), None, 0.1, kernel=kernel)
    assert layer(torch.randn(0, 32)).shape == (0, 16)


def test_save_pretrained_names_a_dense_dtype_that_is_no_name(tmp_path):
    """A list was "unhashable type: 'list'"."""
    with pytest.raises(ValueError, match=r"dense_dtype must be None or one of .* got \['bf16'\]"):
        sparsekit.save_pretrained(llama(), tmp_path, dense_dtype=["bf16"])


@pytest.mark.parametrize("path, what", [
    ("", "no file name"), (".", "no file name"), ("..", "no file name"),
    ("sub", "an existing directory"),
])
def test_save_names_a_path_that_names_no_file(tmp_path, monkeypatch, path, what):
    """An empty path used to encode and write the whole model to a temporary file, then fail
    with an OSError about that temporary path when renaming it over the directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    match = rf"path must be the path of the checkpoint file to write, got '{re.escape(path)}' " \
            rf"\({what}\)"
    with pytest.raises(ValueError, match=match):
        sparsekit.save(mlp(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]
    assert not any((tmp_path / "sub").iterdir())


# -- compile's row counts, seeds, soup, format biases, loss_fn errors (session 31) ------------


@pytest.mark.parametrize("rows", [10**12, [1, 2**20 + 1]])
def test_compile_refuses_more_rows_than_it_can_time(rows):
    """Each layer is timed on random inputs of every row count: 10**12 rows was a raw
    "DefaultCPUAllocator: can't allocate memory" RuntimeError."""
    from sparsekit.engine.compile import MAX_ROWS

    model = mlp()
    before = snapshot(model)
    bad = rows if isinstance(rows, int) else rows[-1]
    with pytest.raises(ValueError, match=rf"rows must be ints in \[1, {MAX_ROWS}\] \(MAX_ROWS: "
                                         rf".*memory\), got {bad}$"):
        compile_(model, torch.randn(2, 8), rows=rows)
    assert unchanged(model, before)


def _seed_takers() -> dict[str, object]:
    """A call of each public function taking a ``seed=`` (sparsekit.moe's are in
    test_moe_inputs.py), with everything else valid."""
    from torch.utils.data import TensorDataset

    from sparsekit.activation import profile
    from sparsekit.data import reber
    from sparsekit.finetune import masked_delta
    from sparsekit.graph import prior_masks
    from sparsekit.prune import compute_masks
    from sparsekit.training import minibatches, train_epoch

    data = TensorDataset(torch.randn(8, 8), torch.randint(0, 4, (8,)))
    return {
        "prune": lambda m, s: sparsekit.prune(m, 0.5, method="random", seed=s),
        "compute_masks": lambda m, s: compute_masks(m, 0.5, seed=s),
        "prior_masks": lambda m, s: prior_masks(m, sparsity=0.5, method="erdos_renyi", seed=s),
        "masked_delta": lambda m, s: masked_delta(m, 0.5, method="magnitude", seed=s),
        "DynamicSparsity": lambda m, s: sparsekit.DynamicSparsity(
            m, torch.optim.SGD(m.parameters(), lr=0.1), 0.5, end_step=10, seed=s),
        "calibrate": lambda m, s: activation.calibrate(m, torch.randn(32, 8), seed=s),
        "profile": lambda m, s: profile(m, torch.randn(4, 8), seed=s),
        "minibatches": lambda m, s: minibatches(data, 2, shuffle=True, seed=s),
        "train_epoch": lambda m, s: train_epoch(m, data, torch.optim.SGD(m.parameters(), lr=0.1),
                                                seed=s),
        "reber": lambda m, s: reber(2, seed=s),
    }


@pytest.mark.parametrize("seed, error", [
    (2**70, ValueError), (2**63, ValueError), (-1, ValueError), (1.5, TypeError),
    ("1", TypeError),
])
@pytest.mark.parametrize("taker", sorted(_seed_takers()))
def test_every_seed_is_an_int_in_the_range_a_generator_takes(taker, seed, error):
    """seed=2**70 was a raw "Overflow when unpacking long long" from manual_seed; reber()
    took any hashable seed, profile() and the training helpers none at all (minibatches()
    only failed at the first batch, train_epoch() after putting the model in train mode)."""
    model = mlp().eval()
    before = snapshot(model)
    with pytest.raises(error, match=rf"seed must be an int in \[0, 2\*\*63 - 1\], "
                                    rf"got {re.escape(repr(seed))}"):
        _seed_takers()[taker](model, seed)
    assert unchanged(model, before)
    assert not model.training
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_the_largest_seed_is_taken():
    from sparsekit._checks import MAX_SEED
    from sparsekit.training import minibatches

    masks = sparsekit.prune(mlp(), 0.5, method="random", seed=MAX_SEED)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    data = torch.utils.data.TensorDataset(torch.arange(4.0), torch.arange(4))
    assert len(list(minibatches(data, 2, shuffle=True, seed=MAX_SEED))) == 2


@pytest.mark.parametrize("models, error, match", [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), TypeError,
     r"models must be a non-empty sequence .* got one model \(Sequential\); pass a list"),
    (nn.Linear(4, 4), TypeError, r"got one model \(Linear\)"),
    ([nn.Linear(4, 4).state_dict()], TypeError, r"models\[0\] must be an nn.Module .*got a "
                                                r"state dict"),
    ([nn.Linear(4, 4), "x"], TypeError, r"models\[1\] must be an nn.Module .*got str"),
    (5, TypeError, "models must be a non-empty sequence .* got int"),
    ({"a": nn.Linear(4, 4)}, TypeError, "models must be a non-empty sequence .* got dict"),
    ([], ValueError, r"models must be a non-empty sequence .* got \[\]"),
])
def test_soup_names_models_that_are_no_sequence_of_models(models, error, match):
    """A Sequential passed alone was taken as its layers: "models[1] has a different
    architecture than models[0]"; 5 was "'int' object is not iterable"."""
    from sparsekit import soup

    with pytest.raises(error, match=match):
        soup(models)


def test_soup_takes_a_module_list():
    from sparsekit import soup

    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    with torch.no_grad():
        b.weight.copy_(a.weight * 3)
    torch.testing.assert_close(soup(nn.ModuleList([a, b])).weight, a.weight * 2)


def _bias_formats() -> list:
    """Every format that can hold a 2:4, constant-fan-in weight here (the native ones only
    with the compiled kernels)."""
    from _kernels import needs_kernels

    from sparsekit.engine.formats import FORMATS
    from sparsekit.engine.formats.native import NativeFormat

    return [pytest.param(n, marks=[needs_kernels] if issubclass(FORMATS[n], NativeFormat)
                         else [], id=n) for n in FORMATS.names()]


@pytest.mark.parametrize("bias, error, got", [
    (3, TypeError, "int"), ([1.0] * 8, TypeError, "list"),
    (torch.ones(1), ValueError, r"\(1,\)"), (torch.ones(1, 8), ValueError, r"\(1, 8\)"),
    (torch.ones(2, 8), ValueError, r"\(2, 8\)"),
])
@pytest.mark.parametrize("name", _bias_formats())
def test_every_format_refuses_the_same_biases(name, bias, error, got):
    """A number or a list reached the native formats' fast path (AttributeError: 'int'
    object has no attribute 'dtype'); a (1,) bias, or one of x's rows, broadcast silently
    on dense, torch_csr and the CUDA formats, where the native ones refused it."""
    from sparsekit.engine.formats import FORMATS

    weight = torch.randn(8, 64) * (torch.arange(64) % 4 < 2)  # 2:4, 32 inputs per row
    kwargs = {"value_dtype": torch.bfloat16} if name == "dense_lowp" else {}
    fmt = FORMATS[name].from_dense(weight, **kwargs)
    with pytest.raises(error, match=rf"bias must be None or a tensor of shape \(8,\) for this "
                                    rf"8x64 {name} weight, got {got}"):
        fmt.matmul(torch.randn(2, 64), bias)
    y = fmt.matmul(torch.randn(2, 64), torch.ones(8))  # the right shape still passes
    assert y.shape == (2, 8)


def test_a_compiled_layer_refuses_a_bias_its_format_would():
    """The hot path trusts the bias it was built with, so setting one is checked."""
    from sparsekit.engine.compiled_linear import CompiledLinear

    layer = CompiledLinear.from_linear(nn.Linear(8, 4), "dense")
    before = layer.bias.clone()
    with pytest.raises(ValueError, match=r"bias must be None or a tensor of shape \(4,\)"):
        layer.bias = torch.ones(1)
    assert torch.equal(layer.bias, before)
    layer.bias = torch.zeros(4)
    assert torch.equal(layer(torch.zeros(1, 8)), torch.zeros(1, 4))


_SCORE_DATA = (torch.randn(4, 8), torch.randint(0, 4, (4,)))


def _failing_loss(outputs, labels):
    raise RuntimeError("boom")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_fn=_failing_loss), ValueError,
     "^loss_fn: it failed on the model's outputs and the labels of a batch: boom$"),
    (dict(loss_fn=lambda out, labels: out + "x"), TypeError, "^loss_fn: it failed on"),
    (dict(data=(torch.randn(4, 8), torch.randint(0, 4, (3,)))), ValueError,
     r"^data: cross-entropy \(the default loss_fn\) cannot compare the model's outputs with "
     "the labels of a batch: Expected input batch_size"),
    (dict(loss_fn=lambda out, labels: out), ValueError,
     r"^loss_fn must return a scalar tensor .*\(4, 4\)$"),
])
def test_a_loss_error_names_what_failed(kwargs, error, match):
    """An error of the caller's loss_fn was put down to data ("data: the loss cannot compare
    …"), and the loss_fn's own checks came with that prefix too."""
    model = nn.Sequential(nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(error, match=match):
        sparsekit.prune(model, 0.5, method="snip", **({"data": _SCORE_DATA} | kwargs))
    assert unchanged(model, before)


# -- calibration data, training helpers, deltas, quantization, selection (session 32) --------


GRADIENT_CRITERIA = ["snip", "taylor", "taylor:accumulated", "grasp", "gradient"]


@pytest.mark.parametrize("data", [
    (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)),
    [(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))] * 2,
])
@pytest.mark.parametrize("method", [*GRADIENT_CRITERIA, "synflow", "wanda", "flap"])
def test_calibration_data_without_rows_is_refused(method, data):
    """Empty batches gave the gradient criteria all-zero scores: the mask kept the first
    half of every layer by position."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^data for criterion '{method}' holds no rows"):
        sparsekit.prune(model, 0.5, method=method, data=data)
    assert unchanged(model, before)


def test_masked_delta_refuses_calibration_data_without_rows():
    from sparsekit.finetune import masked_delta

    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="^data for criterion 'gradient' holds no rows"):
        masked_delta(model, 0.5, data=(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)))
    assert unchanged(model, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_empty_batches_beside_full_ones_are_left_out():
    """An empty batch adds nothing to a gradient; counted in the mean it only diluted it."""
    from sparsekit.scores import CRITERIA, ScoreContext
    from sparsekit.targets import resolve_targets

    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    model = mlp()
    empty = (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    score = {d: CRITERIA.get("taylor")(ScoreContext(model, resolve_targets(model), data))
             for d, data in (("full", [(x, y)]), ("padded", [empty, (x, y), empty]))}
    assert all(torch.allclose(score["full"][n], score["padded"][n]) for n in score["full"])


@pytest.mark.parametrize("method", GRADIENT_CRITERIA)
def test_an_error_of_the_backward_pass_names_data(method):
    """One unbatched input with a batch of one label fails only in the backward pass:
    a raw autograd "size mismatch" RuntimeError."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^data: differentiating the loss on a batch failed: "
                                         r"size mismatch"):
        sparsekit.prune(model, 0.5, method=method, data=(torch.randn(8), torch.zeros(1).long()))
    assert unchanged(model, before)


@pytest.mark.parametrize("method", GRADIENT_CRITERIA)
def test_a_loss_that_does_not_require_grad_is_refused(method):
    """A detached loss was "element 0 of tensors does not require grad" from autograd."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match="^loss_fn must return a loss computed from the "
                                         "model's outputs.*does not require grad"):
        sparsekit.prune(model, 0.5, method=method, data=_SCORE_DATA,
                        loss_fn=lambda out, labels: out.detach().sum())
    assert unchanged(model, before)


def test_synflow_needs_tensor_inputs():
    """A list of inputs was "'list' object has no attribute 'shape'"."""
    with pytest.raises(TypeError, match="criterion 'synflow' .* inputs must be a tensor; got "
                                        "list"):
        sparsekit.prune(mlp(), 0.5, method="synflow", data=[([[1.0] * 8], torch.zeros(1))])


@pytest.mark.parametrize("batch_size, error", [
    (0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
])
@pytest.mark.parametrize("call", ["minibatches", "train_epoch", "accuracy"])
def test_batch_size_is_an_int_of_at_least_one(call, batch_size, error):
    """batch_size=-1 trained nothing (loss 0.0) and gave accuracy 0.0; 0 was a bare
    "range() arg 3 must not be zero", 1.5 a raw TypeError."""
    from torch.utils.data import TensorDataset

    from sparsekit.training import accuracy, minibatches, train_epoch

    model = mlp().eval()
    before = snapshot(model)
    data = TensorDataset(torch.randn(10, 8), torch.randint(0, 4, (10,)))
    calls = {
        "minibatches": lambda: minibatches(data, batch_size),
        "train_epoch": lambda: train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=1),
                                           batch_size=batch_size),
        "accuracy": lambda: accuracy(model, data, batch_size=batch_size),
    }
    with pytest.raises(error, match=rf"^batch_size must be an int ≥ 1, got "
                                    rf"{re.escape(repr(batch_size))}$"):
        calls[call]()
    assert unchanged(model, before)
    assert not model.training


@pytest.mark.parametrize("call", ["minibatches", "train_epoch", "accuracy"])
@pytest.mark.parametrize("given, error, match", [
    ([(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))], TypeError,
     "^data must be a torch.utils.data.TensorDataset of \\(inputs, labels\\), got list$"),
    ("x", TypeError, "^data must be a torch.utils.data.TensorDataset .* got str$"),
    ("three", ValueError, "^data must hold two tensors \\(inputs, labels\\), got 3$"),
])
def test_training_helpers_refuse_data_other_than_a_tensor_dataset(call, given, error, match):
    """A list of batches was a bare AttributeError ('list' object has no attribute
    'tensors') at the first batch, after train_epoch had put the model in training mode."""
    from torch.utils.data import TensorDataset

    from sparsekit.training import accuracy, minibatches, train_epoch

    if given == "three":
        given = TensorDataset(torch.randn(4, 8), torch.zeros(4, dtype=torch.long),
                              torch.zeros(4))
    model = mlp().eval()
    before = snapshot(model)
    calls = {
        "minibatches": lambda: minibatches(given, 2),
        "train_epoch": lambda: train_epoch(model, given, torch.optim.SGD(model.parameters(),
                                                                         lr=1)),
        "accuracy": lambda: accuracy(model, given),
    }
    with pytest.raises(error, match=match):
        calls[call]()
    assert unchanged(model, before)
    assert not model.training


def test_train_epoch_refuses_a_missing_optimizer():
    """optimizer=None was an AttributeError at the first step, after the model had been put
    in training mode (and its first batch's gradients computed)."""
    from torch.utils.data import TensorDataset

    from sparsekit.training import train_epoch

    model = mlp().eval()
    before = snapshot(model)
    data = TensorDataset(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="^optimizer must be a torch.optim.Optimizer, got "
                                        "NoneType$"):
        train_epoch(model, data, None)
    assert unchanged(model, before)
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_accuracy_refuses_an_empty_dataset():
    """It was a ZeroDivisionError."""
    from torch.utils.data import TensorDataset

    from sparsekit.training import accuracy

    empty = TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="^data holds no examples"):
        accuracy(mlp(), empty)


def _trained_delta():
    from sparsekit.finetune import masked_delta

    model = mlp()
    training = masked_delta(model, 0.3, method="magnitude")
    with torch.no_grad():
        for p in training.parameters():
            p.add_(1.0)
    return training.delta()


@pytest.mark.parametrize("float64_first", [False, True])
@pytest.mark.parametrize("alpha", [1e39, 1e300, -1e300])
def test_apply_refuses_an_alpha_that_overflows_before_any_weight_changes(alpha, float64_first):
    """alpha=1e39 was a raw "value cannot be converted to type float without overflow";
    with a float64 first layer, 1e300 changed that layer, then failed on the next."""
    model = mlp()
    if float64_first:
        model[0].double()
    before = snapshot(model)
    first_float32 = "2.weight" if float64_first else "0.weight"
    with pytest.raises(ValueError, match=rf"^alpha=.* is beyond the largest torch.float32 "
                                         rf"number .*'{first_float32}'"):
        _trained_delta().apply(model, alpha=alpha)
    assert unchanged(model, before)


def test_apply_refuses_an_alpha_whose_update_overflows():
    from sparsekit.finetune import Delta

    model = mlp()
    before = snapshot(model)
    delta = Delta({"2.weight": torch.full((4, 16), 4.0)},
                  {"2.weight": torch.ones(4, 16, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"^alpha=3e\+38 times the delta makes 64 entries of "
                                         r"'2.weight' overflow torch.float32"):
        delta.apply(model, alpha=3e38)
    assert unchanged(model, before)


@pytest.mark.parametrize("alpha, error", [
    (float("nan"), ValueError), (float("inf"), ValueError), (10**400, ValueError),
    (torch.tensor(float("nan")), ValueError), (True, TypeError), ("1", TypeError),
    (torch.ones(2), TypeError), (1j, TypeError),
])
def test_apply_names_an_alpha_that_is_no_finite_real_number(alpha, error):
    """NaN was a TypeError."""
    model = mlp()
    before = snapshot(model)
    with pytest.raises(error, match=r"^alpha must be a finite real number"):
        _trained_delta().apply(model, alpha=alpha)
    assert unchanged(model, before)


@pytest.mark.parametrize("alpha", [np.float32(0.5), np.int64(2), torch.tensor(0.5), 0.5])
def test_apply_takes_numpy_and_0d_tensor_alphas(alpha):
    """np.float32(1.0) and torch.tensor(1.0) were refused as no number."""
    delta = _trained_delta()
    model, expected = mlp(), mlp()
    delta.apply(model, alpha=alpha)
    delta.apply(expected, alpha=float(alpha))
    assert unchanged(model, snapshot(expected))


@pytest.mark.parametrize("names, match", [
    ([""], r"values\[''\]: a parameter name is dot-separated"),
    (["a..b"], r"values\['a..b'\]: a parameter name"),
    ([".a"], r"values\['.a'\]"),
    (["forward.weight"], r"values\['forward.weight'\]: .*nor an attribute of nn.Module"),
    (["a", "a.b"], r"values names both 'a' and 'a.b': a parameter cannot also be the module"),
    (["x.a", "x.a.b.c"], r"values names both 'x.a' and 'x.a.b.c'"),
])
def test_a_delta_refuses_names_no_parameter_can_have(names, match):
    """They were taken, and save() failed with a KeyError or an AttributeError."""
    from sparsekit.finetune import Delta

    with pytest.raises(ValueError, match=match):
        Delta({n: torch.zeros(2) for n in names},
              {n: torch.ones(2, dtype=torch.bool) for n in names})


def test_a_delta_with_nested_names_saves(tmp_path):
    from sparsekit.finetune import Delta

    names = ["a.b", "a.c", "ab.weight", "0.weight"]
    delta = Delta({n: torch.ones(2) for n in names}, {n: torch.ones(2, dtype=torch.bool)
                                                       for n in names})
    back = Delta.load(delta.save(tmp_path / "d.safetensors"))
    assert sorted(back.values) == sorted(names)


def test_a_delta_name_must_be_a_str():
    from sparsekit.finetune import Delta

    with pytest.raises(TypeError, match="values must be keyed by parameter names"):
        Delta({1: torch.zeros(2)}, {1: torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize("name", ["*", "0", "*.weight", "0.parametrizations"])
def test_delta_training_names_support_that_is_no_parameter_name(name):
    """A glob was a bare KeyError('*')."""
    from sparsekit.finetune import DeltaTraining

    model = mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^support names '{re.escape(name)}', which is not a "
                                         r"parameter of the model; .* such as '0.weight', "
                                         r"'0.bias', '2.weight'$"):
        DeltaTraining(model, {name: torch.ones(16, 8, dtype=torch.bool)})
    assert unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_masked_delta_on_a_model_training_one_says_so():
    """It blamed targets: "no parameters left to sparsify (check targets and exclude)"."""
    from sparsekit.finetune import masked_delta

    model = mlp()
    masked_delta(model, 0.5, method="magnitude")
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"^model trains a delta on 0.weight, 2.weight already "
                                         r"\(a DeltaTraining not merged\); merge\(\) it"):
        masked_delta(model, 0.5, method="magnitude")
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("group_size", [10**12, 9])
def test_int8_group_size_is_at_most_the_row_width(group_size):
    """10**12 tried to allocate 16 TB of zero padding."""
    from sparsekit.quantize import int8_scales, quantize_int8

    with pytest.raises(ValueError, match=rf"^group_size must be an int in \[1, 8\] .*got "
                                         rf"{group_size}$"):
        int8_scales(torch.randn(4, 8), group_size)
    with pytest.raises(ValueError, match=r"^group_size must be an int in \[1, 8\]"):
        quantize_int8(torch.randn(4, 8), torch.ones(4, 1), group_size)
    assert int8_scales(torch.randn(4, 8), 8).shape == (4, 1)


def test_int8_refuses_float64_weights_float32_cannot_hold():
    """1e-300 quantized to all-zero codes with scale 1 (a nonzero row became zeros: the mask
    changed); 1e300 blamed the scales the caller never passed."""
    from sparsekit.quantize import int8_scales, quantize_int8

    tiny = torch.full((2, 4), 1e-300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^weight: the largest magnitude of row 0 is 1e-300, "
                                         r"below float32's smallest normal number"):
        quantize_int8(tiny)
    with pytest.raises(ValueError, match=r"row 1 group 0 is 1e-300"):
        int8_scales(torch.cat([torch.ones(1, 4, dtype=torch.float64), tiny[:1]]), 4)
    huge = torch.full((2, 4), 1e300, dtype=torch.float64)
    for call in (lambda: quantize_int8(huge), lambda: quantize_int8(huge, torch.ones(2))):
        with pytest.raises(ValueError, match=r"^weight holds a magnitude of 1e\+300, beyond "
                                             r"float32's largest"):
            call()
    mixed = torch.tensor([[1.0, 1e-300, 0.0, -0.5]], dtype=torch.float64)
    codes, _ = quantize_int8(mixed)  # a small entry beside a large one rounds as any would
    assert codes.tolist() == [[127, 0, 0, -64]]


@pytest.mark.parametrize("call, match", [
    (lambda q: q.int8_scales([[1.0]]), r"^weight must be a 2-D floating-point \(16 bits or "
                                      "more\\) or integer tensor, got list$"),
    # float8: torch's raw "isfinite" not implemented
    (lambda q: q.quantize_int8(torch.ones(2, 3).to(torch.float8_e4m3fn)),
     "got torch.float8_e4m3fn$"),
    (lambda q: q.int8_scales(torch.ones(2, 3, dtype=torch.bool)), "got torch.bool$"),
    (lambda q: q.quantize_int8(torch.ones(2, 3, dtype=torch.cfloat)), "got torch.complex64$"),
    (lambda q: q.quantize_int8(torch.ones(2, 3), [1.0, 1.0]), "^scales must be a floating "
                                                              r"tensor of shape \(2,\).*got list$"),
    (lambda q: q.dequantize_int8([[1]], torch.ones(1)), "^codes must be a 2-D"),
    (lambda q: q.fake_quantize(torch.ones(2, 3), None), "^scales must be .*got NoneType$"),
    (lambda q: q.attach_scales(nn.Linear(3, 2), [1.0, 1.0]), "^scales must be .*got list$"),
])
def test_int8_functions_name_arguments_of_the_wrong_type(call, match):
    """Lists were AttributeErrors, a bool weight NotImplementedError("abs_cpu")."""
    from sparsekit import quantize

    with pytest.raises(ArgumentTypeError, match=match):
        call(quantize)


def test_report_refuses_masks_of_names_the_model_lacks():
    """Masks of another model were ignored: a dense report."""
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 2))
    masks = sparsekit.prune(other, 0.5)
    with pytest.raises(ValueError, match=r"^masks name '3.weight', which is not a parameter of "
                                         r"the model; masks of another model\?"):
        sparsekit.report(mlp(), masks=masks)


def test_report_takes_masks_of_biases_and_parametrized_weights():
    from sparsekit.finetune import masked_delta

    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    bias_masks = sparsekit.prune(mlp(), 0.5, targets=["0.bias"])
    sparsekit.report(model, masks=type("M", (), {"masks": bias_masks.masks})())
    masked_delta(model, 0.5, method="magnitude")  # 0.weight is parametrized now
    assert sparsekit.report(model, masks=masks).totals["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dim=2), ValueError, r"^dim must be None or a dimension of the 2-D scores, in "
                              r"\[-2, 1\], got 2$"),
    (dict(dim=-3), ValueError, r"in \[-2, 1\], got -3$"),
    (dict(dim=1.0), TypeError, "^dim must be an int, got 1.0$"),
    (dict(allowed=torch.ones(3, 4)), TypeError, "^allowed must be None or a bool tensor .*got "
                                                "torch.float32$"),
    (dict(allowed=torch.ones(3, 4, dtype=torch.long)), TypeError, "got torch.int64$"),
    (dict(allowed=[[True] * 4] * 3), TypeError, "^allowed must be None or a bool tensor .*got "
                                                "list$"),
    (dict(allowed=torch.ones(4, 3, dtype=torch.bool)), ValueError, "^allowed must have the "
                                                                   "shape of scores"),
    (dict(k=2.0), TypeError, "^k must be an int, got float$"),
])
def test_top_k_names_the_bad_argument(kwargs, error, match):
    """dim=5 was an IndexError, a float allowed a TypeError from ~, a long one a
    RuntimeError from masked_fill."""
    from sparsekit.select import top_k

    with pytest.raises(error, match=match):
        top_k(torch.randn(3, 4), **({"k": 2} | kwargs))


@pytest.mark.parametrize("scores, got", [([1.0, 2.0], "list"), (torch.ones(3, dtype=torch.cfloat),
                                                                "torch.complex64")])
def test_top_k_needs_real_scores(scores, got):
    from sparsekit.select import top_k

    with pytest.raises(ArgumentTypeError, match=f"^scores must be a real tensor, got {got}$"):
        top_k(scores, 1)


def test_top_k_takes_every_dimension_of_its_scores():
    from sparsekit.select import top_k

    scores = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(top_k(scores, 1, dim=-2), top_k(scores, 1, dim=0))
    assert top_k(torch.tensor(3.0), 1)
    with pytest.raises(ValueError, match="^dim must be None or a dimension of the 0-D scores, "
                                         "got 0$"):
        top_k(torch.tensor(3.0), 1, dim=0)


def _wrong_types() -> dict[str, object]:
    """A call of each function that raised a plain ``TypeError`` for an argument of the
    wrong type, with that argument."""
    from sparsekit.models import create_model
    from sparsekit.observe import batches
    from sparsekit.select import top_k_counts

    return {
        "batches(5)": lambda: list(batches(5)),
        "batches of dicts": lambda: list(batches([{"x": 1}])),
        "targets=5": lambda: sparsekit.resolve_targets(mlp(), 5),
        "targets=[5]": lambda: sparsekit.resolve_targets(mlp(), [5]),
        "exclude=[None]": lambda: sparsekit.resolve_targets(mlp(), exclude=[None]),
        "model=None": lambda: sparsekit.resolve_targets(None),
        "k=1.5": lambda: top_k_counts([torch.ones(3)], 1.5),
        "width=2.0": lambda: create_model("resnet_small", width=2.0),
    }


@pytest.mark.parametrize("call", sorted(_wrong_types()))
def test_wrong_types_are_argument_type_errors(call):
    """These were plain TypeErrors, which an ``except ValueError`` does not catch."""
    with pytest.raises(ArgumentTypeError):
        _wrong_types()[call]()


def test_lora_wrong_types_are_argument_type_errors():
    pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora, sparse_lora

    model = mlp()
    before = snapshot(model)
    with pytest.raises(ArgumentTypeError, match="^config must be a peft.LoraConfig, got dict$"):
        sparse_lora(model, {"r": 4})
    with pytest.raises(ArgumentTypeError, match="^model must be a peft model"):
        merge_lora(model)
    assert unchanged(model, before)


def test_model_sizes_take_numpy_ints():
    """np.int64(2) was refused as no int; the config still serialises as JSON."""
    import json

    from sparsekit.models import create_model

    model = create_model("resnet_small", width=np.int64(2))
    assert json.loads(json.dumps(model.sparsekit_config))["kwargs"]["width"] == 2
