import math

import pytest
import torch

from sparsekit.select import top_k


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
