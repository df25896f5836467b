"""CUDA formats: torch's semi-structured 2:4 and block-sparse (BSR) GPU kernels.

On a GPU the fastest sparse kernels are torch's own: cuSPARSELt/CUTLASS for 2:4 weights
(``to_sparse_semi_structured``, fp16/bf16, compute capability >= 8.0) and BSR matrix
products. These formats keep plain tensors as buffers, like every format (so
``state_dict`` and :func:`sparsekit.save` work), and build torch's sparse weight from them
once per placement. They are candidates only for weights on a CUDA device that runs them;
elsewhere (a model loaded on a CPU) they multiply with the dense weight. CI has no GPU: the
packing and the CPU paths are tested everywhere, the device kernels only where CUDA exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekit.engine.formats.base import Format, masked
from sparsekit.engine.formats.bsr import MIN_FILL, choose_block

__all__ = ["CudaBSR", "CudaSemiStructured"]

_HALF = (torch.float16, torch.bfloat16)


def _runs_semi_structured(device: torch.device) -> bool:
    """Whether torch's semi-structured kernels run on ``device``: cuSPARSELt on compute
    capability 8.0 or newer, or else its CUTLASS kernels, which exist for 8.x only (on an
    H200, 9.0, they raise "Supported only on GPUs with compute capability 8.x")."""
    capability = torch.cuda.get_device_capability(device)
    return capability >= (8, 0) and (
        capability[0] == 8 or torch.backends.cusparselt.is_available()
    )


class CudaSemiStructured(Format):
    """2:4 weights for torch's semi-structured GPU kernels.

    Buffers: ``cuda24_values`` ``(rows, in/2)`` (the two kept values of each group of four
    inputs, zero-padded) and ``cuda24_index`` ``(rows, in/2)`` uint8 (their positions in the
    group, 0-3).
    """

    name = "cuda_24"
    buffer_names = ("cuda24_values", "cuda24_index")
    dtypes = _HALF
    device = "cuda"

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """fp16/bf16 2:4 weights on an Ampere or newer GPU, both sides multiples of 64."""
        if weight.dim() != 2 or not super().supports(weight):
            return False
        rows, cols = weight.shape
        if rows % 64 or cols % 64 or not _runs_semi_structured(weight.device):
            return False
        return bool(((weight.view(rows, -1, 4) != 0).sum(-1) <= 2).all())

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor | None = None
    ) -> CudaSemiStructured:
        w = masked(weight, mask)
        rows, cols = w.shape
        if cols % 4:
            raise ValueError(f"cuda_24 needs in_features divisible by 4, got {cols}")
        groups = w.reshape(rows, -1, 4)
        if bool(((groups != 0).sum(-1) > 2).any()):
            raise ValueError("cuda_24 needs a 2:4 weight: at most 2 nonzeros per group of 4")
        # per group the nonzero positions first (stable), then the two kept in order
        order = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., :2]
        index = order.sort(dim=-1).values
        values = groups.gather(-1, index)
        tensors = (values.reshape(rows, -1), index.reshape(rows, -1).to(torch.uint8))
        return cls(tensors, (rows, cols))

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        values, index = tensors
        rows, cols = shape
        if cols % 4 or tuple(values.shape) != (rows, cols // 2) or not values.is_floating_point():
            raise ValueError(
                f"cuda24_values must be floating of shape ({rows}, {cols // 2}) with "
                f"in_features divisible by 4, got {values.dtype} {tuple(values.shape)}"
            )
        if index.dtype != torch.uint8 or index.shape != values.shape or bool((index > 3).any()):
            raise ValueError("cuda24_index must be uint8 in-group positions 0-3, one per value")
        pairs = index.view(rows, -1, 2)
        if bool((pairs[..., 0] >= pairs[..., 1]).any()):
            raise ValueError("cuda24_index must hold two rising positions per group")

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.out_features, self.in_features
        dense = self.cuda24_values.new_zeros(rows, cols // 4, 4)
        dense.scatter_(-1, self.cuda24_index.view(rows, -1, 2).long(),
                       self.cuda24_values.view(rows, -1, 2))
        return dense.view(rows, cols)

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.cuda24_values.is_cuda:
            weight = self.derived(lambda: torch.sparse.to_sparse_semi_structured(self.to_dense()))
        else:
            weight = self.derived(self.to_dense)
        return F.linear(x.to(self.cuda24_values.dtype), weight, bias)

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.cuda24_values))


class CudaBSR(Format):
    """Block-sparse weights for torch's BSR GPU kernels (blocks of 16 or 32).

    Buffers: ``cudabsr_values`` ``(nblocks, R, C)``, ``cudabsr_col`` and ``cudabsr_rowptr``
    (int32 block column indices and block row pointers), torch's own BSR layout.
    """

    name = "cuda_bsr"
    buffer_names = ("cudabsr_values", "cudabsr_col", "cudabsr_rowptr")
    device = "cuda"

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """Floating CUDA weights made of (nearly full) 16x16 or 32x32 blocks that tile them."""
        if weight.dim() != 2 or not super().supports(weight) or not weight.is_floating_point():
            return False
        (r, c), fill = choose_block(weight != 0)
        rows, cols = weight.shape
        return r >= 16 and fill >= MIN_FILL and rows % r == 0 and cols % c == 0

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
        block: tuple[int, int] | None = None,
    ) -> CudaBSR:
        w = masked(weight, mask)
        block = block or choose_block(w != 0)[0]
        if w.shape[0] % block[0] or w.shape[1] % block[1]:
            raise ValueError(f"cuda_bsr needs blocks {block} that tile the {tuple(w.shape)} weight")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse BSR support is in beta"
            bsr = w.to_sparse_bsr(block)
        tensors = (bsr.values().contiguous(), bsr.col_indices().to(torch.int32),
                   bsr.crow_indices().to(torch.int32))
        return cls(tensors, tuple(w.shape))

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        values, col, rowptr = tensors
        if values.dim() != 3 or not values.is_floating_point():
            raise ValueError(f"cudabsr_values must be floating (nblocks, R, C), got "
                             f"{values.dtype} {tuple(values.shape)}")
        r, c = values.shape[1:]
        if shape[0] % r or shape[1] % c:
            raise ValueError(f"blocks {(r, c)} do not tile a {tuple(shape)} weight")
        if col.dtype != torch.int32 or rowptr.dtype != torch.int32:
            raise ValueError("cudabsr_col and cudabsr_rowptr must be int32")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.sparse_bsr_tensor(rowptr, col, values, tuple(shape), check_invariants=True)
        except RuntimeError as err:
            raise ValueError(
                f"cudabsr tensors do not form a BSR {tuple(shape)} weight: {err}"
            ) from None

    def _bsr(self) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_bsr_tensor(
                self.cudabsr_rowptr, self.cudabsr_col, self.cudabsr_values,
                (self.out_features, self.in_features),
            )

    def to_dense(self) -> torch.Tensor:
        return self._bsr().to_dense()

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.cudabsr_values.is_cuda:  # e.g. a model loaded on a CPU
            return F.linear(x, self.derived(self.to_dense), bias)
        y = (self.derived(self._bsr) @ x.to(self.cudabsr_values.dtype).T).T
        return y if bias is None else y + bias

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.cudabsr_values))
