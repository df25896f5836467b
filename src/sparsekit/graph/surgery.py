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
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from sparsekit._checks import ArgumentTypeError, check_materialized_module, check_module
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
    """A copy of ``model`` with smaller ``nn.Linear`` layers and identical outputs (up to
    rounding: a dead neuron's constant output is folded into the next layer's bias, in
    float32 exact to the last bits, in bfloat16 within one unit of its last place).

    Supports ``nn.Sequential`` MLPs (``nn.Linear`` layers separated by parameter-free
    elementwise activations such as ``nn.ReLU``; a module that mixes neurons, such as
    ``nn.Softmax`` or ``nn.LayerNorm``, is refused, since dropping a neuron would change
    the others' values; anything before the first and after the last linear layer
    is kept) and :class:`~sparsekit.models.LeNet300100`. Inputs and outputs are never
    dropped. Masks of the original model do not carry over. The linear layers must be
    plain ones with values, each the only holder of its weight and bias: a subclass that
    overrides ``forward``, a layer on the meta device, a layer whose weight is computed
    (``torch.nn.utils.parametrize``, ``weight_norm``, ``spectral_norm``,
    ``torch.nn.utils.prune``), and a layer used twice or whose weight is tied to another
    parameter are refused (cut on their own, they would lose their forward, fail inside
    PyTorch, lose how the weight is computed, or come back untied and larger). So is a
    ``nn.Sequential`` or ``LeNet300100`` subclass with a ``forward`` of its own. The copy's
    layers are the original ones made smaller in place, so what else they carry stays:
    forward hooks and pre-hooks, train/eval mode, attributes.
    """
    check_module("model", model)
    names, acts = _chain(model)
    _check_linears(model, names)
    model = copy.deepcopy(model)
    linears = [model.get_submodule(n) for n in names]
    with torch.no_grad():
        while True:
            changed = False
            for k in range(len(linears) - 1):
                changed |= _drop_dead(linears[k], linears[k + 1], acts[k])
            if not changed:
                break
    return model


def _chain(model: nn.Module) -> tuple[list[str], list[Activation]]:
    """Names of the linear layers and the activation between each consecutive pair. A
    subclass of either kind that overrides ``forward`` is refused: its layers may not run
    as a chain with these activations (a LeNet300100 with sigmoids had the ReLU's
    constants folded into its biases, and outputs changed silently)."""
    if isinstance(model, LeNet300100):
        base: type[nn.Module] = LeNet300100
    elif isinstance(model, nn.Sequential):
        base = nn.Sequential
    else:
        raise ArgumentTypeError(
            f"model must be an nn.Sequential MLP or a LeNet300100 (what remove_dead_neurons "
            f"supports), got {type(model).__name__}"
        )
    if type(model).forward is not base.forward:
        raise ValueError(
            f"model ({type(model).__name__}) overrides {base.__name__}.forward; "
            f"remove_dead_neurons reads the layers as {base.__name__} runs them, which that "
            f"forward may not: accepted are {base.__name__} models with its own forward"
        )
    if base is LeNet300100:
        return ["fc1", "fc2", "fc3"], [F.relu, F.relu]
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
    :func:`remove_dead_neurons` cannot cut as a plain ``nn.Linear`` with the same outputs:
    one whose class overrides ``forward`` (the output changed silently), one on the meta
    device (a raw ``RuntimeError``), one whose weight is computed (a parametrization was
    silently replaced by its current value; ``weight_norm``'s and ``torch.nn.utils.prune``'s
    hooks failed the copy with a raw ``RuntimeError``), or one whose weight or bias another
    module of ``model`` also holds (a shared layer or tied weights, silently untied: the
    "smaller" model could hold more weights than the original)."""
    holders: defaultdict[int, list[str]] = defaultdict(list)
    for key, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)].append(key)
    for name in names:
        linear = model.get_submodule(name)
        if type(linear).forward is not nn.Linear.forward:
            raise ValueError(
                f"model.{name} ({type(linear).__name__}) overrides nn.Linear.forward; "
                "remove_dead_neurons finds and folds dead neurons as x Wᵀ + b computes "
                "them, which that forward may not: accepted are nn.Linear layers computing "
                "x Wᵀ + b"
            )
        if parametrize.is_parametrized(linear) or any(
                isinstance(hook, (WeightNorm, SpectralNorm, prune.BasePruningMethod))
                for hook in linear._forward_pre_hooks.values()):
            raise ValueError(
                f"model.{name} computes its weight (a parametrization, weight_norm, "
                "spectral_norm or torch.nn.utils.prune); remove_dead_neurons cuts stored "
                "weights, and would drop how it is computed: accepted are nn.Linear layers "
                "holding their weight (bake it in first, e.g. torch.nn.utils.parametrize."
                "remove_parametrizations(layer, 'weight'), torch.nn.utils.remove_weight_norm"
                "(layer) or torch.nn.utils.prune.remove(layer, 'weight'))"
            )
        check_materialized_module(linear, f"model.{name}.")
        for pname, param in linear.named_parameters():
            others = [k for k in holders[id(param)] if k != f"{name}.{pname}"]
            if others:
                raise ValueError(
                    f"model.{name}.{pname} is also model.{others[0]} (a layer used twice or "
                    "tied weights); remove_dead_neurons cuts each linear layer on its "
                    "own, which would untie them. Accepted: linear layers that share no "
                    "parameter (untie them first, e.g. with a copy.deepcopy of the shared one)"
                )


def _drop_dead(first: nn.Linear, second: nn.Linear, act: Activation) -> bool:
    """In place: drop the dead neurons between ``first`` and ``second``; whether any were."""
    no_in = (first.weight == 0).all(1)
    no_out = (second.weight == 0).all(0)
    keep = ~(no_in | no_out)
    if bool(keep.all()):
        return False
    bias = first.bias if first.bias is not None else first.weight.new_zeros(len(no_in))
    # what input-less neurons emit; the others add nothing (an inf or NaN bias times 0 was NaN)
    # on a copy: an in-place activation (ReLU(inplace=True)) overwrote the layer's own
    # bias through the view, kept neurons' included (outputs 0.42 off)
    constant = torch.where(no_in, act(bias.clone().unsqueeze(0)).squeeze(0), 0.0)
    folded = second.weight @ constant
    second_bias = second.bias
    if second_bias is not None or bool(folded.any()):
        second_bias = folded if second_bias is None else second_bias + folded
    _resize(first, first.weight[keep], None if first.bias is None else first.bias[keep])
    _resize(second, second.weight[:, keep], second_bias)
    return True


def _resize(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """In place: give ``layer`` ``weight`` and ``bias`` (and the matching sizes), trainable
    where its own were (a frozen layer stays frozen; a bias the fold adds follows the
    weight). The layer itself stays, with its hooks, mode and attributes: a new
    ``nn.Linear`` in its place lost the hooks registered on it and came back in train
    mode in a model in eval mode."""
    grad = layer.weight.requires_grad
    bias_grad = grad if layer.bias is None else layer.bias.requires_grad
    layer.weight = nn.Parameter(weight, requires_grad=grad)  # a fresh copy: indexed
    if bias is not None:  # a copy: it may be the layer's own bias
        layer.bias = nn.Parameter(bias.clone(), requires_grad=bias_grad)
    layer.out_features, layer.in_features = weight.shape
