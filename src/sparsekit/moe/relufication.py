"""ReLU-fication: swap each FFN's activation for ReLU and distil the model back.

MoEfication and contextual sparsity leave out the neurons a token barely uses. With GELU or
SiLU those neurons are small but rarely zero, so leaving them out always costs something;
with ReLU every neuron whose pre-activation is negative is exactly zero and costs nothing
to skip. The MoEfication paper (Zhang et al. 2022, "ReLU-based models") and "ReLU Strikes
Back" (Mirzadeh et al. 2023) therefore replace the activation by ReLU and fine-tune briefly
before sparsifying. :func:`relufy` does that as distillation: the copy learns to reproduce
the original model's outputs on calibration text (:func:`distillation_loss`), so no labels
are needed and what is kept is the original model's behaviour, not a task's.

ReLU alone, after distillation, leaves 73-81 % of MiniLM's FFN activations at zero (per
layer, held-out sentences); MoEfication's claims hold for models whose FFN activations are
~90 % zero.
ProSparse (Song et al. 2024) gets there during ReLU-fication with an L1 penalty on the
activations whose coefficient rises progressively (a sudden large penalty kills neurons
before the distillation can compensate): ``relufy(..., l1=...)``.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int, model_errors
from sparsekit.moe import ffn as ffns
from sparsekit.observe import batches, preserved, watch

__all__ = ["distillation_loss", "relufy"]

_WARMUP = 0.1  # fraction of the steps over which the learning rate rises to ``lr``
_L1_RAMP = 0.5  # fraction of the steps over which the L1 coefficient rises to ``l1``


def relufy(
    model: nn.Module,
    data: Any,
    *,
    steps: int = 300,
    lr: float = 1e-4,
    l1: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` whose FFNs use ReLU, fine-tuned to reproduce ``model``'s outputs.

    Every FFN of a LLaMA- or BERT-style model gets ``nn.ReLU`` as its activation (on the
    gate of a gated FFN, so a neuron is exactly zero wherever its gate is negative). The
    copy's trainable parameters then take ``steps`` AdamW steps at learning rate ``lr``
    (warmed up over the first tenth, then cosine-decayed, gradients clipped to norm 1) on
    :func:`distillation_loss` against ``model``, one batch of ``data`` per step, the
    batches in an order shuffled with ``seed`` on every pass. ``data`` is a tensor of model
    inputs (token ids for Hugging Face models) or a list of them; keep the text a model is
    evaluated on out of it. Both models run in eval mode (no dropout) while training;
    ``steps=0`` only swaps the activation. ``model`` is left untouched; the copy comes
    back in ``model``'s modes.

    ``l1 > 0`` adds ProSparse's activation-sparsity penalty to the loss: ``l1`` times the
    mean over FFNs of the mean ReLU output (its L1 norm per value; on a gated FFN the
    gate's, which decides the zeros), the coefficient rising from 0 to ``l1`` along a
    quarter sine over the first half of the steps and held there, so the distillation
    recovers the outputs at full strength. The larger ``l1``, the more neurons are exactly
    zero and the further the copy drifts from ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_int("steps", steps, minimum=0)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise ArgumentTypeError(f"lr must be a positive finite float, got {lr!r}")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    if isinstance(l1, bool) or not isinstance(l1, numbers.Real):
        raise ArgumentTypeError(f"l1 must be a finite float ≥ 0, got {l1!r}")
    if not 0 <= l1 < math.inf:
        raise ValueError(f"l1 must be a finite float ≥ 0, got {l1!r}")
    if l1 and not steps:
        raise ValueError(f"l1={l1!r} needs steps > 0: the penalty acts while fine-tuning")
    check_int("seed", seed)
    if data is None:
        raise ValueError("data must be a tensor of inputs or a list of them, got None")
    inputs = [x for x, _ in batches(data) if not (isinstance(x, torch.Tensor) and x.numel() == 0)]
    if not inputs:
        raise ValueError("data holds no (non-empty) batches; pass a tensor of inputs or a "
                         "list of them")
    layers = ffns.find_ffns(model)
    if steps and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameters that require grad: nothing to fine-tune "
                         "(pass steps=0 to only swap the activation)")
    relu = copy.deepcopy(model)
    acts = [nn.ReLU() for _ in layers]
    for layer, act in zip(layers, acts, strict=True):
        ffns.set_activation(relu, layer, act)
    if steps:
        _distil(relu, model, inputs, steps=steps, lr=lr, seed=seed, l1=l1, acts=acts)
    return relu


def distillation_loss(output: Any, target: Any) -> torch.Tensor:
    """How far a model's ``output`` is from the original model's ``target`` (both what the
    models returned for the same inputs).

    With ``logits`` (a causal LM's next-token distributions, a masked LM's token
    distributions): the KL divergence ``KL(target || output)`` per token. Otherwise the
    final hidden states (``last_hidden_state``, or the output itself when it is a tensor),
    what a sentence embedding is pooled from: their squared error relative to the target's
    squared norm.
    """
    logits = getattr(target, "logits", None)
    if logits is not None:
        return F.kl_div(output.logits.flatten(0, -2).float().log_softmax(-1),
                        logits.flatten(0, -2).float().log_softmax(-1),
                        log_target=True, reduction="batchmean")
    hidden, reference = _hidden(output).float(), _hidden(target).float()
    return (hidden - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12)


def _hidden(output: Any) -> torch.Tensor:
    hidden = output if isinstance(output, torch.Tensor) else getattr(
        output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("model: its outputs carry neither logits nor last_hidden_state, got "
                        f"{type(output).__name__}")
    return hidden


def _distil(student: nn.Module, teacher: nn.Module, inputs: list[Any], *, steps: int,
            lr: float, seed: int, l1: float, acts: list[nn.Module]) -> None:
    """Fine-tune ``student`` in place on :func:`distillation_loss` against ``teacher``,
    plus ``l1`` (ramped) times the mean output of the activation modules ``acts``."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(_WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(
        (i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / steps))))
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    means: list[torch.Tensor] = []
    ramp = max(1, round(_L1_RAMP * steps))
    watched = {str(j): a for j, a in enumerate(acts)} if l1 else {}
    with preserved(teacher, student, train=False, buffers=False), watch(
            watched, lambda _name, _x, out: means.append(out.mean())):
        for i in range(steps):
            if not order:
                order = torch.randperm(len(inputs), generator=generator).tolist()
            x = inputs[order.pop()]
            x = x.to(device) if isinstance(x, torch.Tensor) else x
            with model_errors("data", "the model cannot run on its inputs"):
                with torch.no_grad():
                    target = teacher(x)
                means.clear()
                loss = distillation_loss(student(x), target)
            if means:
                coefficient = l1 * math.sin(0.5 * math.pi * min(1.0, (i + 1) / ramp))
                loss = loss + coefficient * torch.stack(means).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()

