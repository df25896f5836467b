"""The reference training helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsekit
from sparsekit.training import accuracy, inference, minibatches, train_epoch


def test_inference_restores_every_modules_own_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model[1].eval()  # a submodule in a mode different from its root's
    other = nn.Linear(3, 1).eval()
    with inference(model, other):
        assert not any(m.training for m in [*model.modules(), *other.modules()])
        assert not torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == [True, True, False]
    assert not other.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), inference(model):
        raise RuntimeError("restored on errors too")
    assert model.training and not model[1].training


def test_accuracy_restores_every_modules_own_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5))
    model[1].eval()  # accuracy used to put every submodule back into the root's mode
    data = TensorDataset(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    accuracy(model, data, batch_size=2)
    assert [m.training for m in model.modules()] == [True, True, False]


def test_minibatches_and_the_deprecated_name() -> None:
    data = TensorDataset(torch.arange(5.0), torch.arange(5))
    assert [x.tolist() for x, _ in minibatches(data, 2)] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    shuffled = torch.cat([x for x, _ in minibatches(data, 2, shuffle=True, seed=1)])
    assert sorted(shuffled.tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.warns(DeprecationWarning, match="minibatches"):
        from sparsekit.training import batches
    assert batches is minibatches


def test_train_epoch_learns_keeps_the_masks_and_calls_on_step() -> None:
    # a linearly separable task: a few epochs of the plain loop fit it, the attached masks
    # keep the pruned weights at zero through every Adam step, and the mean loss falls
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    data = TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    masks = sparsekit.prune(model, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    masks.attach(optimizer)
    steps = []
    losses = [train_epoch(model, data, optimizer, batch_size=32, seed=e,
                          on_step=lambda: steps.append(1)) for e in range(10)]
    assert len(steps) == 10 * 8 and model.training
    assert losses[-1] < 0.5 * losses[0] and accuracy(model, data) > 0.9
    for name, mask in masks.masks.items():
        assert not masks.params[name][~mask].any()
