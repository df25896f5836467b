"""How important each input activation is: the score that is compared with a threshold.

``teal`` (Liu et al. 2024) and ``cats`` use ``|x_j|``; ``wina`` (2025)
weighs it by the norm of the weight column it multiplies, ``|x_j| * ||W[:, j]||_2``, i.e. by
how much dropping it can change the output. A threshold ``t`` on the score is the same as the
per-feature threshold ``t / ||W[:, j]||`` on ``|x_j|``, which is what is installed, so that
applying any method is one comparison per input.

``cats`` is a variant of CATS (Lee et al. 2024): the paper thresholds ``|SiLU(gate(x))|``
and masks the gated product by it; here the threshold is on the down projection's input,
``|act(gate(x)) * up(x)|``, the tensor whose zeros the activation-sparse kernels skip, so
a small gate value beside a large ``up`` value survives and the two masks differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparsekit._checks import ArgumentTypeError, check_materialized
from sparsekit.registry import Registry

__all__ = ["METHODS", "feature_threshold", "score"]

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

METHODS: Registry[Score] = Registry("method", ordered=True)
"""Each method's per-feature scale ``fn(x, weight)``; the score is ``|x| * scale``."""


def _magnitude(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ones(weight.shape[1], dtype=x.dtype, device=x.device)


def _column_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight.to(torch.float32), dim=0).to(x.dtype)


METHODS.register("teal")(_magnitude)
METHODS.register("wina")(_column_norm)
METHODS.register("cats")(_magnitude)  # |x| too; find_layers picks the down projections


def score(method: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Importance of each input activation in ``x`` ``(..., in)`` for ``weight`` ``(out, in)``.

    ``x`` must be floating-point (integer inputs had their column norms truncated to
    integers) and as wide as ``weight``'s inputs. Scores are float32 for 16-bit ``x`` (a
    float16 column norm over 65504 was ``inf``, and every score of its column with it), and
    on ``x``'s device (``weight`` may sit elsewhere, e.g. offloaded to the CPU).
    """
    fn = METHODS.get(method)
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"x must be a floating-point tensor (..., in), got "
                                f"{type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise ArgumentTypeError(f"weight must be a 2-D tensor (out, in), got "
                                f"{type(weight).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (..., in), got {x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (out, in), got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features in its last "
                         f"dimension, but weight {tuple(weight.shape)} takes {weight.shape[1]} "
                         "inputs")
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    scale = fn(wide, weight)
    if scale.device != x.device:  # was a raw "not on the expected device" RuntimeError
        check_materialized("weight", weight)
        check_materialized("x", x)
        scale = scale.to(x.device)
    return wide.abs() * scale


def feature_threshold(method: str, threshold: float, weight: torch.Tensor) -> torch.Tensor:
    """The per-feature threshold on ``|x_j|`` equivalent to ``score >= threshold``.

    Float32, one value per input feature; ``inf`` where a column is all zero (such inputs
    never matter).
    """
    scale = METHODS.get(method)(weight.new_empty(0, dtype=torch.float32), weight)
    return torch.full_like(scale, threshold) / scale if threshold > 0 else torch.zeros_like(scale)
