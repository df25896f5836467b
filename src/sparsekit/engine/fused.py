"""Fused projections: linear layers that read the same input run as one kernel call.

A transformer block multiplies one hidden state by several weights: LLaMA's, Mistral's
and Qwen2's ``q_proj``, ``k_proj`` and ``v_proj``, and ``gate_proj`` and ``up_proj``. At
decode time each of these calls is a few microseconds of launch overhead around a matrix
that streams from memory; stacking the weights into one matrix makes them one call that
streams it once. :func:`shared_inputs` finds such groups generically, from the example
forward pass (layers called with the same input tensor object), so no model code is
patched.

A fused group is one :class:`FusedProjections` (the stacked weight as a
:class:`~sparsekit.engine.compiled_linear.CompiledLinear`, in one format over all its
rows, or as one :class:`~sparsekit.engine.activation_linear.ActivationSparseLinear` where
the members share an input threshold: one thresholding and one activation-sparse kernel
call for q/k/v, one for gate/up) and one :class:`FusedLinear` per original layer, installed
in its place. The first
member called with a new input runs the stacked product and keeps the split outputs; the
others return their slice of it when called with that same tensor (same object, not
modified since), and the kept outputs are dropped once every member has taken its own.
Called with another input, or a second time, a member runs the product again, so the
outputs are those of the original layers (up to float rounding). One exception: under
``torch.inference_mode`` tensors have no version counter, so an input changed in place
between two members' calls of one round is not noticed (the second member returns its
slice of the product of the old values). Because the check is a Python
identity test on the traced tensors, ``torch.export`` and ``torch.compile(fullgraph=True)``
trace a fused model into one kernel call per group. A fused model is not meant to be run
from several threads at once.

Whether a group fuses is decided by timing, so two compiles of one model may fuse
differently; :func:`groups` names a model's groups (:func:`sparsekit.save` records them)
and :func:`conform` fuses or separates a compiled model's layers as a checkpoint's were,
so that it loads into either.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_fits_memory,
    check_int,
    check_module,
    layer_input_error,
    model_errors,
)
from sparsekit.engine.activation_linear import ActivationSparseLinear, input_dtype
from sparsekit.engine.compiled_linear import CompiledLinear, dense_linear
from sparsekit.observe import inference
from sparsekit.quantize import attach_scales, attached_scales

__all__ = ["FusedLinear", "FusedProjections", "conform", "groups", "placeholder", "shared_inputs",
           "stack"]


def shared_inputs(model: nn.Module, inputs: tuple[object, ...]) -> list[list[str]]:
    """Groups of ``nn.Linear`` layers of ``model`` (names, in call order) that read the same
    input tensor in the forward pass ``model(*inputs)`` and can be stacked: two layers or
    more, each called once, of the same ``in_features``, dtype, device and bias presence,
    the input not changed in place between their calls.
    A layer reachable under two names is never grouped, nor one called with its input by
    keyword (``layer(input=x)``: no positional input to compare)."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, (tuple, list)):
        raise ArgumentTypeError(f"inputs must be a tuple of the model's inputs (called as "
                                f"model(*inputs)), got {type(inputs).__name__}")
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    layers = {ns[0]: m for m in model.modules() if type(m) is nn.Linear
              for ns in [names[id(m)]] if len(ns) == 1}
    # the tensors are kept (their ids stay unique), with their version: an input changed
    # in place between two members' calls (q(x); x.mul_(2); k(x)) is no shared input, and
    # under torch.inference_mode (no version counters) the fused group had returned k's
    # slice of the old x
    calls: list[tuple[str, torch.Tensor | None, int | None]] = []

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            # by keyword, args is empty: args[0] raised an IndexError that blamed the inputs
            x = args[0] if args else None
            versioned = isinstance(x, torch.Tensor) and not x.is_inference()
            calls.append((name, x, x._version if versioned else None))
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    try:
        with model_errors("example_inputs", "the model cannot run on them"), inference(model):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    counts: dict[str, int] = {}
    for name, _, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    by_input: dict[tuple[int, int | None], list[str]] = {}
    for name, x, version in calls:
        if counts[name] == 1 and x is not None:
            by_input.setdefault((id(x), version), []).append(name)
    return [group for group in by_input.values()
            if len(group) > 1 and len({_signature(layers[n]) for n in group}) == 1]


def _signature(layer: nn.Linear) -> tuple[object, ...]:
    weight = layer.weight
    scales = attached_scales(layer)
    return (layer.in_features, weight.dtype, weight.device, layer.bias is not None,
            None if scales is None else tuple(scales.shape[1:]))


def stack(layers: Sequence[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose weight (and bias) rows are those of ``layers`` in order, with
    their int8 scales (:func:`sparsekit.quantize.attach_scales`) stacked alike."""
    if isinstance(layers, str) or not isinstance(layers, (Sequence, nn.ModuleList)):
        raise ArgumentTypeError(f"layers must be a non-empty sequence of nn.Linear layers, got "
                                f"{type(layers).__name__}")
    if not len(layers):
        raise ValueError("layers must be a non-empty sequence of nn.Linear layers, got none")
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Linear):
            raise ArgumentTypeError(f"layers[{i}] must be an nn.Linear, got "
                                    f"{type(layer).__name__}")
    if len({_signature(layer) for layer in layers}) != 1:
        raise ValueError("layers must share in_features, dtype, device, bias presence and "
                         "int8 scales (none, per row or their number of groups), got "
                         f"{[_signature(layer) for layer in layers]}")
    weight = torch.cat([layer.weight.detach() for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([la.bias.detach() for la in layers])
    stacked = dense_linear(weight, bias)
    if attached_scales(layers[0]) is not None:
        attach_scales(stacked, torch.cat([attached_scales(layer) for layer in layers]))
    return stacked


class FusedProjections(nn.Module):
    """The stacked weight of a group of projections, ``linear`` (a compiled or an
    activation-sparse layer), whose output splits into ``sizes`` columns, one block per
    member (:meth:`members`)."""

    def __init__(self, linear: CompiledLinear | ActivationSparseLinear,
                 sizes: Sequence[int]) -> None:
        super().__init__()
        if not isinstance(linear, (CompiledLinear, ActivationSparseLinear)):
            raise ArgumentTypeError("linear must be a CompiledLinear or an "
                                    f"ActivationSparseLinear, got {type(linear).__name__}")
        sizes = _checked_sizes(sizes)
        if sum(sizes) != linear.out_features:
            raise ValueError(
                f"sizes must be two ints ≥ 1 or more summing to out_features="
                f"{linear.out_features}, got {sizes!r}"
            )
        self.linear = linear
        self.sizes = sizes
        self.__dict__["_kept"] = None  # [input, its version, outputs, members served]

    def members(self) -> list[FusedLinear]:
        """One :class:`FusedLinear` per block of rows; the first owns this module (its
        ``state_dict`` holds the stacked weight), the others refer to it."""
        return [FusedLinear(self, i) for i in range(len(self.sizes))]

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s output for ``x``: its block of the stacked product, computed
        once for all members."""
        # checked here, not in the members' forward, which pass their own index: a bad one
        # raised an IndexError after marking a member that does not exist as served, so the
        # kept outputs were never dropped
        if type(index) is not int or not 0 <= index < len(self.sizes):
            raise ValueError(f"index must be an int in [0, {len(self.sizes)}), got {index!r}")
        return self._output(x, index)

    def _output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise layer_input_error(x, self.linear.in_features)
        # Traced graphs have no in-place surprises; inference tensors (torch.inference_mode)
        # have no version counter, so for them the same object is taken as the same input
        # within one round of the members' calls. A member called again starts a new round:
        # a static input buffer refilled in place between two steps, one of which called
        # only this member, had returned that step's kept output.
        versioned = not torch.compiler.is_compiling() and not x.is_inference()
        version = x._version if versioned else 0
        kept = self.__dict__["_kept"]
        if kept is None or kept[0] is not x or kept[1] != version or kept[3] >> index & 1:
            # split_with_sizes, not Tensor.split: the Python wrapper of split costs more than
            # the three views it makes (4.5 against 2 µs at batch 1)
            kept = [x, version, self.linear(x).split_with_sizes(self.sizes, -1), 0]
            self.__dict__["_kept"] = kept
        kept[3] |= 1 << index
        if kept[3] == (1 << len(self.sizes)) - 1:  # every member served: keep nothing
            self.__dict__["_kept"] = None
        return kept[2][index].contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every member's output for ``x``."""
        return tuple(self._output(x, i) for i in range(len(self.sizes)))

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_kept": None}  # copies carry no kept outputs

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to()``, ``.double()``, ...: the kept outputs of the old weights are dropped."""
        self.__dict__["_kept"] = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # the kept outputs are the old weights': a member called after the load with the
        # input of one called before it returned them
        self.__dict__["_kept"] = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class FusedLinear(nn.Module):
    """One original ``nn.Linear`` of a fused group: rows ``[start, start + out_features)``
    of its :class:`FusedProjections`.

    Member 0 holds the group as its child ``group`` (so the stacked weight is saved once,
    under its name); the others refer to it without registering it. :meth:`to_linear`
    gives back the original layer's weight and bias.
    """

    def __init__(self, group: FusedProjections, index: int) -> None:
        super().__init__()
        if not isinstance(group, FusedProjections):
            raise ArgumentTypeError(f"group must be FusedProjections, got "
                                    f"{type(group).__name__}")
        check_int("index", index)  # a bool is not an index
        if not 0 <= index < len(group.sizes):
            raise ValueError(f"index must be an int in [0, {len(group.sizes)}), got {index!r}")
        if index == 0:
            self.group = group
        else:
            self.__dict__["group"] = group
        self.__dict__["_group"] = group  # the hot path skips nn.Module.__getattr__
        self.index = int(index)  # a NumPy int is checked by output() as a Python one
        self.in_features = group.linear.in_features
        self.out_features = group.sizes[index]
        self.start = sum(group.sizes[:index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group._output(x, self.index)

    def to_linear(self) -> nn.Linear:
        """The original layer: an ``nn.Linear`` with this member's rows of the weight and bias
        (and of the int8 scales an activation-sparse group attaches to its layer)."""
        whole = self._group.linear.to_module()
        rows = slice(self.start, self.start + self.out_features)
        bias = whole.bias
        linear = dense_linear(whole.weight.detach()[rows],
                              None if bias is None else bias.detach()[rows])
        scales = attached_scales(whole)
        if scales is not None:
            attach_scales(linear, scales[rows])
        return linear

    to_module = to_linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rows {self.start}..{self.start + self.out_features} of a fused group")


def groups(model: nn.Module) -> list[list[str]]:
    """The member names of each fused group of ``model``, in member order (the first holds
    the stacked weight). ``ValueError`` for a group whose first member is no longer in the
    model (replaced, e.g. by its ``to_linear()``): the others still compute from the stacked
    weight, which is then in no state dict (a save had dropped their weights silently)."""
    check_module("model", model)
    found: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FusedLinear):
            found.setdefault(id(module._group), {}).setdefault(module.index, name)
    for members in found.values():
        if 0 not in members:
            raise ValueError(
                f"model: the fused group of {sorted(members.values())} lost its first member, "
                "which holds the stacked weight they compute from (replaced since compile?); "
                "accepted: a model whose fused groups are whole — replace every member (e.g. "
                "sparsekit.engine.decompile(model)) or none")
    return [[members[i] for i in sorted(members)] for members in found.values()]


def placeholder(in_features: int, sizes: Sequence[int], bias: bool,
                dtype: torch.dtype) -> list[FusedLinear]:
    """The members of a fused group of ``sizes`` rows over ``in_features`` inputs whose
    stacked layer is a zero dense :class:`CompiledLinear`: a skeleton for a state to load
    into (loading installs the state's format). Every argument is checked first: a negative
    width, a float size or an integer dtype failed inside PyTorch, and ``bias="no"`` made a
    bias."""
    check_int("in_features", in_features, minimum=0)
    sizes = _checked_sizes(sizes)
    check_bool("bias", bias)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ArgumentTypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    check_fits_memory(in_features * sum(sizes) * dtype.itemsize,
                      f"in_features={in_features} and sizes={sizes} make a stacked weight of",
                      "accepted: the sizes of a fused group of this model")
    stacked = nn.Linear(in_features, sum(sizes), bias=bias, dtype=dtype)
    with torch.no_grad():
        stacked.weight.zero_()
    return FusedProjections(CompiledLinear.from_linear(stacked), sizes).members()


def _checked_sizes(sizes: object) -> list[int]:
    """``sizes`` as a list, once checked to be two ints ≥ 1 or more (a bool is no size)."""
    if isinstance(sizes, str) or not isinstance(sizes, Sequence):
        raise ArgumentTypeError(f"sizes must be a sequence of ints, got {sizes!r}")
    for i, size in enumerate(sizes):
        check_int(f"sizes[{i}]", size, minimum=1)
    if len(sizes) < 2:
        raise ValueError(f"sizes must be two ints ≥ 1 or more (one per member), got "
                         f"{list(sizes)!r}")
    return list(sizes)


def conform(model: nn.Module, keys: Collection[str],
            saved: Sequence[Sequence[str]]) -> Callable[[], None]:
    """Fuse and separate the compiled layers of ``model`` as those of the model whose state
    has ``keys`` were, whose fused groups were ``saved`` (:func:`groups`); return the
    function that puts the replaced modules back.

    A group of ``model`` whose stacked weight the state lacks, while it holds its members'
    own entries, becomes separate compiled layers; a ``saved`` group whose members
    ``model`` holds apart becomes one (:func:`placeholder`). Either way the state's
    tensors then decide every format, as for any compiled layer.

    A ``saved`` group must name two layers or more, each in no other group, each its own
    layer (not one shared under several names, which fusing would untie) and all of one
    ``in_features`` and bias presence, as :func:`shared_inputs` groups them; otherwise a
    ``ValueError`` names it and ``model`` is left as it was. A layer named twice replaced
    the member holding the stacked weight, and layers of another width got a group over
    the first one's."""
    check_module("model", model)
    replaced: list[tuple[str, nn.Module]] = []

    def put(name: str, new: nn.Module) -> None:
        replaced.append((name, model.get_submodule(name)))
        model.set_submodule(name, new)

    def undo() -> None:
        for name, old in reversed(replaced):
            model.set_submodule(name, old)

    stored = {key.rpartition(".")[0] for key in keys}
    claimed: set[str] = set()  # the names of the saved groups seen so far
    try:
        for members in groups(model):
            if any(s.startswith(f"{members[0]}.group.") for s in stored):
                continue
            if any(s == m or s.startswith(f"{m}.") for m in members for s in stored):
                for name in members:
                    put(name, CompiledLinear.from_linear(model.get_submodule(name).to_linear()))
        paths: dict[int, int] = {}  # how many names reach each module
        for _, module in model.named_modules(remove_duplicate=False):
            paths[id(module)] = paths.get(id(module), 0) + 1
        for members in saved:
            if isinstance(members, str) or not isinstance(members, Sequence) or len(
                    members) < 2 or not all(isinstance(name, str) for name in members):
                raise ValueError(f"a fused group of the saved model must name two layers or "
                                 f"more, got {members!r:.100}")
            if len(set(members)) != len(members) or claimed.intersection(members):
                raise ValueError(f"a fused group of the saved model, {list(members)}, names a "
                                 "layer twice, or one of another group")
            claimed.update(members)
            try:
                layers = [model.get_submodule(name) for name in members]
            except AttributeError as err:
                raise ValueError(f"a fused group of the saved model, {members}, names no layer "
                                 f"of this one: {err}") from None
            if not all(hasattr(layer, "in_features") and hasattr(layer, "out_features")
                       for layer in layers):
                raise ValueError(f"a fused group of the saved model, {members}, names layers "
                                 "that are no linear layers here")
            if any(isinstance(layer, FusedLinear) for layer in layers):
                continue
            if any(paths.get(id(layer), 0) > 1 for layer in layers):
                raise ValueError(f"a fused group of the saved model, {list(members)}, names a "
                                 "layer that this model shares under several names; a fused "
                                 "group's layers are each its own")
            if len({(layer.in_features, getattr(layer, "bias", None) is not None)
                    for layer in layers}) != 1:
                raise ValueError(f"a fused group of the saved model, {list(members)}, names "
                                 "layers of different in_features or bias presence here, "
                                 "which one stacked weight cannot hold")
            bias = getattr(layers[0], "bias", None)  # the stacked bias takes its dtype
            sizes = [layer.out_features for layer in layers]
            # without a bias, the dtype the member takes (a bf16 model's bias-free q/k/v
            # were a float32 group, which refused the model's bf16 inputs)
            dtype = input_dtype(layers[0]) if bias is None else bias.dtype
            for name, member in zip(members, placeholder(layers[0].in_features, sizes,
                                                         bias is not None, dtype), strict=True):
                put(name, member)
    except BaseException:
        undo()
        raise
    return undo
