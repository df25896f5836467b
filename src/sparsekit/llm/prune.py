"""prune(): one-shot, block-by-block pruning of a transformer with calibration data.

The embeddings run once to capture the inputs of block 0. Then, for each block in turn,
forward hooks gather its linear layers' input statistics (the block itself still dense),
every layer is pruned, and the *pruned* block's outputs become the inputs of the next
block. Only one block's activations (and its layers' Hessians) are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sparsekit.allocation import outlier_ratio, owl_sparsities
from sparsekit.blocks import BlockCall, capture_inputs, find_blocks
from sparsekit.llm.blocks import DEFAULT_EXCLUDE, Layer, block_layers
from sparsekit.llm.calibration import Calibration, calibration_tokens
from sparsekit.llm.methods import METHODS, Method
from sparsekit.masks import MaskSet
from sparsekit.observe import InputStats, preserved, record
from sparsekit.patterns import NM, Pattern, Unstructured, parse_pattern
from sparsekit.prune import check_sparsity
from sparsekit.registry import Registry
from sparsekit.scores.wanda import wanda_scores
from sparsekit.targets import TargetSpec

ALLOCATIONS: Registry = Registry("allocation", meta={"outliers": False}, ordered=True)
"""Per-block sparsities ``fn(outlier_ratios, sparsity) -> [sparsity of each block]``;
``outliers=True`` entries need the blocks' outlier ratios (a dense Wanda pass first)."""
ALLOCATIONS.register("uniform")(lambda ratios, sparsity: [float(sparsity)] * len(ratios))
ALLOCATIONS.register("owl", outliers=True)(owl_sparsities)
Progress = Callable[[int, int], None]


def prune(
    model: nn.Module,
    calibration: Calibration,
    *,
    method: str = "wanda",
    sparsity: float = 0.5,
    pattern: str | Pattern = "unstructured",
    allocation: str = "uniform",
    nsamples: int = 128,
    seqlen: int | None = None,
    tokenizer: Any = None,
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    device: str | torch.device | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> MaskSet:
    """Prune the linear layers of ``model``'s transformer blocks; return the applied masks.

    ``method`` is ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``; ``pattern`` is
    ``"unstructured"`` or N:M (exactly N of every M inputs kept: the sparsity is 1 − N/M
    and ``sparsity`` may not exceed it); ``allocation`` is ``"uniform"`` or ``"owl"`` (per-block
    sparsity from outlier ratios, unstructured only). ``calibration`` is a token tensor, a
    list of strings or a text file (then pass ``tokenizer``), see
    :func:`~sparsekit.llm.calibration.calibration_tokens`; ``seqlen`` defaults to the
    model's context length (at most 2048). With ``device``, each block is moved there while
    it is pruned, ``batch_size`` calibration windows at a time. ``progress(done, total)``
    is called after each block is pruned.
    """
    spec = METHODS.get(method)
    pat = check_options(sparsity, pattern, allocation)
    blocks = find_blocks(model)
    layers = block_layers(model, blocks, targets, exclude)
    for layer in (x for block in layers for x in block):
        pat.check(layer.shape, layer.name)
    tokens = calibration_tokens(calibration, tokenizer=tokenizer, nsamples=nsamples,
                                seqlen=seqlen or context_length(model), seed=seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dev = torch.device(device) if device is not None else None

    def run(need: Method, report: Progress | None = None
            ) -> Iterator[tuple[int, dict[str, InputStats]]]:
        return _sequential(model, blocks, layers, tokens, need, dev, batch_size, report)

    masks: dict[str, torch.Tensor] = {}
    with preserved(model, train=False), torch.no_grad():
        ratios = [0.0] * len(blocks)
        if ALLOCATIONS.meta(allocation)["outliers"]:  # from a dense pass of the unpruned model
            ratios = [outlier_ratio([wanda_scores(x.weight(), stats[x.name]) for x in layers[i]])
                      for i, stats in run(METHODS.get("wanda"))]
        sparsities = ALLOCATIONS.get(allocation)(ratios, sparsity)
        for i, stats in run(spec, progress):
            for layer in layers[i]:
                w, keep = spec.prune(layer.weight(), stats.get(layer.name), sparsities[i], pat)
                layer.set_weight(w)
                masks[layer.name] = layer.to_storage(keep)
    return MaskSet(model, masks, pattern=str(pat)).apply()


def check_options(sparsity: float, pattern: str | Pattern, allocation: str) -> Pattern:
    """Validate the options that do not depend on the model; return the parsed pattern."""
    check_sparsity(sparsity)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; accepted: {', '.join(ALLOCATIONS)}")
    pat = parse_pattern(pattern)
    if not isinstance(pat, (Unstructured, NM)):
        raise ValueError(f"pattern {pat.spec!r} is not supported here; accepted: "
                         "'unstructured' or N:M such as '2:4'")
    if isinstance(pat, NM):
        if allocation != "uniform":
            raise ValueError(f"allocation {allocation!r} needs pattern 'unstructured'")
        if sparsity > 1 - pat.n / pat.m:
            raise ValueError(f"sparsity {sparsity} exceeds what pattern {pat.spec!r} "
                             f"gives ({1 - pat.n / pat.m:g}); N:M masks keep exactly N of M")
    return pat


def _sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    layers: list[list[Layer]],
    tokens: torch.Tensor,
    need: Method,
    device: torch.device | None,
    batch_size: int,
    progress: Progress | None,
) -> Iterator[tuple[int, dict[str, InputStats]]]:
    """Yield ``(i, stats)`` for each block; the caller prunes block ``i`` before resuming,
    and the block's outputs, recomputed after that, feed block ``i + 1``."""
    ((hidden, calls),) = capture_inputs(model, [blocks[0]], tokens.split(batch_size), device)
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device or home)
        stats: dict[str, InputStats] = {}
        if need.stats and layers[i]:
            with record({x.name: x.module for x in layers[i]}, gram=need.gram) as stats:
                _forward(block, hidden, calls)
        yield i, stats
        del stats
        hidden = _forward(block, hidden, calls)
        block.to(home)
        if progress is not None:
            progress(i + 1, len(blocks))


def _forward(block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall]
             ) -> list[torch.Tensor]:
    return [call(block, h) for h, call in zip(hidden, calls, strict=True)]


def context_length(model: nn.Module) -> int:
    """The model's maximum sequence length from its config, at most 2048."""
    config = getattr(model, "config", None)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
    return min(length or 2048, 2048)
