"""Dead-neuron removal: a real structural reduction of a pruned MLP, outputs unchanged.

A hidden neuron without outgoing weights cannot affect the output; one without incoming
weights emits the constant ``act(bias)``, which the next layer can absorb into its bias.
Both kinds are dropped, which can leave more neurons dead, so this runs to a fixed point.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import check_materialized_module
from sparsekit.models import LeNet300100

Activation = Callable[[torch.Tensor], torch.Tensor]

# Modules that may sit between two linear layers: each output depends on its own input
# alone (dropout acts as identity, as the copy runs in eval mode), so dropping one neuron
# leaves the others' values unchanged. Exact types only: a subclass may override forward.
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.LogSigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.Threshold,
)


def remove_dead_neurons(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with smaller ``nn.Linear`` layers and identical outputs.

    Supports ``nn.Sequential`` MLPs (``nn.Linear`` layers separated by parameter-free
    elementwise activations such as ``nn.ReLU``; a module that mixes neurons, such as
    ``nn.Softmax`` or ``nn.LayerNorm``, is refused, since dropping a neuron would change
    the others' values; anything before the first and after the last linear layer
    is kept) and :class:`~sparsekit.models.LeNet300100`. Inputs and outputs are never
    dropped. Masks of the original model do not carry over. The linear layers must be
    plain ones with values, each the only holder of its weight and bias: a subclass that
    overrides ``forward``, a layer on the meta device, and a layer used twice or whose
    weight is tied to another parameter are refused (rebuilt on their own, they would lose
    their forward, fail inside PyTorch, or come back untied and larger).
    """
    names, acts = _chain(model)
    _check_linears(model, names)
    model = copy.deepcopy(model)
    linears = [model.get_submodule(n) for n in names]
    with torch.no_grad():
        while True:
            changed = False
            for k in range(len(linears) - 1):
                new = _drop_dead(linears[k], linears[k + 1], acts[k])
                if new is not None:
                    linears[k], linears[k + 1] = new
                    changed = True
            if not changed:
                break
    for name, linear in zip(names, linears):
        model.set_submodule(name, linear)
    return model


def _chain(model: nn.Module) -> tuple[list[str], list[Activation]]:
    """Names of the linear layers and the activation between each consecutive pair."""
    if isinstance(model, LeNet300100):
        return ["fc1", "fc2", "fc3"], [F.relu, F.relu]
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"remove_dead_neurons supports nn.Sequential MLPs and LeNet300100, "
            f"got {type(model).__name__}"
        )
    where = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    if len(where) < 2:
        raise ValueError("model has fewer than two nn.Linear layers: no hidden neurons to drop")
    acts: list[Activation] = []
    for a, b in zip(where, where[1:]):
        between = nn.Sequential(*model[a + 1:b])
        for i, module in enumerate(between, start=a + 1):
            if type(module) not in _ELEMENTWISE:
                raise ValueError(
                    f"model[{i}] ({type(module).__name__}) sits between linear layers {a} "
                    f"and {b}; only parameter-free elementwise activations are supported "
                    f"there ({', '.join(t.__name__ for t in _ELEMENTWISE)}), as dropping a "
                    "neuron must leave the others' values unchanged"
                )
        acts.append(copy.deepcopy(between).eval())  # e.g. dropout acts as identity
    return [str(i) for i in where], acts


def _check_linears(model: nn.Module, names: list[str]) -> None:
    """Raise ``ValueError`` naming the first layer ``model.<name>`` of ``names`` that
    :func:`remove_dead_neurons` cannot rebuild as a plain ``nn.Linear`` with the same outputs:
    one whose class overrides ``forward`` (the output changed silently), one on the meta
    device (a raw ``RuntimeError``), or one whose weight or bias another module of ``model``
    also holds (a shared layer or tied weights, silently untied: the "smaller" model could
    hold more weights than the original)."""
    holders: defaultdict[int, list[str]] = defaultdict(list)
    for key, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)].append(key)
    for name in names:
        linear = model.get_submodule(name)
        if type(linear).forward is not nn.Linear.forward:
            raise ValueError(
                f"model.{name} ({type(linear).__name__}) overrides nn.Linear.forward; "
                "remove_dead_neurons rebuilds the linear layers as plain nn.Linear, which "
                "would drop that forward: accepted are nn.Linear layers computing x Wᵀ + b"
            )
        check_materialized_module(linear, f"model.{name}.")
        for pname, param in linear.named_parameters():
            others = [k for k in holders[id(param)] if k != f"{name}.{pname}"]
            if others:
                raise ValueError(
                    f"model.{name}.{pname} is also model.{others[0]} (a layer used twice or "
                    "tied weights); remove_dead_neurons rebuilds each linear layer on its "
                    "own, which would untie them. Accepted: linear layers that share no "
                    "parameter (untie them first, e.g. with a copy.deepcopy of the shared one)"
                )


def _drop_dead(
    first: nn.Linear, second: nn.Linear, act: Activation
) -> tuple[nn.Linear, nn.Linear] | None:
    """Drop the dead neurons between ``first`` and ``second``; ``None`` when there are none."""
    no_in = (first.weight == 0).all(1)
    no_out = (second.weight == 0).all(0)
    keep = ~(no_in | no_out)
    if bool(keep.all()):
        return None
    bias = first.bias if first.bias is not None else first.weight.new_zeros(len(no_in))
    constant = act(bias.unsqueeze(0)).squeeze(0) * no_in  # what input-less neurons emit
    folded = second.weight @ constant
    new_first = _linear(first.weight[keep], None if first.bias is None else first.bias[keep],
                        first)
    second_bias = second.bias
    if second_bias is not None or bool(folded.any()):
        second_bias = folded if second_bias is None else second_bias + folded
    return new_first, _linear(second.weight[:, keep], second_bias, second)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, old: nn.Linear) -> nn.Linear:
    """A linear layer with ``weight`` and ``bias``, trainable where ``old``'s were (a frozen
    layer stays frozen; a bias the fold adds follows the weight)."""
    layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    layer.weight.requires_grad_(old.weight.requires_grad)
    if bias is not None:
        layer.bias.copy_(bias)
        layer.bias.requires_grad_((old.bias if old.bias is not None else old.weight).requires_grad)
    return layer
