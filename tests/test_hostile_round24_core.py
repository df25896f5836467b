"""Hostile inputs, round 24: core numerics, schedules, training, activation sparsity.

- ``quantize.scales_at`` of rows or columns past the grid was a raw ``IndexError``; a
  negative row (or a column past ``in_features`` of a per-row grid) read another weight's
  scale without a word; an ``in_features`` the groups do not divide (or of 0) a raw
  ``ZeroDivisionError`` or a silently wrong group; float indices a raw ``IndexError``;
- ``quantize.check_within_grid`` of scales of another shape was a raw broadcasting
  ``RuntimeError``, of a zero scale a weight "beyond its grid" by inf steps, of a 1-D
  weight a broadcast that passed;
- ``llm.prune(model, ..., targets="lm_head")`` said "no parameters left to sparsify (check
  targets and exclude)", as if a typo, not that the head lies outside the decoder blocks
  llm.prune works on; beside a layer of the blocks the head was dropped without a word;
- ``llm.prune``'s ``allocation`` of a list and ``quantize`` of a bool or an int, and
  ``llm.prune_structured``'s ``method`` or ``allocation`` of a list, were plain
  ``ValueError`` s saying the value was unknown, as if misspelt, not of the wrong type;
- ``DynamicSparsity.load_state_dict`` of a run at a lower sparsity or of another allocation
  (or of masks of another pattern) loaded it without a word, and trained on at the state's
  sparsity while ``sparsity`` said another; ``DynamicSparsity`` of a model that is no
  ``nn.Module`` was a raw ``AttributeError``, a ``drop_schedule`` of a list "unknown";
- ``IterativePruning.load_state_dict`` of a run with another ``sparsity`` or ``rounds``
  took its masks and pruned the next round to this schedule's targets, without a word; a
  rewind state holding NaN or inf weights (or NaN buffers) was loaded, and every later
  round trained from NaN;
- ``GradualPruner`` built with NumPy step counts returned ``np.bool_`` from ``step()``;
- ``schedules.soup`` of models whose buffer holds +inf in one and -inf in another at the
  same entry gave a NaN entry, silently; of a float32 and a bfloat16 model it averaged
  them promoted and cast the soup to models[0]'s dtype (the result depended on the order);
- ``training.train_epoch`` with an optimizer built on another model's parameters (or on
  frozen ones only) trained nothing and returned its losses as if it had; a NaN learning
  rate made every weight NaN at the first step; a model that is no ``nn.Module`` was a raw
  ``AttributeError`` (``accuracy``: an error naming "models[0]"); data on the meta device
  a raw ``Tensor.item()`` ``RuntimeError``; ``accuracy`` compared float or bool labels
  with the predicted indices as numbers (1.5 counted wrong, True as class 1);
- ``activation.calibrate(targets=[...])`` naming a module that is no ``nn.Linear`` (an
  embedding) dropped it without a word: calibrated and applied dense; TEAL's greedy
  allocation summed its steps to levels such as 0.49999999999999994, whose quantile took
  the input one row below the target's.
"""

from __future__ import annotations

import math

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn
from torch.utils.data import TensorDataset

from sparsekit import DynamicSparsity, IterativePruning
from sparsekit._checks import ArgumentTypeError
from sparsekit.activation import calibrate
from sparsekit.quantize import int8_scales, scales_at
from sparsekit.schedules import soup
from sparsekit.training import accuracy, train_epoch


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


# -- quantize.scales_at ---------------------------------------------------------------------


@pytest.mark.parametrize("group", [None, 8])
@pytest.mark.parametrize("rows, cols, match", [
    ([6], [0], r"^rows must lie in \[0, 6\) \(the rows of scales\), got 6$"),
    ([-1], [0], r"^rows must lie in \[0, 6\) \(the rows of scales\), got -1$"),
    ([0], [32], r"^cols must lie in \[0, 32\) \(in_features inputs\), got 32$"),
    ([0, 1], [3, -2], r"^cols must lie in \[0, 32\) \(in_features inputs\), got -2$"),
])
def test_scales_at_names_indices_outside_the_grid(group, rows, cols, match):
    scales = int8_scales(torch.randn(6, 32), group)
    with pytest.raises(ValueError, match=match):
        scales_at(scales, torch.tensor(rows), torch.tensor(cols), 32)


def test_scales_at_checks_in_features_and_index_types():
    grouped = int8_scales(torch.randn(6, 32), 8)
    with pytest.raises(ValueError, match=r"^in_features must be divided by the 4 groups of "
                                         r"scales of shape \(6, 4\), got 30$"):
        scales_at(grouped, torch.tensor([0]), torch.tensor([0]), 30)
    with pytest.raises(ValueError, match=r"in_features must be an int ≥ 1, got 0"):
        scales_at(grouped, torch.tensor([0]), torch.tensor([0]), 0)
    with pytest.raises(ArgumentTypeError, match=r"in_features must be an int ≥ 1, got True"):
        scales_at(grouped, torch.tensor([0]), torch.tensor([0]), True)
    with pytest.raises(ArgumentTypeError, match=r"^rows must be an int32 or int64 tensor of "
                                                r"indices, got torch.float32$"):
        scales_at(grouped, torch.tensor([0.0]), torch.tensor([0]), 32)
    with pytest.raises(ArgumentTypeError, match=r"^cols must be an int32 or int64 tensor of "
                                                r"indices, got list$"):
        scales_at(grouped, torch.tensor([0]), [0], 32)
    with pytest.raises(ArgumentTypeError, match=r"^scales must be a tensor of int8 scales"):
        scales_at([1.0], torch.tensor([0]), torch.tensor([0]), 32)
    # in range, empty: still the scales
    assert scales_at(grouped, torch.tensor([5]), torch.tensor([31]), 32) == grouped[5, 3]
    assert scales_at(grouped, torch.zeros(0, dtype=torch.long), torch.tensor([0]), 32).numel() == 0


# -- llm.prune: a target outside the blocks ---------------------------------------------------

transformers = pytest.importorskip("transformers")


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("targets, exclude", [
    ("lm_head", ("lm_head",)),  # the default exclude: was "no parameters left"
    ("lm_head", ()),
    (["lm_head", "model.embed_tokens"], ("lm_head",)),
])
def test_llm_prune_says_a_target_lies_outside_the_blocks(targets, exclude):
    from sparsekit import llm

    model = llama()
    before = snapshot(model)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"^targets: \[.*'lm_head.weight'.*\] lie outside the "
                                         r"transformer blocks, and llm.prune prunes only the "
                                         r"Linear layers inside them"):
        llm.prune(model, tokens, seqlen=16, targets=targets, exclude=exclude)
    assert unchanged(model, before)
    # beside a target inside the blocks the head was dropped without a word (the default
    # exclude): named too
    with pytest.raises(ValueError, match=r"\['lm_head.weight'\] lie outside"):
        llm.prune(model, tokens, seqlen=16, targets=["lm_head", "model.layers.0.mlp.up_proj"],
                  exclude=exclude)
    assert unchanged(model, before)
    # a type matches the head among the layers of the blocks: the default exclude drops it
    assert len(llm.prune(llama(), tokens, seqlen=16, targets=[nn.Linear]).masks) == 14
    masks = llm.prune(model, tokens, seqlen=16, targets="model.layers.0.mlp.up_proj")
    assert list(masks.masks) == ["model.layers.0.mlp.up_proj.weight"]


# -- DynamicSparsity.load_state_dict of another run -------------------------------------------


def _dynamic(sparsity: float, **kwargs) -> DynamicSparsity:
    model = mlp()
    return DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity,
                           end_step=100, every=10, **kwargs)


def _unrecorded(state: dict) -> dict:
    """``state`` as saved before states recorded their settings (which are refused first
    when they differ, test_schedules.py): the masks' own checks below still guard it."""
    return {k: v for k, v in state.items() if k != "settings"}


def _trained(ds: DynamicSparsity, steps: int = 12) -> DynamicSparsity:
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        ds.optimizer.zero_grad()
        ds.model(data).square().mean().backward()
        ds.optimizer.step()
        ds.step()
    return ds


@pytest.mark.parametrize("kwargs, match", [
    ({}, r"keeps 192 of 512 weights of '0.weight' \(sparsity 0.625\), more than this "
         r"DynamicSparsity \(method='rigl', sparsity=0.9, allocation='erk'\) ever keeps there "
         r"\(37, sparsity 0.9277\)"),
    ({"allocation": "uniform"}, r"of '0.weight' .*allocation='uniform'\) ever keeps there "
                                r"\(51, sparsity 0.9004\)"),
    ({"method": "set"}, r"method='set'"),
    ({"method": "srigl"}, r"of '0.weight' .*method='srigl'"),
    ({"method": "snfs"}, r"keeps 320 of 640 weights in total \(sparsity 0.5\), more than .*"
                         r"method='snfs'.* ever keeps there \(64, sparsity 0.9\)"),
    ({"allocation": "global"}, r"in total .*allocation='global'\) ever keeps there \(66"),
])
def test_dynamic_sparsity_refuses_the_state_of_a_run_at_a_lower_sparsity(kwargs, match):
    saved = _unrecorded(_trained(_dynamic(0.5, **kwargs)).state_dict())
    ds = _dynamic(0.9, **kwargs)
    before, masks = snapshot(ds.model), {n: m.clone() for n, m in ds.masks.masks.items()}
    with pytest.raises(ValueError, match=r"^state\['masks'\] .*" + match + r".*: the state of a "
                                         r"run at a lower sparsity or another allocation;.*"
                                         r"nothing was loaded$"):
        ds.load_state_dict(saved)
    assert ds.step_count == 0 and unchanged(ds.model, before)
    assert all(torch.equal(m, ds.masks.masks[n]) for n, m in masks.items())
    ds.load_state_dict(ds.state_dict())  # its own still loads


def test_dynamic_sparsity_refuses_another_allocation_at_the_same_sparsity():
    saved = _unrecorded(_dynamic(0.5).state_dict())  # erk: 192 and 128 kept
    ds = _dynamic(0.5, allocation="uniform")  # 256 and 64
    with pytest.raises(ValueError, match=r"keeps 128 of 128 weights of '2.weight' \(sparsity "
                                         r"0\), more than .* ever keeps there \(64, sparsity "
                                         r"0.5\)"):
        ds.load_state_dict(saved)


def test_granet_refuses_a_state_denser_than_its_initial_sparsity():
    saved = _unrecorded(_dynamic(0.5, method="granet", initial_sparsity=0.1).state_dict())
    ds = _dynamic(0.9, method="granet", initial_sparsity=0.5)
    with pytest.raises(ValueError, match=r"in total .* ever keeps there \(320, sparsity 0.5\)"):
        ds.load_state_dict(saved)


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "srigl", "granet"])
def test_dynamic_sparsity_resumes_exactly_from_its_own_run(method):
    """A state of the same run, saved mid-way (masks moved, SRigL's and GraNet's counts
    shrunk), still loads, and the resumed run goes on exactly as the uninterrupted one."""
    kwargs = {"method": method, **({"initial_sparsity": 0.3} if method == "granet" else {})}
    first = _trained(_dynamic(0.5, **kwargs), steps=15)
    state = first.state_dict()
    resumed = _dynamic(0.5, **kwargs)
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(state)
    _trained(first, steps=10)
    _trained(resumed, steps=10)
    assert all(torch.equal(m, resumed.masks.masks[n]) for n, m in first.masks.masks.items())
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(),
                                                 resumed.model.parameters()))


def test_dynamic_sparsity_refuses_masks_of_another_pattern():
    ds = _dynamic(0.5)
    state = ds.state_dict()
    state["masks"] = {**state["masks"], "pattern": "2:4"}
    with pytest.raises(ValueError, match=r"^state\['masks'\] holds masks of pattern '2:4', this "
                                         r"DynamicSparsity trains 'unstructured' ones; nothing "
                                         r"was loaded$"):
        ds.load_state_dict(state)
    assert ds.masks.pattern == "unstructured"


# -- IterativePruning.load_state_dict of another run ------------------------------------------


def _iterative(**kwargs) -> IterativePruning:
    return IterativePruning(mlp(), rewind_step=0, **kwargs)


@pytest.mark.parametrize("ours", [{"rounds": 3, "sparsity": 0.5}, {"rounds": 2, "sparsity": 0.9},
                                  {"rounds": 4, "sparsity": 0.9}])
def test_iterative_pruning_refuses_the_state_of_a_run_with_another_schedule(ours):
    run = _iterative(rounds=3, sparsity=0.9)
    run.next_round()
    run.next_round()
    imp = _iterative(**ours)
    before = snapshot(imp.model)
    masks = {n: m.clone() for n, m in imp.masks.masks.items()}
    with pytest.raises(ValueError, match=r"^state\['history'\]\[0\] pruned round 0 to sparsity "
                                         r"0.53\d+, this IterativePruning \(rounds=\d, "
                                         r"sparsity=0.\d\) prunes it to 0.\d+: the state of a run "
                                         r"with another sparsity or number of rounds"):
        imp.load_state_dict(run.state_dict())
    assert imp.round == 0 and not imp.history and unchanged(imp.model, before)
    assert all(torch.equal(m, imp.masks.masks[n]) for n, m in masks.items())


@pytest.mark.parametrize("sparsity", [0, 0.5, 0.9])
def test_iterative_pruning_loads_its_own_state(sparsity):
    import numpy as np

    for given in (sparsity, np.float32(sparsity)):
        imp = _iterative(rounds=2, sparsity=given)
        imp.next_round()
        imp.next_round()
        other = _iterative(rounds=2, sparsity=given)
        other.load_state_dict(imp.state_dict())
        assert other.round == 2


def test_iterative_pruning_refuses_a_history_entry_without_its_sparsity():
    imp = _iterative(rounds=3, sparsity=0.9)
    imp.next_round()
    state = imp.state_dict()
    state["history"] = [{"round": 0}]
    with pytest.raises(ValueError, match=r"state\['history'\]\[0\] pruned round 0 to sparsity "
                                         r"None"):
        _iterative(rounds=3, sparsity=0.9).load_state_dict(state)


# -- soup of opposite infinities ----------------------------------------------------------------


def test_soup_refuses_opposite_infinities_in_a_buffer():
    models = [nn.Linear(3, 2) for _ in range(3)]
    for m in models:
        m.load_state_dict(models[0].state_dict())
    for m in models:
        m.register_buffer("bias_mask", torch.zeros(2, 2))
    models[0].bias_mask[0, 1] = -math.inf  # alone: the soup's entry is -inf, as meant
    models[1].bias_mask[1, 0] = math.inf
    models[2].bias_mask[1, 0] = -math.inf
    with pytest.raises(ValueError, match=r"^models\[1\] holds \+inf and models\[2\] -inf in "
                                         r"'bias_mask' at \[1, 0\]; their mean, the soup's "
                                         r"entry, would be NaN"):
        soup(models)
    models[2].bias_mask[1, 0] = math.inf
    out = soup(models).bias_mask
    assert out[0, 1] == -math.inf and out[1, 0] == math.inf and not out.isnan().any()


def test_soup_refuses_models_of_another_dtype():
    """A float32 and a bfloat16 model were averaged promoted, then cast to models[0]'s
    dtype: the soup depended on the order of the models."""
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    b.to(torch.bfloat16)
    for models, i, theirs, ours in (([a, b], 1, "bfloat16", "float32"),
                                    ([b, a], 1, "float32", "bfloat16")):
        with pytest.raises(ValueError, match=rf"^models\[{i}\] holds 'weight' in torch.{theirs}, "
                                             rf"models\[0\] in torch.{ours}; cast the models to "
                                             "one dtype$"):
            soup(models)
    assert soup([a.to(torch.bfloat16), b]).weight.dtype == torch.bfloat16


def test_soup_names_the_model_and_parameter_of_an_infinite_weight():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.weight[0, 0], b.weight[0, 0] = math.inf, -math.inf
    with pytest.raises(ValueError, match=r"^models\[0\] holds NaN or inf in 'weight'"):
        soup([a, b])


# -- train_epoch / accuracy ---------------------------------------------------------------------


def _data(n: int = 12) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize("build", [
    lambda model: torch.optim.SGD(mlp().parameters(), lr=0.1),  # another model's
    lambda model: torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1),
])
def test_train_epoch_refuses_an_optimizer_of_other_parameters(build):
    model = mlp().eval()
    before = snapshot(model)
    optimizer = build(model)
    with pytest.raises(ValueError, match=r"^optimizer holds none of the trainable parameters of "
                                         r"model .* so train_epoch would train nothing"):
        train_epoch(model, _data(), optimizer, batch_size=4)
    assert unchanged(model, before) and not model.training


def test_train_epoch_refuses_an_optimizer_of_frozen_parameters_only():
    model = mlp().eval()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"optimizer holds none of the trainable parameters"):
        train_epoch(model, _data(), torch.optim.SGD(model[0].parameters(), lr=0.1))
    # one trainable parameter of the model held is enough (the frozen layer is the user's)
    assert math.isfinite(train_epoch(model, _data(), torch.optim.SGD(model.parameters(),
                                                                     lr=0.1)))


def test_train_epoch_and_accuracy_name_a_model_that_is_no_module():
    model = mlp()
    with pytest.raises(ArgumentTypeError, match=r"^model must be an nn.Module, got OrderedDict$"):
        train_epoch(model.state_dict(), _data(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ArgumentTypeError, match=r"^model must be an nn.Module, got OrderedDict$"):
        accuracy(model.state_dict(), _data())


# -- activation.calibrate: targets that are no nn.Linear -----------------------------------------


class _Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.e, self.b = nn.Linear(8, 8), nn.Embedding(10, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("targets", [["a", "e"], [nn.Linear, nn.Embedding]])
def test_calibrate_refuses_targets_that_are_not_linear_layers(targets):
    model = _Embedded()
    with pytest.raises(ValueError, match=r"^targets: \{'e': 'Embedding'\} are not nn.Linear "
                                         r"layers"):
        calibrate(model, torch.randn(4, 8), targets=targets)
    assert set(calibrate(model, torch.randn(4, 8), targets=["a", "b"]).thresholds) == {"a", "b"}


def test_iterative_pruning_refuses_a_rewind_state_of_nan_weights():
    run = IterativePruning(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32)), rounds=2,
                           sparsity=0.5, rewind_step=0)
    state = run.state_dict()
    imp = IterativePruning(nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32)), rounds=2,
                           sparsity=0.5, rewind_step=0)
    for key, value, match in (
            ("0.weight", math.nan, r"^state\['rewind_state'\]\['0.weight'\] must be finite, got "
                                   r"16 NaN or inf among 512 values; a state of a diverged run"),
            ("0.bias", math.inf, r"\['0.bias'\] must be finite"),
            ("1.running_mean", math.nan, r"^state\['rewind_state'\]\['1.running_mean'\] holds "
                                         r"NaN; a state of a diverged run, or edited; nothing "
                                         r"was loaded$")):
        bad = {**state, "rewind_state": {k: v.clone() for k, v in state["rewind_state"].items()}}
        bad["rewind_state"][key][0] = value
        with pytest.raises(ValueError, match=match):
            imp.load_state_dict(bad)
        assert imp._rewind_state is not bad["rewind_state"]
    imp.load_state_dict(state)


def test_gradual_pruner_of_numpy_steps_returns_bools():
    import numpy as np

    from sparsekit import GradualPruner

    gp = GradualPruner(mlp(), 0.5, start_step=np.int64(0), end_step=np.int64(4),
                       every=np.int64(2))
    assert [type(gp.step()) for _ in range(4)] == [bool] * 4


# -- llm: arguments of the wrong type -----------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"allocation": ["owl"]}, r"^unknown allocation \['owl'\] \(a list, not a name\); "
                              r"accepted: uniform, owl$"),
    ({"quantize": True}, r"^quantize must be None or one of \['int8'\], got True$"),
    ({"quantize": 8}, r"^quantize must be None or one of \['int8'\], got 8$"),
])
def test_llm_prune_names_arguments_of_the_wrong_type(kwargs, match):
    from sparsekit import llm

    model = llama()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ArgumentTypeError, match=match):
        llm.prune(model, tokens, seqlen=8, **kwargs)
    with pytest.raises(ValueError, match=r"^quantize must be None or one of \['int8'\], got "
                                         r"'int4'$") as err:
        llm.prune(model, tokens, seqlen=8, quantize="int4")
    assert not isinstance(err.value, TypeError)  # the right type, a wrong value


@pytest.mark.parametrize("kwargs, match", [
    ({"method": ["wanda"]}, r"^unknown method \['wanda'\] \(a list, not a name\); accepted: "
                            r"'wanda', 'magnitude', 'flap'$"),
    ({"allocation": ("global",), "method": "magnitude"}, r"^unknown allocation \('global',\) "
                                                         r"\(a tuple, not a name\); accepted: "
                                                         r"'uniform', 'global', 'adaptive'$"),
])
def test_prune_structured_names_arguments_of_the_wrong_type(kwargs, match):
    from sparsekit import llm

    model = llama()
    before = snapshot(model)
    with pytest.raises(ArgumentTypeError, match=match):
        llm.prune_structured(model, amount=0.25, **kwargs)
    assert unchanged(model, before)


# -- train_epoch / accuracy: meta data, labels that are no indices, a NaN learning rate ---------


@pytest.mark.parametrize("which", ["inputs", "labels"])
def test_train_epoch_and_accuracy_name_data_on_the_meta_device(which):
    x, y = _data().tensors
    data = TensorDataset(x.to("meta"), y) if which == "inputs" else TensorDataset(x, y.to("meta"))
    model = mlp().eval()
    match = rf"^data's {which} is on the meta device and holds no values"
    with pytest.raises(ValueError, match=match):
        train_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not model.training
    with pytest.raises(ValueError, match=match):
        accuracy(model, data)


@pytest.mark.parametrize("labels", [torch.full((12,), 1.5), torch.ones(12), torch.ones(12,
                                                                                    dtype=torch.bool)])
def test_accuracy_refuses_labels_that_are_not_integers(labels):
    """1.5 was never predicted and counted wrong; True counted as class 1."""
    with pytest.raises(ValueError, match=r"^data's labels must be integer class indices "
                                         r"\(torch.long\), got torch\.(float32|bool)$"):
        accuracy(mlp(), TensorDataset(_data().tensors[0], labels))


@pytest.mark.parametrize("lr", [math.nan, math.inf, torch.tensor(math.nan)])
def test_train_epoch_refuses_a_learning_rate_that_is_not_finite(lr):
    model = mlp().eval()
    before = snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    optimizer.add_param_group({"params": [], "lr": lr})
    with pytest.raises(ValueError, match=r"^optimizer.param_groups\[1\]\['lr'\] must be a finite "
                                         r"learning rate, got (nan|inf)$"):
        train_epoch(model, _data(), optimizer)
    assert unchanged(model, before) and not model.training and not optimizer.state



def test_dynamic_sparsity_names_a_model_that_is_no_module_and_a_drop_schedule_of_a_list():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ArgumentTypeError, match=r"^model must be an nn.Module, got OrderedDict$"):
        DynamicSparsity(model.state_dict(), optimizer, 0.5, end_step=10)
    with pytest.raises(ArgumentTypeError, match=r"^drop_schedule must be a string, one of: "
                                                r"cosine, linear, constant; got \['cosine'\]$"):
        DynamicSparsity(model, optimizer, 0.5, end_step=10, drop_schedule=["cosine"])
    assert not optimizer._optimizer_step_pre_hooks


@pytest.mark.parametrize("weight, scales, error, match", [
    (torch.randn(4, 16), torch.ones(5), ValueError, r"^scales must be floating of shape \(4,\)"),
    (torch.randn(4, 16), torch.ones(3, 4), ValueError, r"^scales must be floating of shape "
                                                       r"\(4, 4\)"),
    (torch.randn(4, 16), [1.0], ArgumentTypeError, r"^scales must be a floating tensor"),
    (torch.randn(4, 16), torch.zeros(4), ValueError, r"^scales must be positive and finite"),
    (torch.randn(16), torch.ones(4), ValueError, r"^layer: weight must be 2-D \(out, in\), got "
                                                 r"shape \(16,\)$"),
    (torch.ones(4, 16, dtype=torch.bool), torch.ones(4), ArgumentTypeError,
     r"^layer: weight must be a 2-D floating-point \(16 bits or more\) or integer tensor, "
     r"got torch.bool$"),
])
def test_check_within_grid_names_a_weight_or_scales_that_are_no_grid(weight, scales, error,
                                                                      match):
    """Scales of another shape were a raw broadcasting RuntimeError, a zero scale a weight
    "beyond its grid" by inf steps (blaming the weight), a 1-D weight broadcast against
    the scales and passed."""
    from sparsekit.quantize import check_within_grid

    with pytest.raises(error, match=match):
        check_within_grid("layer", weight, scales)
    w = torch.randn(4, 16)
    check_within_grid("layer", w, int8_scales(w))
    check_within_grid("layer", w, int8_scales(w, 4))


def test_greedy_levels_land_on_the_target_exactly():
    """Ten steps of 0.05 summed to a level of 0.49999999999999994, whose quantile took the
    input one row below the target's: greedy's thresholds differed from uniform's where
    every block has one layer, and its sparsities were printed as such."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    greedy, uniform = calibrate(model, x, allocation="greedy"), calibrate(model, x)
    assert greedy.sparsities == {"0": 0.5, "2": 0.5}
    assert all(torch.equal(greedy.thresholds[n], t) for n, t in uniform.thresholds.items())
