"""Stream the activations of a module of any model, in chunks, never all in memory.

:func:`capture` runs the model batch by batch with a forward hook on the named module,
stops the forward pass once everything asked for is captured (later layers never run), keeps
only real tokens when a batch carries an ``attention_mask``, and yields ``(rows, width)``
chunks as they come. With ``target`` it yields ``(input, target)`` pairs for a transcoder.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_int,
    check_materialized_module,
    check_module,
    model_errors,
)
from sparsekit.observe import inference

__all__ = ["SITES", "capture", "find_module"]

SITES = ("input", "output")


def find_module(model: nn.Module, name: str, param: str = "module_name") -> nn.Module:
    """``model``'s submodule called ``name``, or a ``ValueError`` naming close matches;
    ``model`` must be an ``nn.Module`` holding values (not on the meta device): anything
    else failed with a raw ``AttributeError``, or, on the meta device, in its first
    forward with an error that blamed the inputs."""
    check_module("model", model)
    check_materialized_module(model, "model: ")
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules:
        close = difflib.get_close_matches(str(name), list(modules), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{param} {name!r} is not a module of the model{hint}")
    return modules[name]


class _Captured(Exception):
    """Raised from a hook once every requested activation of the batch is held."""


class _HookFailed(Exception):
    """Carries the error of one of this package's hooks (its ``__cause__``) out of the
    forward pass, past :func:`_call`'s blame of the inputs, to be raised as it was."""


def hooked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a forward hook whose errors leave the model as :class:`_HookFailed` (a
    :class:`_Captured` passes as it is), so that :func:`_call` tells them from the
    model's own."""

    @functools.wraps(fn)
    def hook(*args: Any) -> Any:
        try:
            return fn(*args)
        except _Captured:
            raise
        except Exception as e:
            raise _HookFailed from e

    return hook


def _tensor(value: Any) -> torch.Tensor:
    """The hidden states in a module's input or output: the first tensor of a tuple, the
    first tensor value of a mapping (a Hugging Face ``ModelOutput``: ``last_hidden_state``
    or ``logits``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping):
        first = next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
        if first is not None:
            return first
    raise TypeError(f"the hooked module passed {type(value).__name__}, not a tensor")


def _with_tensor(value: Any, new: torch.Tensor) -> Any:
    """``value`` (a module's output) with ``new`` in place of what :func:`_tensor` reads."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    key = next(k for k, v in value.items() if isinstance(v, torch.Tensor))
    value[key] = new  # a fresh output object: a ModelOutput updates its attribute too
    return value


def _input(args: tuple, kwargs: dict[str, Any]) -> Any:
    """A module's input as a hook sees it: its positional arguments or, for a module called
    with keywords only (LLaMA's ``self_attn(hidden_states=...)``), its keyword arguments."""
    return args if args else kwargs


def _call(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (a tokenizer's output), else ``model(batch)``; an
    error the model raises on the batch (float token ids, sequences of no tokens) names
    ``inputs`` (:func:`~sparsekit._checks.model_errors`), one of a :func:`hooked` hook is
    raised as it was."""
    try:
        with model_errors("inputs", "the model cannot run on this batch"):
            return model(**batch) if isinstance(batch, Mapping) else model(batch)
    except _HookFailed as e:
        error = e.__cause__
        raise error from error.__cause__  # the hook's error, its own cause kept


def capture(
    model: nn.Module,
    module_name: str,
    inputs: Any,
    *,
    site: str = "output",
    target: str | None = None,
    chunk_size: int = 4096,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the activations at ``site`` (``"input"`` or ``"output"``) of ``model``'s module
    ``module_name`` over ``inputs``, as float32 (float64 for a float64 model)
    ``(chunk_size, width)`` chunks (the last one shorter), or with ``target`` ``(input,
    target)`` pairs where the target is the output of the module ``target`` (a transcoder's
    training data).

    ``inputs`` is one batch or an iterable of batches; a batch is a tensor (called as
    ``model(batch)``) or a mapping such as a tokenizer's output (``model(**batch)``), whose
    ``attention_mask``, if any, drops padding tokens. The model runs in eval mode without
    autograd and is left as found, with no hook on it between chunks (a consumer may run
    it meanwhile). Names are checked before the model runs; a batch the model cannot run
    on (float token ids, sequences of no tokens) is a ``ValueError`` naming ``inputs``.
    """
    module = find_module(model, module_name)
    targeted = find_module(model, target, "target") if target is not None else None
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    check_int("chunk_size", chunk_size, minimum=1)
    if isinstance(inputs, (torch.Tensor, Mapping)):
        inputs = [inputs]
    elif not isinstance(inputs, Iterable):
        raise ArgumentTypeError(f"inputs must be a tensor, a mapping or an iterable of "
                                f"batches, got {type(inputs).__name__}")
    return _stream(model, module, targeted, inputs, site, chunk_size)


def _stream(model: nn.Module, module: nn.Module, targeted: nn.Module | None,
            inputs: Iterable[Any], site: str, chunk_size: int) -> Iterator[Any]:
    held: dict[str, torch.Tensor] = {}
    wanted = {"x"} if targeted is None else {"x", "y"}

    def keep(key: str, value: Any) -> None:
        held[key] = _tensor(value).detach()
        if wanted <= held.keys():
            raise _Captured

    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    rows = 0
    for batch in inputs:
        held.clear()
        # hooks and inference() per batch, not around the loop: the consumer of this
        # generator (a training loop) runs between the yields, and may run the model itself
        handles = [module.register_forward_hook(hooked(
            lambda _m, args, kwargs, out: keep("x", _input(args, kwargs) if site == "input"
                                               else out)), with_kwargs=True)]
        if targeted is not None:
            handles.append(targeted.register_forward_hook(
                hooked(lambda _m, _a, out: keep("y", out))))
        try:
            with inference(model), contextlib.suppress(_Captured):
                _call(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        if not wanted <= held.keys():
            raise ValueError("module_name: the module did not run on this input")
        for key, what in (("x", f"module_name: the module's {site}"),
                          ("y", "target: the module's output")):
            if key in held and not held[key].is_floating_point():  # token ids, say
                raise ValueError(f"{what} is a {held[key].dtype} tensor, not activations (an "
                                 "embedding's input is token ids); accepted: a module whose "
                                 "activations there are floating point")
        mask = _mask(batch)
        for key, out in (("x", xs), ("y", ys)):
            if key in held:
                flat = held[key]  # float32, or float64 as it was (a cast lost its precision)
                flat = flat if flat.dtype == torch.float64 else flat.float()
                if mask is not None and flat.dim() == mask.dim() + 1:
                    if flat.shape[:-1] != mask.shape:  # the padding was kept, silently
                        raise ValueError(
                            f"inputs: attention_mask of shape {tuple(mask.shape)} does not "
                            f"match the activations of shape {tuple(flat.shape)}; accepted: "
                            f"one mask entry per token")
                    flat = flat[mask.to(flat.device) != 0]
                out.append(flat.reshape(-1, flat.shape[-1]))
        rows += xs[-1].shape[0]
        while rows >= chunk_size:
            yield from _emit(xs, ys, chunk_size)
            rows -= chunk_size
    if rows:
        yield from _emit(xs, ys, rows)


def _mask(batch: Any) -> torch.Tensor | None:
    """A mapping batch's ``attention_mask`` as a tensor (a list or a NumPy array, which a
    model may take too, failed at ``.shape`` with a raw ``AttributeError``), or None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if mask is None else torch.as_tensor(mask)


def _emit(xs: list[torch.Tensor], ys: list[torch.Tensor], n: int) -> Iterator[Any]:
    """Take the first ``n`` rows held in ``xs`` (and ``ys``), leaving the rest."""
    x = torch.cat(xs)
    xs[:] = [x[n:]]
    if not ys:
        yield x[:n]
        return
    y = torch.cat(ys)
    ys[:] = [y[n:]]
    yield x[:n], y[:n]
