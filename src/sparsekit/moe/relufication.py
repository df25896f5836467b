"""ReLU-fication: swap each FFN's activation for ReLU and distil the model back.

MoEfication and contextual sparsity leave out the neurons a token barely uses. With GELU or
SiLU those neurons are small but rarely zero, so leaving them out always costs something;
with ReLU every neuron whose pre-activation is negative is exactly zero and costs nothing
to skip. The MoEfication paper (Zhang et al. 2022, "ReLU-based models") and "ReLU Strikes
Back" (Mirzadeh et al. 2023) therefore replace the activation by ReLU and fine-tune briefly
before sparsifying. :func:`relufy` does that as distillation: the copy learns to reproduce
the original model's outputs on calibration text
(:func:`~sparsekit.moe.distillation.distillation_loss`), so no labels are needed and what is
kept is the original model's behaviour, not a task's.

ReLU alone, after distillation, leaves 73-81 % of MiniLM's FFN activations at zero (per
layer, held-out sentences); MoEfication's claims hold for models whose FFN activations are
~90 % zero.
ProSparse (Song et al. 2024) gets there during ReLU-fication with an L1 penalty on the
activations whose coefficient rises progressively (a sudden large penalty kills neurons
before the distillation can compensate): ``relufy(..., l1=...)``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from sparsekit._checks import check_int, check_nonnegative
from sparsekit.moe import ffn as ffns
from sparsekit.moe.distillation import fit_outputs, training_inputs
from sparsekit.moe.routed import check_model

__all__ = ["relufy"]


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
    :func:`~sparsekit.moe.distillation.distillation_loss` against ``model``, one batch of
    ``data`` per step, the batches in an order shuffled with ``seed`` on every pass.
    ``data`` is a tensor of model inputs (token ids for Hugging Face models) or a list of
    them; keep the text a model is evaluated on out of it. Both models run in eval mode (no
    dropout) while training; ``steps=0`` only swaps the activation, and then needs no data
    (``data=None``). ``model`` is left untouched; the copy comes back in ``model``'s modes.

    ``l1 > 0`` adds ProSparse's activation-sparsity penalty to the loss: ``l1`` times the
    mean over FFNs of the mean ReLU output (its L1 norm per value; on a gated FFN the
    gate's, which decides the zeros), the coefficient rising from 0 to ``l1`` along a
    quarter sine over the first half of the steps and held there, so the distillation
    recovers the outputs at full strength. The larger ``l1``, the more neurons are exactly
    zero and the further the copy drifts from ``model``.
    """
    check_model("model", model)
    check_int("steps", steps, minimum=0)
    check_nonnegative("l1", l1)
    if l1 and not steps:
        raise ValueError(f"l1={l1!r} needs steps > 0: the penalty acts while fine-tuning")
    inputs = training_inputs(data, lr, seed, required=steps > 0)
    layers = ffns.find_ffns(model)
    if steps and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no parameters that require grad: nothing to fine-tune "
                         "(pass steps=0 to only swap the activation)")
    relu = copy.deepcopy(model)
    acts = [nn.ReLU() for _ in layers]
    for layer, act in zip(layers, acts, strict=True):
        ffns.set_activation(relu, layer, act)
    if steps:
        fit_outputs(relu, model, inputs, steps=steps, lr=lr, seed=seed, l1=l1, acts=acts)
    return relu
