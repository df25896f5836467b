"""Compressed formats, the compiled CSR16 kernels and compile()."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, compile, kernels, report
from sparsekit.engine.formats import CSR16, FORMATS, DenseFormat, TorchCSR
from sparsekit.models import lenet_300_100

SHAPES = [(1, 7), (5, 7), (33, 70), (300, 784)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def _weight(shape: tuple[int, int], sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w = w * (torch.rand(shape, generator=g) >= sparsity)
    if shape[0] > 2:
        w[1] = 0  # an empty row in every case
    return w


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> bool:
    scale = ref.abs().max().clamp_min(1.0)
    return bool((y - ref).abs().max() <= rtol * scale)


def _build(name: str, w: torch.Tensor, threads: int | None):
    if name == "csr16":
        return CSR16.from_dense(w, threads=threads)
    return FORMATS[name].from_dense(w)


def _format_cases():
    for name in ("dense", "torch_csr", "csr16"):  # any weight; block/fan-in: own test files
        marks = [needs_kernels] if name == "csr16" else []
        for threads in (1, 2) if name == "csr16" else (None,):
            yield pytest.param(name, threads, marks=marks, id=f"{name}-t{threads}")


@pytest.mark.parametrize(("name", "threads"), list(_format_cases()))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_format_matches_dense(name: str, threads: int | None, shape: tuple[int, int]) -> None:
    bias = torch.randn(shape[0])
    for sparsity in SPARSITIES:
        w = _weight(shape, sparsity)
        fmt = _build(name, w, threads)
        assert torch.equal(fmt.to_dense(), w)
        assert fmt.nnz == int(torch.count_nonzero(w))
        for batch in (1, 3, 64):
            x = torch.randn(batch, shape[1])
            assert _close(fmt.matmul(x), x @ w.T), (sparsity, batch)
            assert _close(fmt.matmul(x, bias), x @ w.T + bias), (sparsity, batch)


@pytest.mark.parametrize(("name", "threads"), list(_format_cases()))
def test_format_leading_dims(name: str, threads: int | None) -> None:
    w = _weight((9, 13), 0.7)
    fmt = _build(name, w, threads)
    x = torch.randn(2, 3, 13)
    y = fmt.matmul(x)
    assert y.shape == (2, 3, 9)
    assert _close(y, x @ w.T)


@needs_kernels
def test_csr16_index_width() -> None:
    narrow = CSR16.from_dense(_weight((3, 40000), 0.99))
    assert narrow.col_indices.dtype == torch.int16  # read as uint16 beyond 32767
    w = _weight((2, 70000), 0.999)
    wide = CSR16.from_dense(w)
    assert wide.col_indices.dtype == torch.int32
    x = torch.randn(1, 70000)
    assert _close(wide.matmul(x), x @ w.T)
    x = torch.randn(1, 40000)
    assert _close(narrow.matmul(x), x @ narrow.to_dense().T)


def test_formats_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        DenseFormat.from_dense(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="mask has shape"):
        TorchCSR.from_dense(torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="threads"):
        CSR16.from_dense(torch.zeros(2, 3), threads=0)


def test_torch_csr_survives_deepcopy_and_state_dict() -> None:
    w = _weight((6, 5), 0.5)
    layer = CompiledLinear(TorchCSR.from_dense(w), torch.zeros(6))
    layer(torch.randn(1, 5))  # builds the cached sparse tensor
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.to_dense(), w)
    fresh = CompiledLinear(TorchCSR.from_dense(torch.zeros(6, 5) + w), torch.ones(6))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.to_linear().weight, w)


def _pruned_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = lenet_300_100()
    sparsekit.prune(model, 0.9)
    return model.eval()


def test_compile_matches_masked_model() -> None:
    model = _pruned_mlp()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 784)
    compiled = compile(model, x, rows=(1, 64), threads=2)
    for batch in (1, 3, 64):
        xb = torch.randn(batch, 784)
        with torch.no_grad():
            assert _close(compiled(xb), model(xb))
    # the input model is untouched
    assert all(type(m) is not CompiledLinear for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # every layer is compiled, choices and report agree
    names = [n for n, m in compiled.named_modules() if isinstance(m, CompiledLinear)]
    assert names == ["fc1", "fc2", "fc3"] == list(compiled.sparsekit_choices)
    for n in names:
        c = compiled.sparsekit_choices[n]
        assert c["format"] == compiled.get_submodule(n).format.name
        assert c["ms_chosen"] <= c["ms_dense"]
        assert torch.equal(compiled.get_submodule(n).to_dense(), model.get_submodule(n).weight)
    rep = report(compiled, x)
    assert [r.name for r in rep.rows] == names
    assert rep.totals["nonzeros"] == sparsekit.report(model).totals["nonzeros"]
    assert {"format", "ms dense", "ms sparse", "speedup"} <= set(rep.rows[0].extra)
    assert "speedup" in rep.to_markdown()


def test_compile_dense_model_and_restriction() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = compile(model, torch.randn(2, 8), formats=["torch_csr"])
    for n, c in compiled.sparsekit_choices.items():
        assert c["format"] in ("dense", "torch_csr")
        assert set(c["times_ms"]) == {"dense", "torch_csr"}, n
    compiled = compile(model, formats="dense")
    assert all(c["format"] == "dense" for c in compiled.sparsekit_choices.values())


def test_compile_shared_layer_compiled_once() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    compiled = compile(model, torch.randn(1, 4))
    assert compiled[0] is compiled[2] and isinstance(compiled[0], CompiledLinear)
    assert list(compiled.sparsekit_choices) == ["0"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"formats": ["csr32"]}, "formats must be 'auto' or names from"),
        ({"formats": []}, "formats must be"),
        ({"rows": (0,)}, "rows"),
        ({"threads": 0}, "threads"),
    ],
)
def test_compile_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compile(nn.Linear(3, 3), **kwargs)


def test_compile_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_reason", "disabled by test")
    monkeypatch.setattr(kernels, "_tried", True)
    model = _pruned_mlp()
    x = torch.randn(4, 784)
    compiled = compile(model, x, rows=(1, 8))
    for c in compiled.sparsekit_choices.values():
        assert "csr16" not in c["times_ms"]
    with torch.no_grad():
        assert _close(compiled(x), model(x))


def test_kernels_env_switch_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEKIT_NO_KERNELS", "1")
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_reason", None)
    monkeypatch.setattr(kernels, "_tried", False)
    with pytest.warns(RuntimeWarning, match="SPARSEKIT_NO_KERNELS") as record:
        assert kernels.load() is None
        assert not kernels.available()
    assert len(record) == 1
    assert kernels.unavailable_reason() == "SPARSEKIT_NO_KERNELS is set"
    assert not CSR16.supports(torch.zeros(2, 2))


def test_compiled_linear_module() -> None:
    linear = nn.Linear(13, 9)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(9, 13) > 0.6)
    layer = CompiledLinear.from_linear(linear, "torch_csr")
    x = torch.randn(2, 3, 13)
    with torch.no_grad():
        assert _close(layer(x), linear(x))
    assert "format='torch_csr'" in repr(layer)
    back = layer.to_linear()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    with pytest.raises(ValueError, match="format must be one of"):
        CompiledLinear.from_linear(linear, "no_such_format")


def test_compiled_linear_hot_path_follows_to_load_and_assignment() -> None:
    linear = nn.Linear(6, 4)
    layer = CompiledLinear.from_linear(linear, "dense")
    layer.to(torch.float64)
    x = torch.randn(2, 6, dtype=torch.float64)
    ref = x @ linear.weight.double().T + linear.bias.double()
    torch.testing.assert_close(layer(x), ref)
    layer.bias = torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ linear.weight.double().T)
    other = CompiledLinear.from_linear(nn.Linear(6, 4).double(), "torch_csr")
    layer.load_state_dict(other.state_dict())
    assert layer.format.name == "torch_csr"
    torch.testing.assert_close(layer(x), other(x))
    with pytest.raises(ValueError, match="bias must have shape"):
        CompiledLinear(layer.format, torch.zeros(3))


def test_report_lists_activation_sparse_layers() -> None:
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    linear = nn.Linear(8, 5)
    with torch.no_grad():
        linear.weight[:, :3] = 0
    model = nn.Sequential(ActivationSparseLinear.from_linear(linear, 0.1), nn.ReLU())
    (row,) = report(model, torch.randn(4, 8)).rows
    got = (row.name, row.kind, row.shape, row.params, row.nonzeros)
    assert got == ("0", "Linear", (5, 8), 40, 25)
    assert row.extra == {"format": "activation", "values": "float32"}
    assert row.dense_flops == 2 * 4 * 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_compile_other_dtypes_uses_the_formats_that_support_them(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype).eval()
    sparsekit.prune(model, 0.8)
    x = torch.randn(5, 64, dtype=dtype)
    compiled = compile(model, x, rows=(1, 5))
    for choice in compiled.sparsekit_choices.values():
        assert all(FORMATS[n].supports(torch.zeros(1, 1, dtype=dtype)) for n in choice["times_ms"])
    assert ("torch_csr" in compiled.sparsekit_choices["0"]["times_ms"]) == (dtype == torch.float64)
    with torch.no_grad():
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-10
        torch.testing.assert_close(compiled(x), model(x), rtol=tol, atol=tol)


def test_derived_tensor_is_kept_until_the_buffers_move() -> None:
    fmt = TorchCSR.from_dense(_weight((6, 5), 0.5))
    csr = fmt.csr()
    assert fmt.csr() is csr
    fmt.to(torch.float64)
    moved = fmt.csr()
    assert moved is not csr and moved.dtype == torch.float64
    assert "_derived" not in copy.deepcopy(fmt).__dict__  # sparse tensors are not copied


def test_formats_registry_carries_metadata() -> None:
    from sparsekit.registry import Registry

    assert isinstance(FORMATS, Registry)
    assert FORMATS.meta("csr16") == {
        "dtypes": (torch.float32, torch.bfloat16), "device": "cpu", "threaded": True
    }
    assert FORMATS.meta("bsr") == {
        "dtypes": (torch.float32, torch.bfloat16), "device": "cpu", "threaded": True
    }
    assert FORMATS.meta("dense") == {"dtypes": None, "device": None, "threaded": False}
    assert FORMATS["dense"] is DenseFormat and DenseFormat in FORMATS.values()
    with pytest.raises(ValueError, match="unknown format 'csr32'"):
        FORMATS.meta("csr32")


def test_kernel_ops_have_fake_implementations() -> None:
    """torch.compile/export see the ops' output shapes without running them."""
    if not kernels.available():
        pytest.skip(f"compiled kernels unavailable: {kernels.unavailable_reason()}")
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    w = torch.randn(6, 40)
    w[:, 1::2] = 0  # 2:4, so every format holds it
    formats = [FORMATS[n].from_dense(w) for n in ("csr16", "bitmap", "nm", "bsr", "fanin")]
    with FakeTensorMode(allow_non_fake_inputs=True):
        for fmt in formats:
            out = fmt._kernel(torch.empty(5, 40), None, 1)
            assert out.shape == (5, 6) and out.dtype == torch.float32
        wt = torch.empty(40, 6, dtype=torch.bfloat16)
        y = torch.ops.sparsekit.act_gemv(wt, wt.new_empty(40), wt.new_empty(40), None, 1)
        assert y.shape == (6,) and y.dtype == torch.bfloat16
    layer = CompiledLinear(FORMATS["csr16"].from_dense(w, threads=1), torch.randn(6))
    x = torch.randn(5, 40)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_compile_takes_any_input_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile() depends on the InputThresholds interface, not on the activation package."""
    from sparsekit.engine import autotune
    from sparsekit.engine.activation_linear import ActivationSparseLinear

    def clock(module: nn.Module, x: torch.Tensor, reps: int) -> float:
        # compile keeps an activation-sparse layer only where it is faster
        return 1e-4 if isinstance(module, ActivationSparseLinear) else 2e-4

    monkeypatch.setattr(autotune, "_time_block", clock)

    class Thresholds:
        thresholds = {"0": torch.full((8,), 0.5)}
        applied: list[nn.Module] = []

        def apply(self, model: nn.Module) -> None:
            self.applied.append(model)

        def remove(self) -> None:
            self.applied.pop()

    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = compile(model, activation_sparsity=Thresholds(), cache=False)
    assert isinstance(compiled[0], ActivationSparseLinear)
    assert not isinstance(compiled[2], ActivationSparseLinear)


def test_engine_report_moved_out_of_compile() -> None:
    import importlib

    from sparsekit.engine import report as engine_report

    module = importlib.import_module("sparsekit.engine.compile")
    with pytest.warns(DeprecationWarning, match="sparsekit.engine.report.report"):
        assert module.report is engine_report


def _two_formats(seed: int = 0, split: int = 4) -> tuple[CompiledLinear, nn.Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(8, 16) > 0.7)
    weight = linear.weight.detach()
    layer = CompiledLinear(TorchCSR.from_dense(weight), linear.bias,
                           format_large=DenseFormat.from_dense(weight), split=split)
    return layer, linear


def test_a_compiled_linear_of_two_formats_serves_each_row_range(monkeypatch) -> None:
    layer, linear = _two_formats()
    assert "format_large='dense', split=4" in repr(layer)
    used = []
    for fmt in (layer.format, layer.format_large):  # the products the layer calls
        product = fmt.trusted_matmul()
        monkeypatch.setattr(fmt, "trusted_matmul", lambda f=product, n=fmt.name: (
            lambda x, b: (used.append(n), f(x, b))[1]))
    layer._cache()
    with torch.no_grad():
        for shape, name in [((1, 16), "torch_csr"), ((2, 2, 16), "torch_csr"),
                            ((5, 16), "dense"), ((2, 3, 16), "dense")]:
            x = torch.randn(shape)
            assert _close(layer(x), linear(x)) and used.pop() == name
    assert torch.equal(layer.to_linear().weight, linear.weight)
    assert CompiledLinear.from_linear(linear, "dense").format_large is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": 3}, ValueError, "format_large and split go together"),
        ({"format_large": "dense", "split": 3}, TypeError, "format_large must be a sparsekit"),
        ({"format_large": DenseFormat.from_dense(torch.zeros(3, 16)), "split": 3}, ValueError,
         "format_large must hold a 8x16 weight, got 3x16"),
        ({"format_large": DenseFormat.from_dense(torch.zeros(8, 16)), "split": 0}, ValueError,
         "split must be an int ≥ 1, got 0"),
    ],
)
def test_a_second_format_is_checked(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CompiledLinear(DenseFormat.from_dense(torch.zeros(8, 16)), **kwargs)


def test_two_formats_persist_bit_identically(tmp_path) -> None:
    saved, _ = _two_formats(seed=0)
    model = nn.Sequential(saved)
    state = model.state_dict()
    assert state["0.split_rows"].item() == 4 and "0.format_large.weight" in state
    fresh = nn.Sequential(CompiledLinear.from_linear(_two_formats(seed=1)[1], "torch_csr"))
    assert set(fresh[0].expected_state(state, "0.")) == {f"0.{k}" for k in saved.state_dict()}
    path = sparsekit.save(model, tmp_path / "two.safetensors")
    sparsekit.load(fresh, path)
    assert (fresh[0].format_large.name, fresh[0].split) == ("dense", 4)
    with torch.no_grad():
        for rows in (1, 4, 5, 33):
            x = torch.randn(rows, 16)
            assert torch.equal(fresh(x), model(x))
    one = CompiledLinear.from_linear(_two_formats(seed=2)[1], "dense")
    fresh[0].load_state_dict(one.state_dict())  # back to one format
    assert fresh[0].format_large is None and fresh[0].split is None
    assert "split_rows" not in fresh[0].state_dict()
    back = sparsekit.engine.decompile(model)
    assert type(back[0]) is nn.Linear and torch.equal(back[0].weight, saved.to_dense())


def test_a_bad_second_format_in_a_state_is_refused() -> None:
    saved, _ = _two_formats()
    state = saved.state_dict()
    layer = CompiledLinear.from_linear(_two_formats(seed=1)[1], "dense")
    for bad, match in [({"split_rows": torch.tensor(0)}, "split_rows must be a 0-d int64"),
                       ({"split_rows": torch.tensor([4])}, "split_rows must be a 0-d int64"),
                       ({"format_large.weight": torch.zeros(3, 3)}, "format_large.*")]:
        with pytest.raises(ValueError, match=match):
            layer.expected_state({**state, **bad})
        with pytest.raises(RuntimeError, match=match):
            layer.load_state_dict({**state, **bad})
    without = {k: v for k, v in state.items() if k != "split_rows"}
    with pytest.raises(ValueError, match="split_rows must be"):
        layer.expected_state(without)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_killed_builds_lock_is_removed_once_no_build_holds_the_claim(tmp_path):
    """A killed build leaves torch's ``lock`` file behind and every later import would wait
    for it forever; a live build holds the OS claim, so whoever gets the claim removes the
    leftover (with a warning) — however young it is — and the claim is free again after."""
    import fcntl

    from sparsekit.engine.kernels import _build_claim

    lock = tmp_path / "lock"
    lock.touch()  # as a build killed a second ago leaves it
    with pytest.warns(RuntimeWarning, match="stale kernel build lock"), _build_claim(tmp_path):
        assert not lock.exists()
    with open(tmp_path / "build.claim", "a+b") as other:  # released: free for the next build
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _build_claim(tmp_path):  # nothing left over: nothing to say
            pass


@pytest.mark.parametrize("name", ["csr16", "bitmap"])
def test_fallback_dense_weight_follows_a_load_state_dict(name: str) -> None:
    # load_state_dict copies into the same buffers (same addresses): the fallback's cached
    # dense weight used to keep serving the weight from before the load
    first = FORMATS.get(name).from_dense(_weight((6, 8), 0.5))
    second = FORMATS.get(name).from_dense(_weight((6, 8), 0.5) * 3)
    x = torch.randn(2, 8)
    torch.testing.assert_close(first._fallback_mm(x, None), x @ first.to_dense().T)
    first.load_state_dict(second.state_dict())
    torch.testing.assert_close(first._fallback_mm(x, None), x @ second.to_dense().T)


@needs_kernels
@pytest.mark.parametrize("fmt", ["csr16", "bitmap"])
def test_a_backward_through_a_kernel_raises_instead_of_dropping_the_gradient(fmt: str) -> None:
    # the ops have no backward: torch used to warn and leave x.grad None (silently wrong)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    sparsekit.prune(model, 0.7, targets=[nn.Linear])
    compiled = compile(model, formats=fmt, cache=False)
    x = torch.randn(3, 16, requires_grad=True)
    y = compiled(x)  # the forward runs, also where the LayerNorm's parameters require grad
    with torch.no_grad():
        torch.testing.assert_close(y, model(x))
    with pytest.raises(ValueError, match=f"the {fmt} kernel has no backward"):
        y.sum().backward()
    assert x.grad is None
    with torch.no_grad():  # inference: no autograd record at all
        assert not compiled(x).requires_grad
