"""Dependency groups: the parameter slices that must shrink together when a channel goes.

Removing output channel ``c`` of a convolution also removes entry ``c`` of the BatchNorm
after it, input column ``c`` of every layer that reads it, and — across a residual
addition — channel ``c`` of every other branch added to it. :func:`dependency_groups`
traces the model with ``torch.fx`` and follows every tensor's channel axis through the
graph:

* a Conv / Linear / Embedding *opens* a channel space (its output channels); GPT-2's
  ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``) too;
* elementwise ops, activations (``transformers``' activation modules, e.g. GPT-2's and
  Phi's ``NewGELUActivation``, included), pooling, dropout and BatchNorm *pass it through*;
* ``a + b`` and ``a * b`` *join* the spaces of both operands (they must shrink together);
* ``torch.cat`` along the channel axis *concatenates* spaces (each keeps its offset);
* a depthwise convolution passes its input space through (its filters go with it);
* ``flatten`` (or ``x.view(x.size(0), -1)``, ``x.shape[0]`` too) → Linear spreads each
  channel over its ``H·W`` input columns;
* a Conv / Linear *reads* the space: its input columns belong to the group.

A space that reaches the model's output or input, or meets an op this tracer does not
know (attention, LayerNorm, ``view``, a grouped convolution …), is frozen: its channels
keep their width. So is one whose layer's weight is computed rather than held
(``weight_norm``, ``spectral_norm``): there are no rows of its own to cut. So is a
parameter used by two different spaces (a layer called twice), and an Embedding with
``max_norm`` (its rows are rescaled by their norm over all channels).
Tied parameters used consistently (an embedding tied to an output head) are one slice.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from sparsekit._checks import ArgumentTypeError, check_int, check_materialized, check_module
from sparsekit.targets import conv1d_type

__all__ = ["Group", "Slice", "check_channels", "check_group", "check_groups", "check_removed",
           "dependency_groups", "is_conv1d", "named_tensors", "trace"]


@dataclass(frozen=True)
class Slice:
    """The entries of one parameter or buffer that belong to a group's channels.

    Channel ``c`` of the group owns indices ``offset + c·repeat + j`` (``0 ≤ j < repeat``)
    along dimension ``dim`` of the tensor ``name``. ``role`` is ``"out"`` for the rows of
    a layer that writes the channel (and anything that passes it through: biases,
    BatchNorm, depthwise filters) and ``"in"`` for the columns of a layer that reads it.
    """

    name: str
    dim: int
    role: str
    offset: int = 0
    repeat: int = 1

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` owned by ``channels`` (a 1-D long tensor)."""
        spread = torch.arange(self.repeat, device=channels.device)
        return (self.offset + channels[:, None] * self.repeat + spread).flatten()


@dataclass(frozen=True)
class Group:
    """Channels that shrink together: ``channels`` of them, spread over ``slices``.

    ``name`` is the module that opens the space (the first writer), for reports and
    errors.
    """

    name: str
    channels: int
    slices: tuple[Slice, ...]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s parameters and buffers by every name (a tied one under each of its names):
    what the names of a group's slices refer to."""
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def check_groups(groups: object, model: nn.Module, name: str = "groups") -> list[Group]:
    """``groups`` (the argument ``name``) as a list, each :class:`Group` checked against
    ``model``: every slice names a parameter or buffer of it with the dimension and the
    channel extent it claims. Groups traced from another model would otherwise remove the
    wrong channels, none, or fail half-way through a change."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise ArgumentTypeError(f"{name} must be a sequence of Group (dependency_groups, "
                                f"transformer_groups), got {type(groups).__name__}")
    groups = list(groups)
    tensors = named_tensors(model)
    for i, group in enumerate(groups):
        check_group(f"{name}[{i}]", group)
        for s in group.slices:
            tensor = tensors.get(s.name)
            extent = s.offset + group.channels * s.repeat
            if tensor is None or not -tensor.dim() <= s.dim < tensor.dim() \
                    or tensor.shape[s.dim] < extent:
                found = ("no such parameter or buffer" if tensor is None
                         else f"its shape is {tuple(tensor.shape)}")
                raise ValueError(f"{name}[{i}] (opened by {group.name!r}) does not fit model: "
                                 f"it needs {extent} entries along dim {s.dim} of {s.name!r}, "
                                 f"{found} (groups of another model?)")
    return groups


def check_channels(name: str, group: Group, channels: object) -> torch.Tensor:
    """``channels`` (the argument ``name``: channels of ``group`` to remove) as a CPU long
    tensor, once it is a 1-D integer tensor of distinct indices in ``[0, group.channels)``.
    A bool mask in its place was read as the indices 0 and 1, an index outside the group
    was skipped without a sign (or cut another group's entries of a concatenation), and a
    repeated one was compensated twice."""
    if not isinstance(channels, torch.Tensor) or channels.dtype == torch.bool \
            or channels.is_floating_point() or channels.is_complex() or channels.dim() != 1:
        got = (f"a {channels.dim()}-D {channels.dtype} tensor"
               if isinstance(channels, torch.Tensor) else f"a {type(channels).__name__}")
        raise ArgumentTypeError(f"{name} must be a 1-D integer tensor of channel indices of "
                                f"group {group.name!r} (not a bool mask), got {got}")
    check_materialized(name, channels)
    index = channels.detach().cpu().long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= group.channels):
        raise ValueError(f"{name} must hold channel indices of group {group.name!r}: indices "
                         f"must lie in [0, {group.channels}), got {index.tolist()}")
    if index.unique().numel() != index.numel():
        raise ValueError(f"{name} must hold distinct channel indices of group {group.name!r}, "
                         f"got {index.tolist()}")
    return index


def check_removed(removed: object) -> list[tuple[Group, torch.Tensor]]:
    """``removed`` (the argument: ``(group, channels)`` pairs) as a list of pairs whose
    channels passed :func:`check_channels`, all checked before any is used. A mapping, a
    bare :class:`Group` or a pair of other things failed unpacking with a raw
    ``TypeError``."""
    if isinstance(removed, (Mapping, Group, str, torch.Tensor)) \
            or not isinstance(removed, Iterable):
        raise ArgumentTypeError(f"removed must be a sequence of (Group, channels) pairs, got "
                                f"{type(removed).__name__}")
    pairs = []
    for i, pair in enumerate(removed):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 \
                or not isinstance(pair[0], Group):
            raise ArgumentTypeError(f"removed[{i}] must be a (Group, channels) pair, got "
                                    f"{type(pair).__name__}")
        pairs.append((pair[0], check_channels(f"the channels removed of group {i}", *pair)))
    return pairs


def check_group(where: str, group: object) -> None:
    """Raise unless ``group`` (the argument ``where``) is a :class:`Group` whose own fields
    are ones a traced group has: ``channels`` an int ≥ 1, and every slice a :class:`Slice`
    with an int ``dim``, ``role`` ``"in"`` or ``"out"``, ``offset`` ≥ 0 and ``repeat`` ≥ 1.
    A hand-built group without them removed
    the wrong channels without a sign of it (a negative offset wraps around, a role other
    than ``"in"`` has no readers, so every channel looked removable) or failed inside
    PyTorch (``channels=0``, ``-1``, ``2.5``); anything else in its place failed with a raw
    ``AttributeError``."""
    if not isinstance(group, Group):
        raise ArgumentTypeError(f"{where} must be a Group, got {type(group).__name__}")
    check_int(f"{where}.channels", group.channels, minimum=1)
    if not isinstance(group.slices, tuple):
        raise ArgumentTypeError(f"{where}.slices must be a tuple of Slice, got "
                                f"{type(group.slices).__name__}")
    for j, s in enumerate(group.slices):
        at = f"{where}.slices[{j}]"
        if not isinstance(s, Slice):
            raise ArgumentTypeError(f"{at} must be a Slice, got {type(s).__name__}")
        if not isinstance(s.name, str):
            raise ArgumentTypeError(f"{at}.name must be a parameter or buffer name (a str), "
                                    f"got {s.name!r}")
        check_int(f"{at}.dim", s.dim)
        check_int(f"{at}.offset", s.offset, minimum=0)
        check_int(f"{at}.repeat", s.repeat, minimum=1)
        if s.role not in ("in", "out"):
            raise ValueError(f"{at}.role must be 'in' (a reader's columns) or 'out' (a "
                             f"writer's rows), got {s.role!r}")


class _Tracer(fx.Tracer):
    """``torch.fx.Tracer`` that remembers which submodule it is inside, for errors."""

    def __init__(self) -> None:
        super().__init__()
        self.path: list[str] = []
        self.failed_in: str | None = None  # the innermost submodule a trace error came from

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # transformers' activations and GPT-2's Conv1D: followed as one op (traced
        # through, their pow/addmm/view would freeze the channels they carry)
        return (_hf_activation(m) or is_conv1d(m)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.path.append(f"{self.path_of_module(m)} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path[-1]
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with ``torch.fx``, or a ``ValueError`` saying what stopped it and
    in which submodule (an :class:`ArgumentTypeError` for a ``model`` that is no
    ``nn.Module``: a function or a tensor)."""
    check_module("model", model)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError … by op
        where = f" in submodule {tracer.failed_in}" if tracer.failed_in else ""
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx to find its dependency "
            f"groups{where}: {type(err).__name__}: {err}. Data-dependent control flow and "
            "untraceable ops are not supported; prune a traceable submodule instead"
        ) from err
    return fx.GraphModule(model, graph, type(model).__name__)


def dependency_groups(model: nn.Module) -> list[Group]:
    """The groups of ``model`` whose channels can be removed, in graph order.

    Every group has at least one writer and one reader and no frozen channel; see the
    module docstring for how spaces are found and when they freeze. Raises ``ValueError``
    when the model cannot be traced.
    """
    graph = trace(model)
    follower = _Follower(graph)
    for node in graph.graph.nodes:
        follower.visit(node)
    return follower.groups()


# -- tracing ------------------------------------------------------------------------------

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.PReLU,
)
# pools by the number of spatial axes they pool: per channel only on a batched input of
# that many spatial axes (a 2-d pool of a Conv1d's (N, C, L) output reads it as unbatched
# and pools across its channels)
_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.hardswish,
    F.hardsigmoid, F.mish, F.dropout, torch.relu, torch.sigmoid, torch.tanh,
}
_POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
# tensor attributes that are no tensor (x.shape: see _Follower.shapes)
_VALUE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _hf_activation(module: nn.Module) -> bool:
    """Whether ``module`` is one of ``transformers``' parameter-free activation modules
    (``NewGELUActivation``, ``GELUActivation``, ``SiLUActivation`` …): elementwise."""
    return (type(module).__module__ == "transformers.activations"
            and not any(True for _ in module.parameters()))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D`` (:func:`~sparsekit.targets.conv1d_type`):
    ``x @ weight + bias`` with the weight stored ``(in_features, out_features)``."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


_JOIN_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, operator.sub,
                   torch.add, torch.mul, torch.sub}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half",
                        "to", "detach"}
_JOIN_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_"}
_READ_ONLY_METHODS = {"dim"}


@dataclass
class _Space:
    """One channel space while tracing (a union–find node)."""

    size: int
    name: str
    parent: int
    frozen: bool = False
    slices: list[Slice] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    """Where a value's channels come from: ``segments`` of ``(space, repeat)`` along axis
    ``dim`` (1 for convolution outputs, -1 for Linear outputs). ``spread`` multiplies each
    repeat after a ``flatten``; ``None`` until a Linear reveals it (its ``in_features``).
    ``rank`` is the value's number of axes where known (a convolution's output)."""

    segments: tuple[tuple[int, int], ...]
    dim: int
    spread: int | None = 1
    rank: int | None = None


class _Follower:
    """Walks the graph once, following every value's channel layout."""

    def __init__(self, graph: fx.GraphModule) -> None:
        self.graph = graph
        self.modules = dict(graph.named_modules())
        self.spaces: list[_Space] = []
        self.layouts: dict[fx.Node, _Layout] = {}
        # the whole shape of a followed value (x.shape, x.size()) -> that value: reading its
        # channel count made a number that a removal changed (h * h.shape[-1] ** -0.5)
        self.shapes: dict[fx.Node, fx.Node] = {}

    # -- union–find ---------------------------------------------------------------------
    def new_space(self, size: int, name: str, *, frozen: bool = False) -> int:
        self.spaces.append(_Space(size, name, len(self.spaces), frozen))
        return len(self.spaces) - 1

    def root(self, i: int) -> int:
        while self.spaces[i].parent != i:
            self.spaces[i].parent = self.spaces[self.spaces[i].parent].parent
            i = self.spaces[i].parent
        return i

    def join(self, a: int, b: int) -> None:
        a, b = sorted((self.root(a), self.root(b)))  # the earliest space names the group
        if a != b:
            self.spaces[b].parent = a
            self.spaces[a].frozen |= self.spaces[b].frozen
            self.spaces[a].slices += self.spaces[b].slices

    def freeze(self, *values: Any) -> None:
        """Freeze every space reachable from ``values`` (nodes, or containers of them; a
        whole shape freezes its value's)."""
        for v in _nodes(values):
            layout = self.layouts.get(self.shapes.get(v, v))
            if layout is not None:
                for sid, _ in layout.segments:
                    self.spaces[self.root(sid)].frozen = True

    def attach(self, layout: _Layout, name: str, dim: int, role: str) -> None:
        """Record that tensor ``name`` follows ``layout`` along ``dim``."""
        offset = 0
        spread = layout.spread or 1
        for sid, repeat in layout.segments:
            self.spaces[self.root(sid)].slices.append(
                Slice(name, dim, role, offset, repeat * spread))
            offset += self.spaces[sid].size * repeat * spread

    def width(self, layout: _Layout) -> int:
        return sum(self.spaces[s].size * r for s, r in layout.segments)

    # -- nodes --------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        if node.op == "call_module":
            out = self.call_module(node, self.modules[node.target])
        elif node.op == "call_function":
            out = self.call_function(node)
        elif node.op == "call_method":
            out = self.call_method(node)
        else:  # placeholder, get_attr, output: nothing to follow
            self.freeze(node.args, node.kwargs)
            out = None
        if out is not None:
            self.layouts[node] = out

    def input_layout(self, node: fx.Node) -> _Layout | None:
        """The layout of the node's first argument, or of its keyword ``input``."""
        arg = node.args[0] if node.args else node.kwargs.get("input")
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def call_module(self, node: fx.Node, module: nn.Module) -> _Layout | None:
        layout = self.input_layout(node)
        prefix = f"{node.target}."
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(node, module, layout, prefix)
        if isinstance(module, nn.Linear):
            self.read(node, layout, module.in_features, prefix, dim=-1)
            return self.write(module.out_features, str(node.target), prefix, dim=-1)
        if is_conv1d(module):  # the weight is (in, out): columns read, rows written
            in_features, out_features = module.weight.shape
            self.read(node, layout, in_features, prefix, dim=-1, weight_dim=0)
            return self.write(out_features, str(node.target), prefix, dim=-1, weight_dim=1)
        if isinstance(module, nn.Embedding):
            self.freeze(node.args[1:], node.kwargs)
            # max_norm rescales each looked-up row by its norm over every channel: one
            # removed (even unread) changed the others' values
            sid = self.new_space(module.embedding_dim, str(node.target),
                                 frozen=module.max_norm is not None)
            self.spaces[sid].slices.append(Slice(f"{prefix}weight", 1, "out"))
            return _Layout(((sid, 1),), -1)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # channels lie on axis 1; a Linear output (axis -1) only for BatchNorm1d of (N, C).
            # A width other than the space's normalises another axis (BatchNorm1d(L) of a
            # Linear's (N, L, C) output): attached to the space, shrink cut it to a model
            # that no longer ran
            # (L == C passes that check. With weights or statistics the shrunk model then
            # fails at its first call; without either, it would have run, silently wrong:
            # such a BatchNorm1d of a Linear output freezes its space)
            stateless = module.weight is None and module.running_mean is None
            if layout is None or layout.spread != 1 or (layout.dim != 1 and (
                    not isinstance(module, nn.BatchNorm1d) or stateless)) \
                    or module.num_features != self.width(layout):
                self.freeze(node.args)
                return None
            for n in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, n, None) is not None:
                    self.attach(layout, prefix + n, 0, "out")
            return layout
        if (isinstance(module, _ELEMENTWISE_MODULES) and not list(module.parameters())
                or _hf_activation(module)):
            self.freeze(node.args[1:], node.kwargs)
            return layout
        pool = next((n for kind, n in _POOL_MODULES.items() if isinstance(module, kind)), None)
        if pool is not None and self.pools_channels(layout, pool):
            return layout
        if isinstance(module, nn.Flatten):
            return self.flatten(layout, module.start_dim, module.end_dim)
        self.freeze(node.args, node.kwargs)  # an op that may mix channels
        return None

    def conv(self, node: fx.Node, module: nn.modules.conv._ConvNd, layout: _Layout | None,
             prefix: str) -> _Layout | None:
        name = str(node.target)
        rank = 2 + len(module.kernel_size)  # batched: (N, C, *spatial)
        if module.groups == 1:
            self.read(node, layout, module.in_channels, prefix, dim=1)
            return self.write(module.out_channels, name, prefix, dim=1, rank=rank)
        if module.groups == module.in_channels and layout is not None and layout.dim == 1 \
                and layout.spread == 1 and self.width(layout) == module.in_channels:
            # depthwise: output channel c·k + j is computed from input channel c alone
            k = module.out_channels // module.groups
            out = _Layout(tuple((s, r * k) for s, r in layout.segments), 1, rank=layout.rank)
            self.attach(out, prefix + "weight", 0, "out")
            if module.bias is not None:
                self.attach(out, prefix + "bias", 0, "out")
            return out
        # a grouped convolution ties channels within groups: keep both sides whole
        self.freeze(node.args)
        return _Layout(((self.new_space(module.out_channels, name, frozen=True), 1),), 1,
                       rank=rank)

    def read(self, node: fx.Node, layout: _Layout | None, width: int, prefix: str,
             dim: int, weight_dim: int = 1) -> None:
        """A layer reads ``layout`` through its input columns (weight dim ``weight_dim``:
        1, or 0 for a ``Conv1D``)."""
        self.freeze(node.args[1:], node.kwargs)
        if layout is None:
            return
        if layout.spread is None and dim == -1:  # flatten → Linear: H·W columns per channel
            base = self.width(layout)
            if base and width % base == 0:
                layout = _Layout(layout.segments, layout.dim, width // base)
        if layout.dim != dim or layout.spread is None or (
                self.width(layout) * layout.spread != width):
            self.freeze(node.args)
            return
        self.attach(layout, prefix + "weight", weight_dim, "in")

    def write(self, size: int, name: str, prefix: str, dim: int,
              weight_dim: int = 0, rank: int | None = None) -> _Layout:
        """A layer writes a new space of ``size`` channels (weight rows, or a ``Conv1D``'s
        columns: ``weight_dim``, and bias)."""
        sid = self.new_space(size, name)
        layout = _Layout(((sid, 1),), dim, rank=rank)
        self.attach(layout, prefix + "weight", weight_dim, "out")
        module = self.modules[name]
        if getattr(module, "bias", None) is not None:
            self.attach(layout, prefix + "bias", 0, "out")
        return layout

    def flatten(self, layout: _Layout | None, start: int, end: int) -> _Layout | None:
        if layout is None or layout.dim != 1 or start != 1 or end != -1:
            if layout is not None:
                for sid, _ in layout.segments:
                    self.spaces[self.root(sid)].frozen = True
            return None
        return _Layout(layout.segments, -1, None)

    def call_function(self, node: fx.Node) -> _Layout | None:
        fn = node.target
        layout = self.input_layout(node)
        if fn in _ELEMENTWISE_FUNCTIONS:
            self.freeze(node.args[1:], node.kwargs)
            return layout
        if fn in _POOL_FUNCTIONS and self.pools_channels(layout, _POOL_FUNCTIONS[fn]):
            return layout
        if fn in _JOIN_FUNCTIONS:
            return self.join_all(node, _operands(node))
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(layout, start, end)
        if fn is torch.cat:
            return self.cat(node)
        if fn is getattr and isinstance(node.args[0], fx.Node):
            if node.args[1] == "shape":
                self.shapes[node] = node.args[0]
            if node.args[1] not in _VALUE_ATTRIBUTES:  # x.T, x.mT, x.data: the tensor itself
                self.freeze(node.args[0])
            return None
        if fn is operator.getitem and node.args[0] in self.shapes:
            self.read_shape(self.shapes[node.args[0]], node.args[1])
            return None
        self.freeze(node.args, node.kwargs)
        return None

    def pools_channels(self, layout: _Layout | None, spatial: int) -> bool:
        """Whether a pool of ``spatial`` axes pools each channel of ``layout`` on its own:
        channels on axis 1 of a batched value of ``2 + spatial`` axes."""
        return layout is not None and layout.dim == 1 and layout.rank == 2 + spatial

    def read_shape(self, value: fx.Node, index: Any) -> None:
        """``value.shape[index]`` (or ``value.size(index)``): freeze ``value``'s channels
        unless the index reads only the batch axis, or a convolution output's spatial axes
        (``x.shape[2:]``, e.g. an interpolation's size)."""
        layout = self.layouts.get(value)
        if layout is None or index == 0:
            return
        if isinstance(index, slice) and layout.dim == 1 and isinstance(index.start, int) \
                and index.start >= 2 and index.step in (None, 1):
            return
        self.freeze(value)

    def call_method(self, node: fx.Node) -> _Layout | None:
        method = node.target
        layout = self.input_layout(node)
        if method == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim is None:
                self.shapes[node] = node.args[0]
            else:
                self.read_shape(node.args[0], dim)
            return None
        if method in _READ_ONLY_METHODS:
            return None
        if method in _ELEMENTWISE_METHODS:
            self.freeze(node.args[1:], node.kwargs)
            return layout
        if method in _JOIN_METHODS:
            return self.join_all(node, _operands(node))
        if method == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(layout, start, end)
        if method in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1 \
                and not node.kwargs and _is_batch_size(node.args[1], node.args[0]):
            return self.flatten(layout, 1, -1)  # x.view(x.size(0), -1): a flatten from axis 1
        self.freeze(node.args, node.kwargs)
        return None

    def join_all(self, node: fx.Node, operands: list[fx.Node]) -> _Layout | None:
        """An elementwise op of tensors: the operands' channels must shrink together."""
        layouts = [self.layouts.get(a) for a in operands]
        known = [x for x in layouts if x is not None]
        if not known:
            return None
        first = known[0]
        if len(known) < len(layouts) or any(not self.same_shape(first, x) for x in known):
            self.freeze(operands)  # an operand we cannot follow (an input, a view …)
            return None
        for other in known[1:]:
            for (a, _), (b, _) in zip(first.segments, other.segments):
                self.join(a, b)
        return first

    def same_shape(self, a: _Layout, b: _Layout) -> bool:
        return a.dim == b.dim and a.spread == b.spread and len(a.segments) == len(
            b.segments) and all(ra == rb and self.spaces[sa].size == self.spaces[sb].size
                                for (sa, ra), (sb, rb) in zip(a.segments, b.segments))

    def cat(self, node: fx.Node) -> _Layout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        layouts = [self.layouts.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if not layouts or any(x is None or x.dim != 1 or x.spread != 1 for x in layouts) \
                or dim != 1:
            self.freeze(node.args, node.kwargs)
            return None
        ranks = {x.rank for x in layouts}
        return _Layout(tuple(seg for x in layouts for seg in x.segments), 1,
                       rank=ranks.pop() if len(ranks) == 1 else None)

    # -- result -------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        roots = {self.root(i) for i in range(len(self.spaces))}
        known = self.tensor_names()
        for r in roots:  # a parametrized weight (weight_norm, spectral_norm) is computed
            if any(s.name not in known for s in self.spaces[r].slices):
                self.spaces[r].frozen = True  # from others: no rows of its own to cut
        self.freeze_overlaps(roots, known)
        out = []
        for r in sorted(roots):
            space = self.spaces[r]
            roles = {s.role for s in space.slices}
            if space.frozen or roles != {"in", "out"}:
                continue
            unique = tuple(dict.fromkeys(space.slices))  # a tied weight seen twice is one slice
            out.append(Group(space.name, space.size, unique))
        return out

    def tensor_names(self) -> set[str]:
        """The names of the model's parameters and buffers (every name of a tied one)."""
        return {n for named in (self.graph.named_parameters(remove_duplicate=False),
                                self.graph.named_buffers(remove_duplicate=False))
                for n, _ in named}

    def freeze_overlaps(self, roots: Iterable[int], known: set[str]) -> None:
        """Freeze spaces whose slices of one tensor overlap another space's (a layer
        called twice writes two spaces through the same rows; a weight tied across spaces).
        Only tensors in ``known`` count: a computed weight is a new tensor on every read."""
        seen: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for r in roots:
            for s in set(self.spaces[r].slices):
                if s.name not in known:
                    continue
                span = (s.offset, s.offset + self.spaces[r].size * s.repeat, r)
                owner, _, attr = s.name.rpartition(".")
                tensor = getattr(self.graph.get_submodule(owner), attr)  # tied: one tensor
                seen.setdefault((id(tensor), s.dim), []).append(span)
        for spans in seen.values():
            for i, (lo, hi, r) in enumerate(spans):
                for lo2, hi2, r2 in spans[i + 1:]:
                    if r != r2 and lo < hi2 and lo2 < hi:
                        self.spaces[r].frozen = self.spaces[r2].frozen = True


def _is_batch_size(size: Any, x: Any) -> bool:
    """Whether ``size`` is the node of ``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]``: then
    ``x.view(size, -1)`` is a flatten from axis 1. Any other first size — a constant such as
    ``x.reshape(4, -1)`` of a batch of 2 — moves channels between rows, and was followed as
    a flatten: shrink removed columns that belonged to other channels."""
    if not isinstance(size, fx.Node):
        return False
    if size.op == "call_method" and size.target == "size":
        return size.args[:1] == (x,) and (size.args[1:] == (0,) or size.kwargs == {"dim": 0})
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] == 0:
        whole = size.args[0]
        return isinstance(whole, fx.Node) and whole.args[:1] == (x,) and (
            whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1
            and not whole.kwargs
            or whole.op == "call_function" and whole.target is getattr
            and whole.args[1:] == ("shape",))
    return False


def _operands(node: fx.Node) -> list[fx.Node]:
    """The node's tensor operands, positional or keyword (``torch.add(h, other=g)``)."""
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _nodes(values: Any) -> Iterable[fx.Node]:
    if isinstance(values, fx.Node):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _nodes(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from _nodes(v)
