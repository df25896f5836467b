"""ActivationSparsity: calibrated per-layer input thresholds, installed as forward pre-hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsekit.engine.activation_linear import check_threshold, sparsify_input, thresholded_layers

__all__ = ["ActivationSparsity"]


@dataclass(eq=False)
class ActivationSparsity:
    """Per-layer thresholds on the inputs of ``nn.Linear`` layers, from :func:`calibrate`.

    ``thresholds[name]`` holds one float32 threshold on ``|x_j|`` per input feature of layer
    ``name``; ``sparsities[name]`` is the fraction of inputs it zeroes on the calibration data
    and ``sizes[name]`` the layer's weight count, which weighs it in :meth:`model_sparsity`.
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
        for name, threshold in self.thresholds.items():
            check_threshold(f"thresholds[{name!r}]", threshold)
        extra = sorted(set(self.sparsities) - set(self.sizes))
        if extra:
            raise ValueError(f"sparsities names layers {extra} that sizes has no weight count for")

    def apply(self, model: nn.Module) -> ActivationSparsity:
        """Threshold the inputs of the calibrated layers of ``model`` (by module name)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if self._handles:
            raise RuntimeError("ActivationSparsity is already applied; call remove() first")
        modules = thresholded_layers(self.thresholds, model)  # every check before a hook
        self._counts = {n: [0, 0] for n in self.thresholds}
        for name, threshold in self.thresholds.items():
            module = modules[name]
            device = next(module.parameters(), threshold).device
            hook = self._hook(name, threshold.to(device))
            self._handles.append(module.register_forward_pre_hook(hook))
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
        per_layer = self.sparsities if per_layer is None else per_layer
        unknown = sorted(set(per_layer) - set(self.sizes))
        if unknown:
            raise ValueError(f"per_layer names layers {unknown} that were not calibrated; "
                             f"calibrated layers: {sorted(self.sizes)}")
        total = sum(self.sizes[n] for n in per_layer)
        return sum(s * self.sizes[n] for n, s in per_layer.items()) / max(total, 1)

    def _hook(self, name: str, threshold: torch.Tensor) -> Callable[..., tuple[Any, ...]]:
        counts = self._counts[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = sparsify_input(args[0], threshold)
            counts[0] += int((x == 0).sum())
            counts[1] += x.numel()
            return (x, *args[1:])

        return hook

