"""ActivationSparsity: calibrated per-layer input thresholds, installed as forward pre-hooks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsekit import checkpoint
from sparsekit._checks import (
    ArgumentTypeError,
    check_fraction,
    check_int,
    check_materialized,
    check_module,
)
from sparsekit.activation.allocation import ALLOCATIONS
from sparsekit.activation.scores import METHODS
from sparsekit.engine.activation_linear import (
    THRESHOLD_MARK,
    applied_layers,
    check_threshold,
    sparsify_input,
    thresholded_layers,
)
from sparsekit.observe import LayerCall, layer_input

__all__ = ["ActivationSparsity"]

KIND = "activation_sparsity"
"""The header ``kind`` of a file written by :meth:`ActivationSparsity.save`."""



@dataclass(eq=False)
class ActivationSparsity:
    """Per-layer thresholds on the inputs of ``nn.Linear`` layers, from :func:`calibrate`.

    ``thresholds[name]`` holds one float32 threshold on ``|x_j|`` per input feature of layer
    ``name``; ``sparsities[name]`` is the fraction of inputs it zeroes on the calibration data
    (inputs that are zero already included: a ReLU layer's may exceed ``target``) and
    ``sizes[name]`` the layer's weight count, which weighs it in :meth:`model_sparsity`.
    :meth:`apply` installs ``x -> x * (|x| >= threshold)`` in front of each layer; the model's
    parameters and buffers are never touched, so :meth:`remove` restores it exactly.
    """

    method: str
    allocation: str
    target: float
    sparsities: dict[str, float]
    thresholds: dict[str, torch.Tensor] = field(repr=False)
    sizes: dict[str, int] = field(repr=False)
    _handles: list[RemovableHandle] = field(default_factory=list, init=False, repr=False)
    _counts: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name, value, what in (("thresholds", self.thresholds, "tensor"),
                                  ("sparsities", self.sparsities, "float"),
                                  ("sizes", self.sizes, "int")):
            if not isinstance(value, Mapping):
                raise ArgumentTypeError(f"{name} must be a mapping of layer name to {what}, got "
                                        f"{type(value).__name__}")
        for name, value, known in (("method", self.method, METHODS),
                                   ("allocation", self.allocation, ALLOCATIONS)):
            if not isinstance(value, str):  # repr and saves showed any object as the method
                raise ArgumentTypeError(f"{name} must be one of {list(known)}, got {value!r}")
            if value not in known:
                raise ValueError(f"{name} must be one of {list(known)}, got {value!r}")
        check_fraction("target", self.target)  # NaN was kept as the model-wide target
        for name, threshold in self.thresholds.items():
            if isinstance(threshold, torch.Tensor):  # comparing one was a raw RuntimeError
                check_materialized(f"thresholds[{name!r}]", threshold)
            check_threshold(f"thresholds[{name!r}]", threshold)
        _check_fractions("sparsities", self.sparsities)
        for name, size in self.sizes.items():
            check_int(f"sizes[{name!r}]", size, minimum=0)
        for field_name in ("sparsities", "thresholds"):
            extra = sorted(set(getattr(self, field_name)) - set(self.sizes))
            if extra:
                raise ValueError(f"{field_name} names layers {extra} that sizes has no weight "
                                 "count for")

    def __getstate__(self) -> dict[str, Any]:
        """The state to pickle (``torch.save``) or deep-copy, without the hook handles: the
        hooks belong to the model this object was applied to (and cannot be pickled), so a
        copy starts unapplied; the thresholds and :meth:`stats` so far are kept."""
        return {**vars(self), "_handles": []}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the thresholds and settings to ``path`` (a sealed safetensors checkpoint of
        :func:`sparsekit.save`, written atomically; nothing pickled) and return the path;
        :meth:`load` reads them back bit-identically. Neither the hooks (they belong to the
        model this is applied to) nor :meth:`stats` are saved. Thresholds applied with
        hooks are runtime state, which :func:`sparsekit.save_pretrained` does not store
        (:func:`sparsekit.compile` keeps them in its activation-sparse layers)."""
        settings = {"method": self.method, "allocation": self.allocation,
                    "target": self.target, "sparsities": self.sparsities, "sizes": self.sizes}
        holder = checkpoint.tensor_holder(
            {n: torch.as_tensor(t, dtype=torch.float32) for n, t in self.thresholds.items()})
        return checkpoint.save(holder, path, metadata={"kind": KIND,
                                                       "settings": json.dumps(settings)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationSparsity:
        """The :class:`ActivationSparsity` :meth:`save` wrote to ``path`` (checked as
        :func:`sparsekit.load` checks a file, and then as the constructor checks its
        arguments), not applied."""
        meta = checkpoint.read_metadata(path)
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} is not a file written by ActivationSparsity.save (its "
                             f"header kind is {meta.get('kind')!r})")
        try:
            settings = json.loads(meta.get("settings", ""))
        except json.JSONDecodeError:
            settings = None
        keys = {"method", "allocation", "target", "sparsities", "sizes"}
        if not isinstance(settings, dict) or set(settings) != keys:
            raise ValueError(f"{path}: its header's settings are not those "
                             f"ActivationSparsity.save writes (a JSON object of {sorted(keys)})")
        state = checkpoint.read(path).state
        return cls(thresholds=dict(state), **settings)

    def apply(self, model: nn.Module) -> ActivationSparsity:
        """Threshold the inputs of the calibrated layers of ``model`` (by module name)."""
        check_module("model", model)
        if self._handles:
            raise RuntimeError("ActivationSparsity is already applied; call remove() first")
        modules = thresholded_layers(self.thresholds, model)  # every check before a hook
        stacked = applied_layers(modules)
        if stacked:  # a second set of hooks thresholded the inputs twice, counted both
            raise ValueError(f"model: layers {stacked} already have activation thresholds "
                             "applied by another ActivationSparsity; remove() those first")
        self._counts = {n: [0, 0] for n in self.thresholds}
        for name, threshold in self.thresholds.items():
            module = modules[name]
            device = next(module.parameters(), threshold).device
            hook = self._hook(name, threshold.to(device))
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def remove(self) -> None:
        """Remove the thresholds: the model computes exactly what it did before :meth:`apply`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stats(self) -> dict[str, float]:
        """Realised sparsity (fraction of zero inputs) per layer since :meth:`apply`."""
        return {n: zeros / total for n, (zeros, total) in self._counts.items() if total}

    def model_sparsity(self, per_layer: dict[str, float] | None = None) -> float:
        """Size-weighted mean of ``per_layer`` (default: the calibrated :attr:`sparsities`)."""
        if per_layer is None:
            per_layer = self.sparsities
        elif not isinstance(per_layer, Mapping):
            raise ArgumentTypeError(f"per_layer must be a mapping of layer name to float, got "
                                    f"{type(per_layer).__name__}")
        else:  # a NaN came back as the model's sparsity
            _check_fractions("per_layer", per_layer)
        unknown = sorted(set(per_layer) - set(self.sizes))
        if unknown:
            raise ValueError(f"per_layer names layers {unknown} that were not calibrated; "
                             f"calibrated layers: {sorted(self.sizes)}")
        total = sum(self.sizes[n] for n in per_layer)
        return sum(s * self.sizes[n] for n, s in per_layer.items()) / max(total, 1)

    def _hook(self, name: str, threshold: torch.Tensor) -> Callable[..., LayerCall]:
        counts = self._counts[name]

        def sparsify(x: torch.Tensor) -> torch.Tensor:
            x = sparsify_input(x, threshold)
            counts[0] += int((x == 0).sum())
            counts[1] += x.numel()
            return x

        hook = input_hook(sparsify)
        setattr(hook, THRESHOLD_MARK, True)
        return hook


def input_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., LayerCall]:
    """A forward pre-hook (register it ``with_kwargs=True``) that passes the layer's input
    ``x`` (:func:`sparsekit.observe.layer_input`, the input calibration records) on as
    ``fn(x)``; a call without an input goes on unchanged, for the layer to refuse."""

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LayerCall:
        x, replace = layer_input(args, kwargs)
        return (args, kwargs) if x is None else replace(fn(x))

    return hook


def _check_fractions(name: str, values: Mapping[str, Any]) -> None:
    """Raise unless every value of ``values`` (the argument ``name``) is a sparsity, a real
    number in [0, 1] (NaN never is): 1 is a layer whose inputs were all zero."""
    for layer, value in values.items():
        check_fraction(f"{name}[{layer!r}]", value, one=True)
