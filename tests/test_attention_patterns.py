"""Training-free attention patterns and their accounting, on hand-built score matrices.

With ``head_dim == kv_len`` and keys the identity, ``q kᵀ / sqrt(head_dim)`` is exactly the
matrix the test writes into ``q``, so each pattern's choice can be predicted by hand.
"""

import math

import pytest
import torch

from sparsekit.attention import (
    ATTENTION_PATTERNS,
    Antidiagonal,
    Coverage,
    Dense,
    Exact,
    SinkWindow,
    TopKBlocks,
    UserMask,
    VerticalSlash,
    block_sparse_attention,
    coverage,
    density,
    mass_recall,
    patterns,
    resolve_pattern,
    tile_mass,
    visible_pairs,
)


def scored(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose scaled scores are ``scores`` ``(q_len, kv_len)``."""
    kv_len = scores.shape[1]
    q = (scores * math.sqrt(kv_len))[None, None]
    return q, torch.eye(kv_len)[None, None]


def tile_constant(values: torch.Tensor, block_size: int) -> torch.Tensor:
    return values.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


@pytest.mark.parametrize(("q_len", "kv_len", "block_size", "causal"), [
    (10, 10, 4, True), (5, 13, 4, True), (13, 5, 4, True), (1, 100, 16, True),
    (64, 64, 16, True), (7, 9, 4, False),
])
def test_visible_pairs_count_each_tile_exactly(q_len, kv_len, block_size, causal):
    pairs = visible_pairs(q_len, kv_len, block_size=block_size, causal=causal)
    allowed = torch.ones(q_len, kv_len)
    if causal:
        allowed = allowed.tril(kv_len - q_len)
    qb, kb = pairs.shape
    pad = (0, kb * block_size - kv_len, 0, qb * block_size - q_len)
    padded = torch.nn.functional.pad(allowed, pad)
    expected = padded.view(qb, block_size, kb, block_size).sum((1, 3)).long()
    assert torch.equal(pairs, expected)


def test_density_and_recall_of_a_hand_mask_under_uniform_scores():
    q, k = scored(torch.zeros(8, 8))  # every visible key equally likely
    mask = torch.tensor([[False, False], [True, False]]).view(1, 1, 2, 2)
    # causal tiles hold 10, 16 and 10 visible pairs; the kept one holds 16
    assert density(mask, 8, 8, block_size=4, causal=True) == pytest.approx(16 / 36)
    # rows 4..7 keep 4 of their r + 1 keys, rows 0..3 nothing
    expected = sum(4 / (r + 1) for r in range(4, 8)) / 8
    assert mass_recall(q, k, mask, block_size=4) == pytest.approx(expected)
    assert mass_recall(q, k, mask, block_size=4, causal=False) == pytest.approx(0.25)


def test_coverage_of_a_mask_is_its_density_and_recall():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 56, 8)
    mask = SinkWindow(sinks=8, window=16).block_mask(q, k, block_size=8)
    cov = Coverage.of(q, k, mask, block_size=8)
    assert cov.density == density(mask, 40, 56, block_size=8, causal=True)
    assert cov.recall == mass_recall(q, k, mask, block_size=8)
    assert cov == SinkWindow(sinks=8, window=16).coverage(q, k, block_size=8)
    full = Coverage.of(q, k, torch.ones(1, 1, 5, 7, dtype=torch.bool), block_size=8,
                       causal=False)
    assert full.density == 1.0 and full.recall == pytest.approx(1.0)


def test_recall_is_the_same_chunked(monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 50, 8), torch.randn(2, 2, 50, 8)
    mask = torch.rand(2, 4, 7, 7) < 0.5
    whole = mass_recall(q, k, mask, block_size=8)
    monkeypatch.setattr(coverage, "_CHUNK_ELEMENTS", 1)
    assert mass_recall(q, k, mask, block_size=8) == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize(("q_len", "kv_len", "causal"), [
    (50, 50, True), (20, 50, True), (50, 20, True), (1, 45, True), (30, 45, False),
])
def test_tile_mass_sums_the_softmax_over_each_tile(q_len, kv_len, causal, monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, q_len, 8), torch.randn(2, 2, kv_len, 8)
    scores = q @ k.repeat_interleave(2, 1).mT / math.sqrt(8)
    if causal:
        scores = scores.masked_fill(torch.ones(q_len, kv_len).tril(kv_len - q_len) == 0,
                                    -math.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0).double()
    qb, kb = -(-q_len // 8), -(-kv_len // 8)
    padded = torch.nn.functional.pad(probs, (0, kb * 8 - kv_len, 0, qb * 8 - q_len))
    expected = padded.view(2, 4, qb, 8, kb, 8).sum((3, 5))
    mass = tile_mass(q, k, block_size=8, causal=causal)
    assert mass.dtype == torch.float64 and mass.shape == (2, 4, qb, kb)
    torch.testing.assert_close(mass, expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(coverage, "_CHUNK_ELEMENTS", 1)  # one block of rows at a time
    torch.testing.assert_close(tile_mass(q, k, block_size=8, causal=causal), expected,
                               rtol=1e-5, atol=1e-6)


def test_exact_keeps_the_fewest_tiles_reaching_the_threshold():
    # query block 1 (rows 4..7) puts 0.6, 0.3 and 0.1 of its mass on key blocks 2, 0, 1;
    # (queries aligned with the last keys: query block r's local tile is key block r + 1)
    share = torch.tensor([[1.0, 1e-30, 1e-30], [0.3, 0.1, 0.6]])
    q, k = scored(tile_constant(share.log(), 4))  # uniform within a tile
    assert Exact(threshold=0.5).block_mask(q, k, block_size=4, causal=False)[0, 0].tolist() \
        == [[True, True, False], [False, False, True]]
    assert Exact(threshold=0.85).block_mask(q, k, block_size=4, causal=False)[0, 0].tolist() \
        == [[True, True, False], [True, False, True]]
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 96, 8) * 3, torch.randn(1, 2, 96, 8)
    for threshold in (0.5, 0.9, 0.99):
        exact = Exact(threshold=threshold)
        mask = exact.block_mask(q, k, block_size=16)
        mass = tile_mass(q, k, block_size=16)
        kept = (mass * mask).sum(-1) / mass.sum(-1)
        assert bool((kept >= threshold - 1e-9).all())  # every query block reaches it
        # ... with the largest tiles (besides the local one), as few as reach it
        others = mask & ~torch.eye(6, dtype=torch.bool)
        smallest_kept = mass.masked_fill(~others, math.inf).amin(-1)
        largest_dropped = mass.masked_fill(mask, -math.inf).amax(-1)
        assert bool((largest_dropped <= smallest_kept).all())
        ordered = mass.sort(-1, descending=True).values.cumsum(-1)
        fewest = (ordered < threshold * mass.sum(-1, keepdim=True) - 1e-12).sum(-1) + 1
        assert bool(((mask.sum(-1) == fewest) | (mask.sum(-1) == fewest + 1)).all())
        assert exact.coverage(q, k, block_size=16).recall >= threshold


def test_sink_window_mask_is_exact():
    q = k = torch.zeros(1, 1, 16, 4)
    mask = SinkWindow(sinks=1, window=5).block_mask(q, k, block_size=4)
    expected = torch.tensor([
        [1, 0, 0, 0],
        [1, 1, 0, 0],  # rows 4..7 reach back to key 0
        [1, 1, 1, 0],  # rows 8..11 reach back to key 4
        [1, 0, 1, 1],  # rows 12..15 reach back to key 8; key 0 is the sink
    ], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    decode = SinkWindow(sinks=4, window=4).block_mask(q[:, :, -1:], k, block_size=4)
    assert torch.equal(decode[0, 0], torch.tensor([[True, False, False, True]]))


def test_sink_window_without_causal_looks_both_ways():
    q = k = torch.zeros(1, 1, 16, 4)
    mask = SinkWindow(sinks=0, window=2).block_mask(q, k, block_size=4, causal=False)
    band = torch.eye(4, dtype=torch.bool) | torch.eye(4, dtype=torch.bool).roll(1, 0)
    band = band | band.T
    band[0, 3] = band[3, 0] = False
    assert torch.equal(mask[0, 0], band)


def test_antidiagonal_keeps_the_hot_tile_of_each_query_block():
    hot = torch.zeros(4, 4)
    hot[0, 2] = hot[1, 0] = hot[2, 3] = hot[3, 1] = 10.0
    q, k = scored(tile_constant(hot, 4))
    pattern = Antidiagonal(threshold=0.9, stride=2)
    mask = pattern.block_mask(q, k, block_size=4, causal=False)
    assert torch.equal(mask[0, 0], (hot > 0) | torch.eye(4, dtype=torch.bool))
    cov = pattern.coverage(q, k, block_size=4, causal=False)
    assert cov.density == pytest.approx(8 / 16)
    assert cov.recall > 0.999


@pytest.mark.parametrize(("q_len", "kv_len", "causal"), [
    (200, 200, True), (70, 200, True), (200, 90, True), (1, 200, True), (150, 150, False),
])
def test_antidiagonal_estimate_is_the_same_in_query_chunks(q_len, kv_len, causal, monkeypatch):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, q_len, 16) * 2, torch.randn(2, 2, kv_len, 16)
    pattern = Antidiagonal(threshold=0.9, stride=4)
    monkeypatch.setattr(patterns, "_ESTIMATE_CHUNKS", 1)
    whole = pattern.block_mask(q, k, block_size=16, causal=causal)
    for chunks in (3, 100):  # causal chunks score only the keys up to their last query
        monkeypatch.setattr(patterns, "_ESTIMATE_CHUNKS", chunks)
        assert torch.equal(pattern.block_mask(q, k, block_size=16, causal=causal), whole)


def test_antidiagonal_threshold_decides_how_many_tiles():
    values = torch.tensor([[0.0, 0.0, 0.0, 0.0]] * 3 + [[3.0, 2.0, 1.0, 0.0]])
    q, k = scored(tile_constant(values, 4))
    # last query block: tile masses ∝ e^3, e^2, e^1, e^0 → 0.64, 0.24, 0.09, 0.03
    few = Antidiagonal(threshold=0.6, stride=4).block_mask(q, k, block_size=4)[0, 0, 3]
    more = Antidiagonal(threshold=0.95, stride=4).block_mask(q, k, block_size=4)[0, 0, 3]
    assert few.tolist() == [True, False, False, True]  # the hot tile and the local tile
    assert more.tolist() == [True, True, True, True]


def test_vertical_slash_keeps_a_sink_column():
    scores = torch.zeros(32, 32)
    scores[:, 0] = 10.0  # every query attends to the first token
    q, k = scored(scores)
    mask = VerticalSlash(threshold=0.95, last_queries=8).block_mask(q, k, block_size=4)
    expected = torch.eye(8, dtype=torch.bool)  # the local tiles
    expected[:, 0] = True  # the column alone holds the mass; no diagonal is needed
    assert torch.equal(mask[0, 0], expected)
    assert VerticalSlash().coverage(q, k, block_size=4).recall > 0.99


def test_vertical_slash_keeps_only_the_diagonal_of_local_attention():
    q, k = scored(10.0 * torch.eye(32))
    mask = VerticalSlash(threshold=0.95, last_queries=8).block_mask(q, k, block_size=4)
    # the main diagonal holds the mass (the columns of the last queries' own keys hold
    # one eighth each and are not needed)
    assert torch.equal(mask[0, 0], torch.eye(8, dtype=torch.bool))


def test_vertical_slash_maps_a_diagonal_to_the_tiles_it_crosses():
    scores = torch.zeros(32, 32)
    rows = torch.arange(5, 32)
    scores[rows, rows - 5] = 10.0  # every query attends 5 tokens back
    q, k = scored(scores)
    mask = VerticalSlash(threshold=0.95, last_queries=8).block_mask(q, k, block_size=4)
    # query block i (rows 4i..4i+3) reaches keys 4i-5..4i-2: key blocks i-2 and i-1
    expected = torch.eye(8, dtype=torch.bool) | torch.eye(8, dtype=torch.bool).roll(-1, 1)
    expected |= torch.eye(8, dtype=torch.bool).roll(-2, 1)
    assert torch.equal(mask[0, 0], expected.tril())
    decode = VerticalSlash(last_queries=8).block_mask(q[:, :, -1:], k, block_size=4)
    assert decode[0, 0, 0].tolist() == [False] * 6 + [True, True]  # key 26 and the local tile


def test_top_k_keeps_the_best_pooled_tiles():
    values = torch.arange(16.0).view(4, 4).flip(1)  # the first key block scores highest
    q, k = scored(tile_constant(values, 4))
    mask = TopKBlocks(density=0.5).block_mask(q, k, block_size=4, causal=False)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:, :2] = True
    expected |= torch.eye(4, dtype=torch.bool)  # and the local tile
    assert torch.equal(mask[0, 0], expected)
    causal = TopKBlocks(density=0.25).block_mask(q, k, block_size=4)
    assert causal[0, 0].tril().equal(causal[0, 0])
    assert causal[0, 0].sum(-1).tolist() == [1, 2, 2, 2]


@pytest.mark.parametrize("causal", [True, False])
def test_every_pattern_runs_with_gqa_bf16_ragged_and_decode(causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 70, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 70, 16, dtype=torch.bfloat16)
    for name in ATTENTION_PATTERNS.names():
        options = {"mask": torch.ones(1, 1, 5, 5, dtype=torch.bool)} if name == "mask" else {}
        pattern = resolve_pattern(name, **options)
        mask = pattern.block_mask(q, k, block_size=16, causal=causal)
        assert mask.dtype == torch.bool and mask.shape[2:] == (5, 5)
        assert mask.shape[0] in (1, 2) and mask.shape[1] in (1, 4)
        assert bool(mask[..., torch.arange(5), torch.arange(5)].all())  # the local tiles
        out = block_sparse_attention(q, k, k, mask, block_size=16, causal=causal)
        assert out.shape == q.shape
        if name != "mask":
            step = pattern.block_mask(q[:, :, -1:], k, block_size=16, causal=causal)
            assert step.shape[2:] == (1, 5) and bool(step[..., -1].all())
            longer = pattern.block_mask(q, k[:, :, :40], block_size=16, causal=causal)
            assert longer.shape[2:] == (5, 3)  # more queries than keys


def test_dense_pattern_keeps_all_mass_and_full_density():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    cov = Dense().coverage(q, k, block_size=16)
    assert cov.density == 1.0 and cov.recall == pytest.approx(1.0)


def test_user_mask_tensor_and_function():
    q = k = torch.zeros(1, 1, 8, 4)
    tiles = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2)
    assert torch.equal(UserMask(tiles).block_mask(q, k, block_size=4), tiles)
    assert torch.equal(resolve_pattern(tiles).block_mask(q, k, block_size=4), tiles)
    follow = UserMask(lambda q_len, kv_len, bs: torch.ones(1, 1, -(-q_len // bs), -(-kv_len // bs),
                                                           dtype=torch.bool))
    assert bool(follow.block_mask(q, k, block_size=4, causal=False).all())
    with pytest.raises(ValueError,
                       match=r"mask must be a bool tensor .*2, 2\) for block_size=4, got"):
        UserMask(torch.ones(1, 1, 3, 3, dtype=torch.bool)).block_mask(q, k, block_size=4)


def test_bad_arguments_fail_clearly():
    q = k = torch.zeros(1, 1, 8, 4)
    with pytest.raises(ValueError, match="unknown pattern 'nope'; accepted: antidiagonal, dense"):
        resolve_pattern("nope")
    with pytest.raises(ValueError, match="block_size must be an int ≥ 1, got 0"):
        Dense().block_mask(q, k, block_size=0)
    for threshold in (0.0, 1.5, float("nan"), -1):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            Antidiagonal(threshold=threshold)
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
            VerticalSlash(threshold=threshold)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        TopKBlocks(density=0)
    with pytest.raises(TypeError, match="window must be an int"):
        SinkWindow(window=2.5)
    with pytest.raises(ValueError, match="block_size must be a multiple of stride=8, got 12"):
        Antidiagonal().block_mask(q, k, block_size=12)
    with pytest.raises(ValueError, match="q must be a floating 4-D tensor"):
        Dense().block_mask(q[0], k, block_size=4)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        UserMask(torch.ones(2, 2))
    with pytest.raises(TypeError, match="apply to a pattern name"):
        resolve_pattern(Dense(), threshold=0.5)
    assert ATTENTION_PATTERNS.names(adaptive=True) == ["antidiagonal", "vertical_slash"]
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        Exact(threshold=0.0)


def test_coverage_takes_the_tile_masses_once_for_several_masks():
    """mass_recall and Coverage.of take the tile_mass of q and k when it is at hand (several
    masks of the same queries and keys then read the scores once) and give the same numbers;
    a mass of the wrong shape, or with a scale besides, is refused."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 40, 8), torch.randn(2, 2, 40, 8)
    mass = tile_mass(q, k, block_size=8)
    for pattern in (SinkWindow(sinks=8, window=16), TopKBlocks(density=0.5), Exact(0.9)):
        mask = pattern.block_mask(q, k, block_size=8)
        assert mass_recall(q, k, mask, block_size=8, mass=mass) == mass_recall(
            q, k, mask, block_size=8)
        assert Coverage.of(q, k, mask, block_size=8, mass=mass) == pattern.coverage(
            q, k, block_size=8)
    with pytest.raises(ValueError, match=r"mass must be the float32 or float64 tile_mass of q "
                                         r"and k, shape \(2, 4, 5, 5\), got torch.float64 "
                                         r"\(2, 4, 5, 4\)"):
        mass_recall(q, k, mask, block_size=8, mass=mass[..., :4])
    with pytest.raises(ValueError, match="pass scale or mass, not both"):
        mass_recall(q, k, mask, block_size=8, mass=mass, scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_mass_is_refused(dtype):
    """A float16 tile_mass gave a recall of 1.00006 (its rounding passed the check that a
    query block's tiles add up to at most its rows), summed in float16 a recall of inf."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 1, 8, 8)
    mask = torch.ones(1, 1, 3, 2, dtype=torch.bool)
    mass = tile_mass(q, k, block_size=4)
    match = rf"mass must be the float32 or float64 tile_mass .* got {dtype} \(1, 2, 3, 2\)"
    with pytest.raises(ValueError, match=match):
        Coverage.of(q, k, mask, block_size=4, mass=mass.to(dtype))
    assert Coverage.of(q, k, mask, block_size=4, mass=mass.float()).recall <= 1


def test_exact_coverage_reads_the_scores_once(monkeypatch):
    """Exact's coverage is its block mask's, with the tile masses computed once for both."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8)
    exact = Exact(0.8)
    mask = exact.block_mask(q, k, block_size=8)
    expected = Coverage.of(q, k, mask, block_size=8)
    calls = []
    real = patterns.tile_mass
    monkeypatch.setattr(patterns, "tile_mass", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert exact.coverage(q, k, block_size=8) == expected and len(calls) == 1
    with pytest.raises(ValueError, match="block_size must be"):
        exact.coverage(q, k, block_size=0)


_SCORED = [TopKBlocks(density=0.5), VerticalSlash(), Antidiagonal(stride=2), Exact()]


@pytest.mark.parametrize("pattern", _SCORED, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["q", "k"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_scored_patterns_refuse_non_finite_queries_and_keys(pattern, name, value):
    """A NaN or inf in q or k chose some mask without a sign that it was wrong."""
    torch.manual_seed(0)
    args = {"q": torch.randn(1, 2, 16, 8), "k": torch.randn(1, 2, 16, 8)}
    args[name][0, 1, 3, 2] = value
    with pytest.raises(ValueError, match=f"{name} must hold finite values .* got 1 NaN"):
        pattern.block_mask(**args, block_size=4)
    with pytest.raises(ValueError, match=f"{name} must hold finite values"):
        pattern.coverage(**args, block_size=4)


def test_coverage_refuses_non_finite_queries_and_keys_but_positional_patterns_do_not():
    """mass_recall of a NaN q was a number (0.97); the masks of patterns that never read
    the values of q and k are right whatever they hold."""
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    q[0, 0, 3, 2] = float("nan")
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="q must hold finite values"):
        mass_recall(q, k, mask, block_size=4)
    with pytest.raises(ValueError, match="q must hold finite values"):
        tile_mass(q, k, block_size=4)
    for pattern in (Dense(), SinkWindow(sinks=1, window=4), UserMask(mask)):
        assert torch.equal(pattern.block_mask(q, k, block_size=4),
                           pattern.block_mask(q.nan_to_num(), k, block_size=4))


@pytest.mark.parametrize("pattern", [*_SCORED, Dense(), SinkWindow(1, 1)], ids=lambda p: p.name)
def test_patterns_refuse_no_heads_and_keys_on_another_device(pattern):
    """0 key/value heads was a bare ZeroDivisionError, keys on another device a
    RuntimeError from deep inside the estimate."""
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"k must have heads ≥ 1 and head_dim ≥ 1, got shape"):
        pattern.block_mask(q, torch.randn(1, 0, 16, 8), block_size=4)
    with pytest.raises(ValueError, match=r"q must have heads ≥ 1 and head_dim ≥ 1, got shape"):
        pattern.block_mask(q[..., :0], q[..., :0], block_size=4)
    with pytest.raises(ValueError, match=r"k must be on q's device \(cpu\), got meta"):
        pattern.block_mask(q, q.to("meta"), block_size=4)


@pytest.mark.parametrize("causal", ["no", None, 1])
def test_causal_must_be_a_bool_in_patterns_and_coverage(causal):
    """"no" and 1 passed as true, None as false."""
    q = k = torch.randn(1, 2, 16, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    match = rf"causal must be a bool \(True or False\), got {causal!r}"
    for call in (
        lambda: TopKBlocks().block_mask(q, k, block_size=4, causal=causal),
        lambda: SinkWindow().coverage(q, k, block_size=4, causal=causal),
        lambda: Exact().coverage(q, k, block_size=4, causal=causal),
        lambda: tile_mass(q, k, block_size=4, causal=causal),
        lambda: mass_recall(q, k, mask, block_size=4, causal=causal),
        lambda: density(mask, 16, 16, block_size=4, causal=causal),
        lambda: visible_pairs(16, 16, block_size=4, causal=causal),
    ):
        with pytest.raises(TypeError, match=match):
            call()


@pytest.mark.parametrize("scale", [float("nan"), -1.0, 0.0, True])
def test_tile_mass_and_mass_recall_refuse_a_bad_scale(scale):
    q = k = torch.randn(1, 2, 16, 8)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    match = "scale must be a positive finite float or None"
    with pytest.raises(ValueError, match=match):
        tile_mass(q, k, block_size=4, scale=scale)
    with pytest.raises(ValueError, match=match):
        mass_recall(q, k, mask, block_size=4, scale=scale)


@pytest.mark.parametrize("shape", [(3, 1, 4, 4), (1, 3, 4, 4), (2, 1, 4, 4)])
def test_a_mask_of_other_batch_or_heads_is_refused(shape):
    """UserMask returned a (3, 1, 4, 4) mask for a batch of 1, and mass_recall summed the
    mass once per broadcast copy (a recall above 1)."""
    q = k = torch.randn(1, 2, 16, 8)
    mask = torch.ones(shape, dtype=torch.bool)
    match = r"mask must be a bool tensor \(1 or 1, 1 or 2, 4, 4\) for block_size=4, got"
    with pytest.raises(ValueError, match=match):
        UserMask(mask).block_mask(q, k, block_size=4)
    with pytest.raises(ValueError, match=match):
        mass_recall(q, k, mask, block_size=4)
    shared = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert UserMask(shared).block_mask(q, k, block_size=4).shape == (1, 1, 4, 4)
