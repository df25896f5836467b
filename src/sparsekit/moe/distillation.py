"""Distillation: fine-tune a model to reproduce another's outputs, and MoEfication's
recovery step.

:func:`distillation_loss` and :func:`fit_outputs` are the training shared by
:func:`~sparsekit.moe.relufy` (a ReLU copy distilled back to the original) and
:func:`distil`. A MoEfied model (:func:`~sparsekit.moe.moefy`,
:func:`~sparsekit.moe.contextual`) was built without training: its experts and routers
were fitted to the dense model's activations, and every token then loses the neurons its
router left out. :func:`distil` fine-tunes the copy *with its routing in place* (the
experts' weights and everything around them learn to make up for the neurons each token
does not run, as LLaMA-MoE's continual training after its split), the routers frozen: on
the ReLU-fied all-MiniLM-L6-v2 (experts of 4 neurons, low-rank routers), 400 steps took the
sentence embeddings' cosine to the original GELU model from 0.935 to 0.956 at 30 % of the
FFN kept and from 0.858 to 0.923 at 10 % (``benchmarks/moefication.py``; ~110 s a copy on
2 threads).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_int,
    check_positive,
    check_seed,
    model_errors,
    seeded,
)
from sparsekit.moe.ffn import activate
from sparsekit.moe.routed import RoutedFFN, check_model, routed_layers
from sparsekit.observe import batches, preserved, watch

__all__ = ["distil", "distillation_loss", "fit_outputs", "training_inputs"]

_WARMUP = 0.1  # fraction of the steps over which the learning rate rises to ``lr``
_L1_RAMP = 0.5  # fraction of the steps over which the L1 coefficient rises to ``l1``


def distil(
    model: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    lr: float = 2e-4,
    seed: int = 0,
) -> nn.Module:
    """A copy of the routed ``model`` fine-tuned, with its routing in place, to reproduce
    ``teacher``'s outputs (:func:`distillation_loss`).

    ``model`` holds :class:`~sparsekit.moe.RoutedFFN` modules (from
    :func:`~sparsekit.moe.moefy` or :func:`~sparsekit.moe.contextual`); ``teacher`` is
    the model it should behave like (the original dense model, not the ReLU-fied one it
    was built from, so that the copy makes up for both changes). Each step runs the copy
    as it will run: every token computes only the hot neurons and the units its router
    chooses (the choice takes no gradient: routers stay as they are), and the gradient
    reaches the weights of the neurons it ran and every other trainable parameter.
    Training as in :func:`fit_outputs`: ``steps`` AdamW steps at ``lr``, one batch of
    ``data`` (model inputs, as for :func:`~sparsekit.moe.relufy`; keep the evaluation text
    out of it) per step, shuffled with ``seed``. With :func:`~sparsekit.moe.set_oracle` on,
    the copy trains under the true-mass choice. ``model`` is left untouched; the copy keeps
    its routers, layouts, ``k`` and oracle setting, and comes back in ``model``'s modes.
    """
    check_model("model", model)
    check_model("teacher", teacher)
    check_int("steps", steps, minimum=1)
    inputs = training_inputs(data, lr, seed)
    routed_layers(model)  # raises without RoutedFFN modules
    student = copy.deepcopy(model)
    names = [n for n, m in student.named_modules() if isinstance(m, RoutedFFN)]
    trainable = {n: _Trainable(student.get_submodule(n)) for n in names}
    for name, module in trainable.items():
        student.set_submodule(name, module)
    fit_outputs(student, teacher, inputs, steps=steps, lr=lr, seed=seed)
    for name, module in trainable.items():
        student.set_submodule(name, module.routed())
    return student


class _Trainable(nn.Module):
    """A :class:`RoutedFFN`'s computation with its writer and reader weights as
    parameters: every row computes every neuron and keeps the hot ones and those of its
    chosen units (the routed layer's multi-row path, differentiable); :meth:`routed`
    builds the routed layer back with the trained weights."""

    def __init__(self, layer: RoutedFFN) -> None:
        super().__init__()
        self.__dict__["layer"] = layer  # not a submodule: its router is not trained
        weight = layer.w_in.dtype
        self.w_in = nn.Parameter(layer.w_in.clone())
        self.b_in = None if layer.b_in is None else nn.Parameter(layer.b_in.clone())
        self.w_out = nn.Parameter(layer.w_out.to_dense().to(weight))
        bias = layer.w_out.bias
        self.b_out = None if bias is None else nn.Parameter(bias.to(weight).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        rows = x.reshape(-1, layer.in_features)
        z = F.linear(rows, self.w_in.flatten(0, 1),
                     None if self.b_in is None else self.b_in.flatten())
        h = activate(layer.act, z.view(rows.shape[0], -1, layer.writers))
        if layer.units and layer.k < layer.units:
            with torch.no_grad():
                if layer.oracle:  # the true mass reads the reader's current column norms
                    layer.norms.copy_(torch.linalg.vector_norm(self.w_out.float(), dim=0))
                mask = layer.neuron_mask(layer.chosen(rows, h), h.dtype)
            h = h * mask
        return F.linear(h, self.w_out, self.b_out).view(*x.shape[:-1], layer.out_features)

    def routed(self) -> RoutedFFN:
        """The routed layer with the trained weights (in the original neuron order, which
        the layer stores permuted again)."""
        layer = self.layer
        original = layer.order.argsort()
        with torch.no_grad():
            out = RoutedFFN(
                self.w_in[original], None if self.b_in is None else self.b_in[original],
                self.w_out[:, original], self.b_out, layer.act, order=layer.order,
                hot=layer.hot, unit_size=layer.unit_size, router=layer.router, k=layer.k)
        out.oracle = layer.oracle
        return out.train(layer.training)


def training_inputs(data: Any, lr: Any, seed: Any, *, required: bool = True) -> list[Any]:
    """The non-empty batches of ``data`` (a tensor of model inputs or a list of them), after
    checking the learning rate ``lr`` (a positive finite float) and ``seed``; no batches
    for ``data=None`` where no training runs (not ``required``)."""
    check_positive("lr", lr)
    check_seed("seed", seed)
    if data is None and not required:
        return []
    if data is None:
        raise ValueError("data must be a tensor of inputs or a list of them, got None")
    inputs = [x for x, _ in batches(data) if not (isinstance(x, torch.Tensor) and x.numel() == 0)]
    if not inputs:
        raise ValueError("data holds no (non-empty) batches; pass a tensor of inputs or a "
                         "list of them")
    return inputs


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


def _hidden(output: Any, name: str = "model") -> torch.Tensor:
    hidden = output if isinstance(output, torch.Tensor) else getattr(
        output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise ArgumentTypeError(f"{name}: its outputs carry neither logits nor "
                                f"last_hidden_state, got {type(output).__name__}")
    return hidden


def _compared(output: Any, name: str) -> tuple[str, torch.Tensor]:
    """What :func:`distillation_loss` compares of ``output`` (``name``'s): its logits, else
    its final hidden states."""
    logits = getattr(output, "logits", None)
    return ("logits", logits) if logits is not None else ("hidden states", _hidden(output, name))


def _check_teacher(output: Any, target: Any) -> None:
    """Raise ``ValueError`` naming ``teacher`` unless its outputs ``target`` compare with the
    student's ``output``: the same kind (logits or hidden states) of the same shape. A
    teacher of another vocabulary or without an LM head otherwise fails inside the loss,
    with an error that blames the data."""
    (kind, mine), (theirs, reference) = _compared(output, "model"), _compared(target, "teacher")
    if kind != theirs or mine.shape != reference.shape:
        raise ValueError(f"teacher: its outputs ({theirs} of shape {tuple(reference.shape)}) "
                         f"do not match the model's ({kind} of shape {tuple(mine.shape)}); "
                         "pass the model it should behave like")


def fit_outputs(student: nn.Module, teacher: nn.Module, inputs: list[Any], *, steps: int,
                lr: float, seed: int, l1: float = 0.0,
                acts: Sequence[nn.Module] = ()) -> None:
    """Fine-tune ``student``'s trainable parameters in place on :func:`distillation_loss`
    against ``teacher``: ``steps`` AdamW steps at ``lr`` (warmed up over the first tenth,
    then cosine-decayed, gradients clipped to norm 1), one of the ``inputs`` per step in an
    order shuffled with ``seed`` on every pass, both models in eval mode; plus ``l1``
    (ramped, see :func:`~sparsekit.moe.relufy`) times the mean output of the modules
    ``acts``. Raises ``ValueError`` naming ``teacher`` when its outputs are not of the
    student's kind and shape, naming ``data`` when the models cannot run on an input, and
    naming ``lr`` and the step at the first step that leaves a weight NaN or inf (one NaN
    loss spreads to every weight, so later steps could only hide where it began). On any
    error ``student`` is left as it was before fitting: its trainable parameters are copied
    first (one more copy of them in memory while fitting) and restored."""
    if torch.is_inference_mode_enabled():  # enable_grad cannot lift it
        raise ValueError("fine-tuning cannot run inside torch.inference_mode() (it "
                         "differentiates the loss); accepted: a call outside it")
    params = [p for p in student.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    try:
        with torch.enable_grad():  # under torch.no_grad() the backward failed raw
            _fit(student, teacher, inputs, params, steps=steps, lr=lr, seed=seed, l1=l1,
                 acts=acts)
    except Exception:
        with torch.no_grad():
            for p, value in zip(params, before, strict=True):
                p.copy_(value)
        raise


def _fit(student: nn.Module, teacher: nn.Module, inputs: list[Any],
         params: list[nn.Parameter], *, steps: int, lr: float, seed: int, l1: float,
         acts: Sequence[nn.Module]) -> None:
    """:func:`fit_outputs`'s training loop over ``params``, ``student``'s trainable ones."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, round(_WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(
        (i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / steps))))
    device = next(student.parameters()).device
    generator = seeded(seed)
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
                output = student(x)
            _check_teacher(output, target)
            loss = distillation_loss(output, target)
            if means:
                coefficient = l1 * math.sin(0.5 * math.pi * min(1.0, (i + 1) / ramp))
                loss = loss + coefficient * torch.stack(means).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if not all(bool(p.isfinite().all()) for p in params):
                raise ValueError(
                    f"lr={lr:g}: fine-tuning made the weights not finite (NaN or inf) at step "
                    f"{i + 1} of {steps} (loss {float(loss):.3g}); the model is left as it "
                    "was; lower lr (or check that the teacher's outputs on data are finite)")
