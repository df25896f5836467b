"""Symmetric int8 weight quantization: the value grid shared by pruning and the engine.

A weight row is stored as int8 codes ``q`` in ``[-127, 127]`` and a float32 scale, the
row's largest magnitude over 127, so that ``q * scale`` approximates the weight and a
pruned (zero) weight stays exactly zero: quantization never changes a mask. With
``group_size`` each run of ``group_size`` consecutive inputs of a row gets its own scale
(``ceil(in_features / group_size)`` scales per row; a last partial group has one too),
which tightens the grid where a row mixes large and small inputs.

:func:`int8_scales` chooses the scales, :func:`quantize_int8` rounds to nearest on them,
:func:`dequantize_int8` maps codes back and :func:`fake_quantize` does both (what
SparseGPT's joint mode applies to each column inside its update). Sums over int8 weights
are float32 in every kernel; only the stored values are 8-bit.

A layer whose weight already lies on an int8 grid (``sparsekit.llm.prune(...,
quantize="int8")``) carries that grid's scales as a float32 buffer named
:data:`SCALE_NAME` (``weight_scale``, the name compressed-tensors also uses), of shape
``(out,)`` or, for groups, ``(out, in / group_size)`` (an attached grid's groups divide the
row evenly, so the shape says the group size: :func:`group_size_of`):
:func:`attach_scales` sets it, :func:`attached_scales` reads it, :func:`detach_scales`
drops it once the weight leaves the grid (pruning again without quantizing), and
:func:`sparsekit.compile` then stores exactly those codes. ``load_state_dict`` refuses a
``weight_scale`` that is not positive and finite before loading it (:func:`guard_loading`).

Every scale :func:`int8_scales` gives is a normal float32 number (at least
:data:`MIN_SCALE`): rows of subnormal weights lie on the grid of that step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_int,
    check_materialized,
    check_module,
    is_float8,
)

__all__ = [
    "INT8_MAX", "MAX_SCALE", "MIN_SCALE", "SCALE_NAME", "attach_scales", "attached_scales",
    "check_on_grid", "check_within_grid", "dequantize_grid", "dequantize_int8", "detach_scales",
    "fake_quantize", "group_size_of", "guard_loading", "install_scales", "int8_scales",
    "is_grouped", "quantize_int8", "scales_at",
]

INT8_MAX = 127  # symmetric: -128 is never used, so negating a code never overflows
SCALE_NAME = "weight_scale"
MIN_SCALE = torch.finfo(torch.float32).tiny
"""The smallest scale :func:`int8_scales` gives: float32's smallest normal number (a row's
largest magnitude over 127 below it was a subnormal scale, or 0)."""
MAX_SCALE = float(torch.nextafter(torch.tensor(torch.finfo(torch.float32).max) / INT8_MAX,
                                  torch.tensor(0.0)))
"""The largest int8 scale: the largest float32 whose multiple by 127 float32 still holds.
float32's largest number over 127 (the scale of a row holding it) rounds up, so code 127
decoded to inf; a larger scale decoded every code beyond 1 to inf."""


def int8_scales(weight: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """float32 scales of a 2-D ``weight``: ``(out,)`` per output channel, or
    ``(out, ceil(in / group_size))`` per group of ``group_size`` inputs.

    Each scale is its row's (group's) largest magnitude over :data:`INT8_MAX`; an all-zero
    row (group) gets scale 1 (its codes are all zero anyway). No scale is below float32's
    smallest normal number (``torch.finfo(torch.float32).tiny``, :data:`MIN_SCALE`): a row
    of float32 weights whose largest magnitude is below 127 times it (subnormal weights,
    or normal ones under ~1.5e-36) had a subnormal scale, and one in the first ~63
    subnormals a scale of exactly 0 that was then refused as a bad scale the caller never
    gave; such a row now lies on the grid of step ``tiny`` (codes in [-127, 127], an
    all-subnormal row's in {-1, 0, 1}), so each weight's rounding error is at most
    ``tiny / 2`` and never more than the row's largest magnitude. Integer magnitudes are
    taken in float64, where int8's -128 is 128 (``abs`` gave -128). A float64 weight whose
    nonzero magnitudes float32 cannot hold is refused: one beyond its largest number
    became an infinite scale, a row whose largest magnitude is below its smallest normal
    one all-zero codes (a nonzero row quantized to zeros, changing the mask).
    """
    _check_weight("weight", weight, group_size)
    groups = _grouped(weight, group_size).detach()
    if not groups.is_floating_point():  # abs() of an integer type's minimum overflows
        groups = groups.to(torch.float64)
    # amax has no identity: a weight without inputs (rows of zero width) was an IndexError
    absmax = groups.abs().amax(dim=-1) if groups.shape[-1] else groups.new_zeros(groups.shape[:-1])
    if weight.dtype == torch.float64:
        f32 = torch.finfo(torch.float32)
        tiny = (absmax > 0) & (absmax < f32.tiny)
        if bool(tiny.any()):
            where = tuple(int(i) for i in tiny.nonzero()[0])
            raise ValueError(
                f"weight: the largest magnitude of row {where[0]}"
                f"{'' if group_size is None else f' group {where[1]}'} is "
                f"{absmax[where].item():.3g}, below float32's smallest normal number "
                f"{f32.tiny:.3g}: in float32, where codes are computed, every code of the row "
                "is 0; rescale the weight"
            )
    absmax = absmax.to(torch.float32)
    # clamped: below 127 * tiny the scale was subnormal, in the first subnormals exactly 0;
    # at float32's largest magnitudes code 127 decoded to inf
    return torch.where(absmax > 0, (absmax / INT8_MAX).clamp(min=MIN_SCALE, max=MAX_SCALE),
                       torch.ones_like(absmax))


def quantize_int8(
    weight: torch.Tensor, scales: torch.Tensor | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)``: ``weight`` rounded to nearest on the int8 grid of ``scales``
    (default: :func:`int8_scales`), codes clamped to ``[-127, 127]``."""
    if scales is None:
        scales = int8_scales(weight, group_size)
    else:
        _check_weight("weight", weight, group_size)
    _check_scales(weight, scales, group_size)
    groups = _grouped(weight.detach().to(torch.float32), group_size)
    # on the float32 scales dequantize_int8 and the kernels multiply by: a float64 scale
    # was divided by as float64 (1e-300 gave codes of ±127 that decoded to 0)
    stored = scales.detach().to(torch.float32)
    codes = torch.round(groups / stored.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    return _ungrouped(codes, weight.shape).to(torch.int8), scales


def check_within_grid(name: str, weight: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise unless every entry of ``weight`` lies within the range of the int8 grid of
    ``scales`` (its attached ``weight_scale``): at most 127.5 steps from zero, where
    rounding to the grid is an error of at most half a step. A weight that grew since it
    was quantized (fine-tuned, merged, rescaled) was clamped to ±127 steps by
    :func:`quantize_int8`: a compiled layer 3x the size of its grid was off by 46 % of its
    largest output, without a word. ``name`` names the layer in the error. A weight or
    scales that are no grid (a 1-D weight, scales of another shape, a zero scale) are
    refused as such: they were raw broadcasting errors, a weight "beyond its grid" by
    infinitely many steps, or a 1-D weight broadcast against the scales and passed."""
    _check_weight(f"{name}: weight", weight, None)
    group_size = group_size_of(weight, scales)
    _check_scales(weight, scales, group_size)
    groups = _grouped(weight.detach().to(torch.float32), group_size)
    steps = (groups / scales.detach().to(torch.float32).unsqueeze(-1)).abs()
    if bool((steps > INT8_MAX + 0.5).any()):
        flat = int(steps.flatten().argmax())
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), steps.shape))
        row, col = at[0], (at[1] * steps.shape[-1] + at[2] if steps.dim() == 3 else at[1])
        raise ValueError(
            f"{name}: the weight lies beyond its int8 grid ({SCALE_NAME}): weight[{row}, {col}]"
            f" = {float(weight.detach()[row, col]):.6g} is {float(steps[at]):.1f} steps of its "
            f"scale from zero, the grid holds {INT8_MAX} (changed since it was quantized?); "
            "accepted: weights within their grid — quantize again (llm.prune(..., "
            "quantize='int8')), or sparsekit.quantize.detach_scales(layer) to take fresh "
            "scales"
        )


def check_on_grid(name: str, weight: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise unless ``weight`` lies on the int8 grid of ``scales`` (its attached
    ``weight_scale``): each entry a code times its scale, in the weight's dtype. A weight
    moved off it since it was quantized (a LoRA merged into it, a fine-tune by a masked
    optimizer) was rounded back onto the stale grid by ``compile``, which dropped a
    fine-tune smaller than half a step without a word. One unit in the last place of the
    weight's dtype is allowed: a model cast to bfloat16 rounds its weights and its scales
    apart. Check :func:`check_within_grid` first (the range, and a well-formed grid);
    ``name`` names the layer."""
    _check_weight(f"{name}: weight", weight, None)
    if not weight.is_floating_point():
        raise ArgumentTypeError(f"{name}: weight must be a floating tensor (int8 codes lie on "
                                f"their grid by construction), got {weight.dtype}")
    rows = weight.detach()
    group_size = group_size_of(rows, scales)
    exact = rows.to(torch.float32)
    codes, steps = quantize_int8(exact, scales, group_size)
    grid = dequantize_int8(codes, steps, group_size)
    ulp = torch.finfo(rows.dtype).eps * torch.maximum(exact.abs(), grid.abs())
    off = (grid - exact).abs() > ulp
    if bool(off.any()):
        row, col = (int(i) for i in off.nonzero()[0])
        raise ValueError(
            f"{name}: the weight lies off its int8 grid ({SCALE_NAME}): weight[{row}, {col}] = "
            f"{float(rows[row, col]):.6g} is no multiple of its scale ({int(off.sum())} of "
            f"{off.numel()} entries; changed since it was quantized, e.g. fine-tuned or a "
            "LoRA merged?), and storing it as int8 on that grid would round the change away; "
            "accepted: weights on their grid — quantize again (llm.prune(..., "
            "quantize='int8')), or sparsekit.quantize.detach_scales(layer) to take fresh "
            "scales")


def dequantize_int8(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """The float32 weight ``codes * scales`` (scales per row, or per group of inputs; float64
    scales are rounded to the float32 the kernels hold, not promoting the weight)."""
    _check_weight("codes", codes, group_size)
    _check_scales(codes, scales, group_size)
    _check_codes(codes)
    groups = _grouped(codes.to(torch.float32), group_size)
    return _ungrouped(groups * scales.to(torch.float32).unsqueeze(-1), codes.shape)


def dequantize_grid(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`dequantize_int8` of ``codes`` (out, in) on the grid of ``scales`` as stored
    with them: one per row ``(out,)``, or one per row and group ``(out, groups)``, the group
    size being ``in / groups`` (:func:`group_size_of`)."""
    _check_weight("codes", codes, None)  # group_size_of named a list of codes "weight"
    return dequantize_int8(codes, scales, group_size_of(codes, scales))


def scales_at(scales: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              in_features: int) -> torch.Tensor:
    """The scale of each stored weight at ``rows`` and ``cols`` (int64 tensors that
    broadcast together) on the grid of ``scales``: its row's for ``(out,)`` scales, its
    row's of its group of inputs for ``(out, groups)`` ones (groups of ``in_features /
    groups`` inputs) — what a format's fallback multiplies its stored codes by.

    ``rows`` must lie in ``[0, out)`` and ``cols`` in ``[0, in_features)``, ``in_features``
    be an int the groups divide: an index past the grid was a raw ``IndexError``, and a
    negative one (or a column past ``in_features`` of a per-row grid) read another
    weight's scale without a word. The indices' values are checked where reading them costs
    no device sync and no graph break: on the CPU, outside ``torch.compile`` tracing (the
    engine's paths call this on every product)."""
    if not isinstance(scales, torch.Tensor) or scales.dim() not in (1, 2):
        raise ArgumentTypeError(f"scales must be a tensor of int8 scales (out,) or (out, "
                                f"groups), got {type(scales).__name__} "
                                f"{tuple(getattr(scales, 'shape', ()))}")
    check_int("in_features", in_features, minimum=1)
    groups = scales.shape[1] if is_grouped(scales) else 1
    if groups < 1 or in_features % groups:  # (out, 0) scales: a raw ZeroDivisionError
        raise ValueError(f"in_features must be divided by the {groups} groups of scales of "
                         f"shape {tuple(scales.shape)}, got {in_features}")
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    for name, index, size, what in (("rows", rows, scales.shape[0], "the rows of scales"),
                                    ("cols", cols, in_features, "in_features inputs")):
        # int32/int64 only: torch indexes with uint8 as a boolean mask (another answer,
        # silently) and fails raw on int8/int16
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
            raise ArgumentTypeError(f"{name} must be an int32 or int64 tensor of indices, got "
                                    f"{getattr(index, 'dtype', type(index).__name__)}")
        if (index.numel() and index.device.type == "cpu" and not tracing
                and not 0 <= int(index.min()) <= int(index.max()) < size):
            bad = index[(index < 0) | (index >= size)][0]
            raise ValueError(f"{name} must lie in [0, {size}) ({what}), got {int(bad)}")
    if not is_grouped(scales):
        return scales[rows]
    return scales[rows, cols // (in_features // groups)]


def fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None
) -> torch.Tensor:
    """``weight`` rounded to the int8 grid of ``scales``, in ``weight``'s dtype (what the
    int8 kernels will multiply with; zeros stay zero); float32 for an integer ``weight``,
    whose grid values are fractions (cast back, 7.83 was truncated to 7, off the grid).
    A grid value a half-precision ``weight``'s dtype cannot hold is a ``ValueError``."""
    codes, _ = quantize_int8(weight, scales, group_size)
    values = dequantize_int8(codes, scales, group_size)
    if not weight.is_floating_point():
        return values
    cast = values.to(weight.dtype)
    if cast.element_size() < 4 and not bool(cast.isfinite().all()):
        # a grid value past half precision's range (the weight rounded up to the next code)
        # became inf without a word; scales of int8_scales never do that
        at = tuple(int(i) for i in (~cast.isfinite()).nonzero()[0])
        raise ValueError(
            f"scales: weight[{at[0]}, {at[1]}] = {weight[at].item():.6g} lies nearest "
            f"{values[at].item():.6g} on the grid of scales, beyond {weight.dtype}'s range "
            f"(largest {torch.finfo(weight.dtype).max:.6g}); accepted: scales whose grid "
            "holds the weight (int8_scales(weight), its largest magnitude over 127)"
        )
    return cast


def attach_scales(module: nn.Module, scales: torch.Tensor) -> None:
    """Record that ``module.weight`` lies on the int8 grid of ``scales`` (one per output
    channel, ``(out,)``, or one per group of inputs, ``(out, groups)`` with ``groups``
    dividing ``in``: groups of ``in / groups`` inputs) as a float32 buffer
    :data:`SCALE_NAME`, saved with the module's ``state_dict``.

    The scales are checked as the float32 values stored (a float64 scale float32 cannot
    hold became a zero or infinite one), and a ``weight_scale`` the module already has that
    is not such a buffer (a compressed-tensors parameter) is refused, not replaced. A
    ``weight_scale`` that is not positive and finite is refused when loaded with
    ``load_state_dict`` too, before the module's tensors change (:func:`guard_loading`).
    """
    check_module("module", module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"module must have a 2-D weight, got {type(module).__name__}")
    _check_scales(weight, scales, group_size_of(weight, scales))
    stored = scales.detach().to(torch.float32).clone()
    check_scale_values(stored)
    if hasattr(module, SCALE_NAME) and SCALE_NAME not in module._buffers:
        raise ValueError(
            f"module already has a {SCALE_NAME} that is not int8 scales "
            f"({type(getattr(module, SCALE_NAME)).__name__}); remove it before attaching scales"
        )
    module.register_buffer(SCALE_NAME, stored)
    guard_loading(module)  # a zero, NaN or negative weight_scale loaded later is refused


def attached_scales(module: nn.Module) -> torch.Tensor | None:
    """The int8 scales recorded on ``module`` by :func:`attach_scales`, or ``None``."""
    check_module("module", module)
    scales = module._buffers.get(SCALE_NAME)
    return scales if isinstance(scales, torch.Tensor) else None


def is_grouped(scales: torch.Tensor | None) -> bool:
    """Whether int8 ``scales`` are one per row and group of inputs, ``(out, groups)``
    (``sparsekit.llm.prune(..., group_size=...)``), rather than one per row ``(out,)``: only
    the float-input kernels of the formats with
    :attr:`~sparsekit.engine.formats.native.NativeFormat.group_scales` read such a grid."""
    return isinstance(scales, torch.Tensor) and scales.dim() == 2


def group_size_of(weight: torch.Tensor, scales: torch.Tensor) -> int | None:
    """The group size of an attached int8 grid: ``None`` for ``scales`` of one per row
    (``(out,)``), ``in / groups`` for ``(out, groups)`` scales whose ``groups`` divide
    ``weight``'s ``in`` inputs evenly (a ``ValueError`` otherwise: a grid with a last
    partial group has no group size its shape says, so it cannot be attached)."""
    if not is_grouped(scales):
        return None  # one per row, or malformed: the scale checks name it
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got {type(weight).__name__} "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    cols, groups = weight.shape[1], scales.shape[1]
    if not 1 <= groups <= cols or cols % groups:  # groups of 0 inputs have no size either
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not divide the {cols} inputs of a "
            f"weight of shape {tuple(weight.shape)} into equal groups; accepted: one scale per "
            f"row ({weight.shape[0]},) or (rows, groups) with groups dividing {cols}"
        )
    return cols // groups


def detach_scales(module: nn.Module) -> None:
    """Forget the int8 grid recorded on ``module`` (nothing happens without one): its
    weight changed and no longer lies on that grid."""
    check_module("module", module)
    module._buffers.pop(SCALE_NAME, None)  # its load check (guard_loading) now skips it


def install_scales(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> Callable[[], None]:
    """Give each layer of ``model`` whose int8 scales a file holds (``shapes``: state keys
    ending in :data:`SCALE_NAME`, from ``llm.prune(..., quantize="int8")``) and that has
    none a placeholder of that buffer, which loading the file fills: one scale per row, or
    the file's ``(rows, groups)`` where its groups divide the layer's inputs (a grid per
    group). Keys of no such layer are left for the load to report. Returns a function that
    takes the placeholders off again (a load that failed)."""
    installed = []
    for key, shape in shapes.items():
        owner = key[: -len(SCALE_NAME) - 1]
        try:
            layer = model.get_submodule(owner)
        except AttributeError:
            continue
        weight = getattr(layer, "weight", None)
        if (isinstance(weight, torch.Tensor) and weight.dim() == 2
                and SCALE_NAME not in layer._buffers and not hasattr(layer, SCALE_NAME)):
            grouped = (len(shape) == 2 and shape[0] == weight.shape[0] and shape[1] >= 1
                       and weight.shape[1] % shape[1] == 0)
            attach_scales(layer, torch.ones(tuple(shape) if grouped else weight.shape[:1]))
            installed.append(layer)

    def restore() -> None:
        for layer in installed:
            detach_scales(layer)
    return restore


def guard_loading(module: nn.Module) -> None:
    """Make ``module.load_state_dict`` refuse, before it copies anything, a ``weight_scale``
    that is not positive and finite for any submodule carrying int8 scales.

    :func:`attach_scales` guards the layer itself; a layer's check runs only once
    ``load_state_dict`` reaches it, after the modules before it are loaded, so
    :func:`sparsekit.llm.prune` guards the whole model it quantized too.
    """
    check_module("module", module)
    if not any(getattr(h, "hook", None) is _check_loaded_scales
               for h in module._load_state_dict_pre_hooks.values()):
        module._register_load_state_dict_pre_hook(_check_loaded_scales, with_module=True)


def _check_loaded_scales(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any, **__: Any
) -> None:
    """``load_state_dict`` pre-hook (:func:`attach_scales`, :func:`guard_loading`): refuse
    a ``weight_scale`` of ``module`` or of a submodule carrying int8 scales that is not
    positive and finite, before ``module``'s tensors are copied.

    Loaded unchecked, a zero (or a float64 value that is 0 as float32) made every code
    ±127, a NaN every code 0 and a negative one flipped its row's sign, refused only when
    the scales were later used (``sparsekit.compile``).
    """
    for key, value in state_dict.items():
        if not (isinstance(key, str) and key.startswith(prefix)
                and (key == prefix + SCALE_NAME or key.endswith("." + SCALE_NAME))):
            continue
        owner = key[len(prefix):-len(SCALE_NAME)].rstrip(".")
        try:
            layer = module.get_submodule(owner)
        except AttributeError:
            continue  # not this model's: load_state_dict reports an unexpected key
        if (SCALE_NAME not in layer._buffers or not isinstance(value, torch.Tensor)
                or value.is_meta):
            continue  # another type: load_state_dict's own checks report it
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"state_dict[{key!r}]: int8 scales must be a real floating "
                             f"tensor, got {value.dtype}")
        check_scale_values(value.detach().to(torch.float32), f"state_dict[{key!r}]")


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``weight`` as ``(out, groups, group_size)`` (zero-padded), or ``(out, in)``; both
    checked by :func:`_check_weight` first. The sizes are explicit: ``-1`` cannot be
    inferred for a weight without rows."""
    if group_size is None:
        return weight
    rows, cols = weight.shape
    pad = -cols % group_size
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.reshape(rows, (cols + pad) // group_size, group_size)


def _ungrouped(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The ``shape`` weight of :func:`_grouped`'s ``groups`` (padding dropped)."""
    return groups.flatten(1)[:, : shape[1]]


def _check_weight(name: str, weight: Any, group_size: int | None) -> None:
    """Raise unless ``weight`` (named ``name``) is a 2-D real tensor of finite values that
    float32 holds, and ``group_size`` is ``None`` or an int from 1 to its number of inputs.

    A list failed with an ``AttributeError``, a bool tensor with ``NotImplementedError``;
    NaN and infinities have no int8 code (an infinite weight made its row's scale infinite
    and the whole row NaN when decoded), and a float64 value beyond float32's largest
    became infinite when rounded. A group wider than the row only padded it with zeros: a
    ``group_size`` of 10**12 allocated terabytes.
    """
    if (not isinstance(weight, torch.Tensor) or weight.dtype == torch.bool
            or weight.is_complex() or is_float8(weight.dtype)):
        # float8: torch's raw "isfinite" not implemented, in the finiteness check below
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ArgumentTypeError(
            f"{name} must be a 2-D floating-point (16 bits or more) or integer tensor, got "
            f"{got}"
        )
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if group_size is not None:
        check_int("group_size", group_size, minimum=1)
        most = max(weight.shape[1], 1)
        if group_size > most:
            raise ValueError(
                f"group_size must be an int in [1, {most}] (at most the {weight.shape[1]} "
                f"inputs of a row of {name}; {most} is one group per row), got {group_size}"
            )
    check_materialized(name, weight)
    if not weight.is_floating_point():
        return
    if not bool(weight.detach().isfinite().all()):
        raise ValueError(f"{name} holds NaN or infinite values, which have no int8 code")
    if weight.dtype == torch.float64 and weight.numel():
        largest = float(weight.detach().abs().max())
        if largest > torch.finfo(torch.float32).max:
            raise ValueError(
                f"{name} holds a magnitude of {largest:.3g}, beyond float32's largest "
                f"{torch.finfo(torch.float32).max:.3g}, which int8 codes are computed in; "
                "rescale the weight"
            )


def _check_codes(codes: torch.Tensor) -> None:
    """Raise unless every code is an integer int8 holds: float codes of 0.37 or integer ones
    of 1000 were decoded silently to weights off any int8 grid (int8 tensors are not
    scanned; -128, which :func:`quantize_int8` never gives, decodes as it reads)."""
    if codes.dtype == torch.int8 or not codes.numel():
        return
    c = codes.detach()
    if c.is_floating_point():
        fractional = c != c.round()
        if bool(fractional.any()):
            where = tuple(int(i) for i in fractional.nonzero()[0])
            raise ValueError(f"codes must be integers in [-128, 127] (int8 codes), got "
                             f"codes[{where[0]}, {where[1]}] = {c[where].item():.6g}")
    low, high = c.min(), c.max()
    if bool(low < -128) or bool(high > 127):
        bad = low if bool(low < -128) else high
        where = tuple(int(i) for i in (c == bad).nonzero()[0])
        raise ValueError(f"codes must be integers in [-128, 127] (int8 codes), got "
                         f"codes[{where[0]}, {where[1]}] = {bad.item():.6g}")


def _check_scales(weight: torch.Tensor, scales: Any, group_size: int | None) -> None:
    rows = weight.shape[0]
    expected = (rows,) if group_size is None else (rows, -(-weight.shape[-1] // group_size))
    if not isinstance(scales, torch.Tensor):
        raise ArgumentTypeError(
            f"scales must be a floating tensor of shape {expected} for a weight of shape "
            f"{tuple(weight.shape)} (group_size={group_size}), got {type(scales).__name__}"
        )
    if tuple(scales.shape) != expected or not scales.is_floating_point():
        raise ValueError(
            f"scales must be floating of shape {expected} for a weight of shape "
            f"{tuple(weight.shape)} (group_size={group_size}), got {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    check_materialized("scales", scales)
    check_scale_values(scales.detach().to(torch.float32))


def check_scale_values(scales: torch.Tensor, name: str = "scales") -> None:
    """Raise unless every int8 scale is positive and finite, at most :data:`MAX_SCALE`: a
    zero made every code ±127, a NaN every code zero, a negative one flipped its row's
    sign, and one above :data:`MAX_SCALE` decoded code 127 to inf (NaN in every product).
    The error names ``name`` and the first bad value and its index."""
    bad = ~(scales.isfinite() & (scales > 0) & (scales <= MAX_SCALE))
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        at = where[0] if len(where) == 1 else list(where)
        raise ValueError(f"scales must be positive and finite (a weight's largest magnitude "
                         f"over 127, at most {MAX_SCALE:.6g}: code 127 times a larger one is "
                         f"beyond float32), got {name}[{at}] = {scales[where].item():.6g}")
