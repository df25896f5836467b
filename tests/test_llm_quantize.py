"""Joint pruning and int8 quantization: ``sparsekit.llm.prune(..., quantize="int8")``."""

import copy
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_llm import METHODS, VOCAB, build, correlated_inputs, layers_of, state, tokens  # noqa: E402

from sparsekit import llm  # noqa: E402
from sparsekit.llm.sparsegpt import sparsegpt_prune  # noqa: E402
from sparsekit.quantize import (  # noqa: E402
    SCALE_NAME,
    attached_scales,
    dequantize_int8,
    fake_quantize,
    group_size_of,
    int8_scales,
    quantize_int8,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"


def on_grid(weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether ``weight`` is bitwise ``dequantize_int8`` of its codes on ``scales``."""
    codes, _ = quantize_int8(weight.float(), scales)
    return torch.equal(dequantize_int8(codes, scales).to(weight.dtype), weight)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_pruned_weights_lie_on_the_int8_grid_of_the_attached_scales(method, pattern):
    model = build()
    masks = llm.prune(model, tokens(4, 16), method=method, pattern=pattern, quantize="int8")
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)
    for layer in layers_of(model):
        w = layer.module.weight
        scales = attached_scales(layer.module)
        assert scales is not None and scales.dtype == torch.float32
        assert scales.shape == (w.shape[0],) and (scales > 0).all()
        assert on_grid(w, scales), layer.name
        assert (w[~masks.masks[layer.name]] == 0).all()
        assert SCALE_NAME in layer.module.state_dict()
    with torch.no_grad():
        assert torch.isfinite(model(tokens(2, 16)).logits).all()


def test_a_bfloat16_model_keeps_the_codes_of_its_grid():
    model = build().to(torch.bfloat16)
    llm.prune(model, tokens(4, 16), method="sparsegpt", quantize="int8")
    for layer in layers_of(model):
        w, scales = layer.module.weight, attached_scales(layer.module)
        assert w.dtype == torch.bfloat16
        assert torch.equal(fake_quantize(w.float(), scales).to(torch.bfloat16), w)


def test_rounding_to_nearest_keeps_the_masks():
    """Magnitude is data-free: its masks are those of the unquantized run. Wanda's block 0
    sees the same inputs, so the same masks; later blocks are calibrated on the rounded
    outputs of the blocks before them, so their masks may differ in a few weights."""
    calib = tokens(4, 16)
    for method in ("magnitude", "wanda"):
        plain = llm.prune(build(), calib, method=method)
        rounded = llm.prune(build(), calib, method=method, quantize="int8")
        assert plain.masks.keys() == rounded.masks.keys()
        for name, keep in plain.masks.items():
            if method == "magnitude" or ".layers.0." in name:
                assert torch.equal(rounded.masks[name], keep), (method, name)
            else:
                assert (rounded.masks[name] == keep).float().mean() > 0.99


def outlier_layer(seed: int) -> torch.Tensor:
    """A random layer with one large weight per row, as trained LLM layers have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    w[torch.arange(64), torch.randint(0, 128, (64,), generator=g)] *= 4
    return w


def test_joint_mode_reconstructs_better_than_pruning_then_rounding_on_most_layers():
    """The SparseGPT paper's joint mode: compensating the rounding error inside the sweep
    against rounding the pruned layer afterwards (same mask: one block of columns, chosen
    from W). At 8 bits the rounding error is small next to the pruning error, so the gain
    is small and not guaranteed: over 24 seeded layers joint mode was better in 22 (by up
    to 1.8 %) and worse in 2, by at most 0.02 % (the README quotes these)."""
    X = correlated_inputs(1024, 128)
    H = 2 * X.t() @ X / X.shape[0]
    changes = []
    for seed in range(12):
        for sparsity in (0.25, 0.5):
            W = outlier_layer(seed)
            pruned, keep = sparsegpt_prune(W, H, sparsity)
            scales = int8_scales(pruned)
            joint, joint_keep = sparsegpt_prune(W, H, sparsity, scales=scales)
            assert torch.equal(joint_keep, keep)
            assert on_grid(joint, scales) and (joint[~keep] == 0).all()

            def error(w: torch.Tensor, W: torch.Tensor = W) -> float:
                return float(torch.linalg.norm((W - w) @ X.t()))

            rounded = error(fake_quantize(pruned, scales))
            changes.append((error(joint) - rounded) / rounded)
    assert sum(c < 0 for c in changes) >= 20
    assert max(changes) < 5e-4 and min(changes) < -0.01


def test_sparsegpt_checks_the_scales():
    W = torch.randn(8, 16)
    H = torch.eye(16)
    with pytest.raises(ValueError, match=r"scales must be floating of shape \(8,\)"):
        sparsegpt_prune(W, H, 0.5, scales=torch.ones(16))


@pytest.mark.parametrize("quantize", ["int4", "INT8", 8, True, "fp8"])
def test_bad_quantize_is_refused_before_any_work(quantize):
    model = build()
    before = state(model)
    with pytest.raises(ValueError, match=r"quantize must be None or one of \['int8'\]"):
        llm.prune(model, tokens(2, 8), quantize=quantize)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)


def test_conv1d_layers_are_refused_with_quantize():
    model = build("gpt2")
    before = state(model)
    with pytest.raises(ValueError, match="quantize='int8' needs nn.Linear.*Conv1D"):
        llm.prune(model, tokens(2, 8), quantize="int8")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_int8_adds_little_perplexity_to_a_trained_sparse_model():
    """A weak, quick version of the benchmark's claim (≤ 1 % on the trained benchmark
    LLaMA, benchmarks/llm_decode.py): a tiny LLaMA trained briefly on tinyshakespeare."""
    if not SHAKESPEARE.exists():
        pytest.skip("tinyshakespeare is not available")
    data = torch.frombuffer(bytearray(SHAKESPEARE.read_bytes()[:200_000]), dtype=torch.uint8)
    data = data.long()
    train, val = data[:180_000], data[180_000:184_096]
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        starts = torch.randint(0, train.numel() - 64, (16,), generator=gen).tolist()
        x = torch.stack([train[s:s + 64] for s in starts])
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert llm.perplexity(model, val, seqlen=64) < VOCAB / 4  # it learned something
    for method in ("wanda", "sparsegpt"):
        sparse = copy.deepcopy(model)
        llm.prune(sparse, train, method=method, nsamples=16, seqlen=64)
        rounded = copy.deepcopy(model)
        llm.prune(rounded, train, method=method, nsamples=16, seqlen=64, quantize="int8")
        ratio = llm.perplexity(rounded, val, seqlen=64) / llm.perplexity(sparse, val, seqlen=64)
        assert ratio < 1.03, (method, ratio)


def test_compile_stores_the_codes_of_a_quantized_model():
    """With the engine's int8 values (``weight_dtype="int8"``) the compiled model computes
    with exactly the grid the pruning chose."""
    import sparsekit

    model = build()
    llm.prune(model, tokens(4, 16), method="sparsegpt", quantize="int8")
    ids = tokens(1, 16)
    try:
        compiled = sparsekit.compile(model, ids, weight_dtype="int8", cache=False)
    except ValueError as err:
        if "weight_dtype" not in str(err):
            raise
        pytest.skip(f"this sparsekit has no int8 values yet: {err}")
    with torch.no_grad():
        expected, got = model(ids).logits, compiled(ids).logits
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_pruning_again_without_quantize_forgets_the_grid():
    model = build()
    llm.prune(model, tokens(4, 16), method="magnitude", quantize="int8")
    llm.prune(model, tokens(4, 16), method="sparsegpt", sparsity=0.6)
    for layer in layers_of(model):
        assert attached_scales(layer.module) is None
        assert SCALE_NAME not in layer.module.state_dict()


def test_detach_scales_without_a_grid_is_a_no_op():
    from torch import nn

    from sparsekit.quantize import detach_scales

    layer = nn.Linear(4, 2)
    detach_scales(layer)
    assert attached_scales(layer) is None


def on_group_grid(weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether ``weight`` is bitwise the dequantized codes of its grouped grid."""
    group = group_size_of(weight, scales)
    codes, _ = quantize_int8(weight.float(), scales, group)
    return torch.equal(dequantize_int8(codes, scales, group).to(weight.dtype), weight)


@pytest.mark.parametrize("method", METHODS)
def test_group_size_gives_one_scale_per_row_and_group(method):
    """``group_size=16``: hidden 32 and intermediate 64 give 2 and 4 scales per row, and
    every kept weight lies on its group's grid (SparseGPT: inside the joint sweep)."""
    model = build()
    masks = llm.prune(model, tokens(4, 16), method=method, quantize="int8", group_size=16)
    for layer in layers_of(model):
        w, scales = layer.module.weight, attached_scales(layer.module)
        assert scales.shape == (w.shape[0], w.shape[1] // 16), layer.name
        assert group_size_of(w, scales) == 16
        assert on_group_grid(w, scales), layer.name
        assert (w[~masks.masks[layer.name]] == 0).all()


def test_grouped_grids_round_finer_than_one_scale_per_row():
    """The point of groups: a row whose inputs differ in scale keeps more of its small
    weights (the rounding error of the grouped grid is below the per-row one)."""
    W = outlier_layer(0)
    W[:, 64:] *= 0.01  # the second half of each row is small
    rows = fake_quantize(W, int8_scales(W))
    grouped = fake_quantize(W, int8_scales(W, 32), 32)
    small = slice(64, None)
    assert (grouped - W)[:, small].norm() < 0.05 * (rows - W)[:, small].norm()
    assert (grouped - W).norm() < (rows - W).norm()


@pytest.mark.parametrize("sparsity", [0.0, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_joint_mode_with_groups_lies_on_the_grid_and_beats_rounding(seed, sparsity):
    """GPTQ's groups inside SparseGPT's sweep: on the grouped grid exactly, below rounding
    the pruned layer to it afterwards, and below the joint mode with one scale per row. (At
    50 % the pruning error is so much larger than either rounding error that the
    comparison is noise.)"""
    W, X = outlier_layer(seed), correlated_inputs(1024, 128)
    H = 2 * X.t() @ X / X.shape[0]
    pruned, keep = sparsegpt_prune(W, H, sparsity)
    scales = int8_scales(pruned, 32)
    joint, joint_keep = sparsegpt_prune(W, H, sparsity, scales=scales)
    assert torch.equal(joint_keep, keep)
    assert on_group_grid(joint, scales) and (joint[~keep] == 0).all()

    def error(w: torch.Tensor) -> float:
        return float(torch.linalg.norm((W - w) @ X.t()))

    rows, _ = sparsegpt_prune(W, H, sparsity, scales=int8_scales(pruned))
    assert error(joint) < error(fake_quantize(pruned, scales, 32))
    assert error(joint) < error(rows)


def test_sparsegpt_refuses_groups_that_do_not_divide_the_row():
    with pytest.raises(ValueError, match=r"scales of shape \(8, 3\) do not divide the 16 "):
        sparsegpt_prune(torch.randn(8, 16), torch.eye(16), 0.5, scales=torch.ones(8, 3))


@pytest.mark.parametrize(("group_size", "quantize", "error"), [
    (24, "int8", r"group_size must divide the inputs of every pruned layer.*has 32 inputs, "
                 r"got group_size=24"),
    (0, "int8", "group_size must be"),
    (True, "int8", "group_size must be"),
    (16, None, r"group_size=16 sets the int8 grid's groups: it needs quantize='int8'"),
])
def test_bad_group_size_is_refused_before_any_work(group_size, quantize, error):
    model = build()
    before = state(model)
    with pytest.raises((ValueError, TypeError), match=error):
        llm.prune(model, tokens(2, 8), quantize=quantize, group_size=group_size)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_attach_scales_takes_groups_that_divide_the_row():
    from torch import nn

    from sparsekit.quantize import attach_scales

    layer = nn.Linear(12, 2)
    attach_scales(layer, torch.full((2, 3), 0.5))
    assert group_size_of(layer.weight, attached_scales(layer)) == 4
    with pytest.raises(ValueError, match=r"scales of shape \(2, 5\) do not divide the 12 "):
        attach_scales(nn.Linear(12, 2), torch.ones(2, 5))
