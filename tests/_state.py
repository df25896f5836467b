"""A model's state before a call that must fail, and whether the call left it so."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether ``model`` holds exactly the tensors of ``before`` (a :func:`snapshot`)."""
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v)
                                                 for k, v in before.items())
