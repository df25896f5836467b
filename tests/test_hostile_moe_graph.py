"""Hostile inputs to contextual sparsity, ReLU-fication, distillation, head routing, low-rank
routers, MoE evaluation, SAE capture and metrics, and sparsekit.graph.

Every bad value is refused with an error naming it, before anything changes; no hook is
left on a model; a fine-tuning that diverges says so instead of returning NaN weights.
"""

import pytest
import torch
from torch import nn

from sparsekit import moe
from sparsekit._checks import ArgumentTypeError
from sparsekit.graph import prior_masks, remove_dead_neurons
from sparsekit.moe.lowrank import LowRankRouter
from sparsekit.sae import SAE, capture, loss_recovered

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CALIBRATION = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def tiny_llama(seed: int = 0, *, hidden: int = 32, vocab: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- sae.capture / loss_recovered -----------------------------------------------------------


def test_capture_reads_the_input_of_a_module_called_with_keywords(llama):
    # LLaMA's decoder layer calls self_attn(hidden_states=...): no positional argument
    x = next(iter(capture(llama, "model.layers.0.self_attn", CALIBRATION, site="input")))
    y = next(iter(capture(llama, "model.layers.0.input_layernorm", CALIBRATION)))
    torch.testing.assert_close(x, y)


def test_capture_reads_a_module_that_returns_a_model_output(llama):
    # the inner model returns a BaseModelOutputWithPast (a dict): its first field
    x = next(iter(capture(llama, "model", CALIBRATION)))
    with torch.no_grad():
        expected = llama.model(CALIBRATION).last_hidden_state
    torch.testing.assert_close(x, expected.reshape(-1, 32))


def test_capture_leaves_no_hook_on_the_model_between_chunks(llama):
    chunks = capture(llama, "model.layers.0.mlp", [CALIBRATION, CALIBRATION], chunk_size=10)
    next(chunks)
    assert _hooks(llama) == 0
    with torch.no_grad():
        assert llama(CALIBRATION).logits.shape == (4, 16, 64)  # was a bare _Captured
    assert sum(c.shape[0] for c in chunks) == 2 * 64 - 10
    assert _hooks(llama) == 0


def test_loss_recovered_splices_into_a_module_that_returns_a_model_output(llama):
    sae = SAE(32, 64)
    out = loss_recovered(llama, "model", sae, CALIBRATION)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert out["loss_sae"] != out["loss_clean"]
    assert _hooks(llama) == 0


@pytest.mark.parametrize("call", [
    lambda m: loss_recovered(m, "model.layers.0.mlp", SAE(32, 64), 5),
    lambda m: capture(m, "model.layers.0.mlp", 5),
], ids=["loss_recovered", "capture"])
def test_inputs_that_are_not_batches_are_named(llama, call):
    with pytest.raises(ArgumentTypeError, match="inputs must be .*got int"):
        call(llama)
    assert _hooks(llama) == 0


# -- moe: heads, routing, evaluation ------------------------------------------------------


@pytest.mark.parametrize(("calibration", "error", "match"), [
    (CALIBRATION[:0], ValueError, "calibration holds no"),
    ([], ValueError, "calibration holds no"),
    (None, ValueError, "calibration must be"),
])
def test_head_predictors_names_calibration(llama, calibration, error, match):
    with pytest.raises(error, match=match):
        moe.head_predictors(llama, calibration, CALIBRATION, steps=1, rank=4)


def test_route_heads_refuses_routers_of_another_width(llama):
    wide = moe.head_predictors(tiny_llama(hidden=48), CALIBRATION, CALIBRATION, steps=1, rank=4)
    # was accepted, then a bare shape error at the first decode step
    with pytest.raises(ValueError, match=r"predictors\['model.layers.0'\]: router reads 48 "
                                         r"features, the attention's input has 32"):
        moe.route_heads(llama, wide)


def test_evaluate_names_a_model_that_is_not_a_module():
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module, got str"):
        moe.evaluate("model", CALIBRATION)


# -- moe: fine-tuning ---------------------------------------------------------------------


def test_relufy_with_a_diverging_lr_raises_instead_of_returning_nan_weights(llama):
    with pytest.raises(ValueError, match=r"lr=1e\+12.*not finite"):
        moe.relufy(llama, CALIBRATION, steps=3, lr=1e12)


def test_distil_with_a_diverging_lr_raises(llama):
    routed = moe.contextual(llama, CALIBRATION, keep=0.5, steps=1, rank=4)
    with pytest.raises(ValueError, match=r"lr=1e\+12.*not finite"):
        moe.distil(routed, llama, CALIBRATION, steps=3, lr=1e12)


@pytest.mark.parametrize("teacher", [
    lambda: tiny_llama(vocab=80),
    lambda: tiny_llama().model,  # hidden states, no logits
], ids=["other-vocabulary", "no-logits"])
def test_distil_names_a_teacher_whose_outputs_do_not_match(llama, teacher):
    routed = moe.contextual(llama, CALIBRATION, keep=0.5, steps=1, rank=4)
    with pytest.raises(ValueError, match="teacher"):  # was "data: the model cannot run"
        moe.distil(routed, teacher(), CALIBRATION, steps=1)


# -- moe.LowRankRouter ----------------------------------------------------------------------


W_IN = torch.randn(8, 1, 6, generator=torch.Generator().manual_seed(0))
X = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("w_in", "x", "match"), [
    (W_IN[:, 0], X, r"w_in must be \(neurons, writers, features\)"),
    (W_IN, torch.where(X > 2, torch.nan, X), "x must be finite"),
    (W_IN, torch.where(X > 2, torch.inf, X), "x must be finite"),
])
def test_low_rank_router_names_bad_weights_and_inputs(w_in, x, match):
    with pytest.raises(ValueError, match=match):
        LowRankRouter(w_in, None, torch.ones(8), torch.relu, x, rank=2, unit_size=2)


@pytest.mark.parametrize(("x", "mass", "match"), [
    (X[:, :5], torch.rand(20, 4), r"x must be \(T, 6\)"),
    (X, torch.full((20, 4), torch.nan), "mass must be finite"),
    (torch.where(X > 2, torch.nan, X), torch.rand(20, 4), "x must be finite"),
])
def test_low_rank_refine_refuses_bad_data_before_changing_the_factors(x, mass, match):
    router = LowRankRouter(W_IN, None, torch.ones(8), torch.relu, X, rank=2, unit_size=2)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        router.refine(x, mass, steps=2)
    assert all(torch.equal(before[k], v) for k, v in router.state_dict().items())


# -- graph ----------------------------------------------------------------------------------


def test_prior_masks_names_a_model_that_is_not_a_module():
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module, got str"):
        prior_masks("model", sparsity=0.5, method="erdos_renyi")


class _Unused(nn.Module):
    """A model with a module its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_loss_recovered_refuses_a_module_that_never_runs():
    # was {"cosine_sae": 1.0, "cosine_zero": 1.0}: a perfect score for nothing compared
    model = _Unused()
    with pytest.raises(ValueError, match="module_name: the module 'unused' did not run"):
        loss_recovered(model, "unused", SAE(4, 8, k=2), torch.randn(3, 5, 4))
    assert _hooks(model) == 0


def test_loss_recovered_refuses_inputs_the_model_turns_into_nan():
    model = _Unused()
    with pytest.raises(ValueError, match="inputs: the model's outputs on them.* must be finite"):
        loss_recovered(model, "inner", SAE(4, 8, k=2), torch.full((3, 5, 4), torch.nan))
    assert _hooks(model) == 0


def test_route_heads_names_an_empty_predictor_entry(llama):
    with pytest.raises(ValueError, match="predictors: 'model.layers.0' must name a block of "
                                         "model with a Router, got tuple"):
        moe.route_heads(llama, {"model.layers.0": ()})  # was a bare IndexError


def test_remove_dead_neurons_keeps_frozen_layers_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model[2].requires_grad_(False)
    with torch.no_grad():
        model[0].weight[1].zero_()
    small = remove_dead_neurons(model)
    assert small[0].out_features == 5
    # the rebuilt layers were all trainable: a frozen layer thawed by the surgery
    assert [p.requires_grad for p in small.parameters()] == [True, True, False, False]


def test_route_heads_of_a_routed_model_says_so(llama):
    predictors = moe.head_predictors(llama, CALIBRATION, CALIBRATION, steps=1, rank=4)
    routed = moe.route_heads(llama, predictors)
    # was "block 'model.layers.0' has no LLaMA-style attention"
    with pytest.raises(ValueError, match="model: block 'model.layers.0' is routed already"):
        moe.route_heads(routed, predictors)
