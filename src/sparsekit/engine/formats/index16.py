"""16-bit column indices: stored as int16, read as uint16 (torch has no uint16 indexing)."""

from __future__ import annotations

import torch

__all__ = ["narrow_index", "unsigned_index"]


def narrow_index(index: torch.Tensor, extent: int) -> torch.Tensor:
    """``index`` (values in ``[0, extent)``) as int16 when ``extent <= 65536``, else int32."""
    if extent <= 65536:
        return torch.where(index >= 32768, index - 65536, index).to(torch.int16)
    return index.to(torch.int32)


def unsigned_index(index: torch.Tensor) -> torch.Tensor:
    """int16/int32 indices as int64, int16 ones read as uint16."""
    wide = index.to(torch.int64)
    return wide & 0xFFFF if index.dtype == torch.int16 else wide
