import math

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit.patterns import (
    NM,
    PATTERNS,
    Block,
    FanIn,
    Pattern,
    Row,
    Unstructured,
    fan_in,
    parse_pattern,
)
from sparsekit.prune import compute_masks

# -- parse_pattern ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("unstructured", Unstructured()),
        ("2:4", NM(2, 4)),
        ("1:4", NM(1, 4)),
        ("4:8", NM(4, 8)),
        ("1:2", NM(1, 2)),
        ("16:32", NM(16, 32)),
        ("block:4x4", Block(4, 4)),
        ("block:2x8", Block(2, 8)),
        ("block:1x1", Block(1, 1)),
        ("row", Row()),
        ("fanin", FanIn()),
    ],
)
def test_parse_pattern_accepted(spec, expected):
    pat = parse_pattern(spec)
    assert pat == expected
    assert type(pat) is type(expected)
    assert str(pat) == spec
    assert parse_pattern(str(pat)) == pat  # round trip


def test_parse_pattern_passes_pattern_objects_through():
    pat = NM(2, 4)
    assert parse_pattern(pat) is pat


def test_registry_families():
    assert {"block", "row", "unstructured"} <= set(PATTERNS.names())


@pytest.mark.parametrize(
    "spec",
    ["3:2", "2:2", "0:4", "4:4", "a:b", "2.5:4", "2:4:8", ":4", "2:", " 2:4", "2 : 4",
     "block:0x4", "block:4x0", "block:4", "block:4x", "block:axb", "block:2.5x4", "block",
     "diagonal", "", "Row", "ROW", "Unstructured", "row:2",
     # digits of other scripts: '٢:٤' read as '2:4', 'channel:²' a bare int() error
     "٢:٤", "2:４", "block:٤x٤", "channel:²", "head:¹", "channel:٣", "channel:"],
)
def test_parse_pattern_malformed(spec):
    with pytest.raises(ValueError, match="pattern") as err:
        parse_pattern(spec)
    assert repr(spec) in str(err.value)


@pytest.mark.parametrize("spec", ["diagonal", "", "Row", "random"])
def test_parse_pattern_unknown_lists_accepted(spec):
    with pytest.raises(ValueError) as err:
        parse_pattern(spec)
    msg = str(err.value)
    for accepted in ("unstructured", "N:M", "block:RxC", "row"):
        assert accepted in msg


def test_parse_pattern_nm_key_is_unknown_and_lists_accepted():
    with pytest.raises(ValueError) as err:
        parse_pattern("nm")
    msg = str(err.value)
    assert "unknown pattern 'nm'" in msg
    for accepted in ("unstructured", "N:M", "block:RxC", "row"):
        assert accepted in msg


@pytest.mark.parametrize("spec", ["3:2", "2:2", "0:4"])
def test_parse_pattern_nm_order_message(spec):
    with pytest.raises(ValueError, match=r"0 < N < M"):
        parse_pattern(spec)


@pytest.mark.parametrize("spec", [4, None, (2, 4), 0.5, b"2:4"])
def test_parse_pattern_non_string_is_type_error(spec):
    with pytest.raises(TypeError, match="pattern must be a string"):
        parse_pattern(spec)


@pytest.mark.parametrize(
    "spec, density",
    [("unstructured", 1.0), ("2:4", 0.5), ("1:4", 0.25), ("4:8", 0.5), ("3:8", 0.375),
     ("block:4x4", 1.0), ("row", 1.0)],
)
def test_max_density(spec, density):
    assert parse_pattern(spec).max_density() == density


# -- check --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, shape, ok",
    [
        ("2:4", (3, 8), True),
        ("2:4", (3, 6), False),
        ("4:8", (2, 4, 3, 3), False),  # 36 inputs
        ("2:4", (2, 4, 3, 3), True),  # 36 inputs
        ("4:8", (2, 8, 3, 3), True),  # 72 inputs
        ("2:4", (8,), False),  # 1-D
        ("block:4x4", (8, 16), True),
        ("block:4x4", (6, 16), False),
        ("block:4x4", (8, 18), False),
        ("block:4x4", (8, 4, 3, 3), True),  # 2-D view 8x36
        ("block:4x8", (8, 4, 3, 3), False),
        ("row", (5, 7), True),
        ("unstructured", (5, 7), True),
    ],
)
def test_check(spec, shape, ok):
    pat = parse_pattern(spec)
    if ok:
        pat.check(torch.Size(shape), "layer.weight")
    else:
        with pytest.raises(ValueError, match=r"'layer\.weight'"):
            pat.check(torch.Size(shape), "layer.weight")


# -- masks --------------------------------------------------------------------------------


def test_unstructured_keeps_top_k():
    scores = torch.tensor([[0.5, 3.0, -1.0], [2.0, 0.1, 4.0]])
    mask = Unstructured().mask(scores, 3)
    assert mask.tolist() == [[False, True, False], [True, False, True]]
    assert Unstructured().mask(scores, 0).sum() == 0
    assert Unstructured().mask(scores, 6).all()


def test_unstructured_ties_break_by_position():
    mask = Unstructured().mask(torch.ones(2, 3), 2)
    assert mask.tolist() == [[True, True, False], [False, False, False]]


NM_SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.5, 0.3, 8.0, 7.0, 6.0, 5.0],
        [4.0, -1.0, 2.0, 3.0, 0.2, 0.4, 0.6, 0.8],
    ]
)


def test_nm_mask_keeps_top_n_per_group():
    mask = NM(2, 4).mask(NM_SCORES, 8)
    assert mask.tolist() == [
        [False, True, True, False, True, True, False, False],
        [True, False, False, True, False, False, True, True],
    ]
    assert NM(2, 4).is_valid(mask)


def test_nm_mask_1_4():
    mask = NM(1, 4).mask(NM_SCORES, 4)
    assert mask.tolist() == [
        [False, True, False, False, True, False, False, False],
        [True, False, False, False, False, False, False, True],
    ]


def test_nm_mask_sparser_than_pattern_thins_within_nm_mask():
    # the N:M mask keeps 0.9, 0.5, 8, 7 | 4, 3, 0.6, 0.8; keep=3 -> the 3 highest of those
    mask = NM(2, 4).mask(NM_SCORES, 3)
    assert mask.tolist() == [
        [False, False, False, False, True, True, False, False],
        [True, False, False, False, False, False, False, False],
    ]
    assert NM(2, 4).is_valid(mask)


def test_nm_mask_groups_run_along_flattened_input_of_conv():
    torch.manual_seed(0)
    scores = torch.randn(3, 2, 2, 2)  # 2-D view (3, 8)
    mask = NM(2, 4).mask(scores, 12)
    assert mask.shape == scores.shape
    flat, sflat = mask.reshape(3, 2, 4), scores.reshape(3, 2, 4)
    expected = torch.zeros_like(flat)
    expected.scatter_(2, sflat.topk(2, dim=2).indices, True)
    assert torch.equal(flat, expected)


@pytest.mark.parametrize(
    "mask, valid",
    [
        ([[1, 1, 0, 0, 0, 0, 1, 1]], True),
        ([[1, 0, 0, 0, 0, 0, 0, 0]], True),
        ([[0, 0, 0, 0, 0, 0, 0, 0]], True),
        ([[1, 1, 1, 0, 0, 0, 0, 0]], False),
        ([[1, 1, 0, 0, 1, 1, 1, 1]], False),
        ([[0, 0, 1, 1, 1, 1, 0, 0]], True),  # straddles groups, each group has 2
    ],
)
def test_nm_is_valid(mask, valid):
    assert NM(2, 4).is_valid(torch.tensor(mask, dtype=torch.bool)) is valid


def test_block_mask_keeps_highest_sum_tiles():
    scores = torch.tensor(
        [
            [1.0, 1.0, 9.0, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [5.0, 5.0, 0.5, 0.5],
            [-9.0, 5.0, 0.5, 0.5],
        ]
    )
    # tile sums: top-left 4, top-right 9, bottom-left 6, bottom-right 2
    mask = Block(2, 2).mask(scores, 8)
    assert mask.tolist() == [
        [False, False, True, True],
        [False, False, True, True],
        [True, True, False, False],
        [True, True, False, False],
    ]
    assert Block(2, 2).is_valid(mask)
    assert Block(2, 2).mask(scores, 4).sum() == 4  # only the top-right tile
    assert Block(2, 2).mask(scores, 4)[0, 2:].all()


def test_block_mask_rounds_keep_to_whole_tiles():
    scores = torch.arange(16.0).reshape(4, 4)
    assert Block(2, 2).mask(scores, 7).sum() == 8  # 7/4 -> 2 tiles
    assert Block(2, 2).mask(scores, 5).sum() == 4  # 5/4 -> 1 tile
    assert Block(2, 2).mask(scores, 1).sum() == 0


def test_block_mask_on_conv_uses_2d_view():
    scores = torch.zeros(2, 2, 2, 2)  # 2-D view 2x8, tiles 2x4: columns 0-3 and 4-7
    scores.reshape(2, 8)[:, 4:] = 1.0
    mask = Block(2, 4).mask(scores, 8)
    assert mask.shape == scores.shape
    assert mask.reshape(2, 8)[:, 4:].all()
    assert not mask.reshape(2, 8)[:, :4].any()


@pytest.mark.parametrize(
    "mask, valid",
    [
        ([[1, 1, 0, 0], [1, 1, 0, 0]], True),
        ([[0, 0, 0, 0], [0, 0, 0, 0]], True),
        ([[1, 1, 1, 1], [1, 1, 1, 1]], True),
        ([[1, 1, 0, 0], [1, 0, 0, 0]], False),
        ([[0, 1, 1, 0], [0, 1, 1, 0]], False),  # straddles two tiles
    ],
)
def test_block_is_valid(mask, valid):
    assert Block(2, 2).is_valid(torch.tensor(mask, dtype=torch.bool)) is valid


def test_row_mask_keeps_highest_sum_rows():
    scores = torch.tensor([[1.0, 1.0, 1.0], [10.0, -9.0, 0.0], [0.0, 0.0, 5.0], [2.0, 2.0, 2.0]])
    # row sums: 3, 1, 5, 6
    mask = Row().mask(scores, 6)
    assert mask.tolist() == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    assert Row().mask(scores, 7).sum() == 6  # 7/3 -> 2 rows
    assert Row().mask(scores, 8).sum() == 9  # 8/3 -> 3 rows
    assert Row().is_valid(mask)


def test_row_mask_on_conv_keeps_whole_filters():
    scores = torch.zeros(3, 2, 2, 2)
    scores[1] = 1.0
    mask = Row().mask(scores, 8)
    assert mask[1].all() and not mask[0].any() and not mask[2].any()


@pytest.mark.parametrize(
    "mask, valid",
    [
        ([[1, 1, 1], [0, 0, 0]], True),
        ([[0, 0, 0], [0, 0, 0]], True),
        ([[1, 1, 0], [0, 0, 0]], False),
        ([[1, 1, 1], [0, 1, 0]], False),
    ],
)
def test_row_is_valid(mask, valid):
    assert Row().is_valid(torch.tensor(mask, dtype=torch.bool)) is valid


def test_unstructured_is_always_valid():
    assert Unstructured().is_valid(torch.tensor([[True, False, True]]))


def test_pattern_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Pattern().mask(torch.zeros(2), 1)


# -- constant fan-in -----------------------------------------------------------------------


def test_fanin_pattern_through_prune_keeps_equal_rows_and_the_exact_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Conv2d(2, 10, 5))
    masks = sparsekit.prune(model, 0.9, pattern="fanin")  # 4 and 5 inputs per row
    assert masks.pattern == "fanin"
    for name, mask in masks.masks.items():
        counts = mask.flatten(1).sum(1)
        assert (counts == counts[0]).all(), name
        assert 1 - int(mask.sum()) / mask.numel() == pytest.approx(0.9), name
    assert masks.sparsity() == pytest.approx(0.9)
    assert parse_pattern("fanin").is_valid(masks.masks["0.weight"])


def test_fanin_keeps_the_top_of_each_row_and_skips_dead_rows():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [-math.inf] * 4])
    mask = FanIn().mask(scores, 5)  # two live rows share 5: two inputs each
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True],
                             [False] * 4]


def test_fanin_budget_below_the_rows_keeps_that_many_rows_with_one_input():
    scores = torch.tensor([[4.0, 3.0], [1.0, 9.0], [2.0, 0.0], [-math.inf] * 2])
    mask = FanIn().mask(scores, 2)  # three live rows, two weights: the two best rows keep one
    assert mask.tolist() == [[True, False], [False, True], [False, False], [False, False]]
    assert not FanIn().mask(scores, 0).any()


def test_fanin_pattern_through_prune_never_cuts_a_layer_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    keep = {n: int(m.sum()) for n, m in compute_masks(model, 0.9)[0].items()}
    masks = sparsekit.prune(model, 0.9, pattern="fanin")
    first = masks.masks["0.weight"]  # 13 weights for 16 neurons: 13 neurons of fan-in 1
    assert int(first.sum()) == keep["0.weight"] == 13
    assert fan_in(first) == 1
    for mask in masks.masks.values():
        assert mask.any() and parse_pattern("fanin").is_valid(mask)
    x = torch.randn(2, 8)
    assert not torch.equal(model(x), model(x + 1))  # the output still depends on the input


def test_fanin_validity_and_common_fan_in():
    assert fan_in(torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])) == 2
    assert fan_in(torch.tensor([[1, 1, 0], [0, 0, 1]])) is None
    assert fan_in(torch.zeros(2, 3)) == 0
    assert not FanIn().is_valid(torch.tensor([[True, True], [True, False]]))
