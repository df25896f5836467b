"""Argument checks and renamed arguments, shared by the public API.

Every bad value fails the same way, and every old spelling warns the same way.

Callers run them before anything is changed. A value of the wrong type — a ``bool`` is
never a number here, and a float is not an int (``every=1.5``) — raises
:class:`ArgumentTypeError`, both a ``TypeError`` and a ``ValueError`` (as scikit-learn's
``InvalidParameterError`` is), so callers that caught either before still do; a value of
the right type outside the accepted range (NaN is outside every range) raises
``ValueError``. Every message names the parameter, the value and what is accepted.
:func:`model_errors` does the same for values only the model can judge (inputs of the
wrong width or type): it names the argument in the error PyTorch raised.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that ``except ValueError`` also catches)."""


def check_int(name: str, value: Any, *, minimum: int | None = None) -> None:
    """Raise unless ``value`` is an integer (not a bool), at least ``minimum`` if given."""
    accepted = "an int" if minimum is None else f"an int ≥ {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {accepted}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


MAX_EPOCHS = 1000
"""The most epochs a recipe or ``sparsekit demo`` trains (a typo of a huge count ran until
killed)."""

MAX_SEED = 2**63 - 1
"""The largest seed the public API takes: seeds are ints in [0, MAX_SEED], which every
``torch.Generator().manual_seed`` (and ``random.Random``) takes as given; a larger one
used to be a raw ``OverflowError`` ("Overflow when unpacking long long")."""


def check_parameter_names(what: str, names: Iterable[str], known: Collection[str],
                          hint: str) -> None:
    """Raise ``ValueError`` unless every name in ``names`` is in ``known`` (a model's
    parameter names): the message, "``what`` 'a', 'b', …, which are not parameters of the
    model; ``hint``", names up to three unknown ones (``what``: the argument and its verb,
    e.g. "masks name")."""
    unknown = [n for n in names if n not in known]
    if unknown:
        more = ", …" if len(unknown) > 3 else ""
        raise ValueError(
            f"{what} {', '.join(map(repr, unknown[:3]))}{more}, which "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of the "
            f"model; {hint}"
        )


def check_mapping(name: str, value: Any, kind: type, what: str) -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` is a mapping whose every value is
    a ``kind`` (``what`` names one in the messages: "an nn.Module", "a torch.Tensor")."""
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{name} must be a mapping of name to {what}, got "
                                f"{type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, kind):
            raise ArgumentTypeError(f"{name}[{key!r}] must be {what}, got "
                                    f"{type(item).__name__}")


def check_module(name: str, value: Any) -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` (the argument ``name``) is an
    ``nn.Module``: the check of every public ``model=`` (a state dict or a path given in its
    place failed later with an ``AttributeError``)."""
    if not isinstance(value, nn.Module):
        raise ArgumentTypeError(f"{name} must be an nn.Module, got {type(value).__name__}")


def check_not_compiled(name: str, model: nn.Module, what: str) -> None:
    """Raise ``ValueError`` naming ``model``'s first compiled layer (what
    :func:`sparsekit.compile` installs) if it has one: ``what`` (pruning, fine-tuning) takes
    nn.Linear layers, and a compiled model had been told it had "no default targets", "no
    list of transformer blocks", or given peft's repr of a whole fused group. Called where
    such a model would fail anyway."""
    from sparsekit.engine.persist import COMPILED_LAYERS  # the engine imports this module

    check_no_own_layers(name, model, what)
    for layer_name, layer in model.named_modules():
        if isinstance(layer, COMPILED_LAYERS):
            raise ValueError(
                f"{name}: {layer_name or 'the model'} is compiled ({type(layer).__name__}); "
                f"{what} takes a model of nn.Linear layers: pass "
                "sparsekit.engine.decompile(model) (the model as it was compiled) instead")


def check_no_own_layers(name: str, model: nn.Module, what: str) -> None:
    """Raise ``ValueError`` naming ``model``'s first module that runs its own layers
    (:func:`sparsekit.engine.persist.runs_own_layers`: sparsekit.moe's ``RoutedFFN``):
    ``what`` would replace or rewrite the layers it reads (its decompiled copy is itself)."""
    from sparsekit.engine.persist import runs_own_layers

    for layer_name, layer in model.named_modules():
        if runs_own_layers(layer):
            raise ValueError(
                f"{name}: {layer_name or 'the model'} is a {type(layer).__name__}, which runs "
                f"the layers it holds itself; {what} does not take a model holding one "
                "(decompile leaves it as it is)")


SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""The integer dtype of each element size in bytes: a float tensor viewed as it is read and
written bit for bit (-0.0 and NaN included), by the checkpoint's counts and the masks."""


def is_float8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of PyTorch's float8 types: it stores them, but implements
    almost no CPU arithmetic on them (``masked_fill_``, ``isfinite``, ``count_nonzero`` and
    the rest are "not implemented"), so every computation takes 16 bits or more."""
    return dtype.is_floating_point and dtype.itemsize == 1


def layer_input_error(x: Any, in_features: int) -> ArgumentTypeError:
    """The error to raise for an ``x`` that is no tensor, given to a layer of
    ``in_features`` inputs (a list failed deep inside with a raw ``AttributeError``). The
    layers test ``isinstance`` themselves, inline on their per-call path."""
    return ArgumentTypeError(f"x must be a tensor of shape (..., in_features={in_features}), "
                             f"got {type(x).__name__}")


def check_materialized(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` is on the meta device: it holds no
    values, and the first read of one (``.item()``, a comparison) failed inside PyTorch."""
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device and holds no values; accepted: a tensor "
                         "on a real device (cpu, cuda): load or materialize it first")


def check_writable(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` is an inference tensor (made under
    ``torch.inference_mode``) while inference mode is off: PyTorch changes one in place only
    inside it, and its raw ``RuntimeError`` came after the tensors before it had changed."""
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode), "
                         "which cannot be changed in place outside it; accepted: tensors made "
                         "outside inference mode (build or load the model without it), or "
                         "this call inside inference mode")


def check_loadable(module: torch.nn.Module, state: Mapping[str, Any], prefix: str,
                   metadata: Mapping[str, Any]) -> None:
    """Raise (:func:`check_writable`) for the first parameter or buffer of ``module`` itself
    (not of its children) that ``state`` has an entry for under ``prefix`` and that
    ``load_state_dict`` cannot copy into: torch copied the entries before it, then raised,
    so the load changed part of the layer under its error. For a module's own
    ``_load_from_state_dict``, before it changes anything; ``metadata`` with
    ``assign_to_params_buffers`` (``assign=True``) replaces the tensors, nothing to check."""
    if metadata.get("assign_to_params_buffers", False):
        return
    for key, tensor in (*module._parameters.items(), *module._buffers.items()):
        if tensor is not None and prefix + key in state:
            check_writable(f"{prefix.rstrip('.') or 'layer'}: {key}", tensor)


def check_finite(name: str, tensor: torch.Tensor, *, dtype: torch.dtype | None = None,
                 hint: str = "") -> torch.Tensor:
    """Raise ``ValueError`` naming ``name`` unless every value of ``tensor`` is finite (in
    ``dtype``, when given: a value finite before a cast may overflow it; the message names
    ``dtype`` when it is not ``tensor``'s), saying how many are NaN or inf, then ``hint``
    (what to check): one NaN spreads to every weight, code or score that reads it,
    silently. The one non-finite check of every public tensor argument. Returns ``tensor``
    in ``dtype`` (the cast is made once, for the check and the caller)."""
    values = tensor if dtype is None else tensor.to(dtype)
    finite = torch.isfinite(values)
    if not bool(finite.all()):  # counted only then: every encode and decode checks
        bad = int((~finite).sum())
        where = f" in {dtype}" if values.dtype != tensor.dtype else ""
        raise ValueError(f"{name} must be finite{where}, got {bad} NaN or inf among "
                         f"{tensor.numel()} values" + (f"; {hint}" if hint else ""))
    return values


def check_recordable(module: nn.Module, prefix: str, what: str) -> None:
    """Raise ``ValueError`` naming the first parameter of ``module`` (``prefix`` + its name)
    that is an inference tensor (``what``, e.g. "SAE", was built or loaded under
    ``torch.inference_mode()``) when autograd would record a product with it: PyTorch's raw
    "Inference tensors cannot be saved for backward" named no parameter, and came from any
    call outside ``torch.no_grad()``."""
    if not torch.is_grad_enabled():  # also inside inference mode
        return
    for name, param in module.named_parameters():
        if param.requires_grad and param.is_inference():
            raise ValueError(
                f"{prefix}{name} is an inference tensor (the {what} was built or loaded under "
                f"torch.inference_mode), which autograd cannot record; accepted: this call "
                f"under torch.no_grad() or torch.inference_mode(), or a {what} built outside "
                f"inference mode")


def check_materialized_module(module: nn.Module, prefix: str) -> None:
    """:func:`check_materialized` of every parameter and buffer of ``module``, each named
    ``prefix`` + its name (``"sae."``, ``"model: "``): a module on the meta device (built under
    ``init_empty_weights``, not loaded yet) failed deep inside its first product."""
    for key, tensor in (*module.named_parameters(), *module.named_buffers()):
        check_materialized(prefix + key, tensor)


def check_seed(name: str, value: Any) -> None:
    """Raise unless ``value`` is an int (not a bool) in [0, :data:`MAX_SEED`]: the check of
    every public ``seed=``."""
    accepted = "an int in [0, 2**63 - 1]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be {accepted}, got {value!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise :class:`ArgumentTypeError` naming ``name`` unless ``value`` is ``True`` or
    ``False``: a flag taken by its truth read the string ``"no"`` (or ``"False"``) as true."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool (True or False), got {value!r}")


def memory_bytes() -> int | None:
    """Physical memory of this machine in bytes (``None`` where the OS does not say): the
    bound of sizes a caller asks for that no file or tensor bounds."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_memory(need: int, what: str, accepted: str) -> None:
    """Raise ``ValueError`` when ``need`` bytes (``what`` takes them, e.g. ``"rank=8 ...
    makes router weights of"``) exceed this machine's memory (:func:`memory_bytes`): a
    size that no file or tensor bounds failed inside the allocator with a raw
    ``RuntimeError`` naming no argument, or filled pages until the process was killed."""
    limit = memory_bytes()
    if limit is not None and need > limit:
        raise ValueError(f"{what} {need:,} bytes, more than this machine's memory "
                         f"({limit:,} bytes); {accepted}")


def seeded(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (checked by :func:`check_seed`): a NumPy int
    passes that check, but ``manual_seed`` takes Python ints only (a raw "an integer is
    required")."""
    return torch.Generator().manual_seed(int(seed))


def check_positive(name: str, value: Any, *, optional: bool = False) -> None:
    """Raise unless ``value`` is a positive finite real number (not a bool; NaN never is),
    or ``None`` when ``optional``."""
    if optional and value is None:
        return
    accepted = f"a positive finite float{' or None' if optional else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be {accepted}, got {value!r}")
    if not 0 < value < math.inf:  # also NaN
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """Raise unless ``value`` is a finite real number ≥ 0 (not a bool; NaN never is): a
    coefficient or a strength, where 0 turns a term off and infinity is never meant."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a finite float ≥ 0, got {value!r}")
    if not 0 <= value < math.inf:  # also NaN
        raise ValueError(f"{name} must be a finite float ≥ 0, got {value!r}")


def check_fraction(name: str, value: Any, *, zero: bool = True, one: bool = False) -> None:
    """Raise unless ``value`` is a real number in the unit interval (NaN never is).

    ``zero`` and ``one`` say whether the interval includes its ends; the default is [0, 1).
    """
    interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a float in {interval}, got {value!r}")
    inside = (value >= 0 if zero else value > 0) and (value <= 1 if one else value < 1)
    if not inside:  # also NaN, for which every comparison is False
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_device(device: Any) -> torch.device | None:
    """``device`` (``None``, a str, an int or a ``torch.device``) as a ``torch.device`` once a
    tensor can be allocated there (``None`` stays ``None``): an unknown name otherwise fails
    later with a bare ``RuntimeError``, CUDA on a build without it with an
    ``AssertionError``."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ArgumentTypeError(f"device must be None, a str, an int or a torch.device, got "
                                f"{device!r}")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device {device!r} is not available here ({e}); accepted: None or "
                         f"{devices_here()}") from e
    return dev


def devices_here() -> str:
    """The devices that hold tensors on this machine, for an error's "accepted": 'cpu' and
    each CUDA device (listing ``'cuda'`` as an example read as the device just refused)."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return "a device this machine has: " + ", ".join(map(repr, names))


_MAX_WRAPPERS = 8  # wrappers of wrappers of an optimizer; a cycle ends here too


def check_optimizer(optimizer: Any, *, optional: bool = False) -> torch.optim.Optimizer | None:
    """Return the ``torch.optim.Optimizer`` that ``optimizer`` is or wraps (or None, if
    ``optional``); raise if there is none.

    Training frameworks hand out wrappers that step the real optimizer and expose it as
    ``.optimizer``: accelerate's ``AcceleratedOptimizer`` (an ``Optimizer`` subclass that
    never ran ``Optimizer.__init__``, so it cannot hold step hooks) and Lightning's
    ``LightningOptimizer`` (a copy of the optimizer's attributes under another identity).
    The innermost optimizer of that chain is returned, so hooks land where ``step()``
    really runs and every wrapper of one optimizer names the same one.
    """
    if optional and optimizer is None:
        return None
    found, seen = None, optimizer
    for _ in range(_MAX_WRAPPERS):
        if isinstance(seen, torch.optim.Optimizer) and hasattr(seen, "_optimizer_step_pre_hooks"):
            found = seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    if found is None:
        accepted = ("a torch.optim.Optimizer or a wrapper exposing one as .optimizer "
                    "(accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer)"
                    + (" or None" if optional else ""))
        raise ArgumentTypeError(f"optimizer must be {accepted}, got {type(optimizer).__name__}")
    return found


def check_sparsity(sparsity: Any, param: str = "sparsity") -> None:
    """Raise unless ``sparsity`` is a real number in [0, 1)."""
    check_fraction(param, sparsity)


@contextlib.contextmanager
def model_errors(param: str, failure: str = "the model cannot run on it") -> Iterator[None]:
    """Name ``param`` in the error PyTorch raises when a model (or a loss) cannot take the
    values the caller passed, keeping the original message: ``"{param}: {failure}: …"``.

    A ``TypeError`` becomes an :class:`ArgumentTypeError`, anything else (wrong shapes or
    dtypes raise ``RuntimeError``, a mapping input without a key the model reads a
    ``KeyError``) a ``ValueError``; running out of memory is not the argument's fault and
    passes through unchanged.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except TypeError as e:
        raise ArgumentTypeError(f"{param}: {failure}: {e}") from e
    except (RuntimeError, ValueError, IndexError, KeyError) as e:
        raise ValueError(f"{param}: {failure}: {e}") from e


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Keep old keyword spellings of ``fn``'s arguments working, with a ``DeprecationWarning``.

    ``@renamed(criterion="method")`` passes ``criterion=x`` on as ``method=x``; giving
    both spellings (the new one by keyword or position) is a ``TypeError``.
    """

    def wrap(fn: F) -> F:
        positional = list(inspect.signature(fn).parameters)
        where = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs or new in positional[: len(args)]:
                    raise TypeError(f"{where}() got both {old}= and {new}=; pass only {new}=")
                warnings.warn(
                    f"{where}(): {old}= is deprecated, use {new}=", DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def renamed_attribute(old: str, new: str) -> property:
    """A read-only alias ``old`` of attribute ``new`` that warns with a ``DeprecationWarning``."""

    def get(self: Any) -> Any:
        warnings.warn(
            f"{type(self).__name__}.{old} is deprecated, use .{new}", DeprecationWarning,
            stacklevel=2,
        )
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of ``{new}``.")
