"""The activation functions of sparse autoencoders: pre-activations in, sparse codes out.

Each function maps pre-activations ``pre`` (``(..., n_latents)``) to codes of the same shape
in which most entries are exactly zero, and is registered in :data:`ACTIVATIONS` with the
facts the rest of the package needs: whether it takes ``k``, which penalty the training
loss adds (``"l1"``, ``"l0"`` or none) and the architecture name SAELens files use.

- ``topk`` keeps the ``k`` largest pre-activations of every row, ReLU'd (Gao et al. 2024);
- ``batchtopk`` keeps the ``k · rows`` largest of the whole batch while training, so rows
  share a budget of ``k`` on average; in eval mode it is a JumpReLU at the threshold
  learned while training (Bussmann et al. 2024);
- ``abstopk`` keeps the ``k`` largest magnitudes of every row with their signs;
- ``jumprelu`` zeroes pre-activations at or below a learned per-latent threshold; the step
  has no gradient, so the threshold learns through a straight-through estimator with a
  rectangle kernel of width ``bandwidth`` (Rajamanoharan et al. 2024);
- ``l1`` is a plain ReLU, made sparse by the L1 penalty of the training loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sparsekit.registry import Registry

__all__ = ["ACTIVATIONS", "abstopk", "batchtopk", "jumprelu", "l1", "step", "topk"]

Activation = Callable[..., torch.Tensor]

ACTIVATIONS: Registry[Activation] = Registry(
    "activation", meta={"uses_k": False, "penalty": None, "sae_lens": "standard"}, ordered=True
)


def select_topk(pre: torch.Tensor, k: int, *, signed: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``k`` kept latents of every row (``(..., k)`` each).

    The form a sparse decoder reads: ReLU'd largest values, or (``signed``) the
    largest magnitudes with their signs.
    """
    if signed:
        indices = pre.abs().topk(k, dim=-1, sorted=False).indices
        return pre.gather(-1, indices), indices
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.relu(), indices


def _scatter(pre: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return pre.new_zeros(pre.shape).scatter(-1, indices, values)


@ACTIVATIONS.register("topk", uses_k=True, sae_lens="topk")
def topk(pre: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    """The ``k`` largest pre-activations of every row, ReLU'd; the rest zero."""
    return _scatter(pre, *select_topk(pre, k))


@ACTIVATIONS.register("abstopk", uses_k=True, sae_lens="abstopk")
def abstopk(pre: torch.Tensor, *, k: int, **_: Any) -> torch.Tensor:
    """The ``k`` largest-magnitude pre-activations of every row, signs kept."""
    return _scatter(pre, *select_topk(pre, k, signed=True))


@ACTIVATIONS.register("batchtopk", uses_k=True, sae_lens="jumprelu")
def batchtopk(pre: torch.Tensor, *, k: int, threshold: torch.Tensor | None = None,
              **_: Any) -> torch.Tensor:
    """The ``k · rows`` largest ReLU'd pre-activations of the batch (``threshold=None``), or
    those above ``threshold`` (inference: a JumpReLU without a learned gradient)."""
    acts = pre.relu()
    if threshold is not None:
        return acts * (pre > threshold)
    flat = acts.flatten()
    values, indices = largest(flat, min(k * pre[..., 0].numel(), flat.numel()))
    return flat.new_zeros(flat.shape).scatter(0, indices, values).view(pre.shape)


_SAMPLE_STRIDE = 61  # every 61st entry estimates where the largest ones start
_SAMPLE_MARGIN = 1.25  # the estimate keeps this many times the wanted share, and 16 more


def largest(flat: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of the ``count`` largest entries of the 1-D ``flat``, as
    ``flat.topk(count, sorted=False)`` returns them (the same entries, in no fixed order).

    A batch's top ``k · rows`` is a large ``k`` over a long vector, where ``topk`` is slow
    on the CPU (14 ms for 32,768 of 1024 x 1536 on one thread). A strided sample of the
    entries estimates a value a few more than ``count`` entries reach; ``topk`` then runs
    over those candidates only (3 ms). Where the estimate keeps too few, the whole vector
    is ranked, so the result is always exact.
    """
    n = flat.numel()
    if count >= n:  # every entry (an empty batch too): nothing to estimate
        return flat.topk(count, sorted=False)
    sample = flat[::_SAMPLE_STRIDE]
    wanted = int(count / n * sample.numel() * _SAMPLE_MARGIN) + 16
    if wanted >= sample.numel():
        return flat.topk(count, sorted=False)
    floor = sample.topk(wanted, sorted=False).values.min()
    candidates = (flat >= floor).nonzero().squeeze(1)
    if candidates.numel() < count:
        return flat.topk(count, sorted=False)
    kept = flat[candidates].topk(count, sorted=False)
    return kept.values, candidates[kept.indices]


class _Step(torch.autograd.Function):
    """H(pre - threshold) whose gradient to ``threshold`` is the rectangle-kernel estimate
    -1/bandwidth · 1{|pre - threshold| < bandwidth/2}; no gradient flows to ``pre``."""

    @staticmethod
    def forward(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pre, threshold, bandwidth = inputs
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(grad * near / ctx.bandwidth).reshape(-1, pre.shape[-1]).sum(0)
        return None, grad_threshold, None


def step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """1 where ``pre > threshold``, else 0, with the straight-through threshold gradient
    (the L0 count of a JumpReLU SAE is ``step(...).sum(-1)``)."""
    return _Step.apply(pre, threshold, bandwidth)


@ACTIVATIONS.register("jumprelu", penalty="l0", sae_lens="jumprelu")
def jumprelu(pre: torch.Tensor, *, threshold: torch.Tensor, bandwidth: float = 1e-3,
             **_: Any) -> torch.Tensor:
    """``pre`` where it exceeds ``threshold``, else 0; ``pre`` gets the ordinary gradient
    where kept, ``threshold`` the straight-through estimate of ``step`` scaled by it."""
    gate = step(pre, threshold, bandwidth)
    # the jump at the threshold has height `threshold`: the estimator's gradient to it is
    # threshold × that of the step (Rajamanoharan et al., eq. 11); an infinite threshold (a
    # latent that never fires, as load takes it) gets none: 0 × inf made its codes NaN
    height = threshold.masked_fill(threshold.isinf(), 0)
    return pre * gate.detach() + (gate - gate.detach()) * height


@ACTIVATIONS.register("l1", penalty="l1", sae_lens="standard")
def l1(pre: torch.Tensor, **_: Any) -> torch.Tensor:
    """ReLU: the L1 penalty of the training loss makes the codes sparse."""
    return pre.relu()
