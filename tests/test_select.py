import math

import pytest
import torch

from sparsekit import select
from sparsekit.select import check_real, top_k, top_k_counts, top_k_per_row


def by_sort(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: a stable descending sort of the allowed scores, first k."""
    ranked = torch.argsort(score.masked_fill(~allowed, -math.inf), descending=True,
                           stable=True)[: min(k, int(allowed.sum()))]
    expected = torch.zeros(score.numel(), dtype=torch.bool)
    expected[ranked] = True
    return expected


def test_picks_like_a_stable_descending_sort():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 200, (1,), generator=g))
        score = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        allowed = torch.rand(n, generator=g) < 0.6
        k = int(torch.randint(0, n + 3, (1,), generator=g))
        assert torch.equal(top_k(score, k, allowed=allowed), by_sort(score, allowed, k))
        everything = torch.ones(n, dtype=torch.bool)
        assert torch.equal(top_k(score, k), by_sort(score, everything, k))


def test_allowed_entries_with_minus_inf_are_still_chosen_first_by_position():
    inf = math.inf
    score = torch.tensor([-inf, -inf, 1.0, -inf])
    allowed = torch.tensor([False, True, True, True])
    assert top_k(score, 2, allowed=allowed).tolist() == [False, True, True, False]


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_per_slice_matches_a_sort_of_each_slice(dim):
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 4, (7, 9), generator=g).float()
    allowed = torch.rand(7, 9, generator=g) < 0.7
    got = top_k(score, 3, allowed=allowed, dim=dim)
    slices = score.movedim(dim, -1), allowed.movedim(dim, -1), got.movedim(dim, -1)
    for s, a, out in zip(*slices):
        assert torch.equal(out, by_sort(s, a, 3))


def test_shapes_dtypes_and_nan():
    assert top_k(torch.zeros(2, 3, 4), 5).sum() == 5
    assert top_k(torch.tensor([3, 1, 2]), 2).tolist() == [True, False, True]  # integers
    assert top_k(torch.tensor([1.0, math.nan, 2.0]), 1).tolist() == [False, True, False]
    assert not top_k(torch.rand(4), 0).any()
    assert top_k(torch.rand(4), 9).all()
    assert top_k(torch.empty(0, 3), 2, dim=1).shape == (0, 3)


def test_bad_arguments():
    with pytest.raises(TypeError, match="k must be an int"):
        top_k(torch.rand(3), 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be ≥ 0, got -1"):
        top_k(torch.rand(3), -1)
    with pytest.raises(ValueError, match="allowed must have the shape"):
        top_k(torch.rand(3), 1, allowed=torch.ones(4, dtype=torch.bool))


# -- chunked selection: top_k over many entries and top_k_counts across tensors -----------


def tie_heavy(g: torch.Generator, n: int, kind: int) -> torch.Tensor:
    """Scores with many ties, differing in every digit of the radix keys, with the special
    values a selection must rank right: ±inf, NaN (as +inf) and -0.0 (equal to 0.0)."""
    if kind == 0:
        score = torch.randint(-3, 4, (n,), generator=g).float()
    elif kind == 1:  # equal but for the lowest mantissa bits, both signs
        score = 1.0 + torch.randint(0, 6, (n,), generator=g).float() * 2**-23
        score[torch.rand(n, generator=g) < 0.3] *= -1
    else:
        score = (torch.randint(0, 5, (n,), generator=g) * 2**-10
                 + torch.randint(0, 3, (n,), generator=g) * 2**-20).float()
    for value, share in ((-math.inf, 0.1), (math.nan, 0.05), (-0.0, 0.05), (math.inf, 0.03)):
        score[torch.rand(n, generator=g) < share] = value
    return score


def by_sort_nan_as_inf(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """The reference for any scores: a stable descending sort of the allowed ones only."""
    where = allowed.nonzero().flatten()
    ranked = score[where].nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    expected = torch.zeros(score.numel(), dtype=torch.bool)
    expected[where[torch.argsort(ranked, descending=True, stable=True)[:k]]] = True
    return expected


def test_chunked_top_k_picks_like_a_stable_descending_sort(monkeypatch):
    monkeypatch.setattr(select, "_CHUNK", 16)  # many chunks of a small tensor
    g = torch.Generator().manual_seed(2)
    for i in range(150):
        n = int(torch.randint(17, 300, (1,), generator=g))
        score = tie_heavy(g, n, i % 3)
        allowed = torch.rand(n, generator=g) < 0.6
        k = int(torch.randint(0, n + 3, (1,), generator=g))
        everything = torch.ones(n, dtype=torch.bool)
        assert torch.equal(top_k(score, k, allowed=allowed),
                           by_sort_nan_as_inf(score, allowed, k))
        assert torch.equal(top_k(score, k), by_sort_nan_as_inf(score, everything, k))


def test_chunked_top_k_at_full_size_and_in_half_precision():
    g = torch.Generator().manual_seed(3)
    n = select._CHUNK + 5  # more than one real chunk: the chunked path
    score = (torch.randint(0, 1000, (n,), generator=g).float() / 7).to(torch.bfloat16)
    everything = torch.ones(n, dtype=torch.bool)
    for k in (n // 10, n - 3):  # bfloat16 rounding makes many ties
        assert torch.equal(top_k(score, k), by_sort(score.float(), everything, k))


def test_top_k_counts_equal_top_k_of_the_concatenation(monkeypatch):
    monkeypatch.setattr(select, "_CHUNK", 16)
    g = torch.Generator().manual_seed(4)
    for i in range(150):
        n = int(torch.randint(1, 300, (1,), generator=g))
        score = tie_heavy(g, n, i % 3)
        cuts = [0, *sorted(torch.randint(0, n + 1, (3,), generator=g).tolist()), n]
        parts = [score[a:b].reshape(-1, 1) for a, b in zip(cuts, cuts[1:])]  # any shapes
        k = int(torch.randint(0, n + 3, (1,), generator=g))
        chosen = top_k(score, k)
        assert top_k_counts(parts, k) == [int(chosen[a:b].sum()) for a, b in zip(cuts, cuts[1:])]


def test_top_k_counts_finite_only_and_dtypes():
    inf = math.inf
    parts = [torch.tensor([inf, 1.0, -inf]), torch.tensor([2.0, -inf], dtype=torch.float64)]
    assert top_k_counts(parts, 5) == [3, 2]
    assert top_k_counts(parts, 5, finite_only=True) == [1, 1]  # k capped at the 2 finite
    assert top_k_counts(parts, 0) == [0, 0]
    assert top_k_counts([torch.empty(0), torch.tensor([3, 1])], 1) == [0, 1]  # integers
    with pytest.raises(ValueError, match="k must be ≥ 0"):
        top_k_counts(parts, -1)


@pytest.mark.parametrize(("scores", "match"), [
    ([1.0, 2.0], "s must be a real tensor, got list"),
    (torch.ones(2, dtype=torch.complex64), "s must be a real tensor, got torch.complex64"),
    (torch.ones(2, 2).to_sparse(), "s must be a dense"),
    (torch.ones(2, device="meta"), "s is on the meta device"),
])
def test_check_real_names_scores_that_are_no_dense_real_tensor_with_values(scores, match):
    with pytest.raises((TypeError, ValueError), match=match):
        check_real(scores, "s")
    check_real(torch.ones(2), "s")


def test_top_k_per_row_spreads_k_evenly_and_the_remainder_by_the_next_best_score():
    scores = torch.tensor([[9.0, 1.0, 0.0], [8.0, 7.0, 6.0], [5.0, 4.0, 3.0]])
    assert top_k_per_row(scores, 3).tolist() == [[True, False, False], [True, False, False],
                                                 [True, False, False]]
    # two more: the rows whose next scores are highest (7 and 4), not row 0's 1
    assert top_k_per_row(scores, 5).sum(1).tolist() == [1, 2, 2]
    assert top_k_per_row(scores, 9).all() and not top_k_per_row(scores, 0).any()
    tied = torch.zeros(3, 4)  # ties go to the lower index, as top_k's
    assert top_k_per_row(tied, 4).tolist() == [[True, True, False, False], [True] + [False] * 3,
                                                [True] + [False] * 3]
    assert top_k_per_row(torch.empty(0, 4), 2).shape == (0, 4)
    with pytest.raises(ValueError, match=r"scores must be 2-D \(rows, columns\), got shape \(4,\)"):
        top_k_per_row(torch.ones(4), 1)
