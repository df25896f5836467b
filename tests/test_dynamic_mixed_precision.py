"""DynamicSparsity in the mixed-precision loop: a step a GradScaler skipped is no step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit import DynamicSparsity


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def scaled_step(model, opt, scaler, overflow: bool = False) -> None:
    opt.zero_grad()
    loss = model(torch.randn(4, 8)).pow(2).mean()
    scaler.scale(loss).backward()
    if overflow:  # what fp16 autocast gives when the scaled loss overflows
        model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("method", ["rigl", "srigl", "granet"])
def test_update_waits_for_the_step_a_grad_scaler_skipped(method):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"initial_sparsity": 0.2} if method == "granet" else {}
    ds = DynamicSparsity(model, opt, 0.5, method=method, every=2, end_step=10, **kwargs)
    scaler = torch.amp.GradScaler("cpu")
    scaled_step(model, opt, scaler)
    assert ds.step() is False and ds.step_count == 1
    masks = {n: m.clone() for n, m in ds.masks.masks.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaled_step(model, opt, scaler, overflow=True)  # skipped: the weights did not move
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert ds.step() is False  # no raise ("needs the dense gradient"), nothing changed
    assert ds.step_count == 1
    assert all(torch.equal(ds.masks.masks[n], m) for n, m in masks.items())
    scaled_step(model, opt, scaler)  # the next step that runs makes the update
    assert ds.step() is True and ds.step_count == 2


def test_a_step_without_optimizer_step_is_still_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.5, method="rigl", every=2, end_step=10)
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    ds.step()
    model(torch.randn(4, 8)).pow(2).mean().backward()  # finite gradients, no optimizer step
    with pytest.raises(RuntimeError, match="needs the dense gradient"):
        ds.step()
    assert ds.step_count == 1
