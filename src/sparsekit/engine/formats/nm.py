"""Packed N:M: N values (fp32, bf16 or int8 with scales per row or per group of inputs) per
group of M inputs plus a few bits naming each one's input."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsekit.engine.formats.native import INT8_INPUTS, SCALES, NativeFormat, Operands

__all__ = ["NM_PATTERNS", "PackedNM", "fitting_pattern"]

# The (N, M) a weight may be packed as, preferred first: fewest values, then fewest index bits.
NM_PATTERNS: tuple[tuple[int, int], ...] = ((1, 4), (2, 4), (4, 8))
_FIELD_BITS = {4: 2, 8: 4}  # bits naming a value's input in its group (M=8: a nibble)
_CHUNK = 16  # values whose fields fill whole 32-bit words (one AVX-512 vector)


class PackedNM(NativeFormat):
    """Weights with at most N nonzeros in every M consecutive inputs of a row (the groups of
    :class:`sparsekit.patterns.NM`; a last partial group is zero-padded).

    ``nm_values`` is ``(rows, ceil(in/M) * N)`` (groups with fewer than N nonzeros are
    zero-padded), ``nm_indices`` the int32 words holding each value's input within its group
    (2 bits for M=4, 4 bits for M=8; rows padded to 16 values) and ``nm_pattern`` ``[N, M]``:
    at 2:4 that is 2.25 bytes per weight against dense's 4, with no row pointers (bf16 values:
    1.25 against 2).
    ``from_dense`` picks the first of :data:`NM_PATTERNS` the weight fits.
    """

    name = "nm"
    buffer_names = ("nm_values", "nm_indices", "nm_pattern")
    optional_buffers = (SCALES, INT8_INPUTS)
    dtypes = (torch.float32, torch.bfloat16)
    value_dtypes = (torch.float32, torch.bfloat16, torch.int8)
    activation_dtypes = (torch.int8,)  # W8A8: the nm_qlinear op
    # int8 codes times float inputs: a span of whole words of fields (16 values) per group,
    # which every pattern of NM_PATTERNS fills in 64 inputs
    group_scales = True
    group_multiple = 64

    def __init__(
        self, tensors: Sequence[torch.Tensor], shape: tuple[int, int], threads: int | None = None
    ) -> None:
        super().__init__(tensors, shape, threads)
        self.n, self.m = (int(v) for v in self.nm_pattern.tolist())

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """CPU weights of one of :attr:`dtypes` that fit an N:M pattern and fill at least
        half its slots (a 99%-sparse weight fits 1:4 but would store mostly padding)."""
        if weight.dim() != 2 or not super().supports(weight):
            return False
        pattern = fitting_pattern(weight)
        if pattern is None:
            return False
        n, m = pattern
        slots = weight.shape[0] * -(-weight.shape[1] // m) * n
        return 2 * int(torch.count_nonzero(weight)) >= slots

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pattern = fitting_pattern(weight)
        if pattern is None:
            raise ValueError(f"weight has more than N nonzeros in some group of M inputs for "
                             f"every (N, M) in {NM_PATTERNS}")
        n, m = pattern
        groups = _groups(weight, m)
        nonzero_first = torch.sort((groups == 0).to(torch.int8), dim=-1, stable=True).indices
        slot = nonzero_first[..., :n]
        values = groups.gather(-1, slot)
        slot = torch.where(values != 0, slot, 0)  # padding names the group's first input
        return (values.flatten(1), _pack(slot.flatten(1), _FIELD_BITS[m]),
                torch.tensor(pattern, dtype=torch.int32))

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        values, indices, pattern = tensors
        rows, cols = shape
        if (pattern.dtype != torch.int32 or pattern.shape != (2,)
                or tuple(pattern.tolist()) not in NM_PATTERNS):
            raise ValueError(f"nm_pattern must be int32 [N, M] with (N, M) in {NM_PATTERNS}, "
                             f"got {pattern.dtype} {pattern.tolist()}")
        n, m = pattern.tolist()
        width = -(-cols // m) * n
        cls.check_values("nm_values", values)
        if tuple(values.shape) != (rows, width):
            raise ValueError(f"nm_values must be of shape {(rows, width)}, got "
                             f"{tuple(values.shape)}")
        words = _index_words(width, _FIELD_BITS[m])
        if indices.dtype != torch.int32 or tuple(indices.shape) != (rows, words):
            raise ValueError(f"nm_indices must be int32 of shape {(rows, words)}, got "
                             f"{indices.dtype} {tuple(indices.shape)}")
        slot = _unpack(indices, _FIELD_BITS[m], width)
        col = _columns(slot, n, m)
        if bool((slot >= m).any()) or bool((col >= cols).any()):
            raise ValueError(f"nm_indices must name inputs within their group of {m} and "
                             f"below {cols}")

    def _operands(self) -> Operands:
        b, ops = self._buffers, torch.ops.sparsekit
        return (ops.nm_qlinear if self.quantizes_inputs else ops.nm_linear,
                (b["nm_values"], b["nm_indices"]), (self.n, self.m, self.in_features))

    def stored_dense(self) -> torch.Tensor:
        width = self.nm_values.shape[1]
        col = _columns(_unpack(self.nm_indices, _FIELD_BITS[self.m], width), self.n, self.m)
        rows = torch.arange(self.out_features).unsqueeze(1).expand_as(col)
        padded = -(-self.in_features // self.m) * self.m
        dense = torch.zeros(self.out_features, padded, dtype=self.nm_values.dtype)
        dense.index_put_((rows, col), self.nm_values, accumulate=True)  # padding adds zeros
        return dense[:, : self.in_features].contiguous()

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.nm_values))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pattern={self.n}:{self.m}"


def fitting_pattern(weight: torch.Tensor) -> tuple[int, int] | None:
    """The first (N, M) of :data:`NM_PATTERNS` whose groups of ``weight`` all fit, or None."""
    for n, m in NM_PATTERNS:
        if bool(((_groups(weight, m) != 0).sum(-1) <= n).all()):
            return n, m
    return None


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``weight`` zero-padded to whole groups, as ``(rows, groups, m)``."""
    rows, cols = weight.shape
    padded = weight.new_zeros(rows, -(-cols // m) * m)
    padded[:, :cols] = weight
    return padded.view(rows, -(-cols // m), m)


def _index_words(width: int, bits: int) -> int:
    return -(-width // _CHUNK) * _CHUNK * bits // 32


def _columns(slot: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Input column of every value from its in-group slot."""
    return torch.arange(slot.shape[1]) // n * m + slot


def _pack(slot: torch.Tensor, bits: int) -> torch.Tensor:
    """``bits``-bit fields (rows, width) packed little-endian into int32 words."""
    rows, width = slot.shape
    per_word = 32 // bits
    words = _index_words(width, bits)
    fields = slot.new_zeros(rows, words * per_word)
    fields[:, :width] = slot
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (fields.view(rows, words, per_word).to(torch.int64) << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack(indices: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """The first ``width`` ``bits``-bit fields of each row of int32 ``indices`` (int64)."""
    shifts = torch.arange(32 // bits, dtype=torch.int64) * bits
    fields = (indices.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.flatten(1)[:, :width]
