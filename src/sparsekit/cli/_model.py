"""Rebuild the model a checkpoint belongs to (shared by the commands)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from torch import nn

from sparsekit import checkpoint
from sparsekit.models import MODELS, create_model


def model_for(ckpt: str | Path, spec: str | None) -> nn.Module:
    """The architecture for ``ckpt``: ``spec`` if given, else the one recorded in its header.

    ``spec`` is a registered model name (``lenet_300_100``) or ``module:factory``.
    """
    if spec is None:
        recorded = checkpoint.read(ckpt).meta.get("model")
        if recorded is None:
            raise ValueError(
                f"{ckpt} does not record its architecture; pass --model NAME or module:factory "
                f"(registered names: {', '.join(MODELS.names())})"
            )
        cfg = json.loads(recorded)
        return create_model(cfg["name"], **cfg.get("kwargs", {}))
    if ":" not in spec:
        return create_model(spec)
    module_name, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module_name), attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model
