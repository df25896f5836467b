"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with optimal-brain-surgeon updates.

Columns are visited left to right in blocks; each pruned weight's error is compensated by
updating the not-yet-visited weights of its row through the Cholesky factor of H⁻¹, so the
layer's output ‖WX − ŴX‖ stays small. The mask is chosen adaptively per block of columns
(unstructured) or per group of M columns (N:M), as in the authors' reference code.

Joint mode (the paper's "Joint Sparsification & Quantization"): given int8 scales per row
(or per row and group of consecutive inputs, GPTQ's groups), fixed before the sweep, each
kept weight of a column is rounded to that grid as the column is visited, and its rounding
error joins the pruning error that the update compensates on the columns still to come;
the result lies exactly on the grid.
"""

from __future__ import annotations

import math

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_fraction,
    check_int,
    check_materialized,
    check_positive,
)
from sparsekit.patterns import NM, Pattern, Unstructured, parse_pattern
from sparsekit.quantize import check_scale_values, fake_quantize, group_size_of

BLOCKSIZE = 128
"""Columns swept per block by default (the reference code's), rounded up to a multiple of M
for N:M patterns."""


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: str | Pattern = "unstructured",
    blocksize: int | None = None,
    percdamp: float = 0.01,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (out, in) given the Hessian ``H = 2XXᵀ`` (in, in) of its inputs.

    Returns the updated weights (zero where pruned; float32, the sweep's precision, whatever
    ``W``'s dtype: the caller rounds them once, where it writes them) and the mask (``True``
    = kept). With an
    N:M pattern exactly N of every M consecutive inputs are kept and ``sparsity`` is unused.
    ``percdamp`` adds that fraction of the mean diagonal to H for numerical stability. H is
    first divided by the mean of its non-zero diagonal (which leaves the solution unchanged),
    so Hessians of very small or very large activations are pruned alike.
    With ``scales`` (float32, one per output row, or ``(out, groups)`` for groups of
    ``in / groups`` consecutive inputs; :func:`sparsekit.llm.methods.prune_layer` passes the
    :func:`~sparsekit.quantize.int8_scales` of the unquantized result) the kept weights are
    rounded to that int8 grid inside the sweep (joint mode): the returned weights are
    ``dequantize_int8(codes, scales, group_size)`` exactly.

    The columns are swept ``blocksize`` at a time (default :data:`BLOCKSIZE`); for N:M
    patterns it must be a multiple of M, so that no group of M straddles two blocks, and
    the number of columns must be one too. Every argument is checked first (a ``ValueError``
    naming it, an :class:`~sparsekit._checks.ArgumentTypeError` for a wrong type): ``W``,
    ``H`` and ``scales`` must be finite real floating-point tensors (a complex one lost its
    imaginary part, a bool one counted as 0 and 1), ``H`` symmetric up to rounding
    (:data:`SYMMETRY_RTOL` of its largest magnitude: the factorisation reads only its lower
    triangle) with a non-negative diagonal (as every Hessian ``2XXᵀ`` is), ``W``'s
    magnitudes within float32's range (the sweep's), ``scales`` positive,
    ``sparsity`` in [0, 1), ``percdamp`` positive. A damped
    ``H`` that still does not factor (an indefinite ``H``, or a singular one with a
    ``percdamp`` too small for float32) is a ``ValueError`` naming ``percdamp``.
    """
    pat, blocksize = _check_arguments(W, H, sparsity, pattern, blocksize, percdamp, scales)
    group = None if scales is None else group_size_of(W, scales)
    W = W.detach().float().clone(memory_format=torch.contiguous_format)
    H = H.detach().double()
    rows, cols = W.shape

    # inputs never active in the calibration data: H holds nothing of them. Their weights
    # are kept as they are unless pruned like any other (the reference zeroes them, which
    # changed the model at sparsity 0 where those inputs fire, its masks calling them kept)
    dead = torch.diag(H) == 0
    if not bool(dead.all()):
        # H / c has the same OBS solution (masks and updates) as H for any c > 0; scaled to
        # a unit mean diagonal (in float64), a Hessian of tiny (denormal) or huge activations
        # factors like any other instead of failing in Cholesky or overflowing float32
        H = H / torch.diag(H)[~dead].mean()
    H = H.float().clone(memory_format=torch.contiguous_format)
    H[dead, dead] = 1
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, device=H.device)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)),
                                     upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"H with percdamp={percdamp!r} of its mean diagonal added is not positive "
            f"definite ({e}); accepted: the Hessian 2XXᵀ of the layer's inputs (symmetric "
            "positive semi-definite) and a percdamp large enough to make it invertible "
            "(raise percdamp, e.g. to 0.1)"
        ) from e

    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        err = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if isinstance(pat, Unstructured):  # the lowest OBS saliencies w² / [H⁻¹]²_jj of the block
            saliency = (W1 / d) ** 2
            k = round(saliency.numel() * sparsity)
            mask1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if isinstance(pat, NM) and i % pat.m == 0:
                saliency = (W1[:, i:i + pat.m] / d[i:i + pat.m]) ** 2
                drop = torch.topk(saliency, pat.m - pat.n, dim=1, largest=False).indices
                mask1[:, i:i + pat.m].scatter_(1, drop, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            if scales is not None:  # the rounding error is compensated like the pruning error
                column = scales if group is None else scales[:, (i1 + i) // group]
                q = fake_quantize(q.unsqueeze(1), column).squeeze(1)
            e = (w - q) / d[i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return W.masked_fill(pruned, 0), ~pruned


def _check_arguments(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: str | Pattern,
    blocksize: int | None,
    percdamp: float,
    scales: torch.Tensor | None,
) -> tuple[Unstructured | NM, int]:
    """The parsed pattern and the block size, once every argument of :func:`sparsegpt_prune`
    is checked; unchecked, bad values fail late and obscurely (a bare ``IndexError`` or
    Cholesky error) or, worse, give a wrong mask (N:M groups cut at block edges, a block
    size below 1 pruning nothing) or NaN weights."""
    pat = parse_pattern(pattern)
    if not isinstance(pat, (Unstructured, NM)):
        raise ValueError(f"pattern {pat.spec!r}: SparseGPT supports 'unstructured' and N:M")
    check_fraction("sparsity", sparsity)
    check_positive("percdamp", percdamp)
    for name, t in (("W", W), ("H", H), ("scales", scales)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("W", W), ("H", H), ("scales", scales)):
        if t is not None:
            check_materialized(name, t)
    for name, t in (("W", W), ("H", H)):
        if not t.is_floating_point():  # complex, integer or bool
            raise ArgumentTypeError(f"{name} must be a real floating-point tensor, got "
                                    f"{t.dtype}")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out, in) weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must be the ({cols}, {cols}) Hessian of W's {cols} inputs, got "
                         f"shape {tuple(H.shape)}")
    if scales is not None and (scales.shape[:1] != (rows,) or scales.dim() > 2
                               or not scales.is_floating_point()):
        raise ValueError(f"scales must be floating of shape ({rows},) (one per row of W) or "
                         f"({rows}, groups) (one per row and group of inputs), got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if scales is not None:
        group_size_of(W, scales)  # the groups divide the inputs evenly
    pat.check(W.shape, "W")
    for name, t in (("W", W), ("H", H), ("scales", scales)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} holds non-finite values (NaN or inf); accepted: finite "
                             "values only (they would make every updated weight NaN)")
    most = torch.finfo(torch.float32).max
    if W.numel() and torch.finfo(W.dtype).max > most and float(W.detach().abs().max()) > most:
        raise ValueError(  # the float32 copy swept was infinite: NaN weights
            f"W holds a magnitude of {float(W.detach().abs().max()):.3g}, beyond float32's "
            f"largest {most:.3g}, which SparseGPT computes in; rescale the weight")
    if scales is not None:  # checked in the sweep, after the Cholesky factorisation
        check_scale_values(scales.detach().to(torch.float32))
    _check_symmetric(H)
    if bool((torch.diag(H) < 0).any()):  # divided by a negative mean, it factored "fine"
        raise ValueError(f"H has {int((torch.diag(H) < 0).sum())} negative diagonal "
                         "entries; accepted: the Hessian 2XXᵀ of W's inputs, whose diagonal "
                         "(the inputs' squared sums) is never negative")
    if blocksize is None:  # whole groups of M per block
        return pat, (math.ceil(BLOCKSIZE / pat.m) * pat.m if isinstance(pat, NM) else BLOCKSIZE)
    check_int("blocksize", blocksize, minimum=1)
    if isinstance(pat, NM) and blocksize % pat.m:
        raise ValueError(f"blocksize must be a multiple of {pat.m} for pattern {pat.spec!r} "
                         f"(a group of {pat.m} columns may not straddle two blocks), got "
                         f"{blocksize!r}")
    return pat, blocksize


_SYMMETRY_ROWS = 512  # rows of H compared with its columns at a time

SYMMETRY_RTOL = 1e-3
"""How far ``H`` may be from symmetric, relative to its largest magnitude (float32 sums of
``XᵀX`` accumulated in another order differ by far less; half precision: 16 ulps)."""


def _check_symmetric(H: torch.Tensor) -> None:
    """Raise unless the (finite) ``H`` is symmetric up to rounding: the Cholesky factor reads
    only its lower triangle, so a non-symmetric one (a triangular matrix, a transposed mix
    of two Hessians) was pruned silently as that triangle mirrored."""
    if H.numel() == 0:
        return
    h = H.detach()
    largest = float(h.abs().max())
    worst, i, j = 0.0, 0, 0
    for start in range(0, h.shape[0], _SYMMETRY_ROWS):  # no (in, in) temporary: 0.5 GB at 11008
        gap = (h[start:start + _SYMMETRY_ROWS] - h[:, start:start + _SYMMETRY_ROWS].t()).abs_()
        at = int(gap.argmax())  # of its values in row-major order, whatever its strides
        if float(gap.flatten()[at]) > worst:  # view(-1) failed for an H of other strides
            worst = float(gap.flatten()[at])
            i, j = start + at // h.shape[1], at % h.shape[1]
    tolerance = max(SYMMETRY_RTOL, 16 * torch.finfo(H.dtype).eps) * largest
    if worst > tolerance:
        raise ValueError(
            f"H is not symmetric: H[{i}, {j}] = {float(H[i, j]):.6g} but H[{j}, {i}] = "
            f"{float(H[j, i]):.6g} (a difference of {worst:.3g}, above {tolerance:.3g}, "
            f"{max(SYMMETRY_RTOL, 16 * torch.finfo(H.dtype).eps):g} of its largest magnitude "
            f"{largest:.3g}); accepted: the Hessian 2XᵀX of W's inputs, which is symmetric "
            "(symmetrize a nearly symmetric one with (H + H.T) / 2)"
        )
