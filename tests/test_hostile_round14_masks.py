"""Hostile inputs, round 14: masks, schedules and their resume states, registry names.

A resume state loaded before the optimizer was refused, a plain ``TypeError`` for a name
that is no string, masks without values or of a sparse layout, steps of a schedule whose
masks were removed. Each must raise an error naming what is wrong before the model, the
masks, the optimizer or the schedule change.
"""

import copy

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner, IterativePruning, MaskSet
from sparsekit._checks import ArgumentTypeError
from sparsekit.allocation import ALLOCATIONS
from sparsekit.integrations import attach
from sparsekit.prune import compute_masks


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, schedule=None,
          steps: int = 1) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(3, 8, generator=g)).sum().backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()


def masks_of(masks) -> dict[str, torch.Tensor]:
    return {n: m.clone() for n, m in masks.masks.items()}


def same_masks(masks, before: dict[str, torch.Tensor]) -> bool:
    return masks.masks.keys() == before.keys() and all(
        torch.equal(masks.masks[n], m) for n, m in before.items())


def same_optimizer(optimizer: torch.optim.Optimizer, before: dict) -> bool:
    after = optimizer.state_dict()
    if after["param_groups"] != before["param_groups"]:
        return False
    if after["state"].keys() != before["state"].keys():
        return False
    return all(
        torch.equal(v, before["state"][i][k]) if isinstance(v, torch.Tensor)
        else v == before["state"][i][k]
        for i, s in after["state"].items() for k, v in s.items())


def hooks(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    return len(optimizer._optimizer_step_pre_hooks), len(optimizer._optimizer_step_post_hooks)


# -- 1. a resume state is loaded only once attaching cannot refuse the optimizer ----------

def _maskset(model, optimizer):
    return sparsekit.prune(model, 0.5)


def _gradual(model, optimizer):
    return GradualPruner(model, 0.8, start_step=0, end_step=10, every=2)


def _iterative(model, optimizer):
    return IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=0)


def _advance(kind: str, sparsity) -> None:
    """Move ``sparsity`` on so that its state differs from a fresh one's."""
    if kind == "maskset":
        sparsity.update({n: torch.rand(m.shape, generator=torch.Generator().manual_seed(3))
                         < 0.2 for n, m in sparsity.masks.items()})
    elif kind == "gradual":
        for _ in range(5):
            sparsity.step()
    else:
        sparsity.next_round()


BUILDERS = {"maskset": _maskset, "gradual": _gradual, "iterative": _iterative}


@pytest.mark.parametrize("kind", BUILDERS)
def test_a_state_is_not_loaded_when_the_optimizer_is_refused(kind):
    """attach(sparsity, model, optimizer, state=...) loaded the state (new masks applied to
    the weights, the schedule's step moved on) and only then did the masks refuse an
    optimizer that holds none of their weights."""
    build = BUILDERS[kind]
    donor = build(mlp(1), None)
    _advance(kind, donor)
    state = copy.deepcopy(donor.state_dict())

    model = mlp()
    sparsity = build(model, None)
    other = mlp(2)
    optimizer = torch.optim.Adam(other.parameters(), lr=0.1)
    train(other, optimizer)  # an optimizer with state
    before, masks = snapshot(model), masks_of(getattr(sparsity, "masks", sparsity)
                                              if kind != "maskset" else sparsity)
    opt_before, other_before = copy.deepcopy(optimizer.state_dict()), snapshot(other)
    step = getattr(sparsity, "step_count", None)
    with pytest.raises(ValueError, match="optimizer holds none of the masked parameters"):
        attach(sparsity, model, optimizer, state=state)
    assert unchanged(model, before) and unchanged(other, other_before)
    assert same_masks(sparsity if kind == "maskset" else sparsity.masks, masks)
    assert same_optimizer(optimizer, opt_before) and hooks(optimizer) == (0, 0)
    assert getattr(sparsity, "step_count", None) == step


def test_a_dynamic_sparsity_state_is_not_loaded_when_its_weights_were_replaced():
    """A DynamicSparsity whose weights a load_state_dict(assign=True) replaced cannot be
    attached to its optimizer (which holds the old ones): the state given with it was
    loaded first."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="set", every=2, end_step=20)
    train(model, optimizer, ds, 4)
    state = copy.deepcopy(ds.state_dict())
    train(model, optimizer, ds, 3)
    ds.detach()
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    before, masks, opt_before = snapshot(model), masks_of(ds.masks), copy.deepcopy(
        optimizer.state_dict())
    momenta, rng = copy.deepcopy(ds._momenta), ds.generator.get_state()
    with pytest.raises(ValueError, match="optimizer holds none of the masked parameters"):
        attach(ds, model, optimizer, state=state)
    assert unchanged(model, before) and same_masks(ds.masks, masks)
    assert same_optimizer(optimizer, opt_before) and hooks(optimizer) == (0, 0)
    assert ds.step_count == 7 and torch.equal(ds.generator.get_state(), rng)
    assert all(torch.equal(m, ds._momenta[n]) for n, m in momenta.items())


def test_dynamic_sparsity_attach_refuses_before_hooking_the_optimizer():
    """DynamicSparsity.attach registered its gradient hook, then its masks refused the
    optimizer (its weights replaced since): the hook stayed on."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="rigl", every=2, end_step=20)
    ds.detach()
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    with pytest.raises(ValueError, match="optimizer holds none of the masked parameters"):
        ds.attach(optimizer)
    assert hooks(optimizer) == (0, 0) and ds._hook is None


def test_masks_of_frozen_weights_are_told_they_need_no_optimizer():
    """A MaskSet of a LoRA base (frozen weights) attached to the optimizer of its adapters
    was told to rebuild the optimizer from model.parameters(), which would train the base."""
    model = mlp()
    masks = sparsekit.prune(model, 0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    head = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"holds none of the masked parameters .*they are "
                                         r"frozen \(requires_grad=False"):
        masks.attach(optimizer)
    assert hooks(optimizer) == (0, 0)


@pytest.mark.parametrize("kind", BUILDERS)
def test_a_state_for_removed_masks_is_refused_as_removed(kind):
    """Loading into a schedule whose masks were removed said the names differ ("this
    schedule masks []"); a removed MaskSet attached with a state said so only from its
    load_state_dict. Both now name remove(), before anything changes."""
    build = BUILDERS[kind]
    model = mlp()
    sparsity = build(model, None)
    state = copy.deepcopy(sparsity.state_dict())
    (sparsity if kind == "maskset" else sparsity.masks).remove()
    before = snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=r"remove\(\)"):
        attach(sparsity, model, optimizer, state=state)
    with pytest.raises(RuntimeError, match=r"removed by remove\(\)"):
        sparsity.load_state_dict(state)
    assert unchanged(model, before) and hooks(optimizer) == (0, 0)


def test_check_attach_changes_nothing_and_returns_the_real_optimizer():
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    train(model, optimizer)
    before, opt_before = snapshot(model), copy.deepcopy(optimizer.state_dict())
    assert ms.check_attach(optimizer) is optimizer
    assert unchanged(model, before) and same_optimizer(optimizer, opt_before)
    assert hooks(optimizer) == (0, 0)
    with pytest.raises(ValueError, match="optimizer holds none"):
        ms.check_attach(torch.optim.SGD(mlp(1).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        ms.check_attach("adam")


# -- 2. a registry name that is no string ---------------------------------------------------

BAD_NAMES = [None, 3, 1.5, ["uniform"], {"uniform": 1}, ("erk",)]


@pytest.mark.parametrize("value", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("param, call", [
    ("allocation", lambda v: sparsekit.prune(mlp(), 0.5, allocation=v)),
    ("allocation", lambda v: compute_masks(mlp(), 0.5, allocation=v)),
    ("method", lambda v: sparsekit.prune(mlp(), 0.5, method=v)),
    ("method", lambda v: DynamicSparsity(*(lambda m: (m, torch.optim.SGD(m.parameters(),
                                                                          lr=0.1)))(mlp()),
                                         0.5, method=v, end_step=10)),
    ("allocation", lambda v: DynamicSparsity(*(lambda m: (m, torch.optim.SGD(
        m.parameters(), lr=0.1)))(mlp()), 0.5, allocation=v, end_step=10)),
    ("allocation", lambda v: GradualPruner(mlp(), 0.5, start_step=0, end_step=4, every=1,
                                           allocation=v)),
    ("allocation", lambda v: IterativePruning(mlp(), rounds=2, sparsity=0.5, rewind_step=0,
                                              allocation=v)),
])
def test_a_name_that_is_no_string_names_the_parameter_value_and_accepted(param, call, value):
    """allocation=None (or an int, a list) was a plain TypeError "allocation must be a
    string, got NoneType": neither the value nor what is accepted."""
    with pytest.raises(ArgumentTypeError, match=rf"^{param} must be a string, one of: ") as e:
        call(value)
    message = str(e.value)
    assert repr(value)[:20] in message
    if param == "allocation":
        assert "erk, global, lamp" in message


@pytest.mark.parametrize("value", BAD_NAMES, ids=repr)
def test_registry_lookups_refuse_values_that_are_no_string(value):
    for lookup in (ALLOCATIONS.get, ALLOCATIONS.meta):
        with pytest.raises(ArgumentTypeError, match="allocation must be a string, one of: er"):
            lookup(value)
    assert value not in ALLOCATIONS  # unhashable values too: no TypeError


@pytest.mark.parametrize("value", [["uniform"], {"a": 1}, None])
def test_llm_allocation_check_names_an_unhashable_value(value):
    """``allocation not in ALLOCATIONS`` raised "unhashable type: 'list'"."""
    from sparsekit.llm.prune import check_options

    with pytest.raises(ValueError, match=r"unknown allocation .*; accepted: "):
        check_options(0.5, "unstructured", value)


# -- 3. masks without values, or of a sparse layout ----------------------------------------

BAD_LAYOUT = [
    (lambda: torch.ones(4, 16, dtype=torch.bool, device="meta"), ValueError, "meta device"),
    (lambda: torch.ones(4, 16, dtype=torch.bool).to_sparse(), ArgumentTypeError,
     "dense .strided. bool tensor, got layout torch.sparse_coo"),
]


@pytest.mark.parametrize("make, error, match", BAD_LAYOUT, ids=["meta", "sparse"])
def test_masks_without_values_or_of_a_sparse_layout_are_refused_before_any_change(
        make, error, match):
    """update() with one good and one meta (or sparse) mask applied the good one, then
    failed in torch ("Cannot copy out of meta tensor", "Could not run
    'aten::bitwise_and'"); load_state_dict of a sparse one replaced the masks first."""
    good = torch.rand(16, 8, generator=torch.Generator().manual_seed(1)) < 0.3
    with pytest.raises(error, match=rf"mask for '2.weight' .*{match}"):
        MaskSet(mlp(), {"0.weight": good, "2.weight": make()})
    for call in ("update", "load_state_dict"):
        model = mlp()
        ms = sparsekit.prune(model, 0.5)
        before, masks = snapshot(model), masks_of(ms)
        given = {"0.weight": good, "2.weight": make()}
        with pytest.raises(error, match=rf"mask for '2.weight' .*{match}"):
            getattr(ms, call)(given if call == "update" else {"masks": given})
        assert unchanged(model, before) and same_masks(ms, masks)


def test_load_state_dict_copies_the_masks_it_loads():
    """Loaded bool masks were the state's own tensors: writing to the state afterwards
    changed the masks without touching the weights."""
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    state = ms.state_dict()
    ms.load_state_dict(state)
    before = masks_of(ms)
    for m in state["masks"].values():
        m.fill_(True)
    assert same_masks(ms, before)


def test_update_names_the_masks_it_holds_for_a_name_it_does_not_mask():
    """update({'0.bias': ...}) said "'0.bias' is not a parameter of the model": it is."""
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'0.bias' that this MaskSet does not mask; it "
                                         r"masks: 0.weight, 2.weight"):
        ms.update({"0.bias": torch.ones(16, dtype=torch.bool)})
    assert unchanged(model, before)


@pytest.mark.parametrize("pattern, error", [(None, ArgumentTypeError), (3, ArgumentTypeError),
                                            ("nope", ValueError)])
def test_a_bad_pattern_in_a_state_is_named_as_the_state_s(pattern, error):
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    state = {**ms.state_dict(), "pattern": pattern}
    before, masks = snapshot(model), masks_of(ms)
    with pytest.raises(error, match=r"^state\['pattern'\]: .*pattern"):
        ms.load_state_dict(state)
    assert unchanged(model, before) and same_masks(ms, masks)


# -- 4. schedules whose masks were removed, or whose weights changed shape -----------------

def test_gradual_step_after_its_masks_were_removed_counts_no_step():
    """GradualPruner.step() counted the step, then failed with KeyError '0.weight'."""
    model = mlp()
    gp = GradualPruner(model, 0.8, start_step=0, end_step=10, every=2)
    gp.masks.remove()
    before = snapshot(model)
    gp.step()  # step 1 prunes nothing
    with pytest.raises(RuntimeError, match=r"GradualPruner.step\(\): its masks were removed"):
        gp.step()
    assert gp.step_count == 1 and unchanged(model, before)


def test_gradual_step_that_cannot_prune_counts_no_step():
    model = mlp()
    gp = GradualPruner(model, 0.8, start_step=0, end_step=10, every=2)
    model[0].weight = nn.Parameter(torch.randn(16, 9))  # another shape
    with pytest.raises(ValueError, match="'0.weight' was replaced by one of shape"):
        gp.step()
        gp.step()
    assert gp.step_count == 1


def test_dynamic_sparsity_step_after_remove_counts_no_step():
    """A removed DynamicSparsity's step() counted the step, then MaskSet.update raised."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="set", every=1, end_step=10)
    ds.remove()
    with pytest.raises(RuntimeError, match=r"DynamicSparsity.step\(\): it was removed"):
        ds.step()
    assert ds.step_count == 0


def test_dynamic_sparsity_step_whose_masks_refuse_the_update_counts_no_step():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="set", every=2, end_step=10)
    ds.step()
    ds.masks.remove()
    with pytest.raises(RuntimeError, match=r"MaskSet.update\(\): the masks were removed"):
        ds.step()
    assert ds.step_count == 1


def test_iterative_next_round_that_cannot_update_neither_rewinds_nor_records():
    """next_round() recorded the round and rewound the weights, then the removed masks
    refused the update."""
    model = mlp()
    ip = IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=0)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # "training": the rewind would undo it
    ip.masks.remove()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"IterativePruning.next_round\(\): its masks"):
        ip.next_round()
    assert unchanged(model, before) and ip.history == [] and ip.round == 0


def test_iterative_next_round_refuses_metrics_that_are_no_dict_before_any_change():
    model = mlp()
    ip = IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before, masks = snapshot(model), masks_of(ip.masks)
    with pytest.raises(ArgumentTypeError, match="metrics must be a dict .* got list"):
        ip.next_round([1, 2])
    assert unchanged(model, before) and same_masks(ip.masks, masks) and ip.history == []


# -- 5. resume exactly ----------------------------------------------------------------------

def test_dynamic_sparsity_momenta_load_in_the_dtype_they_had():
    """Momenta saved in float64 (a state cast on the way) stayed float64: SNFS then
    accumulated in another precision than an uninterrupted run."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method="snfs", every=5, end_step=50)
    train(model, optimizer, ds, 3)
    state = ds.state_dict()
    state["momenta"] = {n: m.double() for n, m in state["momenta"].items()}
    ds.load_state_dict(state)
    for n, m in ds._momenta.items():
        assert m.dtype == torch.float32
        assert torch.equal(m, state["momenta"][n].float())
        assert m.data_ptr() != state["momenta"][n].data_ptr()


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "granet", "srigl"])
def test_dynamic_sparsity_resumes_through_attach_exactly(method):
    """A run resumed through integrations.attach(..., state=) takes the same updates as
    one that never stopped."""
    def build(model, opt):
        return DynamicSparsity(model, opt, 0.8, method=method, every=3, end_step=30, seed=5)

    def run(stop: int | None):
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        attached = attach(build, model, opt)
        g = torch.Generator().manual_seed(11)
        for t in range(20):
            if t == stop:
                saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                       "sparsity": attached.schedule.state_dict()})
                attached.remove()
                model = mlp(seed=99)
                opt = torch.optim.Adam(model.parameters(), lr=1e-2)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
                attached = attach(build, model, opt, state=saved["sparsity"])
            opt.zero_grad()
            model(torch.randn(3, 8, generator=g)).sum().backward()
            opt.step()
        return model, attached.schedule

    a, sa = run(None)
    b, sb = run(10)
    assert sa.step_count == sb.step_count == 20
    for n, m in sa.masks.masks.items():
        assert torch.equal(m, sb.masks.masks[n]), n
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


def test_detach_attach_cycles_leave_no_hooks_and_keep_masked_weights_zero():
    model = mlp()
    ms = sparsekit.prune(model, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        assert ms.attach(optimizer) is ms and ms.attach(optimizer) is ms
        assert hooks(optimizer) == (1, 1)
        train(model, optimizer)
        for n, p in ms.params.items():
            assert (p[~ms.masks[n]] == 0).all()
        ms.detach(optimizer)
        ms.detach()
        assert hooks(optimizer) == (0, 0)


def test_iterative_next_round_refuses_a_weight_of_another_shape_before_rewinding():
    model = mlp()
    ip = IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=0)
    model[0].weight = nn.Parameter(torch.randn(16, 9))
    before = snapshot(model)
    with pytest.raises(ValueError, match="'0.weight' was replaced by one of shape"):
        ip.next_round()
    assert unchanged(model, before) and ip.history == [] and ip.round == 0


def test_a_refused_state_puts_back_the_weights_a_built_schedule_zeroed():
    """A DynamicSparsity built by the function zeroes the weights its starting masks mask;
    when the state given to resume it is then refused, the checkpoint's weights (those
    the state names) are back as they were."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    train(model, opt)
    donor = mlp(1)
    state = DynamicSparsity(donor, torch.optim.SGD(donor.parameters(), lr=0.1), 0.5,
                            every=2, end_step=20).state_dict()
    state["step"] = -1  # refused by load_state_dict, after the function built the schedule
    before, opt_before = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"state\['step'\]"):
        attach(lambda m, o: DynamicSparsity(m, o, 0.9, every=2, end_step=20), model, opt,
               state=state)
    assert unchanged(model, before) and same_optimizer(opt, opt_before)
    assert hooks(opt) == (0, 0)


@pytest.mark.parametrize("on", [1, None, "yes"])
def test_maskset_capture_takes_a_bool_as_structure_set_does(on):
    ms = sparsekit.prune(mlp(), 0.5)
    with pytest.raises(ArgumentTypeError, match="on must be a bool"):
        ms.capture(on)
    ms.capture(True)
    ms.capture(False)


def test_a_maskset_a_function_builds_resumes_with_the_checkpoint_s_weights():
    """A function that prunes (and so zeroes weights) given a state to resume: the
    weights the state's masks keep are the checkpoint's, not the function's zeros."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    saved_masks = sparsekit.prune(mlp(), 0.3)  # keeps more than the function's 0.9
    state = saved_masks.state_dict()
    before = snapshot(model)
    attached = attach(lambda m, o: sparsekit.prune(m, 0.9), model, opt, state=state)
    assert same_masks(attached.masks, state["masks"])
    for n, p in attached.masks.params.items():
        m = state["masks"][n]
        assert torch.equal(p[m], before[n][m]) and (p[~m] == 0).all()
