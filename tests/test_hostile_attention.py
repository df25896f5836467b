"""Hostile inputs to sparse attention (``sparsekit.attention``) and ``structured.shrink``:
NaN in is NaN out on every path, results stay on the inputs' device, overflow and bad
arguments are clear errors naming the parameter, raised before anything changes.
"""

from __future__ import annotations

import math

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit
import sparsekit.attention as A
from sparsekit._checks import ArgumentTypeError
from sparsekit.attention import coverage
from sparsekit.attention.block_sparse import reference_attention
from sparsekit.engine import kernels

NAN = float("nan")


def _qkv(q_len: int = 6, kv_len: int = 6, dim: int = 4, heads: int = 1,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, q_len, dim, generator=g),
            torch.randn(1, heads, kv_len, dim, generator=g),
            torch.randn(1, heads, kv_len, dim, generator=g))


def _full(q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    return torch.ones(1, 1, -(-q_len // block_size), -(-kv_len // block_size), dtype=torch.bool)


# -- 1. NaN in q, k or v is NaN out on the native kernel, as on the reference ------------


@needs_kernels
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("size,block_size", [(6, 3), (130, 16)])  # read in place; packed
def test_nan_inputs_give_nan_rows_like_the_reference(causal, where, size, block_size):
    """Before, a row whose scores were all NaN came out as zeros from the native kernel."""
    q, k, v = _qkv(size, size, dim=4 if size < 100 else 16)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 0, size // 2, 0] = NAN
    mask = _full(size, size, block_size)
    got = A.block_sparse_attention(q, k, v, mask, causal=causal, block_size=block_size)
    want = reference_attention(q, k, v, mask, causal=causal, block_size=block_size)
    assert got[0, 0, size // 2].isnan().any()  # (v: only the NaN value's column)
    if causal and where != "q":  # rows that never see the NaN key or value are not NaN
        sees = torch.arange(size) >= size // 2
        assert got[0, 0, sees].isnan().any(-1).all() and got[0, 0, ~sees].isfinite().all()
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_nan_key_seen_first_and_alone_still_poisons_its_row(causal, isa):
    """Before, a NaN score in a row's first step (nothing finite yet) was dropped as unseen."""
    if isa not in kernels.isas():
        pytest.skip(f"this CPU does not run {isa}")
    q, k, v = _qkv(6, 6)
    k[0, 0, 0] = NAN  # row 0 (causal) sees key 0 alone, in its first key block
    mask = _full(6, 6, 3)
    with kernels.use_isa(isa):
        got = A.block_sparse_attention(q, k, v, mask, causal=causal, block_size=3)
    want = reference_attention(q, k, v, mask, causal=causal, block_size=3)
    assert got.isnan().all()  # every row sees key 0
    assert want.isnan().all()


@needs_kernels
def test_rows_without_a_kept_key_stay_zero_next_to_nan_rows():
    """Before the fix rows of zeros and NaN rows were one case; the zeros must stay zeros."""
    q, k, v = _qkv(6, 6)
    q[0, 0, 4, 1] = NAN
    mask = torch.tensor([[[[True, False], [False, False]]]])  # query block 1 keeps nothing
    out = A.block_sparse_attention(q, k, v, mask, causal=False, block_size=3)
    assert out[0, 0, 3:].eq(0).all() and not out[0, 0, :3].isnan().any()


# -- 2. patterns build their block masks on q's device -----------------------------------


@pytest.mark.parametrize("pattern", [A.Dense(), A.SinkWindow(sinks=1, window=2),
                                     A.UserMask(torch.ones(1, 1, 2, 2, dtype=torch.bool)),
                                     A.UserMask(lambda q_len, kv_len, b: torch.ones(
                                         1, 1, -(-q_len // b), -(-kv_len // b),
                                         dtype=torch.bool))])
@pytest.mark.parametrize("causal", [True, False])
def test_static_patterns_give_a_block_mask_on_q_device(pattern, causal):
    """Before, Dense and SinkWindow returned a CPU mask for meta (or CUDA) queries."""
    q, k, _ = (t.to("meta") for t in _qkv(6, 6))
    mask = pattern.block_mask(q, k, block_size=3, causal=causal)
    assert mask.device == q.device and mask.shape == (1, 1, 2, 2)


@pytest.mark.parametrize("name", sorted(set(A.ATTENTION_PATTERNS.names()) - {"mask"}))
@pytest.mark.parametrize("causal", [True, False])
def test_every_pattern_builds_its_block_mask_on_q_device(name, causal, monkeypatch):
    """Before, every pattern's position tensors were CPU ones (mixed with meta, or a CPU mask).

    Meta tensors hold no values, so the checks that read them (finite q, k, scores) are
    turned off here: what runs is every tensor a pattern builds.
    """
    import sparsekit.attention.coverage as coverage
    import sparsekit.attention.patterns as patterns

    shapes_only = coverage._check_qk
    for module in (coverage, patterns):
        monkeypatch.setattr(module, "_check_qk", lambda q, k, finite=False: shapes_only(q, k))
    q, k = (torch.randn(1, 2, 64, 8).to("meta") for _ in range(2))
    mask = A.resolve_pattern(name).block_mask(q, k, block_size=16, causal=causal)
    assert mask.device == q.device and mask.shape[2:] == (4, 4)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_path_builds_its_element_mask_on_q_device(causal):
    """Before, the causal element mask was a CPU tensor combined with the block mask's."""
    q, k, v = (t.to("meta") for t in _qkv(6, 6))
    mask = _full(6, 6, 3).to("meta")
    assert A.dense_block_mask(mask, 6, 6, causal=causal, block_size=3).device == q.device
    out = A.block_sparse_attention(q, k, v, mask, causal=causal, block_size=3)
    assert out.device == q.device and out.shape == q.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(set(A.ATTENTION_PATTERNS.names()) - {"mask"}))
def test_every_pattern_gives_its_block_mask_on_cuda(name):
    """Before, the position tensors of every pattern were built on the CPU."""
    q, k, _ = (t.cuda() for t in _qkv(64, 64, dim=8))
    pattern = A.resolve_pattern(name)
    mask = pattern.block_mask(q, k, block_size=16)
    assert mask.device == q.device
    assert 0 < pattern.coverage(q, k, block_size=16).recall <= 1 + 1e-6


# -- 3. scores that overflow float32 are an error, not a lost softmax mass ----------------


@pytest.mark.parametrize("how", ["scale", "magnitude"])
def test_overflowing_scores_raise_in_tile_mass_mass_recall_and_exact(how):
    """Before, overflowed scores softmaxed to NaN, zeroed: mass_recall of a full mask was 0.875."""
    q, k, _ = _qkv(8, 8)
    scale = 1e38 if how == "scale" else None
    if how == "magnitude":
        q, k = q * 1e20, k * 1e20
    full = _full(8, 8, 4)
    with pytest.raises(ValueError, match="overflow float32.*scale or the magnitudes"):
        A.mass_recall(q, k, full, block_size=4, scale=scale)
    with pytest.raises(ValueError, match="overflow float32"):
        A.tile_mass(q, k, block_size=4, scale=scale)
    if how == "magnitude":
        with pytest.raises(ValueError, match="overflow float32"):
            A.Exact().block_mask(q, k, block_size=4)


def test_large_finite_scores_still_give_full_recall():
    """Large scores that fit float32 keep working (the check is on overflow only)."""
    q, k, _ = _qkv(8, 8)
    assert A.mass_recall(q * 1e19, k, _full(8, 8, 4), block_size=4) == pytest.approx(1.0)


# -- 4 and 7: shrink --------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_shrink_refuses_different_masks_for_names_of_one_tied_tensor():
    """Before, the mask of whichever tied name came last in the dict silently won."""
    model = _Tied()
    cut = torch.ones(3, 3, dtype=torch.bool)
    cut[:, 0] = False
    before = model.a.weight.detach().clone()
    for masks in ({"a.weight": cut, "b.weight": torch.ones(3, 3, dtype=torch.bool)},
                  {"b.weight": torch.ones(3, 3, dtype=torch.bool), "a.weight": cut}):
        with pytest.raises(ValueError, match=r"'a.weight'.*'b.weight'|'b.weight'.*'a.weight'"):
            sparsekit.shrink(model, masks)
    assert torch.equal(model.a.weight, before)


def test_shrink_takes_equal_masks_for_names_of_one_tied_tensor():
    """Equal masks on both tied names are one mask: shrink runs and keeps the outputs."""
    model = _Tied()
    cut = torch.ones(3, 3, dtype=torch.bool)
    cut[:, 0] = False
    small = sparsekit.shrink(model, {"a.weight": cut, "b.weight": cut.clone()})
    masked = _Tied()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        masked.a.weight.mul_(cut)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert small.b.weight is small.a.weight
    torch.testing.assert_close(small(x), masked(x))


@pytest.mark.parametrize("masks", [{}, None, {"x": 1}])
def test_shrink_of_a_non_module_is_a_type_error_before_the_masks(masks):
    """Before, shrink("x", {}) raised AttributeError reading the masks against the string."""
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module, got str"):
        sparsekit.shrink("x", masks)


# -- 5. v's head_dim -------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])
def test_v_head_dim_other_than_q_is_refused_on_both_paths(grad):
    """Before, the kernel path raised a raw RuntimeError and the grad path computed a result."""
    q, k, _ = _qkv(6, 6)
    v = torch.randn(1, 1, 6, 5, requires_grad=grad)
    with pytest.raises(ValueError, match=r"v must have k's shape \(1, 1, 6, 4\).*\(1, 1, 6, 5\)"):
        A.block_sparse_attention(q, k, v, _full(6, 6, 3), block_size=3)


# -- 6 and 8: dense_block_mask -------------------------------------------------------------


def test_huge_block_size_on_the_grad_path_is_one_tile():
    """Before, the grad path expanded the mask block_size-fold: 2**40 tried to allocate 1 TB."""
    q, k, v = _qkv(6, 6)
    q.requires_grad_(True)
    mask = _full(6, 6, 2**40)
    out = A.block_sparse_attention(q, k, v, mask, block_size=2**40)
    with torch.no_grad():
        want = A.block_sparse_attention(q, k, v, mask, block_size=2**40)
    torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert q.grad is not None and q.grad.isfinite().all()
    assert A.dense_block_mask(mask, 6, 6, causal=False, block_size=2**40).all()


def test_dense_block_mask_expands_tiles_as_before():
    """The indexed expansion equals the repeat_interleave one it replaced, ragged and causal."""
    mask = torch.rand(2, 3, 3, 2, generator=torch.Generator().manual_seed(0)) < 0.5
    for causal in (True, False):
        want = mask.repeat_interleave(4, 2)[:, :, :10].repeat_interleave(4, 3)[..., :7]
        if causal:
            want = want & torch.ones(10, 7, dtype=torch.bool).tril(-3)
        got = A.dense_block_mask(mask, 10, 7, causal=causal, block_size=4)
        assert torch.equal(got, want)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.ones(1, 1, 2, 2), 6, 6), {"block_size": 3}, ValueError, "block_mask must be a bool"),
    ((torch.ones(1, 1, 3, 2, dtype=torch.bool), 6, 6), {"block_size": 3}, ValueError,
     r"block_mask must be a bool tensor .* 2, 2\) for block_size=3"),
    ((torch.ones(1, 1, 2, 2, dtype=torch.bool), 6, 6), {"block_size": 0}, ValueError,
     "block_size must be an int ≥ 1, got 0"),
    ((torch.ones(1, 1, 2, 2, dtype=torch.bool), 6, 6), {"block_size": 3.0}, ArgumentTypeError,
     "block_size must be an int"),
    ((torch.ones(1, 1, 2, 2, dtype=torch.bool), -1, 6), {"block_size": 3}, ValueError,
     "q_len must be an int ≥ 0, got -1"),
    ((torch.ones(1, 1, 2, 2, dtype=torch.bool), 6, "6"), {"block_size": 3}, ArgumentTypeError,
     "kv_len must be an int"),
    ((torch.ones(1, 1, 2, 2, dtype=torch.bool), 6, 6), {"block_size": 3, "causal": 1},
     ArgumentTypeError, "causal must be a bool"),
])
def test_dense_block_mask_validates_its_arguments(args, kwargs, error, match):
    """Before, these were NotImplementedError or raw RuntimeErrors from repeat_interleave."""
    kwargs = {"causal": True, **kwargs}
    with pytest.raises(error, match=match):
        A.dense_block_mask(*args, **kwargs)


# -- 9. mass_recall's mass ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, NAN, math.inf])
def test_mass_recall_refuses_negative_or_non_finite_mass(bad):
    """Before, a negative mass gave a recall of -0.5 and a NaN one a recall of nan."""
    q, k, _ = _qkv(6, 6)
    mass = torch.ones(1, 1, 2, 2)
    mass[0, 0, 1, 0] = bad
    with pytest.raises(ValueError, match="mass must hold finite values ≥ 0"):
        A.mass_recall(q, k, _full(6, 6, 3), block_size=3, mass=mass)


# -- 10. BreakEven's clock --------------------------------------------------------------------


@pytest.mark.parametrize("clock", [3, "perf_counter", None])
def test_break_even_clock_must_be_callable(clock):
    """Before, BreakEven(clock=3) was accepted and the first call failed: 'int' not callable."""
    with pytest.raises(ArgumentTypeError, match=r"clock must be a callable .*got"):
        A.BreakEven(clock=clock)


@pytest.mark.parametrize("huge", [2**40, 2**63 - 1])
def test_coverage_of_a_huge_block_size_is_one_tile(huge: int) -> None:
    """tile_mass padded the scores to whole tiles (2**40 rows) and visible_pairs overflowed
    int64 at 2**63 - 1; every block size past the longer sequence is the one tile that
    the sequence length gives (bounded_block_size)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    assert coverage.bounded_block_size(5, 7, huge) == 7
    for causal in (True, False):
        assert torch.equal(coverage.visible_pairs(5, 7, block_size=huge, causal=causal),
                           coverage.visible_pairs(5, 7, block_size=7, causal=causal))
        assert torch.equal(coverage.tile_mass(q, k, block_size=huge, causal=causal),
                           coverage.tile_mass(q, k, block_size=7, causal=causal))
