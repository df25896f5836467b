"""sparsekit.observe: batches, preserved/inference, run, watch, input statistics, shapes, MACs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsekit.observe import (
    InputStats,
    batches,
    inference,
    input_shapes,
    input_stats,
    macs,
    preserved,
    record,
    run,
    watch,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


# -- batches ------------------------------------------------------------------------------


def test_batches_accepts_its_own_output():
    x, y = torch.randn(4, 2), torch.arange(4)
    for data in (x, (x, y), [x, x], DataLoader(TensorDataset(x, y), batch_size=3)):
        once = list(batches(data))
        again = list(batches(once))
        same = [(a is b, c is d) for (a, c), (b, d) in zip(once, again)]
        assert same == [(True, True)] * len(once)


def test_batches_rejects_other_items():
    with pytest.raises(TypeError, match="each batch in data"):
        list(batches([(torch.randn(2), 3)]))
    with pytest.raises(TypeError, match="data must be"):
        list(batches(5))


# -- preserved / inference ----------------------------------------------------------------


def test_preserved_restores_modes_buffers_and_grads_after_an_exception():
    model = mlp()
    model[3].eval()  # a submodule in its own mode
    model(torch.randn(8, 4)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"), preserved(model, train=True):
        assert all(m.training for m in model.modules())
        model(torch.randn(8, 4) * 5)  # moves the batch-norm statistics
        for p in model.parameters():
            p.grad = None
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == modes
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_inference_restores_modes_and_grad_mode_after_an_exception():
    model = mlp()
    with inference(model):
        assert not torch.is_grad_enabled() and not model.training
    assert torch.is_grad_enabled() and model.training
    with pytest.raises(ValueError), inference(model):
        raise ValueError
    assert torch.is_grad_enabled() and all(m.training for m in model.modules())


def test_preserved_without_buffers_leaves_them_as_changed():
    model = mlp()
    before = model[1].running_mean.clone()
    with preserved(model, train=True, buffers=False):
        model(torch.randn(8, 4) + 3)
    assert not torch.equal(model[1].running_mean, before)


# -- run / watch --------------------------------------------------------------------------


def test_run_skips_empty_batches_and_names_the_parameter():
    model = mlp()
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    assert run(model, [torch.randn(2, 4), torch.randn(0, 4), (torch.randn(3, 4), None)]) == 2
    assert calls == [2, 3] and model.training
    with pytest.raises(ValueError, match="calibration holds no"):
        run(model, [torch.randn(0, 4)], "calibration")


def test_watch_sees_inputs_and_outputs_and_removes_its_hooks():
    model = mlp()
    seen = []
    x = torch.randn(5, 4)
    with watch({"first": model[0], "last": model[3]}, lambda n, i, o: seen.append((n, i, o))):
        out = model(x)
    assert [n for n, _, _ in seen] == ["first", "last"]
    assert seen[0][1] is x and seen[1][2] is out
    model(x)
    assert len(seen) == 2


# -- input statistics ---------------------------------------------------------------------


def test_input_stats_norms_and_gram_equal_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 7, 4)  # leading dimensions are rows
    stats = input_stats(model, {"a": model[0], "b": model[2]}, [x[:1], x[1:]], gram=True)
    hidden = torch.relu(model[0](x)).detach().reshape(-1, 5)
    rows = x.reshape(-1, 4)
    assert stats["a"].sq.dtype == torch.float64  # float32 squares overflow beyond ~1.8e19
    torch.testing.assert_close(stats["a"].sq, (rows ** 2).sum(0), check_dtype=False)
    torch.testing.assert_close(stats["a"].norms(), rows.norm(dim=0))
    torch.testing.assert_close(stats["a"].gram, rows.t() @ rows)
    torch.testing.assert_close(stats["b"].gram, hidden.t() @ hidden)
    torch.testing.assert_close(stats["b"].hessian(), 2 * hidden.t() @ hidden / 21)
    assert stats["a"].rows == stats["b"].rows == 21


def test_input_stats_of_a_conv2d_are_the_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    x = torch.randn(2, 2, 5, 5)
    stats = input_stats(conv, {"conv": conv}, x, gram=True)["conv"]
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    torch.testing.assert_close(stats.sq, (cols ** 2).sum(0), check_dtype=False)
    torch.testing.assert_close(stats.gram, cols.t() @ cols)


def test_grouped_conv_squares_broadcast_per_output_and_refuse_a_gram():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(2, 4, 5, 5)
    stats = input_stats(conv, {"conv": conv}, x)["conv"]
    assert stats.sq.shape == conv.weight.flatten(1).shape
    per_channel = (x ** 2).sum((0, 2, 3))
    torch.testing.assert_close(stats.sq[0].float(), per_channel[:2].repeat_interleave(9))
    torch.testing.assert_close(stats.sq[-1].float(), per_channel[2:].repeat_interleave(9))
    with pytest.raises(ValueError, match="Gram"), record({"conv": conv}, gram=True):
        pass


@pytest.mark.parametrize("groups", [1, 2])
def test_an_unbatched_conv_input_is_one_sample(groups):
    """A convolution runs on (C, H, W); its statistics read C as the batch ("Dimension out
    of range" from unfold, so Wanda said the model could not run on its inputs)."""
    conv = nn.Conv2d(4, 6, 3, groups=groups)
    x = torch.randn(4, 5, 5)
    alone = input_stats(conv, {"conv": conv}, x)["conv"]
    batched = input_stats(conv, {"conv": conv}, x[None])["conv"]
    torch.testing.assert_close(alone.sq, batched.sq)
    assert alone.rows == batched.rows


def test_input_stats_name_layers_never_reached():
    model = mlp()
    unused = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="'unused'"):
        input_stats(model, {"used": model[0], "unused": unused}, torch.randn(3, 4))


def test_record_rejects_modules_without_a_weight():
    with pytest.raises(TypeError, match=r"layers\['relu'\]"), record({"relu": nn.ReLU()}):
        pass


def test_input_stats_add_accepts_rows_of_features():
    stats = InputStats(3, gram=True)
    x = torch.randn(2, 4, 3)
    stats.add(x)
    torch.testing.assert_close(stats.gram, x.reshape(-1, 3).t() @ x.reshape(-1, 3))
    with pytest.raises(RuntimeError, match="gram=False"):
        InputStats(3).hessian()


# -- shapes and MACs ----------------------------------------------------------------------


def test_input_shapes_and_macs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    model.train()
    x = torch.randn(2, 3, 8, 8)
    layers = {"conv": model[0], "fc": model[2], "unused": nn.Linear(2, 2)}
    assert input_shapes(model, layers, x) == {"conv": (2, 3, 8, 8), "fc": (2, 256)}
    assert macs(model, layers, x) == {"conv": 2 * 4 * 8 * 8 * 3 * 9, "fc": 2 * 256 * 5}
    assert model.training and torch.is_grad_enabled()


def test_preserved_restores_buffers_of_a_model_built_under_inference_mode():
    # the restore failed with a raw "Inplace update to inference tensor outside InferenceMode"
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = model[1].running_mean.clone()
    with preserved(model, train=True):
        with torch.inference_mode():
            model(torch.randn(8, 4))  # updates the running statistics
        assert not torch.equal(model[1].running_mean, before)
    assert torch.equal(model[1].running_mean, before)
