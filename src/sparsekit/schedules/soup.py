"""Sparse model soups (Zimmer et al. 2024): average models that share one mask."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from sparsekit.targets import resolve_targets


@torch.no_grad()
def soup(models: Sequence[nn.Module]) -> nn.Module:
    """A new model whose floating tensors are the mean of ``models``' tensors.

    The models must share their sparsity mask (the nonzero pattern of every target
    weight); the average of weights that are zero in every model is zero, so the soup
    keeps the mask. Raises ``ValueError`` when masks or architectures differ.
    """
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be a non-empty sequence of nn.Module")
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
