"""Block-sparse attention over a boolean mask of (query block, key block) tiles.

Attention at long context spends its time on the score matrix; most of its softmax mass
sits in few tiles (MInference, XAttention), so a mask over ``block_size``-square tiles says
which ones to compute. Tiles the mask drops contribute nothing — exactly as if their
scores were ``-inf`` — and a row whose every tile is dropped outputs zeros.

On CPU the native kernel ``torch.ops.sparsekit.block_sparse_attention`` computes only the
kept tiles, flash-style (``engine/kernels/attention_core.h``). :func:`reference_attention`
— a masked softmax over the expanded element mask — is its oracle, and runs where the
kernel cannot: without compiled kernels (``SPARSEKIT_NO_KERNELS=1``), off the CPU, or when
autograd needs a gradient (the kernel has no backward).
"""

from __future__ import annotations

import math

import torch

from sparsekit._checks import check_bool, check_fits_memory, check_int, check_positive
from sparsekit.attention.coverage import (
    _check_device,
    _check_heads,
    _check_mask,
    blocks,
    bounded_block_size,
)
from sparsekit.engine import kernels

__all__ = ["block_sparse_attention", "dense_block_mask", "reference_attention"]

_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
    causal: bool, block_size: int, scale: float | None,
) -> None:
    """Raise unless the arguments of :func:`block_sparse_attention` are ones it takes (the
    values of ``q``, ``k``, ``v`` are not read: NaN in them is NaN in the output)."""
    check_bool("causal", causal)
    check_int("block_size", block_size, minimum=1)
    check_positive("scale", scale, optional=True)
    if scale is not None and scale > _FLOAT32_MAX:  # inf in float32: every output row NaN
        raise ValueError(f"scale must be at most {_FLOAT32_MAX:.4g} (the largest float32: the "
                         f"scores are float32), got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor (batch, heads, seq, head_dim), got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{name} must be float32 or bfloat16, got {t.dtype}")
        if t.layout != torch.strided:  # a raw error of .contiguous() or SDPA
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                             "convert with `.to_dense()`")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, q_len, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k must be (batch={batch}, kv_heads, kv_seq, head_dim={dim}), got {tuple(k.shape)}"
        )
    if v.shape != k.shape:  # the kernel takes values of the keys' head_dim only
        raise ValueError(
            f"v must have k's shape {tuple(k.shape)} (batch, kv_heads, kv_seq, head_dim: the "
            f"values' head_dim is q's), got {tuple(v.shape)}"
        )
    _check_heads(q, k)
    tiles = (blocks(q_len, block_size), blocks(k.shape[2], block_size))
    _check_mask(block_mask, tiles, block_size=block_size, batch=batch, heads=heads)
    _check_device(q, k=k, v=v, block_mask=block_mask)


def dense_block_mask(
    block_mask: torch.Tensor, q_len: int, kv_len: int, *, causal: bool, block_size: int
) -> torch.Tensor:
    """The element mask ``(b, h, q_len, kv_len)`` a block mask stands for (True = attend).

    Causal attention aligns the last query with the last key (decode and chunked prefill:
    query ``i`` sees keys up to ``kv_len - q_len + i``), as ``F.scaled_dot_product_attention``
    does for ``q_len == kv_len``.

    ``block_mask`` is bool ``(batch or 1, heads or 1, ceil(q_len / block_size),
    ceil(kv_len / block_size))``; the result is on its device. Each element reads its tile
    by index, so the work is the size of the result whatever ``block_size`` is (a huge one
    is one tile, not a ``block_size``-long expansion).
    """
    check_int("q_len", q_len, minimum=0)
    check_int("kv_len", kv_len, minimum=0)
    check_int("block_size", block_size, minimum=1)
    check_bool("causal", causal)
    _check_mask(block_mask, (blocks(q_len, block_size), blocks(kv_len, block_size)),
                block_size=block_size)
    # the result, and the causal mask beside it: long sequences failed raw in the allocator
    elements = block_mask.shape[0] * block_mask.shape[1] * q_len * kv_len
    check_fits_memory(elements + (q_len * kv_len if causal else 0),
                      f"q_len={q_len}, kv_len={kv_len} with a block mask of shape "
                      f"{tuple(block_mask.shape)} make a bool element mask of",
                      "accepted: shorter sequences (the native kernel builds no element mask)")
    device = block_mask.device
    rows = torch.arange(q_len, device=device) // block_size
    cols = torch.arange(kv_len, device=device) // block_size
    mask = block_mask[:, :, rows][:, :, :, cols]
    if causal:
        offset = kv_len - q_len
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(offset)
        mask = mask & keep
    return mask


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    causal: bool = True,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` restricted to the tiles ``block_mask`` keeps.

    Args:
        q: queries ``(batch, heads, q_len, head_dim)``, float32 or bfloat16.
        k, v: keys and values ``(batch, kv_heads, kv_len, head_dim)``; ``heads`` must be a
            multiple of ``kv_heads`` (grouped-query attention shares each key/value head).
        block_mask: bool ``(batch or 1, heads or 1, ceil(q_len / block_size),
            ceil(kv_len / block_size))``; True computes the tile.
        causal: mask keys after each query (the last query aligned with the last key).
        block_size: tile edge in tokens; the last tiles may be ragged.
        scale: softmax scale, a positive finite float; ``1 / sqrt(head_dim)`` by default.
            A ``ValueError`` where a kept score ``q · kᵀ · scale`` of finite rows overflows
            float32 (it would turn its row NaN or zero); the kernel notes such scores as it
            computes them, so the check reads nothing extra.

    ``k``, ``v`` and ``block_mask`` must be on ``q``'s device.

    Returns:
        ``(batch, heads, q_len, head_dim)`` in ``q``'s dtype; rows with no kept key are zero,
        rows reading a NaN in ``q``, ``k`` or ``v`` are NaN (on the kernel as on the
        reference: NaN is never turned into zeros), and only those: a key or value in a
        dropped tile, or (causal) after a row's last key, does not reach that row.
    """
    _check(q, k, v, block_mask, causal=causal, block_size=block_size, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    if _native(q, k, v):
        # every block_size past the longer sequence tiles alike: the kernel's ceil division
        # of 2**63 - 1 overflowed int64 into a raw shape error on a valid mask
        block_size = bounded_block_size(q.shape[2], k.shape[2], block_size)
        return torch.ops.sparsekit.block_sparse_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), block_mask.contiguous(), causal,
            block_size, float(scale), kernels.num_threads(),
        )
    return _reference(q, k, v, block_mask, causal=causal, block_size=block_size, scale=scale)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    causal: bool = True,
    block_size: int = 64,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`block_sparse_attention` in plain PyTorch: a float32 softmax over the element
    mask the block mask stands for (:func:`dense_block_mask`). It materialises the whole score
    matrix; it is the oracle of the native kernel and what runs without it. Same arguments
    and result."""
    _check(q, k, v, block_mask, causal=causal, block_size=block_size, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    return _reference(q, k, v, block_mask, causal=causal, block_size=block_size, scale=scale)


def _native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native kernel computes this call: CPU tensors, no gradient wanted, and the
    kernels built."""
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return q.device.type == "cpu" and not wants_grad and _kernels_available()


@torch.compiler.assume_constant_result
def _kernels_available() -> bool:
    # A constant to torch.compile / torch.export (the build and its cache are not traceable).
    return kernels.available()


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    causal: bool,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    q_len, kv_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = dense_block_mask(block_mask, q_len, kv_len, causal=causal, block_size=block_size)
    scores = (q.float() * scale) @ k.float().transpose(-1, -2)
    _refuse_overflow(q, k, scores.detach(), mask, scale)
    # Rows read no key the mask drops, as on the kernel: masked scores are replaced (SDPA's
    # additive mask kept a dropped key's NaN score, -inf + NaN) and masked weights are exact
    # zeros, but a zero weight times a NaN value is NaN still, so v's non-finite values are
    # read only by the outputs whose rows attend to them (from the plain product there).
    probs = scores.masked_fill(~mask, -math.inf).softmax(-1).masked_fill(~mask, 0.0)
    v = v.float()
    finite = v.isfinite()
    out = probs @ v.where(finite, 0.0)
    with torch.no_grad():
        reads = (mask.to(probs.dtype) @ (~finite).to(probs.dtype)) > 0
        plain = probs @ v
    return out.where(~reads, plain).to(q.dtype)


@torch.no_grad()
def _refuse_overflow(
    q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, scale: float
) -> None:
    """Raise where a float32 score ``q · kᵀ · scale`` (``scores``) that ``mask`` keeps is not
    finite although its query and key rows are: it overflowed, and the softmax would turn its
    row NaN or (every kept score at -inf) silently zero. The kernel refuses the same scores as
    it computes them. A NaN or infinity read from ``q`` or ``k`` is left alone (NaN in, NaN
    out); nothing is read under ``torch.compile``."""
    if torch.compiler.is_compiling() or q.is_meta or not mask.numel():
        return
    finite_rows = q.isfinite().all(-1, keepdim=True) & k.isfinite().all(-1).unsqueeze(-2)
    bad = (~scores.isfinite() & mask & finite_rows).nonzero()
    if not len(bad):
        return
    b, h, i, j = (int(x) for x in bad[0])
    pair = float(torch.linalg.vector_norm(q[b, h, i].double())
                 * torch.linalg.vector_norm(k[b, h, j].double()))
    raise ValueError(
        f"scale={scale!r} overflows the float32 scores q · kᵀ · scale of query {i} of head {h} "
        f"(batch {b}) against key {j}, which turns rows NaN or zero; accepted: scale ≤ "
        f"{_FLOAT32_MAX / pair:.3g} for that pair (or rescale q and k)")
