"""Compressed weight formats: how a sparse ``nn.Linear`` weight is stored and multiplied.

Each format is built from a dense 2-D weight and a boolean mask (``True`` = kept), keeps
only its compressed tensors as buffers (no dense copy), and computes ``x @ W.T`` for ``x``
of shape ``(..., in_features)`` with :meth:`Format.matmul`. :data:`FORMATS` is the registry
of the names accepted by :func:`sparsekit.engine.compile`, with each format's metadata
(weight ``dtypes`` it holds, ``device`` it runs on, ``threaded``); each format's
:attr:`Format.value_dtypes` are the dtypes it can store the values in.

The buffers are plain dense tensors (values, indices, row pointers), so a format's
``state_dict`` is its compressed weight; :func:`format_from_state` rebuilds a format from
one, recognising it by its buffer names (:attr:`Format.buffer_names`, plus any of
:attr:`Format.optional_buffers`: the ``scales`` of int8 values).

One file per format family; a new format is a :class:`Format` subclass registered in
:data:`FORMATS` (and, if it needs native code, a ``.cpp`` file in ``engine/kernels``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sparsekit._checks import ArgumentTypeError
from sparsekit.engine.formats.base import Format
from sparsekit.engine.formats.bitmap import Bitmap
from sparsekit.engine.formats.bsr import BSR
from sparsekit.engine.formats.csr import CSR16, TorchCSR
from sparsekit.engine.formats.cuda import CudaBSR, CudaSemiStructured
from sparsekit.engine.formats.dense import DenseFormat, DenseLowPrecision
from sparsekit.engine.formats.fanin import ConstantFanIn
from sparsekit.engine.formats.nm import PackedNM
from sparsekit.registry import Registry

__all__ = [
    "BSR", "FORMATS", "CSR16", "Bitmap", "ConstantFanIn", "CudaBSR", "CudaSemiStructured",
    "DenseFormat", "DenseLowPrecision", "Format", "FormatRegistry", "PackedNM", "TorchCSR",
    "available_formats", "check_formats", "format_from_state",
]


class FormatRegistry(Registry[type[Format]]):
    """The :class:`~sparsekit.registry.Registry` of formats, also read like the ``dict`` it
    once was: ``FORMATS[name]`` and ``FORMATS.values()``."""

    def __getitem__(self, name: str) -> type[Format]:
        return self.get(name)

    def values(self) -> list[type[Format]]:
        """The format classes, by name."""
        return [self.get(n) for n in self.names()]


FORMATS = FormatRegistry(
    "format", meta={"dtypes": None, "device": None, "threaded": False}, ordered=True
)
for _format in (
    DenseFormat, TorchCSR, CSR16, Bitmap, PackedNM, BSR, ConstantFanIn, DenseLowPrecision,
    CudaSemiStructured, CudaBSR,
):
    FORMATS.register(
        _format.name, dtypes=_format.dtypes, device=_format.device, threaded=_format.threaded
    )(_format)


def check_formats(formats: str | Iterable[str]) -> list[str] | None:
    """The format names ``formats`` asks for, checked: ``None`` for ``"auto"`` (every format
    that can hold a layer's weight), else the list of names, each in :data:`FORMATS`.

    The ``formats=`` argument of :func:`sparsekit.engine.compile` and of a recipe's
    ``compile`` stage. A value that is neither a str nor an iterable of them is an
    :class:`~sparsekit._checks.ArgumentTypeError`; an unknown name, or no name at all, a
    ``ValueError`` naming the accepted ones.
    """
    if isinstance(formats, str):
        if formats == "auto":
            return None
        formats = [formats]
    if not isinstance(formats, Iterable):
        raise ArgumentTypeError(f"formats must be 'auto' or names from {FORMATS.names()}, got "
                                f"{formats!r}")
    names = list(formats)
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ValueError(
            f"formats must be 'auto' or names from {FORMATS.names()}, got {bad or names!r}"
        )
    return names


def available_formats(weight: torch.Tensor, value_dtype: torch.dtype | None = None) -> list[str]:
    """Names of the formats that can hold ``weight`` here with values of ``value_dtype``
    (``None``: ``weight``'s dtype; ``"dense"``, which holds the weight as it is, always
    first)."""
    value_dtype = value_dtype or weight.dtype
    others = [
        n for n in FORMATS.names()
        if n != "dense" and FORMATS.get(n).supports(weight)
        and value_dtype in (FORMATS.get(n).value_dtypes or (weight.dtype,))
    ]
    return ["dense", *others]


def format_from_state(
    state: dict[str, torch.Tensor], shape: tuple[int, int], **kwargs: object
) -> Format:
    """The format whose :attr:`~Format.buffer_names` are the keys of ``state``, with
    perhaps some of its :attr:`~Format.optional_buffers`.

    ``kwargs`` (``threads``) go to the :attr:`~Format.threaded` formats. Raises
    ``ValueError`` for keys of no format or tensors that do not form a ``shape`` weight
    (int8 values without valid ``scales`` among them).
    """
    keys = set(state)
    for fmt in FORMATS.values():
        if set(fmt.buffer_names) <= keys <= {*fmt.buffer_names, *fmt.optional_buffers}:
            return fmt.from_state(state, shape, **(kwargs if fmt.threaded else {}))
    accepted = {
        fmt.name: [*fmt.buffer_names, *(f"{k}?" for k in fmt.optional_buffers)]
        for fmt in FORMATS.values()
    }
    raise ValueError(f"state keys {sorted(keys)} match no format; accepted: {accepted}")
