"""Sparse attention: compute only the (query block, key block) tiles a block mask keeps.

:func:`block_sparse_attention` is the kernel entry point; training-free patterns
(:mod:`~sparsekit.attention.patterns`) choose the block mask from the queries and keys,
:mod:`~sparsekit.attention.coverage` measures what a mask keeps,
:class:`~sparsekit.attention.break_even.BreakEven` decides per call whether sparsity pays
here, and :mod:`~sparsekit.attention.hf` switches Hugging Face models onto it (``apply``,
``remove``, ``register``, ``SparseAttention``: loaded on first use, so importing this
package never imports ``transformers``).
"""

import importlib
from typing import Any

from sparsekit.attention.block_sparse import block_sparse_attention, dense_block_mask
from sparsekit.attention.break_even import BreakEven
from sparsekit.attention.coverage import Coverage, density, mass_recall, tile_mass, visible_pairs
from sparsekit.attention.patterns import (
    ATTENTION_PATTERNS,
    Antidiagonal,
    AttentionPattern,
    Dense,
    Exact,
    SinkWindow,
    TopKBlocks,
    UserMask,
    VerticalSlash,
    resolve_pattern,
)

_HF = frozenset({"SparseAttention", "apply", "register", "remove"})

__all__ = [
    "ATTENTION_PATTERNS",
    "Antidiagonal",
    "AttentionPattern",
    "BreakEven",
    "Coverage",
    "Dense",
    "Exact",
    "SinkWindow",
    "SparseAttention",
    "TopKBlocks",
    "UserMask",
    "VerticalSlash",
    "block_sparse_attention",
    "dense_block_mask",
    "density",
    "mass_recall",
    "register",
    "remove",
    "resolve_pattern",
    "tile_mass",
    "visible_pairs",
    "apply",
]


def __getattr__(name: str) -> Any:
    if name in _HF:
        return getattr(importlib.import_module("sparsekit.attention.hf"), name)
    raise AttributeError(f"module 'sparsekit.attention' has no attribute {name!r}")
