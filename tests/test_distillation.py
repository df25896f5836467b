"""Distillation with the routing in place: sparsekit.moe.distil."""

import copy

import pytest
import torch
from torch import nn

from sparsekit import moe
from sparsekit.moe.distillation import _Trainable, distillation_loss

transformers = pytest.importorskip("transformers")

from test_moefication import CALIBRATION, tiny_bert, tiny_llama  # noqa: E402

DATA = list(torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(3)).split(2))
HELD_OUT = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(4))


def loss(model: nn.Module, teacher: nn.Module) -> float:
    with torch.no_grad():
        return float(distillation_loss(model(HELD_OUT), teacher(HELD_OUT)))


def routed_layers(model: nn.Module) -> list[moe.RoutedFFN]:
    return [m for m in model.modules() if isinstance(m, moe.RoutedFFN)]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_distil_recovers_the_teachers_outputs_with_the_routing_in_place(make):
    teacher = make()  # routed on its ReLU swap, as MoEfication prepares GELU and SiLU models
    routed = moe.moefy(moe.relufy(teacher, DATA, steps=0), CALIBRATION, experts=8, keep=0.25,
                       steps=20)
    before = state(routed)
    tuned = moe.distil(routed, teacher, DATA, steps=60, lr=3e-4)
    assert loss(tuned, teacher) < 0.7 * loss(routed, teacher)
    assert all(torch.equal(before[k], v) for k, v in routed.state_dict().items())
    for old, new in zip(routed_layers(routed), routed_layers(tuned), strict=True):
        assert (new.k, new.hot, new.unit_size, new.oracle) == (old.k, old.hot, old.unit_size,
                                                                 old.oracle)
        assert torch.equal(new.order, old.order)
        assert all(torch.equal(a, b) for a, b in zip(  # the routers are not trained
            old.router.state_dict().values(), new.router.state_dict().values(), strict=True))
        assert not torch.equal(new.w_in, old.w_in)


@pytest.mark.parametrize("build", [
    lambda m: moe.moefy(m, CALIBRATION, experts=8, keep=0.25, steps=5),
    lambda m: moe.moefy(m, CALIBRATION, experts=8, keep=0.25, steps=5, router="lowrank", rank=8),
    lambda m: moe.contextual(m, CALIBRATION, keep=0.4, hot=0.1, steps=5),
])
@pytest.mark.parametrize("oracle", [False, True])
def test_the_trained_computation_is_the_routed_one_and_builds_it_back(build, oracle):
    layer = build(tiny_llama()).model.layers[1].mlp
    layer.oracle = oracle
    trainable = _Trainable(layer)
    x = torch.randn(5, 3, 32)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(trainable(x), expected)
        rebuilt = trainable.routed()
        torch.testing.assert_close(rebuilt(x), expected)
        torch.testing.assert_close(rebuilt(x[:1, :1]), expected[:1, :1])  # the decode path
    assert rebuilt.oracle is oracle and torch.equal(rebuilt.w_in, layer.w_in)


def test_only_the_neurons_a_row_ran_get_a_gradient():
    layer = moe.moefy(tiny_llama(), CALIBRATION, experts=8, keep=0.25, steps=5).model.layers[0].mlp
    trainable = _Trainable(layer)
    x = torch.randn(1, 32)
    trainable(x).square().sum().backward()
    with torch.no_grad():
        chosen = layer.neuron_mask(layer.chosen(x), torch.float32)[0].bool()
    rows = trainable.w_in.grad.flatten(1).abs().sum(1)
    columns = trainable.w_out.grad.abs().sum(0)
    assert chosen.sum() == 16
    assert torch.all(rows[chosen] > 0) and torch.all(rows[~chosen] == 0)
    assert torch.all(columns[chosen] > 0) and torch.all(columns[~chosen] == 0)


def test_distil_refuses_bad_arguments_and_leaves_the_model_untouched():
    teacher = tiny_llama()
    routed = moe.moefy(teacher, CALIBRATION, experts=8, keep=0.25, steps=5)
    before = state(routed)
    with pytest.raises(ValueError, match="no RoutedFFN modules"):
        moe.distil(teacher, teacher, DATA)
    with pytest.raises(TypeError, match="teacher must be an nn.Module, got str"):
        moe.distil(routed, "teacher", DATA)
    with pytest.raises(ValueError, match="steps"):
        moe.distil(routed, teacher, DATA, steps=0)
    with pytest.raises(ValueError, match="lr must be a positive finite float, got -1"):
        moe.distil(routed, teacher, DATA, lr=-1.0)
    with pytest.raises(ValueError, match="data holds no"):
        moe.distil(routed, teacher, [])
    assert all(torch.equal(before[k], v) for k, v in routed.state_dict().items())
    moe.distil(routed, copy.deepcopy(teacher), DATA, steps=1)  # and it still trains
