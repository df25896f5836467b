"""Train a sparse autoencoder on a stream of activations.

:func:`objective` is the loss of one batch, stated once for every variant: squared error
(summed over features, averaged over tokens, as SAELens does), averaged over the Matryoshka
prefixes, plus the activation's penalty (L1 on decoder-norm-weighted codes, or the
straight-through L0 of JumpReLU) and, for the TopK family, the auxiliary-k loss that makes
dead latents predict the residual the live ones leave (Gao et al. 2024, appendix B.1).
:func:`train` runs a real ``torch.optim.Adam`` (fused where the build supports it) over any
iterable of activation tensors, re-batched to ``batch_size`` rows, keeping the decoder rows
at unit norm when the SAE asks for it, and every ``resample_every`` steps gives the latents
that died new directions from the batch's worst-reconstructed rows
(:func:`~sparsekit.sae.resample`, Bricken et al. 2023).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_fraction,
    check_int,
    check_materialized,
    check_materialized_module,
    check_nonnegative,
    check_optimizer,
    check_positive,
    check_writable,
)
from sparsekit.sae.activations import ACTIVATIONS, select_topk, step
from sparsekit.sae.resample import ENCODER_SCALE, check_dead, resample
from sparsekit.sae.sae import SAE, SPARSE_DECODE_DENSITY, _nonzeros

__all__ = ["objective", "train"]

Pair = tuple[torch.Tensor, torch.Tensor]


def objective(
    sae: SAE,
    x: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    sparsity_coef: float = 0.0,
    aux_coef: float = 1 / 32,
    dead: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Loss terms of one batch ``x`` ``(n, d_in)`` (``target``: a transcoder's ``(n, d_out)``,
    default ``x``); ``"loss"`` is their sum, the one to differentiate.

    ``dead`` marks the latents the auxiliary-k loss recruits (see :meth:`SAE.dead_latents`).
    Side effect in training mode: the SAE records which latents fired. Every argument is
    checked before it: ``x`` and ``target`` (width, at least one row, matching rows,
    finite values; no rows made every term NaN), the coefficients (finite, ≥ 0: a
    negative one rewards what it should penalise) and ``dead``.
    """
    if not isinstance(sae, SAE):
        raise ArgumentTypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    check_materialized_module(sae, "sae.")
    sae._check_width(x, sae.d_in)
    sae._check_real(x)
    if x.numel() == 0:
        raise ValueError(f"x must hold at least one row of width {sae.d_in}, got shape "
                         f"{tuple(x.shape)}")
    sae._check_autograd()
    x = check_finite("x", x, dtype=sae.W_enc.dtype)
    check_nonnegative("sparsity_coef", sparsity_coef)
    check_nonnegative("aux_coef", aux_coef)
    if dead is not None:
        check_dead(sae, dead)
    if target is None and sae.d_out != sae.d_in:
        raise ValueError(f"target must be given for a transcoder (d_out={sae.d_out} != "
                         f"d_in={sae.d_in}), got None")
    if target is not None:
        sae._check_width(target, sae.d_out, "target")
        sae._check_real(target, "target")  # a complex target made the loss complex
        if target.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"target must have shape {(*x.shape[:-1], sae.d_out)} (x's rows), "
                             f"got {tuple(target.shape)}")
        check_finite("target", target, dtype=sae.W_enc.dtype)
    return _objective(sae, x, target, sparsity_coef=sparsity_coef, aux_coef=aux_coef,
                      dead=dead)


def _objective(sae: SAE, x: torch.Tensor, target: torch.Tensor | None, *,
               sparsity_coef: float, aux_coef: float, dead: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    """:func:`objective` of a batch already checked (:func:`train` checks every item as it
    reads it, and does not pay for the check twice)."""
    target = x if target is None else target
    pre = sae._pre_activations(x)
    if sae.activation in ("topk", "abstopk"):
        values, indices = select_topk(pre, sae.k, signed=sae.activation == "abstopk")
    else:
        values, indices = _nonzeros(sae.activate(pre))
    if sae.training:
        sae.record_firing(values.detach(), indices)

    dense = values.shape[-1] > SPARSE_DECODE_DENSITY * sae.n_latents and not sae.matryoshka
    if dense:  # an L1 or JumpReLU SAE early in training: most codes still non-zero
        recon = sae._decode(sae.activate(pre))
    errors = []
    for prefix in sae.matryoshka or (sae.n_latents,):
        if not dense:
            kept = values if prefix == sae.n_latents else values * (indices < prefix)
            recon = sae._decode_sparse(kept, indices)
        errors.append((recon - target).pow(2).sum(-1).mean())
    terms = {"mse": torch.stack(errors).mean()}

    penalty = ACTIVATIONS.meta(sae.activation)["penalty"]
    if penalty == "l1":
        norms = sae.W_dec.norm(dim=-1)
        terms["l1"] = sparsity_coef * (values.abs() * norms[indices]).sum(-1).mean()
    elif penalty == "l0":
        terms["l0"] = sparsity_coef * step(pre, sae.jump_threshold, sae.bandwidth).sum(-1).mean()
    if sae.k is not None and dead is not None and bool(dead.any()):
        terms["aux"] = aux_coef * _aux_k(sae, pre, (target - recon).detach(), dead)
    terms["loss"] = sum(terms.values())
    return terms


def _aux_k(sae: SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor
           ) -> torch.Tensor:
    """Squared error of the residual predicted by the top ``d_out / 2`` dead latents alone,
    scaled down when fewer latents are dead."""
    k_aux = sae.d_out // 2
    n_dead = int(dead.sum())
    scale = min(n_dead / max(k_aux, 1), 1.0)
    values, indices = select_topk(pre.masked_fill(~dead, -math.inf), min(k_aux, n_dead))
    values = values.nan_to_num(0.0, posinf=0.0, neginf=0.0)
    predicted = sae._decode_sparse(values, indices) - sae.b_dec
    return scale * (predicted - residual).pow(2).sum(-1).mean()


@torch.enable_grad()  # a call under torch.no_grad() trains too, as the routers' fits do
def train(
    sae: SAE,
    activations: Iterable[torch.Tensor] | Iterable[Pair] | torch.Tensor,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 4096,
    sparsity_coef: float = 0.0,
    aux_coef: float = 1 / 32,
    dead_window: int = 1_000_000,
    decay: float = 0.2,
    optimizer: torch.optim.Optimizer | None = None,
    resample_every: int | None = None,
    resample_scale: float = ENCODER_SCALE,
    clip_grad_norm: float | None = 1.0,
) -> dict[str, Any]:
    """Train ``sae`` in place on ``activations``; return what happened.

    Args:
        sae: the module to train.
        activations: tensors ``(..., d_in)`` (rows are tokens), or for a transcoder
            ``(input, target)`` pairs; any iterable (a list, a generator from
            :func:`~sparsekit.sae.capture`), re-batched to ``batch_size`` rows and read once
            unless ``steps`` asks for more and the iterable can be iterated again. Each
            item is checked as it is read (finite floats of the SAE's width), so the first
            batch is checked before anything changes, but a stream is not read ahead: a bad
            later item (named ``activations batch i``, the ``i``-th item of a pass) fails
            after the steps on the items before it, with the SAE left in eval mode.
            Values are checked after the cast to the SAE's dtype (a float64 1e300 is
            inf in float32).
        steps: optimizer steps (default: one pass over ``activations``).
        lr: Adam's learning rate (default ``2e-4 / sqrt(n_latents / 2**14)``, the
            scaling law of Gao et al.); not with ``optimizer``, which has its own.
        batch_size: rows per step.
        sparsity_coef: weight of the L1 (``"l1"``) or L0 (``"jumprelu"``) penalty.
        aux_coef: weight of the auxiliary-k loss (TopK family).
        dead_window: a latent is dead after this many tokens without firing.
        decay: the learning rate decays linearly to 0 over this last fraction of
            ``steps`` (needs ``steps``).
        optimizer: any ``torch.optim`` optimizer over ``sae``'s parameters instead of Adam.
            The ``decay`` schedule scales its param groups' learning rates while training;
            they are restored as given when training ends (or fails), so the caller's
            optimizer does not keep a rate decayed to 0.
        resample_every: after every this many steps (not after the last of ``steps``),
            latents dead for ``dead_window`` tokens are reinitialised from the current
            batch's rows with the largest reconstruction loss, and their optimizer state is
            reset (see :func:`~sparsekit.sae.resample`). Default: never.
        resample_scale: a reborn latent's encoder norm over the live ones' mean
            (``encoder_scale`` of :func:`~sparsekit.sae.resample`).
        clip_grad_norm: the gradients' total norm is clipped to this before every step
            (``None``: never), as SAELens does: it tames the large early steps. On MiniLM
            activations (TopK, k = 32, 1536 latents, 1M tokens) it took the held-out FVU
            from 0.160 to 0.155 with a unit-norm decoder, and to 0.148 with an
            unconstrained one started at ``init_norm=0.1`` (SAELens: 0.150).

    Returns:
        ``{"steps", "tokens", "seconds", "tokens_per_second", "loss", "resampled"}``
        (``loss``: the terms of the last step; ``resampled``: latents reinitialised).

    Raises:
        ValueError: (``ArgumentTypeError`` for a wrong type) on a bad argument, on
            activations without rows, or on a bad first item, before ``sae``, its mode or
            ``optimizer`` is changed. Also when a step's loss is NaN or inf (finite data
            whose squared error overflows, a huge ``aux_coef``): before that step updates
            anything; or when an update or a resampling leaves a weight NaN or inf (a huge
            ``lr`` or ``resample_scale``): after it, the SAE holding those weights. Either
            names the step (counted from 1) and leaves the SAE in eval mode with the
            updates of the steps before it, as a bad later item does.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    check_materialized_module(sae, "sae.")
    sae._check_weights()  # else "step 0: the update made W_enc non-finite", before any step
    _check_trainable(sae)
    if steps is not None:
        check_int("steps", steps, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("dead_window", dead_window, minimum=1)
    if resample_every is not None:
        check_int("resample_every", resample_every, minimum=1)
    check_positive("resample_scale", resample_scale)
    check_positive("clip_grad_norm", clip_grad_norm, optional=True)
    if lr is not None:
        check_nonnegative("lr", lr)
    check_nonnegative("sparsity_coef", sparsity_coef)
    check_nonnegative("aux_coef", aux_coef)
    check_fraction("decay", decay, one=True)
    inner = check_optimizer(optimizer, optional=True)
    if optimizer is not None and lr is not None:  # it was ignored: the optimizer keeps its own
        raise ValueError(f"lr must be None when an optimizer is given (lr sets the default "
                         f"Adam's rate; the optimizer's own lr is used), got lr={lr!r}")
    if inner is not None and not _holds_parameters(inner, sae):
        raise ValueError("optimizer must be over sae's parameters, got one that holds none "
                         "of them")
    if isinstance(activations, torch.Tensor):
        activations = [activations]
    elif not isinstance(activations, Iterable):
        raise TypeError(f"activations must be an iterable of tensors, got "
                        f"{type(activations).__name__}")

    stream = _batches(activations, batch_size, sae, steps)
    first = next(stream, None)  # the first batch is checked before anything changes
    if first is None:
        raise ValueError("activations must hold at least one row, got none")
    if optimizer is None:
        lr = 2e-4 / math.sqrt(sae.n_latents / 2**14) if lr is None else lr
        optimizer = inner = _adam(sae, lr)
    rates = [group["lr"] for group in inner.param_groups]  # restored, whatever happens
    start = int(steps * (1 - decay)) if steps is not None and decay > 0 else None

    sae.train()
    if sae.normalize_decoder:
        sae.normalize_decoder_()
    done, tokens, terms, resampled = 0, 0, {}, 0
    generator = torch.Generator(device=sae.W_enc.device).manual_seed(0)  # resampling's rows
    began = time.perf_counter()
    try:
        for x, target in itertools.chain([first], stream):
            terms = _objective(
                sae, x, target, sparsity_coef=sparsity_coef, aux_coef=aux_coef,
                dead=sae.dead_latents(dead_window) if sae.k is not None else None)
            _check_step(sae, terms, done + 1)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if sae.normalize_decoder:
                sae.project_decoder_grad_()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), clip_grad_norm)
            if start is not None and done >= start:  # linear decay to 0 at step `steps`
                scale = max(0.0, (steps - done) / max(steps - start, 1))
                for group, rate in zip(inner.param_groups, rates, strict=True):
                    group["lr"] = rate * scale
            optimizer.step()
            if sae.normalize_decoder:
                sae.normalize_decoder_()
            done += 1
            tokens += x.shape[0]
            if steps is not None and done >= steps:
                break
            if resample_every is not None and done % resample_every == 0:
                try:
                    resampled += len(resample(
                        sae, x, sae.dead_latents(dead_window), target=target, optimizer=inner,
                        encoder_scale=resample_scale, generator=generator))
                except ValueError as e:  # the batch is checked: only the scale can fail
                    raise ValueError(f"step {done}: resampling with resample_scale="
                                     f"{resample_scale!r}: {e}") from e
        if done:  # the last update, which no later loss reads
            _check_weights(sae, f"step {done}: the update (lr and the gradients)")
    finally:
        for group, rate in zip(inner.param_groups, rates, strict=True):
            group["lr"] = rate
        sae.eval()
    seconds = time.perf_counter() - began
    return {"steps": done, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "loss": {name: float(t.detach()) for name, t in terms.items()},
            "resampled": resampled}


def _check_trainable(sae: SAE) -> None:
    """Raise ``ValueError`` unless a step can update ``sae``: under
    ``torch.inference_mode()``, with every parameter frozen, or with inference tensors (an
    SAE built in inference mode), the first backward or in-place update failed with a raw
    ``RuntimeError``, after the decoder had been renormalised and the mode changed."""
    if torch.is_inference_mode_enabled():  # enable_grad cannot lift it
        raise ValueError("train cannot run inside torch.inference_mode() (it differentiates "
                         "the loss); accepted: a call outside it (torch.no_grad() is fine)")
    if not any(p.requires_grad for p in sae.parameters()):
        raise ValueError("sae must have a parameter that requires grad, got every one frozen "
                         "(requires_grad=False); accepted: sae.requires_grad_(True) first")
    for name, tensor in (*sae.named_parameters(), *sae.named_buffers()):
        check_writable(f"sae.{name}", tensor)


def _check_step(sae: SAE, terms: dict[str, torch.Tensor], step: int) -> None:
    """Raise naming ``step`` (and the terms that are not finite) unless its loss is finite:
    a NaN or inf loss makes every weight NaN after the update it drives. A loss that is
    not finite because the previous update left a weight NaN or inf (a huge ``lr``) names
    that update instead; the weights are read only then, not at every step."""
    if bool(torch.isfinite(terms["loss"])):
        return
    _check_weights(sae, f"step {step - 1}: the update (lr and the gradients)")
    bad = ", ".join(f"{name}={float(t.detach()):g}" for name, t in terms.items()
                    if name != "loss" and not bool(torch.isfinite(t)))
    raise ValueError(f"step {step}: the loss is not finite ({bad or terms['loss']}); the "
                     f"activations' scale or a coefficient overflows the SAE's dtype; no "
                     f"weight was updated by this step")


def _check_weights(sae: SAE, what: str) -> None:
    """Raise naming ``what`` unless every parameter of ``sae`` is finite (a JumpReLU
    ``log_threshold`` may be ±inf: :meth:`SAE._non_finite_weights`)."""
    bad = sae._non_finite_weights()
    if bad:
        raise ValueError(f"{what} made {', '.join(bad)} non-finite (NaN or inf in "
                         f"{sae.W_enc.dtype}); the SAE holds those weights")


def _holds_parameters(optimizer: torch.optim.Optimizer, sae: SAE) -> bool:
    """Whether ``optimizer`` steps at least one of ``sae``'s parameters (one over another
    module would leave the SAE untouched while training seemed to run)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return any(id(p) in held for p in sae.parameters())


def _adam(sae: SAE, lr: float) -> torch.optim.Optimizer:
    """Adam, fused when this build has a fused kernel for the parameters' device."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.parameters(), lr=lr)


def _batches(activations: Iterable[Any], batch_size: int, sae: SAE, steps: int | None
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Rows of ``activations`` (and targets) in batches of ``batch_size`` (the last one
    shorter), passing over ``activations`` again while ``steps`` wants more and it can.

    Items are checked as they are read (see :func:`_rows`), so a bad item of a stream fails
    after the batches before it have been yielded."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    while True:
        seen = False  # a row in this pass (a pass of empty items would loop forever)
        for index, item in enumerate(activations):
            x, y = _rows(item, sae, index)
            seen = seen or x.shape[0] > 0
            xs.append(x)
            if y is not None:
                ys.append(y)
            held += x.shape[0]
            while held >= batch_size:
                x_all = torch.cat(xs) if len(xs) > 1 else xs[0]
                y_all = (torch.cat(ys) if len(ys) > 1 else ys[0]) if ys else None
                yield x_all[:batch_size], None if y_all is None else y_all[:batch_size]
                xs = [x_all[batch_size:]]
                ys = [] if y_all is None else [y_all[batch_size:]]
                held -= batch_size
        if steps is None or not seen or iter(activations) is activations:
            break
    if held:
        yield torch.cat(xs), torch.cat(ys) if ys else None


def _rows(item: Any, sae: SAE, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item ``index`` of ``activations`` (counted from 0 on every pass) as ``(n, d_in)``
    rows (and ``(n, d_out)`` targets); raise, naming the item as ``activations batch
    {index}``, unless it holds finite floats of the SAE's widths. Detached: activations
    computed with autograd on (a model run outside ``torch.no_grad()``) are data here; the
    loss backpropagated into the model that made them (filling its parameters' ``.grad``)
    and failed raw at the next batch ("backward through the graph a second time")."""
    where = f"activations batch {index}"
    if sae.transcoder:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"{where} of a transcoder must be an (input, target) pair of tensors, got "
                f"{type(item).__name__}")
        x, y = item
        _check_rows(y, sae.d_out, f"{where} (target)")
        y = check_finite(f"{where} (target)", y.detach().reshape(-1, sae.d_out),
                         dtype=sae.W_enc.dtype)
    else:
        x, y = item, None
    _check_rows(x, sae.d_in, where)
    x = x.detach().reshape(-1, sae.d_in)
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{where}: an input of {x.shape[0]} rows came with a target of {y.shape[0]}")
    return check_finite(where, x, dtype=sae.W_enc.dtype), y


def _check_rows(x: Any, width: int, param: str) -> None:
    """Raise unless ``x`` is a floating-point tensor of shape ``(..., width)`` holding
    values (not on the meta device: its values are checked after the cast to the SAE's
    dtype, by :func:`_rows`, which failed inside PyTorch on one)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{param} must hold floating-point tensors, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"{param} must have shape (..., {width}), got shape {tuple(x.shape)}")
    check_materialized(param, x)

