"""The pipeline shared by :func:`~sparsekit.moe.moefy` and :func:`~sparsekit.moe.contextual`.

record the inputs of every FFN on calibration data -> compute its neuron values -> a
*layout* (the layer's order of neurons, its hot count and unit size: what tells MoEfication
and Deja Vu/PowerInfer apart) -> the router's targets from each unit's activation mass
(:func:`~sparsekit.moe.routed.unit_mass`): MoEfication's mass itself (a listwise loss
ranks the units by it), or Deja Vu's 0/1 labels of the ``k`` largest -> train a router on
them, or, with ``router="lowrank"``, compute the mass through a low-rank factorisation of
the writers, refined on it (:class:`~sparsekit.moe.lowrank.LowRankRouter`) -> a
:class:`~sparsekit.moe.routed.RoutedFFN` in place of each FFN, in a copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    MAX_SEED,
    ArgumentTypeError,
    check_finite,
    check_fraction,
    check_int,
    check_seed,
    seeded,
)
from sparsekit.activation.record import record_inputs
from sparsekit.moe import ffn as ffns
from sparsekit.moe.lowrank import LowRankRouter
from sparsekit.moe.routed import RoutedFFN, check_model, unit_mass
from sparsekit.moe.router import Router, fit

__all__ = ["ROUTERS", "Layout", "build", "check_common"]

ROUTERS = ("mlp", "lowrank")
"""``router=`` of :func:`build`: a trained :class:`~sparsekit.moe.router.Router`, or a
:class:`~sparsekit.moe.lowrank.LowRankRouter` computed from the writers."""


@dataclass(frozen=True)
class Layout:
    """How one FFN's neurons are stored: ``order`` (stored -> original neuron), the first
    ``hot`` always run, the rest in units of ``unit_size``, ``k`` of them run per token;
    ``soft``: the router learns to rank the units by their mass (MoEfication: a listwise
    loss) rather than whether each is among the ``k`` largest (Deja Vu)."""

    order: torch.Tensor
    hot: int
    unit_size: int
    k: int
    soft: bool = False


Planner = Callable[[ffns.FFN, torch.Tensor], Layout]
"""``plan(ffn, h)``: the layout of ``ffn`` given its neuron values ``h`` (T, n)."""


def check_common(model: Any, calibration: Any, keep: Any, rank: Any, steps: Any,
                 max_rows: Any, seed: Any, router: Any) -> list[ffns.FFN]:
    """Validate the arguments both entry points share; the model's FFNs."""
    check_model("model", model)
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {', '.join(map(repr, ROUTERS))}, got "
                         f"{router!r}")
    check_fraction("keep", keep, zero=False, one=True)
    check_int("rank", rank, minimum=1)
    check_int("steps", steps, minimum=1)
    check_int("max_rows", max_rows, minimum=1)
    check_seed("seed", seed)
    routed = next((name for name, m in model.named_modules() if isinstance(m, RoutedFFN)), None)
    if routed is not None:  # its FFNs are gone: the error blamed "no feed-forward network"
        raise ValueError(f"model: {routed!r} is routed already; pass the model moefy or "
                         f"contextual was given, not the copy it returned")
    if calibration is None:
        raise ValueError("calibration must be a tensor of inputs or a list of them, got None")
    _check_calibration(calibration)
    return ffns.find_ffns(model)


_CALIBRATION = "a tensor of inputs (token ids), an (inputs, labels) pair or a list of them"


def _check_calibration(calibration: Any) -> None:
    """Raise naming ``calibration`` unless it is a tensor, a pair or a list of batches
    (each a tensor or a pair): the check the batches get later names ``data``, a
    parameter these functions do not have. A generator is checked as it is read."""
    if isinstance(calibration, (torch.Tensor, tuple)):
        return
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        hint = " (pass calibration['input_ids'])" if isinstance(calibration, Mapping) else ""
        raise ArgumentTypeError(f"calibration must be {_CALIBRATION}{hint}, got "
                                f"{type(calibration).__name__}")
    if isinstance(calibration, list):
        for i, item in enumerate(calibration):
            if not isinstance(item, (torch.Tensor, tuple, list)):
                raise ArgumentTypeError(f"calibration batch {i} must be a tensor or an "
                                        f"(inputs, labels) pair, got {type(item).__name__}")


def build(model: nn.Module, calibration: Any, layers: list[ffns.FFN], plan: Planner, *,
          rank: int, steps: int, max_rows: int, seed: int, router: str = "mlp") -> nn.Module:
    """A copy of ``model`` with each FFN in ``layers`` replaced by a RoutedFFN whose router
    (one of :data:`ROUTERS`) was fitted to the calibration inputs."""
    first = {f.name: model.get_submodule(f.writers[0]) for f in layers}
    generator = seeded(seed)
    inputs = record_inputs(model, first, calibration, max_rows=max_rows, generator=generator)
    missing = [n for n in first if n not in inputs]
    if missing:
        raise ValueError(f"calibration: the FFNs of {missing} never ran on it")
    modules = {}
    for i, layer in enumerate(layers):
        w_in, b_in, w_out, b_out = ffns.weights(model, layer)
        x = inputs[layer.name]
        with torch.no_grad():
            h = ffns.hidden(layer, x.to(w_in.dtype), w_in, b_in).float()
        _check_finite(layer.name, x, h)
        layout = plan(layer, h)
        scorer = None
        units = (h.shape[1] - layout.hot) // layout.unit_size
        stored = layout.order
        norms = torch.linalg.vector_norm(w_out.float(), dim=0)[stored]
        mass = unit_mass(h[:, stored], norms, layout.hot, layout.unit_size)
        if units and router == "lowrank":
            cold = stored[layout.hot:]
            scorer = LowRankRouter(w_in[cold], None if b_in is None else b_in[cold],
                                   norms[layout.hot:], layer.act, x, rank=rank,
                                   unit_size=layout.unit_size)
            if rank < x.shape[1]:  # at full rank the scores are exact already
                scorer.refine(x, mass, steps=steps, seed=(seed + i) & MAX_SEED)
        elif units:
            targets = mass if layout.soft else torch.zeros_like(mass).scatter_(
                1, mass.topk(layout.k, dim=1).indices, 1.0)
            scorer = fit(Router(x.shape[1], units, rank), x, targets, steps=steps,
                         loss="listwise" if layout.soft else "bce", seed=(seed + i) & MAX_SEED)
        modules[layer.name] = RoutedFFN(w_in, b_in, w_out, b_out, layer.act,
                                        order=layout.order, hot=layout.hot,
                                        unit_size=layout.unit_size, router=scorer, k=layout.k)
    out = copy.deepcopy(model)
    for layer in layers:
        module = modules[layer.name].to(next(out.get_submodule(layer.reader).parameters()).device)
        ffns.install(out, layer, module)
    return out


def _check_finite(name: str, x: torch.Tensor, h: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the inputs ``x`` of the FFN ``name`` on the calibration
    data and its neuron values ``h`` are finite, naming the argument at fault: NaN values
    cluster and rank at random (a router fitted to noise, silently) or fail later in a
    factorisation, with an error naming neither."""
    check_finite(f"calibration: the inputs of FFN {name!r} on it", x,
                 hint="check the calibration inputs and the layers before the FFN")
    check_finite(f"model: the values FFN {name!r} computes from finite calibration inputs", h,
                 hint="check its weights")
