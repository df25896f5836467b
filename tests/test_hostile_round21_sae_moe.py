"""Hostile inputs, round 21: the SAE and MoE modules.

- Non-finite checks were scattered with differing messages ("must hold finite values",
  "must be finite", "are not finite (… NaN or inf)"): one shared
  :func:`sparsekit._checks.check_finite` now phrases every one alike.
- A ``Router`` built under ``torch.inference_mode()`` and then called with autograd on gave
  PyTorch's raw "Inference tensors cannot be saved for backward".
- ``sae.metrics`` and ``sae.loss_recovered`` of an SAE with a NaN weight returned NaN
  scores silently.
- A float16 SAE given finite inputs whose pre-activations overflow float16 gave inf (and
  NaN) codes silently.
- ``balanced_kmeans``'s greedy assignment built an ``n × clusters`` Python list; it is
  tensor code now, with the same result (ties in the flattened order).
- ``unit_mass`` took complex (and bool) neuron values; ``RoutedAttention.k`` could be set
  to 0, past the head groups, or to a float after construction (a raw ``topk`` error at
  the next decode step).
- ``LowRankRouter`` of float64 weights past float32's range, or of finite calibration
  inputs whose second moment overflows float32, failed inside ``svd`` or ``eigh``.
- ``SAE.k`` could be set to 0 (all-zero codes, silently), past ``n_latents`` or to a float
  (raw ``topk`` errors); ``RoutedFFN.oracle`` and ``RoutedAttention.skip_kv`` to ``"no"``
  (read as true).
- ``SAE.decode``/``decode_sparse`` of float64 codes past float32 gave NaN silently, and a
  float16 SAE's overflowing reconstruction inf.
- A JumpReLU SAE with a ``log_threshold`` of +inf (a latent that never fires, which
  ``load`` takes) gave NaN codes (0 × inf), NaN gradients that clipping spread to every
  weight, and ``train`` refused the +inf after its last step.
- ``train`` of an SAE with a NaN weight blamed "step 0: the update"; ``resample`` of one
  gave a misleading overflow message, and of large finite rows a raw "probability tensor
  contains either inf, nan" from ``torch.multinomial``.
- A ``Router`` reading inputs made under ``inference_mode`` with autograd on failed raw.
- ``capture``/``loss_recovered`` of a non-module model failed with an ``AttributeError``,
  of a meta one with an error blaming the inputs.
- ``fit`` of complex labels failed inside PyTorch's comparison; ``balanced_kmeans`` of
  points that require grad recorded every round for autograd, with a warning.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from _moe import routed_ffn  # noqa: E402
from test_moefication import gqa_llama  # noqa: E402 (needs transformers)

from sparsekit import moe  # noqa: E402
from sparsekit._checks import check_finite  # noqa: E402
from sparsekit.moe.cluster import _assign, balanced_kmeans  # noqa: E402
from sparsekit.moe.lowrank import LowRankRouter  # noqa: E402
from sparsekit.moe.routed import unit_mass  # noqa: E402
from sparsekit.moe.router import Router, fit  # noqa: E402
from sparsekit.sae import SAE, capture, loss_recovered, metrics, resample, train  # noqa: E402

NAN, INF = float("nan"), float("inf")


# -- one finite check ---------------------------------------------------------------------


def test_check_finite_names_the_argument_the_count_and_the_dtype():
    check_finite("x", torch.randn(3, 4))
    check_finite("ids", torch.arange(5))  # integers are always finite
    bad = torch.tensor([1.0, NAN, INF, -INF])
    with pytest.raises(ValueError, match=r"^x must be finite, got 3 NaN or inf among 4 "
                                         r"values$"):
        check_finite("x", bad)
    with pytest.raises(ValueError, match=r"^x must be finite in torch.float16, got 1 NaN or "
                                         r"inf among 2 values; scale it$"):
        check_finite("x", torch.tensor([1.0, 1e5]), dtype=torch.float16, hint="scale it")


@pytest.mark.parametrize("call", [
    lambda: balanced_kmeans(torch.tensor([[1.0], [NAN]]), 1),
    lambda: SAE(4, 8, "topk", k=2).encode(torch.tensor([[1.0, NAN, 0.0, 0.0]])),
    lambda: SAE(4, 8, "topk", k=2).decode(torch.full((1, 8), INF)),
    lambda: fit(Router(4, 2, 2), torch.full((3, 4), NAN), torch.rand(3, 2), steps=1),
], ids=["kmeans", "encode", "decode", "router-fit"])
def test_every_non_finite_argument_is_refused_in_the_same_words(call):
    with pytest.raises(ValueError, match=r"must be finite.*, got \d+ NaN or inf among \d+ "
                                         r"values"):
        call()


# -- Router built in inference mode -------------------------------------------------------


def test_a_router_built_in_inference_mode_names_its_weights_under_autograd():
    with torch.inference_mode():
        router = Router(8, 4, 2)
    x = torch.randn(5, 8)
    with pytest.raises(ValueError, match=r"^router\.project\.weight is an inference tensor "
                                         r"\(the router was built or loaded under "
                                         r"torch\.inference_mode\), which autograd cannot "
                                         r"record"):
        router(x)
    with torch.no_grad():  # no autograd, no problem
        assert router(x).shape == (5, 4)
    with torch.inference_mode():
        assert router(x).shape == (5, 4)


# -- SAE metrics of NaN weights and float16 overflow --------------------------------------


@pytest.mark.parametrize("weight", ["W_enc", "W_dec", "b_enc", "b_dec"])
def test_metrics_refuse_an_sae_with_a_non_finite_weight(weight):
    sae = SAE(8, 16, "topk", k=2).train()
    with torch.no_grad():
        getattr(sae, weight).view(-1)[0] = NAN
    with pytest.raises(ValueError, match=fr"^sae\.{weight} must be finite, got 1 NaN or inf"):
        metrics(sae, torch.randn(32, 8))
    assert sae.training  # refused before the mode changed
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=fr"^sae\.{weight} must be finite"):
        loss_recovered(model, "0", sae, torch.randn(2, 8))


def test_metrics_still_take_a_jumprelu_sae_whose_latent_never_fires():
    sae = SAE(8, 16, "jumprelu")
    with torch.no_grad():
        sae.log_threshold[0] = INF  # a threshold of inf: a latent that never fires
    assert metrics(sae, torch.randn(32, 8))["tokens"] == 32


def test_a_float16_sae_refuses_inputs_whose_pre_activations_overflow():
    sae = SAE(16, 32, "topk", k=4, dtype=torch.float16)
    x = torch.full((3, 16), 60000.0, dtype=torch.float16)  # finite, but the product is not
    for call in (sae.encode, sae.encode_sparse, sae.pre_activations, sae):
        with pytest.raises(ValueError, match=r"^x's pre-activations .* must be finite, got "
                                             r"\d+ NaN or inf .*too large for the SAE's "
                                             r"torch\.float16"):
            call(x)
    assert sae.encode(torch.randn(3, 16, dtype=torch.float16)).isfinite().all()


# -- balanced k-means as tensor code -------------------------------------------------------


def _greedy(distances: torch.Tensor, size: int) -> torch.Tensor:
    """The reference: the flattened pairs closest first, each center taking ``size``."""
    n, k = distances.shape
    labels, room = [-1] * n, [size] * k
    for flat in distances.flatten().argsort(stable=True).tolist():
        point, center = divmod(flat, k)
        if labels[point] < 0 and room[center]:
            labels[point], room[center] = center, room[center] - 1
    return torch.tensor(labels)


@pytest.mark.parametrize("ties", [False, True])
def test_assign_equals_the_greedy_brute_force(ties):
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        k, size = (int(torch.randint(1, 7, (1,), generator=generator)) for _ in range(2))
        distances = torch.rand(k * size, k, generator=generator)
        if ties:
            distances = (distances * 3).round()
        labels = _assign(distances, size)
        assert torch.equal(labels, _greedy(distances, size))
        assert torch.equal(labels.bincount(minlength=k), torch.full((k,), size))


def test_balanced_kmeans_is_still_balanced():
    labels = balanced_kmeans(torch.randn(64, 5), 8, seed=1)
    assert torch.equal(labels.bincount(minlength=8), torch.full((8,), 8))


# -- unit_mass and RoutedAttention.k -------------------------------------------------------


@pytest.mark.parametrize(("h", "norms", "name", "dtype"), [
    (torch.randn(2, 8, dtype=torch.complex64), torch.ones(8), "h", "torch.complex64"),
    (torch.ones(2, 8, dtype=torch.bool), torch.ones(8), "h", "torch.bool"),
    (torch.randn(2, 8), torch.ones(8, dtype=torch.complex64), "norms", "torch.complex64"),
])
def test_unit_mass_refuses_complex_and_bool_tensors(h, norms, name, dtype):
    with pytest.raises(TypeError, match=fr"^{name} must be a real \(floating-point or "
                                        fr"integer\) tensor, got {dtype}"):
        unit_mass(h, norms, 0, 2)


@pytest.mark.parametrize(("k", "error", "match"), [
    (0, ValueError, r"k must be an int ≥ 1, got 0"),
    (5, ValueError, r"k must be an int in \[1, 4\], got 5"),
    (2.0, TypeError, r"k must be an int ≥ 1, got 2\.0"),
    (True, TypeError, r"k must be an int ≥ 1, got True"),
])
def test_routed_attention_checks_k_when_it_is_set(k, error, match):
    layer = moe.RoutedAttention(copy.deepcopy(gqa_llama().model.layers[0].self_attn),
                                Router(64, 4, 8), 2)
    with pytest.raises(error, match=match):
        layer.k = k
    assert layer.k == 2 and layer.kept == 0.5
    layer.k = 4
    assert layer.chosen(torch.randn(3, 64)).shape == (3, 4)


# -- LowRankRouter past float32 ------------------------------------------------------------


def _low_rank(**overrides: torch.Tensor) -> LowRankRouter:
    args = {"w_in": torch.randn(8, 1, 6), "norms": torch.rand(8), "x": torch.randn(20, 6)}
    args |= overrides
    return LowRankRouter(args["w_in"], None, args["norms"], torch.relu, args["x"], rank=3,
                         unit_size=2)


def test_low_rank_router_refuses_float64_weights_past_float32():
    with pytest.raises(ValueError, match=r"^w_in must be finite in torch\.float32, got 48 "):
        _low_rank(w_in=torch.randn(8, 1, 6, dtype=torch.float64) * 1e300)


def test_low_rank_router_refuses_inputs_whose_second_moment_overflows():
    with pytest.raises(ValueError, match=r"^x's second moment .* must be finite.*too large "
                                         r"for float32"):
        _low_rank(x=torch.randn(20, 6) * 1e20)
    assert _low_rank(x=torch.randn(20, 6) * 1e15).down.isfinite().all()


# -- SAE: k on set, codes past the SAE's dtype, infinite JumpReLU thresholds --------------


@pytest.mark.parametrize(("k", "error", "match"), [
    (0, ValueError, r"^k must be an int ≥ 1, got 0$"),
    (17, ValueError, r"^k must be an int in \[1, n_latents=16\], got 17$"),
    (2.5, TypeError, r"^k must be an int ≥ 1, got 2\.5$"),
    (True, TypeError, r"^k must be an int ≥ 1, got True$"),
])
def test_sae_k_is_checked_when_it_is_set(k, error, match):
    """k=0 gave all-zero codes silently; past n_latents or a float, a raw topk error."""
    for activation in ("topk", "batchtopk"):
        sae = SAE(8, 16, activation, k=2)
        with pytest.raises(error, match=match):
            sae.k = k
        assert sae.k == 2
    sae.k = 16
    assert (sae.encode(torch.randn(3, 8)) != 0).sum(-1).le(16).all()


def test_sae_k_stays_none_for_an_activation_without_one():
    sae = SAE(8, 16, "l1")
    assert sae.k is None
    sae.k = None
    with pytest.raises(ValueError, match=r"^k must be None for activation='l1'"):
        sae.k = 3


def test_sae_decoding_refuses_float64_codes_past_its_dtype():
    """A float64 code of 1e300 is finite, and decoded to NaN in a float32 SAE."""
    sae = SAE(8, 16, "topk", k=2)
    with pytest.raises(ValueError, match=r"^z must be finite in torch\.float32, got 16 NaN"):
        sae.decode(torch.full((1, 16), 1e300, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^values must be finite in torch\.float32, got 2 "):
        sae.decode_sparse(torch.full((1, 2), 1e300, dtype=torch.float64),
                          torch.zeros(1, 2, dtype=torch.long))


def test_a_float16_sae_refuses_codes_whose_reconstruction_overflows():
    sae = SAE(8, 16, "topk", k=2, dtype=torch.float16)
    z = torch.full((2, 16), 30000.0, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^the reconstruction from z must be finite, got "
                                         r"\d+ NaN or inf .*too large for the SAE's "
                                         r"torch\.float16"):
        sae.decode(z)
    assert sae.decode(torch.ones(2, 16, dtype=torch.float16)).isfinite().all()


def test_a_jumprelu_sae_with_an_infinite_threshold_gives_finite_codes():
    """``exp(log_threshold) = inf`` (a latent that never fires, which load takes) made that
    latent's codes NaN: 0 × inf in the straight-through term."""
    sae = SAE(8, 16, "jumprelu")
    with torch.no_grad():
        sae.log_threshold[0] = INF
    x = torch.randn(4, 8)
    z = sae.encode(x)
    assert z.isfinite().all() and (z[:, 0] == 0).all()
    assert torch.equal(z[:, 1:], SAE(8, 16, "jumprelu").encode(x)[:, 1:])


def test_training_a_jumprelu_sae_with_an_infinite_threshold_keeps_every_weight_finite():
    """The gradient of exp(log_threshold) at +inf is inf × 0 = NaN: gradient clipping
    spread it to every weight, and train then blamed its own first update; and train's
    check after the last step refused the +inf that load takes."""
    sae = SAE(8, 16, "jumprelu")
    with torch.no_grad():
        sae.log_threshold[0] = INF
    train(sae, torch.randn(256, 8), batch_size=64)
    assert sae.log_threshold[0] == INF
    assert all(p[1:].isfinite().all() if n == "log_threshold" else p.isfinite().all()
               for n, p in sae.named_parameters())


def test_train_refuses_an_sae_with_a_nan_weight_before_any_step():
    """It said "step 0: the update (lr and the gradients) made W_enc non-finite"."""
    sae = SAE(8, 16, "topk", k=2)
    with torch.no_grad():
        sae.W_enc[0, 0] = NAN
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    sae.train()
    with pytest.raises(ValueError, match=r"^sae\.W_enc must be finite, got 1 NaN or inf "
                                         r"among 128 values; the SAE's weights diverged"):
        train(sae, torch.randn(64, 8), batch_size=32)
    assert sae.training
    for name, p in sae.named_parameters():  # NaN != NaN: compare where they are, too
        assert torch.equal(p.nan_to_num(), before[name].nan_to_num())


# -- flags of routed layers, inputs made in inference mode ---------------------------------


def test_routed_ffn_oracle_is_a_checked_flag():
    """``layer.oracle = "no"`` switched the oracle on (a flag read by its truth)."""
    layer = routed_ffn(16, 8, 4, 4)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match=r"^oracle must be a bool \(True or False\)"):
            layer.oracle = bad
        assert layer.oracle is False
    layer.oracle = True
    assert layer.oracle is True


def test_routed_attention_skip_kv_is_a_checked_flag():
    layer = moe.RoutedAttention(copy.deepcopy(gqa_llama().model.layers[0].self_attn),
                                Router(64, 4, 8), 2)
    with pytest.raises(TypeError, match=r"^skip_kv must be a bool \(True or False\), got 'no'"):
        layer.skip_kv = "no"
    assert layer.skip_kv is False


def test_a_router_reads_inputs_made_in_inference_mode_with_autograd_on():
    """Activations recorded under inference_mode failed the router's product with
    PyTorch's raw "Inference tensors cannot be saved for backward"."""
    router = Router(8, 4, 2)
    with torch.inference_mode():
        x = torch.randn(5, 8)
    scores = router(x)
    scores.sum().backward()
    assert router.project.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(router(x), router(x.clone()))


# -- capture and loss_recovered: the model argument ----------------------------------------


@pytest.mark.parametrize("call", [
    lambda model: capture(model, "0", torch.randn(2, 8)),
    lambda model: loss_recovered(model, "0", SAE(8, 16, "topk", k=2), torch.randn(2, 8)),
], ids=["capture", "loss_recovered"])
def test_the_model_must_be_a_module_with_values(call):
    """A str model failed with a raw AttributeError; a meta one ran, and its error blamed
    the inputs ("inputs: the model cannot run on this batch: Tensor on device meta")."""
    with pytest.raises(TypeError, match=r"^model must be an nn\.Module, got str$"):
        call("model")
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"^model: 0\.weight is on the meta device"):
        call(meta)


# -- resample ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e10, 1e30])
def test_resample_takes_large_finite_rows(scale):
    """A float32 squared error past ~1e19 (or its square, the weights, past ~1e9) was inf:
    a raw "probability tensor contains either inf, nan" from the draw."""
    sae = SAE(8, 16, "topk", k=2)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:3] = True
    reborn = resample(sae, torch.randn(32, 8) * scale, dead,
                      generator=torch.Generator().manual_seed(0))
    assert reborn.tolist() == [0, 1, 2]
    assert all(p.isfinite().all() for p in sae.parameters())


def test_resample_refuses_an_sae_with_a_nan_weight_before_writing():
    sae = SAE(8, 16, "topk", k=2)
    with torch.no_grad():
        sae.W_dec[5, 0] = NAN
    before = sae.W_enc.detach().clone()
    with pytest.raises(ValueError, match=r"^sae\.W_dec must be finite, got 1 NaN or inf"):
        resample(sae, torch.randn(32, 8), torch.ones(16, dtype=torch.bool))
    assert torch.equal(sae.W_enc, before)


def test_fit_refuses_complex_labels_by_name():
    """The range check failed inside PyTorch: '"ge_cpu" not implemented for ComplexFloat'."""
    router = Router(8, 4, 2)
    before = [p.detach().clone() for p in router.parameters()]
    with pytest.raises(TypeError, match=r"^labels must be a real tensor, got torch\.complex64$"):
        fit(router, torch.randn(6, 8), torch.ones(6, 4, dtype=torch.complex64), steps=1)
    assert all(torch.equal(p, b) for p, b in zip(router.parameters(), before, strict=True))


def test_balanced_kmeans_of_points_that_require_grad_builds_no_graph(recwarn):
    """It recorded every round for autograd and warned "Consider using tensor.detach()"."""
    points = torch.randn(8, 3, requires_grad=True)
    labels = balanced_kmeans(points, 2)
    assert not labels.requires_grad and not recwarn.list
    assert torch.equal(labels, balanced_kmeans(points.detach(), 2))
