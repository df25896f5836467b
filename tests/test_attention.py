"""block_sparse_attention: the reference semantics every kernel and pattern builds on."""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.attention import block_sparse_attention, dense_block_mask
from sparsekit.attention.block_sparse import reference_attention


def test_full_mask_equals_sdpa_with_gqa_and_ragged_blocks() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 130, 16), torch.randn(2, 2, 130, 16), torch.randn(2, 2, 130, 16)
    full = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, full, block_size=64)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    torch.testing.assert_close(out, ref)


def test_dropped_tiles_act_as_minus_infinity_and_empty_rows_are_zero() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    mask = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    out = block_sparse_attention(q, k, v, mask, causal=False, block_size=4)
    dense = dense_block_mask(mask, 8, 8, causal=False, block_size=4)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref)
    none = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    assert block_sparse_attention(q, k, v, none, block_size=4).abs().max() == 0


def test_bad_block_mask_names_the_expected_shape() -> None:
    q = torch.randn(1, 2, 10, 4)
    expected = r"block_mask must be a bool tensor \(1 or 1, 1 or 2, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=4)


def _qkv_mask() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    return q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool)


@pytest.mark.parametrize("name", ["k", "v", "block_mask"])
def test_tensors_off_the_queries_device_are_refused(name: str) -> None:
    """The native kernel read a meta k, v or block_mask as garbage and returned it."""
    args = dict(zip(("q", "k", "v", "block_mask"), _qkv_mask()))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} must be on q's device \(cpu\), got meta"):
        block_sparse_attention(**args, block_size=4)


@pytest.mark.parametrize("q_shape, kv_shape, match", [
    ((1, 2, 8, 8), (1, 0, 8, 8), r"k must have heads ≥ 1 and head_dim ≥ 1, got shape \(1, 0"),
    ((1, 0, 8, 8), (1, 1, 8, 8), r"q must have heads ≥ 1 and head_dim ≥ 1, got shape \(1, 0"),
    ((1, 2, 8, 0), (1, 2, 8, 0), r"q must have heads ≥ 1 and head_dim ≥ 1, got shape \(1, 2"),
    ((1, 3, 8, 8), (1, 2, 8, 8), r"query heads \(3\) must be a multiple of the key/value heads"),
])
def test_no_heads_no_head_dim_and_ungrouped_heads_are_refused(q_shape, kv_shape, match) -> None:
    """0 key/value heads or head_dim 0 were a bare ZeroDivisionError."""
    q, k = torch.randn(q_shape), torch.randn(kv_shape)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, k, torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=4)


@pytest.mark.parametrize("scale, error", [
    (float("nan"), ValueError), (float("inf"), ValueError), (-1.0, ValueError), (0.0, ValueError),
    (True, TypeError), ("x", TypeError),
])
@pytest.mark.parametrize("grad", [False, True])
def test_bad_scale_is_refused_on_every_path(scale, error, grad: bool) -> None:
    """NaN passed silently where autograd takes the reference path; a negative, zero or
    bool scale was used as given."""
    q, k, v, mask = _qkv_mask()
    q.requires_grad_(grad)
    match = r"scale must be a positive finite float or None, got "
    with pytest.raises(error, match=match):
        block_sparse_attention(q, k, v, mask, block_size=4, scale=scale)
    with pytest.raises(error, match=match):
        reference_attention(q, k, v, mask, block_size=4, scale=scale)


@pytest.mark.parametrize("causal", ["no", None, 1])
def test_causal_must_be_a_bool(causal: object) -> None:
    """"no" and 1 passed as true, None as false."""
    q, k, v, mask = _qkv_mask()
    match = rf"causal must be a bool \(True or False\), got {causal!r}"
    with pytest.raises(TypeError, match=match):
        block_sparse_attention(q, k, v, mask, block_size=4, causal=causal)
    with pytest.raises(ValueError, match=match):
        dense_block_mask(mask, 8, 8, causal=causal, block_size=4)
