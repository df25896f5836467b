"""calibrate(): per-layer activation thresholds that hit a sparsity target on calibration data."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int, check_module, check_seed, seeded
from sparsekit.activation.allocation import ALLOCATIONS, GREEDY_STEP, greedy, uniform
from sparsekit.activation.blocks import BlockError, block_groups
from sparsekit.activation.layers import find_layers
from sparsekit.activation.record import record_inputs
from sparsekit.activation.scores import METHODS, feature_threshold, score
from sparsekit.activation.sparsity import ActivationSparsity
from sparsekit.engine.activation_linear import applied_layers
from sparsekit.observe import batches, inference
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
    output errors on the first calibration batch and reaches at most 0.95). ``targets``
    overrides the default layers (see :func:`~sparsekit.activation.layers.find_layers`). At
    most ``max_rows`` input rows per layer, sampled with ``seed``, are kept to bound memory.
    """
    check_module("model", model)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ArgumentTypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0 <= sparsity < 1:  # also NaN
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    for name, value, known in (("method", method, METHODS),
                               ("allocation", allocation, ALLOCATIONS)):
        if not isinstance(value, str):  # a list was "unhashable type" from the registry
            raise ArgumentTypeError(f"{name} must be one of {list(known)}, got {value!r}")
        if value not in known:
            raise ValueError(f"{name} must be one of {list(known)}, got {value!r}")
    if allocation == "greedy" and sparsity > 1 - GREEDY_STEP:  # known now, not after the search
        raise ValueError(f"sparsity must be at most {1 - GREEDY_STEP:g} for allocation='greedy' "
                         f"(its layer levels rise in steps of {GREEDY_STEP:g} and stay below 1), "
                         f"got {sparsity!r}")
    check_int("max_rows", max_rows, minimum=1)
    check_seed("seed", seed)
    if calibration is None:
        raise ValueError("calibration must be a tensor of inputs or a list of them, got None")

    layers = find_layers(model, method, targets)
    applied = applied_layers(layers)
    if applied:  # their recorded inputs would be the thresholded ones: quantiles of zeros
        raise ValueError(f"model: layers {applied} have activation thresholds applied "
                         "(ActivationSparsity.apply); remove() them before calibrating again")
    if method == "wina":  # a NaN column norm made a NaN threshold, blamed on the thresholds
        broken = [n for n, m in layers.items()  # meta ones are refused by the recording
                  if not m.weight.is_meta and not bool(m.weight.isfinite().all())]
        if broken:
            raise ValueError(f"model: the weights of layers {broken} hold NaN or infinite "
                             "values, and method='wina' weighs each input by the norm of its "
                             "weight column; accepted: finite weights (or method='teal')")
    generator = seeded(seed)
    replay: list[Any] = []  # the greedy search replays the first non-empty batch
    recorded = calibration
    if allocation == "greedy" and isinstance(calibration, Iterator):
        # a one-shot iterator (a generator) is consumed by the recording: keep its first
        # non-empty batch on the way (the only one the search needs), not the whole stream
        recorded = _tap(calibration, replay)
    inputs = record_inputs(model, layers, recorded, max_rows=max_rows, generator=generator)
    # a layer reached only by empty batches (an MoE expert no token was routed to) has no
    # rows to take a quantile of
    unused = [n for n in layers if n not in inputs or not len(inputs[n])]
    if unused:
        raise ValueError(f"targets: layers {unused} saw no input rows in the calibration data "
                         "(they never ran, or ran only on empty inputs)")
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
        # what each threshold zeroes on the calibration data: the level asked for, and
        # the inputs that are zero already (a ReLU's) or tie at the threshold
        sparsities={n: _zeroed(sorted_scores[n], _quantile(sorted_scores[n], s))
                    for n, s in sparsities.items()},
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
                        for x, _ in batches([item], "calibration"))
        yield item


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """The smallest value with at least a ``q`` fraction of ``sorted_values`` below it."""
    if q <= 0 or not sorted_values.numel():  # no scores: a layer of no input features
        return 0.0
    return float(sorted_values[min(int(q * sorted_values.numel()), sorted_values.numel() - 1)])


def _zeroed(sorted_values: torch.Tensor, threshold: float) -> float:
    """The fraction of ``sorted_values`` a ``threshold`` zeroes: those below it, and exact
    zeros, which stay zero whatever the threshold. The level asked for had been reported
    instead: 0.3 on a ReLU layer whose thresholds zeroed 0.48 of its inputs, and on inputs
    tied at the threshold one that zeroed none."""
    if not sorted_values.numel():
        return 0.0
    below = torch.searchsorted(sorted_values, sorted_values.new_tensor(threshold))
    zeros = torch.searchsorted(sorted_values, sorted_values.new_tensor(0.0), right=True)
    return max(int(below), int(zeros)) / sorted_values.numel()


def _teal_greedy(
    model: nn.Module,
    calibration: Any,
    sizes: dict[str, int],
    target: float,
    thresholds: Callable[[str, float], torch.Tensor],
) -> dict[str, float]:
    """TEAL's greedy allocation, block by block, on the block outputs of ``calibration``.

    The blocks are replayed in eval mode, as the inputs were recorded (the model's modes
    are restored after): in training mode dropout made every block error random, and the
    same seed gave another allocation each time."""
    groups = block_groups(list(sizes))
    sparsities: dict[str, float] = {}
    with inference(model):
        block_error = BlockError(model, list(groups), calibration)
        for block, block_layers in groups.items():
            def error(levels: dict[str, float], block: str = block) -> float:
                return block_error(block,
                                   {n: thresholds(n, s) for n, s in levels.items() if s > 0})

            names = [n for g in block_layers for n in g]
            sparsities |= greedy(block_layers, {n: sizes[n] for n in names}, target, error)
    return sparsities
