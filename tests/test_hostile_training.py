"""Hostile cases for pruning and MaskSet (issue 17, items 3, 6 and 7): NaN scores, replaced
parameters, the sign of zero after coordinate-mixing optimizers, closure-based optimizers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit


def _model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32, bias=bias), nn.ReLU(), nn.Linear(32, 4, bias=bias))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def _train(model, opt, steps=20):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _revived(model, masks) -> int:
    params = dict(model.named_parameters())
    return sum(int((params[n].detach()[~m] != 0).sum()) for n, m in masks.masks.items())


def test_load_state_dict_assign_is_followed():
    model = _model()
    masks = sparsekit.prune(model, 0.8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks.attach(opt)
    _train(model, opt)
    assert _revived(model, masks) == 0


def test_conversion_that_replaces_parameters_is_followed():
    model = _model()
    masks = sparsekit.prune(model, 0.8)
    old = model[0].weight
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert model[0].weight is not old
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    masks.attach(opt)
    x, y = _data()
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        opt.step()
    assert _revived(model, masks) == 0


def test_replaced_parameter_of_another_shape_is_refused():
    model = _model()
    masks = sparsekit.prune(model, 0.8)
    model[0].weight = nn.Parameter(torch.zeros(8, 16))
    with pytest.raises(ValueError, match=r"'0\.weight' was replaced by one of shape \(8, 16\)"):
        masks.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_optimizer_without_the_masked_parameters_is_refused():
    model = _model()
    masks = sparsekit.prune(model, 0.8)
    other = _model()
    with pytest.raises(ValueError, match="optimizer holds none of the masked parameters"):
        masks.attach(torch.optim.SGD(other.parameters(), lr=0.1))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch without Muon")
def test_muon_leaves_positive_zeros_and_saves(tmp_path):
    model = _model(bias=False)
    masks = sparsekit.prune(model, 0.8)
    opt = torch.optim.Muon(model.parameters(), lr=0.05)
    masks.attach(opt)
    _train(model, opt)
    for n, p in model.named_parameters():
        masked = p.detach()[~masks.masks[n]]
        assert (masked == 0).all() and not torch.signbit(masked).any(), n
    sparsekit.save(model, tmp_path / "m.safetensors", masks)  # refused before the fix


def test_lbfgs_with_masks_converges_like_dense():
    # Before the fix LBFGS (lr 1.0, no line search) went all-NaN with masks at 50 %: its
    # closure's gradients were unmasked, so the curvature pairs saw masked coordinates.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g)
    losses = {}
    for masked in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                              nn.Linear(128, 10))
        opt = torch.optim.LBFGS(model.parameters(), lr=1.0)
        masks = sparsekit.prune(model, 0.5).attach(opt) if masked else None

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(30):
            opt.step(closure)
        losses[masked] = float(closure().detach())
        if masks is not None:
            assert _revived(model, masks) == 0
            masks.detach()
            assert not masks._grad_hooks
    assert losses[False] < 1e-3
    assert losses[True] < 1e-3, losses


@pytest.mark.parametrize("criterion", ["snip", "taylor", "taylor:accumulated", "grasp", "wanda",
                                       "magnitude"])
def test_nan_calibration_data_is_refused_and_model_untouched(criterion):
    # issue 17.3: one NaN in x made snip/taylor/grasp prune every weight
    model = _model()
    x, y = _data()
    x[3, 5] = float("nan")
    if criterion == "magnitude":
        with torch.no_grad():
            model[0].weight[2, 2] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"criterion '{criterion}' gave \d+ non-finite score"):
        sparsekit.prune(model, 0.5, method=criterion, data=(x, y))
    after = model.state_dict()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
