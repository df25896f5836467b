"""Hostile inputs to observe, report, models and distributed (single process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit import distributed, models, observe
from sparsekit._checks import ArgumentTypeError
from sparsekit.report import report


class Masks:
    def __init__(self, masks: dict) -> None:
        self.masks = masks


def enter(context) -> None:
    """Enter and leave a context manager."""
    with context:
        pass


class NotAModule:
    weight = torch.randn(4, 8)


# -- observe ------------------------------------------------------------------------------


def test_watch_removes_earlier_hooks_when_a_layer_is_not_a_module():
    """A non-module in layers raised a raw AttributeError and left the earlier layers' hooks."""
    lin = nn.Linear(8, 4)
    with pytest.raises(ArgumentTypeError, match=r"layers\['b'\] must be an nn.Module"):
        enter(observe.watch({"a": lin, "b": NotAModule()}, lambda *a: None))
    assert not lin._forward_hooks
    with pytest.raises(ArgumentTypeError, match=r"layers\['b'\]"):
        enter(observe.record({"a": lin, "b": NotAModule()}))
    assert not lin._forward_hooks


def test_watch_and_record_refuse_a_non_mapping():
    """A list of layers was a raw AttributeError ('list' object has no attribute 'items')."""
    lin = nn.Linear(8, 4)
    with pytest.raises(ArgumentTypeError, match="layers must be a mapping"):
        enter(observe.watch([lin], lambda *a: None))
    with pytest.raises(ArgumentTypeError, match="layers must be a mapping"):
        enter(observe.record([lin]))


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(input=x)


def test_layer_called_with_keywords_only_is_observed():
    """A layer called as fc(input=x) made the hook raise IndexError (report blamed inputs)."""
    model = KeywordCall()
    x = torch.randn(3, 8)
    assert observe.input_shapes(model, {"fc": model.fc}, x) == {"fc": torch.Size([3, 8])}
    assert report(model, x).totals["dense_flops"] == 2 * 3 * 8 * 4
    stats = observe.input_stats(model, {"fc": model.fc}, x)
    assert stats["fc"].rows == 3
    assert not model.fc._forward_hooks


def test_batches_top_level_pair_with_none_labels():
    """batches((x, None)) yielded x as a batch, then failed on None ('got NoneType')."""
    x = torch.randn(4, 8)
    [(inputs, labels)] = list(observe.batches((x, None)))
    assert inputs is x and labels is None


def test_batches_refuses_a_dict_naming_it():
    """A dict was iterated by its keys and refused as 'each batch ... got str'."""
    with pytest.raises(ArgumentTypeError, match="got dict"):
        list(observe.batches({"x": torch.randn(2, 8)}))
    with pytest.raises(ArgumentTypeError, match="got str"):
        list(observe.batches("abc"))


def test_run_restores_modes_when_data_raises_midway():
    """(Guard) a generator failing after one batch leaves train modes and hooks as found."""
    model = nn.Sequential(nn.Linear(8, 4), nn.Dropout())
    model.train()

    def gen():
        yield torch.randn(2, 8)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        observe.run(model, gen())
    assert model.training and model[1].training


def test_preserved_refuses_non_modules():
    """inference('x') and run('x', data) were raw AttributeErrors ('str' has no 'modules')."""
    with pytest.raises(ArgumentTypeError, match=r"models\[0\] must be an nn.Module"):
        enter(observe.inference("x"))
    with pytest.raises(ArgumentTypeError, match="train must be"):
        enter(observe.preserved(nn.Linear(2, 2), train="yes"))


@pytest.mark.parametrize("features, error", [(-1, ValueError), (True, ArgumentTypeError),
                                             (2.0, ArgumentTypeError)])
def test_input_stats_features_checked(features, error):
    """InputStats(-1) / (True) were raw RuntimeError / TypeError from torch.zeros."""
    with pytest.raises(error, match="features must be an int"):
        observe.InputStats(features)


def test_input_stats_add_wrong_width():
    """add() of rows of the wrong width was a raw RuntimeError from reshape (or, when the
    size divided, silently regrouped values into wrong features)."""
    stats = observe.InputStats(3)
    with pytest.raises(ValueError, match="last dimension holds the 3 features"):
        stats.add(torch.randn(2, 6))
    assert stats.rows == 0 and not stats.sq.any()


# -- report -------------------------------------------------------------------------------


def test_report_counts_tied_weights_once():
    """Two layers sharing one weight counted its parameters twice in the totals."""
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    r = report(nn.Sequential(a, b), torch.randn(2, 8))
    assert r.totals["params"] == 64 and r.totals["nonzeros"] == 64
    assert r.totals["dense_flops"] == 2 * 2 * 2 * 64  # both layers run
    assert [row.tied_to for row in r.rows] == [None, "0"]
    assert r.to_dict()["rows"][1]["tied_to"] == "0"
    assert "1 (tied to 0)" in r.to_markdown()


def test_report_finds_masks_under_another_name_of_the_layer():
    """A mask keyed by the second name of a shared module was accepted and ignored (masked
    weights reported as kept)."""
    lin = nn.Linear(8, 8)
    model = nn.Sequential()
    model.add_module("a", lin)
    model.add_module("b", lin)
    r = report(model, masks=Masks({"b.weight": torch.zeros(8, 8, dtype=torch.bool)}))
    assert r.totals["nonzeros"] == 0


def test_report_finds_masks_under_a_tied_name_and_refuses_disagreeing_ones():
    """Masks under the tied name of a weight counted only for that row; disagreeing masks
    of one weight were not noticed."""
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    r = report(model, masks=Masks({"1.weight": torch.zeros(8, 8)}))
    assert [row.nonzeros for row in r.rows] == [0, 0]
    with pytest.raises(ValueError, match="name the same weight"):
        report(model, masks=Masks({"0.weight": torch.zeros(8, 8), "1.weight": torch.ones(8, 8)}))


@pytest.mark.parametrize("mask", [[1, 2], torch.ones(8, 8).numpy()])
def test_report_refuses_masks_that_are_not_tensors(mask):
    """A list or array mask was a raw AttributeError / TypeError from count_nonzero."""
    with pytest.raises(ArgumentTypeError, match=r"masks\['0.weight'\] must be a torch.Tensor"):
        report(nn.Sequential(nn.Linear(8, 8)), masks=Masks({"0.weight": mask}))


def test_report_refuses_meta_weights_before_running():
    """A model on the meta device was a raw RuntimeError ('item() on meta tensors')."""
    model = nn.Sequential(nn.Linear(8, 8, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        report(model)
    r = report(model, masks=Masks({"0.weight": torch.ones(8, 8)}))
    assert r.totals["nonzeros"] == 64


def test_report_argument_types():
    """Wrong types raised a plain TypeError, not ArgumentTypeError."""
    with pytest.raises(ArgumentTypeError):
        report("model")
    with pytest.raises(ArgumentTypeError):
        report(nn.Linear(2, 2), [torch.randn(1, 2)])
    with pytest.raises(ArgumentTypeError):
        report(nn.Linear(2, 2), masks={"weight": torch.ones(2, 2)})
    with pytest.raises(ArgumentTypeError):
        report(nn.Linear(2, 2)).relative_to(3)


def test_report_restores_modes_and_hooks_when_forward_fails():
    """(Guard) a failing forward leaves modes and hooks as found."""

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            self.fc(x)
            raise RuntimeError("broken")

    bad = Bad().train()
    with pytest.raises(ValueError, match="example_inputs"):
        report(bad, torch.randn(2, 8))
    assert bad.training and bad.fc.training and not bad.fc._forward_hooks


# -- models -------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: models.LeNet300100(in_features=10**12),
    lambda: models.LeNet300100(in_features=2**63),
    lambda: models.LeNet5(in_channels=10**9),
    lambda: models.ResNetSmall(width=10**6),
    lambda: models.create_model("lenet_300_100", num_classes=10**13),
])
def test_models_refuse_huge_sizes(build):
    """Huge sizes were a raw allocator RuntimeError (or an overflow TypeError)."""
    with pytest.raises(ValueError, match="parameters"):
        build()


def test_models_normal_sizes_still_build():
    """(Guard) the size check leaves ordinary models buildable and on the CPU."""
    m = models.create_model("resnet_small", width=4)
    assert not any(p.is_meta for p in m.parameters())
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 10)


# -- distributed (no process group) -------------------------------------------------------


@pytest.mark.parametrize("n, error", [(-3, ValueError), (True, ArgumentTypeError),
                                      (2.5, ArgumentTypeError), ("4", ArgumentTypeError)])
def test_rank_slice_checks_n(n, error):
    """rank_slice(-3) gave slice(0, -3) (dropped items), True a slice, '4' a raw TypeError."""
    with pytest.raises(error, match="data: the number of rows must be an int"):
        distributed.rank_slice(n, "data", "rows", "n")
    assert distributed.rank_slice(4, "data", "rows", "n") == slice(0, 4)


def test_collectives_check_arguments_in_one_process():
    """all_reduce_sum / check_same_on_ranks accepted anything without a process group
    (and failed only under torchrun)."""
    with pytest.raises(ArgumentTypeError, match=r"tensors\[0\]"):
        distributed.all_reduce_sum([1, 2])
    with pytest.raises(ArgumentTypeError, match="mapping"):
        distributed.check_same_on_ranks([torch.ones(2)])
    with pytest.raises(ArgumentTypeError, match=r"tensors\['a'\]"):
        distributed.check_same_on_ranks({"a": 3})
    distributed.all_reduce_sum(torch.ones(2))
    distributed.check_same_on_ranks({"a": torch.ones(2)})
