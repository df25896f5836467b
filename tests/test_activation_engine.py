"""The activation-sparse engine: act_sparse_gemv (weight-sparse × activation-sparse), the
multi-row (prefill) path of ActivationSparseLinear and how compile builds it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit.engine import activation_linear, autotune, decisions, kernels
from sparsekit.engine.activation_linear import (
    BLOCK,
    ActivationSparseLinear,
    sparsify_input,
)
from sparsekit.engine.compiled_linear import CompiledLinear

KERNELS = tuple(k for k in activation_linear.KERNELS if k != "act_bitmap_qgemv")
"""The kernels of float inputs; the W8A8 one, act_bitmap_qgemv: test_activation_w8a8.py."""

pytestmark = pytest.mark.usefixtures("one_thread")



def _pruned(out: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    """A 50 %-pruned linear layer with an empty column and a fully kept one."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(cols, out)
    with torch.no_grad():
        linear.weight[torch.rand(out, cols, generator=g) < 0.5] = 0
        linear.weight[:, 0] = 0
        linear.weight[:, -1] = torch.randn(out, generator=g)
    return linear.to(dtype)


def _reference(linear: nn.Linear, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Sparsify in x's dtype, then the masked dense product in float32."""
    kept = sparsify_input(x, threshold.to(x.dtype)).float()
    return F.linear(kept, linear.weight.float(), linear.bias.float())


_SHAPES = [(1, 1), (7, 3), (70, 300), (BLOCK + 1, 33), (2 * BLOCK + 77, 257)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", _SHAPES, ids=str)
@pytest.mark.parametrize("keep", ["none", "some", "all"])
def test_act_sparse_gemv_equals_the_masked_dense_product(dtype, threads, shape, keep):
    out, cols = shape
    linear = _pruned(out, cols, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cols, generator=g).to(dtype)
    threshold = {"none": torch.full((cols,), float("inf")), "all": torch.zeros(cols),
                 "some": torch.rand(cols, generator=g)}[keep]
    layer = ActivationSparseLinear.from_linear(linear, threshold, threads=threads,
                                               kernel="act_sparse_gemv")
    y = layer(x)
    assert y.dtype == dtype and y.shape == (out,)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(y.float(), _reference(linear, x, threshold), **tol)
    if keep == "none":  # only the bias is left
        torch.testing.assert_close(y, linear.bias.detach())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_count_equals_the_reference(kernel, use_kernel, dtype, monkeypatch):
    if not use_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    linear = _pruned(BLOCK + 9, 40, dtype)
    threshold = torch.rand(40, generator=torch.Generator().manual_seed(2))
    prefill = CompiledLinear.from_linear(linear, "dense")
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    for with_prefill in (False, True):
        layer = ActivationSparseLinear.from_linear(
            linear, threshold, kernel=kernel, prefill=prefill if with_prefill else None
        )
        for shape in [(40,), (1, 40), (3, 40), (2, 5, 40)]:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
            y = layer(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], BLOCK + 9)
            torch.testing.assert_close(y.float(), _reference(linear, x, threshold), **tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("use_kernel", [pytest.param(True, marks=needs_kernels), False])
def test_a_nan_input_reaches_the_outputs_as_in_the_dense_product(kernel, use_kernel,
                                                                monkeypatch):
    # The one-row kernels kept an input where |x| >= threshold, which NaN is not: they
    # dropped it and gave finite outputs where the thresholded dense product (and the
    # torch path) gives NaN, hiding a model that went NaN.
    if not use_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    linear = _pruned(BLOCK + 9, 40)
    threshold = torch.full((40,), 0.5)
    layer = ActivationSparseLinear.from_linear(linear, threshold, kernel=kernel)
    x = torch.randn(40, generator=torch.Generator().manual_seed(3))
    x[-1] = float("nan")  # the fully kept column: every output reads it
    y = layer(x)
    assert bool(y.isnan().all())
    x[-1] = float("inf")
    assert torch.equal(layer(x).isinf() | layer(x).isnan(),
                       _reference(linear, x[None], threshold)[0].isinf()
                       | _reference(linear, x[None], threshold)[0].isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_storage_round_trips_the_weight(dtype):
    linear = _pruned(2 * BLOCK + 3, 17, dtype)
    layer = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_sparse_gemv")
    assert layer.values.numel() == int(linear.weight.count_nonzero())
    assert layer.row_indices.dtype == torch.int16 and layer.colptr.shape == (3, 18)
    assert not hasattr(layer, "weight_t")  # one copy of the weight, the kept values only
    assert torch.equal(layer.to_dense(), linear.weight)
    back = layer.to_module()
    assert type(back) is nn.Linear and torch.equal(back.weight, linear.weight)


def test_rows_beyond_int16_read_back_as_uint16(monkeypatch):
    import sparsekit.engine.activation_linear as module

    monkeypatch.setattr(module, "BLOCK", 40000)  # rows up to 39999 do not fit in int16
    linear = _pruned(40001, 2)
    layer = ActivationSparseLinear.from_linear(linear, 0.0, kernel="act_sparse_gemv")
    assert int(layer.row_indices.min()) < 0
    assert torch.equal(layer.to_dense(), linear.weight)
    x = torch.randn(2)
    torch.testing.assert_close(layer(x), _reference(linear, x, torch.zeros(2)))


def test_bad_constructor_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="kernel must be one of"):
        ActivationSparseLinear(torch.randn(4, 8), None, 0.1, kernel="csr")
    with pytest.raises(TypeError, match="prefill must be an nn.Module"):
        ActivationSparseLinear(torch.randn(4, 8), None, 0.1, prefill="dense")


def _op_args(dtype: torch.dtype = torch.float32) -> dict[str, object]:
    layer = ActivationSparseLinear.from_linear(_pruned(70, 30, dtype), 0.1,
                                               kernel="act_sparse_gemv")
    return {"values": layer.values, "rows": layer.row_indices, "colptr": layer.colptr,
            "x": torch.randn(30).to(dtype), "threshold": layer.threshold, "bias": layer.bias,
            "out_features": 70, "block": BLOCK, "threads": 1}


@needs_kernels
def test_act_sparse_gemv_rejects_hostile_arguments():
    args = _op_args()
    torch.ops.sparsekit.act_sparse_gemv(**args)  # the good call runs
    v, r, c, x = args["values"], args["rows"], args["colptr"], args["x"]
    cases = [
        ({"values": v.double()}, "values"), ({"values": v[:-1]}, "rows"),
        ({"values": torch.stack([v, v])}, "values"), ({"rows": r.int()}, "rows"),
        ({"rows": r[:-1]}, "rows"), ({"colptr": c.long()}, "colptr"),
        ({"colptr": c[:, :-1]}, "colptr"), ({"colptr": torch.cat([c, c])}, "colptr"),
        ({"colptr": c + 1}, "colptr"),
        ({"colptr": torch.zeros(1, 62, dtype=torch.int32)[:, ::2]}, "colptr"),
        ({"x": x[:-1]}, "threshold"), ({"x": x.bfloat16()}, "x"),
        ({"x": torch.randn(60)[::2]}, "x"), ({"threshold": args["threshold"][:-1]}, "threshold"),
        ({"threshold": args["threshold"].double()}, "threshold"),
        ({"bias": torch.randn(71)}, "bias"), ({"bias": args["bias"].bfloat16()}, "bias"),
        ({"out_features": -1}, "out_features"), ({"out_features": 2 * BLOCK}, "colptr"),
        ({"block": 0}, "block"), ({"block": 70000}, "block"), ({"threads": 0}, "threads"),
    ]
    for case, name in cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparsekit.act_sparse_gemv(**(args | case))


def _fake_clock(fast: str):
    """Stands in for ``autotune._time_block``: the ``fast`` kernel (or format) takes half the
    time of everything else."""
    def clock(module, x, reps):
        name = getattr(module, "kernel", None) or module.format.name
        return 1e-4 if name == fast else 2e-4
    return clock


@needs_kernels
@pytest.mark.parametrize("fast", KERNELS)
def test_tuned_takes_the_faster_kernel_with_its_evidence(fast, monkeypatch):
    monkeypatch.setattr(autotune, "_time_block", _fake_clock(fast))
    linear = _pruned(70, 30)
    layer, choice = ActivationSparseLinear.tuned(linear, 0.1)
    assert layer.kernel == fast and choice["format"] == fast
    assert choice["evidence"][1]["rounds"] >= 5
    dense, none = ActivationSparseLinear.tuned(nn.Linear(30, 70), 0.1)  # nothing pruned
    assert dense.kernel == "act_gemv" and none is None


@pytest.mark.parametrize("lean_is_slower", [True, False])
def test_tuned_keeps_a_second_dense_copy_only_where_it_is_faster(lean_is_slower, monkeypatch):
    def clock(module, x, reps):  # the transposed copy alone, on several rows
        lean = getattr(module, "prefill", 1) is None and x.shape[0] > 1
        return 2e-4 if lean and lean_is_slower else 1e-4
    monkeypatch.setattr(autotune, "_time_block", clock)
    linear = nn.Linear(30, 70)
    prefill = CompiledLinear.from_linear(linear, "dense")
    layer, choice = ActivationSparseLinear.tuned(linear, 0.1, prefill=prefill, rows=[1, 8])
    assert layer.kernel == "act_gemv" and choice["single_copy"] is not lean_is_slower
    assert layer.prefill is (prefill if lean_is_slower else None)
    x = torch.randn(8, 30)
    torch.testing.assert_close(layer(x), F.linear(sparsify_input(x, torch.tensor(0.1)),
                                                  linear.weight, linear.bias))


@needs_kernels
@pytest.mark.parametrize("fast", [*KERNELS, "act_gemv lean", None])
def test_decided_builds_what_tuned_chose(fast, monkeypatch):
    lean = fast == "act_gemv lean"  # the transposed copy alone serves the prompt rows too

    def clock(module, x, reps):
        if x.shape[0] > 1:  # prompt rows: the copy without the dense prefill is as fast or not
            return 1e-4 if getattr(module, "prefill", 1) is None and lean else 2e-4
        return 1e-4 if getattr(module, "kernel", None) == fast else 2e-4
    monkeypatch.setattr(autotune, "_time_block", clock)
    linear = _pruned(70, 30) if fast is not None else nn.Linear(30, 70)  # None: nothing timed
    prefill = CompiledLinear.from_linear(linear, "dense")
    layer, choice = ActivationSparseLinear.tuned(linear, 0.1, prefill=prefill,
                                                 rows=[1] if fast is None else [1, 8])
    again = ActivationSparseLinear.decided(linear, 0.1, choice, prefill=prefill)
    assert again.kernel == layer.kernel and again.prefill is layer.prefill
    assert (choice is None) == (fast is None)
    x = torch.randn(8, 30)
    torch.testing.assert_close(again(x), layer(x))
    torch.testing.assert_close(again(x[:1]), layer(x[:1]))
    with pytest.raises(TypeError, match="choice must be None or the record tuned"):
        ActivationSparseLinear.decided(linear, 0.1, "act_gemv")


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 24))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[torch.rand(layer.weight.shape) < 0.5] = 0
    return model.to(dtype).eval()


class _Thresholds:
    """The InputThresholds protocol for fixed thresholds (as hooks that sparsify inputs)."""

    def __init__(self, thresholds: dict[str, torch.Tensor]) -> None:
        self.thresholds, self._hooks = thresholds, []

    def apply(self, model: nn.Module) -> None:
        for name, t in self.thresholds.items():
            hook = model.get_submodule(name).register_forward_pre_hook(
                lambda m, args, t=t: (sparsify_input(args[0], t),))
            self._hooks.append(hook)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", KERNELS)
def test_compile_builds_activation_layers_of_the_model_dtype(dtype, fast, monkeypatch):
    monkeypatch.setattr(autotune, "_time_block", _fake_clock(fast))
    model = _mlp(dtype)
    act = _Thresholds({"0": torch.full((24,), 0.5), "2": torch.full((64,), 0.1)})
    prompt = torch.randn(6, 24).to(dtype)
    compiled = sparsekit.compile(model, prompt, activation_sparsity=act, cache=False)
    for name in act.thresholds:
        layer = compiled.get_submodule(name)
        assert isinstance(layer, ActivationSparseLinear) and layer.kernel == fast
        assert layer.threshold.dtype == dtype
        choice = compiled.sparsekit_choices[name]
        assert choice["rows"] == [1, 6] and choice["decode"]["format"] == fast
        assert choice["activation"]["chosen"]
        if fast == "act_gemv":  # the transposed copy was as fast: no second dense copy
            assert layer.prefill is None and choice["decode"]["single_copy"]
        else:
            assert isinstance(layer.prefill, CompiledLinear)
    act.apply(model)
    try:
        with torch.no_grad():
            for x in (prompt, prompt[:1]):  # prefill rows, then one decode row
                torch.testing.assert_close(compiled(x).float(), model(x).float(),
                                           rtol=2e-2, atol=2e-2)
    finally:
        act.remove()


@needs_kernels
@pytest.mark.parametrize("kernel", activation_linear.KERNELS)
def test_one_row_traces_whole_with_every_kernel(kernel):
    layer = ActivationSparseLinear.from_linear(
        _pruned(70, 30), 0.1, kernel=kernel, threads=1,
        value_dtype=torch.int8 if kernel == "act_bitmap_qgemv" else None)
    x = torch.randn(1, 30)
    program = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert f"sparsekit.{kernel}.default" in targets, targets
    torch.testing.assert_close(program.module()(x), layer(x))
    traced = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), layer(x))


@needs_kernels
def test_prompt_rows_trace_whole_with_the_threshold_kernel():
    layer = ActivationSparseLinear.from_linear(_pruned(70, 30), 0.1, threads=1)
    x = torch.randn(4, 30)
    program = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "sparsekit.act_threshold.default" in targets, targets
    torch.testing.assert_close(program.module()(x), layer(x))
    traced = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), layer(x))


def test_decode_timings_run_on_a_typical_row_not_an_outlier_first_token(monkeypatch):
    """compile times the single-row kernels on the observed row that keeps the median
    number of inputs; the first row of a prompt can be an attention sink that keeps all."""
    kept_seen: list[float] = []

    def clock(module, x, reps):
        if isinstance(module, ActivationSparseLinear) and x.shape[0] == 1:
            kept_seen.append(float((x.abs() >= module.threshold).float().mean()))
        return 1e-4

    monkeypatch.setattr(autotune, "_time_block", clock)
    prompt = torch.randn(9, 24, generator=torch.Generator().manual_seed(3))
    prompt[0] = 10.0  # every input of the first row passes the threshold
    act = _Thresholds({"0": torch.full((24,), 0.7)})
    sparsekit.compile(_mlp(torch.float32), prompt, activation_sparsity=act, cache=False)
    typical = sorted(float((row.abs() >= 0.7).float().mean()) for row in prompt)[4]
    assert kept_seen and set(kept_seen) == {typical}


def _clock(act_ms: dict[str, float]):
    """Stands in for ``autotune._time_block``: an activation-sparse layer takes
    ``act_ms["one"]`` at one row and ``act_ms["many"]`` at more, everything else 0.2 ms."""
    def clock(module, x, reps):
        if isinstance(module, ActivationSparseLinear):
            return act_ms["one" if x.shape[0] == 1 else "many"] * 1e-3
        return 2e-4
    return clock


@needs_kernels
@pytest.mark.parametrize("case", ["slower_decode", "slower_prefill"])
def test_compile_keeps_the_weight_only_format_where_activation_sparsity_loses(case,
                                                                             monkeypatch):
    act_ms = {"slower_decode": {"one": 0.3, "many": 0.1},
              "slower_prefill": {"one": 0.1, "many": 0.3}}[case]
    monkeypatch.setattr(autotune, "_time_block", _clock(act_ms))
    model = _mlp(torch.float32)
    act = _Thresholds({"0": torch.full((24,), 0.5), "2": torch.full((64,), 0.1)})
    prompt = torch.randn(6, 24)
    compiled = sparsekit.compile(model, prompt, activation_sparsity=act, cache=False)
    for name in act.thresholds:
        assert isinstance(compiled.get_submodule(name), CompiledLinear)
        record = compiled.sparsekit_choices[name]["activation"]
        assert record["chosen"] is False and record["prefill_floor"] == 0.95
        assert record["decode"]["reference"] == "weight_only"
        speed = record["prefill_speed"][6]
        assert speed == pytest.approx(2 / 3 if case == "slower_prefill" else 2)
    with torch.no_grad():  # no thresholds are applied: the model's own outputs
        torch.testing.assert_close(compiled(prompt), model(prompt), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_stalled_prompt_rounds_do_not_refuse_activation_sparsity(monkeypatch):
    # One round in three of the activation-sparse prompt path stalls (a loaded machine); in
    # the others it runs as fast as the weight-only format, so it is taken: the median of
    # its times (0.33 ms against 0.2 ms) would refuse it, the median of per-round ratios not.
    calls = []

    def clock(module, x, reps):
        if not isinstance(module, ActivationSparseLinear):
            return 2e-4
        if x.shape[0] == 1:
            return 1e-4
        calls.append(1)
        return 6e-4 if len(calls) % 3 == 0 else 2e-4

    monkeypatch.setattr(autotune, "_time_block", clock)
    model = _mlp(torch.float32)
    act = _Thresholds({"0": torch.full((24,), 0.5), "2": torch.full((64,), 0.1)})
    compiled = sparsekit.compile(model, torch.randn(6, 24), activation_sparsity=act,
                                 cache=False)
    for name in act.thresholds:
        assert isinstance(compiled.get_submodule(name), ActivationSparseLinear)
        record = compiled.sparsekit_choices[name]["activation"]
        assert record["chosen"] and record["prefill_speed"][6] == pytest.approx(1.0)


@needs_kernels
def test_prompt_rounds_are_compared_in_pairs_not_by_their_fastest(monkeypatch):
    # Within each round the prompt path costs 2 % more than the weight-only format (its
    # thresholding), so it is taken; in one round the weight-only format ran while the
    # machine was briefly quiet (0.15 ms). Its fastest round against the other's (0.15 /
    # 0.204 = 0.74) would refuse the layer: a lucky round decided it.
    prompt = {"started": False, "weight_only_rounds": 0}

    def clock(module, x, reps):
        if isinstance(module, ActivationSparseLinear):
            prompt["started"] |= x.shape[0] > 1
            return 1e-4 if x.shape[0] == 1 else 2.04e-4
        if x.shape[0] > 1 and prompt["started"]:
            prompt["weight_only_rounds"] += 1
            return 1.5e-4 if prompt["weight_only_rounds"] == 2 else 2e-4
        return 2e-4

    monkeypatch.setattr(autotune, "_time_block", clock)
    act = _Thresholds({"0": torch.full((24,), 0.5)})
    compiled = sparsekit.compile(_mlp(torch.float32), torch.randn(6, 24),
                                 activation_sparsity=act, cache=False)
    assert prompt["weight_only_rounds"] > 2  # the quiet round was among those compared
    assert isinstance(compiled.get_submodule("0"), ActivationSparseLinear)
    record = compiled.sparsekit_choices["0"]["activation"]
    assert record["chosen"] and record["prefill_speed"][6] == pytest.approx(2 / 2.04)


@needs_kernels
def test_activation_sparsity_is_timed_on_inputs_written_just_before(monkeypatch):
    # Both sides of the comparison read a copy of the timing input made just before each
    # call, as a layer inside a network reads what the op before it wrote; timed on one
    # input again and again, the weight-only GEMM read clean cached lines and won.
    fresh: dict[str, list[bool]] = {"activation": [], "weight_only": []}

    def clock(module, x, reps):
        got = []
        handle = module.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
        module(x)
        handle.remove()
        side = "activation" if isinstance(module, ActivationSparseLinear) else "weight_only"
        fresh[side].append(got[0] is not x and torch.equal(got[0], x))
        return (1e-4 if side == "activation" else 2e-4) if x.shape[0] == 1 else 2e-4

    monkeypatch.setattr(autotune, "_time_block", clock)
    model = _mlp(torch.float32)
    act = _Thresholds({"2": torch.full((64,), 0.1)})  # the last layer: the last timings
    compiled = sparsekit.compile(model, torch.randn(6, 24), activation_sparsity=act,
                                 cache=False)
    assert isinstance(compiled.get_submodule("2"), ActivationSparseLinear)
    assert fresh["activation"][-1] and fresh["weight_only"][-1]
    # the format and kernel choices before it time their input as it is
    assert not all(fresh["weight_only"]) and not all(fresh["activation"])


def _count_tuned(monkeypatch) -> list[int]:
    """The list into which each ``ActivationSparseLinear.tuned`` call (each timing of an
    activation-sparse decision) appends its layer's ``in_features``."""
    tuned = []
    original = ActivationSparseLinear.tuned.__func__

    def counted(cls, linear, *args, **kwargs):  # type: ignore[no-untyped-def]
        tuned.append(linear.in_features)
        return original(cls, linear, *args, **kwargs)
    monkeypatch.setattr(ActivationSparseLinear, "tuned", classmethod(counted))
    return tuned


@needs_kernels
@pytest.mark.parametrize("cache", [True, False])
def test_layers_alike_take_over_the_first_ones_activation_decision(cache, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    monkeypatch.setattr(autotune, "_time_block", _fake_clock("act_bitmap_gemv"))
    tuned = _count_tuned(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(24, 24) for _ in range(3)), nn.Linear(24, 8)).eval()
    with torch.no_grad():
        for i, layer in enumerate(model):  # every row half pruned: one density in whole %,
            layer.weight[:, ::2] = 0  # and i more weights, so no two share a disk key
            layer.weight.view(-1)[1:2 * i:2] = 0
    # threshold 0: every (nonzero) input kept, so the first three layers are alike
    act = _Thresholds({str(i): torch.zeros(24) for i in range(4)})
    prompt = torch.randn(6, 24)
    compiled = sparsekit.compile(model, prompt, activation_sparsity=act, cache=cache)
    reused = {n: compiled.sparsekit_choices[n]["activation"].get("reused") for n in "0123"}
    if cache:
        assert reused == {"0": None, "1": "0", "2": "0", "3": None}
        assert tuned == [24, 24]  # layer 0 and the 8-output layer 3
        # the decisions on these inputs are on disk now: a second compile times none
        again = sparsekit.compile(model, prompt, activation_sparsity=act)
        assert tuned == [24, 24]
        for n in "0123":
            record = again.sparsekit_choices[n]["activation"]
            assert record["cached"] and "reused" not in record
            first = compiled.sparsekit_choices[n]["activation"]
            assert {k: v for k, v in record.items() if k != "cached"} == {
                k: v for k, v in first.items() if k not in ("cached", "reused")}
            assert type(again.get_submodule(n)) is type(compiled.get_submodule(n))
    else:
        assert set(reused.values()) == {None} and len(tuned) == 4
    for n in "0123":
        layer = compiled.get_submodule(n)
        assert isinstance(layer, ActivationSparseLinear) and layer.kernel == "act_bitmap_gemv"
        assert compiled.sparsekit_choices[n]["decode"]["format"] == "act_bitmap_gemv"
    act.apply(model)
    try:
        with torch.no_grad():
            for x in (prompt, prompt[:1]):
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    finally:
        act.remove()


def _tamper_chosen(choice):
    choice["activation"]["chosen"] = "yes"


def _tamper_kernel(choice):
    choice["decode"]["format"] = "act_nothing"


def _tamper_speed(choice):
    choice["activation"]["prefill_speed"] = {"4": float("nan")}


def _tamper_decode_times(choice):
    choice["decode"]["times_ms"]["act_sparse_gemv"] = {"1": -1.0}


def _tamper_key(choice):
    choice["activation"]["reused"] = "0"


@needs_kernels
@pytest.mark.parametrize("tamper", [_tamper_chosen, _tamper_kernel, _tamper_speed,
                                    _tamper_decode_times, _tamper_key])
def test_a_corrupt_stored_activation_decision_is_timed_again(tamper, tmp_path, monkeypatch):
    """What a stored activation-sparse decision holds is checked as a timing's record is:
    a file no timing could give is ignored with a warning, the layer timed again and the
    file replaced."""
    import json

    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    monkeypatch.setattr(autotune, "_time_block", _fake_clock("act_bitmap_gemv"))
    model = _mlp(torch.float32)
    act = _Thresholds({"2": torch.zeros(64)})
    prompt = torch.randn(6, 24)
    first = sparsekit.compile(model, prompt, activation_sparsity=act, rows=[1, 4])
    assert isinstance(first.get_submodule("2"), ActivationSparseLinear)
    (path,) = [p for p in (tmp_path / "decisions").glob("*.json")
               if json.loads(p.read_text())["key"].get("kind") == "activation"]
    data = json.loads(path.read_text())
    tamper(data["choice"])
    path.write_text(json.dumps(data))
    tuned = _count_tuned(monkeypatch)
    with pytest.warns(RuntimeWarning, match="ignoring corrupt decision cache file"):
        again = sparsekit.compile(model, prompt, activation_sparsity=act, rows=[1, 4])
    assert tuned == [64] and not again.sparsekit_choices["2"]["activation"]["cached"]
    assert again.get_submodule("2").kernel == first.get_submodule("2").kernel
    assert "act_nothing" not in path.read_text() and '"yes"' not in path.read_text()


def test_tuned_on_inputs_of_another_device_names_them():
    with pytest.raises(ValueError, match="inputs must be on the modules' device cpu, got meta"):
        ActivationSparseLinear.tuned(_pruned(70, 30), 0.1, inputs=torch.empty(4, 30,
                                                                               device="meta"))


def test_kernels_for_names_what_tuned_times():
    pruned, dense = _pruned(70, 30), nn.Linear(30, 70)
    expected = ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"] if kernels.available() \
        else ["act_gemv"]
    assert ActivationSparseLinear.kernels_for(pruned.weight) == expected
    assert ActivationSparseLinear.kernels_for(pruned.weight, torch.int8) == expected + (
        ["act_bitmap_qgemv"] if kernels.available() else [])
    assert ActivationSparseLinear.kernels_for(dense.weight) == ["act_gemv"]  # too dense
    assert ActivationSparseLinear.kernels_for(pruned.weight.double()) == ["act_gemv"]


@needs_kernels
def test_compile_mixes_activation_sparse_and_weight_only_layers(monkeypatch):
    def clock(module, x, reps):  # only layer "0" gains from its thresholds
        if isinstance(module, ActivationSparseLinear):
            return 1e-4 if module.in_features == 24 else 3e-4
        return 2e-4
    monkeypatch.setattr(autotune, "_time_block", clock)
    model = _mlp(torch.float32)
    act = _Thresholds({"0": torch.full((24,), 0.5), "2": torch.full((64,), 0.1)})
    prompt = torch.randn(6, 24)
    compiled = sparsekit.compile(model, prompt, activation_sparsity=act, cache=False)
    assert isinstance(compiled.get_submodule("0"), ActivationSparseLinear)
    assert isinstance(compiled.get_submodule("2"), CompiledLinear)
    only_first = _Thresholds({"0": act.thresholds["0"]})
    only_first.apply(model)
    try:
        with torch.no_grad():
            for x in (prompt, prompt[:1]):
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    finally:
        only_first.remove()


@needs_kernels
@pytest.mark.parametrize("fast", KERNELS)
def test_compile_to_int8_gives_int8_activation_layers(fast, monkeypatch):
    """Where the prompt path holds int8 values too (dense int8 the fastest there); one
    that kept float values gives the one-row kernel float values, the same numbers
    (test_hostile_round28)."""
    def clock(module, x, reps):
        name = getattr(module, "kernel", None) or module.format.name
        return {fast: 5e-5, "dense_lowp": 1e-4}.get(name, 2e-4)

    monkeypatch.setattr(autotune, "_time_block", clock)
    model = _mlp(torch.float32)
    act = _Thresholds({"0": torch.full((24,), 0.5), "2": torch.full((64,), 0.1)})
    prompt = torch.randn(6, 24)
    for x in (prompt, prompt[:1]):  # the output check runs on several rows, then on one
        compiled = sparsekit.compile(model, x, activation_sparsity=act, cache=False,
                                     weight_dtype="int8")
        for name in act.thresholds:
            layer = compiled.get_submodule(name)
            assert isinstance(layer, ActivationSparseLinear) and layer.kernel == fast
            assert layer.scales is not None and layer.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparsify_input_zeroes_exactly_the_small_magnitudes(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 40, generator=g).to(dtype)
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.0])
    threshold = torch.rand(40, generator=g)
    threshold[:3] = torch.tensor([0.0, float("inf"), -1.0])  # keep all, keep inf only, all
    y = sparsify_input(x, threshold)
    t = threshold.to(dtype)
    expected = torch.where(x.abs() >= t, x, torch.zeros_like(x))
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())
    scalar = sparsify_input(x, torch.tensor(0.5))
    assert torch.equal(scalar.nan_to_num(), torch.where(x.abs() >= 0.5, x, 0).nan_to_num())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 40), (1, 1), (2, 3, 7), (0, 5), (4,), (2, 80, 1024)],
                         ids=str)  # the last splits over threads
def test_act_threshold_equals_sparsify_input(dtype, shape):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=g).to(dtype)
    cols = shape[-1]
    threshold = torch.rand(cols, generator=g)
    if x.numel() >= 6:
        flat = x.view(-1)
        flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1.0])
    if cols >= 3:
        threshold[:3] = torch.tensor([0.0, float("inf"), -1.0])
    if x.numel() > 0:  # thresholds equal to the inputs of the last row: kept
        threshold[-1] = x.reshape(-1, cols)[-1, -1].abs().float()
    t = threshold.to(dtype)
    y = torch.ops.sparsekit.act_threshold(x, t)
    expected = sparsify_input(x, t)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


@needs_kernels
def test_act_threshold_rejects_hostile_arguments():
    x, t = torch.randn(3, 8), torch.rand(8)
    cases = [((x.bfloat16(), t), "threshold must be"), ((x, t[:7]), "threshold"),
             ((x.t(), t), "x must be a contiguous"), ((x.double(), t.double()), "x must be"),
             ((x, t.view(2, 4)), "threshold"),
             ((x, torch.tensor([0.1] * 7 + [float("nan")])), "threshold must not hold NaN"),
             ((x.bfloat16(), torch.full((8,), float("nan")).bfloat16()), "NaN at index 0")]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sparsekit.act_threshold(*args)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_threshold_out_writes_the_functional_result_into_out(dtype):
    g = torch.Generator().manual_seed(9)
    x, t = torch.randn(5, 3, 40, generator=g).to(dtype), torch.rand(40, generator=g).to(dtype)
    out = torch.full_like(x, 7.0)
    y = torch.ops.sparsekit.act_threshold.out(x, t, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(out, torch.ops.sparsekit.act_threshold(x, t))


@needs_kernels
def test_act_threshold_out_rejects_a_bad_out_and_leaves_it_untouched():
    x, t = torch.randn(3, 8), torch.rand(8)
    flat = torch.zeros(3 * 8 + 8)
    cases = [(torch.zeros(3, 7), "out must be a contiguous CPU tensor of x's shape"),
             (torch.zeros(3, 8, dtype=torch.bfloat16), "dtype"),
             (torch.zeros(8, 3).t(), "out must be a contiguous"),
             (x, "out must not overlap x"),
             (flat[4:28].view(3, 8), None)]  # no overlap with x: accepted
    for out, match in cases:
        before = out.clone()
        if match is None:
            torch.ops.sparsekit.act_threshold.out(x, t, out=out)
            continue
        with pytest.raises(RuntimeError, match=match):
            torch.ops.sparsekit.act_threshold.out(x, t, out=out)
        assert torch.equal(out, before)
    overlapping = torch.randn(4 * 8)
    with pytest.raises(RuntimeError, match="overlap"):
        torch.ops.sparsekit.act_threshold.out(overlapping[:24].view(3, 8), t,
                                              out=overlapping[8:32].view(3, 8))
    nan = torch.full((8,), float("nan"))
    out = torch.zeros(3, 8)
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.sparsekit.act_threshold.out(x, nan, out=out)
    assert torch.equal(out, torch.zeros(3, 8))  # checked before anything is written


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prompt_path_thresholds_into_one_reused_buffer(dtype):
    """Several rows are thresholded into this thread's scratch buffer, the same memory on
    every call (no allocation the allocator could hand back to the kernel between calls);
    under autograd a fresh tensor, so that the product's saved input stays intact."""
    from sparsekit.engine import activation_linear

    linear = _pruned(70, 30, dtype)
    threshold = torch.rand(30, generator=torch.Generator().manual_seed(8))
    layer = ActivationSparseLinear.from_linear(linear, threshold)
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(rows, 30, generator=g).to(dtype) for rows in (5, 5, 3)]
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    with torch.no_grad():
        ys = [layer(x) for x in xs]
    buffer = activation_linear._scratch.buffers[dtype]
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(y.float(), _reference(linear, x, threshold), **tol)
        assert layer._sparsify(x).data_ptr() == buffer.data_ptr()
    x = xs[0].clone().requires_grad_()
    assert layer._sparsify(x).data_ptr() != buffer.data_ptr()
    big = torch.zeros(activation_linear._SCRATCH_BYTES // x.element_size() // 30 + 1, 30,
                      dtype=dtype)
    assert layer._sparsify(big).data_ptr() != buffer.data_ptr()


class _Keeping(nn.Module):
    """A prefill that keeps every input it is given."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear, self.kept = linear, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept.append(x)
        return self.linear(x)


@needs_kernels
def test_the_prompt_path_keeps_no_scratch_where_its_input_could_be_kept():
    """A prefill module that is not a compiled layer, or a compiled one with a forward hook,
    may keep the thresholded rows it is given (a captured activation): those get a fresh
    tensor each call, so a kept input is never overwritten by the next call's thresholding.
    A compiled prefill without hooks takes the scratch buffer."""
    linear = _pruned(70, 30)
    threshold = torch.rand(30, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(5, 30, generator=g) for _ in range(2)]
    compiled = CompiledLinear.from_linear(linear, "dense")
    hooked: list[torch.Tensor] = []
    handle = compiled.register_forward_pre_hook(lambda _m, args: hooked.append(args[0]))
    keeping = _Keeping(compiled)
    for prefill, kept in ((compiled, hooked), (keeping, keeping.kept)):
        hooked.clear()
        layer = ActivationSparseLinear.from_linear(linear, threshold, prefill=prefill)
        assert not layer._product_only_reads()
        with torch.no_grad():
            for x in xs:
                layer(x)
        for x, seen in zip(xs, kept, strict=True):
            assert torch.equal(seen, sparsify_input(x, threshold))
    handle.remove()
    plain = ActivationSparseLinear.from_linear(linear, threshold, prefill=compiled)
    assert plain._product_only_reads()
    assert ActivationSparseLinear.from_linear(linear, threshold)._product_only_reads()


@needs_kernels
@pytest.mark.parametrize("register", [nn.modules.module.register_module_forward_pre_hook,
                                      nn.modules.module.register_module_forward_hook])
def test_the_prompt_path_keeps_no_scratch_under_a_global_hook(register):
    """A global module hook (a profiler, an activation logger) fires on the compiled prefill
    too and may keep the thresholded rows it is given: while one is registered, each call
    thresholds into a fresh tensor, so what it kept is never overwritten by the next call."""
    linear = _pruned(70, 30)
    threshold = torch.rand(30, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(5, 30, generator=g) for _ in range(2)]
    compiled = CompiledLinear.from_linear(linear, "dense")
    layer = ActivationSparseLinear.from_linear(linear, threshold, prefill=compiled)
    kept: list[torch.Tensor] = []
    handle = register(lambda module, args, *_: kept.append(args[0])
                      if module is compiled else None)
    try:
        assert not layer._product_only_reads()
        with torch.no_grad():
            for x in xs:
                layer(x)
    finally:
        handle.remove()
    assert len(kept) == len(xs)
    for x, seen in zip(xs, kept, strict=True):
        assert torch.equal(seen, sparsify_input(x, threshold))
    assert layer._product_only_reads()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prompt_path_thresholds_in_one_kernel_call(dtype, monkeypatch):
    from sparsekit.engine import activation_linear

    def elementwise(x, threshold):  # the four PyTorch ops the kernel replaces
        raise AssertionError("the prompt rows were thresholded by PyTorch ops")

    monkeypatch.setattr(activation_linear, "sparsify_input", elementwise)
    linear = _pruned(70, 30, dtype)
    threshold = torch.rand(30, generator=torch.Generator().manual_seed(8))
    layer = ActivationSparseLinear.from_linear(linear, threshold)
    x = torch.randn(5, 30).to(dtype)
    y = layer(x)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    monkeypatch.undo()  # the reference thresholds with sparsify_input
    torch.testing.assert_close(y.float(), _reference(linear, x, threshold), **tol)


def test_an_activation_layer_does_not_keep_the_one_row_format_of_its_prompt_layer():
    from sparsekit.engine.compile import _multi_row
    from sparsekit.engine.formats import FORMATS

    linear = _pruned(70, 30)
    weight = linear.weight.detach()
    small, large = FORMATS["csr16"].from_dense(weight), FORMATS["dense"].from_dense(weight)
    split = CompiledLinear(small, linear.bias, format_large=large, split=1)
    prompt = _multi_row(split)
    assert prompt.format is large and getattr(prompt, "format_large", None) is None
    x = torch.randn(4, 30)
    torch.testing.assert_close(prompt(x), split(x))
    wider = CompiledLinear(small, linear.bias, format_large=large, split=4)
    assert _multi_row(wider) is wider  # its first format serves prompt rows too
