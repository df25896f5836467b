"""prune(): one pass of the pipeline — targets → scores → allocation → pattern → MaskSet."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_seed,
    check_sparsity,
    renamed,
    seeded,
)
from sparsekit.allocation import ALLOCATIONS, fit_to_capacity
from sparsekit.distributed import is_sharded, unsharded
from sparsekit.masks import MaskSet
from sparsekit.patterns import Pattern, Unstructured, parse_pattern
from sparsekit.scores import CRITERIA, ScoreContext
from sparsekit.scores.saliency import GRADIENT_CRITERIA, check_gradient_signal
from sparsekit.select import top_k_per_row
from sparsekit.targets import Target, TargetSpec, batchnorm_scales, resolve_targets

__all__ = ["check_pattern", "check_sparsity", "compute_masks", "prune"]


@renamed(criterion="method")
def prune(
    model: nn.Module,
    sparsity: float,
    *,
    method: str = "magnitude",
    pattern: str = "unstructured",
    allocation: str = "uniform",
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    exclude: Iterable[str] = (),
    data: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> MaskSet:
    """Prune ``model`` one-shot to ``sparsity`` and return the applied :class:`MaskSet`.

    ``method`` names the score that ranks the weights, an entry of
    :data:`~sparsekit.CRITERIA` (``criterion=`` is its deprecated spelling); an unstructured
    layer keeps the best weights of the whole layer, or of each output row for criteria
    that compare within rows (``CRITERIA.meta(name)["per_row"]``: ``"wanda"``, as its paper
    does). Every
    argument is validated before anything is changed. Weights that are already exactly
    zero count as pruned, so pruning a pruned model never revives a weight, but where a
    pattern keeps units whole (``"row"``, ``"block:RxC"``, ``"fanin"``'s equal rows): a
    unit is ranked by its other weights, and a kept one is kept whole, zeros included.
    For N:M patterns the pattern caps the density at N/M; a higher ``sparsity``
    thins the N:M mask further. ``pattern="channel"`` removes that fraction of the
    channels of every dependency group (see :mod:`sparsekit.structured`);
    :func:`~sparsekit.shrink` then hands back the smaller dense model; a ``sparsity`` above 0
    that removes no channel (or head) of any group is a ``ValueError`` saying why, before
    the model changes (a no-op returned a dense MaskSet, silently).

    Under ``torchrun`` (a default process group) every rank passes the same model and the
    same ``data``; a data-driven criterion observes or differentiates on this rank's share
    of the batches (``len(data)`` a multiple of the ranks) and sums over the ranks, so
    every rank gets the same masks, those of one process up to the order of the sums.

    ``seed`` seeds every random draw of the scoring, the criterion's own (``"random"``) and
    the model's (dropout of a model in train mode, which a gradient criterion runs as it
    is), from a forked RNG: two calls with one seed give the same masks, and the caller's
    RNG is where it was (scoring drew from it, so a resume that restored it diverged).
    """
    masks, pat = compute_masks(
        model, sparsity, method=method, pattern=pattern, allocation=allocation,
        targets=targets, exclude=exclude, data=data, loss_fn=loss_fn, seed=seed, strict=True,
    )
    return MaskSet(model, masks, pattern=str(pat)).apply()


@renamed(criterion="method")
def check_pattern(pattern: Pattern, targets: Sequence[Target]) -> None:
    """Raise ``ValueError`` unless ``pattern`` fits every target's weight, seen as
    ``(out, in)`` (also GPT-2's ``(in, out)`` Conv1D): what :func:`compute_masks` checks
    first, and what the CLI and recipes check before they read any data."""
    for t in targets:
        pattern.check(t.out_in(t.param).shape, t.name)


def compute_masks(
    model: nn.Module,
    sparsity: float,
    *,
    method: str = "magnitude",
    pattern: str | Pattern = "unstructured",
    allocation: str = "uniform",
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    exclude: Iterable[str] = (),
    data: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    strict: bool = False,
) -> tuple[dict[str, torch.Tensor], Pattern]:
    """The masks :func:`prune` would apply, without changing the model (schedules use this).

    ``strict`` (:func:`prune` sets it): a grouped pattern (``"channel"``, ``"head"``) whose
    ``sparsity`` above 0 removes no unit is a ``ValueError``; without it the masks remove
    nothing (a schedule's early, small sparsities legitimately remove none)."""
    check_sparsity(sparsity)
    check_bool("strict", strict)
    score_fn = CRITERIA.get(method)
    allocate = ALLOCATIONS.get(allocation)
    pat = parse_pattern(pattern)
    # FSDP2: scored on whole weights (the masks whole too); sharded, the ranking's DTensor
    # ops failed, or diverged between the ranks. A data-driven criterion runs the model,
    # whose forward reshards the weights under it, so it keeps the sharded ones.
    whole = (unsharded(model) if is_sharded(model) and not CRITERIA.meta(method)["data_driven"]
             else contextlib.nullcontext())
    with whole:
        return _masks(model, float(sparsity), score_fn, allocate, pat, method=method,
                      allocation=allocation, targets=targets, exclude=exclude, data=data,
                      loss_fn=loss_fn, seed=seed, strict=strict)


def _masks(
    model: nn.Module, sparsity: float, score_fn: Callable[[ScoreContext], dict[str, torch.Tensor]],
    allocate: Callable[..., dict[str, int]], pat: Pattern, *, method: str, allocation: str,
    targets: TargetSpec | Sequence[TargetSpec] | None, exclude: Iterable[str], data: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, seed: int,
    strict: bool,
) -> tuple[dict[str, torch.Tensor], Pattern]:
    """:func:`compute_masks` once its score, allocation and pattern are resolved."""
    chosen = resolve_targets(model, targets, exclude)
    check_pattern(pat, chosen)
    _check_values(chosen)
    check_seed("seed", seed)
    loss_fn = _check_loss_fn(loss_fn)

    scales = batchnorm_scales(model) if pat.grouped else []  # a group's γ, for magnitude
    ctx = ScoreContext(model, chosen, data, loss_fn, seeded(seed), scales)
    with _seeded_rng(seed):
        scores = score_fn(ctx)
    check_scores(scores, method, chosen)
    if method in GRADIENT_CRITERIA:
        check_gradient_signal(method, chosen, scores)
    if pat.grouped:  # whole dependency groups across layers (pattern="channel")
        return pat.select(model, chosen, scores, allocate, sparsity,
                          readers_only=CRITERIA.meta(method)["readers_only"],
                          strict=strict), pat
    # Layer by layer, so that at most one layer's scores is ever copied: weights that are
    # already zero rank below everything, and each layer's scores are let go once its
    # mask is built.
    scores = {t.name: scores[t.name] for t in chosen}
    for t in chosen:
        dead = t.param.detach() == 0
        if dead.any():
            scores[t.name] = scores[t.name].masked_fill(dead, float("-inf"))
    caps = {t.name: math.floor(pat.max_density() * t.param.numel()) for t in chosen}
    counts = allocate(scores, sparsity)
    _check_counts(counts, chosen, allocation)
    keep = fit_to_capacity({t.name: counts[t.name] for t in chosen}, caps)
    # a criterion that compares the weights of each output (Wanda) keeps its unstructured
    # share row by row; any other pattern decides its own units
    per_row = CRITERIA.meta(method)["per_row"] and isinstance(pat, Unstructured)
    masks = {}
    for t in chosen:
        ranked = t.out_in(scores.pop(t.name))
        mask = (top_k_per_row(ranked.flatten(1), keep[t.name]).view(ranked.shape)
                if per_row and ranked.dim() > 1 else pat.mask(ranked, keep[t.name]))
        mask = t.out_in(mask).contiguous()
        live = mask & (t.param.detach() != 0)
        # a pattern of whole units (rows, tiles, a constant fan-in) keeps a unit whole, its
        # zeros included: the zeros left out, a kept unit no longer followed the pattern
        masks[t.name] = live if pat.is_valid(t.out_in(live)) else mask
    return masks, pat


def _check_values(chosen: list[Target]) -> None:
    """Raise unless every target holds values to rank: a model built on the meta device
    (``torch.device("meta")``, ``init_empty_weights``) failed deep inside a criterion with
    "Tensor.item() cannot be called on meta tensors"."""
    for t in chosen:
        if t.param.is_meta:
            raise ValueError(
                f"model: target {t.name!r} is on the meta device and holds no values to "
                "rank; materialise the weights first (model.to_empty(device='cpu') and "
                "load_state_dict)"
            )


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_loss_fn(loss_fn: LossFn | None) -> LossFn | None:
    """``loss_fn``, checked to be ``None`` or a callable; what it returns is checked on every
    call (:meth:`~sparsekit.scores.ScoreContext.loss`)."""
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentTypeError(
            f"loss_fn must be a callable (outputs, labels) -> scalar tensor, got {loss_fn!r}"
        )
    return loss_fn


def check_scores(scores: Any, criterion: str, targets: list[Target]) -> None:
    """Raise unless ``scores`` maps every target's name to a dense floating-point tensor of
    its weight's shape holding values, with no NaN or +inf anywhere (ranked, they would
    prune arbitrarily: one NaN in calibration data made SNIP prune every weight) and no
    -inf on a weight that is not zero (-inf marks a weight already pruned: such weights
    were pruned past the sparsity asked, every one of them for a criterion scoring all
    -inf). A registered criterion that returned anything else failed deep in the pipeline
    (a ``KeyError``, an ``AttributeError``, a shape ``RuntimeError``)."""
    where = f"criterion {criterion!r} must return a dict of target name -> float scores"
    _check_per_target(scores, targets, where)
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise ArgumentTypeError(f"{where}; for {name!r} it returned {type(s).__name__}")
        if not s.is_floating_point() or s.layout != torch.strided or s.is_meta:
            raise ArgumentTypeError(
                f"{where}; for {name!r} it returned a {s.dtype} tensor of layout {s.layout} "
                f"on {s.device}: accepted, a dense floating-point tensor with values"
            )
    for t in targets:
        s = scores[t.name]
        if s.shape != t.param.shape or s.device != t.param.device:
            raise ValueError(f"{where}; for {t.name!r} it returned shape {tuple(s.shape)} on "
                             f"{s.device}, not the weight's {tuple(t.param.shape)} on "
                             f"{t.param.device}")
    for name, s in scores.items():
        bad = int((torch.isnan(s) | torch.isposinf(s)).sum())
        if bad:
            raise ValueError(
                f"criterion {criterion!r} gave {bad} non-finite score(s) (NaN or +inf) of "
                f"{s.numel()} for {name!r}: check data and the layer's weights for NaN/inf; "
                "the model was not changed"
            )
    for t in targets:
        bad = int((torch.isneginf(scores[t.name]) & (t.param.detach() != 0)).sum())
        if bad:
            raise ValueError(
                f"criterion {criterion!r} gave {bad} score(s) of -inf for nonzero weights of "
                f"{t.name!r}; -inf marks a weight already pruned (exactly zero), and these "
                "would be pruned past the sparsity asked; the model was not changed"
            )


def _check_counts(counts: Any, targets: list[Target], allocation: str) -> None:
    """Raise unless the allocation returned a count ≥ 0 (an int) for every target: one
    registered with other results failed later with a ``KeyError``, an ``AttributeError``
    or a check of ``top_k``'s ``k``."""
    where = f"allocation {allocation!r} must return a dict of target name -> int count ≥ 0"
    _check_per_target(counts, targets, where)
    for t in targets:
        k = counts[t.name]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ArgumentTypeError(f"{where}; for {t.name!r} it returned {k!r}")
        if k < 0:
            raise ValueError(f"{where}; for {t.name!r} it returned {k}")


def _check_per_target(result: Any, targets: list[Target], where: str) -> None:
    """Raise unless ``result`` (what a registered criterion or allocation returned; ``where``
    says what it must be) is a mapping with an entry for every target."""
    if not isinstance(result, Mapping):
        raise ArgumentTypeError(f"{where}, got {type(result).__name__}")
    missing = [t.name for t in targets if t.name not in result]
    if missing:
        raise ValueError(f"{where}; it returned none for {_few(missing)}")


def _few(names: list[str]) -> str:
    """Up to three of ``names``, quoted, and "…" when there are more."""
    return ", ".join(map(repr, names[:3])) + (", …" if len(names) > 3 else "")


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """The global RNGs (CPU, and every CUDA device in use) seeded with ``seed`` inside,
    restored on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
