"""Hostile inputs to int8 quantization (:mod:`sparsekit.quantize`), ``llm.prune(...,
quantize="int8")`` and SparseGPT, round 14.

Each was a refusal of valid input (subnormal weights blamed on scales the caller never
gave), a bad value accepted now and refused only later (a zero scale loaded with
``load_state_dict``), or a silent wrong result (a non-symmetric Hessian pruned as its lower
triangle); each is now a correct result or a ``ValueError`` naming what is wrong, raised
before anything changes.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

from sparsekit.llm.sparsegpt import sparsegpt_prune
from sparsekit.quantize import (
    MIN_SCALE,
    attach_scales,
    attached_scales,
    dequantize_int8,
    detach_scales,
    fake_quantize,
    guard_loading,
    int8_scales,
    quantize_int8,
)

transformers = pytest.importorskip("transformers")

from sparsekit import llm  # noqa: E402

VOCAB = 64
SUBNORMAL = 2.0 ** -149  # float32's smallest positive number


def llama(layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


def tokens(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def quantized_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if attached_scales(m) is not None]


# -- 1. subnormal weights ---------------------------------------------------------------------


@pytest.mark.parametrize("units", [1, 5, 63, 64, 127, 1000])
@pytest.mark.parametrize("group_size", [None, 2, 3, 4])
def test_rows_of_subnormal_weights_get_a_positive_scale(units, group_size):
    """A row whose largest magnitude was in the first ~63 subnormals got a scale of exactly
    0 (max/127 underflowed) and quantize_int8 refused it: "scales must be positive and
    finite", scales the caller never gave."""
    tiny = torch.tensor([units, -units // 2, 0, units // 3, 1, -1], dtype=torch.float32)
    weight = torch.stack([tiny * SUBNORMAL, torch.zeros(6),
                          torch.tensor([1.0, -0.5, 0.25, 0.0, 2.0, -1.0])])
    scales = int8_scales(weight, group_size)
    assert bool((scales > 0).all()) and bool(scales.isfinite().all())
    assert bool((scales >= MIN_SCALE).all())  # never subnormal: no kernel flushes it to 0
    codes, got = quantize_int8(weight, group_size=group_size)
    assert torch.equal(got, scales)
    assert codes[1].eq(0).all()  # an all-zero row: codes 0
    assert codes[0].abs().le(1).all()  # all subnormal: below the step tiny
    back = dequantize_int8(codes, scales, group_size)
    assert bool(back.isfinite().all())
    err = (back - weight).abs()
    assert float(err[0].max()) <= float(weight[0].abs().max())  # bounded by the row's max
    assert float(err[0].max()) <= MIN_SCALE / 2
    # the normal row is untouched by the floor
    torch.testing.assert_close(back[2], weight[2], rtol=0, atol=float(scales[2].max()) / 2)
    assert torch.equal(fake_quantize(weight, scales, group_size), back)


def test_the_scale_floor_leaves_ordinary_rows_as_they_were():
    """Only rows whose max/127 is below float32's smallest normal number are clamped."""
    weight = torch.tensor([[1.0, -0.5], [1e-30, 2e-31], [127 * MIN_SCALE, 0.0]])
    scales = int8_scales(weight)
    assert scales[0] == torch.tensor(1.0) / 127 and scales[1] == torch.tensor(1e-30) / 127
    assert scales[2] == MIN_SCALE
    codes, _ = quantize_int8(weight)
    assert codes[2].tolist() == [127, 0]
    small = torch.tensor([[100 * MIN_SCALE, -3 * MIN_SCALE, 0.4 * MIN_SCALE]])
    codes, scales = quantize_int8(small)  # below 127 * tiny: the grid of step tiny
    assert scales.item() == MIN_SCALE and codes.tolist() == [[100, -3, 0]]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_llm_prune_quantizes_a_layer_with_subnormal_rows(method, pattern):
    """llm.prune(..., quantize="int8") refused a model with a row of subnormal weights (the
    same zero scale, in prune_layer; for SparseGPT in its joint sweep)."""
    model = llama()
    with torch.no_grad():
        down = model.model.layers[0].mlp.down_proj.weight
        down[0] = torch.randn(48) * 1e-44
        down[1] = 0
        model.model.layers[1].self_attn.q_proj.weight[2] = torch.randn(32) * 1e-40
    # 2:4 keeps 2 of every 4 weights of each row: the subnormal rows keep nonzero weights
    llm.prune(model, tokens(), method=method, pattern=pattern, quantize="int8")
    for layer in quantized_layers(model):
        scales = attached_scales(layer)
        assert bool((scales >= MIN_SCALE).all()) and bool(scales.isfinite().all())
        codes, _ = quantize_int8(layer.weight.detach(), scales)
        assert torch.equal(dequantize_int8(codes, scales), layer.weight.detach())
    with torch.no_grad():
        assert torch.isfinite(model(tokens(2, 8)).logits).all()


def test_sparsegpt_joint_mode_takes_subnormal_rows():
    torch.manual_seed(0)
    W = torch.randn(4, 16)
    W[0] = torch.randn(16) * 1e-44
    X = torch.randn(64, 16)
    H = 2 * X.t() @ X / 64
    dense, _ = sparsegpt_prune(W, H, 0.5, "2:4")  # row 0 keeps 8 subnormal weights
    assert bool((dense[0] != 0).any())
    scales = int8_scales(dense)
    w, keep = sparsegpt_prune(W, H, 0.5, "2:4", scales=scales)
    codes, _ = quantize_int8(w, scales)
    assert torch.equal(dequantize_int8(codes, scales), w)
    assert float(w[0].abs().max()) <= MIN_SCALE and bool(w.isfinite().all())


# -- 2. scales loaded with load_state_dict ------------------------------------------------------


@pytest.mark.parametrize("bad, shown", [
    (0.0, "0"), (-1.0, "-1"), (float("nan"), "nan"), (float("inf"), "inf"),
])
def test_load_state_dict_refuses_bad_scales_before_loading(bad, shown):
    """A zero / negative / NaN / inf weight_scale was loaded silently and refused only when
    the scales were later used (sparsekit.compile), far from its cause."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    attach_scales(model[2], int8_scales(model[2].weight.detach()))
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    state["2.weight_scale"] = torch.tensor([0.5, bad])
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"^scales must be positive and finite .*got "
                                         rf"state_dict\['weight_scale'\]\[1\] = {shown}$"):
        model[2].load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("2.")})
    assert unchanged(model, before)
    with pytest.raises(ValueError, match=r"state_dict\['2.weight_scale'\]\[1\]"):
        model.load_state_dict(state)  # the layer's guard: the layer is left as it was
    assert unchanged(model[2], {k[2:]: v for k, v in before.items() if k.startswith("2.")})
    model.load_state_dict(before)
    guard_loading(model)  # the whole model's: nothing is loaded
    with pytest.raises(ValueError, match=r"state_dict\['2.weight_scale'\]\[1\]"):
        model.load_state_dict(state)
    assert unchanged(model, before)


def test_a_float64_scale_float32_cannot_hold_is_refused_when_loaded():
    layer = nn.Linear(4, 2)
    attach_scales(layer, torch.ones(2))
    before = snapshot(layer)
    state = dict(layer.state_dict(), weight_scale=torch.tensor([1e-300, 1.0],
                                                               dtype=torch.float64))
    with pytest.raises(ValueError, match=r"got state_dict\['weight_scale'\]\[0\] = 0$"):
        layer.load_state_dict(state)
    assert unchanged(layer, before)
    state["weight_scale"] = torch.tensor([True, True])
    with pytest.raises(ValueError, match=r"^state_dict\['weight_scale'\]: int8 scales must "
                                         r"be a real floating tensor, got torch.bool$"):
        layer.load_state_dict(state)


def test_good_scales_still_load_and_the_check_survives_copies():
    layer = nn.Linear(4, 2)
    attach_scales(layer, torch.ones(2))
    attach_scales(layer, torch.full((2,), 2.0))  # attaching again adds no second hook
    assert len(layer._load_state_dict_pre_hooks) == 1
    layer.load_state_dict(dict(layer.state_dict(), weight_scale=torch.tensor([0.5, 3.0])))
    assert attached_scales(layer).tolist() == [0.5, 3.0]
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        with pytest.raises(ValueError, match=r"state_dict\['weight_scale'\]\[1\] = -2"):
            copied.load_state_dict(dict(copied.state_dict(),
                                        weight_scale=torch.tensor([1.0, -2.0])))
        assert attached_scales(copied).tolist() == [0.5, 3.0]
    detach_scales(layer)  # no scales: the check has nothing to check (strict reports it)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        layer.load_state_dict(dict(layer.state_dict(), weight_scale=torch.zeros(2)))
    layer.load_state_dict(dict(layer.state_dict(), weight_scale=torch.zeros(2)),
                          strict=False)
    assert attached_scales(layer) is None


def test_a_model_quantized_by_llm_prune_refuses_bad_scales_before_loading_anything():
    """The check runs before any tensor of the model is copied, not once load_state_dict
    reaches the layer (the blocks before it were loaded already)."""
    model = llama()
    llm.prune(model, tokens(), method="wanda", quantize="int8")
    before = snapshot(model)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in before.items()}
    key = "model.layers.1.mlp.down_proj.weight_scale"
    state[key] = state[key].clone()
    state[key][3] = 0.0
    with pytest.raises(ValueError, match=rf"got state_dict\['{key}'\]\[3\] = 0$"):
        model.load_state_dict(state)
    assert unchanged(model, before)
    state[key][3] = 1.0
    model.load_state_dict(state)
    assert torch.equal(attached_scales(model.model.layers[1].mlp.down_proj), state[key])


# -- 3. SparseGPT's Hessian ---------------------------------------------------------------------


def _hessian(cols: int = 16) -> torch.Tensor:
    X = torch.randn(64, cols, generator=torch.Generator().manual_seed(0))
    return 2 * X.t() @ X / 64


@pytest.mark.parametrize("make", [
    lambda H: torch.tril(H),
    lambda H: H + torch.triu(torch.ones_like(H), 1),
    lambda H: H.t().contiguous() + torch.diag_embed(torch.ones(16)).roll(1, 0) * 0.5,
], ids=["lower triangle", "upper part shifted", "one off-diagonal entry"])
def test_sparsegpt_refuses_a_non_symmetric_hessian(make):
    """Cholesky reads H's lower triangle only: a non-symmetric H was pruned silently as
    that triangle mirrored."""
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    H = make(_hessian())
    w0, h0 = W.clone(), H.clone()
    with pytest.raises(ValueError, match=r"^H is not symmetric: H\[\d+, \d+\] = .* but "
                                         r"H\[\d+, \d+\] = .*accepted: the Hessian 2XᵀX"):
        sparsegpt_prune(W, H, 0.5)
    assert torch.equal(W, w0) and torch.equal(H, h0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sparsegpt_takes_a_hessian_symmetric_up_to_rounding(dtype):
    H = _hessian().to(dtype)
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    H = H + (H.abs().max() * 1e-5 * noise).to(dtype)  # 1e-5 relative: rounding-sized
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    w, keep = sparsegpt_prune(W, H, 0.5)
    assert keep.float().mean() == 0.5 and bool(w.isfinite().all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sparsegpt_refuses_a_non_finite_hessian(bad):
    H = _hessian()
    H[3, 5] = H[5, 3] = bad
    with pytest.raises(ValueError, match=r"^H holds non-finite values"):
        sparsegpt_prune(torch.randn(4, 16), H, 0.5)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_sparsegpt_refuses_bad_joint_scales_before_the_sweep(value):
    scales = torch.ones(4)
    scales[2] = value
    with pytest.raises(ValueError, match=rf"got scales\[2\] = {value:g}$"):
        sparsegpt_prune(torch.randn(4, 16), _hessian(), 0.5, scales=scales)


def test_llm_prune_refuses_non_finite_calibration_activations_before_pruning():
    """No public path takes a Hessian into llm.prune: it is computed from the model's
    activations, and non-finite ones (finite weights whose products overflow) are refused
    before any weight changes."""
    model = llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(3e38)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^calibration: the inputs of 'model.layers.0.mlp"
                                         r".*non-finite.*the model was not changed"):
        llm.prune(model, tokens(), method="sparsegpt", quantize="int8")
    assert unchanged(model, before)


# -- 4. further hostile inputs ------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [(1e-300, "0"), (1e300, "inf")])
def test_quantize_divides_by_the_float32_scales_it_decodes_with(value, shown):
    """float64 scales were divided by as float64 but decoded as float32: 1e-300 gave codes
    of ±127 that decoded to 0, 1e300 codes of 0 that decoded to NaN (0 × inf)."""
    scales = torch.full((2,), value, dtype=torch.float64)
    weight = torch.randn(2, 4)
    for call in (lambda: quantize_int8(weight, scales), lambda: fake_quantize(weight, scales),
                 lambda: dequantize_int8(torch.ones(2, 4, dtype=torch.int8), scales)):
        with pytest.raises(ValueError, match=rf"^scales must be positive and finite .*got "
                                             rf"scales\[0\] = {shown}$"):
            call()
    fine = torch.tensor([0.1, 1 / 3], dtype=torch.float64)  # rounded to float32 first
    codes, _ = quantize_int8(weight, fine)
    assert torch.equal(codes, quantize_int8(weight, fine.float())[0])


@pytest.mark.parametrize("codes, shown", [
    (torch.full((2, 3), 0.37), r"codes\[0, 0\] = 0.37"),
    (torch.tensor([[1, 2, 1000], [0, 0, 0]], dtype=torch.int32), r"codes\[0, 2\] = 1000"),
    (torch.tensor([[1, 2, 3], [0, -129, 0]]), r"codes\[1, 1\] = -129"),
    (torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 128.0]]), r"codes\[1, 2\] = 128"),
])
def test_dequantize_refuses_values_that_are_no_int8_codes(codes, shown):
    """They were decoded silently into weights on no int8 grid."""
    with pytest.raises(ValueError, match=rf"^codes must be integers in \[-128, 127\] \(int8 "
                                         rf"codes\), got {shown}$"):
        dequantize_int8(codes, torch.ones(2))


def test_dequantize_takes_integral_codes_of_any_dtype():
    scales = torch.tensor([0.5, 2.0])
    want = torch.tensor([[-63.5, 0.0, 63.5], [-256.0, 2.0, 254.0]])
    for dtype in (torch.int8, torch.int16, torch.int64, torch.float32, torch.float64):
        codes = torch.tensor([[-127, 0, 127], [-128, 1, 127]]).to(dtype)
        assert torch.equal(dequantize_int8(codes, scales), want)


@pytest.mark.parametrize("call, name", [
    (lambda: int8_scales(torch.ones(2, 4, device="meta")), "weight"),
    (lambda: quantize_int8(torch.ones(2, 4), torch.ones(2, device="meta")), "scales"),
    (lambda: dequantize_int8(torch.ones(2, 4, dtype=torch.int8, device="meta"), torch.ones(2)),
     "codes"),
    (lambda: attach_scales(nn.Linear(4, 2), torch.ones(2, device="meta")), "scales"),
    (lambda: sparsegpt_prune(torch.ones(2, 4, device="meta"), torch.eye(4), 0.5), "W"),
    (lambda: sparsegpt_prune(torch.ones(2, 4), torch.eye(4, device="meta"), 0.5), "H"),
])
def test_meta_tensors_are_refused_by_name(call, name):
    """They failed with "Tensor.item() cannot be called on meta tensors"."""
    with pytest.raises(ValueError, match=rf"^{name} (is|are) on the meta device and holds? no "
                                         r"values"):
        call()


@pytest.mark.parametrize("width", [200, 129, 255])
def test_groups_of_128_that_do_not_divide_the_width(width):
    torch.manual_seed(0)
    weight = torch.randn(3, width)
    weight[1, 128:] *= 1e-3  # a small last group
    weight[2, 128:] = torch.randn(width - 128) * 1e-44  # a subnormal last group
    scales = int8_scales(weight, 128)
    assert scales.shape == (3, 2)
    for g, cols in enumerate((slice(0, 128), slice(128, width))):
        want = (weight[:, cols].abs().amax(1) / 127).clamp(min=MIN_SCALE)
        assert torch.equal(scales[:, g], want)
    codes, _ = quantize_int8(weight, group_size=128)
    back = dequantize_int8(codes, scales, 128)
    assert back.shape == weight.shape
    err = (back - weight).abs()
    assert bool((err[:, :128] <= scales[:, :1] / 2 * (1 + 1e-6)).all())
    assert bool((err[:2, 128:] <= scales[:2, 1:] / 2 * (1 + 1e-6)).all())
    assert float(err[2, 128:].max()) <= float(weight[2, 128:].abs().max())
    assert torch.equal(fake_quantize(weight, scales, 128), back)


def test_sparsegpt_refuses_float64_weights_beyond_float32():
    """W is swept as float32, where 1e300 is infinite: every updated weight was NaN."""
    W = torch.randn(4, 16, dtype=torch.float64)
    W[2, 3] = 1e300
    with pytest.raises(ValueError, match=r"^W holds a magnitude of 1e\+300, beyond float32's "
                                         r"largest 3.4e\+38, which SparseGPT computes in"):
        sparsegpt_prune(W, _hessian(), 0.5)


def test_wanda_scores_refuse_statistics_of_another_layer():
    """A bare broadcasting RuntimeError, and an AttributeError for None."""
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.observe import InputStats
    from sparsekit.scores.wanda import wanda_scores

    stats = InputStats(8)
    stats.add(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"^stats: input statistics of shape \(8,\) do not fit "
                                         r"a weight of shape \(4, 16\) \(16 inputs per output\)"):
        wanda_scores(torch.randn(4, 16), stats)
    with pytest.raises(ArgumentTypeError, match=r"^stats must be the InputStats .*NoneType$"):
        wanda_scores(torch.randn(4, 16), None)
    assert wanda_scores(torch.randn(4, 8), stats).shape == (4, 8)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_layer_checks_quantize_and_statistics(method):
    """quantize="int4" was quantized to int8 without a word; stats=None an AttributeError."""
    from sparsekit.llm.methods import METHODS, prune_layer
    from sparsekit.observe import InputStats
    from sparsekit.patterns import parse_pattern

    W, pattern = torch.randn(4, 16), parse_pattern("unstructured")
    stats = InputStats(16, gram=True)
    stats.add(torch.randn(32, 16))
    with pytest.raises(ValueError, match=r"^quantize must be None or one of \['int8'\], got "
                                         r"'int4'$"):
        prune_layer(METHODS.get(method), W, stats, 0.5, pattern, "int4")
    if METHODS.get(method).stats:
        with pytest.raises(ValueError, match=r"^stats: this method needs the input statistics"):
            prune_layer(METHODS.get(method), W, None, 0.5, pattern, "int8")
    w, keep, scales = prune_layer(METHODS.get(method), W, stats, 0.5, pattern, "int8")
    assert torch.equal(fake_quantize(w, scales), w) and keep.float().mean() == 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_half_precision_models_with_tiny_rows_keep_their_codes(dtype, method):
    model = llama()
    with torch.no_grad():
        down = model.model.layers[0].mlp.down_proj.weight
        down[0] = torch.randn(48) * 1e-6  # float16 subnormals
        down[1] = torch.randn(48) * 1e-38  # bfloat16 subnormals (float16 zeros)
    model = model.to(dtype)
    llm.prune(model, tokens(), method=method, quantize="int8")
    for layer in quantized_layers(model):
        w, scales = layer.weight.detach(), attached_scales(layer)
        assert w.dtype == dtype and bool((scales >= MIN_SCALE).all())
        assert torch.equal(fake_quantize(w.float(), scales).to(dtype), w)
    with torch.no_grad():
        assert torch.isfinite(model(tokens(2, 8)).logits.float()).all()


@pytest.mark.parametrize("calibration, match", [
    (torch.zeros(0, 16, dtype=torch.long), "^calibration: the token tensor is empty"),
    (torch.zeros(4, 0, dtype=torch.long), "^calibration: the token tensor is empty"),
    (torch.zeros(0, dtype=torch.long), "^calibration holds 0 tokens; it needs at least 2"),
    (torch.randn(4, 16, 32), "^calibration tensor must hold token ids"),
    (torch.zeros(4, 16, 32, dtype=torch.long), r"^calibration tensor of token ids must have "
                                               r"shape \(N, L\) or \(L,\), got \(4, 16, 32\)"),
], ids=["no windows", "empty windows", "empty stream", "hidden states", "3-D ids"])
def test_llm_prune_with_quantize_refuses_empty_or_hidden_state_calibration(calibration, match):
    model = llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        llm.prune(model, calibration, method="sparsegpt", quantize="int8")
    assert unchanged(model, before) and not quantized_layers(model)
