"""Hostile inputs to activation sparsity, the int8 helpers and the Hugging Face attention
switch: each case below failed with a raw error from deep inside, computed garbage without
a word, or lost state before it was fixed.
"""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
from _llama import tiny_llama
from _state import snapshot, unchanged
from torch import nn

from sparsekit import activation, quantize
from sparsekit._checks import ArgumentTypeError
from sparsekit.activation import ActivationSparsity

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def data() -> torch.Tensor:
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(1))


class Expert(nn.Module):
    """A layer every call reaches with no rows (an MoE expert no token was routed to)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x[:0]).sum()


def made(**layers: torch.Tensor) -> ActivationSparsity:
    return ActivationSparsity("teal", "uniform", 0.5, dict.fromkeys(layers, 0.5), layers,
                              dict.fromkeys(layers, 128))


# -- calibrate -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="mlp"), "^model must be an nn.Module, got str$"),
    (dict(sparsity="0.5"), r"^sparsity must be a number in \[0, 1\), got '0.5'$"),
    (dict(sparsity=True), r"^sparsity must be a number in \[0, 1\), got True$"),
    (dict(method=["teal"]), r"^method must be one of \['teal', 'wina', 'cats'\], got \['teal'\]$"),
    (dict(allocation={}), r"^allocation must be one of \['uniform', 'greedy'\], got \{\}$"),
])
def test_calibrate_arguments_of_the_wrong_type_are_argument_type_errors(kwargs, match):
    """A list method was "unhashable type: 'list'"; a str sparsity a plain ValueError and a
    str model a plain TypeError (neither caught as the other)."""
    args = dict(model=mlp(), calibration=data()) | kwargs
    with pytest.raises(ArgumentTypeError, match=match):
        activation.calibrate(args.pop("model"), args.pop("calibration"), **args)


def test_greedy_refuses_a_sparsity_it_cannot_reach_before_recording(monkeypatch):
    """sparsity=0.97 with allocation='greedy' failed only after recording every layer's
    inputs, replaying each block and running the whole search (its levels stop at 0.95)."""
    module = importlib.import_module("sparsekit.activation.calibrate")
    monkeypatch.setattr(module, "record_inputs", lambda *a, **k: pytest.fail("recorded"))
    with pytest.raises(ValueError, match=r"^sparsity must be at most 0.95 for "
                                         r"allocation='greedy'.*got 0.97$"):
        activation.calibrate(mlp(), data(), sparsity=0.97, allocation="greedy")
    monkeypatch.undo()
    act = activation.calibrate(mlp(), data(), sparsity=0.95, allocation="greedy")
    assert act.model_sparsity() == pytest.approx(0.95, abs=1e-3)  # as zeroed on the data


def test_calibrate_refuses_a_model_whose_thresholds_are_applied():
    """Calibrating again without remove() (a sweep over sparsities) recorded the inputs the
    applied thresholds had already zeroed: layer '2' got a threshold of 0 while its
    sparsities entry said 0.5."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    applied = activation.calibrate(model, data(), sparsity=0.5).apply(model)
    with pytest.raises(ValueError, match=r"^model: layers \['0', '2'\] have activation "
                                         r"thresholds applied"):
        activation.calibrate(model, data(), sparsity=0.5)
    assert len(model[0]._forward_pre_hooks) == len(model[2]._forward_pre_hooks) == 1
    applied.remove()
    again = activation.calibrate(model, data(), sparsity=0.5)
    assert all(torch.equal(t, again.thresholds[n]) for n, t in applied.thresholds.items())


def test_calibrate_takes_any_real_sparsity():
    """A numpy float32 was refused as "not a number in [0, 1)"."""
    import numpy as np

    act = activation.calibrate(mlp(), data(), sparsity=np.float32(0.5))
    assert act.target == 0.5


def test_calibrate_names_layers_that_saw_no_rows():
    """A layer called only on empty batches (an MoE expert no calibration token reached) was
    an IndexError from the quantile of no scores."""
    model = Expert()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^targets: layers \['b'\] saw no input rows"):
        activation.calibrate(model, data())
    assert unchanged(model, before)
    assert set(activation.calibrate(model, data(), targets=["a"]).thresholds) == {"a"}


class Keywords(nn.Module):
    """Layers called with their input as a keyword (``layer(input=x)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(input=torch.relu(self.a(input=x)))


def test_layers_called_with_keywords_are_thresholded():
    """calibrate() recorded their inputs, but the installed hooks read args[0]: apply() made
    the next forward an IndexError ("tuple index out of range"), as did greedy allocation."""
    model, positional, x = Keywords(), mlp(), data()
    positional.load_state_dict({k.replace("a.", "0.").replace("b.", "2."): v
                                for k, v in model.state_dict().items()})
    act = activation.calibrate(model, x, sparsity=0.5)
    same = activation.calibrate(positional, x, sparsity=0.5)
    assert all(torch.equal(t, same.thresholds[n]) for n, t in
               zip(["0", "2"], act.thresholds.values(), strict=True))
    with torch.no_grad():
        act.apply(model)
        same.apply(positional)
        assert torch.equal(model(x), positional(x))
        assert act.stats() == {"a": same.stats()["0"], "b": same.stats()["2"]}
        act.remove()
        same.remove()
    greedy = activation.calibrate(model, x, sparsity=0.5, allocation="greedy")
    assert greedy.model_sparsity() == pytest.approx(0.5, abs=1e-3)  # as zeroed on the data


@pytest.mark.parametrize("x, weight, error, match", [
    ([[1.0]], torch.ones(3, 4), ArgumentTypeError,
     "^x must be a floating-point tensor .*got list$"),
    (torch.ones(2, 4), "w", ArgumentTypeError, "^weight must be a 2-D .*got str$"),
    (torch.ones(2, 5), torch.ones(3, 4), ValueError,
     r"^x has 5 features in its last dimension, but weight \(3, 4\) takes 4 inputs$"),
    (torch.ones(2, 4), torch.ones(4), ValueError, r"^weight must be a 2-D .*got shape \(4,\)$"),
    (torch.ones(2, 4, dtype=torch.long), torch.ones(3, 4), ValueError,
     "^x must be a floating-point tensor .*got torch.int64$"),
])
def test_score_checks_its_inputs(x, weight, error, match):
    """Inputs of the wrong width were a raw RuntimeError, a list an AttributeError; a 1-D
    weight gave wina scores silently, and integer inputs had their column norms truncated
    to integers ([3, 0, 0, 0] for norms [3.4, 0.9, ...])."""
    with pytest.raises(error, match=match):
        activation.score("wina", x, weight)


# -- ActivationSparsity ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(thresholds=[torch.zeros(8)]), ArgumentTypeError,
     "^thresholds must be a mapping of layer name to tensor, got list$"),
    (dict(sizes=None), ArgumentTypeError, "^sizes must be a mapping of layer name to int, got "
                                          "NoneType$"),
    (dict(sparsities={"0": float("nan")}), ValueError,
     r"^sparsities\['0'\] must be in \[0, 1\], got nan$"),
    (dict(sparsities={"0": 2.0}), ValueError, r"^sparsities\['0'\] must be in \[0, 1\], got 2.0"),
    (dict(sizes={"0": -1}), ValueError, r"^sizes\['0'\] must be an int ≥ 0, got -1$"),
    (dict(sizes={"0": 2.5}), ArgumentTypeError, r"^sizes\['0'\] must be an int ≥ 0, got 2.5$"),
    (dict(thresholds={"0": torch.zeros(8), "2": torch.zeros(16)}), ValueError,
     r"^thresholds names layers \['2'\] that sizes has no weight count for$"),
])
def test_activation_sparsity_checks_what_it_is_built_from(kwargs, error, match):
    """A list of thresholds was an AttributeError; a NaN or negative sparsity or size made
    model_sparsity() NaN or negative; thresholds without a size made model_sparsity(stats())
    blame the caller's per_layer."""
    args = dict(method="teal", allocation="uniform", target=0.5, sparsities={"0": 0.5},
                thresholds={"0": torch.zeros(8)}, sizes={"0": 128}) | kwargs
    with pytest.raises(error, match=match):
        ActivationSparsity(**args)


@pytest.mark.parametrize("per_layer, error, match", [
    ([0.5], ArgumentTypeError, "^per_layer must be a mapping of layer name to float, got list$"),
    ({"0": float("nan")}, ValueError, r"^per_layer\['0'\] must be in \[0, 1\], got nan$"),
    ({"0": "a"}, ArgumentTypeError, r"^per_layer\['0'\] must be a float in \[0, 1\], got 'a'$"),
])
def test_model_sparsity_checks_per_layer(per_layer, error, match):
    """NaN came back as the model's sparsity; a str was "unsupported operand type(s)"."""
    with pytest.raises(error, match=match):
        made(**{"0": torch.zeros(8)}).model_sparsity(per_layer)


def test_apply_of_a_non_module_is_an_argument_type_error():
    with pytest.raises(ArgumentTypeError, match="^model must be an nn.Module, got str$"):
        made(**{"0": torch.zeros(8)}).apply("abc")


def test_applied_thresholds_save_and_copy_without_their_hooks():
    """torch.save of applied thresholds failed ("Can't pickle local object"); a deepcopy
    shared the original's hook handles, so the copy's remove() took the original's hooks
    away and the copy refused apply() as "already applied"."""
    model = mlp()
    act = activation.calibrate(model, data(), sparsity=0.5).apply(model)
    x = data()[:4]
    with torch.no_grad():
        model(x)
    sparse = model(x).detach()
    buffer = io.BytesIO()
    torch.save(act, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.thresholds.keys() == act.thresholds.keys()
    assert all(torch.equal(loaded.thresholds[n], t) for n, t in act.thresholds.items())
    assert loaded.stats() == act.stats() and loaded.sparsities == act.sparsities
    twin = copy.deepcopy(act)
    twin.remove()  # removes nothing: the hooks are the original's
    assert torch.equal(model(x).detach(), sparse)
    act.remove()
    dense = model(x).detach()
    assert not torch.equal(dense, sparse)
    twin.apply(model)
    assert torch.equal(model(x).detach(), sparse)
    twin.remove()
    assert torch.equal(model(x).detach(), dense)


# -- profile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, match", [
    (lambda m: activation.profile("model", data()), ArgumentTypeError,
     "^model must be an nn.Module, got str$"),
    (lambda m: activation.profile(m, data(), sparsity={"0": torch.zeros(8)}), ArgumentTypeError,
     "^sparsity must be calibrated input thresholds .* or None, got dict$"),
    (lambda m: activation.profile(m, data(), plot=5), ArgumentTypeError,
     "^plot must be a path .* or None, got 5$"),
    (lambda m: activation.profile(m, data(), plot="/nonexistent-dir/act.png"), ValueError,
     "^plot: directory '/nonexistent-dir' does not exist"),
    (lambda m: activation.profile(m, data(), sparsity=made(**{"9": torch.zeros(8)})), ValueError,
     r"^sparsity.thresholds: model has no modules named \['9'\]"),
    (lambda m: activation.profile(m, data(), sparsity=made(**{"2": torch.zeros(8)})), ValueError,
     r"^sparsity.thresholds\['2'\] has 8 thresholds, but layer '2' of model takes 16"),
])
def test_profile_checks_its_arguments_before_running(call, error, match):
    """Each was a KeyError, an AttributeError (the plot one after the whole run) or, for
    thresholds of the wrong width, "data: the model cannot run on its inputs"."""
    model = mlp()
    with pytest.raises(error, match=match):
        call(model)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_profile_refuses_non_finite_layer_inputs(value, tmp_path):
    """NaN inputs were counted as live features (no zeros, nothing dead): a dense-looking
    profile of garbage, and a plot of it, where calibrate() refuses the same data."""
    x = data()
    x[3, 2] = value
    with pytest.raises(ValueError, match=r"^data: the inputs of layers \['0', '2'\] hold NaN "
                                         "or infinite values"):
        activation.profile(mlp(), x, plot=tmp_path / "act.png")
    assert not (tmp_path / "act.png").exists()


def test_profile_of_a_layer_that_saw_no_rows():
    """An empty call of a layer was "data: the model cannot run on its inputs: random_
    expects 'from' to be less than 'to'"."""
    result = activation.profile(Expert(), data())
    assert result["b"].dead == 8 and result["b"].zeros == 0.0
    assert result["a"].dead == 0


def test_profile_with_thresholds_on_a_module_without_in_features():
    """Thresholds that apply() accepts on any module (here a ReLU) were an AttributeError
    ('ReLU' object has no attribute 'in_features')."""
    model = mlp()
    result = activation.profile(model, data(), sparsity=made(**{"1": torch.full((16,), 0.1)}))
    assert result["1"].features == 16 and result["1"].below_threshold >= result["1"].zeros


# -- int8 quantization -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_attach_scales_refuses_float64_scales_float32_cannot_hold(scale):
    """They passed the check as float64 and were stored as float32 zeros or infinities."""
    from sparsekit.quantize import attach_scales, attached_scales

    layer = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="scales must be positive and finite"):
        attach_scales(layer, torch.full((2,), scale, dtype=torch.float64))
    assert attached_scales(layer) is None


def test_attach_scales_over_another_weight_scale_is_a_clear_error():
    """A module that already has a weight_scale that is no buffer (a compressed-tensors
    parameter) was a raw KeyError "attribute 'weight_scale' already exists"."""
    from sparsekit.quantize import attach_scales

    layer = nn.Linear(4, 2)
    layer.weight_scale = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="^module already has a weight_scale that is not"):
        attach_scales(layer, torch.ones(2))
    assert isinstance(layer.weight_scale, nn.Parameter)
    other = nn.Linear(4, 2)
    attach_scales(other, torch.ones(2))
    attach_scales(other, torch.full((2,), 2.0))  # replacing attached scales is fine
    assert other.weight_scale.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("name", ["attach_scales", "attached_scales", "detach_scales"])
def test_scale_functions_need_a_module(name):
    """A str was an AttributeError ('str' object has no attribute '_buffers') or a plain
    ValueError."""
    args = ("layer", torch.ones(2)) if name == "attach_scales" else ("layer",)
    with pytest.raises(ArgumentTypeError, match="^module must be an nn.Module, got str$"):
        getattr(quantize, name)(*args)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("group_size", [None, 1])
def test_int8_of_an_empty_weight(shape, group_size):
    """(3, 0) was an IndexError from amax, (0, 4) with groups "cannot reshape tensor of 0
    elements"."""
    from sparsekit.quantize import dequantize_int8, int8_scales, quantize_int8

    weight = torch.zeros(shape)
    scales = int8_scales(weight, group_size)
    codes, same = quantize_int8(weight, group_size=group_size)
    assert torch.equal(scales, same) and codes.shape == shape and codes.dtype == torch.int8
    assert bool((scales == 1).all())
    assert dequantize_int8(codes, scales, group_size).shape == shape


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_int8_of_integer_weights_holding_their_type_minimum(dtype):
    """abs() of an integer type's minimum (int8's -128) overflows to itself, so the row's
    largest magnitude was taken from the rest: [-128, 1] got the scale of 1 and came back
    as [-1, 1]."""
    from sparsekit.quantize import dequantize_int8, int8_scales, quantize_int8

    low = torch.iinfo(dtype).min
    weight = torch.tensor([[low, 1], [0, 0]], dtype=dtype)
    codes, scales = quantize_int8(weight)
    assert codes[0, 0] == -127 and codes[0, 1] == round(127 / -low) and not codes[1].any()
    assert torch.equal(scales, int8_scales(weight))
    assert scales[0].item() == pytest.approx(-low / 127, rel=1e-6)
    assert dequantize_int8(codes, scales)[0, 0].item() == pytest.approx(low, rel=1e-6)


# -- the Hugging Face attention switch -------------------------------------------------------


def _llama(implementation: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attn_implementation=implementation)
    return transformers.LlamaForCausalLM(config).eval()


def test_remove_restores_the_attention_the_model_had():
    """remove() switched every model to SDPA: one loaded with eager attention (for
    output_attentions) lost it."""
    from sparsekit.attention import apply, hf, remove

    model = _llama("eager")
    x = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x, output_attentions=True).attentions
        apply(model, "dense", block_size=16)
        apply(model, "sink_window", block_size=16)  # twice: still back to eager
        assert model.config._attn_implementation == "sparsekit"
        remove(model)
        after = model(x, output_attentions=True).attentions
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, hf.ATTRIBUTE) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    remove(model)  # never applied since: stays eager
    assert model.config._attn_implementation == "eager"


def test_attention_switch_of_a_non_model_is_an_argument_type_error():
    pytest.importorskip("transformers")
    from sparsekit.attention import apply, remove

    for call in (apply, remove):
        with pytest.raises(ArgumentTypeError, match="^model must be a transformers "
                                                     "PreTrainedModel, got Linear$"):
            call(nn.Linear(2, 2))


def test_dequantize_int8_is_float32_whatever_the_scales_dtype() -> None:
    """The docstring's float32: float64 scales (as a user computes them) are rounded to
    the float32 the kernels hold instead of promoting the decoded weight to float64."""
    codes = torch.tensor([[1, -127], [3, 0]], dtype=torch.int8)
    scales = torch.tensor([0.1, 1 / 3], dtype=torch.float64)
    weight = quantize.dequantize_int8(codes, scales)
    assert weight.dtype == torch.float32
    assert torch.equal(weight, quantize.dequantize_int8(codes, scales.to(torch.float32)))


def test_calibrate_names_a_token_id_outside_the_vocabulary():
    """An out-of-vocabulary id was the embedding's raw "index out of range in self" (named
    only as "the model cannot run on its inputs"); it is named with the accepted range, as
    llm.prune names it, before anything runs."""
    model = tiny_llama()
    before = snapshot(model)
    ids = torch.randint(0, 64, (2, 16))
    ids[1, 3] = 163
    with pytest.raises(ValueError, match=r"calibration holds token id 163, outside the model's "
                                         r"vocabulary; accepted: ids in \[0, 64\)"):
        activation.calibrate(model, ids, sparsity=0.5)
    assert unchanged(model, before)
