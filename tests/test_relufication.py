"""ReLU-fication: sparsekit.moe.relufy and its distillation loss."""

import copy

import pytest
import torch
from torch import nn

from sparsekit import moe
from sparsekit.moe.distillation import distillation_loss
from sparsekit.moe.ffn import find_ffns, set_activation

transformers = pytest.importorskip("transformers")

from test_moefication import tiny_bert, tiny_llama  # noqa: E402 (needs transformers)

DATA = list(torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)).split(2))
HELD_OUT = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))


def loss(model: nn.Module, original: nn.Module, tokens: torch.Tensor = HELD_OUT) -> float:
    with torch.no_grad():
        return float(distillation_loss(model(tokens), original(tokens)))


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_relufy_makes_every_ffn_neuron_exactly_zero_where_its_pre_activation_is_negative(make):
    relu = moe.relufy(make(), DATA, steps=2)
    layers = find_ffns(relu)
    assert all(isinstance(f.act, nn.ReLU) for f in layers)
    seen = {}

    def keep(name):
        def hook(_m, args, out):
            seen[name] = (args[0], out)
        return hook

    gate = relu.get_submodule(layers[0].writers[0])  # LLaMA's gate_proj, BERT's dense
    reader = relu.get_submodule(layers[0].reader)
    handles = [gate.register_forward_hook(keep("gate")), reader.register_forward_hook(keep("h"))]
    with torch.no_grad():
        relu(HELD_OUT)
    for h in handles:
        h.remove()
    pre, neurons = seen["gate"][1], seen["h"][0]
    negative = pre <= 0
    assert 0.3 < negative.float().mean() < 0.7
    assert torch.all(neurons[negative] == 0)
    assert torch.all(neurons[~negative] != 0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_relufy_distils_toward_the_original_on_held_out_inputs(make):
    model = make()
    swapped = moe.relufy(model, DATA, steps=0)
    tuned = moe.relufy(model, DATA, steps=40, lr=3e-4)
    before, after = loss(swapped, model), loss(tuned, model)
    assert before > 0
    assert after < 0.5 * before
    assert loss(model, model) == 0


def zeros(model: nn.Module, tokens: torch.Tensor = HELD_OUT) -> float:
    """Fraction of the FFN activations (the ReLU outputs) that are exactly zero."""
    outs = []
    handles = [f.act.register_forward_hook(lambda _m, _x, out: outs.append(out))
               for f in find_ffns(model)]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return float(torch.cat([o.flatten() for o in outs]).eq(0).float().mean())


def test_relufy_l1_makes_the_activations_sparser_while_still_distilling():
    model = tiny_bert()
    swapped = moe.relufy(model, DATA, steps=0)
    plain = moe.relufy(model, DATA, steps=40, lr=3e-4)
    sparse = moe.relufy(model, DATA, steps=40, lr=3e-4, l1=0.01)
    assert zeros(sparse) > zeros(plain) + 0.1
    assert loss(sparse, model) < 0.5 * loss(swapped, model)
    torch.testing.assert_close(moe.relufy(model, DATA, steps=40, lr=3e-4, l1=0.0).state_dict(),
                               plain.state_dict())


def test_relufy_l1_penalises_the_gate_of_a_gated_ffn():
    model = tiny_llama()
    plain = moe.relufy(model, DATA, steps=40, lr=3e-4)
    assert zeros(moe.relufy(model, DATA, steps=40, lr=3e-4, l1=0.1)) > zeros(plain) + 0.05


def test_relufy_leaves_the_model_untouched_and_returns_a_copy_in_its_modes():
    model = tiny_bert().train()
    model.encoder.layer[0].eval()
    before = copy.deepcopy(model.state_dict())
    acts = [type(f.act) for f in find_ffns(model)]
    relu = moe.relufy(model, DATA, steps=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(f.act) for f in find_ffns(model)] == acts and nn.ReLU not in acts
    assert [m.training for m in relu.modules()] == [m.training for m in model.modules()]
    assert all(p.grad is None for p in (*model.parameters(), *relu.parameters()))
    assert not torch.equal(relu.encoder.layer[0].intermediate.dense.weight,
                           model.encoder.layer[0].intermediate.dense.weight)


def test_relufy_then_moefy_with_every_expert_computes_the_relufied_model():
    relu = moe.relufy(tiny_llama(), DATA, steps=2)
    routed = moe.moefy(relu, DATA, experts=4, keep=1.0, steps=5)
    with torch.no_grad():
        torch.testing.assert_close(routed(HELD_OUT).logits, relu(HELD_OUT).logits)


def test_distillation_loss_on_logits_is_the_kl_divergence_and_on_states_the_relative_error():
    class Out:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    p, q = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    kl = (q.softmax(-1) * (q.log_softmax(-1) - p.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(Out(logits=p), Out(logits=q)), kl)
    target = torch.ones(2, 3, 4)
    assert float(distillation_loss(Out(last_hidden_state=target * 1.5),
                                   Out(last_hidden_state=target))) == pytest.approx(0.25)
    assert float(distillation_loss(target * 0.5, target)) == pytest.approx(0.25)
    with pytest.raises(TypeError, match="neither logits nor last_hidden_state"):
        distillation_loss(Out(pooler_output=target), Out(pooler_output=target))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"steps": -1}, ValueError, "steps must be an int ≥ 0, got -1"),
    ({"steps": 1.5}, TypeError, "steps must be an int"),
    ({"steps": True}, TypeError, "steps must be an int"),
    ({"lr": 0.0}, ValueError, "lr must be a positive finite float, got 0.0"),
    ({"lr": float("nan")}, ValueError, "lr must be a positive finite float, got nan"),
    ({"lr": "1e-4"}, TypeError, "lr must be a positive finite float, got '1e-4'"),
    ({"lr": True}, TypeError, "lr must be a positive finite float, got True"),
    ({"seed": 0.5}, TypeError, "seed must be an int"),
    ({"l1": -0.1}, ValueError, "l1 must be a finite float ≥ 0, got -0.1"),
    ({"l1": float("inf")}, ValueError, "l1 must be a finite float ≥ 0, got inf"),
    ({"l1": "0.1"}, TypeError, "l1 must be a finite float ≥ 0, got '0.1'"),
    ({"l1": True}, TypeError, "l1 must be a finite float ≥ 0, got True"),
    ({"l1": 0.1, "steps": 0}, ValueError, "l1=0.1 needs steps > 0"),
    ({"data": None}, ValueError, "data must be a tensor of inputs"),
    ({"data": []}, ValueError, "data holds no"),
    ({"data": 3}, TypeError, "data must be a tensor"),
    ({"data": torch.randn(2, 4, 4)}, ValueError, "data: the model cannot run"),
])
def test_relufy_refuses_bad_arguments_and_leaves_the_model_untouched(kwargs, error, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        moe.relufy(model, **{"data": DATA, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not isinstance(f.act, nn.ReLU) for f in find_ffns(model))


def test_relufy_refuses_models_it_cannot_relufy():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        moe.relufy("bert", DATA)
    with pytest.raises(ValueError, match="model"):
        moe.relufy(nn.Linear(4, 4), DATA)
    frozen = tiny_bert().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        moe.relufy(frozen, DATA, steps=1)
    assert isinstance(find_ffns(moe.relufy(frozen, DATA, steps=0))[0].act, nn.ReLU)


def test_set_activation_replaces_one_ffns_activation_in_its_holders_mode():
    model = tiny_bert().train()
    first, second = find_ffns(model)
    model.encoder.layer[0].intermediate.eval()
    set_activation(model, first, nn.Tanh())
    act = model.encoder.layer[0].intermediate.intermediate_act_fn
    assert isinstance(act, nn.Tanh) and not act.training
    assert isinstance(find_ffns(model)[0].act, nn.Tanh)
    assert type(find_ffns(model)[1].act) is type(second.act)
