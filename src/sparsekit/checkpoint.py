"""Compressed, atomic, pickle-free checkpoints: ``save`` / ``load``.

A checkpoint is a safetensors file. Sparse tensors are stored as their kept values
plus the kept positions, as a bitmap (1 bit per entry) or as gaps between successive
flat indices in the narrowest unsigned integer type — whichever is smaller. The
header holds a format version and, per tensor, its encoding, shape, dtype and
sparsity, sealed with a SHA-256 digest so a tampered header is detected. Files are
written to a temporary file and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from sparsekit.masks import MaskSet

FORMAT = "sparsekit"
FORMAT_VERSION = "1"
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


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
        numel = _numel(self.shape)
        return 1.0 - self.nnz / numel if numel else 0.0


def save(
    model: nn.Module,
    path: str | os.PathLike,
    masks: MaskSet | None = None,
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model.state_dict()`` compressed to ``path`` (atomically) and return the path.

    With ``masks``, their parameters are stored by mask (masked entries must be zero);
    otherwise any floating tensor of rank ≥ 2 is stored compressed whenever that is
    smaller. ``metadata`` adds free-form string entries to the header; a model built
    by :mod:`sparsekit.models` also records how to rebuild it (``"model"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if masks is not None and not isinstance(masks, MaskSet):
        raise TypeError(f"masks must be a MaskSet or None, got {type(masks).__name__}")
    mask_of = masks.masks if masks is not None else {}
    state = model.state_dict()
    for key, m in mask_of.items():
        if key not in state or state[key].shape != m.shape:
            raise ValueError(
                f"masks: entry {key!r} {tuple(m.shape)} matches no tensor of the model's "
                "state_dict (were the masks made for another model?)"
            )
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, dict] = {}
    for key, value in state.items():
        value = value.detach().cpu().contiguous()
        if key in mask_of:
            keep = mask_of[key].cpu()
            dropped = value[~keep]
            if bool((dropped.ne(0) | dropped.signbit()).any()):
                raise ValueError(
                    f"masks: weights of {key!r} are not +0.0 where masked; call masks.apply() "
                    "(or attach the masks to the optimizer) before saving"
                )
        elif value.is_floating_point() and value.dim() >= 2:
            keep = value.ne(0) | value.signbit()  # bitwise nonzero, so -0.0 round-trips
        else:
            keep = None
        encoding, parts = _encode(value, keep)
        if encoding == "dense" and key in mask_of:
            encoding, parts = _encode(value, keep, force=True)
        tensors.update({f"{key}{suffix}": t for suffix, t in parts.items()})
        infos[key] = {
            "encoding": encoding, "shape": list(value.shape), "dtype": str(value.dtype),
            "nnz": int(keep.sum()) if keep is not None else int(value.ne(0).sum()),
            "masked": key in mask_of,
        }
    header = json.dumps(infos, sort_keys=True)
    meta = {
        **({"model": json.dumps(model.sparsekit_config)} if hasattr(model, "sparsekit_config")
           else {}),
        **(metadata or {}),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pattern": masks.pattern if masks is not None else "none",
        "tensors": header,
        "digest": hashlib.sha256(header.encode()).hexdigest(),
    }
    return _atomic_write(Path(path), st_save(tensors, metadata=meta))


def load(model: nn.Module, path: str | os.PathLike) -> MaskSet:
    """Load a checkpoint into ``model`` and return its masks as an applied MaskSet.

    A file saved with ``masks`` gives back exactly those masks; a file saved without
    gives masks for the parameters that were stored compressed.

    Everything is decoded and checked against the model (names, shapes, dtypes)
    before the model is touched: a file for another architecture, a truncated file or
    a tampered header raises ``ValueError`` and leaves the model unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ckpt = read(path)
    state = ckpt.state
    try:
        own = expected_state(model, state)
    except ValueError as err:
        raise ValueError(f"{path} does not match this model: {err}") from None
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model (another architecture?): missing "
            f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if value.shape != own[key].shape or value.dtype != own[key].dtype:
            raise ValueError(
                f"{path}: tensor {key!r} is {tuple(value.shape)} {value.dtype}, the model "
                f"has {tuple(own[key].shape)} {own[key].dtype}"
            )
    model.load_state_dict(state, strict=True)
    params = dict(model.named_parameters())
    # Saved with a MaskSet: exactly its masks. Saved without: every compressed parameter.
    with_masks = any(info.masked for info in ckpt.infos.values())
    masks = {k: m for k, m in ckpt.kept.items()
             if k in params and (ckpt.infos[k].masked or not with_masks)}
    pattern = ckpt.meta.get("pattern", "unstructured")
    return MaskSet(model, masks, pattern="unstructured" if pattern == "none" else pattern)


@dataclass(frozen=True)
class Checkpoint:
    """A decoded checkpoint: dense tensors, kept positions of the sparse ones, the header."""

    state: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]
    infos: dict[str, TensorInfo]
    meta: dict[str, str]


def read(path: str | os.PathLike) -> Checkpoint:
    """Decode a checkpoint without a model. Plain safetensors files read as all-dense."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        stored = st_load(raw)
        meta = _metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({err})") from None
    if meta.get("format") != FORMAT:
        infos = {
            k: TensorInfo("dense", tuple(v.shape), str(v.dtype), int(v.ne(0).sum()), False)
            for k, v in stored.items()
        }
        return Checkpoint(stored, {}, infos, meta)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('format_version')!r} is not supported "
            f"(this sparsekit reads version {FORMAT_VERSION})"
        )
    header = meta.get("tensors", "")
    if hashlib.sha256(header.encode()).hexdigest() != meta.get("digest"):
        raise ValueError(f"{path}: header digest mismatch — the header was modified or damaged")
    try:
        infos = {
            k: TensorInfo(v["encoding"], tuple(v["shape"]), v["dtype"], v["nnz"], v["masked"])
            for k, v in json.loads(header).items()
        }
        decoded = {k: _decode(k, info, stored) for k, info in infos.items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: inconsistent checkpoint ({err})") from None
    state = {k: v for k, (v, _) in decoded.items()}
    kept = {k: m for k, (_, m) in decoded.items() if m is not None}
    return Checkpoint(state, kept, infos, meta)


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

def _encode(
    value: torch.Tensor, keep: torch.Tensor | None, *, force: bool = False
) -> tuple[str, dict[str, torch.Tensor]]:
    """Smallest of dense / bitmap / gaps for ``value`` with kept positions ``keep``."""
    dense = ("dense", {"": value})
    if keep is None:
        return dense
    flat = keep.flatten()
    values = value.flatten()[flat]
    idx = torch.nonzero(flat).flatten()
    gaps = torch.diff(idx, prepend=idx.new_zeros(1)) if idx.numel() else idx
    options = [
        ("bitmap", {"::values": values, "::bitmap": _pack(flat)}),
        ("gaps", {"::values": values, "::gaps": gaps.to(_gap_dtype(gaps))}),
    ]
    if not force:
        options.append(dense)
    return min(options, key=lambda o: sum(t.numel() * t.element_size() for t in o[1].values()))


def _gap_dtype(gaps: torch.Tensor) -> torch.dtype:
    top = int(gaps.max()) if gaps.numel() else 0
    return torch.uint8 if top < 2**8 else torch.uint16 if top < 2**16 else torch.int32


def _pack(flat: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat.to(torch.uint8)
    return (padded.reshape(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    return (bits.reshape(-1, 1) & _BITS).ne(0).flatten()[:n]


def _decode(
    key: str, info: TensorInfo, stored: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense tensor and, for sparse encodings, the boolean mask of stored positions."""
    if info.encoding == "dense":
        value = stored[key]
        if tuple(value.shape) != info.shape or str(value.dtype) != info.dtype:
            raise ValueError(f"tensor {key!r} does not match its header entry")
        return value, None
    values, n = stored[f"{key}::values"], _numel(info.shape)
    if str(values.dtype) != info.dtype or values.numel() != info.nnz:
        raise ValueError(f"values of {key!r} do not match the header ({info.nnz} expected)")
    if info.encoding == "bitmap":
        bits = stored[f"{key}::bitmap"]
        if bits.numel() != -(-n // 8):
            raise ValueError(f"bitmap of {key!r} has the wrong length")
        flat = _unpack(bits, n)
        idx = torch.nonzero(flat).flatten()
    elif info.encoding == "gaps":
        gaps = stored[f"{key}::gaps"].to(torch.int64)
        idx = gaps.cumsum(0)
        if idx.numel() and (int(idx[-1]) >= n or bool((gaps[1:] <= 0).any())):
            raise ValueError(f"indices of {key!r} are out of range or not increasing")
    else:
        raise ValueError(f"unknown encoding {info.encoding!r} for {key!r}")
    if idx.numel() != values.numel():
        raise ValueError(f"{key!r}: {idx.numel()} positions for {values.numel()} values")
    out = torch.zeros(n, dtype=values.dtype)
    out[idx] = values
    kept = torch.zeros(n, dtype=torch.bool)
    kept[idx] = True
    return out.reshape(info.shape), kept.reshape(info.shape)


def _metadata(raw: bytes) -> dict[str, str]:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]).get("__metadata__") or {}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
