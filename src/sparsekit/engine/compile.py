"""compile(): give every ``nn.Linear`` and ``nn.Conv2d`` its fastest measured format.

Each layer's candidate formats are timed against dense at the layer's real shape for
every row count the model will serve (:mod:`sparsekit.engine.autotune`: interleaved
rounds, medians, a win by :data:`~sparsekit.engine.autotune.MARGIN` in the median and in
most rounds); a sparse format replaces dense only where it wins at one row count and is no
slower at any. A linear layer may hold two formats, one for few rows (decoding) and one
for many (the prompt), each chosen by that rule on its own row counts, so every path of a
compiled layer is never slower than the dense one as measured. Projections that read the
same input may become one stacked kernel call (:mod:`sparsekit.engine.fused`) when that is
faster by the same rule. The decisions are cached on disk
(:mod:`sparsekit.engine.decisions`), so compiling the same layers again skips the timing,
and within one compile a layer of the same shape and density as one already timed reuses
its decision. The input model is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import statistics
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import skip_init
from torch.utils._pytree import tree_leaves

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_finite,
    check_materialized,
    check_materialized_module,
    check_module,
    check_no_own_layers,
    is_float8,
    model_errors,
    renamed,
)
from sparsekit.engine import autotune, decisions, fused
from sparsekit.engine._moved import moved
from sparsekit.engine.activation_linear import (
    ActivationSparseLinear,
    applied_layers,
    sparsify_input,
    thresholded_layers,
)
from sparsekit.engine.autotune import MAX_ROWS
from sparsekit.engine.compiled_conv import CompiledConv2d, convertible
from sparsekit.engine.compiled_linear import CompiledLayer, CompiledLinear
from sparsekit.engine.formats import FORMATS, Format, available_formats, check_formats
from sparsekit.engine.formats.native import MAX_INT8_INPUTS, check_threads
from sparsekit.engine.fused import FusedLinear, FusedProjections
from sparsekit.engine.persist import COMPILED_LAYERS, replaced
from sparsekit.observe import inference, watch
from sparsekit.quantize import (
    attached_scales,
    check_on_grid,
    check_within_grid,
    dequantize_grid,
    group_size_of,
    is_grouped,
)
from sparsekit.targets import conv1d_type

__all__ = ["InputThresholds", "compile"]

__getattr__ = moved(__name__, {"report": "sparsekit.engine.report"})

_CHECK_RTOL = 1e-4


class InputThresholds(Protocol):
    """Per-layer thresholds on the inputs of ``nn.Linear`` layers, by module name; what
    :func:`sparsekit.activation.calibrate` returns (:class:`ActivationSparsity`). Only
    ``thresholds`` is read: the output check thresholds the layers that became
    activation-sparse itself."""

    @property
    def thresholds(self) -> Mapping[str, torch.Tensor]: ...


@renamed(batch_sizes="rows")
# not under a caller's inference_mode: the formats' tensors made there were inference
# tensors, which keep no version counter (Format.derived reads it: a raw RuntimeError), and
# the copied model's other parameters could not be used with autograd after
@torch.inference_mode(False)
def compile(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[object, ...] | None = None,
    *,
    formats: str | Iterable[str] = "auto",
    rows: int | Sequence[int] | None = None,
    threads: int | None = None,
    activation_sparsity: InputThresholds | None = None,
    weight_dtype: str | None = None,
    activation_dtype: str | None = None,
    cache: bool = True,
    fuse: bool = True,
    grow: bool = False,
) -> nn.Module:
    """A copy of ``model`` with its layers replaced by :class:`CompiledLinear` and
    :class:`~sparsekit.engine.compiled_conv.CompiledConv2d` modules.

    Zero weights are the pruned ones (apply the masks first, e.g. with
    :func:`sparsekit.prune`). ``threads`` fixes the thread count of the compiled kernels
    (default: ``torch.get_num_threads()``).

    ``rows`` are the row counts each layer must serve: a linear layer sees batch ×
    sequence rows (one 128-token prompt is 128 rows, each decoded token 1), a convolution
    that many images. By default they come from ``example_inputs``: the row count each
    layer sees in their forward pass, plus 1 (decoding); without ``example_inputs``,
    ``(1,)``. A format is chosen only if it is not slower than dense at every one of them
    (see :mod:`sparsekit.engine.autotune`), or, for a linear layer, it serves only the
    row counts up to a threshold and a second format the others
    (:class:`CompiledLinear` ``format_large``). Each is at most :data:`MAX_ROWS` (every
    layer is timed on inputs of that many rows). ``batch_sizes`` is the deprecated spelling.

    ``formats`` is ``"auto"`` (every format that can hold a layer's weight, and dense) or
    names from :data:`~sparsekit.engine.formats.FORMATS`. With ``"dense"`` among them,
    the others are candidates that must beat dense by
    :data:`~sparsekit.engine.autotune.MARGIN`; without it they are forced: every layer
    takes the fastest of them that can hold its weight, and a layer none of them can hold
    is a ``ValueError``. When the model's weights outgrow the CPU's last-level cache (an
    LLM), row counts up to :data:`~sparsekit.engine.autotune.COLD_ROWS` are timed with the
    cache flushed before each call, as decoding reads them; a compile inside
    :func:`~sparsekit.engine.autotune.cold_cache` times them so whatever the model's size
    (one that fits the cache alone but will decode beside other models, or that stands in
    for a larger one).

    GPT-2's ``Conv1D`` layers are compiled as the ``nn.Linear`` each computes (its
    ``(in, out)`` weight transposed).

    Convolutions (groups 1, zero padding) are compiled only with ``example_inputs``, whose
    forward pass gives each its input size; without them they stay ``nn.Conv2d``. With
    ``cache`` (the default) the decisions are read from and written to the on-disk cache
    of :mod:`sparsekit.engine.decisions`, and a layer of the same shape, candidates and
    density (in whole percent) as one timed earlier in this compile takes its decision
    (``reused`` names that layer); ``cache=False`` times every layer afresh.

    A linear layer may hold two formats, one per range of row counts (e.g. a sparse format
    for decoding and dense for the prompt; ``format_large`` and ``split`` of
    :class:`CompiledLinear`), when that beats every single format. By default the two may
    not take more bytes together than the dense weight, so the compiled model is never
    larger than the original; ``grow=True`` lifts that limit (faster prefill and decode at
    the cost of memory).

    With ``example_inputs`` (a tensor or a tuple for ``model(*example_inputs)``) the
    compiled model's output is checked against the original's. The choices, with their
    timing evidence, are stored in ``compiled.sparsekit_choices`` (see
    :func:`sparsekit.engine.autotune.choose`; ``cached`` says whether one was read from
    the cache); :func:`sparsekit.engine.report` shows them per layer. The ``linear1`` and
    ``linear2`` of an ``nn.TransformerEncoderLayer`` stay ``nn.Linear`` (PyTorch's fused
    inference path reads their weights directly), and so does a layer whose weight another
    module holds too (a language model's ``lm_head`` tied to its input embedding): a
    compiled layer stores its own copy, which would add the whole matrix to the model,
    and untie it, and a layer whose weight is no parameter but computed by a hook before
    each call (``spectral_norm``, the old ``weight_norm``), which compiled would keep a stale
    tensor. Their choice is ``{"format": "dense", "reason": ...}``. ``grow=True``,
    or ``formats`` without ``"dense"``, compiles a tied layer anyway (a copy). Linear layers
    calibrated in ``activation_sparsity`` (:func:`sparsekit.activation.calibrate`) become
    :class:`ActivationSparseLinear` where that is faster than their best weight-only
    format: each such layer is compiled as any other, then given the faster single-row
    kernel (``act_gemv``, or on a pruned weight ``act_bitmap_gemv`` or ``act_sparse_gemv``,
    each only where it beats ``act_gemv`` by the margin; int8 values where the
    weight-only formats hold int8, and with ``activation_dtype="int8"`` also the W8A8
    ``act_bitmap_qgemv``) with the compiled layer as its multi-row path, and the
    two are timed against each other on the layer's observed inputs. The activation-sparse
    layer is taken only if it wins at one row (decoding) by
    :data:`~sparsekit.engine.autotune.MARGIN` and its multi-row path (thresholding, then
    the compiled format) keeps at least 95 % of the compiled layer's speed at the other row
    counts; otherwise the layer stays weight-only and its thresholds are not applied (the
    choice's ``activation`` record holds the evidence, ``chosen`` false). With ``cache``, a
    layer of the same shape, density, weight-only choice and share of kept inputs (in steps
    of 5 %) as one decided in the same compile takes that decision over untimed (its
    ``activation`` record names the source under ``reused``), and the decision is stored
    on disk under the layer's key plus those coarse terms, read back by the next compile
    (``cached``). The output check
    runs with the activation-sparse layers' thresholds at zero (every input kept) against
    ``model`` as it is: a threshold turns float rounding into inputs kept on one side and
    dropped on the other, and those flips compound from layer to layer (measured: noise of
    1e-7 of each layer's output moved the logits of a 4-layer 2048/5632 LLaMA with TEAL 50 %
    by 1.3e-3 of their largest, 1e-6 by 0.2; a compile of it failed the check by 7e-2),
    while the thresholding itself is one exact comparison per input on both sides.

    With ``fuse`` (the default) and ``example_inputs``, linear layers that read the same
    input tensor (a transformer's q/k/v projections, its gate/up projections; see
    :func:`sparsekit.engine.fused.shared_inputs`) are also compiled as one stacked layer,
    and replaced by :class:`~sparsekit.engine.fused.FusedLinear` members of one kernel
    call if that call beats the separate compiled layers by the rule of
    :mod:`~sparsekit.engine.autotune` in its tolerant form (they do not beat it at any row
    count: both already beat dense); each member's choice then holds the record under
    ``"fused"``. Activation-sparse members with one threshold (TEAL calibrates one per
    input) fuse into one activation-sparse layer: one thresholding and one kernel call.

    ``weight_dtype`` is the dtype of the stored values: ``None`` keeps each layer's own
    (a bfloat16 model gets bfloat16 sparse formats), except that a layer carrying int8
    scales (:func:`sparsekit.quantize.attach_scales`, e.g. after
    ``sparsekit.llm.prune(..., quantize="int8")``) stores exactly those int8 codes;
    ``"bf16"`` rounds the kept weights of float32 layers to bfloat16 in the formats that
    hold them; ``"int8"`` rounds them to int8 codes with one float32 scale per output row
    (a layer's attached scales, else its largest kept magnitude / 127). Sums stay float32,
    inputs and outputs keep the layer's dtype, and the dense candidate stays the layer as it
    is (the reference). The output check then compares against ``model`` with the weights
    the formats hold (bfloat16-rounded, resp. dequantized int8): it checks the kernels, not
    the rounding. The rounding's own cost, the relative output error of each layer measured
    on its observed inputs (random normal ones without ``example_inputs``), is each
    choice's ``quantization_error``, shown by :func:`sparsekit.engine.report`.

    ``activation_dtype="int8"`` (with ``weight_dtype="int8"``, or ``None`` for layers that
    carry int8 scales) is W8A8: the int8 formats that have such kernels (``dense_lowp``,
    ``bitmap``, ``nm``) also quantize each input row to int8 with its own scale inside the
    kernel and multiply with exact integer dot products (AVX-512 VNNI, AVX2), which pays
    where the float products rather than the bytes are the limit (several rows; a CPU whose
    bandwidth outruns its FMAs); they are timed against the other candidates like any
    format. The input rounding then enters each layer's ``quantization_error`` (against its
    float layer), and the output check allows for it (relative error up to
    :data:`W8A8_RTOL` of the largest output). The mode is part of each format's state
    (:data:`~sparsekit.engine.formats.native.INT8_INPUTS`), so it saves and loads.
    Layers of int8 scales per group of inputs, and layers wider than
    :data:`~sparsekit.engine.formats.native.MAX_INT8_INPUTS` inputs (where int32 sums of
    int8 products could overflow), keep float inputs.
    """
    check_module("model", model)
    names = check_formats(formats)
    served = None if rows is None else check_rows(rows)
    check_threads(threads)
    if threads is not None:
        threads = int(threads)  # a NumPy int is no JSON for the decision cache keys
    autotune.warn_oversubscribed(threads, stacklevel=4)  # past @renamed, inference_mode
    value_dtype = _check_weight_dtype(weight_dtype)
    activation = _check_activation_dtype(activation_dtype, weight_dtype)
    check_bool("cache", cache)
    check_bool("fuse", fuse)
    check_bool("grow", grow)
    if isinstance(model, (nn.Linear, nn.Conv2d)):  # its parent's slot is what compile fills
        raise ValueError(
            f"model is itself a layer ({type(model).__name__}), which compile cannot put a "
            "compiled layer in place of (it was returned as it came, even with formats= "
            "forced); accepted: a module holding it, e.g. nn.Sequential(layer), or "
            "CompiledLinear.from_linear(layer, format) for one layer")
    inputs = _as_tuple(example_inputs)
    conv1d = conv1d_names(model)
    model = _conv1d_as_linear(model)
    thresholded = applied_layers(dict(model.named_modules()))
    if thresholded:  # the compiled layers would not run their hooks: "output differs"
        raise ValueError(
            f"model: layers {thresholded[:3]}{' …' if len(thresholded) > 3 else ''} have "
            "activation thresholds applied (ActivationSparsity.apply), hooks the compiled "
            "layers would not run; accepted: remove() them and pass the thresholds to compile "
            "as activation_sparsity=")
    check_no_own_layers("model", model, "compile")
    for name, layer in model.named_modules():
        if isinstance(layer, COMPILED_LAYERS):
            # its formats were kept as they are, formats= and the dtypes silently ignored
            raise ValueError(
                f"model: {name or 'the model'} is already compiled ({type(layer).__name__}); "
                "compile takes a model of nn.Linear and nn.Conv2d layers: pass "
                "sparsekit.engine.decompile(model) to compile it again")
        if type(layer) in (nn.Linear, nn.Conv2d):  # their weights are read and timed
            check_materialized_module(layer, f"model: {name}." if name else "model: ")
            if not layer.weight.is_floating_point() or is_float8(layer.weight.dtype):
                # float8 failed in the output check ("isfinite" not implemented)
                raise ArgumentTypeError(
                    f"model: {name or 'the model'}.weight has dtype {layer.weight.dtype}; "
                    "compile takes layers of float16, bfloat16, float32 or float64 (int8 "
                    "values come from weight_dtype='int8' or attached int8 scales)")
            # a sparse format skips the pruned weights, so the compiled layer would not
            # spread a NaN weight's NaN where the model does (the output check passed)
            check_finite(f"model: {name or 'the model'}.weight", layer.weight.detach(),
                         hint="compile multiplies finite weights only")
            scales = attached_scales(layer)
            if scales is not None and value_dtype in (None, torch.int8):  # stored on it
                check_within_grid(f"model: {name or 'the model'}", layer.weight, scales)
                if names != ["dense"]:  # the dense format keeps the float weight
                    check_on_grid(f"model: {name or 'the model'}", layer.weight, scales)
    if activation is not None and weight_dtype is None and not any(
            attached_scales(m) is not None for m in model.modules()):
        raise ValueError(f"activation_dtype={activation_dtype!r} quantizes the inputs of int8 "
                         "weights, but weight_dtype is None and no layer of model carries int8 "
                         "scales: pass weight_dtype='int8' (or prune with quantize='int8')")
    if activation_sparsity is not None:
        if not hasattr(activation_sparsity, "thresholds"):
            raise TypeError("activation_sparsity must be calibrated input thresholds "
                            "(sparsekit.activation.calibrate) or None, got "
                            f"{type(activation_sparsity).__name__}")
        thresholded_layers(activation_sparsity.thresholds, model, "activation_sparsity.thresholds")
    seen, probes = ({}, {}) if inputs is None else _observed(model, inputs)
    if served is None:  # rows taken from example_inputs: the limit of rows= holds for them
        for name, shape in seen.items():
            most = max(_default_rows(shape, type(model.get_submodule(name))))
            if most > MAX_ROWS:
                raise ValueError(
                    f"example_inputs give layer {name!r} {most} rows, more than MAX_ROWS="
                    f"{MAX_ROWS} (each layer is timed on random inputs of every row count it "
                    "serves); pass rows= with the row counts to time, or smaller example_inputs")

    compiled = copy.deepcopy(model)
    first_name = {id(m): n for n, m in compiled.named_modules()}
    # a forced format or grow=True may store a tied weight a second time; auto may not
    ties = tied_weights(compiled)
    tied = {} if grow or (names and "dense" not in names) else ties
    choices: dict[str, dict[str, object]] = {}
    done: dict[int, nn.Module] = {}  # a shared layer is compiled once
    subclassed: list[str] = []  # nn.Linear / nn.Conv2d subclasses, left as they are
    memo: dict[str, tuple[dict[str, object], str]] = {}  # decisions taken in this compile
    act = activation_sparsity.thresholds if activation_sparsity is not None else {}
    cold = autotune.cold() or streams_weights(model, value_dtype)
    with torch.no_grad(), autotune.cold_cache(cold):
        for parent in list(compiled.modules()):
            for child_name, child in list(parent._modules.items()):
                if type(child) not in (nn.Linear, nn.Conv2d):  # subclasses are left alone
                    if isinstance(child, (nn.Linear, nn.Conv2d)) and id(child) not in done:
                        done[id(child)] = child
                        subclassed.append(first_name[id(child)])
                        choices[subclassed[-1]] = {"format": "dense",
                                                   "reason": _subclass_reason(child)}
                    continue
                if id(child) not in done:
                    name = first_name[id(child)]
                    reason = (_READS_WEIGHTS_REASON if _reads_weights(parent, child_name)
                              else _COMPUTED_WEIGHT_REASON
                              if not isinstance(child.weight, nn.Parameter)
                              else _tied_reason(tied[id(child)]) if id(child) in tied else None)
                    if reason is not None:
                        done[id(child)], choices[name] = child, {"format": "dense",
                                                                 "reason": reason}
                        setattr(parent, child_name, child)
                        continue
                    layer_rows = served or _default_rows(seen.get(name), type(child))
                    if name in act and type(child) is nn.Linear:
                        done[id(child)], choices[name] = _activation_layer(
                            child, act[name], names, layer_rows, threads, cache, value_dtype,
                            probes.get(name), memo, name, grow, activation,
                        )
                    elif type(child) is nn.Linear:
                        done[id(child)], choices[name] = _compile_layer(
                            child, (child.in_features,), names, layer_rows, threads, cache,
                            value_dtype, probes.get(name), memo, name, grow, activation,
                        )
                    elif name in seen and convertible(child) is None:
                        done[id(child)], choices[name] = _compile_layer(
                            child, tuple(seen[name][-3:]), names, layer_rows, threads, cache,
                            value_dtype, probes.get(name), memo, name, grow, activation,
                        )
                    else:
                        done[id(child)] = child
                setattr(parent, child_name, done[id(child)])
        if inputs is not None and fuse:
            _fuse_groups(model, compiled, inputs, choices, served, seen, probes, act,
                         names=names, threads=threads, cache=cache, value_dtype=value_dtype,
                         memo=memo, grow=grow, activation=activation)
    held = {n for n, c in choices.items() if "reason" in c}
    refused = [n for n, c in choices.items() if names and "dense" not in names
               and c["format"] == "dense" and n not in held]
    _check_forced(names, refused, len(choices) - len(held))
    compiled.sparsekit_choices = choices
    if conv1d:  # decompile gives these back as the Conv1D they were
        compiled.sparsekit_conv1d = conv1d
    if copies := {first_name[i]: other for i, other in ties.items()
                  if first_name[i] in choices and "reason" not in choices[first_name[i]]}:
        compiled.sparsekit_tied = copies  # decompile ties these again
    _warn_of_dropped_hooks(model, compiled, choices)
    _warn_of_subclasses(subclassed, choices)
    for name in choices:  # a new layer is in training mode: take the replaced one's mode,
        # which decompile gives back (an eval model's decompiled layers were in training)
        compiled.get_submodule(name).train(model.get_submodule(name).training)
    rtol = _CHECK_RTOL if value_dtype is None else _rtol(value_dtype)
    # every compiled layer's own dtype rounds its outputs (a bfloat16 layer feeding a
    # float32 output), whatever the values it stores
    rtol = max([rtol, *(_rtol(model.get_submodule(n).weight.dtype)
                        for n in choices if n not in held)])
    rtol = rtol if activation is None else max(rtol, W8A8_RTOL)
    reference = _with_stored_weights(model, compiled, seen) if inputs is not None else model
    if inputs is not None:
        with _unthresholded(compiled):
            _check_outputs(reference, compiled, inputs, rtol)
    return compiled


def streams_weights(model: nn.Module, value_dtype: torch.dtype | None = None) -> bool:
    """Whether ``model``'s linear and convolution weights (in ``value_dtype`` where given)
    outgrow the cache (:func:`~sparsekit.engine.autotune.effective_cache_bytes`), so that
    decoding reads every layer's weights from memory and small row counts are timed cold
    (:func:`~sparsekit.engine.autotune.cold_cache`)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight
            size = weight.element_size() if value_dtype is None else value_dtype.itemsize
            total += weight.numel() * size
    # the reported size first: a model larger than it needs no measurement
    return total > autotune.last_level_cache_bytes() or total > autotune.effective_cache_bytes()


# -- per layer -------------------------------------------------------------------------


def _compile_layer(
    layer: nn.Linear | nn.Conv2d,
    in_shape: tuple[int, ...],
    names: list[str] | None,
    rows: list[int],
    threads: int | None,
    cache: bool,
    value_dtype: torch.dtype | None = None,
    probe: torch.Tensor | None = None,
    memo: dict[str, tuple[dict[str, object], str]] | None = None,
    name: str = "",
    grow: bool = False,
    activation: torch.dtype | None = None,
) -> tuple[CompiledLayer, dict[str, object]]:
    """The fastest compiled version of ``layer`` (called ``name``) and the evidence behind
    the choice; the candidates other than dense hold values of ``value_dtype`` (``None``:
    the layer's dtype, or int8 on its attached scales). With ``cache``, a decision on disk,
    or one taken in this compile for a layer of the same shape and density (``memo``), is
    reused instead of timing. Two formats may hold more bytes than the dense layer only
    with ``grow``. int8 values multiply inputs quantized to ``activation`` where a format
    can (:func:`_int8_inputs`). The chosen layer's relative output error against ``layer``
    on ``probe`` (inputs it saw; default: random normal ones) is the choice's
    ``quantization_error``."""
    scales = attached_scales(layer)
    value_dtype = torch.int8 if value_dtype is None and scales is not None else value_dtype
    stored = _with_value_dtype(layer, value_dtype)
    allowed, dense_allowed = _candidates(stored, names, value_dtype)
    if is_grouped(scales) and value_dtype == torch.int8:  # per-group scales: float inputs
        group = group_size_of(layer.weight, scales)
        allowed = [n for n in allowed if n == "dense" or _takes_groups(n, group)]
        activation = None
    if math.prod(layer.weight.shape[1:]) > MAX_INT8_INPUTS:  # W8A8 sums exact up to that width
        activation = None
    if not allowed:  # forced formats that cannot hold this weight
        allowed, dense_allowed = ["dense"], True
    build = CompiledLinear.from_linear if type(layer) is nn.Linear else CompiledConv2d.from_conv2d
    int8 = {"value_dtype": torch.int8, "scales": scales} if value_dtype == torch.int8 else {}

    def built(fmt: str) -> CompiledLayer:
        if fmt == "dense":  # the layer as it is: the reference
            return build(layer, fmt)
        module = build(stored, fmt, **int8, **(_int8_inputs(fmt, activation) if int8 else {}),
                       **({"threads": threads} if FORMATS.meta(fmt)["threaded"] else {}))
        module.io_dtype = layer.weight.dtype  # it takes the layer's inputs, not its values'
        return module

    key = (decisions.key(layer, in_shape, allowed, rows, threads, value_dtype) if cache
           else None)
    if key is not None and activation is not None:
        key["activation_dtype"] = str(activation)
    if key is not None and value_dtype == torch.int8 and is_grouped(scales):
        key["scale_groups"] = scales.shape[1]  # the kernels' time differs from per-row scales
    if key is not None and grow:
        key["grow"] = True
    modules: dict[str, CompiledLayer] = {}

    def timed() -> dict[str, object]:
        modules.update({n: built(n) for n in dict.fromkeys(["dense", *allowed])})  # dense: ref.
        weight = layer.weight
        samples = autotune.measure(modules, in_shape, rows, weight.dtype, weight.device)
        choice = autotune.choose(samples, allowed, dense_allowed=dense_allowed,
                                 split=type(layer) is nn.Linear)[1]
        large = choice.get("format_large")
        if large is not None and not grow and (modules[choice["format"]].format.nbytes
                                  + modules[large].format.nbytes
                                  > modules["dense"].format.nbytes):
            # two formats may not hold more bytes than the dense layer: the compiled model
            # is never larger than the original
            choice = autotune.choose(samples, allowed, dense_allowed=dense_allowed)[1]
        return choice

    choice = _decided(key, memo, name, timed)
    chosen = _assemble(layer, choice, lambda n: modules[n] if n in modules else built(n))
    chosen.io_dtype = layer.weight.dtype  # decompile gives this dtype back
    if probe is None:
        generator = torch.Generator(layer.weight.device).manual_seed(0)
        count = min(max(rows), 64 if type(layer) is nn.Linear else 2)
        probe = torch.randn(count, *in_shape, generator=generator,
                            device=layer.weight.device).to(layer.weight.dtype)
    value = str(chosen.format.value_dtype).removeprefix("torch.")
    return chosen, {**choice, "value_dtype": value,
                    "quantization_error": _relative_error(layer, chosen, probe)}


def _decided(
    key: dict[str, object] | None,
    memo: dict[str, tuple[dict[str, object], str]] | None,
    name: str,
    timed: Callable[[], dict[str, object]],
    like: str | None = None,
) -> dict[str, object]:
    """The choice for ``key``: read from the disk cache (``cached``), taken over from a
    similar layer ``memo`` holds under ``like`` (default :func:`~sparsekit.engine.decisions.
    similar`; ``reused``: its name), or ``timed()`` now; stored under ``key`` either way
    (no ``key``: no cache, always timed)."""
    choice = decisions.lookup(key) if key is not None else None
    if choice is not None:
        return {**choice, "cached": True}
    similar = None if key is None or memo is None else like or decisions.similar(key)
    if similar is not None and similar in memo:  # a layer like this one was timed already
        choice, source = memo[similar]
        decisions.store(key, choice)
        return {**choice, "cached": False, "reused": source}
    choice = timed()
    if key is not None:
        decisions.store(key, choice)
    if similar is not None:
        memo[similar] = (choice, name)
    return {**choice, "cached": False}


def _fuse_groups(
    model: nn.Module,
    compiled: nn.Module,
    inputs: tuple[object, ...],
    choices: dict[str, dict[str, object]],
    served: list[int] | None,
    seen: Mapping[str, torch.Size],
    probes: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, torch.Tensor],
    **options: object,
) -> None:
    """Replace in ``compiled`` the groups of linear layers that read one input in
    ``model(*inputs)`` by fused members where that is faster (see :func:`_fuse`; the
    ``options`` are its and :func:`_compile_layer`'s), recording each group's choice under
    ``"fused"`` in its members' ``choices``. A group whose layers share one calibrated input
    threshold (``thresholds``, as TEAL calibrates one per input) is first tried as one
    activation-sparse layer (one thresholding, one kernel call), whether none, some or all of
    its members won as activation-sparse layers on their own: three 2048 x 2048 projections
    that did not (1.0-1.1x at one row, two threads, Intel Xeon) stack to a 6144-output layer,
    the size at which the kernel wins (5632 x 2048: 1.38x over the weight-only bitmap), and
    single-row gains that close split a group by noise (on a 2:4 bf16 LLaMA, AMD Zen 4, 2
    threads, compiles left 1-2 of a block's q/k/v weight-only). Where the stacked layer
    loses, the members as they were chosen are timed against a weight-only stack; a group
    whose activation-sparse members have other thresholds is left as it is."""
    for group in fused.shared_inputs(model, inputs):
        if any("reason" in choices.get(n, {}) for n in group):
            continue  # a layer left dense on purpose (its parent reads its weight)
        separate = [compiled.get_submodule(n) for n in group]
        weight_only = all(isinstance(m, CompiledLinear) for m in separate)
        threshold = _shared_threshold(separate)
        if threshold is None:
            threshold = _calibrated_threshold(group, thresholds)
        if threshold is None and not weight_only:
            continue  # activation-sparse members that cannot share one kernel call
        rows = served or _default_rows(seen.get(group[0]), nn.Linear)
        members, record = _fuse([model.get_submodule(n) for n in group], separate, group,
                                rows=rows, threshold=threshold, probe=probes.get(group[0]),
                                **options)
        for n, member in zip(group, members or [None] * len(group), strict=True):
            choices[n] = {**choices[n], "fused": record}
            if member is not None:
                parent, _, child_name = n.rpartition(".")
                setattr(compiled.get_submodule(parent), child_name, member)


def _fuse(
    originals: list[nn.Linear],
    separate: list[nn.Module],
    group: list[str],
    *,
    names: list[str] | None,
    rows: list[int],
    threads: int | None,
    cache: bool,
    value_dtype: torch.dtype | None,
    memo: dict[str, tuple[dict[str, object], str]] | None,
    grow: bool,
    activation: torch.dtype | None = None,
    threshold: torch.Tensor | None = None,
    probe: torch.Tensor | None = None,
) -> tuple[list[FusedLinear] | None, dict[str, object]]:
    """The members of a fused group replacing the ``separate`` compiled layers (``None``
    where fusing is not faster by the rule of :mod:`~sparsekit.engine.autotune`, in its
    ``tolerant`` form: both paths passed it against dense already), and the
    record of the choice: the stacked layer's own choice (``stacked``) and the timing of
    the fused call against the separate ones (``format`` ``"fused"`` or ``"separate"``).

    With a ``threshold`` (the one every member was calibrated with), the stacked layer is
    tried as an activation-sparse layer (:func:`_activation_layer`, on the group's inputs
    ``probe``) and the timings run on ``probe``, whose skipped columns are the real ones;
    such a decision depends on the inputs: with ``cache`` it is stored under a key holding
    them in the coarse terms of :func:`_fused_like`, under which a group alike one timed in
    this compile takes its decision over (``reused``). Where the stacked layer stays
    weight-only (its ``activation`` record says why), that weight-only stack is timed
    against the separate members as they were chosen, activation-sparse ones included (on
    ``probe``, not cached): one weight-only call for the gate and up projections can beat
    an activation-sparse gate beside a weight-only up, and then the members lose their
    thresholds. Without ``probe`` a group with activation-sparse members stays separate."""
    stacked = fused.stack(originals)
    in_shape, label = (stacked.in_features,), "+".join(group)
    if threshold is None:
        linear, stacked_choice = _compile_layer(stacked, in_shape, names, rows, threads, cache,
                                                value_dtype, memo=memo, name=label, grow=grow,
                                                activation=activation)
    else:
        linear, stacked_choice = _activation_layer(stacked, threshold, names, rows, threads,
                                                   cache, value_dtype, probe, memo, label, grow,
                                                   activation)
    thresholded = isinstance(linear, ActivationSparseLinear)
    mixed = not all(isinstance(m, CompiledLinear) for m in separate)  # activation-sparse ones
    if not thresholded and mixed and (probe is None or threshold is None):
        return None, {"format": "separate", "group": group, "stacked": stacked_choice}
    on_inputs = thresholded or mixed  # the timings depend on which inputs are skipped
    inputs = (None if probe is None or not on_inputs
              else _typical_first(probe.reshape(-1, stacked.in_features),
                                  linear.threshold if thresholded else threshold))
    dtype = linear.dtype if thresholded else stacked.weight.dtype
    projections = FusedProjections(linear, [layer.out_features for layer in originals])
    paths = [_formats(m) for m in (*separate, linear)]
    like = (_fused_like(stacked, paths, inputs, linear.threshold if thresholded else threshold,
                        rows, threads, value_dtype, activation)
            if cache and on_inputs and inputs is not None else None)
    key = (decisions.key(stacked, in_shape, ["separate", "fused"], rows, threads, value_dtype,
                         fused=paths) if cache and (like is not None or not on_inputs) else None)
    if key is not None and like is not None:
        key["inputs"] = like
    if key is not None and activation is not None:
        key["activation_dtype"] = str(activation)

    def timed() -> dict[str, object]:
        modules = {"separate": _Separate(separate), "fused": projections}
        samples = autotune.measure(modules, in_shape, rows, dtype, stacked.weight.device,
                                   inputs, reference="separate")
        return autotune.choose(samples, ["separate", "fused"], reference="separate",
                               tolerant=True)[1]

    choice = _decided(key, memo, label, timed, like=like)
    record = {**choice, "group": group, "stacked": stacked_choice}
    return (projections.members() if choice["format"] == "fused" else None), record


def _fused_like(
    stacked: nn.Linear, paths: list[str], inputs: torch.Tensor, threshold: torch.Tensor,
    rows: list[int], threads: int | None, value_dtype: torch.dtype | None,
    activation: torch.dtype | None,
) -> str:
    """A fused group's decision on its inputs in coarse terms (see :func:`_activation_like`):
    the stacked weight's shape, dtype and density in whole percent, the formats of the
    separate and stacked layers, the row counts, threads and value and input dtypes, and the
    share of the typical input row that ``threshold`` keeps, in steps of 5 %. The q/k/v (or
    gate/up) groups of a transformer's blocks are alike under it."""
    return repr(("fused", *_alike(stacked.weight, inputs, threshold), tuple(paths),
                 tuple(rows), threads, str(value_dtype), str(activation)))


def _alike(weight: torch.Tensor, inputs: torch.Tensor, threshold: torch.Tensor) -> tuple:
    """What layers alike share: ``weight``'s shape, dtype and density in whole percent, and
    the share of the typical input row (``inputs[0]``) that ``threshold`` keeps, in steps of
    5 % (:func:`_activation_like`, :func:`_fused_like`)."""
    nonzero = int(weight.detach().count_nonzero())
    kept = int(sparsify_input(inputs[:1], threshold.to(inputs.dtype)).count_nonzero())
    return (tuple(weight.shape), str(weight.dtype), round(100 * nonzero / max(weight.numel(), 1)),
            round(20 * kept / max(inputs.shape[1], 1)))


def _calibrated_threshold(
    group: Sequence[str], thresholds: Mapping[str, torch.Tensor]
) -> torch.Tensor | None:
    """The one calibrated input threshold of every layer of ``group``, else ``None``."""
    return _one_threshold([thresholds.get(n) for n in group])


def _shared_threshold(layers: Sequence[nn.Module]) -> torch.Tensor | None:
    """The input threshold of ``layers`` if all are activation-sparse with one threshold
    (what lets them run as one stacked activation-sparse layer), else ``None``."""
    return _one_threshold([m.threshold if isinstance(m, ActivationSparseLinear) else None
                           for m in layers])


def _one_threshold(thresholds: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The threshold all of ``thresholds`` equal (in values and dtype), else ``None``."""
    if not thresholds or any(t is None for t in thresholds):
        return None
    first = thresholds[0]
    if any(t.dtype != first.dtype or not torch.equal(t, first) for t in thresholds[1:]):
        return None
    return first


class _Separate(nn.ModuleList):
    """The layers of a group called one after the other: what fusing must beat."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self)


def _formats(layer: nn.Module) -> str:
    """The formats of a compiled layer, e.g. ``"csr16"`` or ``"csr16|dense>4"``."""
    if isinstance(layer, ActivationSparseLinear):
        return f"activation:{layer.kernel}"
    if not isinstance(layer, CompiledLayer):
        return type(layer).__name__
    large = getattr(layer, "format_large", None)
    return layer.format.name + ("" if large is None else f"|{large.name}>{layer.split}")


def _assemble(
    layer: nn.Linear | nn.Conv2d, choice: dict[str, object], built: Callable[[str], CompiledLayer]
) -> CompiledLayer:
    """The compiled layer of ``choice``: its format, and its second format if it has one."""
    small = built(choice["format"])
    if choice.get("format_large") is None:
        return small
    large = built(choice["format_large"]).format
    return CompiledLinear(small.format, layer.bias, format_large=large, split=choice["split"])


def _relative_error(layer: nn.Module, compiled: nn.Module, x: torch.Tensor) -> float:
    """``‖compiled(x) − layer(x)‖ / ‖layer(x)‖`` (Frobenius, in float32)."""
    ref = layer(x).float()
    return float(torch.linalg.vector_norm(compiled(x).float() - ref)
                 / torch.linalg.vector_norm(ref).clamp_min(1e-30))


# -- activation sparsity ---------------------------------------------------------------

_PREFILL_FLOOR = 0.95
"""The least speed, relative to the layer's weight-only format, of the multi-row path of an
activation-sparse layer (which thresholds its inputs, then runs that format)."""


def _activation_layer(
    layer: nn.Linear,
    threshold: torch.Tensor,
    names: list[str] | None,
    rows: list[int],
    threads: int | None,
    cache: bool,
    value_dtype: torch.dtype | None,
    probe: torch.Tensor | None,
    memo: dict[str, tuple[dict[str, object], str]],
    name: str,
    grow: bool,
    activation: torch.dtype | None = None,
) -> tuple[nn.Module, dict[str, object]]:
    """``layer`` with input thresholds where that is faster, else its weight-only format.

    The weight-only layer is :func:`_compile_layer`'s; the activation-sparse one stores
    int8 values where ``value_dtype`` is int8 and its prompt path does too, or the weight
    lies on an int8 grid (else the layer's own dtype, the only values
    its kernels read next to inputs of that dtype, rounded to bf16 where ``value_dtype`` is
    bf16 and its prompt path holds bf16; int8 inputs among its candidates with
    ``activation``), takes the faster
    single-row kernel
    and serves the other row counts with the weight-only layer. See :func:`_activation_wins`
    for the rule; its evidence is the choice's ``activation`` record and the single-row
    kernel's the ``decode`` record. With ``cache`` and inputs ``probe``, the decision is
    read from the disk cache (``cached`` in the ``activation`` record), or a layer like one
    decided in this compile (:func:`_activation_like`, kept in ``memo``) takes that decision
    over untimed (``reused`` names the source), and is stored under the layer's key with
    those inputs in the coarse terms of :func:`_activation_like`."""
    weight_only, choice = _compile_layer(layer, (layer.in_features,), names, rows, threads,
                                         cache, value_dtype, probe, memo, name, grow,
                                         activation=activation)
    multi = [r for r in rows if r > 1]
    prefill = _multi_row(weight_only) if multi else None
    if (value_dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
            and attached_scales(layer) is None
            and (prefill is None or _holds_values(prefill, torch.bfloat16))):
        # the one-row kernels read values of their inputs' dtype: float32 values rounded to
        # bf16, the numbers the prompt path's bf16 format holds (one row computed apart
        # from many differed by the rounding, and greedy tokens with them). Where float32
        # dense won the prompt rows they keep its float32 values (rounded, they were 2e-3
        # off the prompt path's)
        layer = _with_weight(layer, layer.weight.detach().bfloat16().float())
    inputs = None if probe is None else _typical_first(probe.reshape(-1, layer.in_features),
                                                       threshold)
    # int8 one-row values only where the prompt path holds the same numbers: where it kept
    # float values (int8 lost there), a row computed alone differed from the same row among
    # many by the quantization error (4e-3), unless the weight lies on an int8 grid already
    int8 = value_dtype == torch.int8 and (prefill is None or _holds_values(prefill, torch.int8)
                                          or attached_scales(layer) is not None)
    grouped = is_grouped(attached_scales(layer))  # float inputs (W8A8 reads one scale per row)
    options = {"threads": threads, "prefill": prefill,
               "value_dtype": torch.int8 if int8 else None}
    int8_inputs = (activation if int8 and not grouped and layer.in_features <= MAX_INT8_INPUTS
                   else None)
    like = (_activation_like(layer, threshold, inputs, choice, rows, threads, options,
                             int8_inputs) if cache else None)
    key = None
    if like is not None:
        key = decisions.key(layer, (layer.in_features,),
                            ActivationSparseLinear.kernels_for(layer.weight, int8_inputs), rows,
                            threads, value_dtype) | {"kind": "activation", "inputs": like}
    timed_layer: list[ActivationSparseLinear] = []

    def timed() -> dict[str, object]:
        act, decode = ActivationSparseLinear.tuned(layer, threshold, rows=rows, inputs=inputs,
                                                   activation_dtype=int8_inputs, **options)
        timed_layer.append(act)
        return {"decode": decode,
                "activation": _activation_wins(act, weight_only, [1, *multi], inputs)}

    decision = _decided(key, memo, name, timed, like=like)
    decode, record = decision["decode"], decision["activation"]
    if not record["chosen"]:
        chosen = weight_only
    elif timed_layer:
        chosen = timed_layer[0]
    else:
        chosen = ActivationSparseLinear.decided(layer, threshold, decode, **options)
    source = {k: decision[k] for k in ("cached", "reused") if k in decision}
    return chosen, {**choice, "decode": decode, "activation": {**record, **source}}


def _activation_like(
    layer: nn.Linear, threshold: torch.Tensor, inputs: torch.Tensor | None,
    choice: dict[str, object], rows: list[int], threads: int | None,
    options: dict[str, object], int8_inputs: torch.dtype | None,
) -> str | None:
    """The activation-sparse decision of ``layer`` in coarse terms, as
    :func:`~sparsekit.engine.decisions.similar` puts a weight-only one: its weight's shape,
    dtype and density in whole percent, the values and inputs its kernels would store and
    read, the row counts and threads, its weight-only choice (the prefill path and the
    reference), and the share of the typical input row (``inputs[0]``) its threshold keeps,
    in steps of 5 %. Every block of a transformer calibrated by TEAL to one sparsity is alike
    under it, so a compile times one block's layers and takes their decisions over for the
    others (a 4-layer 2048/5632 int8 LLaMA compiled in 36 s without thresholds and in 186 s
    with TEAL's, two threads, Intel Xeon). ``None`` (time it) without inputs: the skipped
    columns are unknown."""
    if inputs is None:
        return None
    scales = attached_scales(layer)
    return repr((
        *_alike(layer.weight, inputs, threshold), layer.bias is not None,
        None if scales is None else tuple(scales.shape), str(options["value_dtype"]),
        str(int8_inputs), tuple(rows), threads,
        choice["format"], choice.get("format_large"), choice.get("split"),
    ))


def _typical_first(rows: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``rows`` (observed inputs of a layer) with the row that keeps the median number of
    inputs past ``threshold`` moved first: the single-row (decode) timings run on the first
    row, and the first token of a prompt can be an outlier, an attention sink. On a LLaMA
    with TEAL's 50 % thresholds its ``o_proj`` input kept 84 % of the inputs, the other
    rows 49 % on average, so the kernel that skips inputs was timed at its worst."""
    kept = (sparsify_input(rows, threshold.to(rows.dtype)) != 0).sum(-1)
    typical = kept.argsort()[len(kept) // 2]
    index = torch.arange(len(rows), device=rows.device)
    return rows[torch.cat([typical[None], index[index != typical]])]


def _holds_values(layer: nn.Module, dtype: torch.dtype) -> bool:
    """Whether every format of the compiled ``layer`` holds values of ``dtype``."""
    formats = [getattr(layer, "format", None), getattr(layer, "format_large", None)]
    return formats[0] is not None and all(
        f is None or getattr(f, "value_dtype", None) == dtype for f in formats)


def _multi_row(layer: CompiledLayer) -> CompiledLayer:
    """The part of ``layer`` serving more than one row: its second format alone where the
    first serves one row only (the activation-sparse kernel takes that row; keeping the
    first format would hold one more copy of the weight for nothing)."""
    if getattr(layer, "format_large", None) is None or layer.split != 1:
        return layer
    multi = CompiledLinear(layer.format_large, layer.bias)
    multi.io_dtype = layer.io_dtype
    return multi


def _activation_wins(
    act: ActivationSparseLinear, weight_only: nn.Module, rows: list[int],
    inputs: torch.Tensor | None,
) -> dict[str, object]:
    """Whether ``act`` replaces ``weight_only``, from interleaved timings of both on
    ``inputs`` (real activations, so the skipped columns are the real ones) at ``rows``:
    at one row it must win by :data:`~sparsekit.engine.autotune.MARGIN` (in the median and
    most rounds, :func:`~sparsekit.engine.autotune.choose`), at every other row count run
    at least :data:`_PREFILL_FLOOR` of ``weight_only``'s speed: the median over rounds of
    the ratio of the two times in the same round. There the two usually run the same format
    and differ by the thresholding alone (1-3 % of a 16-row product on the 2048/5632 LLaMA
    shapes), which only side-by-side pairs resolve on a loaded machine: on a 2-vCPU Zen 3
    the ratio of the two fastest of 5 rounds fell anywhere in 0.81-1.19 (and refused layers
    whose decode won by 1.15-1.3x), the median of 5 paired ratios in 0.96-1.0, of 40 in
    0.98-0.99, so those row counts run all 15 rounds (the one-row comparison, which must
    clear a 5 % margin, stops when its rounds agree). A round that stalls one side moves one
    ratio, not the median. The record:
    ``chosen``, ``decode`` (the one-row choice record, ``"weight_only"`` its reference),
    ``prefill_speed`` (row count → that median of weight-only time / activation-sparse
    time) and ``prefill_floor``."""
    dtype = act.dtype
    modules = {"weight_only": weight_only, "activation": act}
    timed = functools.partial(autotune.measure, modules, (act.in_features,), dtype=dtype,
                              device=act.threshold.device, inputs=inputs,
                              reference="weight_only")
    with _fresh_inputs(weight_only, act):
        samples = {**timed([1]), **timed([r for r in rows if r > 1], every_round=True)}
    decode = autotune.choose({1: samples[1]}, ["activation"], reference="weight_only")[1]
    speed = {r: statistics.median(w / max(a, 1e-12)
                                  for w, a in zip(t["weight_only"], t["activation"]))
             for r, t in samples.items() if r > 1}
    chosen = decisions.activation_won(decode, speed, _PREFILL_FLOOR)
    return {"chosen": chosen, "decode": decode, "prefill_speed": speed,
            "prefill_floor": _PREFILL_FLOOR}


@contextlib.contextmanager
def _fresh_inputs(*modules: nn.Module) -> Iterator[None]:
    """Each of ``modules`` called on a copy of its input written just before the call, as
    in a network, where every layer reads what the op before it has just written.

    Timed on one input again and again, a GEMM reads clean cached lines; on an input
    written just before (by a copy, or by the thresholding of the activation-sparse
    multi-row path) it ran 10 % slower (128 x 2048 bfloat16 rows, 2048 x 2048 weight, two
    threads, Intel Xeon), which that path's comparison then charged to the thresholding
    (0.8-0.9x of the weight-only speed, where the thresholding costs 4 %). Both sides get
    the copy, so both pay what a layer inside a model pays; the hooks are gone after."""
    handles = [m.register_forward_pre_hook(lambda _m, args: (args[0].clone(), *args[1:]))
               for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _unthresholded(model: nn.Module) -> Iterator[None]:
    """``model`` with the input thresholds of its activation-sparse layers at zero (each
    keeps every input: it computes its whole product), restored bit for bit after."""
    layers = [m for m in model.modules() if isinstance(m, ActivationSparseLinear)]
    saved = [layer.threshold.clone() for layer in layers]
    try:
        for layer in layers:
            layer.threshold.zero_()
        yield
    finally:
        for layer, threshold in zip(layers, saved, strict=True):
            layer.threshold.copy_(threshold)


_COMPUTED_WEIGHT_REASON = (
    "left as it is: its weight is no parameter but computed by a hook before each call "
    "(torch.nn.utils.spectral_norm or weight_norm), so the tensor it holds now may be stale "
    "(spectral_norm's is the unnormalized weight until the first call); remove the hook "
    "(remove_spectral_norm, remove_weight_norm) to compile it"
)
"""The choice's ``reason`` for a layer whose ``weight`` is no ``nn.Parameter``: compiled,
it stored whatever that tensor held, silently not the weight the layer multiplies with."""

_READS_WEIGHTS_REASON = (
    "left dense: its parent's forward reads its weight directly (PyTorch's "
    "TransformerEncoderLayer fast path)"
)


def _reads_weights(parent: nn.Module, child_name: str) -> bool:
    """Whether ``parent``'s forward reads the ``weight`` of its child ``child_name`` itself
    (PyTorch's fused ``TransformerEncoderLayer`` fast path, also taken by a
    ``TransformerEncoder`` through its first layer, reads ``linear1``/``linear2``'s weights),
    so that a compiled layer, which has none, would break it. ``MultiheadAttention`` reads
    its ``out_proj``'s too, but that is a subclass of ``nn.Linear`` and never compiled."""
    return isinstance(parent, nn.TransformerEncoderLayer) and child_name in ("linear1", "linear2")


def tied_weights(model: nn.Module) -> dict[int, str]:
    """``{id(layer): name of another holder}`` for every ``nn.Linear``/``nn.Conv2d`` of
    ``model`` whose weight parameter another module holds as well (a language model's
    ``lm_head`` tied to its input embedding, ``tie_word_embeddings``): a compiled layer
    keeps its own copy of the weight, so compiling it would store the weight twice."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((f"{name}.{attr}".lstrip("."), module))
    tied = {}
    for module in model.modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            # no holder: a weight that is no parameter (recomputed by spectral_norm's hook)
            others = [n for n, m in holders.get(id(module.weight), []) if m is not module]
            if others:
                tied[id(module)] = others[0]
    return tied


def _tied_reason(other: str) -> str:
    return (f"left dense: its weight is tied to {other}, and a compiled copy would store it "
            "twice (grow=True, or formats without 'dense', compile it anyway)")


def formats_fit(model: nn.Module, formats: str | Sequence[str],
                weight_dtype: str | None = None) -> bool:
    """Whether :func:`compile` with ``formats`` (and ``weight_dtype``) can hold the weight
    of a layer of ``model`` as it is now: always where ``formats`` allow dense; for forced
    formats, where one of them can hold some linear layer, or convolution compile converts.
    A recipe asks this before its prune and fine-tune stages run, as compile refuses a
    model none of them fits only after them."""
    names = check_formats(formats)
    if names is None or "dense" in names:
        return True
    value_dtype = _check_weight_dtype(weight_dtype)
    return any(_candidates(m, names, value_dtype)[0] for m in model.modules()
               if type(m) is nn.Linear or type(m) is nn.Conv2d and convertible(m) is None)


def _candidates(
    layer: nn.Linear | nn.Conv2d, names: list[str] | None, value_dtype: torch.dtype | None = None
) -> tuple[list[str], bool]:
    """The formats ``layer`` may take (with values of ``value_dtype``; dense as it is) and
    whether dense is one of them. Forced ``names`` (no ``"dense"``) of which none can hold
    the weight leave the layer dense (``[]``)."""
    weight = layer.weight.detach()
    holding = available_formats(weight.flatten(1), value_dtype)
    if names is None:
        return holding, True
    return [n for n in holding if n in names], "dense" in names


def _takes_groups(fmt: str, group: int | None) -> bool:
    """Whether format ``fmt``'s kernels read int8 scales per group of ``group`` inputs
    (bitmap: a multiple of 16; a layer pruned with ``group_size=8`` failed to compile when
    bitmap was a candidate)."""
    return (getattr(FORMATS[fmt], "group_scales", False) and group is not None
            and group % getattr(FORMATS[fmt], "group_multiple", 1) == 0)


def _int8_inputs(fmt: str, activation: torch.dtype | None) -> dict[str, object]:
    """The ``from_dense`` options that make format ``fmt`` (holding int8 values) quantize
    its inputs to ``activation`` (W8A8): none for ``None``, for dense (the reference) and for
    formats without such kernels (their ``activation_dtypes``)."""
    if activation is None or activation not in getattr(FORMATS[fmt], "activation_dtypes", ()):
        return {}
    return {"activation_dtype": activation}


def _with_value_dtype(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``layer``, or a shallow copy whose float32 weight is rounded to a floating ``dtype``
    (the bias and everything else shared); int8 codes are made by the formats."""
    if dtype is None or not dtype.is_floating_point or layer.weight.dtype != torch.float32:
        return layer
    return _with_weight(layer, layer.weight.detach().to(dtype))


def _with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A shallow copy of ``layer`` holding ``weight`` (frozen), the bias and everything
    else shared."""
    stored = copy.copy(layer)
    stored._parameters = dict(layer._parameters)
    stored._parameters["weight"] = nn.Parameter(weight, False)
    return stored


def _check_forced(names: list[str] | None, refused: list[str], compiled: int) -> None:
    """Raise if forced ``names`` could hold no layer; warn about the ``refused`` ones."""
    if not refused:
        return
    if len(refused) == compiled:
        raise ValueError(
            f"formats={names!r} cannot hold the weight of any layer (their dtype, device or "
            f"pattern does not fit; {refused[:5]}{' …' if len(refused) > 5 else ''}); "
            "pass formats that can, or include 'dense'"
        )
    warnings.warn(
        f"formats={names!r} cannot hold the weights of layers {refused}; they stay dense",
        # past compile(), its inference_mode(False) and @renamed wrappers: the caller's line
        RuntimeWarning, stacklevel=5,
    )


def _subclass_reason(layer: nn.Module) -> str:
    base = "nn.Linear" if isinstance(layer, nn.Linear) else "nn.Conv2d"
    return (f"left as it is: a {type(layer).__name__}, a subclass of {base} with a forward "
            f"of its own, which may compute something else than {base}'s; replace it by an "
            f"{base} computing the same to compile it")


def _warn_of_subclasses(left: list[str], choices: dict) -> None:
    """Warn about the layers ``left`` as they are for being subclasses of ``nn.Linear`` or
    ``nn.Conv2d``: a pruned Falcon compiled to its dense self, its calibrated input
    thresholds dropped, without a word (the choices of only ``lm_head`` recorded)."""
    if left:
        warnings.warn(
            f"compile left layers {left[:5]}{' …' if len(left) > 5 else ''} as they are: "
            f"{choices[left[0]]['reason'][len('left as it is: '):]}",
            UserWarning, stacklevel=5,
        )


def _warn_of_dropped_hooks(model: nn.Module, compiled: nn.Module, choices: dict) -> None:
    """Warn where a replaced layer had forward (pre-)hooks: the compiled layer is a new
    module, which does not run them (the output of a layer a hook recorded or changed was
    silently no longer recorded or changed)."""
    hooked = [n for n in choices  # a layer left as it is, a deep copy, keeps its hooks
              if type(compiled.get_submodule(n)) is not type(model.get_submodule(n))
              and (model.get_submodule(n)._forward_hooks
                   or model.get_submodule(n)._forward_pre_hooks)]
    if hooked:
        warnings.warn(
            f"compile replaced layers {hooked[:5]}{' …' if len(hooked) > 5 else ''} whose "
            "forward hooks the compiled layers do not run; register them again on the "
            "compiled model's layers",
            # past this function, compile(), its inference_mode(False) and @renamed wrappers
            UserWarning, stacklevel=5,
        )


def _observed(
    model: nn.Module, inputs: tuple[object, ...], limit: int = 256
) -> tuple[dict[str, torch.Size], dict[str, torch.Tensor]]:
    """From one forward pass: the shape of the first input each ``nn.Linear`` and
    ``nn.Conv2d`` of ``model`` sees, and up to ``limit`` of its rows (``limit`` images for a
    convolution), the inputs a layer's rounding error is measured on. Inputs the model
    cannot take are a clear error naming ``example_inputs``, raised before any work."""
    layers = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    shapes: dict[str, torch.Size] = {}
    rows: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor, _out: object) -> None:
        if name in shapes:
            return
        shapes[name] = x.shape
        if type(layers[name]) is nn.Linear:
            x = x.reshape(-1, x.shape[-1])
        elif x.dim() == 3:  # one unbatched image
            x = x.unsqueeze(0)
        rows[name] = x[:limit].detach().clone()

    with (model_errors("example_inputs", "the model cannot run on them"), watch(layers, keep),
          inference(model)):
        model(*inputs)
    return shapes, rows


def _default_rows(shape: torch.Size | None, kind: type[nn.Module]) -> list[int]:
    """The observed row count (batch × sequence, or images for a convolution) and 1."""
    if shape is None:
        return [1]
    if kind is nn.Linear:
        return sorted({1, math.prod(shape[:-1])})
    return sorted({1, shape[0] if len(shape) == 4 else 1})


# -- GPT-2's Conv1D ----------------------------------------------------------------------


def conv1d_names(model: nn.Module) -> list[str]:
    """Every name under which ``model`` holds a GPT-2 ``Conv1D``."""
    conv1d = conv1d_type()
    return [] if conv1d is None else [
        n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, conv1d)]


def _conv1d_as_linear(model: nn.Module) -> nn.Module:
    """``model`` itself, or a copy in which every GPT-2 ``Conv1D`` is replaced by the
    ``nn.Linear`` it computes (weight transposed, same bias), so that it
    compiles like any linear layer. A shared ``Conv1D`` stays shared."""
    conv1d = conv1d_type()
    if conv1d is None or not any(isinstance(m, conv1d) for m in model.modules()):
        return model
    return replaced(model, conv1d, _linear_of)


def _linear_of(layer: nn.Module) -> nn.Linear:
    weight = layer.weight.detach()
    linear = skip_init(nn.Linear, weight.shape[0], weight.shape[1], bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.t().contiguous(), layer.weight.requires_grad)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().clone(), layer.bias.requires_grad)
    return linear


# -- validation --------------------------------------------------------------------------


def check_rows(rows: int | Sequence[int]) -> list[int]:
    """The distinct row counts of ``rows`` (an int or a non-empty sequence of ints in
    [1, :data:`~sparsekit.engine.autotune.MAX_ROWS`], :func:`autotune.check_rows`), the
    ``rows=`` of :func:`compile` and of a recipe's ``compile`` stage."""
    # one value: a str, bytes (b"\x04" read as [4]), a mapping (read as its keys) or a 0-d
    # tensor (a raw "iteration over a 0-d tensor"), which the value check then refuses
    single = isinstance(rows, (str, bytes, bytearray, Mapping)) or (
        isinstance(rows, torch.Tensor) and rows.dim() == 0)
    values = list(rows) if isinstance(rows, Iterable) and not single else [rows]
    if not values:
        raise ValueError(f"rows must be an int ≥ 1 or a non-empty sequence of them, got {rows!r}")
    return autotune.check_rows(values)


_WEIGHT_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8}


def _check_weight_dtype(weight_dtype: str | None) -> torch.dtype | None:
    if weight_dtype is None:
        return None
    if not isinstance(weight_dtype, str) or weight_dtype not in _WEIGHT_DTYPES:
        raise ValueError(
            f"weight_dtype must be None or one of {list(_WEIGHT_DTYPES)}, got {weight_dtype!r}"
        )
    return _WEIGHT_DTYPES[weight_dtype]


W8A8_RTOL = 0.05
"""The output check's tolerance with ``activation_dtype="int8"``: relative to the largest
output, what per-row int8 inputs may cost through a few layers (the check catches wrong
kernels, not rounding: each layer's ``quantization_error`` measures that)."""

_ACTIVATION_DTYPES = {"int8": torch.int8}


def _check_activation_dtype(
    activation_dtype: str | None, weight_dtype: str | None
) -> torch.dtype | None:
    if activation_dtype is None:
        return None
    if not isinstance(activation_dtype, str) or activation_dtype not in _ACTIVATION_DTYPES:
        raise ValueError(f"activation_dtype must be None or one of {list(_ACTIVATION_DTYPES)}, "
                         f"got {activation_dtype!r}")
    if weight_dtype not in (None, "int8"):
        raise ValueError(f"activation_dtype={activation_dtype!r} quantizes the inputs of int8 "
                         f"weights: weight_dtype must be 'int8' (or None, for layers with int8 "
                         f"scales attached), got weight_dtype={weight_dtype!r}")
    return _ACTIVATION_DTYPES[activation_dtype]


def _rtol(dtype: torch.dtype) -> float:
    """Relative output tolerance of the compile check for values or outputs of ``dtype``
    (int8 values: float32 sums of the dequantized weights the check compares against)."""
    if not dtype.is_floating_point:
        return _CHECK_RTOL
    return max(_CHECK_RTOL, 4 * torch.finfo(dtype).eps)


def _with_stored_weights(
    model: nn.Module, compiled: nn.Module, seen: Mapping[str, torch.Size]
) -> nn.Module:
    """``model``, or a copy whose layers compiled to int8 values have the dequantized
    weights those hold (the fake-quantized model the compiled one must reproduce). A layer
    holding two formats is taken in the one that serves the rows it saw (``seen``); a
    member of a fused group in its rows of the stacked format; an activation-sparse layer
    in its ``prefill`` for several rows, else in its own int8 values."""
    stored = {}
    for name, layer in compiled.named_modules():
        rows, shape = slice(None), seen.get(name)
        if isinstance(layer, FusedLinear):
            layer, rows = layer.group.linear, slice(layer.start, layer.start + layer.out_features)
        elif shape is None:
            continue
        if isinstance(layer, ActivationSparseLinear):
            if (isinstance(layer.prefill, CompiledLayer) and shape is not None
                    and math.prod(shape[:-1]) > 1):
                layer = layer.prefill
            elif layer.scales is not None:
                stored[name] = dequantize_grid(layer.to_dense(), layer.scales)[rows]
                continue
        if not isinstance(layer, CompiledLayer):
            continue
        fmt = _serving(layer, shape)
        if fmt.value_dtype == torch.int8:
            stored[name] = fmt.to_dense()[rows]
    if not stored:
        return model
    reference = copy.deepcopy(model)
    originals = dict(reference.named_modules())
    with torch.no_grad():
        for name, dense in stored.items():
            layer = originals[name]
            weight = layer.weight
            if weight.dtype == torch.float32 or not weight.is_floating_point():
                # a new parameter, not copied in place: a weight tied to an embedding (an LM
                # head compiled with grow=True) quantized the embedding too, and the check
                # failed where the compiled model was right
                layer.weight = nn.Parameter(dense.reshape(weight.shape).to(weight.dtype),
                                            requires_grad=False)
            else:  # keep the dequantized weights exact: no rounding to bfloat16
                _float32_reference(layer, dense.reshape(weight.shape))
    return reference


def _float32_reference(layer: nn.Module, weight: torch.Tensor) -> None:
    """Make ``layer`` (of a low-precision dtype) compute as an int8 format does: its
    inputs, the dequantized ``weight`` and its bias in float32, the output rounded to the
    layer's dtype once."""
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.float(), requires_grad=False)
    if getattr(layer, "bias", None) is not None:
        layer.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
    layer.register_forward_pre_hook(lambda _m, args: tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))
    layer.register_forward_hook(lambda _m, _args, out: out.to(dtype))


def _serving(layer: CompiledLayer, shape: torch.Size | None) -> Format:
    """The format of ``layer`` that serves inputs of ``shape`` (its second format above its
    split; a convolution's one format)."""
    large = getattr(layer, "format_large", None)
    if large is None or shape is None or math.prod(shape[:-1]) <= layer.split:
        return layer.format
    return large


def _as_tuple(example_inputs: object) -> tuple[object, ...] | None:
    """``example_inputs`` as the arguments of one call; its tensors checked: autotuning and
    the output check would measure nothing on empty inputs and compare NaN with NaN."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            "example_inputs must be a tensor, a tuple of model inputs or None, "
            f"got {type(example_inputs).__name__}"
        )
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            check_materialized("example_inputs", x)  # the finiteness check read it raw
        if isinstance(x, torch.Tensor) and x.numel() == 0:
            raise ValueError(f"example_inputs must not be empty, got a tensor of shape "
                             f"{tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and is_float8(x.dtype):
            # float8: torch's raw "isfinite" not implemented, just below
            raise ArgumentTypeError(f"example_inputs must be float16, bfloat16, float32 or "
                                    f"float64 where they are floats, got {x.dtype}")
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(x.isfinite().all()):
            raise ValueError("example_inputs must be finite: autotuning and the output check "
                             "run on them, got NaN or infinite values")
    return example_inputs


def _check_outputs(
    model: nn.Module, compiled: nn.Module, inputs: tuple[object, ...], rtol: float = _CHECK_RTOL
) -> None:
    """Raise if the compiled model's output differs from the original's (eval mode) by more
    than ``rtol`` of its largest magnitude (more for a low-precision output)."""
    with inference(model, compiled):
        ref, out = model(*inputs), compiled(*inputs)
    r, o = _output(ref), _output(out)
    # (an empty output, of a last layer without outputs, has nothing to differ in)
    if r is not None and isinstance(o, torch.Tensor) and o.shape == r.shape and r.numel():
        rtol = max(rtol, _rtol(r.dtype)) if r.is_floating_point() else rtol
        scale = r.abs().max().float().clamp_min(1e-12)
        err = float((o - r).abs().max().float() / scale)
        if err > rtol:
            raise RuntimeError(f"compiled model output differs from the original by {err:.2e}")


def _output(output: object) -> torch.Tensor | None:
    """The tensor :func:`_check_outputs` compares: ``output`` itself, or the first floating
    tensor of a tuple, list or dict of outputs (the logits of a Hugging Face
    ``ModelOutput``, the first element of ``(logits, ...)``); only a bare tensor output was
    checked, so a model returning a tuple or a dict was never checked at all."""
    if isinstance(output, torch.Tensor):
        return output
    return next((t for t in tree_leaves(output)
                 if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
