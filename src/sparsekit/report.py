"""Per-layer parameter, sparsity and FLOP accounting.

:func:`report` lists every ``nn.Linear``, GPT-2 ``Conv1D`` and ``nn.Conv1d/2d/3d`` of a
model with its weight count, nonzeros and the FLOPs of one forward pass, dense and sparse,
so the effect of a sparsification can be read layer by layer.

FLOP convention: 2 FLOPs per multiply-accumulate (MAC), weights only (bias, activations
and normalisation are not counted), for one forward pass of ``example_inputs`` (the whole
batch). A layer does ``output.numel() * prod(weight.shape[1:])`` MACs per call, that is
``rows * in_features * out_features`` for ``Linear`` (and ``Conv1D``, whose weight is
stored ``(in, out)``) and ``output.numel() * in_channels / groups * prod(kernel_size)``
for convolutions; a layer called several times counts every call. Sparse FLOPs are
``dense * nonzeros / params``: the work of an ideal unstructured-sparse kernel, not what
any particular kernel achieves. Without ``example_inputs``, ``Linear`` and ``Conv1D``
FLOPs are for a single input row and convolution FLOPs are unknown (``None``), as are
those of a layer the forward pass never called; totals then sum the known values and set
``flops_complete`` to ``False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

import torch
from rich.table import Table
from torch import nn
from torch.nn.utils import parametrize

from sparsekit import _table
from sparsekit._checks import ArgumentTypeError, check_module, check_parameter_names, model_errors
from sparsekit.masks import one_mask
from sparsekit.observe import macs
from sparsekit.targets import _single_original, default_types, linear_types

__all__ = ["HasMasks", "LayerRow", "Report", "Totals", "report"]

_FIELDS = ("name", "kind", "shape", "params", "nonzeros", "sparsity", "dense_flops", "sparse_flops")
_HEADERS = ("layer", *_FIELDS[1:6], "dense FLOPs", "sparse FLOPs")
_RIGHT_ALIGNED = (False, False, False, True, True, True, True, True)


class HasMasks(Protocol):
    """Anything holding masks keyed by parameter name, e.g. ``"fc1.weight"``."""

    @property
    def masks(self) -> Mapping[str, torch.Tensor]: ...


class Totals(TypedDict):
    """Whole-model sums; ``flops_complete`` is ``False`` when some layer's FLOPs are unknown."""

    params: int
    nonzeros: int
    sparsity: float
    dense_flops: int
    sparse_flops: int
    flops_complete: bool


@dataclass
class LayerRow:
    """One layer of a :class:`Report`.

    ``extra`` holds further columns (kernel format, measured time …) that later stages
    attach; every output format shows them after the built-in columns. ``tied_to`` names
    the earlier row whose weight this layer shares (tied weights): its parameters and
    nonzeros are counted once, in that row, by the totals; its FLOPs (it runs) count too.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    dense_flops: int | None
    sparse_flops: int | None
    extra: dict[str, object] = field(default_factory=dict)
    tied_to: str | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return _sparsity(self.nonzeros, self.params)


@dataclass
class Report:
    """Per-layer accounting of a model, printable as markdown or a rich table."""

    rows: list[LayerRow]

    @property
    def totals(self) -> Totals:
        """Sums over all rows (a tied weight's parameters and nonzeros once); FLOPs sum only
        the known values."""
        params = sum(r.params for r in self.rows if r.tied_to is None)
        nonzeros = sum(r.nonzeros for r in self.rows if r.tied_to is None)
        return Totals(
            params=params,
            nonzeros=nonzeros,
            sparsity=_sparsity(nonzeros, params),
            dense_flops=sum(r.dense_flops or 0 for r in self.rows),
            sparse_flops=sum(r.sparse_flops or 0 for r in self.rows),
            flops_complete=all(r.dense_flops is not None for r in self.rows),
        )

    def relative_to(self, before: Report) -> dict[str, float]:
        """This report's parameters, nonzeros and dense FLOPs as fractions of ``before``'s —
        e.g. a model after :func:`~sparsekit.shrink` against the model it came from
        (``{"params": 0.26, "nonzeros": 0.26, "dense_flops": 0.27}``; 0.0 where ``before``
        has none)."""
        if not isinstance(before, Report):
            raise ArgumentTypeError(f"before must be a Report, got {type(before).__name__}")
        now, then = self.totals, before.totals
        return {k: now[k] / then[k] if then[k] else 0.0
                for k in ("params", "nonzeros", "dense_flops")}

    def to_dict(self) -> dict[str, object]:
        """Rows and totals as plain JSON types; every row carries every extra column."""
        extra = self._extra_columns()
        rows = [
            {
                "name": r.name,
                "kind": r.kind,
                "shape": list(r.shape),
                "params": r.params,
                "nonzeros": r.nonzeros,
                "sparsity": r.sparsity,
                "dense_flops": r.dense_flops,
                "sparse_flops": r.sparse_flops,
                "tied_to": r.tied_to,
                **{k: r.extra.get(k) for k in extra},
            }
            for r in self.rows
        ]
        return {"rows": rows, "totals": dict(self.totals)}

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table with a bold total row."""
        return _table.markdown(*self._grid())

    def to_rich(self) -> Table:
        """The markdown table's content as a ``rich.table.Table``."""
        return _table.rich_table(*self._grid())

    def to_text(self) -> str:
        """The table as plain text (:meth:`to_rich` drawn 120 columns wide), as the CLI
        prints it to a file."""
        return _table.text(self.to_rich())

    def __str__(self) -> str:
        return self.to_markdown()

    def _extra_columns(self) -> list[str]:
        """Extra keys of all rows in first-seen order."""
        columns = list(dict.fromkeys(k for r in self.rows for k in r.extra))
        clash = [k for k in columns if k in (*_FIELDS, "tied_to")]
        if clash:
            raise ValueError(f"extra columns {clash} shadow built-in columns {list(_FIELDS)}")
        return columns

    def _grid(self) -> tuple[list[str], list[bool], list[list[str]], list[str]]:
        """Headers, right-alignment flags, body cells and total cells, all formatted."""
        extra = self._extra_columns()
        right = [all(_is_number(r.extra[k]) for r in self.rows if k in r.extra) for k in extra]
        body = [
            [
                r.name if r.tied_to is None else f"{r.name} (tied to {r.tied_to})",
                r.kind,
                "x".join(map(str, r.shape)),
                f"{r.params:,}",
                f"{r.nonzeros:,}",
                f"{r.sparsity:.1%}",
                _si(r.dense_flops),
                _si(r.sparse_flops),
                *(_cell(r.extra[k]) if k in r.extra else "" for k in extra),
            ]
            for r in self.rows
        ]
        t = self.totals
        bound = "" if t["flops_complete"] else "≥"  # unknown FLOPs make the sum a lower bound
        total = [
            "total",
            "",
            "",
            f"{t['params']:,}",
            f"{t['nonzeros']:,}",
            f"{t['sparsity']:.1%}",
            bound + _si(t["dense_flops"]),
            bound + _si(t["sparse_flops"]),
            *[""] * len(extra),
        ]
        return [*_HEADERS, *extra], [*_RIGHT_ALIGNED, *right], body, total


def report(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[object, ...] | None = None,
    *,
    masks: HasMasks | None = None,
) -> Report:
    """Count weights, nonzeros and FLOPs of every Linear/Conv1D/Conv layer of ``model``,
    and of every layer that stores only its kept weights (``SparseLinear``, the layers of
    :func:`sparsekit.compile`, a fused group's stacked projections once), by their shape
    and stored nonzeros.

    ``example_inputs`` (a tensor, or a tuple passed as ``model(*example_inputs)``) is run
    once in eval mode under ``torch.no_grad()`` to measure FLOPs; the model's hooks and
    train/eval modes are left as they were, also when the forward pass raises. With
    ``masks``, the nonzeros of a masked weight are those its mask keeps, so the report is
    correct before the masks are applied to the weights (a weight on the meta device is
    counted from its mask); every name they hold must be a parameter of ``model`` (masks
    of another model were silently ignored).
    """
    check_module("model", model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None and not isinstance(example_inputs, tuple):
        raise ArgumentTypeError(
            "example_inputs must be a tensor, a tuple of model inputs or None, "
            f"got {type(example_inputs).__name__}"
        )
    mask_table = _mask_table(masks)
    types = default_types()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    kept_only = _sparse_layers(model)  # no dense weight: counted by their nonzeros
    _check_mask_names(mask_table, model, layers)
    layer_masks = _layer_masks(mask_table, model, layers)
    for name, module in layers:
        if name not in layer_masks and module.weight.is_meta:
            raise ValueError(
                f"the weight of layer {name!r} is on the meta device (it holds no values), so "
                "its nonzeros cannot be counted; load the weights first (model.to_empty(...) "
                "and load_state_dict) or pass the masks"
            )
    if example_inputs is None:
        counted = None
    else:
        with model_errors("example_inputs", "the model cannot run on them"):
            counted = macs(model, dict(layers) | {n: m for n, m, _ in kept_only},
                           *example_inputs)

    rows = []
    owner: dict[int, str] = {}  # id of a stored weight -> the first row holding it
    for name, module in layers:
        weight = module.weight
        mask = layer_masks.get(name)
        # != 0, not count_nonzero: torch counts no float8 nonzeros ("not implemented"). A
        # mask keeps what it keeps of the weight's nonzeros: counted from the mask alone, a
        # kept weight that is 0 (a row pattern over an unstructured prune) counted as one
        kept = None if mask is None else mask != 0
        nonzeros = int((weight != 0 if kept is None else kept if weight.is_meta
                        else (weight != 0) & kept.to(weight.device)).sum())
        if counted is not None:
            layer_macs = counted.get(name)  # None: not called by the forward pass
        elif isinstance(module, linear_types()):
            layer_macs = weight.numel()  # one input row
        else:
            layer_macs = None  # spatial size unknown
        dense = None if layer_macs is None else 2 * layer_macs
        stored = _stored_weight(module)
        tied_to = None if stored is None else owner.setdefault(id(stored), name)
        rows.append(
            LayerRow(
                name=name,
                kind=next(t.__name__ for t in types if isinstance(module, t)),
                shape=tuple(weight.shape),
                params=weight.numel(),
                nonzeros=nonzeros,
                dense_flops=dense,
                # exact: dense is 2 * params * (positions the weight is applied at)
                sparse_flops=None if dense is None else dense * nonzeros // max(weight.numel(), 1),
                tied_to=None if tied_to == name else tied_to,
            )
        )
    for name, module, nonzeros in kept_only:
        shape = (module.out_features, module.in_features)
        params = shape[0] * shape[1]
        layer_macs = params if counted is None else counted.get(name)
        dense = None if layer_macs is None else 2 * layer_macs
        rows.append(LayerRow(name=name, kind=type(module).__name__, shape=shape, params=params,
                             nonzeros=nonzeros, dense_flops=dense,
                             sparse_flops=None if dense is None
                             else dense * nonzeros // max(params, 1)))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return Report(sorted(rows, key=lambda r: order[r.name]))


def _sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(name, layer, nonzeros)`` of every layer of ``model`` that stores only its kept
    weights — a :class:`~sparsekit.SparseLinear`, a layer of :func:`sparsekit.compile` —
    which were left out of the counts, the totals still saying they were complete."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear
    from sparsekit.engine.compiled_linear import CompiledLayer
    from sparsekit.engine.sparse_linear import SparseLinear

    found: list[tuple[str, nn.Module, int]] = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{n}.") for n, _, _ in found):
            continue  # a part of one counted (an activation-sparse layer's prompt format)
        if isinstance(m, SparseLinear):
            found.append((name, m, m.nnz))
        elif isinstance(m, CompiledLayer):  # also a fused group's stacked projections, once
            found.append((name, m, m.format.nnz))
        elif isinstance(m, ActivationSparseLinear):
            found.append((name, m, int((m.to_module().weight != 0).sum())))
    return found


def _stored_weight(module: nn.Module) -> torch.Tensor | None:
    """The tensor ``module``'s weight is stored in (what tied layers share): the weight
    itself, or the one tensor a parametrized weight is computed from (``None`` if several)."""
    if parametrize.is_parametrized(module, "weight"):
        return _single_original(module)
    return module.weight


def _layer_masks(table: Mapping[str, torch.Tensor], model: nn.Module,
                 layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """The mask of each layer's weight (``{layer name: mask}``), looked up under every name
    of that weight: each name of the layer (a module reachable by several paths), and each
    name of the tensor it is stored in (tied weights). Raises naming a mask that is not a
    tensor, has the wrong shape, is sparse, or disagrees with another name of the same
    weight. A mask's nonzeros count as kept (a float mask multiplies its weight)."""
    for key, mask in table.items():
        if not isinstance(mask, torch.Tensor):
            raise ArgumentTypeError(f"masks[{key!r}] must be a torch.Tensor, got "
                                    f"{type(mask).__name__}")
    if not table:
        return {}
    module_names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(m), []).append(n)
    param_names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(n)
    found: dict[str, torch.Tensor] = {}
    for name, module in layers:
        prefixes = [f"{n}." if n else "" for n in module_names.get(id(module), [name])]
        keys = [f"{p}weight" for p in prefixes]
        if _single_original(module) is not None:
            # a parametrized weight's mask is kept on its one stored tensor (the target)
            keys += [f"{p}parametrizations.weight.original" for p in prefixes]
        stored = _stored_weight(module)
        if stored is not None:
            keys += param_names.get(id(stored), [])
        hits = [k for k in dict.fromkeys(keys) if k in table]
        if not hits:
            continue
        shape = module.weight.shape
        for k in hits:
            if table[k].shape != shape:
                raise ValueError(
                    f"masks[{k!r}] has shape {tuple(table[k].shape)}, "
                    f"expected the weight's shape {tuple(shape)}"
                )
            if table[k].layout != torch.strided:  # a raw NotImplementedError of counting
                raise ArgumentTypeError(f"masks[{k!r}] must be a dense (strided) tensor, got "
                                        f"layout {table[k].layout}; convert with `.to_dense()`")
        first = one_mask(table, hits, f"of layer {name!r}")
        if first.is_meta:
            raise ValueError(f"masks[{hits[0]!r}] is on the meta device (it holds no values); "
                             "pass masks with values")
        found[name] = first
    return found


def _mask_table(masks: HasMasks | None) -> Mapping[str, torch.Tensor]:
    if masks is None:
        return {}
    table = getattr(masks, "masks", None)
    if not isinstance(table, Mapping):
        raise ArgumentTypeError(
            "masks must have a `masks` mapping of parameter name to tensor, "
            f"got {type(masks).__name__}"
        )
    return table


def _check_mask_names(table: Mapping[str, torch.Tensor], model: nn.Module,
                      layers: list[tuple[str, nn.Module]]) -> None:
    """Raise unless every name in ``table`` is a parameter of ``model`` (by any of its
    names, tied ones included) or the weight of one of its ``layers`` (``"fc.weight"``
    also where that weight is parametrized)."""
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    known.update(f"{n}.weight" if n else "weight" for n, _ in layers)
    check_parameter_names("masks name", table, known,
                          "masks of another model? Pass the masks computed for this model")


def _sparsity(nonzeros: int, params: int) -> float:
    return 1.0 - nonzeros / params if params else 0.0


def _si(n: int | None) -> str:
    """``1234567`` → ``"1.2M"``; ``None`` (unknown) → ``"-"``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 999.95 or unit == "P":
            break
        value /= 1000
    return f"{n}" if unit == "" else f"{value:.1f}{unit}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

