"""Sparse model soups (Zimmer et al. 2024): average models that share one mask."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.targets import resolve_targets


@torch.no_grad()
def soup(models: Sequence[nn.Module]) -> nn.Module:
    """A new model whose floating tensors are the mean of ``models``' tensors.

    The models must share their sparsity mask (the nonzero pattern of every target
    weight); the average of weights that are zero in every model is zero, so the soup
    keeps the mask. Raises ``ValueError`` when masks or architectures differ or
    ``models`` is empty, an :class:`~sparsekit._checks.ArgumentTypeError` when it is not
    a sequence of ``nn.Module`` (one model, a state dict).
    """
    models = _check_models(models)
    states = [m.state_dict() for m in models]
    keys = set(states[0])
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != keys or any(sd[k].shape != states[0][k].shape for k in keys):
            raise ValueError(f"models[{i}] has a different architecture than models[0]")
    for t in resolve_targets(models[0]):
        ref = states[0][t.name] != 0
        for i, sd in enumerate(states[1:], 1):
            if not torch.equal(sd[t.name] != 0, ref):
                raise ValueError(
                    f"models[{i}] has a different mask than models[0] for {t.name!r}; "
                    "a sparse soup needs one shared mask"
                )
    out = copy.deepcopy(models[0])
    averaged = {
        k: torch.stack([sd[k] for sd in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    out.load_state_dict(averaged)
    return out


_ACCEPTED = "a non-empty sequence (list, tuple) of nn.Module sharing one mask, e.g. [a, b]"


def _check_models(models: object) -> list[nn.Module]:
    """``models`` as a list, checked to be a non-empty sequence of ``nn.Module`` (an
    ``nn.ModuleList`` is one). A single model is refused by name: an ``nn.Sequential`` is
    itself a sequence of modules, and its layers were averaged as if they were the models
    ("models[1] has a different architecture than models[0]")."""
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise ArgumentTypeError(f"models must be {_ACCEPTED}, got one model "
                                f"({type(models).__name__}); pass a list of the models to "
                                "average")
    if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, Iterable):
        raise ArgumentTypeError(f"models must be {_ACCEPTED}, got {type(models).__name__}")
    given, models = models, list(models)
    if not models:
        raise ValueError(f"models must be {_ACCEPTED}, got {given!r}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            kind = "a state dict" if isinstance(m, Mapping) else type(m).__name__
            raise ArgumentTypeError(f"models[{i}] must be an nn.Module (models must be "
                                    f"{_ACCEPTED}), got {kind}")
    return models
