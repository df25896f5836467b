"""Sparse model soups (Zimmer et al. 2024): average models that share one mask."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparsekit._checks import ArgumentTypeError
from sparsekit.engine.sparse_linear import SparseLinear
from sparsekit.quantize import attached_scales, detach_scales
from sparsekit.targets import default_targets


@torch.no_grad()
def soup(models: Sequence[nn.Module]) -> nn.Module:
    """A new model whose floating tensors are the mean of ``models``' tensors.

    The models must share their sparsity mask (the nonzero pattern of every target
    weight, and of every other weight of two dimensions or more holding a zero in one of
    them: an embedding pruned by name); the average of weights that are zero in every
    model is zero, so the soup keeps the mask (a kept weight whose values cancel, w and
    -w, averages to exactly 0 and then reads as pruned). Models whose modules differ in
    kind (a ReLU where the other has a Tanh) are different architectures. Raises
    ``ValueError`` when masks or architectures differ or ``models`` is empty, or a model
    holds NaN/inf parameters, NaN buffers, +inf where another holds -inf, tensors without
    values (meta) or tensors on another device or of another dtype than models[0]'s; an
    :class:`~sparsekit._checks.ArgumentTypeError` when it is not a sequence of
    ``nn.Module`` (one model, a state dict). A model without default targets (no Linear or
    Conv layer) has no mask to compare and is averaged as is. A layer carrying an int8
    grid (``weight_scale``) whose weights differ between the models loses it in the soup:
    the averaged weights lie on no model's grid (quantize the soup again).
    """
    models = _check_models(models)
    for i, m in enumerate(models):
        if torch_prune.is_pruned(m):  # deepcopy failed raw on its computed weight; the float
            # weight_mask buffers would have been averaged, the masks not compared
            raise ValueError(
                f"models[{i}] holds torch.nn.utils.prune reparametrizations (weight_orig, "
                "weight_mask); make them permanent first (torch.nn.utils.prune.remove("
                "module, 'weight') on each pruned module): the zeros are then the mask")
    states = [m.state_dict() for m in models]
    keys = set(states[0])
    kinds = [type(m) for m in models[0].modules()]  # parameter-free modules too (ReLU/Tanh)
    for i, sd in enumerate(states[1:], 1):
        if set(sd) != keys or any(sd[k].shape != states[0][k].shape for k in keys) or [
                type(m) for m in models[i].modules()] != kinds:
            raise ValueError(f"models[{i}] has a different architecture than models[0]")
    for i, (m, sd) in enumerate(zip(models, states)):
        _check_values(i, m, sd, states[0])
    _check_opposite_infinities(models[0], states)
    for name in _masked(models[0], states):
        ref = states[0][name] != 0
        for i, sd in enumerate(states[1:], 1):
            if not torch.equal(sd[name] != 0, ref):
                raise ValueError(
                    f"models[{i}] has a different mask than models[0] for {name!r}; "
                    "a sparse soup needs one shared mask"
                )
    # a SparseLinear's mask is its index buffers, which are not averaged but taken from
    # models[0]: with other masks its values were averaged weight by unrelated weight
    for name, layer in models[0].named_modules():
        if isinstance(layer, SparseLinear):
            for i, other in enumerate(models[1:], 1):
                if not torch.equal(other.get_submodule(name).mask, layer.mask):
                    raise ValueError(
                        f"models[{i}] has a different mask than models[0] for the "
                        f"SparseLinear {name!r}; a sparse soup needs one shared mask"
                    )
    out = copy.deepcopy(models[0])
    averaged = {
        k: torch.stack([sd[k] for sd in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    out.load_state_dict(averaged)
    for name, module in out.named_modules():  # averaged weights lie on no model's grid
        if attached_scales(module) is not None and not all(
                torch.equal(sd[f"{name}.weight"], states[0][f"{name}.weight"])
                for sd in states[1:]):
            detach_scales(module)
    return out


def _masked(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]]) -> list[str]:
    """The names of ``model``'s default targets and of every other weight (a parameter of
    two dimensions or more: an embedding, a bare ``nn.Parameter``) that holds a zero in one
    of the ``states``: only the default targets were compared, and an embedding pruned to
    other masks averaged to the union of its masks."""
    names = {t.name for t in default_targets(model)}
    for name, param in model.named_parameters():
        if param.dim() >= 2 and param.is_floating_point() and any(
                bool((sd[name] == 0).any()) for sd in states):
            names.add(name)
    return sorted(names)


def _check_values(i: int, model: nn.Module, state: Mapping[str, torch.Tensor],
                  first: Mapping[str, torch.Tensor]) -> None:
    """Raise unless every tensor of ``model`` (``models[i]``, its ``state``) holds values on
    the device and in the dtype of models[0]'s, its parameters finite and its buffers free
    of NaN: a NaN made its entry of the soup NaN without a word (a diverged BatchNorm's
    running mean), and a meta tensor failed deep inside ``torch.equal``. (Buffers may hold
    ±inf on purpose, an attention mask's.) Another dtype was averaged promoted, then cast to
    models[0]'s: the soup of a float32 and a bfloat16 model depended on their order."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for k, v in state.items():
        if v.is_meta:
            raise ValueError(f"models[{i}] holds {k!r} on the meta device, without values to "
                             "average; load the weights first")
        if v.device != first[k].device:
            raise ValueError(f"models[{i}] holds {k!r} on {v.device}, models[0] on "
                             f"{first[k].device}; move the models to one device")
        if v.dtype != first[k].dtype:
            raise ValueError(f"models[{i}] holds {k!r} in {v.dtype}, models[0] in "
                             f"{first[k].dtype}; cast the models to one dtype")
        if k in params and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"models[{i}] holds NaN or inf in {k!r}; a soup of it would be "
                             "NaN or inf there")
        if v.is_floating_point() and bool(torch.isnan(v).any()):
            raise ValueError(f"models[{i}] holds NaN in its buffer {k!r}; a soup of it would "
                             "be NaN there (recompute it, e.g. BatchNorm statistics, first)")


def _check_opposite_infinities(first: nn.Module,
                               states: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise naming the first floating buffer that one model holds +inf and another -inf
    at the same entry: buffers may hold infinities on purpose (an attention mask's), but the
    mean of +inf and -inf is NaN, which the soup held without a word. (Parameters are
    finite: :func:`_check_values`; ``first`` is models[0], whose names say which are.)"""
    params = {n for n, _ in first.named_parameters(remove_duplicate=False)}
    for k, v in states[0].items():
        if k in params or not v.is_floating_point() or not any(
                bool(sd[k].isinf().any()) for sd in states):
            continue
        plus = torch.stack([torch.isposinf(sd[k]) for sd in states])
        minus = torch.stack([torch.isneginf(sd[k]) for sd in states])
        both = plus.any(0) & minus.any(0)
        if bool(both.any()):
            at = tuple(int(j) for j in both.nonzero()[0])
            i, j = int(plus[(slice(None), *at)].int().argmax()), int(
                minus[(slice(None), *at)].int().argmax())
            raise ValueError(
                f"models[{i}] holds +inf and models[{j}] -inf in {k!r} at {list(at)}; their "
                "mean, the soup's entry, would be NaN; accepted: models whose infinite "
                "entries agree in sign (an attention mask's -inf in every model)")


_ACCEPTED = "a non-empty sequence (list, tuple) of nn.Module sharing one mask, e.g. [a, b]"


def _check_models(models: object) -> list[nn.Module]:
    """``models`` as a list, checked to be a non-empty sequence of ``nn.Module`` (an
    ``nn.ModuleList`` is one). A single model is refused by name: an ``nn.Sequential`` is
    itself a sequence of modules, and its layers were averaged as if they were the models
    ("models[1] has a different architecture than models[0]")."""
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise ArgumentTypeError(f"models must be {_ACCEPTED}, got one model "
                                f"({type(models).__name__}); pass a list of the models to "
                                "average")
    if isinstance(models, (str, bytes, Mapping)) or not isinstance(models, Iterable):
        raise ArgumentTypeError(f"models must be {_ACCEPTED}, got {type(models).__name__}")
    given, models = models, list(models)
    if not models:
        raise ValueError(f"models must be {_ACCEPTED}, got {given!r}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            kind = "a state dict" if isinstance(m, Mapping) else type(m).__name__
            raise ArgumentTypeError(f"models[{i}] must be an nn.Module (models must be "
                                    f"{_ACCEPTED}), got {kind}")
    return models
