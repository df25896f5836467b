"""Compiled models through state_dict, sparsekit.save/load, decompile and torch.compile."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _kernels import kernels_ok
from safetensors.torch import save_file
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, compile, decompile
from sparsekit.engine.formats import CSR16, FORMATS, TorchCSR, format_from_state
from sparsekit.engine.formats import native as formats_mod
from sparsekit.models import lenet_300_100

SPARSE = ["torch_csr", *(["csr16"] if kernels_ok() else [])]


def _pruned(seed: int, sparsity: float = 0.9) -> nn.Module:
    torch.manual_seed(seed)
    model = lenet_300_100().eval()
    sparsekit.prune(model, sparsity, allocation="global")
    return model


def _mixed(seed: int) -> nn.Module:
    """A compiled LeNet with every kind of layer: fc1/fc2 sparse, fc3 dense."""
    compiled = compile(_pruned(seed), formats=SPARSE[-1])
    compiled.fc3 = CompiledLinear.from_linear(_pruned(seed).fc3, "dense")
    compiled.fc2 = CompiledLinear.from_linear(_pruned(seed).fc2, "torch_csr")
    return compiled.eval()


def _inputs() -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(1, 784), torch.randn(64, 784), torch.randn(7, 1, 28, 28)]


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    with torch.no_grad():
        for x in _inputs():
            assert torch.equal(a(x), b(x))


def test_state_dict_holds_plain_tensors_only(one_thread):
    state = _mixed(0).state_dict()
    assert all(t.layout == torch.strided for t in state.values())
    assert {k.split(".", 1)[1] for k in state if ".format." in k} == {
        f"format.{b}"
        for b in (*FORMATS[SPARSE[-1]].buffer_names, "weight", *TorchCSR.buffer_names)
    }


def test_load_state_dict_into_fresh_compiled_model_is_bit_identical(one_thread):
    saved = _mixed(0)
    fresh = compile(_pruned(seed=5, sparsity=0.5), formats="dense")  # other weights and formats
    fresh.load_state_dict(saved.state_dict())
    for name in ("fc1", "fc2", "fc3"):
        assert type(getattr(fresh, name).format) is type(getattr(saved, name).format)
    _assert_same(saved, fresh)
    _assert_same(saved, copy.deepcopy(fresh))  # the rebuilt CSR cache does not break copies


def test_save_load_round_trip_and_file_size(tmp_path, one_thread):
    dense = _pruned(0)
    compiled = compile(dense, formats=SPARSE[-1])
    path = sparsekit.save(compiled, tmp_path / "compiled.safetensors")
    save_file(dense.state_dict(), tmp_path / "dense.safetensors")
    ratio = path.stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.25, ratio
    like = compile(_pruned(seed=3, sparsity=0.5), formats="torch_csr")
    sparsekit.load(like, path)
    _assert_same(compiled, like)


def test_load_rejects_invalid_format_and_leaves_model_unchanged(tmp_path, one_thread):
    saved = _mixed(0)
    state = saved.state_dict()
    state["fc2.format.col_indices"][0] = 10_000  # out of range for 300 inputs
    with pytest.raises(RuntimeError, match="column indices"):
        _mixed(1).load_state_dict(state)
    bad = copy.deepcopy(saved)
    bad.fc2.format.col_indices[0] = 10_000
    path = sparsekit.save(bad, tmp_path / "bad.safetensors")
    target = _mixed(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="fc2.format"):
        sparsekit.load(target, path)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)


def test_format_from_state_errors_name_accepted_keys():
    with pytest.raises(ValueError, match="match no format; accepted"):
        format_from_state({"values": torch.zeros(1)}, (2, 2))
    with pytest.raises(ValueError, match="dense weight must be"):
        format_from_state({"weight": torch.zeros(3, 2)}, (2, 2))


@pytest.mark.skipif("csr16" not in SPARSE, reason="compiled kernels unavailable")
def test_csr16_runs_as_torch_csr_without_kernels(monkeypatch, one_thread):
    saved = compile(_pruned(0), formats="csr16")
    fresh = compile(_pruned(1), formats="dense")
    fresh.load_state_dict(saved.state_dict())
    assert isinstance(fresh.fc1.format, CSR16)
    monkeypatch.setattr(formats_mod.kernels, "load", lambda: None)  # e.g. no C++ compiler
    for x in _inputs():
        torch.testing.assert_close(fresh(x), saved(x), rtol=1e-5, atol=1e-5)


def test_decompile_gives_trainable_linear_layers(one_thread):
    dense = _pruned(0)
    compiled = _mixed(0)
    back = decompile(compiled)
    assert all(type(getattr(back, n)) is nn.Linear for n in ("fc1", "fc2", "fc3"))
    assert isinstance(compiled.fc1, CompiledLinear)  # the input is not modified
    assert not hasattr(back, "sparsekit_choices")
    for n in ("fc1", "fc2", "fc3"):
        assert torch.equal(getattr(back, n).weight, getattr(dense, n).weight)
        assert getattr(back, n).weight.requires_grad
    x = _inputs()[1]
    torch.testing.assert_close(back(x), dense(x))
    back(x).sum().backward()
    assert back.fc1.weight.grad is not None


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_runs(backend, one_thread):
    """Graph breaks are allowed (the CSR16 kernel is a pybind function, sparse CSR is beta);
    inductor works too on a machine with a C++ compiler but takes ~10 s, so it is not run here.
    """
    compiled = _mixed(0)
    torch._dynamo.reset()
    fast = torch.compile(compiled, backend=backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x in _inputs():
            torch.testing.assert_close(fast(x), compiled(x), rtol=0, atol=0)


def test_layers_state_their_own_expected_entries(one_thread):
    """Each engine layer answers for its own entries; checkpoint.py knows no engine type."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear
    from sparsekit.engine.sparse_linear import SparseLinear

    layer = CompiledLinear.from_linear(_pruned(0).fc1, "dense")
    saved = CompiledLinear.from_linear(_pruned(1).fc1, "torch_csr").state_dict(prefix="fc1.")
    entries = layer.expected_state(saved, "fc1.")
    assert set(entries) == set(saved)
    assert all(entries[k] is saved[k] for k in saved if k.startswith("fc1.format."))
    assert layer.expected_state({}, "fc1.") is None
    with pytest.raises(ValueError, match="fc1.format"):
        layer.expected_state({**saved, "fc1.format.values": saved["fc1.format.values"][:-1]},
                             "fc1.")
    sparse = SparseLinear.from_linear(_pruned(0).fc1)
    other = SparseLinear.from_linear(_pruned(1).fc1).state_dict()
    assert {k: v.shape for k, v in sparse.expected_state(other).items()} == {
        k: v.shape for k, v in other.items()}
    assert sparse.expected_state({"values": other["values"]}) is None
    linear = _pruned(0).fc1
    for module in (CompiledLinear.from_linear(linear, "torch_csr"),
                   ActivationSparseLinear.from_linear(linear, 0.1)):
        back = module.to_module()
        assert type(back) is nn.Linear and torch.equal(back.weight, linear.weight)


def test_dense_linear_copies_weight_and_bias():
    from sparsekit.engine.compiled_linear import dense_linear

    weight, bias = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    linear = dense_linear(weight, bias)
    assert linear.weight.dtype == torch.float64 and linear.weight.requires_grad
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)
    assert linear.weight.data_ptr() != weight.data_ptr()
    assert dense_linear(weight, None).bias is None


def test_old_engine_paths_warn_and_forward():
    from sparsekit.checkpoint import expected_state
    from sparsekit.engine import compiled_conv, persist, sparse_linear
    from sparsekit.engine.sparse_linear import SparseLinear

    with pytest.warns(DeprecationWarning, match="compiled_linear.CompiledLinear"):
        assert sparse_linear.CompiledLinear is CompiledLinear
    with pytest.warns(DeprecationWarning, match="checkpoint.expected_state"):
        assert persist.expected_state is expected_state
    with pytest.warns(DeprecationWarning):
        from sparsekit.engine.sparse_training import SparseLinear as old
    assert old is SparseLinear
    with pytest.warns(DeprecationWarning):
        from sparsekit.engine.sparse_conv import convertible
    assert convertible is compiled_conv.convertible
    with pytest.raises(AttributeError):
        sparse_linear.nothing  # noqa: B018


@pytest.mark.parametrize("damage", ["falls", "row outside its block", "short"])
def test_forged_activation_sparse_column_index_is_refused_by_load(tmp_path, damage):
    """act_sparse_gemv checks only the ends of colptr on its hot path: sparsekit.load checks
    the whole column index before loading anything (the model keeps its weights)."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    model = nn.Sequential(ActivationSparseLinear.from_linear(_pruned(0).fc1, 0.1,
                                                             kernel="act_sparse_gemv"))
    path = tmp_path / "m.safetensors"
    sparsekit.save(model, path)
    state = model.state_dict()
    forged = {k: v.clone() for k, v in state.items()}
    if damage == "falls":
        forged["0.colptr"][0, 1] = forged["0.values"].numel()
    elif damage == "row outside its block":
        forged["0.row_indices"][0] = model[0].block
    else:
        forged["0.colptr"] = forged["0.colptr"][:, :-1].contiguous()
    with pytest.raises(ValueError, match="0: .*(inconsistent column index|like the buffer)"):
        model[0].expected_state(forged, "0.")
    if damage == "short":
        return  # a file of another shape is refused by the shape check as well
    target = nn.Sequential(ActivationSparseLinear.from_linear(_pruned(0).fc1, 0.1,
                                                              kernel="act_sparse_gemv"))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    forged_model = nn.Sequential(ActivationSparseLinear.from_linear(_pruned(0).fc1, 0.1,
                                                                    kernel="act_sparse_gemv"))
    with torch.no_grad():  # load_state_dict refuses the forged index too: write it in place
        for k, v in forged_model.state_dict().items():
            v.copy_(forged[k])
    sparsekit.save(forged_model, path)
    with pytest.raises(ValueError, match="inconsistent column index|expected int32"):
        sparsekit.load(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
