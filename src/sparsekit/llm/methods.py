"""Layer-wise pruning methods: ``fn(W, stats, sparsity, pattern) -> (W_new, kept_mask)``.

``W`` is the layer's weight in ``(out, in)`` layout; ``stats`` the statistics of its
inputs over the calibration data (:class:`sparsekit.observe.InputStats`; ``None`` for
data-free methods). The Wanda score is the one of :mod:`sparsekit.scores.wanda`.

:func:`prune_layer` adds quantization. A layer's int8 grid (one scale per output row, or per
row and group of inputs) is the one of its unquantized pruned weight: SparseGPT's OBS
updates grow the kept weights (row maxima by up to 2x at 50 % on random layers), so the
dense weight's grid, GPTQ's choice, would clip them. A method with a ``joint`` rule
(SparseGPT) then prunes again onto that grid in one pass, compensating the rounding error
(so SparseGPT sweeps each layer twice); any other is rounded to nearest. The mask is the
method's: rounding never prunes a weight (a kept weight that rounds to zero stays kept), so
magnitude and Wanda keep the masks they choose unquantized; SparseGPT's joint sweep chooses
its masks adaptively from the weights it has updated, which now include the rounding
compensation, so a few may differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_int,
    check_materialized,
    check_sparsity,
)
from sparsekit.llm.sparsegpt import sparsegpt_prune
from sparsekit.observe import InputStats
from sparsekit.patterns import NM, Pattern, Unstructured, parse_pattern
from sparsekit.quantize import fake_quantize, int8_scales
from sparsekit.registry import Registry
from sparsekit.scores.wanda import wanda_scores
from sparsekit.select import top_k

LayerPrune = Callable[[torch.Tensor, "InputStats | None", float, Pattern],
                      tuple[torch.Tensor, torch.Tensor]]
JointPrune = Callable[[torch.Tensor, "InputStats | None", float, Pattern, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor]]
"""``fn(W, stats, sparsity, pattern, scales) -> (W_new, kept_mask)`` with ``W_new`` on the
int8 grid of ``scales`` (one per output row, or ``(rows, groups)`` with ``groups`` dividing
the inputs evenly)."""
QUANTIZE = ("int8",)
"""The accepted ``quantize`` values besides ``None``."""


@dataclass(frozen=True)
class Method:
    """A layer-wise pruning rule and the input statistics it needs."""

    prune: LayerPrune
    stats: bool = True  # needs the inputs' per-feature norms
    gram: bool = False  # needs the full Gram matrix (Hessian)
    joint: JointPrune | None = None  # prunes onto an int8 grid in one pass (else: then rounds)


METHODS: Registry = Registry("method")


def check_quantize(quantize: str | None) -> str | None:
    """``quantize``, validated: ``None`` or one of :data:`QUANTIZE`."""
    if quantize is None:
        return None
    # a bool or a number is the wrong type (a TypeError that ``except ValueError`` catches)
    kind = ValueError if isinstance(quantize, str) else ArgumentTypeError
    if kind is ArgumentTypeError or quantize not in QUANTIZE:
        raise kind(f"quantize must be None or one of {list(QUANTIZE)}, got {quantize!r}")
    return quantize


def prune_layer(
    method: Method,
    W: torch.Tensor,
    stats: InputStats | None,
    sparsity: float,
    pattern: str | Pattern,
    quantize: str | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(W_new, kept_mask, scales)``: ``W`` pruned by ``method`` and, with ``quantize="int8"``,
    on the symmetric int8 grid of ``scales`` (float32, one per output row, or with
    ``group_size`` one per row and group of ``group_size`` inputs; ``None`` unquantized), the
    grid of the unquantized pruned weight (see the module's notes).

    ``method`` is a :class:`Method` (``METHODS.get(name)``), ``W`` a finite 2-D
    floating-point tensor, ``pattern`` unstructured or N:M (a :class:`Pattern` or its
    string), ``sparsity`` in [0, 1); each is checked first (a ``ValueError`` naming it, an
    :class:`~sparsekit._checks.ArgumentTypeError` for a wrong type).
    """
    pattern = _check_layer_arguments(method, W, sparsity, pattern)
    check_quantize(quantize)  # "int4" was quantized to int8 without a word
    if group_size is not None:  # before the sweep: SparseGPT named the scales it derived
        check_int("group_size", group_size, minimum=1)
        cols = W.shape[1]
        if quantize is None or cols % group_size:
            raise ValueError(
                f"group_size must divide W's {cols} inputs and needs quantize='int8' (one "
                f"int8 scale per row and group of inputs, the groups of a row equal: a grid "
                f"with a partial last group cannot be attached), got group_size={group_size}"
                f"{'' if quantize else ' with quantize=None'}"
            )
    if method.stats and not isinstance(stats, InputStats):  # an AttributeError (... 'norms')
        raise ValueError("stats: this method needs the input statistics of the layer "
                         "(sparsekit.observe.InputStats), got "
                         f"{'None' if stats is None else type(stats).__name__}")
    if method.gram and stats.gram is None:  # a bare RuntimeError from InputStats.hessian
        raise ValueError("stats: this method needs the inputs' Gram matrix; accepted: "
                         "InputStats(features, gram=True), got one with gram=False")
    if method.stats and stats.rows == 0:
        # SparseGPT zeroed every weight (an all-"dead" Hessian), Wanda kept arbitrary ones
        # (all scores 0), while the masks said a share was kept
        raise ValueError("stats: holds no input rows (the calibration never ran the layer), "
                         "so this method has nothing to prune it by; accepted: statistics "
                         "that recorded the layer's inputs, or the 'magnitude' method")
    if method.stats:  # Wanda ranked NaN norms as it came, and returned a mask all the same
        check_finite("stats.sq", stats.sq, hint="the layer's inputs held NaN or inf")
    if quantize is not None and W.dtype == torch.float64 and W.numel():
        most = torch.finfo(torch.float32).max
        largest = float(W.detach().abs().max())
        if largest > most:  # its float32 copy was infinite: "weight holds NaN or infinite"
            raise ValueError(f"W holds a magnitude of {largest:.3g}, beyond float32's largest "
                             f"{most:.3g}, which int8 scales and codes are computed in; "
                             "accepted: weights within float32's range (rescale the weight), "
                             "or quantize=None")
    w, keep = method.prune(W, stats, sparsity, pattern)
    if quantize is None:
        return w, keep, None
    w = w.float()  # a float64 layer's too: int8 scales and codes are float32
    scales = int8_scales(w, group_size)
    if method.joint is None:
        return fake_quantize(w, scales, group_size), keep, scales
    w, keep = method.joint(W, stats, sparsity, pattern, scales)
    return w, keep, scales


def _check_layer_arguments(method: Method, W: torch.Tensor, sparsity: float,
                           pattern: str | Pattern) -> Pattern:
    """The parsed ``pattern``, once :func:`prune_layer`'s layer is checked: a method name
    was an ``AttributeError``, a pattern string ("2:4") was pruned as unstructured, a
    sparsity of 1.5 was a bare "k must be ≥ 0" and NaN a raw conversion error, a 1-D ``W``
    was pruned as a row and NaN weights kept at random."""
    if not isinstance(method, Method):
        raise ArgumentTypeError(f"method must be a Method (sparsekit.llm.METHODS.get(name)), "
                                f"got {type(method).__name__}")
    pat = parse_pattern(pattern)
    if not isinstance(pat, (Unstructured, NM)):
        raise ValueError(f"pattern {pat.spec!r} is not supported here; accepted: "
                         "'unstructured' or N:M such as '2:4'")
    check_sparsity(sparsity)
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        got = W.dtype if isinstance(W, torch.Tensor) else type(W).__name__
        raise ArgumentTypeError(f"W must be a real floating-point tensor, got {got}")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    pat.check(W.shape, "W")
    check_materialized("W", W)
    if not bool(W.detach().isfinite().all()):
        raise ValueError("W holds non-finite values (NaN or inf); accepted: finite weights")
    return pat


def keep_mask(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, *, per_row: bool
) -> torch.Tensor:
    """Keep the highest ``scores``: exactly N of M for N:M patterns, else ``1 − sparsity`` of
    each row (``per_row``) or of the whole layer."""
    if isinstance(pattern, NM):
        return pattern.mask(scores, scores.numel())
    if not per_row:
        return pattern.mask(scores, round(scores.numel() * (1.0 - sparsity)))
    return top_k(scores, round(scores.shape[1] * (1.0 - sparsity)), dim=1)


def magnitude(W: torch.Tensor, _stats: InputStats | None, sparsity: float, pattern: Pattern):
    """Keep the largest |W| of the layer."""
    mask = keep_mask(W.abs(), sparsity, pattern, per_row=False)
    return W * mask, mask


def wanda(W: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern):
    """Keep the highest |W_ij| · ‖X_j‖₂ of each output row (Wanda's comparison group)."""
    mask = keep_mask(wanda_scores(W, stats), sparsity, pattern, per_row=True)
    return W * mask, mask


def sparsegpt(W: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern):
    """SparseGPT's OBS reconstruction with H = 2XXᵀ."""
    return sparsegpt_prune(W, stats.hessian(), sparsity, pattern)


def sparsegpt_joint(W: torch.Tensor, stats: InputStats | None, sparsity: float,
                    pattern: Pattern, scales: torch.Tensor):
    """SparseGPT's joint mode: the kept weights' int8 rounding error is compensated too."""
    return sparsegpt_prune(W, stats.hessian(), sparsity, pattern, scales=scales)


METHODS.register("magnitude")(Method(magnitude, stats=False))
METHODS.register("wanda")(Method(wanda))
METHODS.register("sparsegpt")(Method(sparsegpt, gram=True, joint=sparsegpt_joint))
