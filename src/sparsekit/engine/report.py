"""report(): :func:`sparsekit.report` with the layers the engine installed.

Compiled layers appear as ``Linear``/``Conv2d`` rows of their format, value dtype (and
activation dtype where the inputs are quantized too, W8A8) and bytes, with the times
:func:`~sparsekit.engine.compile` measured for them and the relative output error its
rounding of the weights (bf16, int8) costs; activation-sparse layers as ``Linear`` rows of
format ``"activation"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from sparsekit import observe
from sparsekit._checks import check_materialized_module, check_module
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.compile import _formats
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.compiled_linear import CompiledLayer
from sparsekit.engine.formats.native import SCALES
from sparsekit.engine.fused import FusedLinear
from sparsekit.quantize import is_grouped
from sparsekit.report import LayerRow, Report
from sparsekit.report import report as _base_report

__all__ = ["report"]


def report(
    model: nn.Module, example_inputs: torch.Tensor | tuple[object, ...] | None = None
) -> Report:
    """:func:`sparsekit.report` that also lists compiled and activation-sparse layers.

    Compiled layers appear as ``Linear``/``Conv2d`` rows with the extra columns ``format``,
    ``values`` (the stored dtype: float32, bfloat16, int8 with per-row scales,
    ``"int8 g128"`` with one per row and group of 128 inputs; ``"int8 (W8A8)"`` where the inputs are
    quantized to int8 as well, so that a reader tells the integer kernels from the float
    ones) and ``bytes`` (all of the format's buffers), and from ``model.sparsekit_choices``
    ``ms dense``, ``ms sparse``, ``speedup`` and ``quant err`` (the relative output error of
    the stored values against the layer's own weights, measured by
    :func:`~sparsekit.engine.compile`);
    :class:`ActivationSparseLinear` layers as ``Linear`` rows of format ``"activation"``
    with the ``values`` of their single-row kernel (``"int8 g128"``, ``"int8 (W8A8)"``, ...);
    one holding a second format for several rows (its ``prefill``) also shows ``bytes`` (its
    single-row storage) and ``prefill bytes`` (what the second format costs on top).
    A linear layer that compile left dense on purpose (its parent's forward reads its
    weight, as in a ``TransformerEncoderLayer``) shows format ``"dense"`` and the reason
    under ``note``.

    A compiled layer on the meta device holds no values to count: a ``ValueError`` names it.
    Records of ``model.sparsekit_choices`` that are no timing's (not a mapping, or without
    its times) add no columns: the report reads them only to show them.
    """
    check_module("model", model)
    for name, module in model.named_modules():
        if isinstance(module, (CompiledLayer, ActivationSparseLinear)):  # a raw .item() error
            check_materialized_module(module, f"model: {name}." if name else "model: ")
    # First: it checks example_inputs, and names them in the error of a model they do not
    # fit, before this report runs the model on them.
    base = {r.name: r for r in _base_report(model, example_inputs).rows}
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    # an activation-sparse layer's prompt path is its own row's "prefill bytes": a row of
    # its own counted the layer's parameters and FLOPs twice in the totals
    prefills = {id(m.prefill) for m in model.modules()
                if isinstance(m, ActivationSparseLinear) and m.prefill is not None}
    special = {
        n: m for n, m in model.named_modules()
        if isinstance(m, (CompiledLayer, ActivationSparseLinear)) and id(m) not in prefills
    }
    base = {n: r for n, r in base.items() if n not in special}  # their rows are made below
    macs = {} if inputs is None else observe.macs(model, special, *inputs)
    recorded = getattr(model, "sparsekit_choices", None)
    if not isinstance(recorded, Mapping):  # set to None or a list by hand
        recorded = {}
    choices = {n: c for n, c in recorded.items() if isinstance(c, Mapping)}
    choices.update(_stacked_choices(model, choices))
    rows = []
    for name, module in model.named_modules():
        if name in base:
            row = base[name]
            if "reason" in choices.get(name, {}):  # left dense on purpose by compile()
                row.extra.update({"format": "dense", "note": choices[name]["reason"]})
            rows.append(row)
        elif name in special:
            rows.append(_special_row(name, module, macs, inputs is None, choices.get(name)))
    return Report(rows)


_TIMES = {"ms dense": "ms_dense", "ms sparse": "ms_chosen", "speedup": "speedup"}
"""The report's columns of a layer's timing record, and the keys they show."""


def _stacked_choices(
    model: nn.Module, choices: dict[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    """The choice of each fused group's stacked layer (``<first member>.group.linear``, the
    row of the group), kept by compile under its members' ``fused`` record, with the
    members named under ``note``."""
    out = {}
    for name, module in model.named_modules():
        record = choices.get(name, {}).get("fused")
        if not (isinstance(module, FusedLinear) and module.index == 0
                and isinstance(record, dict) and isinstance(record.get("stacked"), dict)):
            continue
        members = record.get("group")  # a list of names, unless the record was edited
        members = members if isinstance(members, (list, tuple)) else []
        out[f"{name}.group.linear"] = {**record["stacked"],
                                       "note": "fused: " + ", ".join(map(str, members))}
    return out


def _values(value_dtype: torch.dtype, scales: torch.Tensor | None, in_features: int,
            w8a8: bool) -> str:
    """The stored dtype, with the group size of int8 scales per group of inputs
    (``"int8 g128"``) and the activation dtype where the inputs are quantized (W8A8)."""
    values = str(value_dtype).removeprefix("torch.")
    # int8 values only: a dense float weight keeps its grid's scales too, and holds no codes
    if value_dtype == torch.int8 and is_grouped(scales) and scales.shape[1]:
        values += f" g{in_features // scales.shape[1]}"
    return f"{values} (W8A8)" if w8a8 else values


def _one_row_times(choice: Mapping[str, object]) -> dict[str, float] | None:
    """An activation-sparse layer's columns of :data:`_TIMES`: its own one-row time (the
    ``activation`` record's), against the dense layer's at one row where the weight-only
    record timed it (the record's top-level times are the weight-only format's, which the
    layer serves its prompt rows with)."""
    def at_one(times: object, key: str) -> float | None:
        series = times.get(key) if isinstance(times, Mapping) else None
        value = series.get(1, series.get("1")) if isinstance(series, Mapping) else None
        return float(value) if isinstance(value, (int, float)) else None

    record = choice.get("activation")
    decode = record.get("decode") if isinstance(record, Mapping) else None
    ms = at_one(decode.get("times_ms"), "activation") if isinstance(decode, Mapping) else None
    if ms is None:
        return None
    dense = at_one(choice.get("times_ms"), "dense")
    return {"ms sparse": ms} | ({} if dense is None else
                                {"ms dense": dense, "speedup": dense / max(ms, 1e-12)})


def _special_row(
    name: str,
    module: CompiledLayer | ActivationSparseLinear,
    macs: dict[str, int],
    one_row: bool,
    choice: Mapping[str, object] | None,
) -> LayerRow:
    params = module.in_features * module.out_features
    if isinstance(module, CompiledLayer):
        fmt = module.format
        nonzeros = fmt.nnz
        values = _values(fmt.value_dtype, fmt._buffers.get(SCALES), fmt.in_features,
                         getattr(fmt, "activation_dtype", None) == torch.int8)
        extra = {"format": fmt.name, "values": values, "bytes": fmt.nbytes}
        large = getattr(module, "format_large", None)
        if large is not None:  # a second format serves many rows: both hold the weight
            extra.update({"format": _formats(module), "bytes": fmt.nbytes + large.nbytes})
        kind = "Conv2d" if isinstance(module, CompiledConv2d) else "Linear"
    else:
        stored = module.to_dense()  # the single-row kernel's values (int8: codes)
        nonzeros = int(torch.count_nonzero(stored))
        extra = {"format": "activation",
                 "values": _values(stored.dtype, module.scales, module.in_features,
                                   module.kernel == "act_bitmap_qgemv")}
        if module.prefill is not None:  # a second copy of the weight serves the prompt rows
            extra.update({"bytes": module.nbytes, "prefill bytes": module.prefill_nbytes})
        kind = "Linear"
    layer_macs = params if one_row and kind == "Linear" else macs.get(name)
    dense = None if layer_macs is None else 2 * layer_macs
    held = str(module.format.value_dtype).removeprefix("torch.") \
        if isinstance(module, CompiledLayer) else None
    if held is not None and choice is not None and "format" in choice and (
            choice["format"] != module.format.name or choice.get("value_dtype", held) != held):
        # a checkpoint loaded since put another format in: those timings are not this one's
        extra["note"] = f"timed as {choice.get('format')} at compile; loaded as {fmt.name}"
        choice = None
    if choice is not None:
        own = None if isinstance(module, CompiledLayer) else _one_row_times(choice)
        extra.update(own if own is not None else
                     {column: choice[key] for column, key in _TIMES.items() if key in choice})
        if "quantization_error" in choice:
            extra["quant err"] = choice["quantization_error"]
        if "note" in choice:
            extra["note"] = choice["note"]
    shape = (module.out_features, module.in_features)
    if isinstance(module, CompiledConv2d):
        shape = (module.out_channels, module.in_channels, *module.kernel_size)
    return LayerRow(
        name=name,
        kind=kind,
        shape=shape,
        params=params,
        nonzeros=nonzeros,
        dense_flops=dense,
        sparse_flops=None if dense is None else dense * nonzeros // max(params, 1),
        extra=extra,
    )
