"""Bring dead latents back: reinitialise them on the inputs the SAE reconstructs worst.

Bricken et al. 2023 ("Towards Monosemanticity", appendix on neuron resampling): a latent
that has stopped firing is given a new direction taken from an input the dictionary
explains badly, so it starts where it is needed instead of where it died. For every dead
latent one input row is sampled (without replacement) with probability proportional to its
squared reconstruction loss; then

- its decoder row ``W_dec[j]`` becomes that row's target (the input itself for an
  autoencoder, centred on ``b_dec``), at unit norm;
- its encoder column ``W_enc[:, j]`` becomes the same input direction scaled to
  ``encoder_scale`` times the mean norm of the live latents' encoder columns, and its
  encoder bias is zeroed. The default 0.2 is Bricken et al.'s factor and the safer one:
  on MiniLM activations it gave lower held-out FVU than 1.0 for TopK and BatchTopK at as
  few dead latents, and 1.0 with a short dead window made BatchTopK resample in a cascade
  (new full-norm latents crowd out the batch's top k, more latents die, ...). A tiny
  dictionary whose live latents are sharp may need 1.0 for a reborn TopK latent to
  outscore the ``k`` best;
- its optimizer state (Adam's moments, SGD's momentum: every per-parameter state tensor of
  the parameter's shape) is zeroed in those entries, so stale moments of the dead latent do
  not throw the new direction away on the next step;
- its count of tokens since firing restarts at zero (it gets a full window to fire).

Nothing else changes: the other latents' weights and optimizer state are left bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_materialized,
    check_materialized_module,
    check_optimizer,
    check_positive,
    check_writable,
)
from sparsekit.masks import elementwise_state
from sparsekit.sae.sae import SAE

__all__ = ["resample"]

ENCODER_SCALE = 0.2  # new encoder columns at 0.2x the live ones' mean norm (Bricken et al.)


@torch.no_grad()
def resample(
    sae: SAE,
    x: torch.Tensor,
    dead: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    encoder_scale: float = ENCODER_SCALE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reinitialise the latents marked in ``dead`` from rows of ``x`` ``(n, d_in)`` sampled
    in proportion to their squared reconstruction loss (``target`` ``(n, d_out)``: a
    transcoder's); return the indices of the latents resampled.

    ``optimizer`` is the one training ``sae`` (any ``torch.optim`` optimizer, or a wrapper
    exposing one as ``.optimizer``, as :func:`~sparsekit.sae.train` takes): its state of
    the resampled entries is zeroed. Every latent gets a different row while ``x`` has
    enough rows with a non-zero loss; rows whose loss is zero are never sampled, and when
    every loss is zero nothing is resampled. ``generator`` draws the rows.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    check_materialized_module(sae, "sae.")
    sae._check_weights()  # a NaN weight made a NaN loss: rows drawn at random, or an error
    for name in ("W_dec", "W_enc", "b_enc", "tokens_since_fired"):  # written in place
        check_writable(f"sae.{name}", getattr(sae, name))
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sae.d_in:
        raise ValueError(f"x must be a tensor of shape (n, {sae.d_in}), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if target is None and sae.transcoder:
        raise ValueError(f"target must be given for a transcoder (it reconstructs a target "
                         f"of width d_out={sae.d_out}, not x), got None")
    if target is not None and (not isinstance(target, torch.Tensor)
                               or target.shape != (x.shape[0], sae.d_out)):
        raise ValueError(f"target must be a tensor of shape ({x.shape[0]}, {sae.d_out}), got "
                         f"{getattr(target, 'shape', type(target).__name__)}")
    for name, values in (("x", x), ("target", target)):
        if values is not None:
            _check_values(name, values, sae.W_enc.dtype)
    check_dead(sae, dead)
    check_positive("encoder_scale", encoder_scale)
    optimizer = check_optimizer(optimizer, optional=True)  # a wrapper (Lightning's) was refused
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ArgumentTypeError(f"generator must be a torch.Generator or None, got "
                                f"{type(generator).__name__}")

    latents = dead.nonzero().squeeze(1)
    x = x.to(sae.W_enc.dtype)
    target = x if target is None else target.to(sae.W_dec.dtype)
    # in float64: the squared error of finite float32 rows overflowed past ~1e19, and its
    # square (the weights) past ~1e9, failing the draw with a raw "probability tensor
    # contains either inf, nan"
    loss = (sae.decode_sparse(*sae.encode_sparse(x)).double() - target.double()).pow(2).sum(-1)
    if latents.numel() == 0 or not bool((loss > 0).any()):
        return latents[:0]
    # distinct rows while there are enough with a loss: two latents reborn on one row
    # would compete for it and one would die again
    weights = (loss / loss.max()).pow(2)  # ∝ loss², scaled to stay finite
    distinct = int((weights > 0).sum()) >= latents.numel()
    rows = torch.multinomial(weights, latents.numel(), replacement=not distinct,
                             generator=generator)

    inputs = x[rows] if sae.transcoder else x[rows] - sae.b_dec
    outputs = target[rows] if sae.transcoder else inputs
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else 1.0
    direction = inputs / inputs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    encoder = (direction * (encoder_scale * alive_norm)).t()
    if not bool(torch.isfinite(encoder).all()):  # checked before anything is written
        raise ValueError(f"encoder_scale={encoder_scale!r} times the live latents' encoder "
                         f"norm {float(alive_norm):g} overflows {sae.W_enc.dtype}; accepted: "
                         f"a scale whose new encoder columns stay finite")
    sae.W_dec[latents] = outputs / outputs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sae.W_enc[:, latents] = encoder
    sae.b_enc[latents] = 0.0
    sae.tokens_since_fired[latents] = 0
    if optimizer is not None:
        _reset_state(optimizer, {sae.W_dec: (latents,), sae.W_enc: (slice(None), latents),
                                 sae.b_enc: (latents,)})
    return latents


def check_dead(sae: SAE, dead: Any) -> None:
    """Raise ``ValueError`` unless ``dead`` is a bool tensor marking latents of ``sae``,
    shape ``(n_latents,)`` (what :meth:`SAE.dead_latents` returns): another shape failed
    inside the auxiliary-k loss with a bare ``RuntimeError``, a float mask at ``~dead``,
    a meta one (no values to read) at ``.any()``."""
    if not isinstance(dead, torch.Tensor) or dead.dtype != torch.bool \
            or dead.shape != (sae.n_latents,):
        raise ValueError(f"dead must be a bool tensor of shape ({sae.n_latents},), got "
                         f"{getattr(dead, 'dtype', type(dead).__name__)} "
                         f"{tuple(getattr(dead, 'shape', ()))}")
    check_materialized("dead", dead)


def _check_values(name: str, values: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise unless ``values`` are real floats that stay finite in ``dtype`` (and exist: not
    on the meta device): a NaN loss samples no row, so dead latents were silently left
    dead."""
    if not values.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {values.dtype}")
    check_materialized(name, values)
    check_finite(name, values, dtype=dtype)


def _reset_state(optimizer: torch.optim.Optimizer,
                 entries: dict[torch.nn.Parameter, tuple]) -> None:
    """Zero ``entries[p]`` of every state tensor the optimizer keeps in ``p``'s shape."""
    for param, where in entries.items():
        for value in elementwise_state(optimizer, param).values():
            value[where] = 0
