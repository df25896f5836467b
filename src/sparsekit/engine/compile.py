"""compile(): give every ``nn.Linear`` and ``nn.Conv2d`` its fastest measured format.

Each layer's candidate formats are timed side by side at the layer's real shape for every
batch size the model will serve; among those no slower than dense at any of them, the
one with the lowest summed time wins. The dense format (PyTorch's own ``F.linear`` /
``F.conv2d``) is always a candidate and its wrapper adds no measurable cost, so a
compiled layer is never slower than the dense one as measured. The input model is never
modified.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from sparsekit._checks import check_int, model_errors
from sparsekit.engine._moved import moved
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.compiled_conv import CompiledConv2d, convertible
from sparsekit.engine.compiled_linear import CompiledLayer, CompiledLinear
from sparsekit.engine.formats import FORMATS, available_formats
from sparsekit.observe import inference, input_shapes

__all__ = ["InputThresholds", "compile"]

__getattr__ = moved(__name__, {"report": "sparsekit.engine.report"})

_BLOCK_S = 2e-3  # one timed block: enough calls to make timer resolution negligible
_ROUND_BUDGET_S = 0.04  # per format and batch size; big layers still get _MIN_ROUNDS
_MIN_ROUNDS, _MAX_ROUNDS = 5, 15
_CHECK_RTOL = 1e-4


class InputThresholds(Protocol):
    """Per-layer thresholds on the inputs of ``nn.Linear`` layers, by module name, that can
    be applied to a model as hooks and removed again; what
    :func:`sparsekit.activation.calibrate` returns (:class:`ActivationSparsity`)."""

    @property
    def thresholds(self) -> Mapping[str, torch.Tensor]: ...

    def apply(self, model: nn.Module) -> object: ...

    def remove(self) -> None: ...


def compile(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[object, ...] | None = None,
    *,
    formats: str | Iterable[str] = "auto",
    batch_sizes: Sequence[int] = (1,),
    threads: int | None = None,
    activation_sparsity: InputThresholds | None = None,
) -> nn.Module:
    """A copy of ``model`` with its layers replaced by :class:`CompiledLinear` and
    :class:`~sparsekit.engine.compiled_conv.CompiledConv2d` modules.

    Zero weights are the pruned ones (apply the masks first, e.g. with
    :func:`sparsekit.prune`). ``formats`` ("auto" or names from
    :data:`~sparsekit.engine.formats.FORMATS`) restricts the sparse candidates (``"dense"``
    is always one). ``threads`` fixes the thread count of the compiled kernels (default:
    ``torch.get_num_threads()``). ``batch_sizes`` are the numbers of input rows a linear
    layer is timed with, and of images for a convolution. Convolutions (groups 1, zero
    padding) are compiled only with ``example_inputs``, whose forward pass gives each its
    input size; without them they stay ``nn.Conv2d``.

    With ``example_inputs`` (a tensor or a tuple for ``model(*example_inputs)``) the
    compiled model's output is checked against the original's. The choices, with measured
    times, are stored in ``compiled.sparsekit_choices``; :func:`sparsekit.engine.report`
    shows them per layer. Linear layers calibrated in ``activation_sparsity``
    (:func:`sparsekit.activation.calibrate`) become :class:`ActivationSparseLinear`
    instead, and the output check runs against ``model`` with those thresholds applied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = _check_formats(formats)
    sizes = _check_batch_sizes(batch_sizes)
    if threads is not None:
        check_int("threads", threads, minimum=1)
    inputs = _as_tuple(example_inputs)
    conv_shapes = {} if inputs is None else _conv_input_shapes(model, inputs)

    compiled = copy.deepcopy(model)
    first_name = {id(m): n for n, m in compiled.named_modules()}
    choices: dict[str, dict[str, object]] = {}
    done: dict[int, nn.Module] = {}  # a shared layer is compiled once
    act = activation_sparsity.thresholds if activation_sparsity is not None else {}
    with torch.no_grad():
        for parent in list(compiled.modules()):
            for child_name, child in list(parent._modules.items()):
                if type(child) not in (nn.Linear, nn.Conv2d):  # subclasses are left alone
                    continue
                if id(child) not in done:
                    name = first_name[id(child)]
                    if name in act and type(child) is nn.Linear:
                        done[id(child)] = ActivationSparseLinear.from_linear(
                            child, act[name], threads=threads
                        )
                    elif type(child) is nn.Linear:
                        done[id(child)], choices[name] = _compile_layer(
                            child, (child.in_features,), names, sizes, threads
                        )
                    elif name in conv_shapes and convertible(child) is None:
                        done[id(child)], choices[name] = _compile_layer(
                            child, conv_shapes[name], names, sizes, threads
                        )
                    else:
                        done[id(child)] = child
                setattr(parent, child_name, done[id(child)])
    compiled.sparsekit_choices = choices
    if inputs is not None and activation_sparsity is not None:
        activation_sparsity.apply(model)
        try:
            _check_outputs(model, compiled, inputs)
        finally:
            activation_sparsity.remove()
    elif inputs is not None:
        _check_outputs(model, compiled, inputs)
    return compiled


# -- per layer -------------------------------------------------------------------------


def _compile_layer(
    layer: nn.Linear | nn.Conv2d,
    in_shape: tuple[int, ...],
    names: list[str] | None,
    sizes: list[int],
    threads: int | None,
) -> tuple[CompiledLayer, dict[str, object]]:
    """The fastest compiled version of ``layer`` and the measurements behind the choice."""
    weight = layer.weight.detach()
    matrix = weight.reshape(weight.shape[0], -1)
    build = CompiledLinear.from_linear if type(layer) is nn.Linear else CompiledConv2d.from_conv2d
    candidates = [n for n in available_formats(matrix) if n == "dense" or names is None
                  or n in names]
    built = {
        n: build(layer, n, **({"threads": threads} if FORMATS.meta(n)["threaded"] else {}))
        for n in candidates
    }
    times = _autotune(built, in_shape, sizes, weight.dtype, weight.device)
    total = {n: sum(t.values()) for n, t in times.items()}
    # never slower than dense at any served batch size; then the least total time
    safe = [n for n, t in times.items() if all(t[b] <= times["dense"][b] for b in t)]
    best = min(safe, key=total.__getitem__)
    choice = {
        "format": best,
        "ms_dense": total["dense"],
        "ms_chosen": total[best],
        "speedup": total["dense"] / total[best] if total[best] > 0 else 1.0,
        "times_ms": times,
    }
    return built[best], choice


def _autotune(
    built: dict[str, nn.Module],
    in_shape: tuple[int, ...],
    sizes: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, dict[int, float]]:
    """Milliseconds per call of every compiled candidate and batch size.

    The modules themselves are called, so wrapper and kernel-launch costs count. Formats
    take turns (so a change in machine load hits all of them alike), and each block of
    calls starts warm, as in steady-state serving of a layer.
    """
    times: dict[str, dict[int, float]] = {n: {} for n in built}
    for b in sizes:
        x = torch.randn(b, *in_shape, dtype=dtype, device=device)
        calls = {n: (lambda m=m, x=x: m(x)) for n, m in built.items()}
        reps = {n: _calls_per_block(fn) for n, fn in calls.items()}
        best = {n: float("inf") for n in built}
        start = time.perf_counter()
        for r in range(_MAX_ROUNDS):  # round-robin, so load changes hit all formats alike
            for n, fn in calls.items():
                fn()  # bring this format's weight back into cache: the others evicted it
                best[n] = min(best[n], _time_block(fn, reps[n]))
            if r + 1 >= _MIN_ROUNDS and time.perf_counter() - start > _ROUND_BUDGET_S * len(built):
                break
        for n in built:
            times[n][b] = best[n] * 1e3
    return times


def _conv_input_shapes(model: nn.Module, inputs: tuple[object, ...]) -> dict[str, tuple[int, ...]]:
    """``(C, H, W)`` of the first input each ``nn.Conv2d`` of ``model`` sees; inputs the
    model cannot take are a clear error naming ``example_inputs``, raised before any work."""
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    with model_errors("example_inputs", "the model cannot run on them"):
        shapes = input_shapes(model, convs, *inputs)
    return {n: tuple(s[-3:]) for n, s in shapes.items()}


def _calls_per_block(fn: Callable[[], object]) -> int:
    fn()  # warm-up: first-call allocations, lazy CSR construction, kernel workspace
    once = _time_block(fn, 1)
    return max(1, min(1000, int(_BLOCK_S / max(once, 1e-7))))


def _time_block(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


# -- validation --------------------------------------------------------------------------


def _check_formats(formats: str | Iterable[str]) -> list[str] | None:
    """``None`` for "auto", else the validated list of names."""
    if isinstance(formats, str):
        if formats == "auto":
            return None
        formats = [formats]
    names = list(formats)
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ValueError(
            f"formats must be 'auto' or names from {FORMATS.names()}, got {bad or names!r}"
        )
    return names


def _check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if not sizes:
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    for i, b in enumerate(sizes):
        check_int(f"batch_sizes[{i}]", b, minimum=1)
    return sizes


def _as_tuple(example_inputs: object) -> tuple[object, ...] | None:
    if example_inputs is None or isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    raise TypeError(
        "example_inputs must be a tensor, a tuple of model inputs or None, "
        f"got {type(example_inputs).__name__}"
    )


def _check_outputs(model: nn.Module, compiled: nn.Module, inputs: tuple[object, ...]) -> None:
    """Raise if the compiled model's output differs from the original's (eval mode)."""
    with inference(model, compiled):
        ref, out = model(*inputs), compiled(*inputs)
    if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor):
        scale = ref.abs().max().clamp_min(1e-12)
        err = float((out - ref).abs().max() / scale) if ref.numel() else 0.0
        if err > _CHECK_RTOL:
            raise RuntimeError(f"compiled model output differs from the original by {err:.2e}")
