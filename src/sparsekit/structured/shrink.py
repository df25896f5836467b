"""shrink(): masked channels become a physically smaller dense model with the same outputs.

A channel whose every reader column is masked cannot reach the output, whatever its
writer computes; dropping it — writer rows, biases, BatchNorm entries, reader columns,
across every branch of its dependency group — leaves the outputs unchanged (up to float
rounding of the shorter sums). That is the whole rule: ``pattern="channel"`` masks exactly
such channels, and training-time penalties that drive a group's weights to zero make
them so.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_int,
    check_materialized,
    check_materialized_module,
    check_module,
)
from sparsekit.masks import check_mask, one_mask
from sparsekit.quantize import SCALE_NAME, attached_scales, is_grouped
from sparsekit.structured.compensate import fold_means, reader_means, with_biases
from sparsekit.structured.dependency import (
    Group,
    check_groups,
    check_removed,
    dependency_groups,
    is_conv1d,
    named_tensors,
)
from sparsekit.structured.importance import check_round_to, rounding_step

__all__ = ["check_removal", "cut", "remove_channels", "removable_channels", "shrink"]

MaskTable = Mapping[str, torch.Tensor]


def shrink(model: nn.Module, masks: object = None, *, groups: Sequence[Group] | None = None,
           round_to: int = 1, compensate: Any = None) -> nn.Module:
    """A new, smaller dense copy of ``model`` without the channels ``masks`` cut off.

    ``masks`` is a :class:`~sparsekit.MaskSet` or a ``{parameter name: bool tensor}``
    dict (``True`` keeps); with ``None`` the weights' own zeros are the mask (for groups
    a regulariser drove to zero). Several names of one tied tensor must carry equal masks
    (a tensor has one mask; differing ones are a ``ValueError`` naming both). A channel
    goes when all of its reader columns are masked (see :func:`removable_channels`); each
    group keeps at least one channel. The copy carries the masks (masked entries are
    zero), so it computes what the masked model computes, up to float rounding. The
    model itself is not changed; layer attributes (``out_channels``, ``in_features``,
    ``num_features`` …) follow the new shapes.

    ``round_to`` keeps enough of the removable channels (inert: their reader columns are
    zero) that every group's kept count is a multiple of it, or its full width, the
    widths dense kernels run fastest (see
    :func:`~sparsekit.structured.importance.rounding_step`).

    ``compensate`` — calibration data in the forms of :func:`~sparsekit.observe.batches`
    — applies FLAP's bias compensation (:mod:`sparsekit.structured.compensate`): each
    removed channel's mean contribution over that data, measured on ``model`` before the
    masks act, is added to its readers' biases (a reader without one gets one). This is
    the one intended change of outputs. It needs the weights before masking: compute the
    masks with :func:`sparsekit.prune.compute_masks` and shrink the unmasked model.

    ``groups`` defaults to :func:`~sparsekit.structured.dependency_groups` of ``model``;
    for a transformer pass
    :func:`~sparsekit.structured.transformer.transformer_groups` (its ``config`` is not
    updated: :func:`sparsekit.llm.prune_structured` does that). Raises ``ValueError`` for
    masks that do not fit the model, a bad ``round_to``, ``compensate`` data the model
    cannot run or without masks to compensate, and models ``torch.fx`` cannot trace.
    """
    if not isinstance(model, nn.Module):  # before the masks are read against it
        raise ArgumentTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_round_to(round_to)
    table = _mask_table(model, masks)
    if compensate is not None and table is None:
        raise ValueError("compensate needs masks: it folds the removed channels' mean "
                         "contribution into biases, so pass the masks that remove them")
    if groups is None:
        groups = dependency_groups(model)
    else:
        groups = check_groups(groups, model)
        for i, group in enumerate(groups):
            _check_roles(f"groups[{i}]", group)
        _check_disjoint(model, groups)
    removed = [(g, _removable(model, g, table)) for g in groups]
    means = {} if compensate is None else _compensation_means(model, removed, compensate)
    small = copy.deepcopy(model)
    if means:  # before the masks zero the columns it reads
        added = fold_means(small, removed, means)
        removed = [(with_biases(g, added), gone) for g, gone in removed]
    if table is not None:
        _apply(small, table)
    remove_channels(small, [(g, _restore(g, gone, round_to)) for g, gone in removed])
    return small


def _check_disjoint(model: nn.Module, groups: Sequence[Group]) -> None:
    """``ValueError`` when two of ``groups`` hold the same entries of one tensor (a group
    passed twice, or groups of one space): each would keep its own channels and remove the
    other's, and compensation folded a channel once per group that held it."""
    tensors = named_tensors(model)
    spans: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for i, group in enumerate(groups):
        for s in group.slices:
            tensor = tensors[s.name]
            key = (id(tensor), s.dim % tensor.dim())
            lo, hi = s.offset, s.offset + group.channels * s.repeat
            for lo2, hi2, j in spans.get(key, []):
                if j != i and lo < hi2 and lo2 < hi:
                    raise ValueError(
                        f"groups[{j}] and groups[{i}] (opened by {groups[j].name!r} and "
                        f"{group.name!r}) hold the same entries of {s.name!r}; accepted: "
                        "groups that share no channel (each group once)")
            spans.setdefault(key, []).append((lo, hi, i))


def _check_roles(where: str, group: Group) -> None:
    """``ValueError`` unless ``group`` holds both writer rows (role ``"out"``) and reader
    columns (``"in"``), as every traced group does. Without readers every channel looked
    removable and the writer alone was cut; without writers the readers alone were: either
    way a model that no longer ran."""
    roles = {s.role for s in group.slices}
    if roles != {"in", "out"}:
        raise ValueError(f"{where} (opened by {group.name!r}) has slices of roles "
                         f"{sorted(roles)}; accepted: groups with both writer rows ('out') "
                         "and reader columns ('in'), which shrink together")


def _restore(group: Group, gone: torch.Tensor, round_to: int) -> torch.Tensor:
    """``gone`` less the channels a group keeps anyway: at least one (a group never
    vanishes) and enough for a kept count rounded up to ``round_to``'s step."""
    step = rounding_step(group, round_to)
    kept = group.channels - gone.numel()
    want = min(group.channels, max(-(-kept // step) * step, 1))
    return gone[want - kept:]


def _compensation_means(model: nn.Module, removed: list[tuple[Group, torch.Tensor]],
                        data: Any) -> dict[str, torch.Tensor]:
    """The readers' input means for FLAP's compensation, refusing a model whose removed
    reader columns are all zero already (its masks were applied: nothing to fold), or
    one on the meta device (it cannot run on the data: a raw error from ``.item()``)."""
    check_materialized_module(model, "compensate needs the model's weights: ")
    columns = [model.get_parameter(s.name).detach().movedim(s.dim, 0)[s.indices(gone).cpu()]
               for group, gone in removed if gone.numel()
               for s in group.slices if s.role == "in"]
    if columns and not any(bool(c.any()) for c in columns):
        raise ValueError(
            "compensate: the reader columns of every removed channel are already zero, so "
            "there is no contribution to fold (were the masks applied?). FLAP's "
            "compensation needs the weights before masking: compute the masks with "
            "sparsekit.prune.compute_masks and shrink the unmasked model")
    means = reader_means(model, removed, data, "compensate")
    infinite = [n for n, m in means.items() if not bool(m.isfinite().all())]
    if infinite:  # they would be added to the readers' biases
        raise ValueError(f"compensate: the calibration data gives NaN or infinite mean inputs "
                         f"of {infinite}; pass data the model computes finite activations for")
    return means


@torch.no_grad()
def _apply(model: nn.Module, table: MaskTable) -> None:
    for name, mask in table.items():
        param = model.get_parameter(name)
        param.mul_(mask.to(param.device, param.dtype))


def remove_channels(model: nn.Module, removed: Iterable[tuple[Group, torch.Tensor]]) -> None:
    """In place: drop channels ``gone`` (1-D long) of each group from every slice of it.

    Each tensor is cut once, so tied weights stay tied; the layers touched get size
    attributes that match their new shapes, and their int8 scales (``weight_scale``) the
    rows of their weights.
    """
    removed = check_removal(model, removed)  # all before any cut
    cuts = _grid_cuts(model, removed)
    for group, gone in removed:
        for s in group.slices:
            cuts.setdefault((s.name, s.dim), set()).update(s.indices(gone).tolist())
    cut(model, cuts)


def check_removal(model: nn.Module, removed: Iterable[tuple[Group, torch.Tensor]]
                  ) -> list[tuple[Group, torch.Tensor]]:
    """``removed`` as a list, with every check of :func:`remove_channels` passed and nothing
    changed: a caller that changes the model before the cut (FLAP's
    :func:`~sparsekit.structured.compensate.fold_means`) runs it first, so a refused
    removal leaves the model as it was (the compensation had changed the biases before
    :func:`remove_channels` refused)."""
    check_module("model", model)  # was a raw AttributeError after the checks of removed
    removed = check_removed(removed)
    for i, (group, gone) in enumerate(removed):
        if gone.numel():
            _check_roles(f"removed[{i}]'s group", group)
        if gone.numel() == group.channels:  # the layers left would have no channel there
            raise ValueError(f"removed[{i}] removes every channel of group {group.name!r} "
                             f"({group.channels}); accepted: at most {group.channels - 1}, a "
                             "group keeps one (shrink does so itself)")
    _grid_cuts(model, removed)  # refuses a cut that splits groups of int8 scales
    return removed


def _grid_cuts(model: nn.Module, removal: list[tuple[Group, torch.Tensor]]
               ) -> dict[tuple[str, int], set[int]]:
    """The rows of int8 scales (``weight_scale``: ``llm.prune(..., quantize="int8")``) that
    go with the rows of their weights in ``removal``: left whole, a layer's scales no longer
    matched its rows (the model did not reload, :func:`shrink`'s did not compile). A layer
    with a scale per group of inputs that loses inputs is a ``ValueError`` before anything
    changes: the cut splits its groups, and its weight lies on no grid of equal groups any
    more."""
    cuts: dict[tuple[str, int], set[int]] = {}
    for group, gone in removal:
        for s in group.slices:
            owner, _, leaf = s.name.rpartition(".")
            scales = attached_scales(model.get_submodule(owner)) if leaf == "weight" else None
            if scales is None or not gone.numel():
                continue
            if s.dim == 0:
                cuts.setdefault((f"{owner}.{SCALE_NAME}", 0), set()).update(
                    s.indices(gone).tolist())
            elif is_grouped(scales):
                raise ValueError(
                    f"{owner!r} carries int8 scales per group of inputs ({SCALE_NAME} of shape "
                    f"{tuple(scales.shape)}: llm.prune(..., quantize='int8', group_size=...)); "
                    f"removing units of {group.name!r} cuts its inputs and splits those groups; "
                    "accepted: prune_structured before quantizing, per-row scales "
                    "(group_size=None), or sparsekit.quantize.detach_scales(layer) first; the "
                    "model was not changed"
                )
    return cuts


def removable_channels(model: nn.Module, group: Group, masks: object) -> torch.Tensor:
    """The channels of ``group`` (ascending, long) whose reader columns are all masked.

    ``masks`` is a :class:`~sparsekit.MaskSet` or a ``{parameter name: bool tensor}``
    dict, checked as :func:`shrink` checks it; a reader without one counts as kept, or,
    with ``masks=None``, as its nonzero entries. ``group`` must fit ``model``
    (:func:`~sparsekit.structured.dependency.check_groups`): a list of masks, a mask of
    another shape or a group of another model failed with raw errors, and a float mask
    read its NaN entries as kept.
    """
    check_module("model", model)
    check_groups([group], model, "group")
    return _removable(model, group, _mask_table(model, masks))


def _removable(model: nn.Module, group: Group, masks: MaskTable | None) -> torch.Tensor:
    """:func:`removable_channels` of a checked ``group`` and mask table (:func:`_mask_table`)."""
    alive = torch.zeros(group.channels, dtype=torch.bool)
    aliases = _aliases(model)
    for s in group.slices:
        if s.role != "in":
            continue
        weight = model.get_parameter(s.name)
        if masks is None:  # the weights' zeros are the mask: they must hold values
            check_materialized(f"model's {s.name!r}", weight)
        keep = (weight != 0) if masks is None else masks.get(aliases.get(s.name, s.name))
        if keep is None:
            return torch.empty(0, dtype=torch.long)
        cols = keep.detach().movedim(s.dim, 0)[s.offset: s.offset + group.channels * s.repeat]
        alive |= cols.reshape(group.channels, -1).any(1).cpu()
    return torch.nonzero(~alive).flatten()


def _mask_table(model: nn.Module, masks: object) -> MaskTable | None:
    if masks is None:
        return None
    table = getattr(masks, "masks", masks)
    if not isinstance(table, Mapping):
        raise ArgumentTypeError(
            f"masks must be a MaskSet, a dict of parameter name -> bool tensor, or None; got "
            f"{type(masks).__name__}"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases = _aliases(model)
    for name, mask in table.items():
        if name not in params:
            raise ValueError(f"masks has an entry {name!r} that is not a parameter of the model")
        # a NaN or 0.3 would count as "keep"; a wrong dtype (or no tensor) is a TypeError
        # as in every mask check (was a plain ValueError)
        check_mask(f"masks[{name!r}]", mask, params[name].shape)
    return _by_tensor(table, aliases)


def _by_tensor(table: MaskTable, aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``table`` keyed by the first name of each tensor (:func:`_aliases`); names of one
    tied tensor must give it equal masks (:func:`~sparsekit.masks.one_mask`)."""
    names: dict[str, list[str]] = {}
    for name in table:
        names.setdefault(aliases[name], []).append(name)
    return {first: one_mask(table, given, f"the tied tensor {first!r}")
            for first, given in names.items()}


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every parameter name → the first name of its tensor (a tied weight has several)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n)
            for n, p in model.named_parameters(remove_duplicate=False)}


@torch.no_grad()
def cut(model: nn.Module, cuts: Mapping[tuple[str, int], set[int]]) -> None:
    """In place: drop the indices ``cuts[(tensor name, dim)]`` of parameters and buffers
    (once per tensor: tied weights stay tied), then bring the touched layers' size
    attributes in line with their new shapes. Every entry is checked first: ``ValueError``
    for a name that is no parameter or buffer, a dimension the tensor lacks, or an index
    outside it (one was skipped without a sign); :class:`ArgumentTypeError` for a ``cuts``
    that is no mapping of ``(name, dim)`` pairs to collections of indices (raw
    ``AttributeError`` s and unpacking errors)."""
    check_module("model", model)
    if not isinstance(cuts, Mapping):
        raise ArgumentTypeError(f"cuts must be a mapping of (tensor name, dim) to the indices "
                                f"to drop, got {type(cuts).__name__}")
    tensors = named_tensors(model)
    by_tensor: dict[int, tuple[torch.Tensor, dict[int, set[int]]]] = {}
    for key, gone in cuts.items():
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)):
            raise ArgumentTypeError(f"cuts keys must be (tensor name, dim) pairs, got {key!r}")
        if isinstance(gone, (str, bytes)) or not isinstance(gone, Iterable):
            raise ArgumentTypeError(f"cuts[{key!r}] must be a collection of indices, got "
                                    f"{type(gone).__name__}")
        (name, dim), gone = key, list(gone)  # a generator is read once, here
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"cuts names {name!r}, which is not a parameter or buffer of the "
                             "model")
        check_int(f"the dim of cuts[{name!r}]", dim)
        if not -tensor.dim() <= dim < tensor.dim():
            raise ValueError(f"the dim of cuts[{name!r}] must be in [{-tensor.dim()}, "
                             f"{tensor.dim()}) for its shape {tuple(tensor.shape)}, got {dim}")
        dim %= tensor.dim()
        bad = [i for i in gone if isinstance(i, bool) or not isinstance(i, numbers.Integral)
               or not 0 <= i < tensor.shape[dim]]
        if bad:
            raise ValueError(f"cuts[({name!r}, {dim})] must hold indices in [0, "
                             f"{tensor.shape[dim]}), got {bad[:5]}")
        by_tensor.setdefault(id(tensor), (tensor, {}))[1].setdefault(dim, set()).update(gone)
    replaced = {}
    for tensor, dims in by_tensor.values():
        new = tensor.detach()
        for dim, gone in dims.items():
            if not gone:
                continue
            keep = [i for i in range(new.shape[dim]) if i not in gone]
            new = new.index_select(dim, torch.tensor(keep, dtype=torch.long, device=new.device))
        replaced[id(tensor)] = nn.Parameter(new, tensor.requires_grad) \
            if isinstance(tensor, nn.Parameter) else new
    touched = []
    for module in model.modules():
        changed = False
        for attr, value in [*module._parameters.items(), *module._buffers.items()]:
            if value is not None and id(value) in replaced:
                setattr(module, attr, replaced[id(value)])
                changed = True
        if changed:
            touched.append(module)
    for module in touched:
        _resize(module)


def _resize(module: nn.Module) -> None:
    """Set a layer's size attributes from its (cut) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1:  # depthwise: k output channels per input channel
            k = module.out_channels // module.groups
            module.groups = module.in_channels = module.weight.shape[0] // k
        else:
            module.in_channels = module.weight.shape[1]
        module.out_channels = module.weight.shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = ref.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif is_conv1d(module):  # GPT-2's Conv1D: weight (in, out); forward reads nf
        module.nx, module.nf = module.weight.shape
