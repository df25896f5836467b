"""Persistence of compiled and sparse-trained models, and the way back to dense layers.

A compiled layer (:class:`~sparsekit.engine.compiled_linear.CompiledLayer`) stores its weight
as the plain tensors of its format (values, column indices, row pointers), and a
:class:`~sparsekit.engine.sparse_linear.SparseLinear` its values and structure, so
``state_dict()``, :func:`sparsekit.save` and :func:`sparsekit.load` work on them as on any
model. Because the number of nonzeros (and the format) differ from model to model, such a
layer takes them from what is loaded; :func:`expected_state` tells :func:`sparsekit.load`
which shapes to accept. :func:`decompile` turns a compiled model
back into one with ``nn.Linear`` and ``nn.Conv2d`` layers (to train again, or to save a
dense checkpoint).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.compiled_linear import CompiledLayer, CompiledLinear
from sparsekit.engine.sparse_linear import SparseLinear

__all__ = ["decompile", "expected_state"]


def decompile(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every compiled layer replaced by its ``nn.Linear``/``nn.Conv2d``.

    Weights are dense with zeros where pruned, as trainable parameters on the layer's
    device and dtype. An :class:`ActivationSparseLinear` loses its input thresholds (its
    ``nn.Linear`` is the dense layer it was built from). ``model`` is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (CompiledLayer, ActivationSparseLinear)):
        return _to_module(model)
    out = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}  # a shared layer stays shared
    for parent in list(out.modules()):
        for name, child in list(parent._modules.items()):
            if isinstance(child, (CompiledLayer, ActivationSparseLinear)):
                if id(child) not in done:
                    done[id(child)] = _to_module(child)
                setattr(parent, name, done[id(child)])
    out.__dict__.pop("sparsekit_choices", None)
    return out


def expected_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the size-dependent entries of some layers taken from ``state``.

    A compiled layer accepts any valid format of its shape (see
    :meth:`CompiledLinear.format_from_state`) and a :class:`SparseLinear` any valid
    structure (see :meth:`SparseLinear.structure_from_state`), so their entries are checked
    here, before anything is loaded, and raise ``ValueError`` naming the layer if invalid.
    Missing or extra keys elsewhere are left for the caller to report.
    """
    own = model.state_dict()
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if isinstance(module, CompiledLayer):
            head = f"{prefix}format."
            if not any(k.startswith(head) for k in state):
                continue  # reported as missing keys by the caller
            module.format_from_state(state, prefix)
            for key in [k for k in own if k.startswith(head)]:
                del own[key]
            own.update({k: v for k, v in state.items() if k.startswith(head)})
        elif isinstance(module, SparseLinear):
            keys = [f"{prefix}{k}" for k in ("values", "rowptr", "col")]
            if all(k in state for k in keys):  # else: reported as missing keys by the caller
                module.structure_from_state(state, prefix)
                own.update({k: state[k] for k in keys})
    return own


def _to_module(layer: CompiledLayer | ActivationSparseLinear) -> nn.Module:
    if isinstance(layer, CompiledConv2d):
        linear: nn.Module = layer.to_conv2d()
    elif isinstance(layer, CompiledLinear):
        linear = layer.to_linear()
    else:
        weight = layer.weight_t.t()
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
    linear.train(layer.training)
    return linear
