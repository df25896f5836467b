"""A model's state before a call that must fail, and whether the call left it so."""

from __future__ import annotations

import os
import stat

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model.state_dict()``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether ``model`` holds exactly the tensors of ``before`` (a :func:`snapshot`); a NaN
    planted before the call counts as unchanged where it still is NaN."""
    after = model.state_dict()
    return after.keys() == before.keys() and all(_same(after[k], v) for k, v in before.items())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and (
        torch.equal(a, b)
        or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


def record_durability(monkeypatch) -> list[str]:  # noqa: ANN001
    """Record, in order, every fsync (of a file or of a directory) and rename: the events
    an atomic write must produce as "fsync file", "rename", "fsync dir"."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(*args: object) -> None:
        events.append("rename")
        real_replace(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
