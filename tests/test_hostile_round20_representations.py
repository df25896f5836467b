"""Round 20 of hostile inputs to the sparse representations (SAE, MoEfication): each case
failed raw, or silently, before its fix."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _moe import routed_ffn
from torch import nn

from sparsekit.moe import LowRankRouter, Router, balanced_kmeans
from sparsekit.moe.router import fit
from sparsekit.sae import SAE, load, loss_recovered, save, train

NAN = float("nan")


def _nan_rows(rows: int = 3, width: int = 8, value: float = NAN) -> torch.Tensor:
    x = torch.randn(rows, width)
    x[0, 0] = value
    return x


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# -- SAE: non-finite inputs ------------------------------------------------------------------


@pytest.mark.parametrize("value", [NAN, float("inf")])
@pytest.mark.parametrize("method", ["forward", "encode", "encode_sparse", "pre_activations"])
def test_sae_encoding_refuses_non_finite_input(method, value):
    """NaN codes (and a NaN reconstruction) came back silently."""
    sae = SAE(8, 32, k=4)
    with pytest.raises(ValueError, match=r"x must be finite, got 1 NaN or inf among 24"):
        getattr(sae, method)(_nan_rows(value=value))


def test_sae_refuses_input_that_overflows_its_dtype():
    sae = SAE(8, 32, k=4)
    with pytest.raises(ValueError, match=r"x must be finite in torch\.float32, got 16 NaN or "
                                         r"inf among 16 values"):
        sae.encode(torch.full((2, 8), 1e300, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_training_forward_of_nan_input_counts_no_firing(activation):
    """NaN codes counted as firing: dead latents were reported alive (BatchTopK's
    threshold, too, is left as it was)."""
    sae = SAE(8, 32, activation, k=4).train()
    sae(torch.randn(4, 8))
    before = _state(sae)  # BatchTopK's threshold_updates among its buffers
    with pytest.raises(ValueError, match="x must be finite"):
        sae(_nan_rows())
    assert _same(sae, before)


@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_sae_decoding_refuses_non_finite_codes(value):
    sae = SAE(8, 32, k=4)
    z = torch.zeros(2, 32)
    z[0, 3] = value
    with pytest.raises(ValueError, match=r"z must be finite.*, got 1 NaN or inf among 64"):
        sae.decode(z)
    with pytest.raises(ValueError, match=r"values must be finite, got 1 NaN or inf"):
        sae.decode_sparse(torch.tensor([[value]]), torch.tensor([[1]]))


def test_finite_inputs_still_encode_and_decode():
    sae = SAE(8, 32, k=4)
    x = torch.randn(5, 8)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-6)
    with torch.no_grad():
        assert bool(torch.isfinite(sae(x[:1])).all())


def test_loss_recovered_blames_the_model_for_nan_activations():
    """The SAE's refusal of NaN activations must name the inputs, not the SAE."""
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"inputs: the model's outputs on them \(the activations "
                                         r"of '0' the SAE reads\) must be finite"):
        loss_recovered(model, "0", SAE(4, 8, k=2), torch.full((3, 5, 4), NAN))
    assert not model[0]._forward_hooks


# -- SAE: built or loaded in inference mode --------------------------------------------------


def _inference_sae() -> SAE:
    with torch.inference_mode():
        return SAE(8, 32, k=4)


@pytest.mark.parametrize("call", [
    lambda sae, x: sae(x),
    lambda sae, x: sae.train()(x),
    lambda sae, x: sae.encode(x),
    lambda sae, x: sae.decode(torch.zeros(2, 32)),
    lambda sae, x: sae.decode_sparse(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long)),
])
def test_an_sae_built_in_inference_mode_names_autograd(call):
    """"Inference tensors cannot be saved for backward", from any call with grad on."""
    sae = _inference_sae()
    with pytest.raises(ValueError, match=r"sae\.W_\w+ is an inference tensor \(the SAE was "
                                         r"built or loaded under torch\.inference_mode\), "
                                         r"which autograd cannot record"):
        call(sae, torch.randn(2, 8))


def test_an_sae_built_in_inference_mode_runs_without_grad_and_names_a_training_forward():
    sae = _inference_sae().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert sae(x).shape == (2, 8)  # eval: nothing changes in place
        sae.train()
        with pytest.raises(ValueError, match=r"sae\.tokens_since_fired is an inference "
                                             r"tensor"):
            sae(x)  # the firing counts change in place
    assert int(sae.tokens_since_fired.sum()) == 0
    with pytest.raises(ValueError, match=r"sae\.W_dec is an inference tensor"):
        sae.normalize_decoder_()
    with torch.inference_mode():  # inside it, everything works
        assert sae(x).shape == (2, 8)


def test_an_sae_loaded_in_inference_mode_names_autograd(tmp_path):
    save(SAE(8, 32, k=4), tmp_path / "sae")
    with torch.inference_mode():
        sae = load(tmp_path / "sae")
    with pytest.raises(ValueError, match=r"is an inference tensor"):
        sae(torch.randn(2, 8))
    with torch.no_grad():
        assert sae(torch.randn(2, 8)).shape == (2, 8)


# -- SAE: train leaves the caller's optimizer as given ---------------------------------------


@pytest.mark.parametrize("fail", [False, True])
def test_train_restores_the_caller_s_learning_rates(fail):
    """The decay schedule left the optimizer at lr 0 (and an initial_lr key)."""
    sae = SAE(8, 32, k=4)
    optimizer = torch.optim.SGD([{"params": [sae.W_enc, sae.W_dec], "lr": 0.1},
                                 {"params": [sae.b_enc, sae.b_dec], "lr": 0.05}])
    keys = [set(group) for group in optimizer.param_groups]
    data = [torch.randn(32, 8), torch.randn(32, 8)]
    if fail:
        data[1][0, 0] = NAN
        with pytest.raises(ValueError, match="activations batch 1 must be finite"):
            train(sae, data, steps=4, batch_size=16, decay=1.0, optimizer=optimizer)
    else:
        assert train(sae, data, steps=4, batch_size=16, optimizer=optimizer)["steps"] == 4
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.05]
    assert [set(group) for group in optimizer.param_groups] == keys


def test_train_still_decays_the_rate_over_the_last_steps():
    sae = SAE(8, 32, k=4)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.1)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    train(sae, torch.randn(64, 8), steps=4, batch_size=16, decay=0.5, optimizer=optimizer)
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.05])  # 0 would be the step after the last
    assert optimizer.param_groups[0]["lr"] == 0.1


# -- sizes past this machine's memory --------------------------------------------------------


@pytest.mark.parametrize(("args", "match"), [
    ((768, 10**12), r"n_latents=1000000000000 with d_in=768 and d_out=768 makes parameters "
                    r"in torch\.float32 of [\d,]+ bytes, more than this machine's memory"),
    ((10**7, 10**6), r"n_latents=1000000 with d_in=10000000"),
])
def test_an_sae_too_large_for_memory_is_named(args, match):
    """A raw allocator error naming no argument."""
    with pytest.raises(ValueError, match=match):
        SAE(*args)


@pytest.mark.parametrize(("args", "match"), [
    ((768, 100, 10**12), r"rank=1000000000000 with features=768 and units=100 makes router "
                         r"weights in torch\.float32 of [\d,]+ bytes"),
    ((768, 10**13, 8), r"rank=8 with features=768 and units=10000000000000"),
    ((np.int64(768), np.int64(10), np.int64(10**18)), r"rank=10{18} with"),  # no overflow
])
def test_a_router_too_large_for_memory_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        Router(*args)


# -- MoE routers: fitting --------------------------------------------------------------------


def _fit_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=generator)
    return x, (torch.rand(32, 4, generator=generator) > 0.5).float()


@pytest.mark.parametrize("x", [_nan_rows(32), torch.full((32, 8), 1e300, dtype=torch.float64)])
def test_fit_refuses_non_finite_inputs(x):
    """Every router weight became NaN, silently."""
    router = Router(8, 4, 3)
    before = _state(router)
    with pytest.raises(ValueError, match=r"x must be finite( in torch\.float32)?, got"):
        fit(router, x, _fit_data()[1], steps=3)
    assert _same(router, before)


def test_fit_inside_inference_mode_or_of_an_inference_router_is_named():
    x, labels = _fit_data()
    router = Router(8, 4, 3).eval()
    with torch.inference_mode(), pytest.raises(ValueError, match=r"router cannot be fitted "
                                                                 r"inside torch\.inference_mode"):
        fit(router, x, labels, steps=3)
    assert not router.training
    with torch.inference_mode():
        frozen = Router(8, 4, 3)
    with pytest.raises(ValueError, match=r"router\.project\.weight is an inference tensor"):
        fit(frozen, x, labels, steps=3)


@pytest.mark.parametrize(("lr", "match"), [
    (1e300, r"lr must be a positive float whose Adam step \(10 lr at the first step\) is "
            r"finite in torch\.float32"),
    (1e36, r"lr=1e\+36: fitting made the router's weights not finite .* they are restored"),
])
def test_fit_with_a_huge_lr_changes_nothing(lr, match):
    """A raw "cannot be converted to type float without overflow", or NaN weights."""
    router = Router(8, 4, 3).eval()
    before = _state(router)
    with pytest.raises(ValueError, match=match):
        fit(router, *_fit_data(), steps=5, lr=lr)
    assert _same(router, before)
    assert not router.training  # its mode and requires_grad are as given, too
    assert all(p.requires_grad for p in router.parameters())


def test_a_fitted_router_can_be_fitted_again():
    """fit froze the router, and a second fit failed in the backward, raw."""
    router = fit(Router(8, 4, 3), *_fit_data(), steps=3)
    before = _state(router)
    fit(router, *_fit_data(), steps=3)
    assert not _same(router, before)
    assert not any(p.requires_grad for p in router.parameters())


def _low_rank(x: torch.Tensor) -> LowRankRouter:
    return LowRankRouter(torch.randn(16, 1, 8), None, torch.rand(16), torch.relu, x, rank=4,
                         unit_size=4)


def test_refine_inside_inference_mode_or_of_an_inference_router_is_named():
    x = torch.randn(32, 8)
    mass = torch.rand(32, 4)
    router = _low_rank(x)
    with torch.inference_mode(), pytest.raises(ValueError, match="inside torch.inference_mode"):
        router.refine(x, mass, steps=2)
    with torch.inference_mode():
        frozen = _low_rank(x)
    with pytest.raises(ValueError, match=r"router\.down is an inference tensor"):
        frozen.refine(x, mass, steps=2)


@pytest.mark.parametrize("lr", [1e300, 1e36])
def test_refine_with_a_huge_lr_changes_nothing(lr):
    x = torch.randn(32, 8)
    router = _low_rank(x)
    before = _state(router)
    with pytest.raises(ValueError, match=r"lr"):
        router.refine(x, torch.rand(32, 4), steps=5, lr=lr)
    assert _same(router, before)
    assert not router.down.requires_grad


def test_refine_refuses_input_that_overflows_float32():
    x = torch.randn(32, 8)
    router = _low_rank(x)
    with pytest.raises(ValueError, match=r"x must be finite"):
        router.refine(torch.full((32, 8), 1e300, dtype=torch.float64), torch.rand(32, 4),
                      steps=2)


# -- MoE: RoutedFFN layout ---------------------------------------------------------------------


_routed = functools.partial(routed_ffn, 16, 8, 4, 3)  # 4 units of 4 neurons


@pytest.mark.parametrize(("overrides", "match"), [
    ({"act": "relu"}, r"act must be the FFN's activation, a callable such as torch\.relu, "
                      r"got 'relu'"),
    ({"router": "mlp"}, r"router must be None or a callable scoring the units"),
    ({"w_in": torch.randn(16, 1, 8).long()}, r"w_in must be floating-point, got torch\.int64"),
    ({"w_out": torch.ones(8, 16, dtype=torch.int32)}, r"w_out must be floating-point"),
    ({"b_in": torch.zeros(16, 1, dtype=torch.float64)},
     r"b_in must be None or of w_in's dtype torch\.float32, got torch\.float64"),
])
def test_routed_ffn_refuses_what_its_forward_cannot_run(overrides, match):
    """Each was accepted, and the first forward failed with a raw error."""
    with pytest.raises(TypeError, match=match):
        _routed(**overrides)


@pytest.mark.parametrize("units", [3, 7])
@pytest.mark.parametrize("rows", [1, 2])
def test_routed_ffn_names_a_router_of_another_layout(units, rows):
    """More units: a raw IndexError; fewer: a silent choice among the first units only."""
    layer = _routed(router=Router(8, units, 3))
    with pytest.raises(ValueError, match=rf"router: it scores {units} units, but the layer "
                                         r"has 4"):
        layer(torch.randn(rows, 8))


def test_routed_ffn_of_a_matching_router_still_runs():
    layer = _routed()
    assert layer(torch.randn(3, 8)).shape == (3, 8)
    assert layer(torch.randn(1, 8)).shape == (1, 8)


def test_balanced_kmeans_of_points_without_features_is_named():
    """amax failed with a raw RuntimeError."""
    with pytest.raises(ValueError, match=r"points must hold at least one feature, got shape "
                                         r"\(4, 0\)"):
        balanced_kmeans(torch.randn(4, 0), 2)


class _Wrapper:
    """As Lightning's LightningOptimizer: no Optimizer, the real one as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def test_resample_takes_an_optimizer_wrapper_as_train_does():
    """train takes such a wrapper; resample refused it with a TypeError."""
    from sparsekit.sae import resample

    sae = SAE(8, 16, k=2)
    inner = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae(torch.randn(4, 8)).pow(2).sum().backward()
    inner.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:3] = True
    out = resample(sae, torch.randn(32, 8), dead, optimizer=_Wrapper(inner))
    assert out.numel() == 3
    assert not bool(inner.state[sae.W_dec]["exp_avg"][out].any())
    assert bool(inner.state[sae.W_dec]["exp_avg"][~dead].any())
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or a "
                                        "wrapper"):
        resample(sae, torch.randn(32, 8), dead, optimizer="adam")


@pytest.mark.parametrize("transcoder", [False, True])
def test_train_on_activations_with_autograd_history_leaves_their_model_alone(transcoder):
    """The loss backpropagated into the model that made them (its .grad filled), and the
    next batch failed raw: "Trying to backward through the graph a second time"."""
    model = nn.Linear(8, 8)
    x = model(torch.randn(64, 8))  # made with grad on, as outside torch.no_grad()
    sae = SAE(8, 32, "l1", d_out=6) if transcoder else SAE(8, 32, k=4)
    data = [(x, model(torch.randn(64, 8))[:, :6])] if transcoder else [x]
    assert train(sae, data, batch_size=16, steps=6)["steps"] == 6
    assert model.weight.grad is None


def test_fit_and_refine_on_inputs_with_autograd_history_leave_their_model_alone():
    """The loss backpropagated into the model that made x, and the second step failed raw:
    "Trying to backward through the graph a second time"."""
    model = nn.Linear(8, 8)
    x = model(torch.randn(32, 8))
    fit(Router(8, 4, 3), x, _fit_data()[1], steps=3)
    _low_rank(torch.randn(32, 8)).refine(x, torch.rand(32, 4), steps=3)
    assert model.weight.grad is None


def test_routers_and_layers_built_from_parameters_hold_plain_buffers():
    """Buffers built from tensors requiring grad were non-leaf: deepcopy failed, refine
    could not train them ("can't optimize a non-leaf Tensor"), every forward reached back
    to the parameters."""
    import copy

    w_in = nn.Parameter(torch.randn(16, 1, 8))
    router = LowRankRouter(w_in, None, nn.Parameter(torch.rand(16)), torch.relu,
                           torch.randn(32, 8), rank=4, unit_size=4)
    layer = _routed(w_in=w_in, w_out=nn.Parameter(torch.randn(8, 16)),
                    b_out=nn.Parameter(torch.zeros(8)), router=router)
    assert all(t.grad_fn is None for t in (*router.buffers(), *layer.buffers()))
    copy.deepcopy(layer)
    router.refine(torch.randn(32, 8), torch.rand(32, 4), steps=2)
    assert not layer(torch.randn(3, 8)).requires_grad
