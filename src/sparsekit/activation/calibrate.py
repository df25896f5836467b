"""calibrate(): per-layer activation thresholds that hit a sparsity target on calibration data."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sparsekit._checks import check_int, check_seed
from sparsekit.activation.allocation import ALLOCATIONS, greedy, uniform
from sparsekit.activation.blocks import BlockError, block_groups
from sparsekit.activation.layers import find_layers
from sparsekit.activation.record import record_inputs
from sparsekit.activation.scores import METHODS, feature_threshold, score
from sparsekit.activation.sparsity import ActivationSparsity
from sparsekit.observe import batches
from sparsekit.targets import TargetSpec

__all__ = ["calibrate"]


def calibrate(
    model: nn.Module,
    calibration: Any,
    *,
    sparsity: float = 0.5,
    method: str = "teal",
    allocation: str = "uniform",
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    max_rows: int = 2048,
    seed: int = 0,
) -> ActivationSparsity:
    """Thresholds that zero a ``sparsity`` fraction of layer inputs on ``calibration``.

    ``calibration`` is a tensor of model inputs (token ids for Hugging Face models: the model
    is called as ``model(inputs)``) or a list of them. ``method`` picks the score
    (``"teal"``: ``|x|``; ``"wina"``: ``|x_j| * ||W[:, j]||``; ``"cats"``: ``|x|`` on
    down-projection inputs only) and ``allocation`` the per-layer split of the model-wide
    target (``"uniform"`` or ``"greedy"``: TEAL's block-wise search, which measures block
    output errors on the first calibration batch). ``targets`` overrides the default layers (see
    :func:`~sparsekit.activation.layers.find_layers`). At most ``max_rows`` input rows per
    layer, sampled with ``seed``, are kept to bound memory.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    check_int("max_rows", max_rows, minimum=1)
    check_seed("seed", seed)
    if calibration is None:
        raise ValueError("calibration must be a tensor of inputs or a list of them, got None")

    layers = find_layers(model, method, targets)
    generator = torch.Generator().manual_seed(seed)
    replay: list[Any] = []  # the greedy search replays the first non-empty batch
    recorded = calibration
    if allocation == "greedy" and isinstance(calibration, Iterator):
        # a one-shot iterator (a generator) is consumed by the recording: keep its first
        # non-empty batch on the way (the only one the search needs), not the whole stream
        recorded = _tap(calibration, replay)
    inputs = record_inputs(model, layers, recorded, max_rows=max_rows, generator=generator)
    unused = [n for n in layers if n not in inputs]
    if unused:
        raise ValueError(f"targets: layers {unused} never ran on the calibration data")
    infinite = [n for n, x in inputs.items() if not bool(x.isfinite().all())]
    if infinite:  # quantiles of NaN scores would be thresholds that zero nothing
        raise ValueError(f"calibration: the inputs of layers {infinite} hold NaN or infinite "
                         "values; calibrate on data the model computes finite activations for")

    weights = {n: m.weight.detach() for n, m in layers.items()}
    sorted_scores = {n: score(method, x, weights[n]).flatten().sort().values
                     for n, x in inputs.items()}

    def thresholds(name: str, s: float) -> torch.Tensor:
        return feature_threshold(method, _quantile(sorted_scores[name], s), weights[name])

    sizes = {n: w.numel() for n, w in weights.items()}
    if allocation == "uniform":
        sparsities = uniform(sizes, float(sparsity))
    else:
        sparsities = _teal_greedy(model, replay if recorded is not calibration else calibration,
                                  sizes, float(sparsity), thresholds)
    return ActivationSparsity(
        method=method,
        allocation=allocation,
        target=float(sparsity),
        sparsities=sparsities,
        thresholds={n: thresholds(n, s) for n, s in sparsities.items()},
        sizes=sizes,
    )


def _tap(items: Iterator[Any], kept: list[Any]) -> Iterator[Any]:
    """Yield ``items``, appending to ``kept`` every item up to the first non-empty batch."""
    found = False
    for item in items:
        if not found:
            kept.append(item)
            found = any(not (isinstance(x, torch.Tensor) and x.numel() == 0)
                        for x, _ in batches([item]))
        yield item


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """The smallest value with at least a ``q`` fraction of ``sorted_values`` below it."""
    if q <= 0:
        return 0.0
    return float(sorted_values[min(int(q * sorted_values.numel()), sorted_values.numel() - 1)])


def _teal_greedy(
    model: nn.Module,
    calibration: Any,
    sizes: dict[str, int],
    target: float,
    thresholds: Callable[[str, float], torch.Tensor],
) -> dict[str, float]:
    """TEAL's greedy allocation, block by block, on the block outputs of ``calibration``."""
    groups = block_groups(list(sizes))
    block_error = BlockError(model, list(groups), calibration)
    sparsities: dict[str, float] = {}
    for block, block_layers in groups.items():
        def error(levels: dict[str, float], block: str = block) -> float:
            return block_error(block, {n: thresholds(n, s) for n, s in levels.items() if s > 0})

        names = [n for g in block_layers for n in g]
        sparsities |= greedy(block_layers, {n: sizes[n] for n in names}, target, error)
    return sparsities
