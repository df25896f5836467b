"""Gradient-based criteria: gradient magnitude, SNIP, Taylor, GraSP and SynFlow.

All of them differentiate with ``torch.autograd.grad`` (never ``.backward()``), so the
model's ``.grad`` fields are untouched, and run inside :func:`preserved` so batch-norm
statistics are not updated by the scoring passes. Gradients are enabled inside, so they
score under ``torch.no_grad()`` too; SNIP, Taylor and GraSP need targets that take a
gradient (``requires_grad=True``), SynFlow differentiates copies and does not. Under
``torchrun`` each rank differentiates on its share of the batches
(:meth:`~sparsekit.scores.ScoreContext.rank_share`) and the sums are all-reduced.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.func import functional_call

from sparsekit._checks import ArgumentTypeError, model_errors
from sparsekit.distributed import all_reduce_sum
from sparsekit.observe import preserved
from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext
from sparsekit.targets import Target


def _grads(ctx: ScoreContext, batch, *, create_graph: bool = False) -> list[torch.Tensor]:
    x, y = batch
    loss = ctx.loss(ctx.outputs(x), y)
    params = [t.param for t in ctx.targets]
    return list(ctx.grad(loss, params, create_graph=create_graph))


def _summed_grads(ctx: ScoreContext, data: list) -> list[torch.Tensor]:
    """The gradient of every target summed over the batches ``data`` (float32), as
    ``.backward()`` over each batch would accumulate it."""
    with preserved(ctx.model), torch.enable_grad():
        total = [torch.zeros_like(t.param, dtype=torch.float32) for t in ctx.targets]
        for batch in ctx.rank_share(data):
            for acc, g in zip(total, _grads(ctx, batch)):
                acc += g.float()
    all_reduce_sum(*total)
    return total


def _accumulated_taylor(ctx: ScoreContext, data: list) -> list[torch.Tensor]:
    """|w·Σg| of every target, the gradient summed over the batches ``data`` first."""
    summed = _summed_grads(ctx, data)
    return [(t.param.detach().float() * g).abs() for t, g in zip(ctx.targets, summed)]


GRADIENT_CRITERIA = frozenset({"gradient", "snip", "taylor", "taylor:accumulated", "grasp"})
"""The criteria here whose scores vanish with the loss's gradient (SynFlow's do not: it
differentiates a data-free surrogate)."""


def check_gradient_signal(criterion: str, targets: list[Target],
                          scores: Mapping[str, torch.Tensor]) -> None:
    """Raise where every score of a target with a nonzero weight is zero: the loss does not
    depend on it on ``data`` (a ``loss_fn`` that ignores the outputs, dead activations, a
    layer the loss never sees), and a ranking of the scores would keep its weights by
    position alone (the first ones of every layer). The scores themselves are true: this
    is checked where they are ranked."""
    for t in targets:
        if bool(t.param.detach().any()) and not bool(scores[t.name].any()):
            raise ValueError(
                f"data: criterion {criterion!r} scores every weight of {t.name!r} zero — the "
                "loss has no gradient with respect to it on the calibration data (a loss_fn "
                "that ignores the outputs, dead activations, a layer whose output never "
                "reaches the loss) and its weights would be pruned by position; check data "
                "and loss_fn, or exclude the layer (the model was not changed)"
            )


@CRITERIA.register("gradient", data_driven=True, needs_labels=True)
def gradient(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|mean ∂L/∂w| over the calibration batches: the entries the loss pulls on hardest.

    Not a pruning score (it ignores the weight's size) but the choice of what to *train*
    in sparse fine-tuning (:func:`sparsekit.finetune.masked_delta`, as in SIFT and the
    sparse-update studies): the gradient is accumulated over the batches before its
    magnitude is taken, so entries whose gradient keeps its sign rank first.
    """
    data = ctx.require_data("gradient", labels=True)
    ctx.require_grad("gradient")
    return {t.name: g.abs() / len(data) for t, g in zip(ctx.targets, _summed_grads(ctx, data))}


@CRITERIA.register("snip", data_driven=True, needs_labels=True)
def snip(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Connection sensitivity |∂L/∂c| = |w·g| at c = 1 (Lee et al. 2019).

    The gradient is accumulated over all calibration batches before taking the product
    (``"taylor:accumulated"``); scores are normalised to sum to one, as in the paper.
    """
    data = ctx.require_data("snip", labels=True)
    ctx.require_grad("snip")
    scores = _accumulated_taylor(ctx, data)
    norm = sum(s.sum() for s in scores).clamp_min(torch.finfo(torch.float32).tiny)
    return {t.name: s / norm for t, s in zip(ctx.targets, scores)}


@CRITERIA.register("taylor", data_driven=True, needs_labels=True)
def taylor(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """First-order Taylor estimate of the loss change, |w·∂L/∂w|, averaged per batch.

    Unlike SNIP, the absolute value is taken per batch (Molchanov et al. 2019), so
    weights whose gradient flips sign between batches still count as important;
    ``"taylor:accumulated"`` is the other form.
    """
    data = ctx.require_data("taylor", labels=True)
    ctx.require_grad("taylor")
    scores = [torch.zeros_like(t.param, dtype=torch.float32) for t in ctx.targets]
    with preserved(ctx.model), torch.enable_grad():
        for batch in ctx.rank_share(data):
            for s, t, g in zip(scores, ctx.targets, _grads(ctx, batch)):
                s += (t.param.detach().float() * g.float()).abs()
    all_reduce_sum(*scores)
    return {t.name: s / len(data) for t, s in zip(ctx.targets, scores)}


@CRITERIA.register("taylor:accumulated", data_driven=True, needs_labels=True)
def taylor_accumulated(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """First-order Taylor estimate with the gradient accumulated over the batches, |w·Σ∂L/∂w|.

    The form of Torch-Pruning's ``TaylorImportance`` (``.backward()`` on every calibration
    batch, then the product): the estimated loss change of removing ``w`` on the
    calibration set as a whole, so gradients that flip sign between batches cancel —
    the opposite choice to ``"taylor"``'s per-batch mean of |w·g|. SNIP ranks alike (it
    normalises these scores to sum to one).
    """
    data = ctx.require_data("taylor:accumulated", labels=True)
    ctx.require_grad("taylor:accumulated")
    return dict(zip((t.name for t in ctx.targets), _accumulated_taylor(ctx, data)))


@CRITERIA.register("grasp", data_driven=True, needs_labels=True)
def grasp(ctx: ScoreContext, temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """Gradient Signal Preservation (Wang et al. 2020): score = w ⊙ Hg.

    GraSP removes the weights with the largest ``-w ⊙ Hg``; as a keep-score that is the
    largest ``w ⊙ Hg``. Logits are divided by ``temperature`` as in the reference code.
    """
    data = ctx.require_data("grasp", labels=True)
    ctx.require_grad("grasp")
    params = [t.param for t in ctx.targets]

    def loss(batch) -> torch.Tensor:
        x, y = batch
        out = ctx.outputs(x)
        if not isinstance(out, torch.Tensor):  # a tuple or ModelOutput: a raw TypeError
            raise ValueError(
                f"criterion 'grasp' divides the model's outputs by its temperature, so the "
                f"model must return a tensor of logits, got {type(out).__name__}; accepted: "
                "a model returning logits (wrap it), or the criteria 'snip' or 'taylor'")
        return ctx.loss(out / temperature, y)

    share = ctx.rank_share(data)
    with preserved(ctx.model), torch.enable_grad():
        g = [torch.zeros_like(p) for p in params]
        for batch in share:
            for acc, gi in zip(g, ctx.grad(loss(batch), params)):
                acc += gi
        all_reduce_sum(*g)
        hg = [torch.zeros_like(p) for p in params]
        for batch in share:
            gb = ctx.grad(loss(batch), params, create_graph=True)
            z = sum((gi * acc).sum() for gi, acc in zip(gb, g))
            for acc, h in zip(hg, ctx.grad(z, params)):
                acc += h
        all_reduce_sum(*hg)
    return {t.name: (t.param.detach() * h).float() for t, h in zip(ctx.targets, hg)}


@CRITERIA.register("synflow", data_driven=True)
def synflow(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """Iterative-Synaptic-Flow score |θ ⊙ ∂R/∂θ| with R = 1ᵀ(∏|θ|)1 (Tanaka et al. 2020).

    Data-free apart from the input shape, taken from ``data``. The network is
    linearised by taking |θ| of every parameter and evaluated in float64 in eval mode,
    through ``functional_call`` so the model's own tensors are never modified.
    (This is one SynFlow iteration; the paper's iterative schedule is a sequence of
    ``prune`` calls with increasing sparsity.)
    """
    x, _ = ctx.require_data("synflow", labels=False)[0]
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(
            f"criterion 'synflow' takes the input shape from the first batch of data, whose "
            f"inputs must be a tensor; got {type(x).__name__}"
        )
    model = ctx.model
    abs_params = {
        n: p.detach().abs().double().requires_grad_(True) for n, p in model.named_parameters()
    }
    buffers = {
        n: (b.double() if torch.is_floating_point(b) else b) for n, b in model.named_buffers()
    }
    ones = torch.ones((1, *x.shape[1:]), dtype=torch.float64, device=x.device)
    with preserved(model, train=False), torch.enable_grad():
        with model_errors("data", "the model cannot run on inputs of its shape"):
            out = functional_call(model, {**abs_params, **buffers}, (ones,))
        leaves = [abs_params[t.name] for t in ctx.targets]
        grads = torch.autograd.grad(out.sum(), leaves)
    return {t.name: (p * g).float() for t, p, g in zip(ctx.targets, leaves, grads)}
