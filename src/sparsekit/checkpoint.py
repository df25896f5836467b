"""Compressed, sealed, atomic, pickle-free checkpoints: ``save`` / ``load``.

A checkpoint is a safetensors file. A sparse parameter is stored as its kept values plus
the kept positions, as a bitmap (1 bit per entry) or as gaps between successive flat
indices in the narrowest unsigned integer type — whichever is smaller. The header holds
a format version, the mask pattern and, per tensor, its encoding, shape, dtype, count of
nonzeros and a SHA-256 digest of its stored bytes bound to its name; a SHA-256 digest
over the whole header seals every metadata field. Tied tensors (one tensor under several
``state_dict`` keys, such as a language model's embedding and output head) are stored once
under their first key; the header's ``tied`` entry maps each other key to it. ``load``
checks the structure, the digests, the model's shapes and the masks' pattern before it
decodes anything large or touches the model. Files are written deterministically (the
same model gives the same bytes) to a temporary file that is fsynced and renamed, and the
directory is fsynced, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from sparsekit._atomic import atomic_write, special_kind, unwritable, write_target
from sparsekit._checks import (
    SAME_WIDTH_INT,
    ArgumentTypeError,
    check_fits_memory,
    check_module,
    check_writable,
)
from sparsekit.distributed import is_sharded
from sparsekit.engine import activation_linear, fused, persist
from sparsekit.engine.persist import COMPILED_LAYERS
from sparsekit.masks import MaskSet, keeps_everything, maskable, pattern_view
from sparsekit.patterns import Pattern, parse_pattern
from sparsekit.quantize import SCALE_NAME, install_scales

FORMAT = "sparsekit"
FORMAT_VERSION = "3"
# version 1 sealed the header only (read with a warning); 3 adds the optional "tied" entry
_READABLE_VERSIONS = ("1", "2", "3")
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_ENCODINGS = {"dense": ("",), "bitmap": ("::values", "::bitmap"), "gaps": ("::values", "::gaps")}
_FIELDS = {"encoding", "shape", "dtype", "nnz", "masked"}  # of a header entry; version 2 adds:
_DIGEST_FIELD = "sha256"
_GAP_DTYPES = (torch.uint8, torch.uint16, torch.int32)
_ST_DTYPES = {  # safetensors' dtype codes
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {str(d): d for d in _ST_DTYPES}
_MAX_BYTES = 2**63 - 1  # torch's limit on a tensor's size in bytes (int64)
STALE_TEMP_AGE_S = 60.0  # a save's temp file unmodified this long, whose writer is gone


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one stored tensor."""

    encoding: str  # "dense", "bitmap" or "gaps"
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    masked: bool  # True when the positions came from a MaskSet

    @property
    def sparsity(self) -> float:
        numel = math.prod(self.shape)
        return 1.0 - self.nnz / numel if numel else 0.0


def save(
    model: nn.Module,
    path: str | os.PathLike,
    masks: MaskSet | None = None,
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model.state_dict()`` compressed to ``path`` (atomically) and return the path.

    With ``masks``, their parameters are stored by mask (masked entries must be +0.0);
    otherwise any floating parameter of rank ≥ 2 is stored compressed whenever that is
    smaller. Buffers are stored as they are: their size may come from the file (compiled
    layers), and only a tensor whose shape the model fixes can be checked before it is
    decoded. ``metadata`` adds free-form string entries to the header; a model built by
    :mod:`sparsekit.models` also records how to rebuild it (``"model"``). The same model
    always gives the same bytes. Stale temporary files of earlier, killed saves to the
    same path are removed (see :func:`_remove_stale_temps`).
    """
    check_module("model", model)
    _check_whole(model)
    _check_state(model, "there is nothing to save")
    path = checkpoint_file(path)
    if masks is not None and not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet or None, got {type(masks).__name__}")
    if masks is not None and masks.removed:  # it holds no mask: its pattern was recorded
        # for none, and a load of such a file failed its check after loading the weights
        raise ValueError("masks: this MaskSet was removed (remove() dropped its masks, the "
                         "zeros stay in the weights); accepted: a MaskSet that holds its masks, "
                         "or masks=None to store the weights by their zeros")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError(f"metadata must be a dict of str to str, got {metadata!r:.100}")
    for k, v in (metadata or {}).items():
        # a lone surrogate ("\ud800") has no UTF-8 form: the file was written, replacing the
        # old one, with a header that no safetensors reader accepts
        for what, text in (("key", k), ("value", v)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"metadata: the {what} {text!r:.60} of entry {k!r:.60} is not "
                                 f"valid Unicode text ({err.reason} at index {err.start}); "
                                 "accepted: str that encode to UTF-8") from None
    mask_of = masks.masks if masks is not None else {}
    state = model.state_dict()
    # "model" too where it records how to rebuild a sparsekit.models model: the caller's
    # entry replaced that record silently (the CLI then could not rebuild the model)
    reserved = sorted(({"tied", "fused", "activation_kernels", "format", "format_version",
                        "pattern", "tensors", "digest"}
                       | ({"model"} if hasattr(model, "sparsekit_config") else set()))
                      & set(metadata or {}))
    if reserved:
        raise ValueError(f"metadata: keys {reserved} are the checkpoint's own header entries; "
                         "choose other names")
    for key, m in mask_of.items():
        if key in state and state[key].shape != m.shape:  # cut by shrink / prune_structured
            raise ValueError(
                f"masks: entry {key!r} {tuple(m.shape)} does not fit the model's tensor of "
                f"shape {tuple(state[key].shape)} (masks of another model, or of this one "
                "before it was made smaller by prune_structured or shrink?); accepted: masks "
                "of the model as it is (sparsekit.prune.compute_masks again, or no masks)")
        if key not in state:
            compiled = any(isinstance(x, COMPILED_LAYERS) for x in model.modules())
            raise ValueError(
                f"masks: entry {key!r} {tuple(m.shape)} matches no tensor of the model's "
                "state_dict" + (" (the model is compiled: its layers store the kept weights "
                                "only and need no masks; accepted: masks=None)" if compiled
                                else " (were the masks made for another model?)"))
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = _tied_keys(state)
    # a compressed tensor is stored as KEY::values and KEY::bitmap/gaps: where the model has
    # a tensor of that name too, one overwrote the other and the file, written over the old
    # one, was unreadable. Such a tensor is stored dense; a masked one cannot be.
    crowded = {k for k in state
               if any(f"{k}{suffix}" in state for suffix in ("::values", "::bitmap", "::gaps"))}
    if clash := sorted(crowded & set(mask_of)):
        raise ValueError(
            f"masks: {clash[0]!r} is stored by position as {clash[0] + '::values'!r} and "
            f"{clash[0] + '::bitmap'!r} or {clash[0] + '::gaps'!r}, but the model has a "
            "tensor of one of those names; rename it or save without masks on this tensor")
    parts: dict[str, torch.Tensor] = {}
    infos: dict[str, dict] = {}
    for key, value in state.items():
        if key in tied:
            continue
        value = value.detach().cpu().contiguous()
        if value.dtype not in _ST_DTYPES:
            raise TypeError(f"state_dict entry {key!r} has dtype {value.dtype}, which "
                            f"safetensors cannot store")
        if key in mask_of:
            keep = mask_of[key].cpu()
            _check_masked_zero(key, value[~keep])
            nnz = int(torch.count_nonzero(keep))
        elif (key in params and key not in crowded and value.is_floating_point()
              and value.dim() >= 2):
            bitwise = value.view(SAME_WIDTH_INT[value.element_size()])
            nnz = int(torch.count_nonzero(bitwise))  # bitwise nonzero, so -0.0 round-trips
            may_win = _sparse_may_win(value.numel(), nnz, value.element_size())
            keep = bitwise.ne(0) if may_win else None  # a dense tensor builds no index
        else:
            keep, nnz = None, _count_nonzero(value)
        encoding, own = _encode(value, keep, nnz, force=key in mask_of)
        own = {f"{key}{suffix}": t for suffix, t in own.items()}
        parts.update(own)
        infos[key] = {
            "encoding": encoding, "shape": list(value.shape), "dtype": str(value.dtype),
            "nnz": nnz, "masked": key in mask_of, _DIGEST_FIELD: _tensor_digest(own),
        }
    meta = {
        **({"model": json.dumps(model.sparsekit_config, sort_keys=True)}
           if hasattr(model, "sparsekit_config") else {}),
        **(metadata or {}),
        **({"tied": json.dumps(tied, sort_keys=True)} if tied else {}),
        **({"fused": json.dumps(groups)} if (groups := fused.groups(model)) else {}),
        **({"activation_kernels": json.dumps(chosen, sort_keys=True)}
           if (chosen := activation_linear.kernels_of(model)) else {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pattern": masks.pattern if masks is not None else "none",
        "tensors": json.dumps(infos, sort_keys=True),
    }
    meta["digest"] = _header_digest(meta)
    return _atomic_write(path, parts, meta)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """``path`` as the file :func:`save` writes; a ``ValueError`` naming it unless it names
    a file whose folders are directories or missing (``""``, ``"."``, ``".."`` and an
    existing directory name no file: the rename over it would fail only after the temporary
    file was written; an existing file on the way was a raw ``NotADirectoryError`` of the
    folders' creation, and a broken symbolic link a raw ``FileExistsError``; ``"x/"`` and
    ``"x/."``, which pathlib reads as the file ``x``, were written there; a NUL character
    failed only in the write; an existing device, FIFO or socket, ``/dev/null`` too, was
    replaced by the rename with a regular file, and so was a symbolic link, whatever it
    led to). A symbolic link to a file, or to nothing, is written through: the file it
    leads to is replaced, the link kept (:func:`~sparsekit._atomic.write_target`); a link
    that loops, or that leads to nothing under a file, is refused. A recipe checks its
    ``out`` with it before any stage runs."""
    target = Path(_check_path_type(path))
    raw = os.fspath(path)
    what = ("no file name" if target.name in ("", "..") or os.path.basename(raw) in ("", ".")
            else "a NUL character" if "\0" in raw
            else unwritable(target))
    if what is not None:
        raise ValueError(f"path must be the path of the checkpoint file to write, got "
                         f"{os.fspath(path)!r} ({what})")
    return target


def load(model: nn.Module, path: str | os.PathLike) -> MaskSet:
    """Load a checkpoint into ``model`` and return its masks as an applied MaskSet.

    A file saved with ``masks`` gives back exactly those masks; a file saved without
    gives masks for the parameters that were stored compressed. A compiled ``model`` takes
    the saved model's formats, fused groups and activation-sparse kernels, which timing
    decides and two compiles may choose differently.

    Before the model is touched, and before anything is decoded, the file's structure
    and seal are checked (any changed byte of a version-2 file is detected), and every
    declared name, shape and dtype is compared with the model; then the tensors are
    decoded and checked (index ranges, counts, the masks' pattern). Any failure raises
    ``ValueError`` and leaves the model unchanged. Files of format version 1 (whose
    digest covers the header only) load with a warning.
    """
    check_module("model", model)
    _check_whole(model)
    _check_state(model, "nothing can be loaded into it")
    _check_writable(model)
    stored = _open(path)
    state = _declared_state(stored)  # nothing decoded yet
    # compiled layers fused (or not) as the saved model's were: fusing is decided by timing
    # and with the thresholds and single-row kernels of its activation-sparse layers
    kernels = _activation_kernels(stored.meta, path)
    # and its layers compiled or left plain as the saved model's (forced formats compile a
    # tied lm_head; convolutions compile only with example inputs)
    restore_plain = persist.conform(model, state, stored.tied)
    try:
        restore_fused = fused.conform(model, state, _fused_groups(stored.meta, path))
    except ValueError as err:
        restore_plain()
        raise ValueError(f"{path} does not match this model: {err}") from None
    except BaseException:
        restore_plain()
        raise

    def restore() -> None:
        restore_fused()
        restore_plain()

    try:
        restore_kernels = activation_linear.conform(model, state, kernels)
    except ValueError as err:
        restore()
        raise ValueError(f"{path} does not match this model: {err}") from None
    except BaseException:
        restore()
        raise
    # the int8 grids of llm.prune(..., quantize="int8"): a fresh model has no buffer for
    # them, and the file was refused as "another architecture?"
    restore_scales = install_scales(model, {k: tuple(v.shape) for k, v in state.items()
                                            if k.endswith(f".{SCALE_NAME}")})
    try:
        return _load(model, path, stored, state)
    except BaseException:
        restore_scales()
        restore_kernels()
        restore()
        raise


def _compiled_hint(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """Why a file's keys may not be the model's: one of them compiled and the other not
    (told as "another architecture?", the same model was reported as another)."""
    saved, here = bool(persist.saved_compiled(state)), persist.holds_compiled(model)
    if saved and not here:
        return ("the file holds compiled layers and this model none: load it into a compiled "
                "copy (sparsekit.compile(model, ...)), whose layers take the saved formats")
    if here and not saved:
        return ("the file holds no compiled layer and this model is compiled: load it into "
                "the model before compile, or sparsekit.engine.decompile(model)")
    return "another architecture?"


def _fused_groups(meta: dict[str, str], path: str | os.PathLike) -> list[list[str]]:
    """The fused groups a file records (:func:`sparsekit.engine.fused.groups`)."""
    try:
        groups = json.loads(meta["fused"]) if "fused" in meta else []
    except (json.JSONDecodeError, RecursionError):  # resealed deep nesting: a traceback
        groups = None
    if not (isinstance(groups, list) and all(
            isinstance(g, list) and len(g) >= 2 and all(isinstance(n, str) for n in g)
            for g in groups)):
        raise ValueError(f"{path}: header entry 'fused' must list groups of two or more layer "
                         f"names, got {meta['fused']!r:.100}")
    return groups


def _activation_kernels(meta: dict[str, str], path: str | os.PathLike) -> dict[str, str]:
    """The single-row kernels a file records
    (:func:`sparsekit.engine.activation_linear.kernels_of`; none before they were)."""
    try:
        kernels = json.loads(meta.get("activation_kernels", "{}"))
    except (json.JSONDecodeError, RecursionError):
        kernels = None
    if not (isinstance(kernels, dict) and all(
            isinstance(k, str) and v in activation_linear.KERNELS for k, v in kernels.items())):
        raise ValueError(f"{path}: header entry 'activation_kernels' must map layer names to "
                         f"kernels of {activation_linear.KERNELS}, got "
                         f"{meta['activation_kernels']!r:.100}")
    return kernels


def _load(model: nn.Module, path: str | os.PathLike, stored: _Stored,
          state: dict[str, torch.Tensor]) -> MaskSet:
    """:func:`load` once ``model``'s compiled layers are fused as the file's."""
    try:
        own = expected_state(model, state)
    # RuntimeError/NotImplementedError: a compiled layer's entry stored compressed reaches
    # its format checks as a meta placeholder (version 1 or crafted files; see below)
    except (ValueError, RuntimeError, NotImplementedError) as err:
        raise ValueError(f"{path} does not match this model: {err}") from None
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model ({_compiled_hint(model, state)}): missing "
            f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if value.shape != own[key].shape or value.dtype != own[key].dtype:
            raise ValueError(
                f"{path}: tensor {key!r} is {tuple(value.shape)} {value.dtype}, the model "
                f"has {tuple(own[key].shape)} {own[key].dtype}"
            )
    _check_decodable(model.state_dict(), stored)
    ckpt = _decode_all(stored, model)
    _check_ties(path, model.state_dict(), ckpt.state)
    model.load_state_dict(ckpt.state, strict=True)
    params = dict(model.named_parameters())
    # Saved with a MaskSet: exactly its masks. Saved without: every compressed parameter a
    # MaskSet can mask (a float8 one is stored compressed too, but refused by MaskSet: the
    # model was loaded, then a raw error of its decoding, or that refusal, came after it)
    with_masks = any(info.masked for info in ckpt.infos.values())
    masks = {k: m for k, m in ckpt.kept.items()
             if k in params and (ckpt.infos[k].masked or not with_masks)
             and maskable(params[k].dtype)}
    # the pattern is the saved masks' one; positions stored without masks follow none
    pattern = ckpt.meta.get("pattern", "unstructured") if with_masks else "none"
    return MaskSet(model, masks, pattern="unstructured" if pattern == "none" else pattern)


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint: dense tensors, kept positions of the sparse ones, the header."""

    state: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]
    infos: dict[str, TensorInfo]
    meta: dict[str, str]


def tensor_holder(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module whose parameters are ``tensors`` under their dotted names (what
    :func:`save` stores): how a file of tensors that belong to no model (a sparse delta,
    activation thresholds) is written."""
    root = nn.Module()
    for name, t in tensors.items():
        *path, attr = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(attr, nn.Parameter(t.detach().cpu(), requires_grad=False))
    return root


def read(path: str | os.PathLike) -> Checkpoint:
    """Decode a checkpoint without a model. Plain safetensors files read as all-dense.

    The file is checked as by :func:`load` (structure, seal, indices, pattern), except
    against a model: a sparse tensor is decoded to the full shape its header declares.
    """
    stored = _open(path)
    _check_decoded_size(stored)
    return _decode_all(stored)


def _check_decoded_size(stored: _Stored) -> None:
    """Raise unless the compressed tensors of ``stored`` decode to fewer bytes than this
    machine's memory. Their declared shapes are not bounded by the file's size (a tensor
    with no kept entry takes no byte), and without a model to compare them with a small
    crafted file asked for an exabyte: a raw ``RuntimeError`` of the allocator, or pages
    filled until the process was killed."""
    need = sum(math.prod(info.shape) * (_DTYPES[info.dtype].itemsize + 1)  # values + mask
               for info in stored.infos.values() if info.encoding != "dense")
    check_fits_memory(need, f"{stored.path}: its compressed tensors decode to",
                      "a file whose header declares such shapes is damaged or crafted (load "
                      "it into a model of those shapes with sparsekit.load)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's string entries (``format``, ``pattern``, ``model``, user metadata).

    Checked as by :func:`read` (structure and seal) but without decoding any tensor, so
    it costs no more memory than the file.
    """
    return read_header(path)[0]


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """The header's string entries and what it declares of each tensor (shape, dtype,
    encoding, count), checked as by :func:`read_metadata`."""
    stored = _open(path)
    return dict(stored.meta), dict(stored.infos)


# -- the file: structure and seal -----------------------------------------------------------

@dataclass(frozen=True)
class _Stored:
    """A checked file: its tensors as stored (values, bitmaps, gaps), header and path."""

    parts: dict[str, torch.Tensor]
    infos: dict[str, TensorInfo]
    meta: dict[str, str]
    path: Path
    tied: dict[str, str]  # key -> the stored key it is the same tensor as


_SEAL_KEYS = frozenset({"format_version", "tensors", "digest"})
"""Metadata only a sparsekit checkpoint writes (a plain safetensors file with them is one
whose ``format`` entry was changed)."""


def _open(path: str | os.PathLike) -> _Stored:
    """Read ``path`` once and check its structure and seal; decode nothing."""
    path = _checked_path(path)
    raw = path.read_bytes()
    try:
        parts = st_load(raw)
        meta = _metadata(raw)
    except (SafetensorError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({err})") from None
    if meta.get("format") != FORMAT:  # a plain safetensors file: every tensor dense, no seal
        if sealed := sorted(_SEAL_KEYS & meta.keys()):
            # sparsekit's own keys under another format: a sealed file whose format entry
            # was changed, which would otherwise load as unsealed plain safetensors
            raise ValueError(f"{path} is not an intact checkpoint: it holds sparsekit's "
                             f"metadata {sealed} but its format is {meta.get('format')!r}, "
                             f"not {FORMAT!r}")
        infos = {
            k: TensorInfo("dense", tuple(v.shape), str(v.dtype), _count_nonzero(v),
                          False)
            for k, v in parts.items()
        }
        return _Stored(parts, infos, meta, path, {})
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{path}: format version {version!r} is not supported (this sparsekit reads "
            f"versions {', '.join(_READABLE_VERSIONS)} and writes {FORMAT_VERSION})"
        )
    try:
        entries = _header_entries(meta.get("tensors"), sealed=version != "1")
        infos = {k: _tensor_info(k, e) for k, e in entries.items()}
        _check_parts(infos, parts)
        if version == "1":
            _check_v1_digest(meta)
            warnings.warn(
                f"{path} has format version 1, whose digest covers the header only: its "
                "tensor data is not integrity-checked; save it again to seal it",
                UserWarning, stacklevel=3,
            )
        else:
            _check_seal(meta, entries, parts)
        tied = _tied_entry(meta.get("tied"), infos)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return _Stored(parts, infos, meta, path, tied)


def _check_path_type(path: object) -> str | os.PathLike:
    """Raise :class:`ArgumentTypeError` naming ``path`` unless it is a str or an
    ``os.PathLike`` (pathlib's own error, "expected str, bytes or os.PathLike object, not
    int", named no argument)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or os.PathLike path of a checkpoint "
                                f"file, got {type(path).__name__}")
    return path


def _checked_path(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint file to read: ``FileNotFoundError`` where nothing is there,
    ``ValueError`` naming it where a directory, a special file or a NUL character is (that
    was ``os.stat``'s "embedded null byte", naming nothing)."""
    path = Path(_check_path_type(path))
    if "\0" in str(path):
        raise ValueError(f"checkpoint {str(path)!r} holds a NUL character, which no file name "
                         "can; accepted: the path of an existing checkpoint file")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist") from None
    except OSError as err:  # a link loop, a path under a file, a name too long: raw OSErrors
        raise ValueError(f"checkpoint {str(path)!r} cannot be looked up: "
                         f"{err.strerror or err}; accepted: the path of an existing checkpoint "
                         "file") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if kind := special_kind(path):
        raise ValueError(f"checkpoint {str(path)!r} is a {kind}, not a regular file")
    return path


def _metadata(raw: bytes) -> dict[str, str]:
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict | None) or not all(
        isinstance(v, str) for v in (meta or {}).values()
    ):
        raise ValueError("__metadata__ must map strings to strings")
    return meta or {}


def _header_entries(text: object, *, sealed: bool) -> dict[str, dict]:
    """The ``tensors`` metadata as ``{name: entry}``, checked for its structure."""
    if not isinstance(text, str):
        raise ValueError("the header has no 'tensors' entry")
    try:
        entries = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:  # a resealed `[[[…]]]` too
        raise ValueError(f"'tensors' in the header is not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise ValueError(
            f"'tensors' in the header must be a JSON object of tensor entries, got a JSON "
            f"{type(entries).__name__}"
        )
    fields = _FIELDS | {_DIGEST_FIELD} if sealed else _FIELDS
    for key, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != fields:
            raise ValueError(
                f"header entry {key!r} must be an object with the fields {sorted(fields)}, "
                f"got {entry!r:.120}"
            )
    return entries


def _tensor_info(key: str, entry: dict) -> TensorInfo:
    """``entry`` as a TensorInfo, every field checked for its type and range."""
    encoding, shape, dtype = entry["encoding"], entry["shape"], entry["dtype"]
    nnz, masked = entry["nnz"], entry["masked"]
    # a list or an object there was a raw TypeError ("unhashable type") of the lookups
    if not isinstance(encoding, str) or encoding not in _ENCODINGS:
        raise ValueError(f"header entry {key!r}: encoding {encoding!r:.40} is not one of "
                         f"{sorted(_ENCODINGS)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise ValueError(f"header entry {key!r}: shape must be a list of non-negative "
                         f"integers, got {shape!r:.80}")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"header entry {key!r}: dtype {dtype!r:.40} is not a storable dtype")
    # torch counts elements and bytes in int64: a shape past that was a raw RuntimeError
    # ("Storage size calculation overflowed") of the meta placeholder, before any check
    if math.prod(shape) * _DTYPES[dtype].itemsize > _MAX_BYTES:
        raise ValueError(f"header entry {key!r}: shape {shape!r:.80} of {dtype} holds more "
                         f"bytes than a tensor can (at most {_MAX_BYTES:,})")
    if not _is_count(nnz) or nnz > math.prod(shape):
        raise ValueError(f"header entry {key!r}: nnz must be an integer in [0, "
                         f"{math.prod(shape)}], got {nnz!r:.40}")
    if not isinstance(masked, bool) or (masked and encoding == "dense"):
        raise ValueError(f"header entry {key!r}: masked must be a boolean, and a masked "
                         f"tensor is stored by position, got {masked!r:.20} with {encoding!r}")
    return TensorInfo(encoding, tuple(shape), dtype, nnz, masked)


def _tied_entry(text: str | None, infos: dict[str, TensorInfo]) -> dict[str, str]:
    """The header's ``tied`` entry: each key maps to a stored tensor it is not itself."""
    if text is None:
        return {}
    try:
        tied = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"'tied' in the header is not valid JSON ({err})") from None
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k not in infos and v in infos
        for k, v in tied.items()
    ):
        raise ValueError(
            f"'tied' in the header must map keys that are not stored to stored ones, got "
            f"{tied!r:.120}"
        )
    return tied


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_parts(infos: dict[str, TensorInfo], parts: dict[str, torch.Tensor]) -> None:
    """The stored tensors are exactly those the header describes, of consistent sizes."""
    expected = [f"{k}{suffix}" for k, info in infos.items() for suffix in _ENCODINGS[info.encoding]]
    if twice := sorted(n for n, c in Counter(expected).items() if c > 1)[:5]:
        raise ValueError(f"the header describes the stored tensors {twice} twice (a tensor "
                         "named like another's compressed parts)")
    if set(expected) != set(parts):
        extra, absent = sorted(set(parts) - set(expected)), sorted(set(expected) - set(parts))
        raise ValueError(f"the stored tensors do not match the header: not described "
                         f"{extra[:5]}, absent {absent[:5]}")
    for key, info in infos.items():
        if info.encoding == "dense":
            value = parts[key]
            if tuple(value.shape) != info.shape or str(value.dtype) != info.dtype:
                raise ValueError(f"tensor {key!r} does not match its header entry")
            # its nonzeros, as save counts them (bitwise for a float parameter: -0.0 counts);
            # a resealed nnz loaded silently and reported a false sparsity
            counts = {_count_nonzero(value)}
            if value.is_floating_point():
                counts.add(int(torch.count_nonzero(value.view(
                    SAME_WIDTH_INT[value.element_size()]))))
            if info.nnz not in counts:
                raise ValueError(f"tensor {key!r} holds {min(counts)} nonzeros, but its header "
                                 f"entry says nnz {info.nnz}")
            continue
        values, index = parts[f"{key}::values"], parts[f"{key}::{info.encoding}"]
        if values.dim() != 1 or str(values.dtype) != info.dtype or values.numel() != info.nnz:
            raise ValueError(f"values of {key!r} do not match the header ({info.nnz} "
                             f"{info.dtype} expected)")
        n = math.prod(info.shape)
        if info.encoding == "bitmap" and (
            index.dtype != torch.uint8 or index.dim() != 1 or index.numel() != -(-n // 8)
        ):
            raise ValueError(f"bitmap of {key!r} must be {-(-n // 8)} uint8 bytes")
        if info.encoding == "gaps" and (
            index.dtype not in _GAP_DTYPES or index.dim() != 1 or index.numel() != info.nnz
        ):
            raise ValueError(f"gaps of {key!r} must be {info.nnz} uint8, uint16 or int32")


def _tensor_digest(parts: dict[str, torch.Tensor]) -> str:
    """SHA-256 of one tensor's stored parts: each part's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(parts):
        t = parts[name]
        h.update(json.dumps([name, _ST_DTYPES[t.dtype], list(t.shape)]).encode())
        h.update(_bytes(t))
    return h.hexdigest()


def _header_digest(meta: dict[str, str]) -> str:
    """SHA-256 of every metadata entry but the digest itself, in canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_seal(meta: dict[str, str], entries: dict[str, dict],
                parts: dict[str, torch.Tensor]) -> None:
    if _header_digest(meta) != meta.get("digest"):
        raise ValueError("header digest mismatch — the header was modified or damaged")
    for key, entry in entries.items():
        own = {n: parts[n] for n in (f"{key}{s}" for s in _ENCODINGS[entry["encoding"]])}
        if _tensor_digest(own) != entry[_DIGEST_FIELD]:
            raise ValueError(f"tensor {key!r} does not match its header entry (SHA-256 "
                             "mismatch) — its data was modified or damaged")


def _check_v1_digest(meta: dict[str, str]) -> None:
    if hashlib.sha256(meta["tensors"].encode()).hexdigest() != meta.get("digest"):
        raise ValueError("header digest mismatch — the header was modified or damaged")


# -- the model: checks before decoding ------------------------------------------------------

def _check_whole(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` is sharded (FSDP2's ``fully_shard`` or tensor
    parallelism: its parameters are ``DTensor`` shards): a checkpoint holds whole tensors,
    and both ``save`` and ``load`` failed with a raw ``RuntimeError`` ("Attempted to access
    the data pointer on an invalid python storage")."""
    if is_sharded(model):
        raise ValueError(
            "model is sharded (its parameters are DTensor shards, from fully_shard or tensor "
            "parallelism); accepted: a model whose tensors are whole. Save the model before "
            "sharding it (or a copy given its full state dict: torch.distributed.checkpoint."
            "state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True))), and load into a model before sharding it")


def _check_writable(model: nn.Module) -> None:
    """:func:`~sparsekit._checks.check_writable` of every tensor of ``model``:
    ``load_state_dict`` raised a raw ``RuntimeError`` for each inference tensor, after
    copying the values in (the model loaded, no masks returned)."""
    for key, tensor in model.state_dict().items():
        check_writable(f"model: tensor {key!r}", tensor)


def _check_state(model: nn.Module, why: str) -> None:
    """Raise ``ValueError`` unless every entry of ``model.state_dict()`` is a tensor that
    holds values: one that is no tensor (the dict a module's ``get_extra_state`` returns)
    failed with a raw ``AttributeError``, a sparse one with a raw ``NotImplementedError``;
    one on the meta device (``why`` says what that
    rules out) failed a save with a raw ``NotImplementedError``, "Cannot copy out of meta
    tensor"."""
    state = model.state_dict()
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise ValueError(
            f"model: its state_dict entries {other[:3]} are no tensors (a "
            f"{type(state[other[0]]).__name__}, from a module's get_extra_state()); accepted: "
            "a model whose state_dict holds tensors only, which a checkpoint (safetensors) "
            "stores")
    sparse = [k for k, v in state.items() if v.layout != torch.strided]
    if sparse:  # a raw NotImplementedError ("Cannot access storage of SparseTensorImpl")
        raise ValueError(
            f"model: its state_dict entries {sparse[:3]} are {state[sparse[0]].layout} "
            "tensors; accepted: dense (strided) tensors, which a checkpoint (safetensors) "
            "stores: register such a tensor dense, or as its parts (indices and values)")
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        raise ValueError(
            f"model has tensors on the meta device ({meta[:3]}), so {why}; materialize it "
            "first, e.g. model.to_empty(device='cpu'), and load its weights"
        )


def _declared_state(stored: _Stored) -> dict[str, torch.Tensor]:
    """What the file declares, decoding nothing: dense tensors as stored (their bytes are
    in the file), compressed ones as meta-device placeholders of their declared shape."""
    state = {
        key: stored.parts[key] if info.encoding == "dense"
        else torch.empty(info.shape, dtype=_DTYPES[info.dtype], device="meta")
        for key, info in stored.infos.items()
    }
    return state | {key: state[source] for key, source in stored.tied.items()}


def _check_decodable(own: dict[str, torch.Tensor], stored: _Stored) -> None:
    """A compressed entry decodes to its declared shape, which the file's size does not
    bound, so it must be one of the model's own tensors with that shape and dtype."""
    for key, info in stored.infos.items():
        mine = own.get(key)
        if info.encoding != "dense" and (
            mine is None or tuple(mine.shape) != info.shape or str(mine.dtype) != info.dtype
        ):
            raise ValueError(
                f"{stored.path}: tensor {key!r} is stored compressed as {info.shape} "
                f"{info.dtype}, a size this model takes from the file (a compiled layer of "
                "another format); since format version 2 such tensors are stored as they are: "
                "load the file into a model of the same formats and save it again"
            )


def _check_ties(path: str | os.PathLike, own: dict[str, torch.Tensor],
                state: dict[str, torch.Tensor]) -> None:
    """Raise unless ``state`` gives the same bits to the keys ``model`` ties (one tensor
    under two names): loading a file of an untied model kept only the later key's values,
    silently dropping the other's."""
    for key, first in _tied_keys(own).items():
        a, b = state[first], state[key]
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        if not same:
            raise ValueError(
                f"{path}: the model ties {key!r} to {first!r} (one tensor), but the file holds "
                "different values for them (saved from an untied model?); loading would keep "
                f"only one; untie them in the model or load into a model of the file's layout")


def expected_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the entries of its size-dependent layers taken from ``state``.

    A layer whose stored tensors depend on what is loaded (a compiled layer's format and
    number of nonzeros, a ``SparseLinear``'s structure) defines
    ``expected_state(state, prefix)``: its own entries as they will be after loading
    ``state`` (``None`` when ``state`` has none of them), checked before anything is loaded
    and raising ``ValueError`` naming the layer if invalid. Missing or extra keys elsewhere
    are left for the caller to report.
    """
    own = model.state_dict()
    for name, module in model.named_modules(remove_duplicate=False):
        layer_state = getattr(module, "expected_state", None)
        prefix = f"{name}." if name else ""
        entries = layer_state(state, prefix) if callable(layer_state) else None
        if entries is not None:
            own = {k: v for k, v in own.items() if not k.startswith(prefix)} | entries
    return own


# -- encoding -------------------------------------------------------------------------

def _tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for every ``state_dict`` entry that is the same tensor as an
    earlier one (same storage, offset, shape, strides and dtype): stored once."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for key, value in state.items():
        if value.numel() == 0:
            continue
        view = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                tuple(value.shape), value.stride(), value.dtype)
        if view in first:
            tied[key] = first[view]
        else:
            first[view] = key
    return tied


def _count_nonzero(t: torch.Tensor) -> int:
    """``torch.count_nonzero`` of a tensor of any dtype a checkpoint stores: PyTorch has
    no kernel for unsigned ints wider than 8 bits nor for float8 (a raw
    ``NotImplementedError`` saving such a buffer, or reading a plain safetensors file of
    one). Their same-width ints (unsigned) and float32 (float8, exactly) count alike."""
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        t = t.view(SAME_WIDTH_INT[t.element_size()])
    elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.float()
    return int(torch.count_nonzero(t))


def _check_masked_zero(key: str, dropped: torch.Tensor) -> None:
    """Masked weights are stored as +0.0 and not at all: anything else would be lost. A zero
    that is not +0.0 is told by its bits (all clear only for +0.0), which every dtype has
    (``signbit`` of a complex weight was a raw ``NotImplementedError``)."""
    nonzero = dropped.ne(0)
    bits = dropped.view(SAME_WIDTH_INT[dropped.element_size()])
    negative = int((bits.ne(0) & ~nonzero).sum())
    nonzero = int(nonzero.sum())
    if nonzero or negative:
        raise ValueError(
            f"masks: weights of {key!r} are not +0.0 where masked: {nonzero} nonzero and "
            f"{negative} -0.0 of {dropped.numel()} masked entries, which a checkpoint cannot "
            "store; call masks.apply() (it writes +0.0) before saving"
        )


def _encode(
    value: torch.Tensor, keep: torch.Tensor | None, nnz: int, *, force: bool = False
) -> tuple[str, dict[str, torch.Tensor]]:
    """Smallest of dense / bitmap / gaps for ``value`` with ``nnz`` kept positions ``keep``
    (None: store dense). ``force`` excludes dense. Gaps, whose size needs the index of every
    kept entry, are built only when their lower bound (1 byte each) beats the bitmap.
    """
    if keep is None:
        return "dense", {"": value}
    n, item = value.numel(), value.element_size()
    bitmap_size, gaps_floor = nnz * item + -(-n // 8), nnz * (item + 1)
    flat = keep.flatten()
    values = value.flatten()[flat]
    options = [("bitmap", {"::values": values, "::bitmap": _pack(flat)})]
    if gaps_floor < bitmap_size:
        idx = torch.nonzero(flat).flatten()
        gaps = torch.diff(idx, prepend=idx.new_zeros(1)) if idx.numel() else idx
        options.append(("gaps", {"::values": values, "::gaps": gaps.to(_gap_dtype(gaps))}))
    if not force:
        options.append(("dense", {"": value}))
    return min(options, key=lambda o: sum(t.numel() * t.element_size() for t in o[1].values()))


def _sparse_may_win(n: int, nnz: int, item: int) -> bool:
    """Whether bitmap or gaps can be smaller than ``n`` dense entries of ``item`` bytes
    (gaps take at least one byte each)."""
    return n * item >= nnz * item + min(-(-n // 8), nnz)


def _gap_dtype(gaps: torch.Tensor) -> torch.dtype:
    top = int(gaps.max()) if gaps.numel() else 0
    return torch.uint8 if top < 2**8 else torch.uint16 if top < 2**16 else torch.int32


def _pack(flat: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat.to(torch.uint8)
    return (padded.reshape(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor) -> torch.Tensor:
    return (bits.reshape(-1, 1) & _BITS).ne(0).flatten()


def _decode_all(stored: _Stored, model: nn.Module | None = None) -> Checkpoint:
    """Decode every tensor of a checked file; raise ``ValueError`` on bad indices or masks
    that do not follow the declared pattern (as ``model``'s parameters, if given)."""
    try:
        decoded = {k: _decode(k, info, stored.parts) for k, info in stored.infos.items()}
        _check_pattern(stored.meta.get("pattern", "none"), stored.infos, decoded, model)
    except ValueError as err:
        raise ValueError(f"{stored.path}: {err}") from None
    state = {k: v for k, (v, _) in decoded.items()}
    state |= {key: state[source] for key, source in stored.tied.items()}
    kept = {k: m for k, (_, m) in decoded.items() if m is not None}
    return Checkpoint(state, kept, dict(stored.infos), dict(stored.meta))


def _decode(
    key: str, info: TensorInfo, parts: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense tensor and, for sparse encodings, the boolean mask of stored positions.

    Sizes were checked against the header (:func:`_check_parts`); here the positions are:
    gaps non-negative (strictly positive after the first) and in range, bitmap padding
    clear, one position per value.
    """
    if info.encoding == "dense":
        return parts[key], None
    values, n = parts[f"{key}::values"], math.prod(info.shape)
    if info.encoding == "bitmap":
        flat = _unpack(parts[f"{key}::bitmap"])
        if bool(flat[n:].any()):
            raise ValueError(f"bitmap of {key!r} has bits set past its {n} entries")
        kept = flat[:n]
        if int(kept.sum()) != values.numel():
            raise ValueError(f"{key!r}: {int(kept.sum())} positions for {values.numel()} values")
    else:
        gaps = parts[f"{key}::gaps"].to(torch.int64)
        idx = gaps.cumsum(0)
        if idx.numel() and (int(gaps[0]) < 0 or bool((gaps[1:] <= 0).any())
                            or int(idx[-1]) >= n):
            raise ValueError(
                f"gaps of {key!r} must be non-negative, positive after the first, and stay "
                f"below its {n} entries"
            )
        kept = torch.zeros(n, dtype=torch.bool)
        kept[idx] = True
    # placed as same-width integers: bit for bit, and for every dtype (PyTorch cannot index
    # a float8 tensor: a compressed float8 parameter was written, then never read back)
    bits = SAME_WIDTH_INT[values.element_size()]
    out = torch.zeros(n, dtype=bits)
    out[kept] = values.view(bits)
    return out.view(values.dtype).reshape(info.shape), kept.reshape(info.shape)


def _check_pattern(spec: str, infos: dict[str, TensorInfo],
                   decoded: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                   model: nn.Module | None) -> None:
    """Every saved mask follows the pattern the header declares (a known pattern), seen as
    the pattern sees ``model``'s parameter (:func:`~sparsekit.masks.pattern_view`: GPT-2's
    ``Conv1D`` stores its weight ``(in, out)``). Without a model a 2-D mask may follow it
    in either orientation: the file does not say which one its layer stores."""
    masked = [key for key, info in infos.items() if info.masked]
    if not masked:
        return
    pattern = parse_pattern(spec)
    for key in masked:
        mask = decoded[key][1]
        if mask is None or keeps_everything(mask):
            continue
        if model is not None:
            views = [pattern_view(model, key, mask)]
            pattern.check(views[0].shape, key)
        else:
            views = [v for v in ((mask, mask.t()) if mask.dim() == 2 else (mask,))
                     if _fits(pattern, v.shape, key)]
        if not any(pattern.is_valid(view) for view in views):
            raise ValueError(f"the mask of {key!r} does not follow the declared pattern "
                             f"{spec!r}")


def _fits(pattern: Pattern, shape: torch.Size, key: str) -> bool:
    """Whether ``pattern`` applies to a tensor of ``shape`` at all."""
    try:
        pattern.check(shape, key)
    except ValueError:
        return False
    return True


# -- writing: deterministic bytes, atomic and durable ----------------------------------------

def _atomic_write(path: Path, parts: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a safetensors file of ``parts`` and ``meta`` to ``path`` atomically.

    The bytes depend only on the inputs (sorted metadata and tensors); the file goes to a
    temporary ``.NAME.PID-XXXXXXXX.tmp`` beside ``path`` that is fsynced and renamed over
    ``path``, and the directory is fsynced (:func:`~sparsekit._atomic.atomic_write`). Where
    ``path`` is a symbolic link, the file it leads to is replaced (and its stale temporary
    files, which lie beside it, removed).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header, ordered = _layout(parts, meta)
    _remove_stale_temps(write_target(path))
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        for t in ordered:
            f.write(_bytes(t))
    return path


def _layout(parts: dict[str, torch.Tensor],
            meta: dict[str, str]) -> tuple[bytes, list[torch.Tensor]]:
    """The safetensors header and the tensors in file order: widest dtype first (so every
    tensor is aligned), then by name; metadata sorted; header padded to 8 bytes."""
    ordered = sorted(parts, key=lambda k: (-parts[k].element_size(), k))
    entries: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for name in ordered:
        t = parts[name]
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [parts[n] for n in ordered]


def _bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files that killed saves to ``path`` left behind.

    Only files named like this module's temporaries for ``path`` (``.NAME.PID-XXXXXXXX.tmp``,
    or ``.NAME.XXXXXXXX.tmp`` from format version 1) are candidates, and only those no live
    writer can own: unmodified for :data:`STALE_TEMP_AGE_S` seconds and, where the name
    carries a process id, that process is not running on this machine. A writer on another
    machine sharing the directory is protected by the age alone. Failures are ignored.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-)?[a-z0-9_]{{8}}\.tmp")
    now = time.time()
    for candidate in _listdir(path.parent):
        match = pattern.fullmatch(candidate)
        if match is None:
            continue
        stale = path.parent / candidate
        try:
            if now - stale.stat().st_mtime < STALE_TEMP_AGE_S:
                continue
            if match[1] is not None and _process_alive(int(match[1])):
                continue
            stale.unlink()
        except OSError:
            continue


def _listdir(directory: Path) -> Iterable[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return ()


def _process_alive(pid: int) -> bool:
    if os.name == "nt" or pid == os.getpid():  # on Windows os.kill would terminate it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # e.g. another user's process
        return True
    return True
