"""BSR: block compressed sparse rows for block-pruned weights (``block:RxC`` patterns)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekit._checks import check_int
from sparsekit.engine.formats.csr import entry_rows
from sparsekit.engine.formats.index16 import narrow_index, unsigned_index
from sparsekit.engine.formats.native import SCALES, NativeFormat, Operands

__all__ = ["BSR", "BLOCK_SIZES", "MIN_FILL", "choose_block"]

# Largest first; each a multiple of the last (4x4), so their block grids nest.
BLOCK_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (16, 16), (8, 8), (4, 4))
MIN_FILL = 0.9  # a block size fits when >= 90% of the weights in its stored blocks are nonzero


class BSR(NativeFormat):
    """Dense ``R x C`` blocks of values, one 16-bit column index per block.

    Buffers: ``bsr_values`` ``(nblocks, R, C)`` (float32 or bfloat16 weights keep their
    dtype; int8 values come with ``scales`` per row, or per row and group of a multiple of 32
    inputs made of whole blocks; sums are fp32), ``bsr_col_indices``
    (block column of each block; int16 read as uint16, int32 beyond 65536 block columns) and
    ``bsr_rowptr`` (int32, one entry per block row + 1). Edge blocks of weights whose sides
    are not multiples of the block are zero-padded. Runs on the compiled kernels, else on
    torch (same numbers). ``threads=None`` follows ``torch.get_num_threads()``.
    """

    name = "bsr"
    buffer_names = ("bsr_values", "bsr_col_indices", "bsr_rowptr")
    optional_buffers = (SCALES,)
    values_name = "bsr_values"
    dtypes = (torch.float32, torch.bfloat16)
    value_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    # int8 codes times float inputs: each group's blocks summed, then scaled; every block
    # width of BLOCK_SIZES (what compile stores) divides 32
    group_scales = True
    group_multiple = 32

    @property
    def block(self) -> tuple[int, int]:
        """The block shape ``(R, C)``."""
        return tuple(self.bsr_values.shape[1:])

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """float32 or bfloat16 CPU weights with a block structure (see
        :func:`choose_block`)."""
        if weight.dim() != 2 or not super().supports(weight):
            return False
        return choose_block(weight != 0)[1] >= MIN_FILL

    @classmethod
    def compress(
        cls, weight: torch.Tensor, block: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """``weight`` in ``block`` blocks (default: :func:`choose_block`)."""
        block = _check_block(block) if block is not None else choose_block(weight != 0)[0]
        return _bsr_parts(weight, block)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   threads: int | None = None, **options: object) -> BSR:
        """:meth:`NativeFormat.from_dense`, refusing a ``block`` that groups of int8
        ``scales`` cut (see :func:`_check_group_blocks`)."""
        fmt = super().from_dense(weight, mask, threads, **options)
        _check_group_blocks(fmt.bsr_values, fmt._buffers.get(SCALES), fmt.in_features)
        return fmt

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        cls.check_values("bsr_values", tensors[0])
        _check_bsr(*tensors, shape)

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        super().check_state(tensors, shape)
        scales = tensors[len(cls.buffer_names)] if len(tensors) > len(cls.buffer_names) else None
        _check_group_blocks(tensors[0], scales, shape[1])

    def _operands(self) -> Operands:
        b = self._buffers
        return (torch.ops.sparsekit.bsr_linear,
                (b["bsr_values"], b["bsr_col_indices"], b["bsr_rowptr"]),
                (self.out_features, self.in_features))

    def stored_dense(self) -> torch.Tensor:
        (r, c), (rows, cols) = self.block, (self.out_features, self.in_features)
        brows, bcols = -(-rows // r), -(-cols // c)
        counts = torch.diff(self.bsr_rowptr.to(torch.int64))
        block_row = torch.repeat_interleave(torch.arange(brows), counts)
        grid = torch.zeros(brows, bcols, r, c, dtype=self.bsr_values.dtype)
        grid[block_row, unsigned_index(self.bsr_col_indices)] = self.bsr_values
        return grid.permute(0, 2, 1, 3).reshape(brows * r, bcols * c)[:rows, :cols].clone()

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.bsr_values))

    def extra_repr(self) -> str:
        r, c = self.block
        return f"{super().extra_repr()}, block={r}x{c}, threads={self.threads}"


def choose_block(nonzero: torch.Tensor) -> tuple[tuple[int, int], float]:
    """The block size for a boolean nonzero pattern, and its fill.

    The fill of a block size is the fraction of nonzeros among the (in-bounds) weights of
    the blocks it must store. The rule: the largest of :data:`BLOCK_SIZES` whose fill is at
    least :data:`MIN_FILL`; if none is, the smallest (the grids are nested, so it has the
    highest fill). A pattern without nonzeros has fill 1 for every size. Dense patterns
    qualify as well (fill 1) but then nothing is skipped and the dense format wins the
    autotuning. Costs one pass over ``nonzero``; the larger sizes work on the small grid.
    """
    nnz = int(torch.count_nonzero(nonzero))
    if not nnz:  # fill 1 for every size (and no grid to build for an empty weight)
        return BLOCK_SIZES[0], 1.0
    base = BLOCK_SIZES[-1]
    grid = _occupancy4(nonzero)

    def fill(block: tuple[int, int]) -> float:
        occupied = _occupancy(grid, (block[0] // base[0], block[1] // base[1]))
        stored = _stored_weights(occupied, block, tuple(nonzero.shape))
        return nnz / stored if stored else 1.0

    smallest = fill(base)
    if smallest >= MIN_FILL:  # else no larger block qualifies either
        for block in BLOCK_SIZES[:-1]:
            if (f := fill(block)) >= MIN_FILL:
                return block, f
    return base, smallest


def _occupancy4(nonzero: torch.Tensor) -> torch.Tensor:
    """:func:`_occupancy` for 4x4 blocks, reading 4 booleans at a time as one int32."""
    rows, cols = nonzero.shape
    t = F.pad(nonzero, (0, -cols % 4, 0, -rows % 4)).contiguous().view(torch.int32)
    return t.reshape(t.shape[0] // 4, 4, t.shape[1]).amax(dim=1) != 0


def _occupancy(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Boolean grid: which ``block`` blocks of the boolean ``t`` hold a True (edges padded)."""
    (r, c), (rows, cols) = block, t.shape
    t = F.pad(t, (0, -cols % c, 0, -rows % r))
    return t.reshape(t.shape[0] // r, r, t.shape[1] // c, c).any(dim=3).any(dim=1)


def _stored_weights(
    occupied: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]
) -> int:
    """In-bounds weights of the occupied blocks (edge blocks are cropped)."""
    rows = torch.arange(occupied.shape[0], device=occupied.device)
    cols = torch.arange(occupied.shape[1], device=occupied.device)
    heights = (shape[0] - rows * block[0]).clamp(max=block[0])
    widths = (shape[1] - cols * block[1]).clamp(max=block[1])
    return int((occupied * heights[:, None] * widths[None, :]).sum())


def _bsr_parts(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block values, 16/32-bit block column indices and int32 block row pointers."""
    (r, c), (rows, cols) = block, weight.shape
    padded = F.pad(weight, (0, -cols % c, 0, -rows % r))
    grid = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c).permute(0, 2, 1, 3)
    keep = (grid != 0).any(dim=(2, 3))
    rowptr = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    rowptr[1:] = keep.sum(dim=1).cumsum(0)
    col = keep.nonzero()[:, 1]
    return grid[keep].contiguous(), narrow_index(col, keep.shape[1]), rowptr.to(torch.int32)


def _check_block(block: object) -> tuple[int, int]:
    accepted = "a tuple (R, C) with 1 <= R <= 64 and C a positive multiple of 4"
    if not (isinstance(block, tuple) and len(block) == 2):
        raise ValueError(f"block must be {accepted}, got {block!r}")
    for i, b in enumerate(block):
        check_int(f"block[{i}]", b, minimum=1)
    if not (block[0] <= 64 and block[1] >= 4 and block[1] % 4 == 0):
        raise ValueError(f"block must be {accepted}, got {block!r}")
    return block


def _check_group_blocks(values: torch.Tensor, scales: torch.Tensor | None, cols: int) -> None:
    """Raise ``ValueError`` unless each group of inputs of per-group int8 ``scales`` holds
    whole blocks of ``values``: the kernel scales the sums of a block by one group's scale."""
    if scales is None or scales.dim() != 2:
        return
    size, width = cols // scales.shape[1], values.shape[2]
    if size % width:
        raise ValueError(f"buffer {SCALES!r} of shape {tuple(scales.shape)} makes groups of "
                         f"{size} inputs, which blocks {width} wide do not fill whole; "
                         f"accepted: a block width dividing {size}")


def _check_bsr(
    values: torch.Tensor, col: torch.Tensor, rowptr: torch.Tensor, shape: tuple[int, int]
) -> None:
    """Raise ``ValueError`` unless the three tensors form a valid BSR ``shape`` weight: block
    columns increasing within each block row, zeros in the padding of edge blocks."""
    if values.dim() != 3:
        raise ValueError(f"bsr_values must be (nblocks, R, C), got shape {tuple(values.shape)}")
    r, c = _check_block(tuple(values.shape[1:]))
    brows, bcols = -(-shape[0] // r), -(-shape[1] // c)
    if col.dtype not in (torch.int16, torch.int32) or tuple(col.shape) != (values.shape[0],):
        raise ValueError(
            f"bsr_col_indices must be int16 or int32 of shape ({values.shape[0]},), got "
            f"{col.dtype} {tuple(col.shape)}"
        )
    if col.dtype == torch.int16 and bcols > 65536:
        raise ValueError(f"16-bit bsr_col_indices cannot address {bcols} block columns")
    if rowptr.dtype != torch.int32 or tuple(rowptr.shape) != (brows + 1,):
        raise ValueError(
            f"bsr_rowptr must be int32 of shape ({brows + 1},), got {rowptr.dtype} "
            f"{tuple(rowptr.shape)}"
        )
    brow = entry_rows(rowptr, col, values.shape[0], bcols, pointers="bsr_rowptr",
                      indices="bsr_col_indices", entries="blocks", row="block row",
                      entry="block")
    cols = unsigned_index(col)
    if shape[0] % r or shape[1] % c:  # edge blocks: their padding must hold zeros
        # the kernel multiplies the padding (by zero inputs, into rows it never writes): a
        # NaN or inf there turned real outputs NaN, which to_dense (cropped) did not show
        heights = (shape[0] - brow * r).clamp(max=r)[:, None, None]
        widths = (shape[1] - cols * c).clamp(max=c)[:, None, None]
        inside = (torch.arange(r)[None, :, None] < heights) & (torch.arange(c)[None, None, :]
                                                               < widths)
        if bool(values.masked_select(~inside).ne(0).any()):
            raise ValueError(f"bsr_values must be zero in the padding of the edge blocks (past "
                             f"the {shape[0]}x{shape[1]} weight)")
