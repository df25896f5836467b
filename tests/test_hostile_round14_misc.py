"""Round 14: one rule for a layer's input (observe, activation sparsity), ReLU-fication
without data, structure features of zero-width layers, distillation that stops at the
first non-finite step, and hostile inputs to sparsekit.sae and sparsekit.moe."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from sparsekit import moe, observe
from sparsekit.activation.sparsity import ActivationSparsity
from sparsekit.graph import structure_features
from sparsekit.moe.distillation import fit_outputs
from sparsekit.moe.ffn import find_ffns

pytestmark = pytest.mark.usefixtures("one_thread")


# -- one rule for a layer's input ---------------------------------------------------------


def test_layer_input_is_the_first_positional_else_the_first_keyword_argument():
    x, y = torch.ones(2), torch.zeros(2)
    value, replace = observe.layer_input((x, 3), {"k": y})
    assert value is x
    args, kwargs = replace(y)
    assert args[0] is y and args[1] == 3 and kwargs == {"k": y}

    value, replace = observe.layer_input((), {"input": x, "other": 1})
    assert value is x
    args, kwargs = replace(y)
    assert args == () and kwargs["input"] is y and kwargs["other"] == 1

    value, replace = observe.layer_input((), {})
    assert value is None and replace(y) == ((), {})


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=x)


def test_activation_sparsity_thresholds_the_input_watch_sees_on_keyword_calls():
    """The pre-hook replaces exactly the argument the observer reads."""
    model = KeywordCall()
    sparsity = ActivationSparsity("teal", "uniform", 0.5, {"fc": 0.5},
                                  {"fc": torch.full((4,), 0.5)}, {"fc": 12})
    x = torch.tensor([[0.1, -0.9, 0.4, 2.0]])
    seen = []
    sparsity.apply(model)
    try:
        with observe.watch({"fc": model.fc}, lambda _n, inp, _o: seen.append(inp)):
            model(x)
    finally:
        sparsity.remove()
    assert torch.equal(seen[0], torch.tensor([[0.0, -0.9, 0.0, 2.0]]))
    assert sparsity.stats() == {"fc": 0.5}
    assert not model.fc._forward_pre_hooks


# -- relufy with steps=0 needs no data -----------------------------------------------------


def tiny_llama(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


DATA = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def test_relufy_with_no_steps_needs_no_data():
    """relufy(model, None, steps=0) said 'data must be a tensor of inputs', though the
    swap alone never runs the model."""
    model = tiny_llama()
    swapped = moe.relufy(model, None, steps=0)
    assert all(isinstance(f.act, nn.ReLU) for f in find_ffns(swapped))
    assert not any(isinstance(f.act, nn.ReLU) for f in find_ffns(model))
    with_data = moe.relufy(model, DATA, steps=0)
    torch.testing.assert_close(swapped.state_dict(), with_data.state_dict())
    with pytest.raises(ValueError, match="data must be a tensor of inputs.*got None"):
        moe.relufy(model, None, steps=1)
    with pytest.raises(ValueError, match="data holds no"):
        moe.relufy(model, [], steps=0)  # data given is still checked
    with pytest.raises(ValueError, match="lr must be a positive finite float"):
        moe.relufy(model, None, steps=0, lr=-1.0)


# -- structure features of zero-width layers ----------------------------------------------


def _zero_width(*shapes: tuple[int, int]) -> nn.Module:
    with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
        warnings.simplefilter("ignore")
        return nn.Sequential(*(nn.Linear(i, o) for i, o in shapes))


@pytest.mark.parametrize("shapes", [[(0, 3)], [(3, 0)], [(3, 0), (0, 2)], [(3, 4), (4, 0)],
                                    [(0, 0)]])
def test_structure_features_of_zero_width_layers_are_nan_where_undefined(shapes):
    """A zero-width nn.Linear was a ZeroDivisionError (density) or a RuntimeError from
    max() of no degrees; now the statistics over nothing are NaN, the rest defined."""
    model = _zero_width(*shapes)
    f = structure_features(model)
    assert f["edges"] == 0 or shapes[0] == (3, 4)
    assert all(isinstance(v, float) for v in f.values())
    for j, (i, o) in enumerate(shapes):
        assert math.isnan(f[f"{j}.weight.density"]) == (i * o == 0)
        assert math.isnan(f[f"{j}.weight.in_degree_max"]) == (o == 0)
        assert math.isnan(f[f"{j}.weight.out_degree_max"]) == (i == 0)
        if o and not i:
            assert f[f"{j}.weight.in_degree_max"] == 0.0
    if all(i * o == 0 for i, o in shapes):
        assert math.isnan(f["density"])
    assert f["nodes"] == sum([shapes[0][0], *(o for _, o in shapes)])


def test_structure_features_of_a_graph_without_neurons():
    f = structure_features(_zero_width((0, 0)))
    assert f["nodes"] == 0 and f["components"] == 0 and f["log10_paths"] == 0
    assert all(math.isnan(f[k]) for k in ("density", "avg_shortest_path", "clustering",
                                          "modularity"))


# -- fit_outputs stops at the first non-finite step ---------------------------------------


class NaNAfter(nn.Module):
    """A teacher whose outputs turn NaN from call ``bad`` on."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls, self.bad = 0, bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.fc(x)
        return y * math.nan if self.calls >= self.bad else y


def test_fit_outputs_stops_at_the_first_step_that_leaves_a_weight_nan():
    """NaN weights were found only after the last step (and the NaN student kept); now the
    step is named, no later step runs and the student is as it was before fitting."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 4), NaNAfter(bad=3)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=r"lr=0\.01: .*not finite.*at step 3 of 20.*left as "
                                         r"it was"):
        fit_outputs(student, teacher, [torch.randn(2, 4)], steps=20, lr=0.01, seed=0)
    assert teacher.calls == 3
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_fit_outputs_restores_the_student_on_a_later_data_error():
    """Any refusal, not only the first step's, leaves the student as it was."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 4), nn.Linear(4, 4)
    before = copy.deepcopy(student.state_dict())
    inputs = [torch.randn(2, 4)] * 3 + [torch.randn(2, 5)]
    with pytest.raises(ValueError, match="data: the model cannot run"):
        fit_outputs(student, teacher, inputs, steps=8, lr=0.01, seed=0)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_relufy_with_a_diverging_lr_names_the_step():
    with pytest.raises(ValueError, match=r"lr=1e\+12.*not finite.*at step \d of 3"):
        moe.relufy(tiny_llama(), DATA, steps=3, lr=1e12)


# -- hostile inputs to sparsekit.sae -------------------------------------------------------


def test_batchtopk_training_forward_of_no_rows_is_empty_not_a_zero_division():
    """batchtopk over a batch of 0 rows divided by the 0 entries while estimating its
    threshold (ZeroDivisionError), in forward and in resample."""
    from sparsekit.sae import SAE, resample
    from sparsekit.sae.activations import largest

    sae = SAE(8, 16, "batchtopk", k=4).train()
    assert sae(torch.randn(0, 8)).shape == (0, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:3] = True
    assert resample(sae, torch.randn(0, 8), dead).numel() == 0
    values, indices = largest(torch.empty(0), 0)
    assert values.shape == indices.shape == (0,)
    flat = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for count in (1, 100, 999, 1000):  # unchanged: the count largest, exactly
        assert torch.equal(largest(flat, count)[0].sort().values,
                           flat.topk(count).values.sort().values)


def test_resample_refuses_a_generator_that_is_not_one_before_changing_anything():
    from sparsekit._checks import ArgumentTypeError
    from sparsekit.sae import SAE, resample

    sae = SAE(8, 16, k=4)
    before = copy.deepcopy(sae.state_dict())
    dead = torch.ones(16, dtype=torch.bool)
    with pytest.raises(ArgumentTypeError, match="generator must be a torch.Generator or None, "
                                                "got int"):
        resample(sae, torch.randn(5, 8), dead, generator=3)
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"x": torch.randn(0, 8)}, ValueError, r"x must hold at least one row of width 8, got "
                                           r"shape \(0, 8\)"),
    ({"sparsity_coef": -1.0}, ValueError, "sparsity_coef must be a finite float ≥ 0, got -1.0"),
    ({"sparsity_coef": math.nan}, ValueError, "sparsity_coef must be a finite float ≥ 0"),
    ({"aux_coef": "x"}, TypeError, "aux_coef must be a finite float ≥ 0, got 'x'"),
    ({"dead": torch.ones(3, dtype=torch.bool)}, ValueError,
     r"dead must be a bool tensor of shape \(16,\), got torch.bool \(3,\)"),
    ({"dead": torch.ones(16)}, ValueError, r"dead must be a bool tensor .*torch.float32"),
    ({"dead": [True] * 16}, ValueError, "dead must be a bool tensor .*got list"),
    ({"sae": "sae"}, TypeError, "sae must be a sparsekit.sae.SAE, got str"),
])
@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_objective_checks_every_argument_before_recording_firing(kwargs, error, match,
                                                                 activation):
    """0 rows gave NaN terms; a negative or NaN coefficient a loss that rewards codes (or
    NaN); a bad ``dead`` a bare RuntimeError or AttributeError (TopK) or nothing at all
    (JumpReLU, L1), after the SAE had recorded the batch's firing."""
    from sparsekit.sae import SAE, objective

    sae = SAE(8, 16, activation, k=4).train()
    before = sae.tokens_since_fired.clone()
    with pytest.raises(error, match=match):
        objective(**{"sae": sae, "x": torch.randn(5, 8), **kwargs})
    assert torch.equal(sae.tokens_since_fired, before)
    assert objective(sae, torch.randn(5, 8), dead=torch.ones(16, dtype=torch.bool))["loss"] \
        .isfinite()


# -- hostile inputs to the moe routers -----------------------------------------------------


def test_routers_name_inputs_of_the_wrong_width():
    """A Router or LowRankRouter called on inputs of the wrong width was a bare matmul
    RuntimeError."""
    from sparsekit.moe import LowRankRouter, Router

    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\) \(the router's "
                                         r"features\), got \(2, 5\)"):
        Router(4, 3, 2)(torch.randn(2, 5))
    low = LowRankRouter(torch.randn(8, 1, 4), None, torch.ones(8), torch.relu,
                        torch.randn(10, 4), rank=2, unit_size=2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 4\)"):
        low(torch.randn(2, 5))
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        low([[0.0] * 4])
    assert low(torch.randn(3, 4)).shape == (3, 4)


@pytest.mark.parametrize("change, error, match", [
    ({"norms": torch.ones(3)}, ValueError, r"norms must be \(8,\) \(one per neuron"),
    ({"b_in": torch.ones(3)}, ValueError, r"b_in must be None or \(8, 1\)"),
    ({"x": [[1.0] * 4]}, TypeError, "x must be a tensor, got list"),
    ({"w_in": torch.full((8, 1, 4), math.nan)}, ValueError, "w_in must be finite, got 32"),
])
def test_low_rank_router_checks_its_tensors(change, error, match):
    """Norms or biases of the wrong shape were accepted and failed at every forward; a
    list a bare AttributeError; NaN writers a LinAlgError from the SVD."""
    from sparsekit.moe import LowRankRouter

    args = {"w_in": torch.randn(8, 1, 4), "b_in": None, "norms": torch.ones(8),
            "act": torch.relu, "x": torch.randn(10, 4)} | change
    with pytest.raises(error, match=match):
        LowRankRouter(**args, rank=2, unit_size=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"x": torch.randn(0, 4), "mass": torch.randn(0, 4)}, r"x must be \(T, 4\) FFN inputs, "
                                                          r"T ≥ 1, got \(0, 4\)"),
    ({"lr": math.nan}, "lr must be a positive finite float, got nan"),
    ({"lr": 0.0}, "lr must be a positive finite float, got 0.0"),
])
def test_low_rank_router_refine_checks_before_changing_anything(kwargs, match):
    """No rows was a bare RuntimeError from randint; a NaN lr torch's error after the
    factors had been made to require grad, which they kept."""
    from sparsekit.moe import LowRankRouter

    low = LowRankRouter(torch.randn(8, 1, 4), None, torch.ones(8), torch.relu,
                        torch.randn(10, 4), rank=2, unit_size=2)
    before = copy.deepcopy(low.state_dict())
    with pytest.raises(ValueError, match=match):
        low.refine(**{"x": torch.randn(5, 4), "mass": torch.rand(5, 4), **kwargs}, steps=1)
    assert all(torch.equal(before[k], v) for k, v in low.state_dict().items())
    assert not any(t.requires_grad for t in low.buffers())


# -- capture and loss_recovered name the argument the model cannot take -------------------


@pytest.mark.parametrize("inputs", [DATA.float(), DATA[:, :0]], ids=["float-ids", "no-tokens"])
@pytest.mark.parametrize("call", ["capture", "loss_recovered"])
def test_capture_and_loss_recovered_name_inputs_the_model_cannot_run_on(inputs, call):
    """Float token ids or sequences of no tokens were a bare RuntimeError from inside the
    model; now a ValueError naming inputs, with the model's message, and no hook left."""
    from sparsekit.sae import SAE, capture, loss_recovered

    model = tiny_llama()
    with pytest.raises(ValueError, match="^inputs: the model cannot run on this batch: "):
        if call == "capture":
            list(capture(model, "model.layers.0.mlp", inputs))
        else:
            loss_recovered(model, "model.layers.0.mlp", SAE(32, 64, k=4), inputs)
    assert not any(m._forward_hooks for m in model.modules())


def test_loss_recovered_names_an_sae_of_another_width():
    """The SAE's own 'x must have shape (..., 16)' came out of the model's forward pass
    without saying that sae was the argument at fault."""
    from sparsekit.sae import SAE, loss_recovered

    model = tiny_llama()
    with pytest.raises(ValueError, match=r"^sae: it cannot take the activations of "
                                         r"'model.layers.0.mlp': x must have shape \(\.\.\., 16\)"):
        loss_recovered(model, "model.layers.0.mlp", SAE(16, 64, k=4), DATA)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("call", [lambda m: moe.set_keep(m, 0.5), lambda m: moe.set_oracle(m),
                                  lambda m: moe.evaluate(m, DATA)],
                         ids=["set_keep", "set_oracle", "evaluate"])
def test_routed_model_functions_name_a_model_that_is_not_a_module(call):
    """set_keep and set_oracle failed with a bare AttributeError ('str' object has no
    attribute 'modules')."""
    from sparsekit._checks import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="^model must be an nn.Module, got str$"):
        call("model")
    with pytest.raises(ValueError, match="model has no RoutedFFN modules"):
        call(nn.Linear(2, 2))


def _nan_ffn_llama() -> nn.Module:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
    return model


@pytest.mark.parametrize("build", [
    lambda m: moe.moefy(m, DATA, experts=8, steps=1, rank=4),
    lambda m: moe.moefy(m, DATA, experts=8, steps=1, rank=4, router="lowrank"),
    lambda m: moe.contextual(m, DATA, keep=0.5, steps=1, rank=4),
], ids=["moefy", "moefy-lowrank", "contextual"])
def test_routed_builds_refuse_ffns_whose_neuron_values_are_not_finite(build):
    """A NaN FFN weight gave a router fitted to noise without an error (router="mlp") or
    'w_in must be finite', an argument the caller never passed (router="lowrank")."""
    model = _nan_ffn_llama()
    with pytest.raises(ValueError, match=r"^model: the values FFN 'model.layers.0' computes from "
                                         r"finite calibration inputs must be finite, got 64 "
                                         r"NaN or inf"):
        build(model)


def test_head_predictors_refuse_attention_rows_that_are_not_finite():
    """A predictor was trained and measured on NaN rows without an error."""
    with pytest.raises(ValueError, match=r"^calibration: the values the attention of block "
                                         r"'model.layers.1' reads on it .*must be finite"):
        moe.head_predictors(_nan_ffn_llama(), DATA, DATA, steps=1, rank=4)
