"""block_sparse_attention: the reference semantics every kernel and pattern builds on."""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.attention import block_sparse_attention, dense_block_mask


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
