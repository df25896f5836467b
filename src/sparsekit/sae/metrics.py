"""How good is a sparse autoencoder: reconstruction, sparsity, latent health, downstream loss.

:func:`metrics` streams over activations once and reports the fraction of variance
unexplained (FVU), the mean number of active latents per token (L0), the fractions of dead
(never active) and dense (active on more than ``dense`` of tokens) latents and the histogram
of log10 feature densities. :func:`loss_recovered` splices the reconstruction back into the
model with a forward hook and compares the model's quality with it, without it (clean) and
with the module's output zeroed: next-token loss and perplexity for a causal LM, cosine of
mean-pooled embeddings for an encoder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_fraction,
    check_materialized_module,
)
from sparsekit.observe import inference
from sparsekit.sae.capture import (
    _call,
    _input,
    _mask,
    _tensor,
    _with_tensor,
    find_module,
    hooked,
)
from sparsekit.sae.sae import SAE
from sparsekit.sae.train import _rows

__all__ = ["loss_recovered", "metrics"]

DENSITY_EDGES = tuple(float(e) for e in range(-8, 1))  # log10 density bins; dead ones apart
VARIANCE_RTOL = 1e-12  # a variance this small next to the sum of squares is rounding: none


@torch.no_grad()
def metrics(sae: SAE, activations: Iterable[Any] | torch.Tensor, *, dense: float = 0.1
            ) -> dict[str, Any]:
    """``fvu``, ``l0``, ``dead_fraction``, ``dense_fraction`` and ``density_histogram`` of
    ``sae`` over ``activations`` (as :func:`~sparsekit.sae.train` takes them), in eval mode.

    ``density_histogram`` is ``{"edges": log10 bin edges, "counts": latents per bin,
    "dead": latents never active}``.

    Raises ``ValueError`` on activations without rows, with a NaN or inf (naming the batch),
    or whose targets do not vary (every row the same, a single row): the FVU divides by
    their variance, and no value of it would mean anything there.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    check_materialized_module(sae, "sae.")
    sae._check_weights()  # a NaN weight made every score NaN, silently
    check_fraction("dense", dense, zero=False, one=True)
    if isinstance(activations, torch.Tensor):
        activations = [activations]
    elif not isinstance(activations, Iterable):
        raise ArgumentTypeError(f"activations must be a tensor or an iterable of tensors, "
                                f"got {type(activations).__name__}")
    was_training = sae.training
    sae.eval()
    fired = torch.zeros(sae.n_latents, dtype=torch.float64)
    tokens, active, error = 0, 0.0, 0.0
    # sums around the first batch's mean: around 0, the sum of squares of data sharing a
    # large offset (3e6 + noise) cancelled to rounding, and data that varied was refused
    shift: torch.Tensor | None = None
    total = torch.zeros(sae.d_out, dtype=torch.float64)
    squares = torch.zeros(sae.d_out, dtype=torch.float64)
    try:
        for index, item in enumerate(activations):
            x, y = _rows(item, sae, index)
            y = x if y is None else y
            values, indices = sae.encode_sparse(x)
            recon = sae.decode_sparse(values, indices)
            on = values != 0
            fired.index_add_(0, indices[on].cpu(), torch.ones(int(on.sum()), dtype=torch.float64))
            active += float(on.sum())
            error += float((recon - y).double().pow(2).sum())
            centred = y.double()
            if shift is None:
                shift = centred.mean(0)
            centred = centred - shift.to(centred.device)
            total += centred.sum(0).cpu()
            squares += centred.pow(2).sum(0).cpu()
            tokens += x.shape[0]
    finally:
        sae.train(was_training)
    if tokens == 0:
        raise ValueError("activations must hold at least one row")
    variance = float((squares - total.pow(2) / tokens).sum())
    if not variance > VARIANCE_RTOL * float(squares.sum()):  # 0 up to rounding
        raise ValueError(f"activations must vary: the fvu divides by their variance, which is "
                         f"{variance:g} over these {tokens} rows")
    density = fired / tokens
    alive = density[density > 0]
    counts = torch.histogram(alive.log10().float(), torch.tensor(DENSITY_EDGES)).hist \
        if alive.numel() else torch.zeros(len(DENSITY_EDGES) - 1)
    return {
        "fvu": error / variance,
        "l0": active / tokens,
        "dead_fraction": float((density == 0).double().mean()),
        "dense_fraction": float((density > dense).double().mean()),
        "density_histogram": {"edges": list(DENSITY_EDGES),
                              "counts": [int(c) for c in counts],
                              "dead": int((density == 0).sum())},
        "tokens": tokens,
    }


@torch.no_grad()
def loss_recovered(model: nn.Module, module_name: str, sae: SAE, inputs: Any) -> dict[str, float]:
    """The model's quality with ``sae``'s reconstruction in place of ``module_name``'s output
    (a transcoder reads the module's input), against clean and zero-ablated runs.

    ``inputs``: one batch or an iterable of batches (token-id tensors, or mappings such as a
    tokenizer's output). A model whose output has ``logits`` is scored as a causal LM:
    ``loss_clean``, ``loss_sae``, ``loss_zero``, ``perplexity_clean``, ``perplexity_sae`` and
    ``loss_recovered = (loss_zero - loss_sae) / (loss_zero - loss_clean)``. Otherwise the
    mean-pooled last hidden states are compared: ``cosine_sae`` and ``cosine_zero`` (to the
    clean embeddings).

    The loss averages over real next-token targets only: where a batch's ``attention_mask``
    marks the target or the token predicting it as padding, the pair is skipped. Token ids
    of any integer dtype are accepted; a causal LM needs sequences of at least 2 tokens.
    Raises ``ValueError`` when the module does not run on a batch or the model's clean
    outputs are not finite: either would be a score that compares nothing; also, naming
    ``inputs``, on a batch the model cannot run on, and naming ``sae`` when it cannot take
    the module's activations (another width).
    """
    module = find_module(model, module_name)
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    check_materialized_module(sae, "sae.")
    sae._check_weights()  # a NaN weight made every score NaN, silently
    if isinstance(inputs, (torch.Tensor, Mapping)):
        inputs = [inputs]
    elif not isinstance(inputs, Iterable):
        raise ArgumentTypeError(f"inputs must be a tensor, a mapping or an iterable of "
                                f"batches, got {type(inputs).__name__}")
    mode = {"replace": None}
    spliced = [0]  # calls of the module with a replacement: none means nothing was compared

    def splice(_m: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
        if mode["replace"] is None:
            return None
        spliced[0] += 1
        hidden = _tensor(out)
        source = _tensor(_input(args, kwargs)) if sae.transcoder else hidden
        # the model's fault, named before the SAE refuses them
        check_finite(f"inputs: the model's outputs on them (the activations of "
                     f"{module_name!r} the SAE reads)", source,
                     hint="no score would mean anything")
        try:
            replaced = mode["replace"](source, hidden)
        except ValueError as e:  # an SAE of another width: x must have shape (..., d_in)
            raise ValueError(f"sae: it cannot take the activations of {module_name!r}: "
                             f"{e}") from e
        return _with_tensor(out, replaced.to(hidden.dtype))

    # each replacement of the module's output from (what the SAE reads, that output): the
    # zero ablation zeroes the output, which a transcoder's input need not match in width
    replacements = {"clean": None, "sae": lambda source, _: sae(source),
                    "zero": lambda _, hidden: torch.zeros_like(hidden)}
    sums: dict[str, float] = {name: 0.0 for name in replacements}
    count, causal, short = 0.0, False, False
    handle = module.register_forward_hook(hooked(splice), with_kwargs=True)
    try:
        with inference(model, sae):
            for batch in inputs:
                outputs = {}
                spliced[0] = 0
                for name, replace in replacements.items():
                    mode["replace"] = replace
                    outputs[name] = _call(model, batch)
                mode["replace"] = None
                if not spliced[0]:  # else "sae" and "zero" are the clean run: a perfect score
                    raise ValueError(f"module_name: the module {module_name!r} did not run on "
                                     "this input")
                causal = hasattr(outputs["clean"], "logits")
                if causal:
                    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
                    targets, real = _next_tokens(ids, batch)
                    _check_finite(outputs["clean"].logits)
                    for name, out in outputs.items():
                        logits = out.logits[..., :-1, :].float()
                        if logits.dim() == 2:  # a 1-D sequence: the model added no batch axis
                            logits = logits.unsqueeze(0)
                        sums[name] += float(F.cross_entropy(
                            logits.transpose(1, 2), targets, ignore_index=-100,
                            reduction="sum"))
                    count += real
                    short = short or ids.shape[-1] < 2
                else:
                    mask = _mask(batch)
                    pooled = {n: _pool(o, mask) for n, o in outputs.items()}
                    _check_finite(pooled["clean"])
                    for name in ("sae", "zero"):
                        sums[name] += float(F.cosine_similarity(
                            pooled[name], pooled["clean"], dim=-1).sum())
                    count += pooled["clean"].shape[0]
    finally:
        handle.remove()
    if count == 0:
        if causal:
            raise ValueError(
                "inputs: a causal LM is scored on next-token pairs, and these sequences hold "
                "none (" + ("sequences of fewer than 2 tokens" if short
                            else "every target position is masked by attention_mask")
                + "); pass sequences of at least 2 (unmasked) tokens")
        raise ValueError("inputs must hold at least one batch")
    if causal:
        clean, spliced, zero = (sums[n] / count for n in ("clean", "sae", "zero"))
        return {"loss_clean": clean, "loss_sae": spliced, "loss_zero": zero,
                "perplexity_clean": math.exp(clean), "perplexity_sae": math.exp(spliced),
                "loss_recovered": (zero - spliced) / (zero - clean) if zero != clean
                else math.nan}
    return {"cosine_sae": sums["sae"] / count, "cosine_zero": sums["zero"] / count}


def _check_finite(clean: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``inputs`` unless the clean run's ``clean`` outputs are
    finite: every score compares with them, and would be NaN without saying why."""
    check_finite("inputs: the model's outputs on them", clean,
                 hint="no score would mean anything")


def _next_tokens(ids: torch.Tensor, batch: Any) -> tuple[torch.Tensor, int]:
    """The next-token targets of ``ids`` (int64, ``(batch, length - 1)``), with -100 (ignored)
    where ``attention_mask`` is 0 at the target or at the position predicting it (padding,
    right or left), and how many targets are real."""
    targets = ids[..., 1:].long()
    if targets.dim() == 1:
        targets = targets.unsqueeze(0)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return targets, targets.numel()
    mask = torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    mask = mask.to(targets.device) != 0
    real = mask[:, 1:] & mask[:, :-1]  # a real token predicted from a real one (left padding)
    if real.shape != targets.shape:
        raise ValueError(f"inputs: attention_mask of shape {tuple(mask.shape)} does not match "
                         f"input_ids of shape {tuple(ids.shape)}")
    return targets.masked_fill(~real, -100), int(real.sum())


def _pool(output: Any, mask: torch.Tensor | None) -> torch.Tensor:
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") \
        else _tensor(output)
    hidden = hidden.float()
    if hidden.dim() == 2:
        return hidden
    if mask is None:
        return hidden.mean(1)
    weights = mask.unsqueeze(-1).to(hidden.device, torch.float32)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
