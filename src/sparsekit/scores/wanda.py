"""Wanda: weight magnitude times input-activation norm (Sun et al. 2023)."""

from __future__ import annotations

import torch

from sparsekit._checks import ArgumentTypeError
from sparsekit.observe import InputStats, input_stats
from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext


@CRITERIA.register("wanda", data_driven=True, per_row=True)
def wanda(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|W_ij| · ‖X_j‖₂, where X_j is input feature j of the layer over all calibration data.

    Registered ``per_row``: the paper compares the weights of each output, so an
    unstructured mask keeps the same share of every row (:func:`sparsekit.prune`).

    For convolutions the input features are the unfolded patches (channel × kernel
    position), matching the flattened weight layout (see :func:`sparsekit.observe.record`);
    GPT-2's ``Conv1D`` is scored on its weight seen as ``(out, in)``. Under ``torchrun``
    each rank observes its share of the data and the sums are all-reduced. An empty weight
    (a layer of zero inputs or outputs) gets its empty scores unobserved: the inputs of a
    zero-input layer cannot be laid out per feature, which failed as if ``data`` were wrong.
    """
    ctx.require_layer_weights("wanda")
    data = ctx.require_data("wanda", labels=False)
    stats = input_stats(ctx.model, {t.name: t.module for t in ctx.targets if t.param.numel()},
                        ctx.rank_share(data))
    for s in stats.values():
        s.all_reduce()
    return {t.name: t.out_in(wanda_scores(t.out_in(t.param), stats[t.name])) if t.name in stats
            else torch.zeros(t.param.shape, device=t.param.device) for t in ctx.targets}


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ in float32, shaped like ``weight`` (``(out, in)`` or a convolution's
    ``(out, in/groups, *kernel)``), from the layer's input statistics.

    Statistics of another layer (another number of inputs) are a ``ValueError`` naming
    both shapes, ``None`` or anything but :class:`~sparsekit.observe.InputStats` an
    :class:`~sparsekit._checks.ArgumentTypeError` (they were a bare broadcasting
    ``RuntimeError`` and an ``AttributeError``)."""
    if not callable(getattr(stats, "norms", None)):
        raise ArgumentTypeError(f"stats must be the InputStats of the layer's inputs "
                                f"(sparsekit.observe.input_stats), got {type(stats).__name__}")
    flat = weight.detach().abs().float().flatten(1)
    norms = stats.norms()
    try:
        fits = torch.broadcast_shapes(norms.shape, flat.shape) == flat.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"stats: input statistics of shape {tuple(norms.shape)} do not fit a weight of "
            f"shape {tuple(weight.shape)} ({flat.shape[1]} inputs per output); accepted: the "
            "statistics of this layer's own inputs"
        )
    return (flat * norms).reshape(weight.shape)
