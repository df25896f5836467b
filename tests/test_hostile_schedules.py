"""Hostile cases for the schedules: calls past their end, contradictory arguments,
optimizers that hold none of the model's weights and damaged state dicts. Each must
raise (or do nothing) before the model, the masks or the optimizer change."""

import copy

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner, IterativePruning
from sparsekit.patterns import parse_pattern


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_next_round_after_the_last_round_changes_nothing():
    model = mlp()
    imp = IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=0)
    assert [imp.next_round(), imp.next_round()] == [True, False]
    masks = {n: m.clone() for n, m in imp.masks.masks.items()}
    before = snapshot(model)
    with torch.no_grad():
        model[0].weight.mul_(2)  # trained after the last round: must not be rewound
    trained = snapshot(model)
    assert not unchanged(model, before)
    assert [imp.next_round(), imp.next_round()] == [False, False]
    assert unchanged(model, trained)
    assert all(torch.equal(m, imp.masks.masks[n]) for n, m in masks.items())
    assert imp.round == 2 and len(imp.history) == 2
    assert imp.masks.sparsity() == pytest.approx(0.75, abs=1e-2)


def test_granet_refuses_an_initial_sparsity_above_the_final_one():
    model = mlp()
    opt = sgd(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"initial_sparsity must be in \[0, sparsity\] = "
                                         r"\[0, 0.3\], got 0.9"):
        DynamicSparsity(model, opt, 0.3, method="granet", initial_sparsity=0.9, end_step=10)
    assert unchanged(model, before)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    # The other methods never start at initial_sparsity: its default (0.5) is no bound there.
    DynamicSparsity(model, opt, 0.3, method="rigl", end_step=10)


def test_dynamic_sparsity_refuses_an_optimizer_of_other_weights_before_hooking_it():
    model = mlp()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"optimizer holds none of the weights .*0\.weight"):
        DynamicSparsity(model, opt, 0.5, end_step=10)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert unchanged(model, before)


# -- load_state_dict: the whole state is checked before any of it is applied ---------------


def _gradual(model, opt):
    return GradualPruner(model, 0.5, start_step=0, end_step=4, every=1, optimizer=opt)


def _iterative(model, opt):
    return IterativePruning(model, rounds=2, sparsity=0.75, rewind_step=0, optimizer=opt)


def _dynamic(model, opt):
    return DynamicSparsity(model, opt, 0.5, method="set", every=1, end_step=50)


SCHEDULES = {"gradual": _gradual, "iterative": _iterative, "dynamic": _dynamic}


def _bad_states(state: dict) -> dict[str, tuple[dict, str]]:
    """Damaged copies of ``state``, each with the key its error must name."""
    masks = state["masks"]["masks"]
    name = next(iter(masks))
    bad = {
        "missing step": ({k: v for k, v in state.items() if k != "step"}, "'step'"),
        "step not an int": (state | {"step": "x"}, r"state\['step'\]"),
        "negative step": (state | {"step": -7}, r"state\['step'\]"),
        "masks not a dict": (state | {"masks": 3}, r"state\['masks'\]"),
        "a mask missing": (state | {"masks": {"masks": {name: masks[name]}}}, r"state\['masks'\]"),
        "mask of the wrong shape": (
            state | {"masks": {"masks": masks | {name: masks[name][:1]}}}, name),
        "mask not bool": (state | {"masks": {"masks": masks | {name: masks[name].float()}}}, name),
    }
    if "generator" in state:
        bad["generator not a state"] = (state | {"generator": "x"}, r"state\['generator'\]")
        bad["momenta of the wrong shape"] = (
            state | {"momenta": state["momenta"] | {name: torch.zeros(2)}}, r"state\['momenta'\]")
        bad["momenta missing"] = (state | {"momenta": {}}, r"state\['momenta'\]")
    if "round" in state:
        bad["round past rounds"] = (state | {"round": 3}, r"state\['round'\]")
        bad["round not an int"] = (state | {"round": 1.5}, r"state\['round'\]")
        bad["history of another length"] = (state | {"history": []}, r"state\['history'\]")
        bad["rewind state of another model"] = (
            state | {"rewind_state": {"w": torch.zeros(1)}}, r"state\['rewind_state'\]")
    return bad


@pytest.mark.parametrize("name", SCHEDULES)
def test_load_state_dict_refuses_a_damaged_state_before_changing_anything(name):
    model = mlp()
    opt = sgd(model)
    schedule = SCHEDULES[name](model, opt)
    if name == "iterative":
        schedule.next_round()
    saved = copy.deepcopy(schedule.state_dict())
    fresh = mlp()
    target = SCHEDULES[name](fresh, sgd(fresh))
    for case, (state, key) in _bad_states(saved).items():
        before, kept = snapshot(fresh), copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=key):
            target.load_state_dict(state)
        assert unchanged(fresh, before), case
        after = target.state_dict()
        assert after["step"] == kept["step"], case
        for n, m in kept["masks"]["masks"].items():
            assert torch.equal(m, after["masks"]["masks"][n]), case
        if "generator" in kept:
            assert torch.equal(kept["generator"], after["generator"]), case
    target.load_state_dict(saved)  # the undamaged state still loads
    assert target.state_dict()["step"] == saved["step"]


@pytest.mark.parametrize("start_step", [0, 2])
def test_gradual_nm_on_a_model_pruned_before_declares_its_pattern_at_the_first_prune(
        start_step, tmp_path):
    """The weights' own zeros (an unstructured model) need not be 2:4: MaskSet's pattern
    check refused GradualPruner(pattern="2:4") on such a model at construction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    sparsekit.prune(model, 0.3).apply()
    pruner = sparsekit.GradualPruner(model, 0.5, pattern="2:4", start_step=start_step,
                                     end_step=4, every=1)
    assert pruner.masks.pattern == ("2:4" if start_step == 0 else "unstructured")
    path = sparsekit.save(model, tmp_path / "before.safetensors", pruner.masks)
    sparsekit.load(model, path)  # what save writes, load reads
    for _ in range(4):
        pruner.step()
    assert pruner.masks.pattern == "2:4"
    assert all(parse_pattern("2:4").is_valid(m) for m in pruner.masks.masks.values())
    sparsekit.load(model, sparsekit.save(model, tmp_path / "after.safetensors", pruner.masks))


class _WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.unused = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("method", ["rigl", "srigl", "granet"])
def test_a_gradient_grower_names_a_masked_layer_without_a_gradient(method):
    """A masked layer the loss never reaches has no gradient at an update: RigL told the user
    to "call step() after every optimizer.step()", which they did, and training could not
    pass the update. It names the layer, and the update changes nothing."""
    model = _WithUnusedLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ds = DynamicSparsity(model, opt, 0.7, method=method, every=2, end_step=10)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if ds.step_count == 1:
            masks = {k: v.clone() for k, v in ds.masks.masks.items()}
            with pytest.raises(ValueError, match=r"'unused.weight' had none at this update "
                                                 r"\(step 2\).*exclude="):
                ds.step()
            assert ds.step_count == 1
            assert all(torch.equal(masks[k], v) for k, v in ds.masks.masks.items())
        else:
            ds.step()
