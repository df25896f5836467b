"""Compressed weight formats: how a sparse ``nn.Linear`` weight is stored and multiplied.

Each format is built from a dense 2-D weight and a boolean mask (``True`` = kept), keeps
only its compressed tensors as buffers (no dense copy), and computes ``x @ W.T`` for ``x``
of shape ``(..., in_features)`` with :meth:`Format.matmul`. :data:`FORMATS` maps the names
accepted by :func:`sparsekit.engine.compile` to the classes.

The buffers are plain dense tensors (values, indices, row pointers), so a format's
``state_dict`` is its compressed weight; :func:`format_from_state` rebuilds a format from
one, recognising it by its buffer names (:attr:`Format.buffer_names`).

One file per format family; a new format is a :class:`Format` subclass added to
:data:`FORMATS` (and, if it needs native code, a ``.cpp`` file in ``engine/kernels``).
"""

from __future__ import annotations

import torch

from sparsekit.engine.formats.base import Format
from sparsekit.engine.formats.bitmap import Bitmap
from sparsekit.engine.formats.bsr import BSR
from sparsekit.engine.formats.csr import CSR16, TorchCSR
from sparsekit.engine.formats.cuda import CudaBSR, CudaSemiStructured
from sparsekit.engine.formats.dense import DenseFormat
from sparsekit.engine.formats.fanin import ConstantFanIn
from sparsekit.engine.formats.nm import PackedNM

__all__ = [
    "BSR", "FORMATS", "CSR16", "Bitmap", "ConstantFanIn", "CudaBSR", "CudaSemiStructured",
    "DenseFormat", "Format", "PackedNM", "TorchCSR", "available_formats", "format_from_state",
]


FORMATS: dict[str, type[Format]] = {
    f.name: f for f in (
        DenseFormat, TorchCSR, CSR16, Bitmap, PackedNM, BSR, ConstantFanIn, CudaSemiStructured,
        CudaBSR,
    )
}


def available_formats(weight: torch.Tensor) -> list[str]:
    """Names of the formats that can hold ``weight`` here (``"dense"`` always first)."""
    return [name for name, fmt in FORMATS.items() if fmt.supports(weight)]


def format_from_state(
    state: dict[str, torch.Tensor], shape: tuple[int, int], **kwargs: object
) -> Format:
    """The format whose :attr:`~Format.buffer_names` are exactly the keys of ``state``.

    ``kwargs`` (``threads``) go to the :attr:`~Format.threaded` formats. Raises
    ``ValueError`` for keys of no format or tensors that do not form a ``shape`` weight.
    """
    keys = set(state)
    for fmt in FORMATS.values():
        if keys == set(fmt.buffer_names):
            return fmt.from_state(state, shape, **(kwargs if fmt.threaded else {}))
    accepted = {n: list(f.buffer_names) for n, f in FORMATS.items()}
    raise ValueError(f"state keys {sorted(keys)} match no format; accepted: {accepted}")
