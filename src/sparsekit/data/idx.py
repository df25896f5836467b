"""Reader for the IDX binary format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0, 0, dtype code, ndims``, then ``ndims``
big-endian uint32 sizes, then the data in big-endian row-major order.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

# IDX type code -> big-endian numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (gzip-compressed when its name ends in ``.gz``) into a tensor."""
    path = Path(path)
    try:
        with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: corrupt gzip stream ({e})") from None

    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        codes = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise ValueError(
            f"{path}: bad IDX magic number {data[:4].hex()!r}; expected bytes 00 00, a type "
            f"code in ({codes}) and the number of dimensions"
        )
    dtype, ndims = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndims
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header: expected {header} bytes, got {len(data)}")
    shape = struct.unpack(f">{ndims}I", data[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes in"
        raise ValueError(
            f"{path}: {problem} IDX file: expected {expected} bytes for shape {shape}, "
            f"got {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))
