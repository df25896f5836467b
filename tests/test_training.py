"""The reference training helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit.training import inference


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
