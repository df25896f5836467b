"""int8 weights with one scale per row and group of inputs (GPTQ's groups, e.g. 128):
``sparsekit.llm.prune(..., quantize="int8", group_size=...)`` through the ``dense_lowp``,
``bitmap``, ``nm``, ``bsr``, ``csr16`` and ``fanin`` kernels, ``compile``,
``sparsekit.save``/``load`` and ``save_pretrained``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, autotune, kernels
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.formats import FORMATS
from sparsekit.quantize import (
    attach_scales,
    attached_scales,
    dequantize_int8,
    int8_scales,
    is_grouped,
    quantize_int8,
)

transformers = pytest.importorskip("transformers")

from test_fused import _act_clock, _teal, _thresholded  # noqa: E402
from test_llm import build, layers_of, tokens  # noqa: E402
from test_pretrained import _kernel_clock  # noqa: E402

DENSE_LOWP = FORMATS["dense_lowp"]
IDS = tokens(1, 16)


def _grouped_weight(rows: int, cols: int, group: int, seed: int = 0):
    """A weight whose groups differ in scale by 100x, its grouped scales and the weight the
    int8 codes on them stand for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w *= torch.logspace(-2, 0, cols // group).repeat_interleave(group)
    scales = int8_scales(w, group)
    codes, _ = quantize_int8(w, scales, group)
    return w, scales, dequantize_int8(codes, scales, group)


def _isas() -> tuple[str, ...]:
    return kernels.isas() if kernels.available() else ()


SHAPES = [(37, 256, 128), (8, 96, 32), (5, 48, 12), (9, 10, 5), (6, 64, 64), (130, 512, 16),
          (3, 160, 160), (11, 384, 192)]
# the formats whose kernels read per-group scales, N:M with each pattern it packs, BSR with
# blocks of one row (the batched path's single-row tile), square and wide ones
KINDS = [("dense_lowp", None), ("bitmap", None), ("nm", (1, 4)), ("nm", (2, 4)), ("nm", (4, 8)),
         ("bsr", (1, 8)), ("bsr", (4, 4)), ("bsr", (16, 16)), ("bsr", (8, 32)),
         ("csr16", None), ("fanin", None)]


def _grouped_format(name: str, pattern: tuple[int, int] | None, rows: int, cols: int,
                    group: int, threads: int = 1):
    """Format ``name`` holding a pruned weight on int8 grids of ``group`` inputs (``pattern``:
    N:M or BSR block), and that weight."""
    _, scales, ref = _grouped_weight(rows, cols, group)
    if name in ("bitmap", "csr16"):  # half of the weights pruned, a row left empty
        ref = ref * (torch.rand(rows, cols, generator=torch.Generator().manual_seed(1)) < 0.5)
        ref[0] = 0
    elif name == "fanin":  # a third of each row's inputs kept (at least one), a row left empty
        one = scales.repeat_interleave(group, dim=1)  # codes of 0 made 1: the fan-in stays
        ref = ref.where(ref != 0, one) * _fan_in(rows, cols, max(1, cols // 3))
        ref[0] = 0
    options = {}
    if name == "bsr":  # half of the blocks kept, the first block row left empty
        options["block"] = block = pattern
        ref = ref * _blocks_kept(rows, cols, block)
        ref[:block[0]] = 0
    elif pattern is not None:  # N of every M kept, a row left empty (all padding)
        ref = _n_of_m(ref, *pattern)
        ref[0] = 0
    fmt = FORMATS[name].from_dense(ref, scales=scales, threads=threads, **options)
    if name == "nm":
        assert (fmt.n, fmt.m) == pattern
    assert fmt.value_dtype == torch.int8 and fmt.scales.shape == scales.shape
    assert torch.equal(fmt.to_dense(), ref)
    return fmt, ref


def _assert_product(fmt, ref: torch.Tensor, batch: int) -> None:
    """``fmt``'s product of float32 and bf16 inputs equals that of the weight ``ref``."""
    g = torch.Generator().manual_seed(batch)
    x, bias = torch.randn(batch, ref.shape[1], generator=g), torch.randn(ref.shape[0], generator=g)
    expected = x.double() @ ref.double().t() + bias.double()
    torch.testing.assert_close(fmt.matmul(x, bias).double(), expected, rtol=1e-5, atol=1e-5)
    y16 = fmt.matmul(x.to(torch.bfloat16), bias)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), x.to(torch.bfloat16).double() @ ref.double().t()
                               + bias.double(), rtol=2e-2, atol=2e-2)


# bitmap: whole words of 16 inputs; N:M: whole words of fields (16 values); BSR: groups of a
# multiple of 32 inputs; CSR16 and fan-in: any
CASES = [(name, pattern, *shape) for name, pattern in KINDS for shape in SHAPES
         if shape[2] % FORMATS[name].group_multiple == 0]


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize(("name", "pattern", "rows", "cols", "group"), CASES)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernels_equal_the_dequantized_reference(isa, name, pattern, rows, cols, group,
                                                     batch, threads):
    """Every path (GEMV rows, decoded rows for more inputs; each ISA) of the formats whose
    kernels read per-group scales."""
    fmt, ref = _grouped_format(name, pattern, rows, cols, group, threads)
    with kernels.use_isa(isa):
        _assert_product(fmt, ref, batch)


@pytest.mark.parametrize(("name", "pattern"), KINDS)
@pytest.mark.parametrize("batch", [1, 5])
def test_without_kernels_the_fallback_reads_the_groups(name, pattern, batch, monkeypatch):
    fmt, ref = _grouped_format(name, pattern, 11, 384, 64 if name == "nm" else 32)
    monkeypatch.setattr(kernels, "load", lambda: None)
    _assert_product(fmt, ref, batch)


@needs_kernels
def test_the_ops_refuse_groups_they_cannot_take_and_other_formats_refuse_groups():
    _, scales, ref = _grouped_weight(4, 24, 8)
    codes, _ = quantize_int8(ref, scales, 8)
    x = torch.randn(1, 24)
    with pytest.raises(RuntimeError, match=r"number of groups dividing in_features=24"):
        torch.ops.sparsekit.dense_linear(codes, x, None, 24, 1, torch.ones(4, 5))
    with pytest.raises(RuntimeError, match=r"scales.size\(0\) must be 4"):
        torch.ops.sparsekit.dense_linear(codes, x, None, 24, 1, torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="scales must be a contiguous 1-D"):  # W8A8: per row
        torch.ops.sparsekit.dense_qlinear(codes, x, None, 24, 1, scales)
    bitmap = FORMATS["bitmap"].from_dense(ref, value_dtype=torch.int8)
    stored = (bitmap.bitmap_values, bitmap.bitmap_mask, bitmap.bitmap_rowptr)
    with pytest.raises(RuntimeError, match=r"groups of 8 inputs; the bitmap kernel takes groups "
                                           r"of a multiple of 16"):
        torch.ops.sparsekit.bitmap_linear(*stored, x, None, 24, 1, scales)
    with pytest.raises(ValueError, match=r"buffer 'scales' of the bitmap format must be float32 "
                                         r"of shape \(4,\) or \(4, groups\) with groups dividing "
                                         r"24 into groups of a multiple of 16 inputs"):
        FORMATS["bitmap"].from_dense(ref, scales=scales)
    nm = FORMATS["nm"].from_dense(_n_of_m(ref, 2, 4), value_dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"groups of 8 inputs; the 2:4 kernel takes groups "
                                           r"of a multiple of 32 inputs \(16 values\)"):
        torch.ops.sparsekit.nm_linear(nm.nm_values, nm.nm_indices, x, None, 2, 4, 24, 1, scales)
    with pytest.raises(ValueError, match=r"buffer 'scales' of the nm format must be float32 of "
                                         r"shape \(4,\) or \(4, groups\) with groups dividing "
                                         r"24 into groups of a multiple of 64 inputs, got "
                                         r"torch.float32 \(4, 3\)"):
        FORMATS["nm"].from_dense(_n_of_m(ref, 2, 4), scales=scales)
    _, scales32, ref32 = _grouped_weight(4, 32, 8)
    bsr = FORMATS["bsr"].from_dense(ref32, value_dtype=torch.int8, block=(4, 16))
    stored = (bsr.bsr_values, bsr.bsr_col_indices, bsr.bsr_rowptr)
    with pytest.raises(RuntimeError, match=r"groups of 8 inputs; the BSR kernel takes groups of "
                                           r"whole blocks \(a multiple of the block width 16\)"):
        torch.ops.sparsekit.bsr_linear(*stored, torch.randn(1, 32), None, 4, 32, 1, scales32)
    with pytest.raises(ValueError, match=r"buffer 'scales' of the bsr format must be float32 "
                                         r"of shape \(4,\) or \(4, groups\) with groups dividing "
                                         r"24 into groups of a multiple of 32 inputs"):
        FORMATS["bsr"].from_dense(ref, scales=scales)
    _, scales64, ref64 = _grouped_weight(4, 128, 64)
    with pytest.raises(ValueError, match=r"buffer 'scales' of shape \(4, 2\) makes groups of 64 "
                                         r"inputs, which blocks 48 wide do not fill whole"):
        FORMATS["bsr"].from_dense(ref64, scales=scales64, block=(4, 48))
    bsr = FORMATS["bsr"].from_dense(ref64, value_dtype=torch.int8, block=(4, 48))
    with pytest.raises(ValueError, match=r"makes groups of 64 inputs, which blocks 48 wide"):
        FORMATS["bsr"].from_state({**bsr.state_dict(), "scales": scales64}, (4, 128))
    csr = FORMATS["csr16"].from_dense(ref, value_dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"number of groups dividing in_features=24"):
        torch.ops.sparsekit.csr_linear(csr.values, csr.col_indices, csr.rowptr, x, None, 24, 1,
                                       torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"of the fanin format must be float32 of shape "
                                         r"\(4,\) or \(4, groups\) with groups dividing 24, "
                                         r"got torch.float32 \(4, 5\)"):
        FORMATS["fanin"].from_dense(ref, scales=torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"\(4,\) \(W8A8 kernels take one scale per row\)"):
        DENSE_LOWP.from_dense(ref, scales=scales, activation_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"or \(4, groups\) with groups dividing 24, got "
                                         r"torch.float32 \(4, 5\)"):
        DENSE_LOWP.from_dense(ref, scales=torch.ones(4, 5))


def _blocks_kept(rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """A ``(rows, cols)`` mask keeping about half of its ``block`` blocks (edges cropped)."""
    (r, c), g = block, torch.Generator().manual_seed(2)
    grid = torch.rand(-(-rows // r), -(-cols // c), generator=g) < 0.5
    return grid.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]


def _fan_in(rows: int, cols: int, k: int) -> torch.Tensor:
    """A ``(rows, cols)`` mask keeping ``k`` random inputs of every row (constant fan-in)."""
    order = torch.rand(rows, cols, generator=torch.Generator().manual_seed(3)).argsort(-1)
    return torch.zeros(rows, cols, dtype=torch.bool).scatter(1, order[:, :k], True)


def _n_of_m(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``weight`` with the m - n smallest of every m inputs zeroed (N:M)."""
    groups = weight.reshape(weight.shape[0], -1, m)
    drop = groups.abs().argsort(-1)[..., : m - n]
    return groups.scatter(-1, drop, 0.0).reshape(weight.shape)


def test_a_stored_layout_with_groups_loads_and_a_malformed_one_is_refused():
    _, scales, ref = _grouped_weight(4, 24, 8)
    fmt = DENSE_LOWP.from_dense(ref, scales=scales)
    state = dict(fmt.state_dict())
    again = DENSE_LOWP.from_state(state, (4, 24))
    assert torch.equal(again.to_dense(), ref)
    for bad, error in ((torch.ones(4, 5), r"\(4, groups\) with groups dividing 24"),
                       (scales.double(), r"must be float32 of shape"),
                       (torch.ones(4, 0), r"\(4, groups\)")):
        with pytest.raises(ValueError, match=error):
            DENSE_LOWP.from_state({**state, "scales": bad}, (4, 24))


def _linear_names(model: nn.Module) -> list[str]:
    """The names of the pruned (quantized) linear layers of ``model``."""
    pruned = {id(layer.module) for layer in layers_of(model)}
    return [n for n, m in model.named_modules() if id(m) in pruned]


def _assert_same_grids(restored: nn.Module, model: nn.Module) -> None:
    """``restored``'s quantized layers hold ``model``'s weights and grids, bit for bit."""
    for name in _linear_names(model):
        again, layer = restored.get_submodule(name), model.get_submodule(name)
        assert torch.equal(again.weight, layer.weight), name
        assert torch.equal(attached_scales(again), attached_scales(layer)), name


def _grouped_model() -> nn.Module:
    model = build()
    sparsekit.llm.prune(model, tokens(4, 16), method="sparsegpt", quantize="int8",
                        group_size=16)
    return model


@needs_kernels
@pytest.mark.parametrize("options", [{}, {"weight_dtype": "int8"},
                                     {"weight_dtype": "int8", "activation_dtype": "int8"}])
def test_compile_stores_grouped_codes_only_in_formats_that_read_them(options):
    """Forced to choose among the int8 formats, the grouped layers take ``dense_lowp`` or
    ``bitmap`` (whose kernels read per-group scales; ``nm`` only groups of 64 inputs or
    more, these are of 16) with exactly their codes; W8A8 leaves them on float inputs, and
    the compiled model computes what the pruned one does."""
    model = _grouped_model()
    compiled = sparsekit.compile(model, IDS, cache=False, formats=["dense_lowp", "bitmap", "nm"],
                                 **options)
    for name in _linear_names(model):
        got = compiled.get_submodule(name)
        linear = got.group.linear if hasattr(got, "group") else got  # a fused member
        assert isinstance(linear, CompiledLinear), name
        fmt = linear.format
        assert fmt.name in ("dense_lowp", "bitmap") and fmt.activation_dtype is None
        assert fmt.scales.dim() == 2 and fmt.scales.shape[1] == fmt.in_features // 16
        assert torch.equal(fmt.to_dense()[got.start:got.start + got.out_features]
                           if hasattr(got, "group") else fmt.to_dense(),
                           model.get_submodule(name).weight)
    values = {row.name: row.extra["values"]
              for row in sparsekit.engine.report(compiled, IDS).rows}
    assert values["model.layers.0.mlp.down_proj"] == "int8 g16"
    if not options:  # weight_dtype="int8" rounds the unquantized lm_head too
        with torch.no_grad():
            torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits,
                                       rtol=1e-4, atol=1e-4)


def _grouped_pruned(group: int, prune: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """Two layers pruned by ``prune`` on int8 grids of ``group`` inputs (no code rounds to 0:
    the mask is ``prune``'s)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    for layer in (model[0], model[2]):
        with torch.no_grad():
            weight = prune(layer.weight.sign() * (0.5 + torch.rand_like(layer.weight)))
            scales = int8_scales(weight, group)
            codes, _ = quantize_int8(weight, scales, group)
            layer.weight.copy_(dequantize_int8(codes, scales, group))
        attach_scales(layer, scales)
    return model


def _two_four(weight: torch.Tensor) -> torch.Tensor:
    return _n_of_m(weight, 2, 4)


def _blocks16(weight: torch.Tensor) -> torch.Tensor:
    return weight * _blocks_kept(*weight.shape, (16, 16))


def _random80(weight: torch.Tensor) -> torch.Tensor:
    return weight * (torch.rand(weight.shape, generator=torch.Generator().manual_seed(4)) < 0.2)


def _fan_in_quarter(weight: torch.Tensor) -> torch.Tensor:
    return weight * _fan_in(*weight.shape, weight.shape[1] // 4)


@needs_kernels
@pytest.mark.parametrize(("name", "prune", "small"), [
    ("nm", _two_four, 32), ("bsr", _blocks16, 16), ("csr16", _random80, None),
    ("fanin", _fan_in_quarter, None)])
def test_compile_packs_grouped_pruned_layers_in_their_format_and_they_save_and_decompile_exactly(
    tmp_path, name, prune, small,
) -> None:
    """Groups of 64 inputs fill whole words of N:M fields and whole 16x16 blocks: a grouped
    2:4 layer compiles to ``nm`` (its bytes, not bitmap's), a grouped block-pruned one to
    ``bsr``, an 80 % pruned one to ``csr16`` and a constant fan-in one to ``fanin`` when
    forced; each keeps its grid through ``sparsekit.save`` / ``load`` and ``decompile``,
    and a grid of smaller groups (32 inputs for ``nm``, 16 for ``bsr``; CSR16 and fan-in take
    any) stays off the format."""
    model = _grouped_pruned(64, prune)
    x = torch.randn(5, 256)
    compiled = sparsekit.compile(model, x, cache=False, formats=[name])
    for i in (0, 2):
        fmt = compiled[i].format
        assert fmt.name == name
        if name in ("nm", "bsr"):
            assert (fmt.n, fmt.m) == (2, 4) if name == "nm" else fmt.block == (16, 16)
        assert torch.equal(fmt.scales, attached_scales(model[i]))
        assert torch.equal(fmt.to_dense(), model[i].weight)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(x[:1]), model(x[:1]), rtol=1e-4, atol=1e-4)
    sparsekit.save(compiled, tmp_path / "c.safetensors")
    again = sparsekit.compile(_grouped_pruned(64, prune), x, cache=False, formats=[name])
    sparsekit.load(again, tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), compiled(x))
    restored = sparsekit.engine.decompile(compiled)
    for i in (0, 2):
        assert torch.equal(restored[i].weight, model[i].weight)
        assert torch.equal(attached_scales(restored[i]), attached_scales(model[i]))
    if small is not None:
        smaller = sparsekit.compile(_grouped_pruned(small, prune), x, cache=False,
                                    formats=[name, "dense"])
        assert all(smaller[i].format.name == "dense" for i in (0, 2))


@needs_kernels
def test_a_compiled_grouped_model_saves_reloads_and_decompiles_exactly(tmp_path):
    model = _grouped_model()
    compiled = sparsekit.compile(model, IDS, cache=False, formats=["dense_lowp"])
    sparsekit.save(compiled, tmp_path / "c.safetensors")
    # a skeleton compiled with one scale per row takes the file's groups
    other = sparsekit.compile(build(), IDS, cache=False, formats=["dense_lowp"],
                              weight_dtype="int8")
    sparsekit.load(other, tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(other(IDS).logits, compiled(IDS).logits)
    _assert_same_grids(sparsekit.engine.decompile(compiled), model)


@needs_kernels
def test_teal_on_a_grouped_model_keeps_its_codes_and_groups_in_activation_sparse_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _act_clock(monkeypatch)  # every activation-sparse layer wins
    model = _grouped_model()
    teal = _teal(model)
    compiled = sparsekit.compile(model, IDS, activation_sparsity=teal, cache=False)
    act = [m for m in compiled.modules() if isinstance(m, ActivationSparseLinear)]
    assert act and all(m.kernel != "act_bitmap_qgemv" for m in act)
    for m in act:  # the pruned model's own codes (int8, a quarter of float32's bytes)
        assert m.to_dense().dtype == torch.int8 and m.scales.shape == (m.out_features,
                                                                       m.in_features // 16)
    rows = [r for r in sparsekit.engine.report(compiled, IDS).rows
            if r.extra.get("format") == "activation"]
    assert rows and all(r.extra["values"] == "int8 g16" for r in rows)
    with _thresholded(model, teal.thresholds), torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compiled(IDS[:, :1]).logits, model(IDS[:, :1]).logits,
                                   rtol=1e-4, atol=1e-4)


def test_the_w8a8_activation_sparse_kernel_refuses_a_grouped_grid():
    layer = nn.Linear(32, 4)
    attach_scales(layer, int8_scales(layer.weight, 16))
    for value_dtype in (None, torch.int8):
        with pytest.raises(ValueError, match=r"kernel 'act_bitmap_qgemv' takes one int8 scale "
                                             r"per row, and linear's grid has one per group"):
            ActivationSparseLinear.from_linear(layer, 0.1, value_dtype=value_dtype,
                                               kernel="act_bitmap_qgemv")
    codes, scales = quantize_int8(layer.weight.detach(), attached_scales(layer), 16)
    with pytest.raises(ValueError, match=r"kernel 'act_bitmap_qgemv' takes one int8 scale per "
                                         r"row, got scales of shape \(4, 2\)"):
        ActivationSparseLinear(codes, None, 0.0, scales=scales, kernel="act_bitmap_qgemv")
    with pytest.raises(ValueError, match=r"int8 weight needs float scales of shape \(4,\) or "
                                         r"\(4, groups\) with groups dividing 32, got \(4, 3\)"):
        ActivationSparseLinear(codes, None, 0.0, scales=torch.ones(4, 3))


@needs_kernels
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
@pytest.mark.parametrize(("rows", "cols", "group"), [(37, 256, 128), (300, 96, 32), (9, 10, 5),
                                                     (6, 64, 64), (520, 48, 1), (2100, 48, 16)])
@pytest.mark.parametrize("threads", [1, 2])
def test_activation_sparse_kernels_read_the_groups(isa, kernel, rows, cols, group, threads):
    """Every kept input's group scales its column: one row through the kernel, several through
    the layer's own storage, against the thresholded dequantized product (half of the weights
    pruned; inputs under the threshold skipped, a whole group of them in the first row)."""
    torch.manual_seed(0)
    _, scales, ref = _grouped_weight(rows, cols, group)
    ref = ref * (torch.rand(rows, cols) < 0.5)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(ref)
    attach_scales(layer, scales)
    act = ActivationSparseLinear.from_linear(layer, 0.5, kernel=kernel, threads=threads)
    assert act.to_dense().dtype == torch.int8 and torch.equal(act.scales, scales)
    x = torch.randn(3, cols)
    x[0, :group] = 0.1
    kept = x.where(x.abs() >= 0.5, 0.0)
    expected = kept.double() @ ref.double().t() + layer.bias.double()
    with kernels.use_isa(isa), torch.no_grad():
        for row in range(3):
            torch.testing.assert_close(act(x[row]).double(), expected[row], rtol=1e-5,
                                       atol=1e-5)
        torch.testing.assert_close(act(x).double(), expected, rtol=1e-5, atol=1e-5)
        y16 = act.to(torch.bfloat16)(x[0].bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), kept[0].bfloat16().double() @ ref.double().t()
                               + layer.bias.bfloat16().double(), rtol=2e-2, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("fast", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
def test_grouped_activation_sparse_layers_round_trip_through_save_pretrained(
    tmp_path, monkeypatch, fast,
) -> None:
    monkeypatch.setattr(autotune, "_time_block", _kernel_clock(fast))
    model = _grouped_model()
    compiled = sparsekit.compile(model, IDS, activation_sparsity=_teal(model), cache=False)
    layers = {n: m for n, m in compiled.named_modules() if isinstance(m, ActivationSparseLinear)}
    assert layers and {m.kernel for m in layers.values()} == {fast}
    assert all(m.scales.dim() == 2 for m in layers.values())
    back = sparsekit.from_pretrained(sparsekit.save_pretrained(compiled, tmp_path))
    sa, sb = compiled.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        for step in (IDS, IDS[:, :1]):  # prefill and one decode step (the kernel)
            assert torch.equal(back(step).logits, compiled(step).logits)


@needs_kernels
def test_a_grouped_activation_sparse_layer_takes_loaded_scales():
    """The kernels read the grid transposed, a copy bound to the layer: a load of other
    scales (copied into the buffer) reaches the next decode step."""
    _, scales, ref = _grouped_weight(8, 64, 16)
    layer = nn.Linear(64, 8)
    with torch.no_grad():
        layer.weight.copy_(ref)
    attach_scales(layer, scales)
    act = ActivationSparseLinear.from_linear(layer, 0.0)
    x = torch.randn(64)
    first = act(x)
    state = act.state_dict()
    state["scales"] = scales * 2
    act.load_state_dict(state)
    torch.testing.assert_close(act(x), 2 * first - layer.bias.detach(), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_activation_sparse_ops_check_grouped_scales():
    codes = torch.ones(8, 6, dtype=torch.int8)  # wt: (in, out)
    x, t = torch.randn(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"number of groups dividing in_features=8"):
        torch.ops.sparsekit.act_gemv(codes, x, t, None, 1, torch.ones(3, 6))
    with pytest.raises(RuntimeError, match=r"scales.size\(1\) must be 6"):
        torch.ops.sparsekit.act_gemv(codes, x, t, None, 1, torch.ones(2, 5))
    y = torch.ops.sparsekit.act_gemv(codes, x, t, None, 1, torch.tensor([[1.0] * 6, [2.0] * 6]))
    torch.testing.assert_close(y, (x[:4].sum() + 2 * x[4:].sum()).expand(6))


@pytest.mark.parametrize("dense_dtype", [None, "int8"])
def test_save_pretrained_keeps_the_grouped_grid_bit_identical(tmp_path, dense_dtype):
    model = _grouped_model()
    sparsekit.pretrained.save_pretrained(model, tmp_path, dense_dtype=dense_dtype)
    _assert_same_grids(sparsekit.pretrained.from_pretrained(tmp_path), model)


@needs_kernels
def test_a_grouped_layer_does_not_reuse_the_cached_decision_of_per_row_scales(
    tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sparsekit.engine import decisions

    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")

    def model(group: int | None) -> nn.Module:
        torch.manual_seed(0)
        layer = nn.Linear(64, 32)
        with torch.no_grad():  # no weight rounds to 0 on either grid: the same nonzeros
            layer.weight.copy_(layer.weight.sign() * (0.5 + torch.rand(32, 64) / 2))
        scales = int8_scales(layer.weight, group)
        with torch.no_grad():
            codes, _ = quantize_int8(layer.weight, scales, group)
            layer.weight.copy_(dequantize_int8(codes, scales, group))
        attach_scales(layer, scales)
        return nn.Sequential(layer)

    x = torch.randn(2, 64)
    sparsekit.compile(model(None), x, formats=["dense_lowp"])
    grouped = sparsekit.compile(model(16), x, formats=["dense_lowp"])
    assert not grouped.sparsekit_choices["0"].get("cached")
    assert len(list((tmp_path / "decisions").glob("*.json"))) == 2
    assert grouped[0].format.scales.shape == (32, 4)


@pytest.mark.parametrize("scales", [[0.5] * 4, "0.5"])
def test_scales_that_are_no_tensor_are_named(scales):
    with pytest.raises(TypeError, match=r"scales must be a floating tensor of shape \(4,\)"):
        DENSE_LOWP.from_dense(torch.randn(4, 8), scales=scales)


def test_is_grouped_tells_scales_per_group_from_scales_per_row():
    weight = torch.randn(4, 32)
    assert is_grouped(int8_scales(weight, 16)) and not is_grouped(int8_scales(weight))
    assert not is_grouped(None)
