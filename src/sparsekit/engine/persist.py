"""The way back from a compiled model to ``nn.Linear``/``nn.Conv2d`` layers.

Compiled and sparse-trained models save and load like any model: each such layer knows
how it persists (``expected_state``, read by :func:`sparsekit.load` to check a file before
loading it) and how it turns back into a plain PyTorch layer (``to_module``).
:func:`decompile` applies the latter to a whole model (to train again, or to save a dense
checkpoint).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from sparsekit._checks import check_materialized_module, check_module
from sparsekit.engine._moved import moved
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.compiled_linear import CompiledLayer, CompiledLinear
from sparsekit.engine.fused import FusedLinear
from sparsekit.quantize import SCALE_NAME
from sparsekit.targets import conv1d_type

__all__ = ["decompile"]

COMPILED_LAYERS = (CompiledLayer, ActivationSparseLinear, FusedLinear)
"""The layer types compile() installs (what decompile() replaces)."""

# expected_state() is not engine-specific: it moved to the checkpoint module.
__getattr__ = moved(__name__, {"expected_state": "sparsekit.checkpoint"})


def runs_own_layers(module: nn.Module) -> bool:
    """Whether ``module`` is implemented by the layers it holds, reading their weights and
    formats itself (a class with ``sparsekit_runs_own_layers = True``: sparsekit.moe's
    ``RoutedFFN``, whose reader is an :class:`ActivationSparseLinear`, and
    ``RoutedAttention``): decompile leaves it whole, and compile and pruning refuse it by
    name, since any of its layers replaced breaks it."""
    return getattr(type(module), "sparsekit_runs_own_layers", False) is True


def decompile(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every compiled layer replaced by its ``nn.Linear``/``nn.Conv2d``.

    Weights are dense with zeros where pruned, as trainable parameters on the layer's
    device and dtype. An :class:`ActivationSparseLinear` loses its input thresholds (its
    ``nn.Linear`` is the dense layer it was built from). A module that runs its own layers
    (:func:`runs_own_layers`: sparsekit.moe's routed layers) is copied whole. ``model`` is
    not modified. A compiled layer on the meta device holds no weight to give back: a
    ``ValueError`` names it (decoding its format failed inside PyTorch), a fused member's by
    its group's name under it (``q.group.linear.bias``).
    """
    check_module("model", model)
    for name, layer in model.named_modules():
        if isinstance(layer, COMPILED_LAYERS) and not _inside_own(model, name):
            held, prefix = layer, f"model: {name}." if name else "model: "
            if isinstance(layer, FusedLinear):
                # a member past the first holds its group without registering it: its
                # stacked layer on the meta device came back as an nn.Linear of meta weights
                held, prefix = layer._group, f"{prefix}group."
            check_materialized_module(held, prefix)
    if isinstance(model, COMPILED_LAYERS):
        return _to_module(model)
    out = replaced(model, COMPILED_LAYERS, _to_module)
    out.__dict__.pop("sparsekit_choices", None)
    _as_conv1d(out, out.__dict__.pop("sparsekit_conv1d", ()))
    _tie(out, out.__dict__.pop("sparsekit_tied", {}))
    return out


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Tie again, in place, each layer named in ``tied`` (``sparsekit_tied``) to the weight
    its layer shared before a forced format compiled a copy of it (a language model's
    ``lm_head`` and its input embedding), where the decompiled weight still equals it: an
    int8 copy holds other values, and stays a layer of its own."""
    for name, other in tied.items():
        layer, weight = model.get_submodule(name), model.get_parameter(other)
        if layer.weight.shape == weight.shape and torch.equal(layer.weight, weight):
            layer.weight = weight


def conform(model: nn.Module, keys: Collection[str],
            tied: Mapping[str, str]) -> Callable[[], None]:
    """Compile or decompile, in place, the layers of the compiled ``model`` that the
    compiled model whose state has ``keys`` holds the other way; return the function that
    puts the replaced layers back.

    Which layers compile replaces depends on its arguments and timing (a tied ``lm_head``
    is compiled only by a forced format, a convolution only with ``example_inputs``), so
    one compiled copy of a model may hold a plain ``nn.Linear``/``nn.Conv2d`` where the
    saved one held a compiled layer: it becomes an empty compiled layer (dense; the load
    installs the saved format). A compiled layer saved plain becomes its plain layer, tied
    again where ``tied`` (the file's ties, key to stored key) names its weight. Nothing
    changes unless both ``model`` and the saved state hold compiled layers: a file of an
    uncompiled model does not decompile a compiled one."""
    keys = set(keys)
    compiled = saved_compiled(keys)
    replaced: list[tuple[str, nn.Module]] = []
    if not compiled or not holds_compiled(model):
        return lambda: None

    def undo() -> None:
        for name, old in reversed(replaced):
            model.set_submodule(name, old)

    try:
        for name, layer in list(model.named_modules()):
            if not name:
                continue
            if type(layer) in (nn.Linear, nn.Conv2d) and name in compiled:
                new: nn.Module = (CompiledLinear.from_linear(layer) if type(layer) is nn.Linear
                                  else CompiledConv2d.from_conv2d(layer))
            elif (isinstance(layer, (CompiledLinear, CompiledConv2d))
                  and f"{name}.weight" in keys
                  and {k for k in keys if k.startswith(f"{name}.")} <= {
                      f"{name}.weight", f"{name}.bias", f"{name}.{SCALE_NAME}"}):
                new = _to_module(layer)
                source = _parameter(model, tied.get(f"{name}.weight"))
                if source is not None and source.shape == new.weight.shape:
                    new.weight = source
            else:
                continue
            replaced.append((name, layer))
            model.set_submodule(name, new.train(layer.training))
    except BaseException:  # a layer that fails to convert: the model as it was
        undo()
        raise
    return undo


def saved_compiled(keys: Collection[str]) -> set[str]:
    """The names of the compiled layers (their ``format`` entries) a state with ``keys``
    holds."""
    return {k.split(".format.", 1)[0] for k in keys if ".format." in f".{k}"}


def holds_compiled(model: nn.Module) -> bool:
    """Whether ``model`` holds a layer compile installs (:data:`COMPILED_LAYERS`)."""
    return any(isinstance(m, COMPILED_LAYERS) for m in model.modules())


def _inside_own(model: nn.Module, name: str) -> bool:
    """Whether the submodule ``name`` of ``model`` lies inside one that runs its own layers."""
    parts = name.split(".")
    return any(runs_own_layers(model.get_submodule(".".join(parts[:i])))
               for i in range(1, len(parts)))


def _parameter(model: nn.Module, name: str | None) -> nn.Parameter | None:
    """``model``'s parameter ``name``, or ``None`` (no name, or none of that name)."""
    try:
        return None if name is None else model.get_parameter(name)
    except AttributeError:
        return None


def _as_conv1d(model: nn.Module, names: Sequence[str]) -> None:
    """Put back, in place, the GPT-2 ``Conv1D`` layers that compile took as ``nn.Linear``
    under ``names`` (``sparsekit_conv1d``): a decompiled GPT-2 held ``Linear`` weights of
    the transposed shape, which no GPT-2 loaded (a layer shared by two names stays shared)."""
    conv1d = conv1d_type()
    done: dict[int, nn.Module] = {}
    for name in names:
        layer = model.get_submodule(name)
        if conv1d is None or type(layer) is not nn.Linear:
            continue
        if id(layer) not in done:
            back = conv1d(layer.out_features, layer.in_features).to(
                device=layer.weight.device, dtype=layer.weight.dtype)
            back.weight = nn.Parameter(layer.weight.detach().t().contiguous(),
                                       layer.weight.requires_grad)
            back.bias = None if layer.bias is None else layer.bias
            back.train(layer.training)
            done[id(layer)] = back
        model.set_submodule(name, done[id(layer)])


def replaced(model: nn.Module, kinds: type | tuple[type, ...],
             convert: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` in which every submodule of ``kinds`` is ``convert``-ed;
    a module shared by several parents is converted once and stays shared.

    The walk does not enter a module of ``kinds``: its submodules are its own business
    (a fused group's stacked layer, held by its first member, is also read by members in
    other parents, as in Phi, whose q/k/v and fc1 read one input)."""
    out = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}
    visited: set[int] = set()

    def walk(parent: nn.Module) -> None:
        if id(parent) in visited:
            return
        visited.add(id(parent))
        for name, child in list(parent._modules.items()):
            if isinstance(child, kinds):
                if id(child) not in done:
                    done[id(child)] = convert(child)
                setattr(parent, name, done[id(child)])
            elif child is not None and not runs_own_layers(child):
                walk(child)

    walk(out)
    return out


def _to_module(layer: CompiledLayer | ActivationSparseLinear | FusedLinear) -> nn.Module:
    return layer.to_module().train(layer.training)
