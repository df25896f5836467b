"""Activation sparsity: calibration, thresholding hooks, the act_gemv kernel and profiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernels import kernels_ok
from torch import nn

import sparsekit
from sparsekit import activation
from sparsekit.engine import kernels
from sparsekit.engine.activation_linear import ActivationSparseLinear

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def _llama(act: str = "silu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, hidden_act=act,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _llama()


@pytest.mark.parametrize("method", ["teal", "wina", "cats"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.65])
def test_thresholds_hit_sparsity_on_held_out_data(model, method, sparsity):
    act = activation.calibrate(model, _tokens(8, 32, 0), sparsity=sparsity, method=method)
    held_out = _tokens(8, 32, 1)
    for name, p in activation.profile(model, held_out, sparsity=act).items():
        assert abs(p.below_threshold - sparsity) <= 0.03, (name, p)  # dense inputs per layer
    if method == "cats":
        assert all(n.endswith("down_proj") for n in act.thresholds)
    else:
        assert len(act.thresholds) == 14 and not any("lm_head" in n for n in act.thresholds)
    act.apply(model)  # all layers at once: upstream thresholds shift the inputs a little
    try:
        with torch.no_grad():
            model(held_out)
        assert set(act.stats()) == set(act.thresholds)
        assert act.model_sparsity(act.stats()) == pytest.approx(sparsity, abs=0.05)
    finally:
        act.remove()


def test_greedy_reaches_the_same_model_wide_sparsity(model):
    data = _tokens(8, 32, 0)
    uniform = activation.calibrate(model, data, sparsity=0.5)
    greedy = activation.calibrate(model, data, sparsity=0.5, allocation="greedy")
    assert greedy.model_sparsity() == pytest.approx(uniform.model_sparsity(), abs=1e-3)
    assert len(set(greedy.sparsities.values())) > 1  # it did allocate
    greedy.apply(model)
    with torch.no_grad():
        model(_tokens(8, 32, 1))
    assert greedy.model_sparsity(greedy.stats()) == pytest.approx(0.5, abs=0.03)
    greedy.remove()


def test_teal_greedy_raises_the_group_with_the_least_block_error():
    from sparsekit.activation.allocation import greedy

    cost = {"qkv": 3.0, "o": 1.0, "down": 2.0}  # error per unit sparsity of each group
    groups = [["q", "k", "v"], ["o"], ["down"]]
    group_of = {n: g[0] if len(g) == 1 else "qkv" for g in groups for n in g}
    seen = []

    def error(levels: dict[str, float]) -> float:
        seen.append(dict(levels))
        return sum(cost[group_of[n]] * s for n, s in levels.items()) / len(levels)

    sizes = dict.fromkeys(["q", "k", "v", "o", "down"], 100)
    result = greedy(groups, sizes, 0.1, error)
    assert seen[0] == {"q": 0.05, "k": 0.05, "v": 0.05, "o": 0.0, "down": 0.0}  # qkv: one step
    assert seen[1]["o"] == seen[2]["down"] == 0.05 and len(seen) == 3 * 10  # 10 steps of o
    assert result == {"q": 0.0, "k": 0.0, "v": 0.0, "o": pytest.approx(0.5), "down": 0.0}


def test_block_groups_share_levels_of_shared_inputs():
    from sparsekit.activation.blocks import block_groups

    names = [f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    groups = block_groups(names)
    assert list(groups) == ["model.layers.0", "model.layers.1"]
    assert [len(g) for g in groups["model.layers.1"]] == [3, 1, 2, 1]
    assert block_groups(["fc1", "fc2"]) == {"": [["fc1"], ["fc2"]]}


def test_wina_score_is_magnitude_times_column_norm():
    weight = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])  # column norms 5, 2, 1
    x = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.equal(activation.score("wina", x, weight), torch.tensor([[5.0, 4.0, 0.5]]))
    assert torch.equal(activation.score("teal", x, weight), x.abs())


def test_zero_sparsity_equals_dense_and_remove_restores_bit_identically(model):
    data = _tokens(2, 16, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(data).logits
        act = activation.calibrate(model, data, sparsity=0.0).apply(model)
        assert torch.equal(model(data).logits, ref)
        act.remove()
        act = activation.calibrate(model, data, sparsity=0.5).apply(model)
        assert not torch.equal(model(data).logits, ref)
        act.remove()
        assert torch.equal(model(data).logits, ref)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_rows_are_independent_of_batch_and_dtype(model):
    act = activation.calibrate(model, _tokens(4, 16, 0), sparsity=0.5, method="wina")
    data = _tokens(3, 16, 5)
    act.apply(model)
    try:
        with torch.no_grad():
            batched = model(data).logits
            single = torch.cat([model(row[None]).logits for row in data])
            torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
            model.to(torch.bfloat16)
            half = model(data).logits.float()
    finally:
        act.remove()
        model.float()
    assert half.dtype == torch.float32
    assert (half.argmax(-1) == batched.argmax(-1)).float().mean() > 0.8
    torch.testing.assert_close(half, batched, rtol=0.1, atol=0.1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity must be a number in \\[0, 1\\), got 1.0"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"method": "relu"}, "method must be one of \\['teal', 'wina', 'cats'\\], got 'relu'"),
        ({"allocation": "owl"}, "allocation must be one of"),
        ({"targets": "nothing*"}, "targets"),
    ],
)
def test_bad_arguments_name_the_parameter(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        activation.calibrate(model, _tokens(1, 8, 0), **kwargs)


@pytest.mark.parametrize("calibration", [None, [], torch.empty(0, 8, dtype=torch.long)])
def test_empty_calibration_is_rejected(model, calibration):
    with pytest.raises(ValueError, match="calibration"):
        activation.calibrate(model, calibration)


def test_cats_needs_down_projections():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="down_proj"):
        activation.calibrate(mlp, torch.randn(16, 4), method="cats")
    act = activation.calibrate(mlp, torch.randn(64, 4), sparsity=0.25)  # any Linear for teal
    assert set(act.thresholds) == {"0", "2"}


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_activation_sparse_linear_equals_dense_product(use_kernel, bias, monkeypatch):
    if use_kernel and not kernels_ok():
        pytest.skip("compiled kernels unavailable")
    if not use_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(300, 70, bias=bias)
    threshold = torch.rand(300, generator=g)
    layer = ActivationSparseLinear.from_linear(linear, threshold, threads=2)
    for shape in [(300,), (1, 300), (1, 1, 300), (5, 300), (2, 3, 300)]:
        x = torch.randn(shape, generator=g)
        x[..., :50] = 0
        ref = F.linear(x.masked_fill(x.abs() < threshold, 0), linear.weight, linear.bias)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    empty = layer(torch.zeros(1, 300))  # no input survives: only the bias is left
    torch.testing.assert_close(empty[0], linear.bias if bias else torch.zeros(70))


@pytest.mark.parametrize("use_kernel", [True, False])
def test_bfloat16_rows_match_float32_and_the_batch(use_kernel, monkeypatch):
    if use_kernel and not kernels_ok():
        pytest.skip("compiled kernels unavailable")
    if not use_kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(300, 70).to(torch.bfloat16)
    threshold = torch.rand(300, generator=g)
    layer = ActivationSparseLinear.from_linear(linear, threshold)
    x = torch.randn(4, 300, generator=g).to(torch.bfloat16)
    rows = torch.cat([layer(row[None]) for row in x])
    assert rows.dtype == torch.bfloat16
    ref = F.linear(x.float().masked_fill(x.abs() < threshold.to(x.dtype), 0),
                   linear.weight.float(), linear.bias.float())  # exact product of bf16 values
    torch.testing.assert_close(rows.float(), ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding
    torch.testing.assert_close(layer(x), rows, rtol=1e-2, atol=2e-2)


def test_compile_with_activation_sparsity(model, monkeypatch):
    from sparsekit.engine import autotune

    def clock(module, x, reps):  # compile keeps an activation-sparse layer only where faster
        return 1e-4 if isinstance(module, ActivationSparseLinear) else 2e-4

    monkeypatch.setattr(autotune, "_time_block", clock)
    data = _tokens(2, 8, 0)
    act = activation.calibrate(model, data, sparsity=0.4)
    compiled = sparsekit.compile(model, data[:1], activation_sparsity=act, cache=False)
    layers = [m for m in compiled.modules() if isinstance(m, ActivationSparseLinear)]
    assert len(layers) == len(act.thresholds)
    act.apply(model)
    try:
        with torch.no_grad():
            for step in (data[:1], data[:1, :1]):  # prefill (dense) and decode (kernel)
                torch.testing.assert_close(compiled(step).logits, model(step).logits)
    finally:
        act.remove()


def test_profile_shows_lazy_neurons_of_relu_models(tmp_path):
    relu = _llama("relu")
    act = activation.calibrate(relu, _tokens(8, 32, 0), sparsity=0.5)
    result = activation.profile(relu, _tokens(8, 32, 1), sparsity=act,
                                plot=tmp_path / "act.png")
    assert (tmp_path / "act.png").stat().st_size > 0
    for name, p in result.items():
        if name.endswith("down_proj"):
            assert p.zeros > 0.3  # ReLU: many exact zeros
        else:
            assert p.zeros < 0.01 and p.dead == 0
        assert p.zeros <= p.below_threshold <= max(p.zeros, 0.5) + 0.1


def test_methods_and_allocations_are_registries():
    from sparsekit.activation.allocation import ALLOCATIONS, greedy, uniform

    assert list(activation.METHODS) == ["teal", "wina", "cats"]
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert activation.METHODS.get("wina")(torch.ones(2), w).tolist() == [5.0, 1.0]
    assert list(ALLOCATIONS) == ["uniform", "greedy"]
    assert ALLOCATIONS.get("uniform") is uniform and ALLOCATIONS.get("greedy") is greedy
    assert ALLOCATIONS.names(blockwise=True) == ["greedy"]
