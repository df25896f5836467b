"""Balanced k-means: equal-size clusters of points, for grouping FFN neurons into experts.

MoEfication (Zhang et al. 2022) groups the neurons that fire together into one expert, so
that a token needs few experts. Each neuron is a point (its activation pattern over
calibration tokens); clusters must be of equal size so that every expert costs the same.
Each round assigns points greedily, closest (point, center) pairs first, to centers that
still have room, then moves each center to the mean of its points.
"""

from __future__ import annotations

import torch

from sparsekit._checks import check_finite, check_int, check_materialized, check_seed, seeded

__all__ = ["balanced_kmeans"]


_SCALE_RANGE = 1e15  # float32 squared distances of points this large or small stay finite,
# and non-zero, over a million features


def balanced_kmeans(points: torch.Tensor, clusters: int, *, iterations: int = 25,
                    seed: int = 0) -> torch.Tensor:
    """The cluster (``0 ≤ c < clusters``) of each row of ``points`` (n, features), every
    cluster holding exactly ``n / clusters`` rows; ``clusters`` must divide ``n`` and every
    value of ``points`` must be finite.

    Centers start at k-means++ seeds drawn with ``seed``; at most ``iterations`` rounds, fewer
    when an assignment repeats.
    """
    if not isinstance(points, torch.Tensor) or points.dim() != 2 \
            or not points.is_floating_point():
        raise ValueError(f"points must be a floating (n, features) tensor, got "
                         f"{getattr(points, 'shape', type(points).__name__)}")
    check_materialized("points", points)  # its values are read (failed at .item())
    check_int("clusters", clusters, minimum=1)
    check_int("iterations", iterations, minimum=1)
    check_seed("seed", seed)
    n = points.shape[0]
    if n == 0:
        raise ValueError("points must hold at least one row, got shape "
                         f"{tuple(points.shape)}")
    if points.shape[1] == 0:  # amax failed with a raw RuntimeError
        raise ValueError("points must hold at least one feature, got shape "
                         f"{tuple(points.shape)}")
    check_finite("points", points)  # NaN clusters at random, inf breaks k-means++
    if n % clusters:
        raise ValueError(f"clusters must divide the {n} points, got {clusters}")
    # data: points that require grad (a model's activations) built an autograd graph
    # through every round, and float() of their scale warned
    points = points.detach().float()
    scale = float(points.abs().amax())
    if scale > 0 and not 1 / _SCALE_RANGE <= scale <= _SCALE_RANGE:
        # squared distances of such values overflow float32 (inf weights failed k-means++
        # with a raw RuntimeError) or underflow to 0 (every point equally close: clusters
        # at random); a uniform scale changes no assignment
        points = points / scale
    generator = seeded(seed)
    centers = _seeds(points, clusters, generator)
    labels = None
    for _ in range(iterations):
        new = _assign(torch.cdist(points, centers), n // clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = torch.zeros_like(centers).index_add_(0, labels, points) / (n // clusters)
    return labels


def _seeds(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++: each next center drawn with probability ∝ squared distance to the nearest."""
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    chosen = [first]
    nearest = (points - points[first]).square().sum(1)
    for _ in range(k - 1):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        i = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(i)
        nearest = torch.minimum(nearest, (points - points[i]).square().sum(1))
    return points[chosen].clone()


def _assign(distances: torch.Tensor, size: int) -> torch.Tensor:
    """Closest pairs first, each center taking at most ``size`` points (ties in the order
    of the flattened ``distances``): the greedy assignment, in tensor steps.

    Every free point takes its closest center with room until a center overflows; the
    points ranked before the first overflow are final, that center is full, and the rest
    choose again. Each round fills a center, so there are at most ``clusters`` rounds of
    ``(n, clusters)`` tensor work (a Python loop over the ``n × clusters`` pairs before)."""
    n, k = distances.shape
    total = n * k
    like = {"dtype": torch.long, "device": distances.device}
    rank = torch.empty(total, **like)
    rank[distances.flatten().argsort(stable=True)] = torch.arange(total, **like)
    rank = rank.view(n, k)
    labels = torch.full((n,), -1, **like)
    room = torch.full((k,), size, **like)
    while True:
        free = (labels < 0).nonzero().squeeze(1)
        if not free.numel():
            return labels
        best_rank, best = rank[free].masked_fill(room == 0, total).min(1)
        order = best_rank.argsort()
        chosen = best[order]
        place = torch.nn.functional.one_hot(chosen, k).cumsum(0).gather(1, chosen[:, None])
        over = (place.squeeze(1) > room[chosen]).nonzero()
        final = order[:int(over[0]) if over.numel() else order.numel()]
        labels[free[final]] = best[final]
        room -= torch.bincount(best[final], minlength=k)
