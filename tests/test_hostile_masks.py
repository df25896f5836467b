"""Hostile inputs to masks: MaskSet patterns and dtypes, a removed MaskSet, Delta values and
support masks, loss functions that return no scalar, and SparseLinear's arguments.

Every bad value is refused with an error naming the argument, before anything changes.
"""

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit import MaskSet, SparseLinear
from sparsekit.finetune import Delta, DeltaTraining, masked_delta
from sparsekit.prune import compute_masks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


_NOT_BOOL = [torch.full((16, 8), 0.5), torch.full((16, 8), float("nan")),
             torch.full((16, 8), 3), torch.ones(16, 8, dtype=torch.complex64)]


# -- 1. MaskSet(pattern=) is a pattern load accepts, and the masks follow it ----------------

@pytest.mark.parametrize("pattern", ["garbage", "none", "5:4", "block:0x2"])
def test_maskset_refuses_unknown_patterns(pattern):
    model = _model()
    masks = compute_masks(model, 0.5)[0]
    with pytest.raises(ValueError, match="pattern"):
        MaskSet(model, masks, pattern=pattern)


def test_maskset_refuses_masks_that_break_its_nm_pattern():
    model = _model()
    masks = compute_masks(model, 0.5)[0]  # unstructured: not 2:4
    with pytest.raises(ValueError, match=r"mask for '0.weight' does not follow pattern='2:4'"):
        MaskSet(model, masks, pattern="2:4")


def test_a_maskset_that_save_writes_is_one_load_reads(tmp_path):
    model = _model()
    ms = sparsekit.prune(model, 0.5, pattern="2:4")
    again = MaskSet(model, ms.masks, pattern="2:4")
    path = sparsekit.save(model, tmp_path / "m.safetensors", again)
    assert sparsekit.load(_model(), path).pattern == "2:4"


def test_update_and_load_state_dict_keep_the_pattern():
    model = _model()
    ms = sparsekit.prune(model, 0.5, pattern="2:4")
    before, masks = snapshot(model), {n: m.clone() for n, m in ms.masks.items()}
    dense_half = torch.zeros(16, 8, dtype=torch.bool)
    dense_half[:, :4] = True  # half the weights, but 4 of every 4 in half the groups
    with pytest.raises(ValueError, match="'0.weight' does not follow pattern='2:4'"):
        ms.update({"0.weight": dense_half})
    with pytest.raises(ValueError, match="unknown pattern 'garbage'"):
        ms.load_state_dict({"pattern": "garbage", "masks": masks})
    assert unchanged(model, before)
    assert all(torch.equal(ms.masks[n], m) for n, m in masks.items())
    assert ms.pattern == "2:4"


def test_a_mask_that_keeps_everything_follows_any_pattern():
    """GradualPruner declares its pattern before its first prune."""
    model = _model()
    pruner = sparsekit.GradualPruner(model, 0.5, start_step=1, end_step=2, every=1,
                                     pattern="2:4")
    assert pruner.masks.sparsity() == 0.0
    pruner.step()
    assert pruner.masks.sparsity() == 0.5


# -- 2. masks are bool tensors ------------------------------------------------------------

@pytest.mark.parametrize("mask", _NOT_BOOL, ids=["half", "nan", "three", "complex"])
def test_maskset_refuses_masks_that_are_not_bool(mask):
    model = _model()
    with pytest.raises(ValueError, match=rf"mask for '0.weight' .*got dtype {mask.dtype}"):
        MaskSet(model, {"0.weight": mask})
    ms = MaskSet(model, {"0.weight": torch.ones(16, 8, dtype=torch.bool)})
    before = snapshot(model)
    with pytest.raises(TypeError, match="mask for '0.weight' must be a bool tensor"):
        ms.update({"0.weight": mask})
    with pytest.raises(TypeError, match="mask for '0.weight' must be a bool tensor"):
        ms.load_state_dict({"masks": {"0.weight": mask}})
    assert unchanged(model, before)
    assert bool(ms.masks["0.weight"].all())


@pytest.mark.parametrize("mask", _NOT_BOOL, ids=["half", "nan", "three", "complex"])
def test_delta_and_its_support_refuse_masks_that_are_not_bool(mask):
    with pytest.raises(ValueError, match=r"masks\['0.weight'\] must be a bool tensor"):
        Delta({"0.weight": torch.zeros(16, 8)}, {"0.weight": mask})
    model = _model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"support\['0.weight'\] must be a bool tensor"):
        DeltaTraining(model, {"0.weight": mask})
    assert unchanged(model, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


@pytest.mark.parametrize("mask", _NOT_BOOL, ids=["half", "nan", "three", "complex"])
def test_sparse_linear_refuses_masks_that_are_not_bool(mask):
    mask = mask[:4]
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        SparseLinear.from_linear(nn.Linear(8, 4), mask)
    layer = SparseLinear(8, 4, torch.ones(4, 8, dtype=torch.bool))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        layer.set_structure(mask)
    assert unchanged(layer, before)


# -- 3. a removed MaskSet ------------------------------------------------------------------

def test_a_removed_maskset_says_so():
    model = _model()
    ms = sparsekit.prune(model, 0.5)
    masks = ms.state_dict()
    ms.remove()
    ms.remove()  # nothing left to remove: a no-op
    before = snapshot(model)
    for call in (ms.apply, lambda: ms.update(masks["masks"]), lambda: ms.load_state_dict(masks),
                 lambda: ms.attach(torch.optim.SGD(model.parameters(), lr=0.1))):
        with pytest.raises(RuntimeError, match=r"masks were removed by remove\(\)"):
            call()
    assert unchanged(model, before)


# -- 4. a Delta changes only what its masks keep, by finite amounts ------------------------

def test_delta_values_outside_the_support_are_refused():
    with pytest.raises(ValueError, match=r"values\['0.weight'\] is nonzero at 128 entries"):
        Delta({"0.weight": torch.ones(16, 8)}, {"0.weight": torch.zeros(16, 8, dtype=torch.bool)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_delta_values_that_are_not_finite_are_refused(bad):
    values = torch.zeros(16, 8)
    values[0, 0] = bad
    with pytest.raises(ValueError, match=r"values\['0.weight'\] holds NaN or infinite"):
        Delta({"0.weight": values}, {"0.weight": torch.ones(16, 8, dtype=torch.bool)})


@pytest.mark.parametrize(("values", "masks", "match"), [
    ({"0.weight": [1]}, {"0.weight": [1]}, r"values\['0.weight'\] must be a floating-point"),
    ({"0.weight": torch.ones(2, dtype=torch.int64)}, {"0.weight": torch.ones(2, dtype=torch.bool)},
     r"values\['0.weight'\] must be a floating-point tensor, got torch.int64"),
    ({"0.weight": torch.zeros(2)}, {"0.weight": [True, True]},
     r"masks\['0.weight'\] must be a bool tensor of shape \(2,\), got list"),
    ([torch.zeros(2)], {}, "values must be a dict"),
    ({}, None, "masks must be a dict"),
])
def test_delta_arguments_of_the_wrong_type_are_refused(values, masks, match):
    with pytest.raises(TypeError, match=match):
        Delta(values, masks)


def test_the_trained_delta_is_zero_outside_its_support():
    """Entries of Δ written directly (not by a masked optimizer step) stay out of the Delta."""
    training = masked_delta(_model(), 0.5, method="magnitude")
    with torch.no_grad():
        for p in training.parameters():
            p.fill_(1.0)
    delta = training.delta()
    for n, values in delta.values.items():
        assert torch.equal(values, delta.masks[n].float())


def test_support_that_is_no_dict_is_refused():
    with pytest.raises(TypeError, match="support must be a dict"):
        DeltaTraining(_model(), [("0.weight", torch.ones(16, 8, dtype=torch.bool))])


# -- 5. loss_fn returns a scalar tensor -----------------------------------------------------

_PRUNE = pytest.param(lambda m, fn: sparsekit.prune(m, 0.5, method="snip", data=_data(),
                                                    loss_fn=fn), id="prune")
_DELTA = pytest.param(lambda m, fn: masked_delta(m, 0.5, data=_data(), loss_fn=fn),
                      id="masked_delta")


@pytest.mark.parametrize("run", [_PRUNE, _DELTA])
@pytest.mark.parametrize(("loss_fn", "error", "match"), [
    (lambda out, labels: out, ValueError, r"loss_fn must return a scalar tensor .*\(4, 4\)"),
    (lambda out, labels: "loss", TypeError, "loss_fn must return a scalar tensor, got str"),
    (3, TypeError, "loss_fn must be a callable"),
])
def test_a_loss_fn_that_returns_no_scalar_is_refused(run, loss_fn, error, match):
    model = _model()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        run(model, loss_fn)
    assert unchanged(model, before)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


# -- 6. SparseLinear's arguments -------------------------------------------------------------

_MASK = torch.ones(4, 8, dtype=torch.bool)


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((8.9, 4, _MASK), {}, "in_features must be an int ≥ 0, got 8.9"),
    (("8", 4, _MASK), {}, "in_features must be an int ≥ 0, got '8'"),
    ((True, 4, _MASK), {}, "in_features must be an int ≥ 0, got True"),
    ((8, 4.0, _MASK), {}, "out_features must be an int ≥ 0, got 4.0"),
    ((8, 4, _MASK), {"bias": "no"}, r"bias must be a bool \(True or False\), got 'no'"),
    ((8, 4, _MASK, 1), {}, r"bias must be a bool \(True or False\), got 1"),
    ((8, 4, _MASK), {"dtype": torch.int64}, "dtype must be a floating-point torch.dtype"),
    ((8, 4, _MASK), {"dtype": "float32"}, "dtype must be a floating-point torch.dtype"),
])
def test_sparse_linear_refuses_arguments_of_the_wrong_type(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        SparseLinear(*args, **kwargs)


def test_sparse_linear_refuses_negative_sizes():
    with pytest.raises(ValueError, match="out_features must be an int ≥ 0, got -4"):
        SparseLinear(8, -4, _MASK)


def test_set_structure_refuses_an_optimizer_that_is_no_optimizer():
    layer = SparseLinear(8, 4, _MASK)
    before = snapshot(layer)
    smaller = _MASK.clone()
    smaller[0] = False
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer .*got int"):
        layer.set_structure(smaller, 5)  # type: ignore[arg-type]
    assert unchanged(layer, before)
    assert layer.nnz == 32


def test_a_mask_that_keeps_everything_saves_and_loads_under_any_pattern(tmp_path):
    """MaskSet accepts it (nothing pruned yet); load refused the file save wrote from it."""
    model = nn.Sequential(nn.Linear(8, 16))
    masks = sparsekit.MaskSet(model, {"0.weight": torch.ones(16, 8, dtype=torch.bool)},
                              pattern="2:4")
    path = sparsekit.save(model, tmp_path / "dense.safetensors", masks)
    assert sparsekit.load(model, path).pattern == "2:4"


# -- a state missing masks; non-finite gradients at masked positions -------------------------

def test_maskset_load_state_dict_refuses_a_state_missing_a_mask():
    """A state without ``2.weight``'s mask loaded, leaving that weight unmasked: after five
    momentum steps 61 of its 64 pruned entries were nonzero. An empty MaskSet still takes
    any state (resuming)."""
    model = _model()
    ms = sparsekit.prune(model, 0.5)
    state = ms.state_dict()
    del state["masks"]["2.weight"]
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"got none for \['2.weight'\]"):
        ms.load_state_dict(state)
    assert unchanged(model, before) and sorted(ms.masks) == ["0.weight", "2.weight"]
    fresh = MaskSet(_model(), {})
    fresh.load_state_dict(ms.state_dict())
    assert sorted(fresh.masks) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw_fused"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_at_a_masked_position_leaves_it_plus_zero(optimizer, bad):
    """Masks were kept by multiplying by 0/1, and NaN * 0 is NaN: one infinite gradient at a
    masked position made that weight NaN after the step, and the next step spread it to 928
    of the layer's 1024 entries (and to Adam's moments). Masked positions are now ANDed to
    +0.0 whatever they held; kept ones are left bit for bit."""
    model = _model()
    ms = sparsekit.prune(model, 0.5)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
            "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)}[optimizer]
    opt = make(model.parameters())
    ms.attach(opt)
    x, y = _data()
    masked = (~ms.masks["2.weight"]).nonzero()[0].tolist()
    for step in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            model[2].weight.grad[tuple(masked)] = bad
        opt.step()
        for name, p in model.named_parameters():
            if name in ms.masks:
                pruned = p.detach()[~ms.masks[name]]
                assert torch.equal(pruned.view(torch.int32), torch.zeros_like(pruned,
                                                                             dtype=torch.int32))
            assert torch.isfinite(p).all(), name
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))
