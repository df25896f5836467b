import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit.regularize import GroupEnvelope, GroupLasso, SoftThreshold, channel_norms
from sparsekit.structured import dependency_groups


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def test_channel_norms_cover_writers_biases_and_readers():
    model = _mlp()
    group = dependency_groups(model)[0]
    expected = (model[0].weight.pow(2).sum(1) + model[0].bias.pow(2)
                + model[2].weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(channel_norms(model, group), expected)


def test_group_lasso_is_the_sum_of_channel_norms_and_differentiable():
    model = _mlp()
    penalty = GroupLasso(model, 0.5)
    value = penalty()
    total = sum(channel_norms(model, g).sum() for g in dependency_groups(model))
    torch.testing.assert_close(value, 0.5 * total)
    value.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_group_envelope_leaves_the_strongest_channels_alone():
    model = _mlp()
    group = dependency_groups(model)[0]
    penalty = GroupEnvelope(model, 1.0, sparsity=0.75, groups=[group])
    norms = channel_norms(model, group).detach()
    weakest = norms.sort().values[:12]
    torch.testing.assert_close(penalty(), 0.5 * weakest.pow(2).sum())
    penalty().backward()
    strongest = norms.argsort()[-4:]
    assert model[0].weight.grad[strongest].abs().sum() == 0


def test_soft_threshold_elementwise_is_the_l1_prox():
    model = _mlp()
    before = model[0].weight.detach().clone()
    opt = SoftThreshold(torch.optim.SGD(model.parameters(), lr=0.1), 0.5)
    opt.zero_grad()
    opt.step()  # no gradients: only the proximal step
    expected = before.sign() * (before.abs() - 0.05).clamp_min(0)
    torch.testing.assert_close(model[0].weight, expected)
    assert opt.param_groups[0]["lr"] == 0.1 and "state" in opt.state_dict()


def test_group_prox_zeros_whole_channels_and_shrink_removes_them():
    model = _mlp()
    x, y = _data()
    opt = SoftThreshold(torch.optim.SGD(model.parameters(), lr=0.1), 0.1, model=model,
                        groups=dependency_groups(model))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    dead = (model[0].weight == 0).all(1) & (model[2].weight == 0).all(0)
    assert 0 < int(dead.sum()) < 16
    small = sparsekit.shrink(model)  # the weights' own zeros are the mask
    assert small[0].out_features == 16 - int(dead.sum())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_bad_arguments():
    model = _mlp()
    with pytest.raises(ValueError, match="strength must be a finite float ≥ 0, got -1"):
        GroupLasso(model, -1)
    with pytest.raises(ValueError, match="sparsity"):
        GroupEnvelope(model, 1.0, sparsity=1.5)
    with pytest.raises(ValueError, match="groups= needs model="):
        SoftThreshold(torch.optim.SGD(model.parameters(), lr=0.1), 0.1,
                      groups=dependency_groups(model))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.2}])
    with pytest.raises(ValueError, match="one learning rate"):
        SoftThreshold(opt, 0.1, model=model, groups=dependency_groups(model))
    with pytest.raises(TypeError):
        SoftThreshold("sgd", 0.1)


def _frozen_first_layer(model):
    model[0].weight.requires_grad_(False)
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


@pytest.mark.parametrize("optimizer, why", [
    (_frozen_first_layer, r"'0.weight' \(requires_grad=False\)"),
    (lambda m: torch.optim.SGD(m[2].parameters(), lr=0.1),
     r"'0.weight' \(not among the optimizer's parameters\)"),
    (lambda m: torch.optim.SGD(_mlp().parameters(), lr=0.1),  # another model's optimizer
     r"'0.weight' \(not among the optimizer's parameters\)"),
])
def test_group_prox_refuses_parameters_the_optimizer_does_not_step(optimizer, why):
    """The group mode acts on the optimizer's parameters only, as the elementwise mode does:
    it shrank frozen weights, weights left out of the optimizer and, given another model's
    optimizer, a model that was never trained."""
    model = _mlp()
    with pytest.raises(ValueError, match=rf"groups\[0\] \('[^']*'\) holds {why}, which the "
                                         "optimizer does not step"):
        SoftThreshold(optimizer(model), 0.1, model=model, groups=dependency_groups(model))


def test_group_prox_refuses_a_layer_frozen_after_it_was_built_before_stepping():
    """A parameter frozen later is refused at the step, before the optimizer moves any
    weight."""
    model = _mlp()
    opt = SoftThreshold(torch.optim.SGD(model.parameters(), lr=0.1), 0.1, model=model,
                        groups=dependency_groups(model))
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    model[2].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"holds '2.bias' \(requires_grad=False\)"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
