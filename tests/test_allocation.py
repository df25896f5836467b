import pytest
import torch

from sparsekit import select
from sparsekit.allocation import (
    ALLOCATIONS,
    _sorted_lamp_scores,
    er,
    erdos_renyi_densities,
    erk,
    global_,
    lamp,
    lamp_scores,
    outlier_ratio,
    owl_sparsities,
    uniform,
)
from sparsekit.select import top_k

SHAPES = {
    "a": torch.Size((100, 50)),
    "b": torch.Size((10, 100)),
    "c": torch.Size((16, 8, 3, 3)),
}
NUMEL = {"a": 5000, "b": 1000, "c": 1152}
N = 7152
ALL = ["er", "erk", "global", "lamp", "owl", "uniform"]


def random_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in SHAPES.items()}


def test_registry_names():
    assert ALLOCATIONS.names() == ALL
    assert ALLOCATIONS.get("global") is global_
    assert ALLOCATIONS.names(uses_scores=True) == ["global", "lamp", "owl"]


# -- Erdős–Rényi (kernel) -----------------------------------------------------------------


def test_erk_raw_scores_by_hand():
    # raw = Σ dims / Π dims; raw · numel = Σ dims
    raw = {"a": 150 / 5000, "b": 110 / 1000, "c": 30 / 1152}
    assert raw["a"] == pytest.approx(0.03)
    assert raw["b"] == pytest.approx(0.11)
    assert raw["c"] == pytest.approx(0.026041666)
    dens = erdos_renyi_densities(SHAPES, 0.9)
    eps = 0.1 * N / (150 + 110 + 30)  # no layer capped: ε = budget / Σ raw·numel
    assert eps == pytest.approx(2.466206896)
    assert dens == pytest.approx({n: eps * raw[n] for n in SHAPES}, rel=1e-12)
    assert dens == pytest.approx({"a": 0.0739862, "b": 0.2712828, "c": 0.0642241}, rel=1e-6)
    kept = sum(dens[n] * NUMEL[n] for n in SHAPES)
    assert kept == pytest.approx(0.1 * N, rel=1e-12)


def test_erk_caps_small_layer_at_one_and_renormalises():
    dens = erdos_renyi_densities(SHAPES, 0.5)
    # first pass: ε = 3576 / 290 → b would get 0.11 · 12.33 = 1.356 > 1 → dense
    assert 0.11 * 3576 / 290 > 1.0
    # second pass without b: ε = (3576 - 1000) / (150 + 30)
    eps = 2576 / 180
    assert dens["b"] == 1.0
    assert dens["a"] == pytest.approx(eps * 150 / 5000, rel=1e-12)
    assert dens["c"] == pytest.approx(eps * 30 / 1152, rel=1e-12)
    assert dens == pytest.approx({"a": 0.4293333, "b": 1.0, "c": 0.3726852}, rel=1e-6)
    kept = sum(dens[n] * NUMEL[n] for n in SHAPES)
    assert kept == pytest.approx(0.5 * N, rel=1e-12)


def test_er_ignores_kernel_dims():
    dens = erdos_renyi_densities(SHAPES, 0.9, kernel=False)
    # ER raw of c is (16 + 8) / (16 · 8), so raw · numel = 24 · 9 = 216
    raw = {"a": 150 / 5000, "b": 110 / 1000, "c": 24 / 128}
    eps = 0.1 * N / (150 + 110 + 216)
    assert dens == pytest.approx({n: eps * raw[n] for n in SHAPES}, rel=1e-12)
    # a linear layer's ER and ERK densities use the same raw score
    erk_dens = erdos_renyi_densities(SHAPES, 0.9, kernel=True)
    assert dens["a"] / dens["b"] == pytest.approx(erk_dens["a"] / erk_dens["b"], rel=1e-12)
    assert dens["c"] / dens["a"] == pytest.approx((24 / 128) / 0.03, rel=1e-12)
    # the same conv with a different kernel size gets the same ER raw score
    other = erdos_renyi_densities({**SHAPES, "c": torch.Size((16, 8, 5, 5))}, 0.9, kernel=False)
    assert other["c"] / other["a"] == pytest.approx(dens["c"] / dens["a"], rel=1e-12)


def test_er_caps_repeatedly():
    dens = erdos_renyi_densities(SHAPES, 0.5, kernel=False)
    # pass 1: ε = 3576/476 → c = 1.41 (largest raw) → dense
    # pass 2: ε = 2424/260 → b = 1.026 → dense
    # pass 3: ε = 1424/150 → a = 0.2848
    assert dens["c"] == 1.0 and dens["b"] == 1.0
    assert dens["a"] == pytest.approx(1424 / 5000, rel=1e-12)


def test_erk_all_dense_at_zero_sparsity():
    assert erdos_renyi_densities(SHAPES, 0.0) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


def test_erk_counts_follow_densities():
    counts = erk(random_scores(), 0.5)
    dens = erdos_renyi_densities(SHAPES, 0.5)
    assert counts["b"] == 1000
    for n in SHAPES:
        assert abs(counts[n] - dens[n] * NUMEL[n]) < 1
    assert sum(counts.values()) == 3576


def test_er_counts_follow_densities():
    counts = er(random_scores(), 0.5)
    assert counts["c"] == 1152 and counts["b"] == 1000
    assert counts["a"] == 1424


# -- totals -------------------------------------------------------------------------------


@pytest.mark.parametrize("allocation", ALL)
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.75, 0.9, 0.95, 0.99])
def test_counts_sum_exactly(allocation, sparsity):
    counts = ALLOCATIONS.get(allocation)(random_scores(), sparsity)
    assert set(counts) == set(SHAPES)
    assert all(isinstance(c, int) for c in counts.values())
    assert sum(counts.values()) == round(N * (1 - sparsity))
    for n, c in counts.items():
        assert 0 <= c <= NUMEL[n]


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
def test_uniform_each_layer_within_one(sparsity):
    counts = uniform(random_scores(), sparsity)
    for n, c in counts.items():
        assert abs(c - NUMEL[n] * (1 - sparsity)) < 1


def test_uniform_rounds_by_largest_remainder():
    scores = {"x": torch.rand(3), "y": torch.rand(3), "z": torch.rand(3)}
    # 2/3 of 3 = 2 each; sparsity 0.5 -> 1.5 each, total 4.5 -> 4 (round half to even)
    assert uniform(scores, 0.5) == {"x": 2, "y": 1, "z": 1}
    scores = {"x": torch.rand(10), "y": torch.rand(7)}
    # 0.75 · 10 = 7.5, 0.75 · 7 = 5.25 → floors 7 + 5, total round(12.75) = 13 → x gets +1
    assert uniform(scores, 0.25) == {"x": 8, "y": 5}


def test_global_keeps_top_scores_across_layers():
    scores = {"a": torch.tensor([9.0, 8.0, 7.0, 1.0]), "b": torch.tensor([2.0, 3.0, 4.0, 0.5])}
    assert global_(scores, 0.5) == {"a": 3, "b": 1}
    assert global_(scores, 0.25) == {"a": 3, "b": 3}  # 9 8 7 | 4 3 2
    assert global_(scores, 0.875) == {"a": 1, "b": 0}


# -- LAMP ---------------------------------------------------------------------------------


def test_lamp_scores_by_hand():
    # squares [1, 4, 9]; suffix sums [14, 13, 9] → [1/14, 4/13, 9/9]
    out = lamp_scores(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([1 / 14, 4 / 13, 1.0]))


def test_lamp_scores_in_original_positions():
    out = lamp_scores(torch.tensor([3.0, 1.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([1.0, 1 / 14, 4 / 13]))
    out = lamp_scores(torch.tensor([[2.0, -3.0], [1.0, 0.0]]))  # squares [[4, 9], [1, 0]]
    torch.testing.assert_close(out, torch.tensor([[4 / 13, 1.0], [1 / 14, 0.0]]))


def test_lamp_scores_keep_neg_inf():
    out = lamp_scores(torch.tensor([3.0, float("-inf"), 1.0, 2.0, float("-inf")]))
    assert torch.isneginf(out[[1, 4]]).all()
    torch.testing.assert_close(out[[0, 2, 3]], torch.tensor([1.0, 1 / 14, 4 / 13]))


def test_lamp_scores_dtype_and_shape():
    s = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    out = lamp_scores(s)
    assert out.shape == s.shape and out.dtype == torch.float32
    assert out.max() == 1.0  # the largest entry of a layer always has LAMP score 1


def test_lamp_allocation_by_hand():
    # a: lamp [1/14, 4/13, 1]; b: squares [100]*4 → lamp [1/4, 1/3, 1/2, 1]
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 10.0, 10.0, 10.0])}
    # keep 4 of 7: 1 (a), 1 (b), 1/2 (b), 1/3 (b)
    assert lamp(scores, 3 / 7) == {"a": 1, "b": 3}
    # a global magnitude ranking would drop a entirely
    assert global_(scores, 3 / 7) == {"a": 0, "b": 4}
    # keep 5: + 4/13 (a) beats 1/4 (b)
    assert lamp(scores, 2 / 7) == {"a": 2, "b": 3}


# -- already-pruned entries (-inf) --------------------------------------------------------


@pytest.mark.parametrize("allocation", ALL)
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8])
def test_neg_inf_never_counted_as_kept(allocation, sparsity):
    scores = random_scores(1)
    alive = {}
    for n, s in scores.items():
        dead = torch.rand(s.shape, generator=torch.Generator().manual_seed(7)) < 0.6
        s.masked_fill_(dead, float("-inf"))
        alive[n] = int((~dead).sum())
    counts = ALLOCATIONS.get(allocation)(scores, sparsity)
    for n in scores:
        assert counts[n] <= alive[n]
    if sparsity <= 0.1:  # more budget than live weights: everything alive is kept
        assert counts == alive


@pytest.mark.parametrize("allocation", ["global", "lamp"])
def test_ranked_allocations_pick_only_finite(allocation):
    inf = float("-inf")
    scores = {"a": torch.tensor([inf, 5.0, inf, 1.0]), "b": torch.tensor([inf, inf, 2.0, 3.0])}
    assert ALLOCATIONS.get(allocation)(scores, 0.0) == {"a": 2, "b": 2}
    assert sum(ALLOCATIONS.get(allocation)(scores, 0.5).values()) == 4


@pytest.mark.parametrize("allocation", ALL)
def test_total_is_kept_when_layers_have_room(allocation):
    # "The counts always add up to round(total · (1 - sparsity)) when the layers have room"
    a = torch.rand(10, 10, generator=torch.Generator().manual_seed(0))
    a.view(-1)[10:] = float("-inf")  # only 10 live weights
    b = torch.rand(10, 10, generator=torch.Generator().manual_seed(1))
    counts = ALLOCATIONS.get(allocation)({"a": a, "b": b}, 0.5)
    assert counts["a"] <= 10
    assert sum(counts.values()) == 100  # 110 live weights, room for round(200 · 0.5)


# -- OWL ----------------------------------------------------------------------------------


def test_owl_gives_outlier_rich_layers_less_sparsity():
    g = torch.Generator().manual_seed(0)
    plain = torch.rand(64, 64, generator=g)
    heavy = torch.rand(64, 64, generator=g)
    heavy[:, :3] *= 40  # a few outlier input features, as in LLM activations
    counts = ALLOCATIONS.get("owl")({"plain": plain, "heavy": heavy}, 0.7)
    assert sum(counts.values()) == round(2 * 4096 * 0.3)
    assert 1 - counts["heavy"] / 4096 == pytest.approx(0.62, abs=1e-3)  # target − λ
    assert 1 - counts["plain"] / 4096 == pytest.approx(0.78, abs=1e-3)  # target + λ


def test_owl_without_outlier_differences_is_uniform():
    scores = {"a": torch.ones(10, 10), "b": torch.ones(20, 10)}
    assert ALLOCATIONS.get("owl")(scores, 0.5) == uniform(scores, 0.5)


def test_owl_centres_the_band_by_layer_size():
    # Unequal layers: the size-weighted mean of the sparsities is the target.
    s = owl_sparsities([0.0, 1.0], 0.5, weights=[3, 1])
    assert s == pytest.approx([0.54, 0.38])
    assert (3 * s[0] + s[1]) / 4 == pytest.approx(0.5)
    assert owl_sparsities([0.0, 1.0], 0.5) == pytest.approx([0.58, 0.42])


def test_outlier_ratio_ignores_pruned_entries():
    s = torch.tensor([1.0] * 9 + [100.0, float("-inf")])  # mean 10.9 over the 10 finite
    assert outlier_ratio([s]) == pytest.approx(1 / 10)
    assert outlier_ratio([torch.full((3,), float("-inf"))]) == 0.0


# -- the global ranking is chosen without concatenating the layers ------------------------


def counts_by_concatenation(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, int]:
    """The reference: all scores in one vector, the top k of it, counted per layer."""
    flat = torch.cat([s.flatten().float() for s in scores.values()])
    k = min(round(flat.numel() * (1.0 - sparsity)), int(torch.isfinite(flat).sum()))
    kept = top_k(flat, k).split([s.numel() for s in scores.values()])
    return {n: int(m.sum()) for n, m in zip(scores, kept)}


def tie_heavy_scores(g: torch.Generator) -> dict[str, torch.Tensor]:
    scores = {}
    for name, shape in SHAPES.items():
        s = torch.randint(0, 6, shape, generator=g).float() / 4  # many ties
        s[torch.rand(shape, generator=g) < 0.2] = float("-inf")  # already pruned
        scores[name] = s
    return scores


@pytest.mark.parametrize("chunk", [500, 1 << 20])
def test_global_and_lamp_equal_a_ranking_of_the_concatenation(monkeypatch, chunk):
    monkeypatch.setattr(select, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        scores = tie_heavy_scores(g)
        lamps = {n: lamp_scores(s) for n, s in scores.items()}
        for sparsity in (0.0, 0.3, 0.5, 0.9, 0.99, 1.0):
            assert global_(scores, sparsity) == counts_by_concatenation(scores, sparsity)
            assert lamp(scores, sparsity) == counts_by_concatenation(lamps, sparsity)


def test_sorted_lamp_scores_are_the_lamp_scores_in_order():
    g = torch.Generator().manual_seed(6)
    s = torch.randint(0, 6, (40, 30), generator=g).double()
    s[torch.rand(s.shape, generator=g) < 0.3] = float("-inf")
    assert torch.equal(_sorted_lamp_scores(s), lamp_scores(s).flatten().sort().values)


@pytest.mark.parametrize(("ratios", "weights", "name"), [
    ([float("nan"), 0.1], None, "ratios"), ([0.2, float("inf")], None, "ratios"),
    ([0.2, 0.1], [1.0, float("nan")], "weights")])
def test_owl_sparsities_refuse_non_finite_inputs(ratios, weights, name):
    """A NaN ratio made every sparsity NaN, silently."""
    with pytest.raises(ValueError, match=rf"{name} must be finite"):
        owl_sparsities(ratios, 0.6, weights=weights)
