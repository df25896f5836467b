"""``diff(a, b)``: how sparse the update between two models is, tensor by tensor.

Fine-tuning changes few weights much (and most not at all, when it is sparse by design):
the table says, per tensor, how many entries changed, the update's density and its size
relative to the tensor, ``‖b − a‖ / ‖a‖``. ``a`` and ``b`` may each be a model, a state
dict, a :func:`sparsekit.save` file (or any safetensors file), a
:func:`sparsekit.save_pretrained` directory or a Hugging Face directory
(``model.safetensors``, or the tensors a sharded one's index lists). Tensors are compared
by name; the two sides must hold the same names and shapes (dtypes may differ: values are
compared in float64). A tensor tied under several names is one row, under its first name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import nn

from sparsekit import _table, checkpoint
from sparsekit._checks import ArgumentTypeError, check_nonnegative
from sparsekit.pretrained import WEIGHTS_NAME, stored_values
from sparsekit.quantize import SCALE_NAME

__all__ = ["Diff", "DiffRow", "diff"]

Source = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike
"""What :func:`diff` compares: a model, a state dict, a checkpoint file or directory."""

_HEADERS = ("tensor", "shape", "entries", "changed", "density", "relative norm")
_RIGHT = (False, False, True, True, True, True)  # numbers right-aligned


@dataclass(frozen=True)
class DiffRow:
    """The update of one tensor."""

    name: str
    shape: tuple[int, ...]
    numel: int
    changed: int  # entries with |b - a| > atol
    norm: float  # ‖b − a‖₂
    base_norm: float  # ‖a‖₂

    @property
    def density(self) -> float:
        """Fraction of the entries that changed."""
        return self.changed / self.numel if self.numel else 0.0

    @property
    def relative_norm(self) -> float:
        """‖b − a‖ / ‖a‖ (``inf`` for an update of an all-zero tensor)."""
        return _ratio(self.norm, self.base_norm)


@dataclass(frozen=True)
class Diff:
    """Per-tensor update of ``b`` over ``a``, printable as Markdown, JSON or a rich table."""

    rows: list[DiffRow]

    @property
    def totals(self) -> dict[str, float]:
        """Entries, changed entries, density and relative norm over all tensors."""
        numel = sum(r.numel for r in self.rows)
        changed = sum(r.changed for r in self.rows)
        # hypot, not sqrt(sum(x ** 2)): squaring a float64 norm past 1e154 was a raw
        # OverflowError, from finite weights
        norm = math.hypot(*(r.norm for r in self.rows))
        base = math.hypot(*(r.base_norm for r in self.rows))
        return {"numel": numel, "changed": changed, "density": changed / numel if numel else 0.0,
                "relative_norm": _ratio(norm, base)}

    def changed(self) -> list[DiffRow]:
        """The rows of tensors that changed at all."""
        return [r for r in self.rows if r.changed]

    def to_dict(self) -> dict[str, object]:
        """Rows and totals as plain JSON types: an infinite relative norm (an update of an
        all-zero tensor, e.g. LoRA's ``lora_B`` at initialisation) is ``None`` (JSON
        ``null``), since JSON has no ``Infinity`` (``json.dumps`` wrote one that strict
        parsers such as ``jq`` refuse)."""
        rows = [{"name": r.name, "shape": list(r.shape), "numel": r.numel, "changed": r.changed,
                 "density": r.density, "relative_norm": _finite(r.relative_norm)}
                for r in self.rows]
        totals = self.totals
        return {"rows": rows, "totals": {**totals,
                                         "relative_norm": _finite(totals["relative_norm"])}}

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table with a bold total row."""
        return _table.markdown(_HEADERS, _RIGHT, *self._cells())

    def to_rich(self) -> Table:
        """The Markdown table's content as a ``rich.table.Table``."""
        return _table.rich_table(_HEADERS, _RIGHT, *self._cells())

    def __str__(self) -> str:
        return self.to_markdown()

    def _cells(self) -> tuple[list[list[str]], list[str]]:
        body = [[r.name, "x".join(map(str, r.shape)), f"{r.numel:,}", f"{r.changed:,}",
                 f"{r.density:.2%}", f"{r.relative_norm:.3g}"] for r in self.rows]
        t = self.totals
        total = ["total", "", f"{t['numel']:,}", f"{t['changed']:,}", f"{t['density']:.2%}",
                 f"{t['relative_norm']:.3g}"]
        return body, total


def diff(a: Source, b: Source, *, atol: float = 0.0) -> Diff:
    """The update that turns ``a`` into ``b``, per tensor: changed entries (those with
    ``|b − a| > atol``), their density and the update's norm relative to ``a``'s.

    Both sides are read in full and checked (same names, same shapes) before anything is
    compared; a mismatch names the tensors that differ. An int8 grid (``weight_scale``,
    :func:`sparsekit.quantize.attach_scales`) that one side carries and the other does not
    is left out: it describes the weight beside it, whose values are compared (a model
    against itself after ``llm.prune(..., quantize="int8")`` was "another architecture").
    """
    check_nonnegative("atol", atol)  # ArgumentTypeError for a str, ValueError for NaN
    atol = float(atol)
    first, second = _untied(_state(a, "a"), _state(b, "b"))
    for one, other in ((first, second), (second, first)):
        for name in [n for n in one if n.endswith(f".{SCALE_NAME}") and n not in other]:
            del one[name]
    only_a, only_b = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if only_a or only_b:
        raise ValueError(f"a and b hold different tensors (another architecture?): only in a "
                         f"{_few(only_a)}, only in b {_few(only_b)}")
    for name, t in first.items():
        if t.shape != second[name].shape:
            raise ValueError(f"tensor {name!r} is {tuple(t.shape)} in a and "
                             f"{tuple(second[name].shape)} in b")
    return Diff([_row(name, t, second[name], atol) for name, t in first.items()])


def _row(name: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> DiffRow:
    # complex tensors in complex128: .double() dropped the imaginary part, so an update of
    # it counted as no change at all
    if not (a.is_floating_point() or a.is_complex()):
        # integers exactly: doubles round them past 2**53 (2**60 + 1 against 2**60 was no
        # change at any atol > 0, and an update of norm 0)
        step = b.detach().cpu().to(torch.int64) - a.detach().cpu().to(torch.int64)
        return DiffRow(name, tuple(a.shape), a.numel(), int((step.abs() > atol).sum()),
                       float(torch.linalg.vector_norm(step.double())),
                       float(torch.linalg.vector_norm(a.detach().cpu().double())))
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    x, y = a.detach().cpu().to(wide), b.detach().cpu().to(wide)
    # NaN in both and the same infinity: unchanged; an entry that became NaN or infinite
    # makes the update's norm NaN or infinite (it had counted as an update of norm 0, or
    # of float64's largest value)
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    update = torch.where(same, torch.zeros_like(x), y - x)
    moved = ~same & ((update.abs() > atol) | update.isnan())
    return DiffRow(name, tuple(a.shape), a.numel(), int(moved.sum()),
                   float(torch.linalg.vector_norm(update)),
                   float(torch.linalg.vector_norm(x.nan_to_num(nan=0.0))))


def _untied(a: dict[str, torch.Tensor],
            b: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``a`` and ``b`` with each tied name (a tensor held under an earlier name too, as an
    output layer tied to the embeddings) dropped where the other side ties it alike or
    lacks it (a Hugging Face file stores a tied tensor once): it was counted once per name,
    and a tied model differed from its own Hugging Face directory by the second name. A
    name tied on one side only (fine-tuning untied it) stays, compared with the other's."""
    ties_a, ties_b = checkpoint._tied_keys(a), checkpoint._tied_keys(b)

    def kept(own: dict[str, torch.Tensor], mine: dict[str, str],
             other: dict[str, torch.Tensor], theirs: dict[str, str]) -> dict[str, torch.Tensor]:
        return {k: t for k, t in own.items()
                if k not in mine or (k in other and theirs.get(k) != mine[k])}

    return kept(a, ties_a, b, ties_b), kept(b, ties_b, a, ties_a)


def _state(source: Source, param: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``source`` by name."""
    if isinstance(source, nn.Module):
        # tensors only: a module's get_extra_state() entry may be any object
        return _checked({k: v.detach() for k, v in source.state_dict().items()
                         if isinstance(v, torch.Tensor)}, param)
    if isinstance(source, Mapping):
        names = [k for k in source if not isinstance(k, str)]
        if names:  # mixed with str names, sorting them was a raw TypeError
            raise ArgumentTypeError(f"{param}: a state dict must map str names to tensors; "
                                    f"the keys {_few(names)} are not str")
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ArgumentTypeError(f"{param}: a state dict must map names to tensors; "
                                    f"{_few(bad)} are not tensors")
        return _checked(dict(source), param)
    if not isinstance(source, (str, os.PathLike)):
        raise ArgumentTypeError(f"{param} must be a model, a state dict or the path of a "
                                f"checkpoint file or directory, got {type(source).__name__}")
    path = Path(source)
    if path.is_file():
        return checkpoint.read(path).state
    if not path.is_dir():
        # a device, FIFO or socket (/dev/stdin) exists: "does not exist" misled
        what = ("is not a regular file nor a directory (a device, FIFO or socket)"
                if path.exists() else "does not exist")
        raise ValueError(f"{param}: {str(path)!r} {what}; accepted: a checkpoint file or a "
                         "save_pretrained directory")
    return _directory_state(path, param)


def _checked(state: dict[str, torch.Tensor], param: str) -> dict[str, torch.Tensor]:
    """``state`` with sparse tensors made dense and quantized ones dequantized (compared by
    the values they stand for); a ``ValueError`` for tensors without data (the meta
    device) and for nested tensors, which have no one shape. Each was a raw error of
    PyTorch."""
    empty = [k for k, v in state.items() if v.is_meta]
    if empty:
        raise ValueError(f"{param}: the tensors {_few(empty)} are on the meta device and hold "
                         "no values to compare; accepted: tensors with data (load the weights "
                         "first)")
    nested = [k for k, v in state.items() if v.is_nested]
    if nested:
        raise ValueError(f"{param}: the tensors {_few(nested)} are nested tensors, which have "
                         "no one shape to compare; accepted: dense, sparse or quantized tensors")
    return {k: v.dequantize() if v.is_quantized
            else v.to_dense() if v.layout != torch.strided else v for k, v in state.items()}


def _directory_state(path: Path, param: str) -> dict[str, torch.Tensor]:
    """The weights of a ``save_pretrained`` directory, sparsekit's or Hugging Face's."""
    if (path / WEIGHTS_NAME).is_file():
        return stored_values(path / WEIGHTS_NAME)
    if (path / "model.safetensors").is_file():
        return checkpoint.read(path / "model.safetensors").state
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _sharded_state(index, param)
    if any(path.glob("pytorch_model*.bin")):
        raise ValueError(f"{param}: {str(path)!r} holds pickled weights (pytorch_model.bin), "
                         "which sparsekit never unpickles; convert it to safetensors first")
    raise ValueError(f"{param}: directory {str(path)!r} holds no weights ({WEIGHTS_NAME}, "
                     "model.safetensors or model.safetensors.index.json)")


def _sharded_state(index: Path, param: str) -> dict[str, torch.Tensor]:
    """The tensors a Hugging Face index lists, each from the shard its ``weight_map`` names.

    The index is data, checked before any shard is read: every shard must be a file of the
    index's directory (no ``..``, no absolute path, which would read from elsewhere). The
    map decides which shard a tensor comes from, so a tensor two shards hold does not
    depend on the order the files are read in.
    """
    where = f"{param}: {str(index)!r}"
    try:
        content = json.loads(index.read_text())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError;
        # RecursionError: nesting some thousand levels deep
        raise ValueError(f"{where} is not valid JSON ({err})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        got = "none" if weight_map is None else f"a {type(weight_map).__name__}"
        raise ValueError(f"{where} must hold a 'weight_map', a dict of tensor name -> shard "
                         f"file, got {got}")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{where}: the shard of {_few(bad)} is not a file name")
    files = sorted(set(weight_map.values()))
    for shard in files:
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ValueError(f"{where} names shard {shard!r} outside its directory; shards "
                             "must be files of the index's directory")
        if not (index.parent / shard).is_file():
            raise ValueError(f"{where} names shard {shard!r}, which is not a file of "
                             f"{str(index.parent)!r}")
    shards = {shard: checkpoint.read(index.parent / shard).state for shard in files}
    missing = [k for k, shard in weight_map.items() if k not in shards[shard]]
    if missing:
        raise ValueError(f"{where} maps {_few(missing)} to shards that do not hold them")
    return {k: shards[shard][k] for k, shard in weight_map.items()}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _ratio(num: float, den: float) -> float:
    if den:
        return num / den
    return 0.0 if num == 0 else math.inf


def _few(names: list[str]) -> str:
    return f"{names[:5]}{'…' if len(names) > 5 else ''}"

