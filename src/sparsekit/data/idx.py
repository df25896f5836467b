"""Reader for the IDX binary format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0, 0, dtype code, ndims``, then ``ndims``
big-endian uint32 sizes, then the data in big-endian row-major order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from sparsekit._checks import ArgumentTypeError

# IDX type code -> big-endian numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


_CHUNK = 1 << 20  # bytes read at a time, so memory follows the data the file really holds


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) into a tensor.

    Only as many bytes as the header declares (plus one, to detect trailing data) are
    read: a small ``.gz`` that decompresses to gigabytes fails after the header's size,
    not after filling memory. A corrupt gzip stream, truncated or with a bad deflate
    block or CRC, is a ``ValueError`` like every other malformed file.
    """
    check_path("path", path)
    path = Path(path)
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            return _read(path, f)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt gzip stream ({e})") from None


def check_path(name: str, value: object) -> None:
    """Raise :class:`ArgumentTypeError` naming ``name`` unless ``value`` is a path (a str or
    an ``os.PathLike``): ``None`` or a number was a bare ``TypeError`` from ``Path``."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a str or an os.PathLike, got "
                                f"{value!r}")


def _read(path: Path, f: BinaryIO) -> torch.Tensor:
    """Parse the open IDX file ``f`` (named ``path`` in errors), reading no more of it than
    its header declares plus one byte."""
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
        codes = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise ValueError(
            f"{path}: bad IDX magic number {magic.hex()!r}; expected bytes 00 00, a type "
            f"code in ({codes}) and the number of dimensions"
        )
    dtype, ndims = _DTYPES[magic[2]], magic[3]
    header = 4 + 4 * ndims
    sizes = f.read(4 * ndims)
    if len(sizes) < 4 * ndims:
        raise ValueError(
            f"{path}: truncated IDX header: expected {header} bytes, got {4 + len(sizes)}"
        )
    shape = struct.unpack(f">{ndims}I", sizes)
    expected = header + math.prod(shape) * dtype.itemsize
    data = _read_at_most(f, expected - header + 1)
    if header + len(data) != expected:
        truncated = header + len(data) < expected
        raise ValueError(
            f"{path}: {'truncated' if truncated else 'trailing bytes in'} IDX file: expected "
            f"{expected} bytes for shape {shape}, got "
            f"{header + len(data) if truncated else 'more'}"
        )
    array = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


def _read_at_most(f: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes of ``f``, fewer at its end, read in chunks: a header declaring
    a huge shape allocates only what the file holds."""
    chunks = []
    while size > 0:
        chunk = f.read(min(size, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
