"""The native block-sparse attention kernel against its reference (SDPA over the element mask)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import kernels_ok

from sparsekit.attention import block_sparse_attention, dense_block_mask
from sparsekit.attention.block_sparse import reference_attention
from sparsekit.engine import kernels

pytestmark = pytest.mark.skipif(not kernels_ok(), reason="compiled kernels unavailable")


def _blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _inputs(batch=1, heads=4, kv_heads=2, q_len=130, kv_len=130, dim=16, *, seed=0,
            dtype=torch.float32):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype)
    return q, k, v


def _mask(shape, density=0.5, seed=1):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def _native(q, k, v, mask, *, causal=True, block_size=64, scale=None):  # type: ignore[no-untyped-def]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.sparsekit.block_sparse_attention(q, k, v, mask, causal, block_size, scale, 2)


@pytest.mark.parametrize("block_size", [16, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_equals_reference_across_block_sizes_ragged_blocks_and_isas(block_size, causal, isa):
    if isa not in kernels.isas():
        pytest.skip(f"this CPU does not run {isa}")
    q, k, v = _inputs(batch=2, heads=4, kv_heads=2, q_len=301, kv_len=301, dim=40)
    mask = _mask((2, 4, _blocks(301, block_size), _blocks(301, block_size)))
    with kernels.use_isa(isa):
        out = block_sparse_attention(q, k, v, mask, causal=causal, block_size=block_size)
    ref = reference_attention(q, k, v, mask, causal=causal, block_size=block_size)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dim", [1, 4, 16, 20, 64, 80, 128])
def test_head_dims_that_are_not_whole_vectors(dim):
    for q_len in (3, 70):  # the decode path reads k and v in place, prefill packs them
        q, k, v = _inputs(q_len=q_len, kv_len=150, dim=dim)
        mask = _mask((1, 4, _blocks(q_len, 32), _blocks(150, 32)))
        out = block_sparse_attention(q, k, v, mask, block_size=32)
        torch.testing.assert_close(out, reference_attention(q, k, v, mask, block_size=32))


def test_full_mask_is_exactly_dense_causal_sdpa_with_gqa():
    q, k, v = _inputs(batch=2, heads=8, kv_heads=2, q_len=200, kv_len=200, dim=64)
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, full)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True
    )
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("q_len", [1, 2, 15, 16, 17, 64, 100])
def test_decode_and_chunked_prefill_align_the_last_query_with_the_last_key(q_len):
    q, k, v = _inputs(q_len=q_len, kv_len=333, dim=64)
    mask = _mask((1, 1, _blocks(q_len, 64), _blocks(333, 64)), density=0.6, seed=q_len)
    for causal in (True, False):
        out = block_sparse_attention(q, k, v, mask, causal=causal)
        torch.testing.assert_close(out, reference_attention(q, k, v, mask, causal=causal))


def test_more_queries_than_keys_leaves_the_rows_before_the_first_key_zero():
    q, k, v = _inputs(q_len=90, kv_len=40, dim=8)
    mask = torch.ones(1, 1, 6, 3, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, block_size=16)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, block_size=16))
    assert out[:, :, :50].abs().max() == 0 and out[:, :, 50:].abs().min() > 0


@pytest.mark.parametrize("block_size", [1, 7, 200, 1000])
def test_any_block_size(block_size):
    q, k, v = _inputs(q_len=150, kv_len=450, dim=24)
    mask = _mask((1, 4, _blocks(150, block_size), _blocks(450, block_size)), density=0.7)
    out = block_sparse_attention(q, k, v, mask, block_size=block_size)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, block_size=block_size))


@pytest.mark.parametrize("mask_batch,mask_heads", [(1, 1), (3, 1), (1, 6), (3, 6)])
def test_block_mask_broadcasts_over_batch_and_heads(mask_batch, mask_heads):
    q, k, v = _inputs(batch=3, heads=6, kv_heads=3, q_len=96, kv_len=96, dim=16)
    mask = _mask((mask_batch, mask_heads, 3, 3), seed=mask_batch * 7 + mask_heads)
    out = block_sparse_attention(q, k, v, mask, block_size=32)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, block_size=32))


def test_rows_without_a_kept_key_are_zero():
    q, k, v = _inputs(q_len=128, kv_len=128, dim=16)
    mask = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    mask[:, :2, 2, 3] = True  # above the diagonal: causally invisible as well
    mask[:, 3, 1, 0] = True
    for causal in (True, False):
        out = block_sparse_attention(q, k, v, mask, causal=causal, block_size=32)
        ref = reference_attention(q, k, v, mask, causal=causal, block_size=32)
        torch.testing.assert_close(out, ref)
    out = block_sparse_attention(q, k, v, mask, block_size=32)
    assert out[:, :3].abs().max() == 0 and out[:, 3, 32:64].abs().min() > 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("size,block_size", [(8, 4), (130, 16)])  # read in place; packed
def test_a_bad_key_or_value_reaches_only_the_rows_that_read_it(size, block_size, causal, where,
                                                                value):
    """A NaN value (or a NaN or infinite key) that a row does not read, in a tile the mask
    drops, turned every row NaN on the reference, which runs wherever a gradient is wanted
    (0 * NaN in the weights' product, -inf + NaN in SDPA's mask); the kernel's rows of a kept
    tile read a causally later NaN value the same way. Both now leave those rows as they were."""
    q, k, v = _inputs(heads=2, kv_heads=1, q_len=size, kv_len=size, dim=16)
    mask = _mask((1, 2, _blocks(size, block_size), _blocks(size, block_size)), density=0.6)
    clean = reference_attention(q, k, v, mask, causal=causal, block_size=block_size)
    key = size // 2 - 1  # (causal: rows before it see its tile but not it)
    {"k": k, "v": v}[where][0, 0, key, 3] = value
    reads = dense_block_mask(mask, size, size, causal=causal, block_size=block_size)[0, :, :, key]
    assert reads.any() and not reads.all()
    outs = [block_sparse_attention(q, k, v, mask, causal=causal, block_size=block_size),
            reference_attention(q, k, v, mask, causal=causal, block_size=block_size),
            block_sparse_attention(q.clone().requires_grad_(), k, v, mask, causal=causal,
                                   block_size=block_size).detach()]
    for out in outs:
        torch.testing.assert_close(out[0][~reads], clean[0][~reads])
        if value != value:
            assert out[0][reads].isnan().any(-1).all()
        torch.testing.assert_close(out, outs[0], equal_nan=True)


@pytest.mark.parametrize("q_len", [1, 200])
def test_bf16_reads_widen_to_float32_and_round_once(q_len):
    q, k, v = _inputs(q_len=q_len, kv_len=200, dim=64, dtype=torch.bfloat16)
    mask = _mask((1, 4, _blocks(q_len, 64), 4), density=0.6)
    out = block_sparse_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def test_scale_and_extreme_scores_stay_finite():
    q, k, v = _inputs(q_len=64, kv_len=64, dim=16)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    for scale in (1e-3, 3.0):
        out = block_sparse_attention(q * 30, k, v, mask, block_size=32, scale=scale)
        ref = reference_attention(q * 30, k, v, mask, block_size=32, scale=scale)
        # scores near 1000: one float32 ulp of a score is ~1e-4 of its softmax weight
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_python_entry_is_the_native_op_and_accepts_strided_inputs():
    q, k, v = _inputs(q_len=100, kv_len=100, dim=32)
    mask = _mask((1, 4, 2, 2))
    out = block_sparse_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                 mask.expand(1, 4, 2, 2))
    assert torch.equal(out, _native(q, k, v, mask))


def test_gradients_take_the_reference_path():
    q, k, v = _inputs(q_len=64, kv_len=64, dim=8)
    q.requires_grad_(True)
    mask = _mask((1, 4, 2, 2))
    out = block_sparse_attention(q, k, v, mask, block_size=32)
    out.sum().backward()
    assert q.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask, block_size=32))


def test_empty_sizes():
    one = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    q, k, v = _inputs(q_len=0, kv_len=10, dim=8)
    assert block_sparse_attention(q, k, v, one[:, :, :0]).shape == q.shape
    q, k, v = _inputs(q_len=5, kv_len=0, dim=8)
    out = block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 0, dtype=torch.bool), causal=False)
    assert out.shape == q.shape and out.abs().max() == 0
    q, k, v = _inputs(batch=0, q_len=5, kv_len=5, dim=8)
    assert block_sparse_attention(q, k, v, one).shape == q.shape


class _Attend(torch.nn.Module):
    def forward(self, q, k, v, mask):  # type: ignore[no-untyped-def]
        return block_sparse_attention(q, k, v, mask, block_size=32)


def test_torch_compile_fullgraph_and_export_trace_the_kernel():
    q, k, v = _inputs(q_len=96, kv_len=96, dim=16)
    mask = _mask((1, 4, 3, 3))
    eager = _Attend()(q, k, v, mask)
    compiled = torch.compile(_Attend(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, mask), eager)
    program = torch.export.export(_Attend(), (q, k, v, mask))
    assert any("block_sparse_attention" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(q, k, v, mask), eager)


def _hostile():  # type: ignore[no-untyped-def]
    q, k, v = _inputs(q_len=64, kv_len=64, dim=16)
    m = torch.ones(1, 4, 2, 2, dtype=torch.bool)
    return [
        ("q must be a contiguous 4-D", (q[0], k, v, m, True, 32, 0.25, 1)),
        ("q must be Float or BFloat16", (q.double(), k, v, m, True, 32, 0.25, 1)),
        ("k must be Float", (q, k.bfloat16(), v, m, True, 32, 0.25, 1)),
        ("k.size\\(3\\) must be 16", (q, k[..., :8].contiguous(), v, m, True, 32, 0.25, 1)),
        ("k.size\\(0\\) must be 1", (q, torch.cat([k, k]), v, m, True, 32, 0.25, 1)),
        ("v must have the shape of k", (q, k, v[:, :, :32].contiguous(), m, True, 32, 0.25, 1)),
        ("divides the query heads", (q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1),
                                     m, True, 32, 0.25, 1)),
        ("block_size must be at least 1", (q, k, v, m, True, 0, 0.25, 1)),
        ("block_mask must have shape", (q, k, v, m, True, 16, 0.25, 1)),
        ("block_mask must have shape", (q, k, v, m[:, :2], True, 32, 0.25, 1)),
        ("block_mask must be Bool", (q, k, v, m.float(), True, 32, 0.25, 1)),
        ("block_mask must be a contiguous", (q, k, v, m.transpose(2, 3), True, 32, 0.25, 1)),
        ("q must be a contiguous", (q.transpose(2, 3), k, v, m, True, 32, 0.25, 1)),
        ("scale must be a positive finite", (q, k, v, m, True, 32, float("nan"), 1)),
        ("scale must be a positive finite", (q, k, v, m, True, 32, 0.0, 1)),
        ("scale must be a positive finite", (q, k, v, m, True, 32, -0.25, 1)),
        ("q must have heads >= 1 and head_dim >= 1", (q[:, :0], k, v, m, True, 32, 0.25, 1)),
        ("q must have heads >= 1 and head_dim >= 1", (q[..., :0], k[..., :0], v[..., :0], m,
                                                     True, 32, 0.25, 1)),
        ("k must have a number of heads \\(0\\)", (q, k[:, :0], v[:, :0], m, True, 32, 0.25, 1)),
        ("threads must be in", (q, k, v, m, True, 32, 0.25, 0)),
    ]


@pytest.mark.parametrize("case", range(20))
def test_hostile_arguments_raise_naming_the_argument(case):
    match, args = _hostile()[case]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsekit.block_sparse_attention(*args)


def test_python_entry_validates_before_the_kernel():
    q, k, v = _inputs(q_len=64, kv_len=64, dim=16)
    with pytest.raises(ValueError, match="block_mask must be a bool tensor"):
        block_sparse_attention(q, k, v, torch.ones(1, 4, 2, 2, dtype=torch.bool), block_size=16)
