"""How much per layer: turn one overall sparsity into a number of weights kept per layer.

An allocation is ``fn(scores, sparsity) -> {name: keep}``. ``scores`` holds the
criterion's scores, with ``-inf`` marking weights that are already pruned (they are
never counted as kept). The counts always add up to ``round(total · (1 - sparsity))``
when the layers have room for it: fractional counts are rounded by largest remainder,
so each layer is within one element of its exact share.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparsekit._checks import check_finite, check_fraction, check_mapping, check_nonnegative
from sparsekit.registry import Registry
from sparsekit.select import top_k_counts

ALLOCATIONS: Registry = Registry("allocation", meta={"uses_scores": False})
"""``uses_scores``: the split depends on the score values, not only on the layer shapes."""

Scores = dict[str, torch.Tensor]
Allocation = Callable[[Scores, float], dict[str, int]]


def _register(name: str, **meta: Any) -> Callable[[Allocation], Allocation]:
    """Register an allocation as ``name`` in :data:`ALLOCATIONS`, its arguments checked
    first (``sparsity`` in [0, 1]: 1 keeps nothing): called from the table directly,
    ``sparsity=1.5`` gave negative counts (silently) and NaN a raw "cannot convert float
    NaN to integer"."""

    def add(fn: Allocation) -> Allocation:
        @functools.wraps(fn)
        def checked(scores: Scores, sparsity: float) -> dict[str, int]:
            check_mapping("scores", scores, torch.Tensor, "a torch.Tensor")
            check_fraction("sparsity", sparsity, one=True)
            return fn(scores, sparsity)

        return ALLOCATIONS.register(name, **meta)(checked)

    return add


@_register("uniform")
def uniform(scores: Scores, sparsity: float) -> dict[str, int]:
    """Every layer gets the same sparsity ("class-uniform" in Han et al. / See et al.)."""
    return _round({n: s.numel() * (1.0 - sparsity) for n, s in scores.items()}, scores)


@_register("global", uses_scores=True)
def global_(scores: Scores, sparsity: float) -> dict[str, int]:
    """One ranking across all layers ("class-blinded"): keep the top scores anywhere."""
    return _top_k_counts(scores, sparsity)


@_register("lamp", uses_scores=True)
def lamp(scores: Scores, sparsity: float) -> dict[str, int]:
    """Layer-adaptive magnitude pruning (Lee et al. 2021), global over LAMP scores.

    LAMP(u) = s_u² / Σ_{v ⪰ u} s_v², the share of a weight in the squared score mass of
    all weights at least as important in its layer.
    """
    return _top_k_counts(scores, sparsity, rank_by=_sorted_lamp_scores)


def lamp_scores(s: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry of one layer's scores (``-inf`` entries stay ``-inf``)."""
    flat = s.flatten().float()
    dead = torch.isneginf(flat)
    sq = _squares(flat)
    order = torch.argsort(sq, stable=True)
    out = torch.empty_like(flat)
    out[order] = _lamp_of_sorted(sq[order])
    out[dead] = float("-inf")
    return out.reshape(s.shape)


def _sorted_lamp_scores(s: torch.Tensor) -> torch.Tensor:
    """The LAMP scores of one layer in ascending order, without their positions: all a
    count of the top scores needs, at a fraction of the memory of :func:`lamp_scores`."""
    flat = s.flatten().float()
    dead = int(torch.isneginf(flat).sum())
    out = _lamp_of_sorted(torch.sort(_squares(flat)).values)
    out[:dead] = float("-inf")  # dead entries square to 0, the lowest: they sort first
    return out


def _squares(flat: torch.Tensor) -> torch.Tensor:
    return flat.masked_fill(torch.isneginf(flat), 0.0).square_()


def _lamp_of_sorted(sorted_sq: torch.Tensor) -> torch.Tensor:
    """``sorted_sq`` (ascending) divided, in place, by its suffix sums: the mass of each
    weight and every weight ranked above it."""
    suffix = sorted_sq.flip(0).cumsum(0).flip(0).clamp_min_(torch.finfo(torch.float32).tiny)
    return sorted_sq.div_(suffix)


@_register("erk")
def erk(scores: Scores, sparsity: float) -> dict[str, int]:
    """Erdős–Rényi-Kernel (Evci et al. 2020): density ∝ Σ dims / Π dims, kernel included."""
    return _erdos_renyi(scores, sparsity, kernel=True)


@_register("er")
def er(scores: Scores, sparsity: float) -> dict[str, int]:
    """Erdős–Rényi (Mocanu et al. 2018): density ∝ (n_in + n_out) / (n_in · n_out)."""
    return _erdos_renyi(scores, sparsity, kernel=False)


@_register("owl", uses_scores=True)
def owl(scores: Scores, sparsity: float) -> dict[str, int]:
    """OWL, outlier-weighted layerwise sparsity (Yin et al. 2023): outlier-rich layers keep more.

    A layer's outlier ratio is the fraction of its scores above ``OUTLIER_M`` times their
    mean; the per-layer sparsities follow :func:`owl_sparsities` (a ``±OWL_LAMBDA`` band
    around the target, centred by layer size) and are scaled so that the total is exact.
    With ``method="wanda"`` and ``data=`` the scores are the paper's |W|·‖X‖; with other
    nonnegative criteria (magnitude …) OWL measures the outliers of their scores.
    """
    sizes = {n: s.numel() for n, s in scores.items()}
    ratios = [outlier_ratio([s]) for s in scores.values()]
    per_layer = owl_sparsities(ratios, sparsity, weights=list(sizes.values()))
    real = {n: sizes[n] * (1.0 - sp) for n, sp in zip(scores, per_layer)}
    total = sum(real.values())
    scale = (1.0 - sparsity) * sum(sizes.values()) / total if total > 0 else 0.0
    return _round({n: v * scale for n, v in real.items()}, scores)


OUTLIER_M = 5.0
"""OWL's outlier threshold: a score is an outlier above ``M`` times its layer's mean."""
OWL_LAMBDA = 0.08
"""OWL's band: per-layer sparsities span ``target ± λ``."""


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OUTLIER_M) -> float:
    """Fraction of the finite ``scores`` (all tensors together) above ``m`` × their mean.

    ``-inf`` (already pruned) entries are left out; no finite entry (or no tensor) gives 0.
    """
    if not scores:
        return 0.0
    flat = torch.cat([s.flatten().float() for s in scores]) if len(scores) > 1 else (
        scores[0].flatten().float())
    finite = torch.isfinite(flat)
    if not finite.all():
        flat = flat[finite]
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(
    ratios: Sequence[float],
    sparsity: float,
    lam: float = OWL_LAMBDA,
    *,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Per-group sparsity from outlier ratios: ``sparsity − lam · (2·r̂ − 1)``.

    r̂ is the min-max normalised outlier ratio; the shifts are centred so that their mean
    (weighted by ``weights``, e.g. layer sizes; plain otherwise) is zero, so the mean
    sparsity is ``sparsity``. Near the ends the band narrows until every sparsity lies in
    [0, 0.99] (all are ``sparsity`` when it is above 0.99): clipping the shifts instead
    moved the mean (0 gave 3 % sparsity, 0.99 gave 0.968). Equal ratios give ``sparsity``
    everywhere. Non-finite ``ratios`` (a NaN made every sparsity NaN) or ``weights`` are a
    ``ValueError``, as are a ``sparsity`` outside [0, 1) and a negative or non-finite
    ``lam`` (1.5 and lam=-5 were taken).
    """
    check_fraction("sparsity", sparsity)
    check_nonnegative("lam", lam)
    r = torch.tensor(ratios, dtype=torch.float64)
    check_finite("ratios", r, hint="outlier ratios are fractions of a layer's weights")
    if weights is not None:
        check_finite("weights", torch.tensor(weights, dtype=torch.float64))
    span = float(r.max() - r.min()) if len(ratios) else 0.0
    if span == 0:
        return [float(sparsity)] * len(ratios)
    shift = (r - r.min()) / span * (2 * lam)
    if weights is None:
        shift -= shift.mean()
    else:
        w = torch.tensor(weights, dtype=torch.float64)
        shift -= (shift * w).sum() / w.sum()
    hi, lo = float(shift.max()), float(shift.min())
    scale = min(1.0, sparsity / hi if hi > 0 else 1.0,
                max(0.99 - sparsity, 0.0) / -lo if lo < 0 else 1.0)
    return [float(sparsity - s * scale) for s in shift]


def erdos_renyi_densities(
    shapes: dict[str, torch.Size], sparsity: float, *, kernel: bool = True
) -> dict[str, float]:
    """Per-layer densities of the (kernel) Erdős–Rényi distribution.

    Solves ε in density_l = ε · raw_l so that the kept total equals (1 - sparsity) · N;
    a layer whose density would exceed 1 is made dense and the rest renormalised,
    repeatedly, as in the RigL reference implementation. ``sparsity`` must lie in [0, 1)
    (1.5 gave a density of -0.5).
    """
    check_fraction("sparsity", sparsity)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: _er_raw(s, kernel) for n, s in shapes.items()}
    budget = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        rest = budget - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in free)
        eps = rest / denom if denom > 0 else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def _er_raw(shape: torch.Size, kernel: bool) -> float:
    """A layer's unnormalised density; 0 for a layer of no weights (a zero-width side),
    which has nothing to keep."""
    dims = list(shape) if kernel or len(shape) <= 2 else list(shape[:2])
    size = math.prod(dims)
    return sum(dims) / size if size else 0.0


def _erdos_renyi(scores: Scores, sparsity: float, *, kernel: bool) -> dict[str, int]:
    dens = erdos_renyi_densities({n: s.shape for n, s in scores.items()}, sparsity, kernel=kernel)
    return _round({n: dens[n] * s.numel() for n, s in scores.items()}, scores)


def _top_k_counts(
    scores: Scores,
    sparsity: float,
    *,
    rank_by: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, int]:
    """Per-layer counts of one global ranking of ``scores`` (or of ``rank_by`` of each
    layer's scores, computed afresh on each of the selection's reads rather than held for
    all layers at once)."""
    names = list(scores)
    parts = [scores[n] for n in names]
    k = round(sum(s.numel() for s in parts) * (1.0 - sparsity))
    ranked = parts if rank_by is None else _Mapped(rank_by, parts)
    return dict(zip(names, top_k_counts(ranked, k, finite_only=True)))


class _Mapped(Sequence[torch.Tensor]):
    """``fn`` of each item, computed on access."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], items: list[torch.Tensor]):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self.fn(self.items[i])


def _round(real: dict[str, float], scores: Scores) -> dict[str, int]:
    """Round per-layer counts by largest remainder so the total is exact."""
    target = round(sum(real.values()))
    counts = {n: math.floor(v) for n, v in real.items()}
    by_remainder = sorted(real, key=lambda n: real[n] - counts[n], reverse=True)
    for n in by_remainder[: target - sum(counts.values())]:
        counts[n] += 1
    return fit_to_capacity(counts, {n: int(torch.isfinite(s).sum()) for n, s in scores.items()})


def fit_to_capacity(keep: dict[str, int], caps: dict[str, int]) -> dict[str, int]:
    """Cap per-layer counts at ``caps``, moving the excess to layers with room.

    Keeps the total whenever the layers can hold it (already-pruned weights, N:M caps).
    """
    fitted = {n: min(k, caps[n]) for n, k in keep.items()}
    excess = sum(keep.values()) - sum(fitted.values())
    while excess > 0:
        room = {n: caps[n] - k for n, k in fitted.items() if caps[n] > k}
        if not room:
            break
        total_room = sum(room.values())
        for n, r in room.items():
            add = min(r, excess, -(-excess * r // total_room))
            fitted[n] += add
            excess -= add
    return fitted
