"""Hostile inputs, round 17: training-time sparsity (schedules, integrations, regularisers,
fine-tuning, the plain training loop).

- ``accuracy`` of a model that cannot run on the inputs (another width) or whose outputs
  are no ``(examples, classes)`` logits was PyTorch's bare ``RuntimeError`` or
  ``IndexError``; both are a ``ValueError`` naming ``data``;
- ``IterativePruning.load_state_dict`` took a state without rewind weights past its
  ``rewind_step`` (or one with them before it): the next round failed, after a whole round
  of training, with "rewind_step was never reached" (or rewound to another step's weights);
- ``IterativePruning(rate_per_round=…, rounds=…)`` whose final sparsity rounds to 1.0 was
  taken, and its last round failed after all the others had trained;
- ``DynamicSparsity`` with an optimizer that holds only some of the targets dropped real
  weights of the others and grew zeros that no step trains, by gradients that summed over
  every step (the optimizer never zeroed them); those weights are no targets, as frozen
  ones are not;
- ``integrations.attach`` of a function-built schedule with a state refused for its form
  (no masks, masks of unknown names) left the model pruned by the schedule the function
  built, and the optimizer's momenta zeroed: every weight is put back;
- ``GroupLasso``/``GroupEnvelope``/``SoftThreshold`` on a model whose layers were replaced
  (another width) since they were built gave a raw ``RuntimeError`` of ``reshape`` (or
  norms of the wrong entries), ``SoftThreshold.step`` after the optimizer had stepped;
- ``sparse_lora`` with a ``MaskSet`` that ``remove()`` emptied wrapped the model in LoRA
  layers, then failed in ``masks.apply()``, leaving it wrapped;
- ``sparse_lora`` refused a ``MaskSet`` whose parameters ``load_state_dict(assign=True)``
  replaced (which the masks follow) as "made for another model";
- ``GradualPruner`` with one-shot ``data`` (a generator) used it up in its constructor's
  dry run, and its first prune failed, after training began, saying data "holds no batches";
- ``Delta`` of values on the meta device, and ``Delta.apply`` onto a model on the meta
  device, failed inside PyTorch (``Tensor.item() cannot be called on meta tensors``);
- ``SparsityCallback`` refused, as "no state saved by SparsityCallback", the state file of
  a checkpoint saved on a GPU when resuming on a machine without one (``torch.load`` without
  ``map_location``), where the ``Trainer`` resumes the rest of the checkpoint;
- a schedule state holding tensors on the meta device (read with ``map_location="meta"``):
  ``DynamicSparsity.load_state_dict`` loaded the masks and the step, then failed copying
  the momenta with a raw ``NotImplementedError``; ``IterativePruning`` took the rewind
  state and failed at the next round;
- ``minibatches(shuffle="False")`` (or ``0``, ``None``) took any value by its truth: a
  string shuffled; it must be a bool, as ``MaskSet.capture``'s and ``sparse_lora``'s flags are;
- a NumPy int ``seed`` passes ``check_seed`` but ``torch.Generator.manual_seed`` takes Python
  ints only: ``DynamicSparsity(seed=np.int64(7))`` and ``minibatches``/``train_epoch`` (at
  the first batch, after ``train_epoch`` had put the model in training mode) failed with a
  raw ``TypeError: an integer is required``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn
from torch.utils.data import TensorDataset

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner, IterativePruning
from sparsekit._checks import ArgumentTypeError
from sparsekit.integrations import attach
from sparsekit.regularize import GroupEnvelope, GroupLasso, SoftThreshold
from sparsekit.structured import dependency_groups
from sparsekit.training import accuracy


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, steps: int) -> None:
    for i in range(steps):
        optimizer.zero_grad()
        model(torch.randn(3, 8, generator=torch.Generator().manual_seed(i))).sum().backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()


@pytest.mark.parametrize("model, x, match", [
    (nn.Linear(3, 2), torch.randn(4, 5), r"data: the model cannot score its examples: mat1"),
    (nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)), torch.randn(4, 3),
     r"data: the model's outputs must be logits of shape \(examples, classes\) = \(4, "
     r"classes\), got \(4,\)"),
])
def test_accuracy_names_data_a_model_cannot_score(model, x, match):
    before = snapshot(model)
    model.train()
    with pytest.raises(ValueError, match=match):
        accuracy(model, TensorDataset(x, torch.zeros(4, dtype=torch.long)))
    assert unchanged(model, before) and model.training  # mode restored too


@pytest.mark.parametrize("change", ["no rewind past it", "no rewind in a later round",
                                    "a rewind before it"])
def test_iterative_refuses_a_state_whose_rewind_state_does_not_fit_its_step(change):
    model = mlp()
    imp = IterativePruning(model, rounds=3, sparsity=0.5, rewind_step=2)
    imp.step()
    state = copy.deepcopy(imp.state_dict())  # round 0, step 1: no rewind state yet
    if change == "no rewind past it":
        state["step"] = 5
    elif change == "no rewind in a later round":
        state["round"], state["history"] = 1, [{}]
    else:
        state["rewind_state"] = copy.deepcopy(model.state_dict())
    before, masks = snapshot(model), copy.deepcopy(imp.masks.masks)
    with pytest.raises(ValueError, match=r"state\['rewind_state'\] is (None|set) at round"):
        imp.load_state_dict(state)
    assert unchanged(model, before) and (imp.round, imp.step_count) == (0, 1)
    assert imp._rewind_state is None
    assert all(torch.equal(m, imp.masks.masks[n]) for n, m in masks.items())
    imp.load_state_dict(imp.state_dict())  # a genuine state still loads
    for _ in range(2):
        imp.step()
    assert imp.next_round()


def test_iterative_refuses_a_rate_per_round_whose_sparsity_rounds_to_one():
    model = mlp()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=r"rate_per_round=0.9 over rounds=20 reaches a "
                                             r"final sparsity of 1.0"):
            IterativePruning(model, rounds=20, rate_per_round=0.9, rewind_step=0)
        imp = IterativePruning(model, rounds=3, rate_per_round=0.5, rewind_step=0)
    assert unchanged(model, before)
    assert imp.sparsity == pytest.approx(0.875)


@pytest.mark.parametrize("method", ["set", "rigl", "snfs", "granet", "srigl"])
def test_dynamic_sparsity_leaves_weights_the_optimizer_does_not_hold_alone(method):
    model = mlp()
    first = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    ds = DynamicSparsity(model, optimizer, 0.5, method=method, every=2, end_step=100,
                         initial_sparsity=0.3)
    assert list(ds.masks.masks) == ["2.weight"]
    train(model, optimizer, ds, 4)
    assert torch.equal(model[0].weight, first)  # none of it dropped
    # an optimizer holding none of the trainable targets is still refused by name
    with pytest.raises(ValueError, match=r"optimizer holds none of the weights .*0\.weight"):
        DynamicSparsity(mlp(), torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1), 0.5,
                        end_step=10)


@pytest.mark.parametrize("state", [
    {"step": 0},
    {"step": 0, "masks": {"pattern": "unstructured"}},
    {"step": 0, "masks": {"masks": {"nope": torch.ones(2, dtype=torch.bool)}}},
    "not a state",
])
def test_attach_puts_back_every_weight_when_a_state_is_refused_for_its_form(state):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, None, 1)  # momentum buffers to keep
    before = snapshot(model)
    momenta = {p: optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    with pytest.raises(ValueError, match=r"state is no state of this DynamicSparsity"):
        attach(lambda m, o: DynamicSparsity(m, o, 0.5, end_step=10), model, optimizer,
               state=state)
    assert unchanged(model, before)
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in momenta.items())
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def _narrower(model: nn.Module) -> None:
    model[0], model[2] = nn.Linear(4, 6), nn.Linear(6, 3)


@pytest.mark.parametrize("build", [
    lambda m: GroupLasso(m, 0.1),
    lambda m: GroupEnvelope(m, 0.1, 0.5),
    lambda m: SoftThreshold(torch.optim.SGD(m.parameters(), lr=0.1), 0.1, model=m,
                            groups=dependency_groups(m)).step,
])
def test_regularisers_refuse_a_model_whose_layers_were_replaced(build):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    call = build(model)
    model(torch.randn(2, 4)).sum().backward()  # gradients the optimizer would step by
    old = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    _narrower(model)
    with pytest.raises(ValueError, match=r"groups\[0\] .*does not fit model.*the model "
                                         r"changed since the regulariser was built"):
        call()
    assert all(torch.equal(p, o) for p, o in zip(params, old, strict=True))


def _pruned() -> tuple[nn.Module, sparsekit.MaskSet]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    return model, sparsekit.prune(model, 0.5)


def _lora_config():
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False)


def test_sparse_lora_refuses_removed_masks_before_wrapping_the_model():
    from sparsekit.finetune import sparse_lora

    model, masks = _pruned()
    masks.remove()
    before, modules = snapshot(model), dict(model.named_modules())
    with pytest.raises(ValueError, match=r"masks were removed by remove\(\)"):
        sparse_lora(model, _lora_config(), masks)
    assert unchanged(model, before) and dict(model.named_modules()) == modules


def test_sparse_lora_takes_masks_that_follow_replaced_parameters():
    from sparsekit.finetune import merge_lora, sparse_lora

    model, masks = _pruned()
    kept = {n: m.clone() for n, m in masks.masks.items()}
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    merged = merge_lora(sparse_lora(model, _lora_config(), masks))
    params = dict(merged.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in kept.items())


def test_gradual_refuses_one_shot_data_before_pruning():
    model = mlp()
    before = snapshot(model)
    batches = ((torch.randn(4, 8), torch.randint(0, 4, (4,))) for _ in range(3))
    with pytest.raises(ArgumentTypeError, match=r"data must be re-iterable .*got generator"):
        GradualPruner(model, 0.5, start_step=0, end_step=4, every=1, method="wanda",
                      data=batches)
    assert unchanged(model, before)
    gp = GradualPruner(model, 0.5, start_step=1, end_step=4, every=1, method="wanda",
                       data=[torch.randn(4, 8) for _ in range(3)])
    assert [gp.step() for _ in range(4)] == [True] * 4


@pytest.mark.parametrize("call", ["Delta", "apply"])
def test_delta_names_meta_tensors(call):
    from sparsekit.finetune import Delta

    mask = torch.zeros(16, 8, dtype=torch.bool)
    mask[0] = True
    if call == "Delta":
        with pytest.raises(ValueError, match=r"values\['0.weight'\] is on the meta device"):
            Delta({"0.weight": torch.zeros(16, 8, device="meta")}, {"0.weight": mask})
        return
    delta = Delta({"0.weight": torch.ones(16, 8) * mask}, {"0.weight": mask})
    model = mlp().to("meta")
    with pytest.raises(ValueError, match=r"model: parameter '0.weight' is on the meta device"):
        delta.apply(model)


def test_hf_reads_a_state_saved_on_a_gpu_onto_the_cpu(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import torch.serialization

    from sparsekit.integrations.hf import _read_state

    state = {"step": 1, "masks": {"masks": {"w": torch.ones(2, dtype=torch.bool)}}}
    path = tmp_path / "sparsekit_state.pt"
    with monkeypatch.context() as patch:  # written as a CUDA run writes it
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    loaded = _read_state(path)
    assert loaded["step"] == 1 and torch.equal(loaded["masks"]["masks"]["w"], torch.ones(2).bool())
    assert loaded["masks"]["masks"]["w"].device.type == "cpu"


@pytest.mark.parametrize("kind", ["dynamic", "iterative"])
def test_a_state_with_meta_tensors_is_refused_before_anything_changes(kind):
    model = mlp()
    if kind == "dynamic":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = DynamicSparsity(model, optimizer, 0.5, method="snfs", every=2, end_step=10)
        state = copy.deepcopy(schedule.state_dict())
        train(model, optimizer, schedule, 2)
        state["momenta"] = {n: t.to("meta") for n, t in state["momenta"].items()}
        key = "momenta"
    else:
        schedule = IterativePruning(model, rounds=2, sparsity=0.5, rewind_step=0)
        state = copy.deepcopy(schedule.state_dict())
        state["rewind_state"] = {n: t.to("meta") for n, t in state["rewind_state"].items()}
        key = "rewind_state"
    before, step = snapshot(model), schedule.step_count
    masks = copy.deepcopy(schedule.masks.masks)
    with pytest.raises(ValueError, match=rf"state\['{key}'\]\['0.weight'\] is on the meta "
                                         r"device"):
        schedule.load_state_dict(state)
    assert unchanged(model, before) and schedule.step_count == step
    assert all(torch.equal(m, schedule.masks.masks[n]) for n, m in masks.items())


@pytest.mark.parametrize("shuffle", ["False", 0, None])
def test_minibatches_refuses_a_shuffle_that_is_no_bool(shuffle):
    from sparsekit.training import minibatches

    data = TensorDataset(torch.arange(6.0)[:, None], torch.zeros(6, dtype=torch.long))
    with pytest.raises(ArgumentTypeError, match=r"shuffle must be a bool \(True or False\), got"):
        minibatches(data, 2, shuffle=shuffle)
    assert [x[:, 0].tolist() for x, _ in minibatches(data, 4, shuffle=False)] == [
        [0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]


def test_numpy_int_seeds_draw_what_python_ints_draw():
    np = pytest.importorskip("numpy")
    from sparsekit.training import minibatches

    masks = []
    for seed in (7, np.int64(7)):
        model = mlp()
        ds = DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5,
                             method="set", every=1, end_step=10, seed=seed)
        ds.step()
        masks.append(ds.masks.masks)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    data = TensorDataset(torch.arange(6.0)[:, None], torch.zeros(6, dtype=torch.long))
    orders = [[x[:, 0].tolist() for x, _ in minibatches(data, 2, shuffle=True, seed=s)]
              for s in (3, np.int64(3))]
    assert orders[0] == orders[1]


def test_attach_of_a_function_names_a_model_that_is_no_module():
    """A function builds on ``model``: ``None`` (fine for a MaskSet or a schedule, which
    ignore it) reached the function and failed inside it."""
    model = nn.Sequential(nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"model must be an nn.Module"):
        attach(lambda m, o: DynamicSparsity(m, o, 0.5, end_step=10), None, optimizer)
    assert not optimizer._optimizer_step_post_hooks
