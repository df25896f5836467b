import pytest
import torch
from torch import nn

from sparsekit.quantize import (
    INT8_MAX,
    check_within_grid,
    dequantize_grid,
    dequantize_int8,
    fake_quantize,
    int8_scales,
    quantize_int8,
    scales_at,
)


def test_per_channel_round_trip_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(6, 37)
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (6,)
    assert int(codes.abs().max()) == INT8_MAX  # each row's largest weight uses the full grid
    err = (dequantize_int8(codes, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())


def test_zeros_stay_zero_and_zero_rows_get_scale_one():
    w = torch.randn(3, 8)
    w[1] = 0
    w[0, ::2] = 0
    codes, scales = quantize_int8(w)
    assert float(scales[1]) == 1.0 and not codes[1].any()
    assert bool((codes[0, ::2] == 0).all())
    assert torch.equal(fake_quantize(w, scales) == 0, w == 0)


def test_groups_of_inputs_get_their_own_scales_with_a_partial_last_group():
    w = torch.ones(2, 10)
    w[:, 8:] = 100.0  # a large last group must not coarsen the first
    scales = int8_scales(w, group_size=4)
    assert scales.shape == (2, 3)
    codes, _ = quantize_int8(w, scales, group_size=4)
    assert codes.shape == (2, 10)
    assert torch.allclose(dequantize_int8(codes, scales, group_size=4), w)


def test_dequantize_grid_reads_the_group_size_from_the_scales():
    w = torch.randn(6, 32)
    for group in (None, 8, 32):
        scales = int8_scales(w, group)
        codes, _ = quantize_int8(w, scales, group)
        assert torch.equal(dequantize_grid(codes, scales), dequantize_int8(codes, scales, group))
    with pytest.raises(ValueError, match="groups"):  # no group size fits 5 groups of 32
        dequantize_grid(codes, torch.ones(6, 5))


def test_scales_at_gives_each_weight_the_scale_dequantize_uses():
    w = torch.randn(6, 32)
    rows, cols = torch.arange(6)[:, None], torch.arange(32)[None]
    for group in (None, 8, 32):
        scales = int8_scales(w, group)
        codes, _ = quantize_int8(w, scales, group)
        at = scales_at(scales, rows, cols, 32)
        assert torch.equal(codes.float() * at, dequantize_int8(codes, scales, group))
        picked = scales_at(scales, torch.tensor([5, 0]), torch.tensor([31, 9]), 32)
        assert torch.equal(picked, at.expand(6, 32)[[5, 0], [31, 9]])  # any pairs too


def test_fake_quantize_keeps_dtype():
    w = torch.randn(4, 16, dtype=torch.bfloat16)
    assert fake_quantize(w, int8_scales(w)).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(4, dtype=torch.int32)])
def test_bad_scales_are_refused(bad):
    with pytest.raises(ValueError, match="scales must be floating of shape"):
        quantize_int8(torch.ones(4, 8), bad)


def test_bad_group_size_and_shape_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        int8_scales(torch.ones(4, 8), group_size=0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        int8_scales(torch.ones(8))


def test_attached_scales_round_trip_through_the_state_dict():
    from torch import nn

    from sparsekit.quantize import SCALE_NAME, attach_scales, attached_scales

    layer = nn.Linear(8, 3)
    assert attached_scales(layer) is None
    scales = int8_scales(layer.weight)
    attach_scales(layer, scales)
    assert torch.equal(attached_scales(layer), scales)
    assert SCALE_NAME in layer.state_dict()
    with pytest.raises(ValueError, match="scales must be floating of shape"):
        attach_scales(layer, torch.ones(4))
    with pytest.raises(ValueError, match="2-D weight"):
        attach_scales(nn.ReLU(), scales)


def test_check_within_grid_names_the_entry_past_the_grid():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    scales = int8_scales(w)
    check_within_grid("layer", w, scales)  # on its own grid
    check_within_grid("layer", w * 1.003, scales)  # within half a step of the last code
    with pytest.raises(ValueError, match=r"layer: the weight lies beyond its int8 grid "
                                         r"\(weight_scale\): weight\[0, 1\] = -4 is 254.0 steps"):
        check_within_grid("layer", w * 2, scales)
    grouped = torch.tensor([[1.0, 1.0, 1.0, 8.0]])
    g = int8_scales(grouped, group_size=2)
    with pytest.raises(ValueError, match=r"weight\[0, 3\] = 16 is 254.0 steps"):
        check_within_grid("layer", grouped * torch.tensor([1.0, 1.0, 1.0, 2.0]), g)


def test_compile_refuses_a_weight_that_outgrew_its_attached_grid():
    # clamped to the stale grid, the compiled layer was off by 46 % of its largest output
    import sparsekit
    from sparsekit.quantize import attach_scales
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    w = model[0].weight
    with torch.no_grad():
        scales = int8_scales(w)
        w.copy_(fake_quantize(w, scales))
        attach_scales(model[0], scales)
        w.mul_(3.0)  # fine-tuned, merged or rescaled after quantizing
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"model: 0: the weight lies beyond its int8 grid"):
        sparsekit.compile(model, torch.randn(2, 64), weight_dtype="int8", formats="bitmap")
    assert torch.equal(w, before)
    # bf16 values do not store the grid: nothing is clamped
    sparsekit.compile(model, torch.randn(2, 64), weight_dtype="bf16", cache=False)
