"""Sparse attention: compute only the (query block, key block) tiles a block mask keeps.

:func:`block_sparse_attention` is the kernel entry point; patterns that choose the block
mask and the Hugging Face switch build on it.
"""

from sparsekit.attention.block_sparse import block_sparse_attention, dense_block_mask

__all__ = ["block_sparse_attention", "dense_block_mask"]
