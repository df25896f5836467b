"""Hostile inputs, round 18 (the pruning pipeline: targets → scores → allocation →
pattern → MaskSet):

- ``pattern="row"`` and ``"block:RxC"`` summed a unit's scores with the ``-inf`` that marks
  a weight already zero, so a row or tile holding a single zero weight ranked below every
  other and was pruned first, whatever its other weights (silently);
- pruning with ``"row"`` (or a block) a model with zeros inside the rows it keeps (pruned
  unstructured before) intersected the kept rows with the zeros, and the masks were
  refused as "does not follow pattern='row'" (the rows are now kept whole);
- a registered criterion returning no dict, no tensor for a target, scores of another
  shape, a non-float, sparse or meta tensor failed deep in the pipeline with a raw
  ``KeyError``, ``AttributeError``, ``TypeError`` or shape ``RuntimeError``;
- a criterion scoring nonzero weights ``-inf`` (the mark of a weight already pruned) had
  them pruned past the sparsity asked, silently: all ``-inf`` pruned every weight;
- a registered allocation returning no dict, no count for a target, or a count that is no
  int ≥ 0 failed with a ``KeyError``/``AttributeError`` or as a bad ``k`` of ``top_k``;
- a registered pattern factory returning no ``Pattern`` failed at its first use with an
  ``AttributeError``;
- ``Registry.register`` took a name that is no string (``5``, ``None``) or an empty one:
  every later error message of the table failed listing it with a raw ``TypeError``, and
  an unhashable name was a raw ``TypeError`` itself;
- ``MaskSet.apply()`` after ``model.to("meta")`` moved the masks to the meta device: their
  values were lost, silently, and ``sparsity()`` failed inside PyTorch;
- ``MaskSet.apply()`` after a masked layer was replaced (``model[0] = nn.Linear(...)``) or
  deleted masked the detached layer, leaving the layer the model runs dense, silently;
- a tied weight (``b.weight = a.weight``) could not be named by its other path:
  ``targets="b.weight"`` matched "no module or parameter", and ``exclude="a"`` "none of the
  targeted parameters: a.weight";
- a masked parameter made under ``torch.inference_mode`` made ``apply()`` zero the layers
  before it, then fail with PyTorch's raw ``RuntimeError`` (so did ``prune``);
- a float8 weight passed as "floating point": ``prune`` (and ``MaskSet.apply``) zeroed the
  layers before it, then failed with "masked_fill not implemented";
- ``diff`` of quantized tensors failed with a raw ``RuntimeError``, and of nested tensors
  with "Internal error: NestedTensorImpl doesn't support sizes";
- ``Pattern.mask`` took a ``keep`` of ``-1`` or ``True`` for rows, blocks and fan-in (and
  ``1.5`` for rows and blocks), giving a mask, silently; a list of scores was an
  ``AttributeError`` for all but unstructured;
- ``select.top_k`` and ``top_k_counts`` of scores on the meta device failed in
  ``Tensor.item()``, ``top_k`` of sparse scores in ``reshape`` and of float8 scores in
  ``nan_to_num`` (``top_k_counts`` ranked float8 already);
- the allocations, called from ``ALLOCATIONS``, took any ``sparsity``: ``1.5`` gave negative
  counts, silently, NaN a raw "cannot convert float NaN to integer", and scores that are
  no tensors an ``AttributeError``.
"""

from __future__ import annotations

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

import sparsekit
from sparsekit import ALLOCATIONS, CRITERIA, PATTERNS, MaskSet, parse_pattern
from sparsekit.registry import Registry


@pytest.fixture
def register():
    """Register entries in the global tables for one test, and take them out after it."""
    added: list[tuple[Registry, str]] = []

    def add(table: Registry, name: str, entry: object) -> None:
        table.register(name)(entry)
        added.append((table, name))

    yield add
    for table, name in added:
        del table._table[name], table._meta[name]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("pattern", ["row", "block:4x4"])
def test_a_unit_holding_a_zero_weight_ranks_by_its_other_weights(pattern):
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        w = torch.ones(8, 8)
        w[:4, :4] = 9.0  # the heaviest row (and tile) ...
        w[0, 0] = 0.0  # ... holding one weight that is zero already
        model[0].weight.copy_(w)
    mask = sparsekit.prune(model, 0.25, pattern=pattern).masks["0.weight"]
    assert mask[0].all() if pattern == "row" else mask[:4, :4].all()  # was pruned first
    assert parse_pattern(pattern).is_valid(mask) and mask.float().mean() == 0.75


@pytest.mark.parametrize("pattern", ["row", "block:4x4", "fanin"])
def test_a_structured_prune_of_an_unstructured_one_follows_its_pattern(pattern):
    model = _mlp()
    sparsekit.prune(model, 0.5)
    masks = sparsekit.prune(model, 0.5, pattern=pattern)
    assert masks.pattern == pattern
    for n, m in masks.masks.items():
        assert parse_pattern(pattern).is_valid(m)
        assert (dict(model.named_parameters())[n][~m] == 0).all()


def _scores(kind):
    def criterion(ctx):
        out = {t.name: t.param.detach().abs().float() for t in ctx.targets}
        first = ctx.targets[0].name
        if kind == "none":
            return None
        if kind == "missing":
            del out[first]
        if kind == "list":
            out[first] = out[first].tolist()
        if kind == "shape":
            out[first] = out[first].t()
        if kind == "int":
            out[first] = out[first].long()
        if kind == "complex":
            out[first] = out[first].to(torch.complex64)
        if kind == "sparse":
            out[first] = out[first].to_sparse()
        if kind == "meta":
            out[first] = out[first].to("meta")
        return out

    return criterion


@pytest.mark.parametrize(("kind", "error", "match"), [
    ("none", TypeError, r"criterion 'bad' must return a dict .*, got NoneType"),
    ("missing", ValueError, r"criterion 'bad' must return .* it returned none for '0.weight'"),
    ("list", TypeError, r"criterion 'bad' must return .* for '0.weight' it returned list"),
    ("shape", ValueError, r"for '0.weight' it returned shape \(8, 16\) on cpu, not the "
                          r"weight's \(16, 8\)"),
    ("int", TypeError, r"for '0.weight' it returned a torch.int64 tensor"),
    ("complex", TypeError, r"for '0.weight' it returned a torch.complex64 tensor"),
    ("sparse", TypeError, r"of layout torch.sparse_coo"),
    ("meta", TypeError, r"on meta: accepted, a dense floating-point tensor with values"),
])
def test_a_criterion_returning_what_is_no_scores_is_refused_by_name(register, kind, error,
                                                                    match):
    register(CRITERIA, "bad", _scores(kind))
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        sparsekit.prune(model, 0.5, method="bad")
    assert unchanged(model, before)


def test_a_criterion_scoring_live_weights_minus_infinity_prunes_nothing(register):
    register(CRITERIA, "neginf", lambda ctx: {t.name: torch.full_like(t.param, float("-inf"))
                                              for t in ctx.targets})
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"criterion 'neginf' gave 128 score\(s\) of -inf for "
                                         r"nonzero weights of '0.weight'"):
        sparsekit.prune(model, 0.5, method="neginf")
    assert unchanged(model, before)


@pytest.mark.parametrize(("counts", "error", "match"), [
    (lambda s: None, TypeError, r"allocation 'bad' must return a dict .*, got NoneType"),
    (lambda s: {}, ValueError, r"it returned none for '0.weight', '2.weight'"),
    (lambda s: {n: -5 for n in s}, ValueError, r"for '0.weight' it returned -5"),
    (lambda s: {n: 1.5 for n in s}, TypeError, r"for '0.weight' it returned 1.5"),
    (lambda s: {n: True for n in s}, TypeError, r"for '0.weight' it returned True"),
])
def test_an_allocation_returning_what_is_no_counts_is_refused_by_name(register, counts, error,
                                                                      match):
    register(ALLOCATIONS, "bad", lambda scores, sparsity: counts(scores))
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(error, match=r"allocation 'bad' must return a dict of target name -> "
                                    r"int count ≥ 0"):
        sparsekit.prune(model, 0.5, allocation="bad")
    with pytest.raises(error, match=match):
        sparsekit.prune(model, 0.5, allocation="bad")
    assert unchanged(model, before)


def test_a_pattern_factory_returning_no_pattern_is_refused_by_name(register):
    register(PATTERNS, "mine", lambda spec: None)
    model = _mlp()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"the pattern factory registered as 'mine' must return "
                                        r"a Pattern for 'mine', got NoneType"):
        sparsekit.prune(model, 0.5, pattern="mine")
    assert unchanged(model, before)


@pytest.mark.parametrize(("name", "error"), [(5, TypeError), (None, TypeError),
                                             (["a"], TypeError), ("", ValueError)])
def test_a_registry_takes_only_nonempty_string_names(name, error):
    table = Registry("thing")
    table.register("a")(abs)
    with pytest.raises(error, match=r"name of a thing must be a nonempty string, got"):
        table.register(name)(abs)
    assert table.names() == ["a"]
    with pytest.raises(ValueError, match=r"unknown thing 'b'; accepted: a"):
        table.get("b")


def test_masks_of_a_model_moved_to_the_meta_device_keep_their_values():
    model = _mlp()
    masks = sparsekit.prune(model, 0.5)
    before = {n: m.clone() for n, m in masks.masks.items()}
    model.to("meta")
    with pytest.raises(ValueError, match=r"parameter '0.weight' \(replaced since the masks were "
                                         r"made\) is on the meta device"):
        masks.apply()
    assert all(torch.equal(masks.masks[n], m) for n, m in before.items())
    assert masks.sparsity() == 0.5


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_masks_refuse_a_layer_that_left_the_model(change):
    model = _mlp()
    masks = sparsekit.prune(model, 0.5)
    if change == "replace":
        model[0] = nn.Linear(8, 16)
    else:
        del model[2]
    before = snapshot(model)
    name = "0.weight" if change == "replace" else "2.weight"
    with pytest.raises(ValueError, match=rf"the module holding parameter '{name}' is no longer "
                                         r"part of the model"):
        masks.apply()
    assert unchanged(model, before)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("kwargs", [{"targets": "b.weight"}, {"exclude": "a"},
                                    {"exclude": "b.weight"}, {"exclude": "b"}])
def test_a_tied_weight_is_named_by_any_of_its_paths(kwargs):
    masks = sparsekit.prune(_Tied(), 0.5, **kwargs)
    assert list(masks.masks) == (["a.weight"] if "targets" in kwargs else ["c.weight"])


def test_masks_refuse_inference_tensors_before_zeroing_any_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with torch.inference_mode():
        model.append(nn.Linear(8, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"parameter '2.weight' is an inference tensor"):
        sparsekit.prune(model, 0.5)
    assert unchanged(model, before)


def test_float8_weights_are_refused_before_any_layer_is_zeroed():
    model = _mlp()
    model[2].to(torch.float8_e4m3fn)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"target '2.weight' has dtype torch.float8_e4m3fn; only "
                                        r"floating-point weights of 16 bits or more"):
        sparsekit.prune(model, 0.5)
    masks = {"0.weight": torch.rand(16, 8) > 0.5, "2.weight": torch.rand(4, 16) > 0.5}
    with pytest.raises(TypeError, match=r"masks has an entry '2.weight' for a parameter of "
                                        r"dtype torch.float8_e4m3fn"):
        MaskSet(model, masks).apply()
    assert unchanged(model, before)


def test_diff_compares_quantized_tensors_and_names_nested_ones():
    q = torch.quantize_per_tensor(torch.tensor([0.0, 1.0]), 0.1, 0, torch.quint8)
    assert sparsekit.diff({"x": q}, {"x": torch.tensor([0.0, 1.0])}).totals["changed"] == 0
    assert sparsekit.diff({"x": q}, {"x": torch.tensor([0.5, 1.0])}).totals["changed"] == 1
    nested = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"a: the tensors \['x'\] are nested tensors"):
        sparsekit.diff({"x": nested}, {"x": nested})


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:2x2", "row", "fanin"])
@pytest.mark.parametrize(("keep", "error"), [(-1, ValueError), (1.5, TypeError),
                                             (True, TypeError), (None, TypeError)])
def test_a_pattern_mask_takes_only_a_count_of_weights_to_keep(pattern, keep, error):
    with pytest.raises(error, match=r"keep must be an int ≥ 0, got"):
        parse_pattern(pattern).mask(torch.rand(8, 8), keep)


@pytest.mark.parametrize("pattern", ["2:4", "block:2x2", "row", "fanin"])
def test_a_pattern_mask_names_scores_that_are_no_tensor(pattern):
    with pytest.raises(TypeError, match=r"scores must be a real tensor, got list"):
        parse_pattern(pattern).mask([[1.0] * 8] * 8, 4)


@pytest.mark.parametrize("allocation", ["uniform", "global", "lamp", "erk", "er", "owl"])
@pytest.mark.parametrize(("sparsity", "error"), [(1.5, ValueError), (-1, ValueError),
                                                 (float("nan"), ValueError), ("0.5", TypeError)])
def test_an_allocation_called_directly_checks_its_sparsity(allocation, sparsity, error):
    scores = {"a": torch.rand(4, 4), "b": torch.rand(4, 8)}
    with pytest.raises(error, match=r"sparsity must be"):
        ALLOCATIONS.get(allocation)(scores, sparsity)
    with pytest.raises(TypeError, match=r"scores\['a'\] must be a torch.Tensor, got list"):
        ALLOCATIONS.get(allocation)({"a": [1.0]}, 0.5)


def test_a_selection_names_scores_without_values_and_ranks_float8():
    from sparsekit.select import top_k, top_k_counts

    with pytest.raises(ValueError, match=r"scores is on the meta device"):
        top_k(torch.rand(4, device="meta"), 1)
    with pytest.raises(ValueError, match=r"parts\[0\] is on the meta device"):
        top_k_counts([torch.rand(4, device="meta")], 1)
    with pytest.raises(TypeError, match=r"scores must be a dense \(strided\) real tensor, got "
                                        r"layout torch.sparse_coo"):
        top_k(torch.rand(4).to_sparse(), 1)
    scores = torch.tensor([0.5, 2.0, 1.0, 4.0]).to(torch.float8_e4m3fn)
    assert top_k(scores, 2).tolist() == [False, True, False, True]
