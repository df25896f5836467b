"""Observe what flows into a model's layers, and leave the model as it was found.

Every domain needs to look at layer inputs: the Wanda score (‖X_j‖²), SparseGPT (XᵀX),
activation-sparsity calibration (the input rows themselves), ``compile`` (convolution input
shapes) and ``report`` (multiply-accumulates). This module is the one place that does it:

- :func:`batches` turns the accepted ``data`` forms into ``(inputs, labels)`` batches;
- :func:`preserved` and :func:`inference` run code against a model and restore its
  train/eval modes (and buffers and ``.grad`` fields) afterwards, also on errors;
- :func:`run` calls the model on every batch of ``data`` in eval mode without autograd;
- :func:`layer_input` reads (and replaces) a layer's input in the arguments a hook sees;
- :func:`watch` hands each input (and output) of chosen layers to an observer;
- :class:`InputStats`, :func:`record` and :func:`input_stats` keep the sums Wanda and
  SparseGPT need, never the activations themselves;
- :func:`input_shapes` and :func:`macs` are what ``compile`` and ``report`` measure.

Layers are passed as ``{name: module}``; the caller picks the names (module or parameter
names) and every result is keyed by them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_device,
    check_int,
    check_mapping,
    check_materialized,
    model_errors,
)
from sparsekit.distributed import all_reduce_sum

__all__ = [
    "Batch",
    "InputStats",
    "LayerCall",
    "batches",
    "inference",
    "input_shapes",
    "input_stats",
    "layer_input",
    "macs",
    "preserved",
    "record",
    "run",
    "watch",
]

Batch = tuple[Any, torch.Tensor | None]
Observer = Callable[[str, torch.Tensor, Any], None]
LayerCall = tuple[tuple[Any, ...], dict[str, Any]]
"""A layer call's ``(args, kwargs)``: what a forward pre-hook ``with_kwargs`` receives and
may return in their place."""


# -- data ---------------------------------------------------------------------------------


def batches(data: Any, param: str = "data") -> Iterator[Batch]:
    """Normalise the accepted ``data`` forms into ``(inputs, labels_or_None)`` batches.

    ``data`` is a tensor of inputs, an ``(inputs, labels)`` tuple, or an iterable of
    batches (a list, a ``DataLoader``), each a tensor, an ``(inputs, labels)`` pair, a
    1-tuple ``(inputs,)`` or an ``(inputs, None)`` pair, so the output of ``batches`` is
    itself accepted. A list is always a list of batches, never a pair; a tuple of two
    is a pair when its second item is a tensor or ``None``. Errors name ``param``, the
    caller's argument that ``data`` came from (``calibration`` of ``calibrate``).
    """
    if isinstance(data, torch.Tensor):
        yield data, None
        return
    if isinstance(data, tuple) and len(data) == 2 and (data[1] is None or _is_pair(data)):
        yield data[0], data[1]
        return
    if isinstance(data, (Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise ArgumentTypeError(
            f"{param} must be a tensor, an (inputs, labels) pair or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    for item in data:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, (tuple, list)) and len(item) == 1:  # DataLoader(TensorDataset(x))
            yield item[0], None
        elif _is_pair(item) or (isinstance(item, (tuple, list)) and len(item) == 2
                                and item[1] is None):
            yield item[0], item[1]
        else:
            raise ArgumentTypeError(
                f"each batch in {param} must be a tensor or an (inputs, labels) pair, got "
                f"{type(item).__name__}"
            )


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[1], torch.Tensor)


# -- leaving the model as it was ----------------------------------------------------------


@contextlib.contextmanager
def preserved(
    *models: nn.Module, train: bool | None = None, buffers: bool = True
) -> Iterator[None]:
    """Run a block against ``models``; restore every module's own train/eval mode, the
    parameters' ``.grad`` fields (the tensors they held: differentiate with
    ``torch.autograd.grad`` inside, as ``.backward()`` accumulates into those tensors) and
    (with ``buffers``) the buffer values afterwards.

    ``train`` sets the mode of every module while inside (``None``: leave it). Pass
    ``buffers=False`` when nothing inside can change them (eval mode without autograd) to
    skip copying them.
    """
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"models[{i}] must be an nn.Module, got "
                                    f"{type(model).__name__}")
    if train is not None and not isinstance(train, bool):
        raise ArgumentTypeError(f"train must be True, False or None, got {train!r}")
    check_bool("buffers", buffers)  # buffers="no" kept (copied) them
    modes = {m: m.training for model in models for m in model.modules()}
    grads = [{n: p.grad for n, p in model.named_parameters()} for model in models]
    saved = [{n: b.detach().clone() for n, b in model.named_buffers()} if buffers else {}
             for model in models]
    if train is not None:
        for model in models:
            model.train(train)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        with torch.no_grad():
            for model, values in zip(models, saved, strict=True):
                for n, b in model.named_buffers():
                    if n in values:
                        # a buffer made under inference_mode is written only inside it (a
                        # model built there failed here with a raw "Inplace update to
                        # inference tensor outside InferenceMode")
                        with torch.inference_mode(b.is_inference()):
                            b.copy_(values[n])
        for model, before in zip(models, grads, strict=True):
            for n, p in model.named_parameters():
                p.grad = before.get(n)


@contextlib.contextmanager
def inference(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for ``models``; every module's own mode is restored after
    (submodules may differ from their root)."""
    with preserved(*models, train=False, buffers=False), torch.no_grad():
        yield


def run(model: nn.Module, data: Any, param: str = "data") -> int:
    """Call ``model(inputs)`` for every non-empty batch of ``data`` (see :func:`batches`), in
    eval mode without autograd, leaving the model as found; return the number of calls.

    Raises ``ValueError`` naming ``param`` when ``data`` holds no non-empty batch or
    inputs on the meta device (a model may run on them, as a Hugging Face embedding
    does, and compute numbers from no values), and names it in the error the model raises
    on inputs it cannot take (see :func:`~sparsekit._checks.model_errors`).
    """
    from sparsekit.llm.calibration import check_token_ids  # sparsekit.llm imports this module

    calls = 0
    with preserved(model, train=False), torch.no_grad():
        for inputs, _ in batches(data, param):
            if isinstance(inputs, torch.Tensor) and inputs.numel() == 0:
                continue
            check_inputs_materialized(param, inputs)
            if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() \
                    and not inputs.is_complex() and inputs.dtype != torch.bool:
                # token ids: one outside the vocabulary was the embedding's raw "index out
                # of range in self", naming no id and no range
                check_token_ids(inputs, model, param)
            with model_errors(param, "the model cannot run on its inputs"):
                model(inputs)
            calls += 1
    if calls == 0:
        raise ValueError(f"{param} holds no (non-empty) batches; pass a tensor of inputs "
                         "or a list of them")
    return calls


def check_inputs_materialized(param: str, inputs: Any) -> None:
    """Raise ``ValueError`` naming ``param`` if a tensor of ``inputs`` (nested in tuples,
    lists and dicts) is on the meta device: it holds no values to observe."""
    if isinstance(inputs, torch.Tensor):
        check_materialized(param, inputs)
    elif isinstance(inputs, (tuple, list)):
        for item in inputs:
            check_inputs_materialized(param, item)
    elif isinstance(inputs, Mapping):
        for item in inputs.values():
            check_inputs_materialized(param, item)


# -- observing layers ---------------------------------------------------------------------


def check_layer_inputs_materialized(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``model`` if ``names`` (layers an observer of :func:`watch`
    saw inputs on the meta device for, and skipped) is not empty: a model whose weights were
    never loaded runs on the meta device, and what was recorded from it were numbers made
    up. Observers call it after the run, where an error inside the forward pass would have
    blamed the data."""
    if names:
        raise ValueError(f"model: the inputs of layers {list(names)} are on the meta device "
                         "and hold no values; accepted: a model whose weights are loaded "
                         "(model.to_empty(...) and load_state_dict)")


def layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[Any, Callable[[Any], LayerCall]]:
    """A layer call's input and a function that returns the call with a replacement in its
    place: ``x, replace = layer_input(args, kwargs)``.

    The input is the first positional argument or, for a layer called with keywords only
    (``layer(input=x)``), the first keyword argument; a call without arguments has input
    ``None`` and ``replace`` returns it unchanged. :func:`watch` and the thresholds of
    :class:`~sparsekit.activation.ActivationSparsity` both find the input by this rule (a
    hook reading ``args[0]`` failed on keyword calls with an ``IndexError``), so the input
    calibration observes is the one the thresholds replace.
    """
    if args:
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    if kwargs:
        key = next(iter(kwargs))
        return kwargs[key], lambda new: (args, {**kwargs, key: new})
    return None, lambda _new: (args, kwargs)


@contextlib.contextmanager
def watch(layers: Mapping[str, nn.Module], observer: Observer) -> Iterator[None]:
    """Call ``observer(name, inputs, output)`` after every call of each layer while inside.

    ``inputs`` is the layer's input (:func:`layer_input`) as the layer received it (after
    any forward pre-hooks); nothing is detached or copied. ``layers`` is checked before any hook is
    registered, and every hook is removed on leaving, also on errors.
    """
    _check_layers(layers)
    if not callable(observer):  # was a TypeError from inside the model's forward pass
        raise ArgumentTypeError(f"observer must be a callable (name, inputs, output), got "
                                f"{type(observer).__name__}")

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def fn(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               output: Any) -> None:
            observer(name, layer_input(args, kwargs)[0], output)

        return fn

    handles = []
    try:
        for n, m in layers.items():
            handles.append(m.register_forward_hook(hook(n), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _check_layers(layers: Any) -> None:
    """Raise unless ``layers`` is a ``{name: nn.Module}`` mapping of no transposed
    convolution: its weight is ``(in, out/groups, *kernel)`` and each input scatters into
    many outputs, which the MACs (12.9x too many for a stride-2 ``ConvTranspose2d``) and
    the per-feature statistics (a raw reshape error blaming the data) read as a
    convolution's."""
    check_mapping("layers", layers, nn.Module, "an nn.Module")
    for name, m in layers.items():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise ArgumentTypeError(f"layers[{name!r}] is a {type(m).__name__}, which is not "
                                    "supported; accepted: Linear, Conv1D and Conv1d/2d/3d "
                                    "layers")


def input_shapes(model: nn.Module, layers: Mapping[str, nn.Module], *inputs: Any
                 ) -> dict[str, torch.Size]:
    """The shape of the first input each layer sees during ``model(*inputs)`` (eval mode,
    no autograd); layers the forward pass never called are absent."""
    shapes: dict[str, torch.Size] = {}

    def keep(name: str, x: torch.Tensor, _out: Any) -> None:
        shapes.setdefault(name, x.shape)

    with watch(layers, keep), inference(model):
        model(*inputs)
    return shapes


def macs(model: nn.Module, layers: Mapping[str, nn.Module], *inputs: Any) -> dict[str, int]:
    """Multiply-accumulates of each weighted layer during ``model(*inputs)`` (eval mode, no
    autograd): ``output.numel()`` times the inputs per output (``prod(weight.shape[1:])``,
    GPT-2's ``Conv1D`` its ``weight.shape[0]``) summed over every call (layers that store
    no dense ``weight``, such as compiled ones, use their ``in_features``).
    Layers the forward pass never called are absent."""
    _check_layers(layers)  # before _width reads them
    for name, m in layers.items():
        if not isinstance(getattr(m, "weight", None), torch.Tensor) \
                and not hasattr(m, "in_features"):  # was an AttributeError
            raise ArgumentTypeError(f"layers[{name!r}] must be a weighted layer (a Linear, "
                                    f"Conv1D or Conv layer), got {type(m).__name__}")
    counts: dict[str, int] = {}
    per_output = {n: _width(m) for n, m in layers.items()}  # in_features or in/groups * kernel

    def count(name: str, _x: torch.Tensor, out: torch.Tensor) -> None:
        counts[name] = counts.get(name, 0) + out.numel() * per_output[name]

    with watch(layers, count), inference(model):
        model(*inputs)
    return counts


class InputStats:
    """Sums over every input a layer has seen: per-feature squares and, optionally, the Gram
    matrix XᵀX. Only these sums are kept, never the activations themselves.

    A feature is what one weight column multiplies: an input feature of a linear layer, a
    (channel, kernel position) patch entry of a convolution.
    """

    def __init__(self, features: int, *, gram: bool = False,
                 device: torch.device | str | None = None) -> None:
        check_int("features", features, minimum=0)
        check_bool("gram", gram)  # gram="no" allocated the features² matrix
        device = check_device(device)  # an unknown name was a raw RuntimeError
        features = int(features)
        # squares in float64: finite inputs beyond ~1.8e19 would overflow float32 squares
        self.sq = torch.zeros(features, dtype=torch.float64, device=device)
        self.gram = torch.zeros(features, features, device=device) if gram else None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add input rows: any tensor whose last dimension holds the features."""
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"x must be a tensor, got {type(x).__name__}")
        features = self.sq.shape[-1]
        if x.dim() == 0 or x.shape[-1] != features:
            raise ValueError(f"x must be a tensor whose last dimension holds the {features} "
                             f"features, got shape {tuple(x.shape)}")
        check_materialized("x", x)  # its rows were counted, its squares added as nothing
        # rows counted from the leading dimensions: reshape(-1, 0) is ambiguous
        x = x.detach().reshape(x.shape[:-1].numel(), features).float()
        self.sq += x.double().square().sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def all_reduce(self) -> InputStats:
        """Sum the statistics over every rank of the default process group, in place (each
        rank saw its share of the data; afterwards every rank holds the sums over all of
        it). Nothing happens in a single process. Returns ``self``."""
        rows = torch.tensor([self.rows], dtype=torch.int64)
        all_reduce_sum(self.sq, rows, *([] if self.gram is None else [self.gram]))
        self.rows = int(rows)
        return self

    def norms(self) -> torch.Tensor:
        """‖X_j‖₂ of every input feature j over all rows seen (Wanda's activation norm)."""
        return self.sq.sqrt().float()

    def hessian(self) -> torch.Tensor:
        """H = 2XᵀX / rows, the Hessian of the layer-wise reconstruction error."""
        if self.gram is None:
            raise RuntimeError("InputStats was created with gram=False")
        if not bool(torch.isfinite(self.gram).all()) and bool(torch.isfinite(self.sq).all()):
            raise ValueError(
                "the layer inputs are finite but their Gram matrix XᵀX overflowed float32 "
                f"(largest sum of squares {float(self.sq.max()):.3g}; inputs of magnitude "
                "above about 1.8e19); rescale the calibration data")
        lost = self.underflowed()
        if bool(lost.any()):  # read as inputs that are always zero, their weights all pruned
            raise ValueError(
                f"the layer inputs are nonzero but {int(lost.sum())} of {lost.numel()} of "
                "them so small that their squares underflowed float32 in the Gram matrix "
                f"XᵀX (smallest sum of squares {float(self.sq[lost].min()):.3g}; inputs of "
                "magnitude below about 1e-19), which would count them as always zero and "
                "prune all their weights; rescale the calibration data")
        return self.gram * (2.0 / max(self.rows, 1))

    def underflowed(self) -> torch.Tensor:
        """The features whose inputs were nonzero (their float64 squares say so) but whose
        squares underflowed to 0 on the diagonal of the float32 Gram matrix (inputs below
        about 1e-19): the Hessian reads them as always zero. All ``False`` without it."""
        if self.gram is None:
            return torch.zeros_like(self.sq, dtype=torch.bool)
        return (torch.diagonal(self.gram) == 0) & (self.sq > 0)

    def observe(self, module: nn.Module, x: torch.Tensor) -> None:
        """Add one raw input ``x`` of ``module`` (a linear layer, GPT-2's ``Conv1D`` or a
        convolution; see :func:`record`)."""
        check_materialized("x", x)
        x = x.detach().float()
        if not isinstance(module, nn.modules.conv._ConvNd):
            self.add(x)
            return
        if x.dim() == module.weight.dim() - 1:  # an unbatched input, (C, H, W): one sample
            x = x.unsqueeze(0)  # (unfold and the channel dimension read it as a batch)
        if _unfoldable(module):
            self.add(_patches(module, x))
        else:  # only the squares: each channel's sum, shared by all its kernel positions
            w = module.weight
            per_channel = x.double().square().transpose(0, 1).reshape(x.shape[1], -1).sum(1)
            cols = per_channel.reshape(module.groups, w.shape[1])
            cols = cols.repeat_interleave(w[0, 0].numel(), dim=1)
            if module.groups > 1:  # (out, in/groups * k): each output sees its own group
                cols = cols.repeat_interleave(w.shape[0] // module.groups, dim=0)
            self.sq = self.sq + (cols if module.groups > 1 else cols[0])  # may broadcast
            self.rows += x.shape[0]


@contextlib.contextmanager
def record(layers: Mapping[str, nn.Module], *, gram: bool = False
           ) -> Iterator[dict[str, InputStats]]:
    """Accumulate the :class:`InputStats` of each layer's inputs while inside.

    Accepted layers: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored ``(in, out)``) and
    ``nn.Conv1d/2d/3d``. Each ``stats.sq`` broadcasts against ``weight.flatten(1)`` (the
    transposed weight for ``Conv1D``): shape ``(features,)``, or ``(out, in/groups · k)``
    for grouped convolutions. Convolutions are exact (unfolded patches) for ``Conv1d``/
    ``Conv2d`` with one group and zero padding; other convolutions share each channel's
    norm between its kernel positions and cannot give the Gram matrix.
    """
    _check_layers(layers)
    check_bool("gram", gram)  # before the loop below reads it
    for name, m in layers.items():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise ArgumentTypeError(f"layers[{name!r}] must be a Linear, Conv1D or Conv layer "
                                    f"with a weight, got {type(m).__name__}")
        # the sums would be kept on the meta device: statistics without values
        check_materialized(f"layers[{name!r}].weight", weight)
        if gram and isinstance(m, nn.modules.conv._ConvNd) and not _unfoldable(m):
            raise ValueError(f"layers[{name!r}]: the Gram matrix needs a Conv1d/Conv2d with "
                             f"groups=1 and zero padding, got {m!r}")
    stats = {n: InputStats(_width(m), gram=gram, device=m.weight.device)
             for n, m in layers.items()}
    with watch(layers, lambda n, x, _out: stats[n].observe(layers[n], x)):
        yield stats


def input_stats(
    model: nn.Module, layers: Mapping[str, nn.Module], data: Any, *, gram: bool = False
) -> dict[str, InputStats]:
    """The :class:`InputStats` of each layer over ``model`` run on ``data`` (see :func:`run`
    and :func:`record`). Raises ``ValueError`` naming the layers ``data`` never reached."""
    with record(layers, gram=gram) as stats:
        run(model, data)
    missing = [n for n, s in stats.items() if s.rows == 0]
    if missing:
        raise ValueError(f"data never reached these layers during the forward pass: {missing}")
    return stats


def _width(module: nn.Module) -> int:
    """How many input features the layer's weight multiplies (its columns, flattened)."""
    if isinstance(module, nn.Linear) or not isinstance(getattr(module, "weight", None),
                                                       torch.Tensor):
        return module.in_features  # also compiled layers, which store no dense weight
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight[0].numel()
    return module.weight.shape[0]  # GPT-2's Conv1D stores its weight as (in, out)


def _unfoldable(module: nn.modules.conv._ConvNd) -> bool:
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
        and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    )


def _patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution's input as rows of unfolded patches, ``(N · positions, C · k)``."""
    if isinstance(module, nn.Conv1d):  # a height-1 image
        x = x.unsqueeze(2)
        ks, dil, pad, st = ((1, *module.kernel_size), (1, *module.dilation),
                            (0, *module.padding), (1, *module.stride))
    else:
        ks, dil, pad, st = module.kernel_size, module.dilation, module.padding, module.stride
    cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # (N, C·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
