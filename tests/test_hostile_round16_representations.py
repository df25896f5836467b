"""Hostile inputs, round 16: the representation modules (sparsekit.sae, sparsekit.moe).

- an SAE config whose widths disagree with its weights is refused before the SAE is
  built at the config's widths (an edited ``d_sae`` allocated gigabytes first), and its
  bool fields must be JSON bools (``"false"`` was read as true);
- ``save`` refuses an SAE that ``load`` would refuse (NaN weights were written over a
  good directory) or that holds no values (meta), writing nothing;
- meta tensors, complex or bool codes and targets, and narrow integer indices are named
  or handled, not a bare error deep inside PyTorch or a silently dropped imaginary part;
- BatchTopK's inference threshold is never moved to NaN by a training forward;
- ``RoutedFFN``'s constructor checks its layout (an ``order`` of repeated or missing
  neurons built another FFN silently), its ``hidden``/``mass``/``chosen`` check ``x``, and
  a load with a meta tensor copies nothing;
- ``router.fit`` checks ``x``, ``labels`` (NaN labels trained a NaN router) and ``lr``;
- routers refuse complex, bool and meta inputs; every model-taking entry point names a
  model on the meta device.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from _moe import routed_ffn
from _state import snapshot, unchanged
from safetensors.torch import load_file, save_file
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.moe import (
    LowRankRouter,
    Router,
    balanced_kmeans,
    contextual,
    evaluate,
    head_predictors,
    moefy,
    relufy,
    route_heads,
    unit_mass,
)
from sparsekit.moe.router import fit
from sparsekit.sae import SAE, load, loss_recovered, metrics, objective, resample, save, train

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")
META = "is on the meta device and holds no values"


# -- SAE files ------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    sae = SAE(8, 16, "l1", normalize_decoder=False, init_norm=0.3)
    return save(sae, tmp_path / "sae")


def _edit_cfg(path: Path, **fields) -> Path:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg.update(fields)
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_load_compares_the_config_widths_before_building_the_sae(saved, monkeypatch):
    """d_sae=2**23 beside a 16-latent file built a 2 x 2 GB SAE before the shape check."""
    _edit_cfg(saved, d_in=64, d_sae=2**23)
    built = []
    monkeypatch.setattr(SAE, "__init__", lambda *a, **k: built.append(a))
    with pytest.raises(ValueError, match=r"W_enc has shape \(8, 16\), but cfg.json describes "
                                         r"\(64, 8388608\) \(d_in, d_sae\)"):
        load(saved)
    assert not built


@pytest.mark.parametrize("key", ["apply_b_dec_to_input", "rescale_acts_by_decoder_norm"])
def test_load_refuses_a_bool_field_that_is_a_string(saved, key):
    """"false" is truthy: rescale folded the decoder norms, apply_b_dec loaded as true."""
    _edit_cfg(saved, **{key: "false"})
    with pytest.raises(ValueError, match=f"{key} must be a JSON bool .* got 'false'"):
        load(saved)


def test_a_legitimate_sae_lens_rescale_still_loads(saved):
    sae = load(_edit_cfg(saved, rescale_acts_by_decoder_norm=True))
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16))


def test_a_rescaled_file_with_a_zero_decoder_row_loads_finite(tmp_path):
    """Folding the decoder norms divided a zero row by 0: a NaN row in W_dec."""
    path = save(SAE(8, 16, k=2), tmp_path / "sae")
    weights = load_file(path / "sae_weights.safetensors")
    weights["W_dec"][3] = 0.0
    save_file(weights, path / "sae_weights.safetensors")
    sae = load(_edit_cfg(path, rescale_acts_by_decoder_norm=True))
    assert bool(torch.isfinite(sae.W_dec).all())
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    norms = weights["W_dec"].norm(dim=-1)  # SAELens: the codes scaled by the decoder norms
    pre = ((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]) * norms
    values, indices = pre.topk(2, dim=-1)
    codes = torch.zeros(32, 16).scatter(-1, indices, values.relu()) / norms.clamp_min(1e-30)
    expected = codes.nan_to_num() @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(sae(x).detach(), expected, rtol=1e-4, atol=1e-5)


def test_save_of_a_nan_sae_keeps_the_good_files(saved):
    """A diverged SAE was written over a good save, as files load refuses."""
    files = {p.name: p.read_bytes() for p in saved.iterdir()}
    sae = load(saved)
    with torch.no_grad():
        sae.W_dec[0, 0] = NAN
    with pytest.raises(ValueError, match=r"sae: W_dec must be finite.*nothing was "
                                         r"written"):
        save(sae, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == files
    load(saved)


def test_save_of_a_batchtopk_sae_with_a_nan_threshold_writes_nothing(tmp_path):
    sae = SAE(8, 16, "batchtopk", k=2)
    sae.threshold.fill_(NAN)
    with pytest.raises(ValueError, match=r"sae: threshold must be finite or \+inf, got 16 "
                                         r"NaN.*nothing was written"):
        save(sae, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_save_of_a_meta_sae_is_named(tmp_path):
    """Was NotImplementedError "Cannot copy out of meta tensor"."""
    with pytest.raises(ValueError, match=f"sae.W_dec {META}"):
        save(SAE(8, 16, "l1", device="meta"), tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_reload_is_still_bit_identical(saved, tmp_path):
    sae = load(saved)
    again = load(save(sae, tmp_path / "again"))
    assert unchanged(again, snapshot(sae))
    shutil.rmtree(tmp_path / "again")


def test_an_sae_of_numpy_ints_saves_and_reloads(tmp_path):
    """check_int takes a numpy int; json.dumps did not, and save blamed the metadata
    ("metadata must hold only JSON values"); a numpy seed was "an integer is required"."""
    np = pytest.importorskip("numpy")
    sae = SAE(np.int64(8), np.int64(16), k=np.int64(2), matryoshka=[np.int64(4), 16],
              seed=np.int64(3))
    assert sae.matryoshka == (4, 16) and type(sae.k) is int
    back = load(save(sae, tmp_path / "sae"))
    assert unchanged(back, snapshot(sae)) and back.k == 2


@pytest.mark.parametrize(("init_norm", "dtype"), [
    (1e300, torch.float32), (1e-300, torch.float32), (1e6, torch.float16)])
def test_an_init_norm_the_dtype_cannot_hold_is_refused(init_norm, dtype):
    """Built W_dec rows of inf (every code NaN) or of zeros (latents that never fire)."""
    with pytest.raises(ValueError, match="init_norm must give finite, non-zero rows"):
        SAE(8, 16, k=2, init_norm=init_norm, dtype=dtype)


# -- SAE inputs -----------------------------------------------------------------------------


def _meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(("call", "param"), [
    (lambda s: s.encode(_meta(2, 8)), "x"),
    (lambda s: s(_meta(2, 8)), "x"),
    (lambda s: s.decode(_meta(2, 16)), "z"),
    (lambda s: s.decode_sparse(torch.ones(2, 3), _meta(2, 3, dtype=torch.long)), "indices"),
    (lambda s: objective(s, _meta(4, 8)), "x"),
    (lambda s: objective(s, torch.randn(4, 8), _meta(4, 8)), "target"),
    (lambda s: objective(s, torch.randn(4, 8), dead=_meta(16, dtype=torch.bool)), "dead"),
    (lambda s: train(s, _meta(4, 8)), "activations batch 0"),
    (lambda s: metrics(s, _meta(4, 8)), "activations batch 0"),
    (lambda s: resample(s, _meta(4, 8), torch.ones(16, dtype=torch.bool)), "x"),
    (lambda s: resample(s, torch.randn(4, 8), _meta(16, dtype=torch.bool)), "dead"),
])
def test_sae_names_a_meta_tensor(call, param):
    """Each was a bare RuntimeError ("Tensor.item() cannot be called on meta tensors")."""
    sae = SAE(8, 16, k=2)
    before = snapshot(sae)
    with pytest.raises(ValueError, match=f"{param} {META}"):
        call(sae)
    assert unchanged(sae, before) and sae.training


@pytest.mark.parametrize("call", [
    lambda s: train(s, torch.randn(4, 8)),
    lambda s: metrics(s, torch.randn(4, 8)),
    lambda s: objective(s, torch.randn(4, 8)),
    lambda s: resample(s, torch.randn(4, 8), torch.ones(16, dtype=torch.bool)),
    lambda s: loss_recovered(nn.Sequential(nn.Linear(8, 8)), "0", s, torch.randn(4, 8)),
])
def test_an_sae_on_the_meta_device_is_named(call):
    """Each was a bare RuntimeError from the first product ("Tensor on device meta is not
    on the expected device cpu!"), raised from inside a forward hook for loss_recovered."""
    with pytest.raises(ValueError, match=f"sae.W_dec {META}"):
        call(SAE(8, 16, k=2, device="meta"))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
def test_decode_refuses_complex_and_bool_codes(dtype):
    """A complex z or values silently lost its imaginary part."""
    sae = SAE(8, 16, k=2)
    with pytest.raises(ArgumentTypeError, match=f"z must be a real .* got {dtype}"):
        sae.decode(torch.ones(2, 16, dtype=dtype))
    with pytest.raises(ArgumentTypeError, match=f"values must be a real .* got {dtype}"):
        sae.decode_sparse(torch.ones(2, 3, dtype=dtype), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
def test_objective_refuses_a_complex_or_bool_target(dtype):
    """A complex target made every loss term complex, a bool one a bare RuntimeError."""
    sae = SAE(8, 16, k=2)
    with pytest.raises(ArgumentTypeError, match=f"target must be a real .* got {dtype}"):
        objective(sae, torch.randn(4, 8), torch.ones(4, 8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_decode_sparse_takes_narrow_integer_indices(dtype):
    """With autograd on, embedding_bag raised "Expected ... Long, Int" for these."""
    sae = SAE(8, 16, k=2)
    values, indices = torch.randn(3, 2), torch.tensor([[0, 5], [15, 1], [2, 2]])
    expected = sae.decode_sparse(values, indices)
    assert torch.equal(sae.decode_sparse(values, indices.to(dtype)), expected)


def test_a_batchtopk_training_forward_never_makes_the_threshold_nan():
    """A NaN row moved the inference threshold to NaN for good (every later eval code 0)."""
    sae = SAE(8, 16, "batchtopk", k=2).train()
    sae(torch.randn(4, 8))
    before, updates = snapshot(sae), int(sae.threshold_updates)
    with pytest.raises(ValueError, match="x must be finite"):
        sae(torch.full((2, 8), NAN))
    assert unchanged(sae, before) and int(sae.threshold_updates) == updates
    assert bool(torch.isfinite(sae.threshold))


# -- MoE ------------------------------------------------------------------------------------


_layer = functools.partial(routed_ffn, 8, 4, 2, 2)  # 4 units of 2 neurons


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"order": torch.zeros(8, dtype=torch.long)}, ValueError, "order must be a permutation"),
    ({"order": torch.arange(4)}, ValueError, r"order must be a permutation .* got \(4,\)"),
    ({"unit_size": 0}, ValueError, "unit_size must be an int ≥ 1, got 0"),
    ({"hot": -2}, ValueError, "hot must be an int ≥ 0, got -2"),
    ({"hot": 1.5}, ArgumentTypeError, "hot must be an int"),
    ({"w_out": torch.randn(4, 5)}, ValueError, r"w_out must be \(out_features, 8\)"),
    ({"b_in": torch.zeros(3)}, ValueError, r"b_in must be None or \(8, 1\)"),
    ({"b_out": torch.zeros(3)}, ValueError, r"b_out must be None or \(4,\)"),
    ({"w_in": [[0.0]]}, ArgumentTypeError, "w_in must be a tensor, got list"),
    ({"w_in": torch.randn(8, 4)}, ValueError, r"w_in must be \(neurons, writers, features\)"),
])
def test_routed_ffn_checks_its_layout(overrides, error, match):
    """A short or repeated order built a layer computing another FFN (neurons=4, or one
    neuron eight times); unit_size=0 was a ZeroDivisionError, a reader of another width
    an IndexError."""
    with pytest.raises(error, match=match):
        _layer(**overrides)


@pytest.mark.parametrize("method", ["hidden", "mass", "chosen"])
def test_routed_ffn_methods_name_a_bad_x(method):
    """Were "mat1 and mat2 shapes cannot be multiplied" from F.linear."""
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        getattr(layer, method)(torch.randn(2, 5))


def test_routed_ffn_load_with_a_meta_tensor_copies_nothing():
    """torch copied order and the router, then failed on the meta w_in."""
    layer = _layer()
    before = snapshot(layer)
    state = copy.deepcopy(layer.state_dict())
    state["order"] = state["order"].flip(0)
    state["router.project.weight"].zero_()
    state["w_in"] = torch.zeros(8, 1, 4, device="meta")
    with pytest.raises(ValueError, match=f"w_in {META}"):
        layer.load_state_dict(state)
    assert unchanged(layer, before)


def test_routed_ffn_load_errors_of_a_non_mapping():
    assert _layer().load_errors([1]) == ["the state must be a mapping of names to tensors, "
                                        "got list"]


@pytest.mark.parametrize(("x", "error", "match"), [
    (torch.ones(2, 4, dtype=torch.complex64), ArgumentTypeError, "x must be a real"),
    (torch.ones(2, 4, dtype=torch.bool), ArgumentTypeError, "x must be a real"),
    (torch.zeros(2, 4, device="meta"), ValueError, f"x {META}"),
])
def test_router_refuses_complex_bool_and_meta_inputs(x, error, match):
    """A complex x scored its real part after a warning; a meta one failed in the matmul."""
    with pytest.raises(error, match=match):
        Router(4, 3, 2)(x)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"labels": torch.full((8, 3), NAN)}, ValueError, "labels must be finite and in"),
    ({"labels": torch.rand(8, 3) + 1}, ValueError, r"labels must be finite and in \[0, 1\]"),
    ({"labels": -torch.rand(8, 3), "loss": "listwise"}, ValueError, "labels must be finite "
                                                                      "and ≥ 0"),
    ({"labels": torch.rand(8, 5)}, ValueError, r"labels \(T, 3\)"),
    ({"labels": torch.rand(5, 3)}, ValueError, r"labels \(T, 3\)"),
    ({"x": torch.randn(0, 4), "labels": torch.rand(0, 3)}, ValueError, "T ≥ 1"),
    ({"x": [[0.0] * 4]}, ArgumentTypeError, "x must be a tensor, got list"),
    ({"labels": [[0.0] * 3]}, ArgumentTypeError, "labels must be a tensor, got list"),
    ({"lr": NAN}, ValueError, "lr must be a positive finite float"),
    ({"balance": "no"}, ArgumentTypeError, "balance must be a bool"),
])
def test_fit_checks_its_data_before_training(kwargs, error, match):
    """NaN labels trained every weight NaN silently; the others were IndexError,
    AttributeError or RuntimeError from inside the loop."""
    router = Router(4, 3, 2)
    before = snapshot(router)
    args = {"x": torch.randn(8, 4), "labels": torch.rand(8, 3)} | kwargs
    with pytest.raises(error, match=match):
        fit(router, args.pop("x"), args.pop("labels"), steps=1, **args)
    assert unchanged(router, before) and router.training


def _low_rank(**overrides):
    args = {"w_in": torch.randn(8, 1, 4), "b_in": None, "norms": torch.ones(8),
            "act": torch.relu, "x": torch.randn(16, 4)} | overrides
    return LowRankRouter(*(args.pop(n) for n in ("w_in", "b_in", "norms", "act", "x")),
                         rank=2, unit_size=2)


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"x": torch.zeros(16, 4, device="meta")}, ValueError, f"x {META}"),
    ({"w_in": torch.randn(8, 1, 4, dtype=torch.complex64)}, ArgumentTypeError,
     "w_in must be a real"),
    ({"x": torch.ones(16, 4, dtype=torch.bool)}, ArgumentTypeError, "x must be a real"),
    ({"norms": torch.full((8,), NAN)}, ValueError, "norms must be finite, got 8 NaN"),
    ({"b_in": torch.full((8, 1), NAN)}, ValueError, "b_in must be finite, got 8 NaN"),
])
def test_low_rank_router_checks_every_tensor(overrides, error, match):
    """NaN norms or biases made every score NaN (a silently random choice), a complex w_in
    lost its imaginary part, a meta x failed at .item()."""
    with pytest.raises(error, match=match):
        _low_rank(**overrides)


@pytest.mark.parametrize(("x", "mass", "match"), [
    (torch.zeros(16, 4, device="meta"), torch.rand(16, 4), f"x {META}"),
    (torch.randn(16, 4), torch.rand(16, 4, device="meta"), f"mass {META}"),
    (torch.randn(16, 4, dtype=torch.complex64), torch.rand(16, 4), "x must be a real"),
])
def test_low_rank_refine_names_meta_and_complex_data(x, mass, match):
    router = _low_rank()
    before = snapshot(router)
    with pytest.raises(ValueError, match=match):
        router.refine(x, mass, steps=1)
    assert unchanged(router, before)


def test_unit_mass_and_kmeans_name_meta_tensors():
    with pytest.raises(ValueError, match=f"h {META}"):
        unit_mass(torch.zeros(2, 4, device="meta"), torch.ones(4), 0, 2)
    with pytest.raises(ValueError, match=f"points {META}"):
        balanced_kmeans(torch.zeros(4, 2, device="meta"), 2)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4)).eval()


CAL = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call", [
    lambda m: moefy(m, CAL, experts=4, steps=1, rank=4),
    lambda m: contextual(m, CAL, steps=1, rank=4),
    lambda m: head_predictors(m, CAL, CAL, steps=1, rank=4),
    lambda m: relufy(m, CAL, steps=1),
    lambda m: evaluate(m, CAL),
    lambda m: route_heads(m, {"model.layers.0": (Router(32, 4, 2), {})}),
])
def test_a_model_on_the_meta_device_is_named(call):
    """Each failed deep inside the first forward ("Tensor.item() cannot be called on meta
    tensors"), naming no argument; route_heads returned a copy that failed so later."""
    with pytest.raises(ValueError, match=f"model: model.embed_tokens.weight {META}"):
        call(_llama().to("meta"))
