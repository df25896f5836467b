"""Hostile input to the representation modules (sparsekit.sae, sparsekit.moe): each case
fails with an error naming the parameter before anything changes, or round-trips exactly."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.moe import RoutedFFN, contextual, moefy
from sparsekit.sae import SAE, load, metrics, resample, save, train
from sparsekit.sae.files import STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")


def _state(module):
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def _same(before, module):
    after = module.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[n], t) for n, t in before.items())


# -- MoE ----------------------------------------------------------------------------------


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4)).eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


CAL = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))


def _ffn(model):
    return next(x for x in model.modules() if isinstance(x, RoutedFFN))


@pytest.fixture(scope="module")
def moe8(llama):
    return moefy(llama, CAL, experts=8, steps=5, rank=8)


@pytest.fixture
def ffn(moe8):
    return copy.deepcopy(_ffn(moe8))


def test_a_load_with_a_bad_k_copies_nothing(ffn):
    """w_in was already zeros when "k must be in [1, 8]" was raised."""
    before = _state(ffn)
    state = copy.deepcopy(ffn.state_dict())
    state["w_in"] = torch.zeros_like(state["w_in"])
    state["_extra_state"] = torch.tensor(99)
    with pytest.raises(ValueError, match=r"_extra_state \(the saved k\): k must be in \[1, 8\]"):
        ffn.load_state_dict(state)
    assert _same(before, ffn) and ffn.k == 2


def test_a_load_of_another_layout_copies_nothing(llama, ffn):
    """A 16-expert state overwrote order, w_in, the router, w_out and k, then a RuntimeError."""
    before = _state(ffn)
    other = _ffn(moefy(llama, CAL, experts=16, steps=5, rank=8)).state_dict()
    with pytest.raises(ValueError, match=r"router\.score\.weight must have shape \(8, 8\)"):
        ffn.load_state_dict(other)
    assert _same(before, ffn) and ffn.k == 2
    ffn.load_state_dict(copy.deepcopy(before))  # a state of its own layout still loads
    assert _same(before, ffn)


def test_a_non_linear_down_proj_is_named(llama):
    """An nn.Identity down_proj was a raw AttributeError about in_features."""
    model = copy.deepcopy(llama)
    model.model.layers[0].mlp.down_proj = nn.Identity()
    for build in (lambda m: moefy(m, CAL, experts=8), lambda m: contextual(m, CAL)):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj must be an "
                                             r"nn\.Linear, got Identity"):
            build(model)


@pytest.mark.parametrize(("x", "error", "match"), [
    (torch.randn(2, 63), ValueError, r"x must have shape \(\.\.\., 64\).*got \(2, 63\)"),
    (torch.randn(2, 64, dtype=torch.float64), ArgumentTypeError,
     "x must be a torch.float32 tensor.*got torch.float64"),
    (torch.ones(2, 64, dtype=torch.long), ArgumentTypeError, "got torch.int64"),
])
def test_routed_ffn_forward_names_a_bad_x(ffn, x, error, match):
    """Wrong widths and dtypes were raw torch RuntimeErrors."""
    with pytest.raises(error, match=match):
        ffn(x)


@pytest.mark.parametrize("k", [2.5, True, "3"])
def test_routed_ffn_k_must_be_an_int(ffn, k):
    """2.5 and True were accepted, "3" was a raw TypeError."""
    with pytest.raises(ArgumentTypeError, match="k must be an int"):
        ffn.k = k
    assert ffn.k == 2


@pytest.mark.parametrize(("calibration", "match"), [
    ({"input_ids": CAL}, r"calibration must be .*\(pass calibration\['input_ids'\]\), got dict"),
    ("hello", "calibration must be .* got str"),
    ([CAL, "x"], "calibration batch 1 must be a tensor .* got str"),
])
def test_moefy_names_calibration(llama, calibration, match):
    """The error said "each batch in data must be ...": there is no data parameter."""
    with pytest.raises(ArgumentTypeError, match=match):
        moefy(llama, calibration, experts=8)


# -- SAE training ---------------------------------------------------------------------------


@pytest.mark.parametrize(("activations", "match"), [
    ([torch.randn(64, 4, dtype=torch.float64) * 1e300],
     r"activations batch 0 must be finite in torch.float32, got 256 NaN or inf among 256 "
     r"values"),
    ([torch.randn(64, 4) * 1e20], r"step 1: the loss is not finite \(mse=inf\)"),
])
def test_train_refuses_data_that_overflows(activations, match):
    """Finite data trained into NaN weights (inf after the cast, or a squared error of inf)."""
    sae = SAE(4, 8, k=2)
    with pytest.raises(ValueError, match=match):
        train(sae, activations, batch_size=16)
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"aux_coef": 1e300, "dead_window": 1}, r"step \d+: the loss is not finite \(aux=inf\)"),
    ({"lr": 1e38}, r"step 1: the update .* made .* non-finite"),
    ({"resample_every": 1, "dead_window": 1, "resample_scale": 1e300},
     r"step \d+: resampling with resample_scale=1e\+300: encoder_scale=1e\+300 .* overflows"),
])
def test_train_stops_at_a_non_finite_step(kwargs, match):
    """A huge aux_coef, lr or resample_scale silently trained NaN weights."""
    sae = SAE(4, 8, k=2)
    with pytest.raises(ValueError, match=match):
        train(sae, [torch.randn(640, 4, generator=torch.Generator().manual_seed(1))],
              batch_size=16, **kwargs)
    assert not sae.training


# -- SAE inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
@pytest.mark.parametrize("method", ["forward", "encode", "encode_sparse"])
def test_sae_refuses_complex_and_bool_input(method, dtype):
    """A complex input silently lost its imaginary part."""
    with pytest.raises(ArgumentTypeError, match=f"x must be a real .* got {dtype}"):
        getattr(SAE(4, 8, k=2), method)(torch.ones(2, 4, dtype=dtype))


def test_resample_a_transcoder_needs_a_target():
    """A transcoder without target was a raw RuntimeError."""
    sae = SAE(4, 8, "l1", d_out=3)
    before = _state(sae)
    with pytest.raises(ValueError, match="target must be given for a transcoder"):
        resample(sae, torch.randn(5, 4), torch.ones(8, dtype=torch.bool))
    assert _same(before, sae)


def test_resample_refuses_non_finite_activations():
    """NaN activations silently resampled nothing (returned [])."""
    with pytest.raises(ValueError, match="x must be finite"):
        resample(SAE(4, 8, k=2), torch.full((5, 4), NAN), torch.ones(8, dtype=torch.bool))


def test_decode_sparse_of_no_codes_is_the_bias():
    """Width-0 codes were a raw RuntimeError."""
    sae = SAE(4, 8, k=2)
    with torch.no_grad():
        sae.b_dec.copy_(torch.arange(4.0))
        y = sae.decode_sparse(torch.ones(2, 0), torch.zeros(2, 0, dtype=torch.long))
    assert torch.equal(y, sae.b_dec.expand(2, 4))


def test_metrics_names_activations():
    """None was "'NoneType' object is not iterable"."""
    with pytest.raises(ArgumentTypeError, match="activations must be .* got NoneType"):
        metrics(SAE(4, 8, k=2), None)


def test_sae_seed_out_of_range():
    """2**70 was "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*63 - 1\], "
                                         r"got 1180591620717411303424"):
        SAE(4, 8, k=2, seed=2**70)


# -- SAE files -------------------------------------------------------------------------------


def test_jumprelu_round_trip_is_bit_identical(tmp_path):
    """log_threshold saved as exp() and loaded with log(): ulps off, -120 -> -inf, 88.8 -> inf."""
    sae = SAE(16, 512, "jumprelu", seed=1)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.randn(512, generator=torch.Generator().manual_seed(0)) * 3)
        sae.log_threshold[:2] = torch.tensor([-120.0, 88.8])
    save(sae, tmp_path)
    assert torch.equal(load(tmp_path).log_threshold, sae.log_threshold)
    assert torch.equal(load_file(tmp_path / "sae_weights.safetensors")["threshold"],
                       sae.log_threshold.detach().exp())  # SAELens's tensor is kept


def test_batchtopk_round_trip_resumes_training_the_same(tmp_path):
    """The float64 threshold was rounded, its update count and tokens_since_fired lost."""
    sae = SAE(8, 32, "batchtopk", k=4)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    train(sae, x, steps=5, batch_size=32, lr=1e-2)
    save(sae, tmp_path)
    back = load(tmp_path)
    assert torch.equal(back.threshold, sae.threshold)
    assert int(back.threshold_updates) == int(sae.threshold_updates) == 5
    assert torch.equal(back.tokens_since_fired, sae.tokens_since_fired)
    for s in (sae, back):
        train(s, x[:32], steps=1, batch_size=32, lr=0.0)
    assert torch.equal(back.threshold, sae.threshold)


@pytest.mark.parametrize("activation", ["topk", "l1", "jumprelu", "batchtopk"])
def test_sae_lens_still_loads_the_files(tmp_path, activation):
    """The sparsekit-only state must not break SAELens's strict load."""
    sae_lens = pytest.importorskip("sae_lens")
    save(SAE(4, 8, activation, k=2), tmp_path)
    assert (tmp_path / STATE_NAME).is_file()
    sae_lens.SAE.load_from_disk(tmp_path)


@pytest.mark.parametrize(("metadata", "error", "match"), [
    ({"a": NAN}, ArgumentTypeError, "metadata must hold only JSON values"),
    ({"sae_lens_version": 1}, ValueError, "metadata must not hold 'sae_lens_version'"),
])
def test_save_refuses_bad_metadata(tmp_path, metadata, error, match):
    """NaN was written as bare NaN (invalid JSON); sae_lens_version replaced the layout's."""
    with pytest.raises(error, match=match):
        save(SAE(4, 8, k=2), tmp_path / "s", metadata=metadata)
    assert not (tmp_path / "s").exists()


def _edit_weights(path, **tensors):
    weights = load_file(path / "sae_weights.safetensors")
    save_file({**weights, **tensors}, path / "sae_weights.safetensors")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: _edit_weights(p, W_dec=torch.ones(8, 4, dtype=torch.int32)),
     "W_dec must be floating-point, got torch.int32"),
    (lambda p: _edit_weights(p, W_dec=torch.full((8, 4), NAN)),
     "W_dec must be finite, got 32 NaN or inf"),
    (lambda p: (p / "cfg.json").write_text(json.dumps({
        **json.loads((p / "cfg.json").read_text()),
        "sparsekit": {**json.loads((p / "cfg.json").read_text())["sparsekit"],
                      "activation": "batchtopk"}})),
     "sparsekit activation 'batchtopk' saves as architecture 'jumprelu', but the file says "
     "'topk'"),
])
def test_load_refuses_edited_files(tmp_path, edit, match):
    """An int32 or all-NaN W_dec loaded; a topk file edited to batchtopk loaded at threshold 0."""
    save(SAE(4, 8, k=2), tmp_path)
    edit(tmp_path)
    with pytest.raises(ValueError, match=match):
        load(tmp_path)
