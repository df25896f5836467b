"""SparseLinear and ActivationSparseLinear under hostile arguments and forged states.

A load is checked whole before anything is copied: torch's loader copies the entries one by
one and the products index with the loaded structure, so a refused load used to leave a
forged ``rowptr``/``col`` (or column index, or bitmap) in place for the next forward to read
and write out of bounds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekit
from sparsekit._checks import ArgumentTypeError
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.sparse_linear import SparseLinear

# -- SparseLinear: load_state_dict ------------------------------------------------------------


def _sparse(seed: int = 0, density: float = 0.6) -> SparseLinear:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return SparseLinear(4, 3, torch.rand(3, 4, generator=g) < density)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return now.keys() == before.keys() and all(
        now[k].dtype == v.dtype and torch.equal(now[k], v) for k, v in before.items())


def _damaged(layer: SparseLinear, damage: str) -> dict[str, object]:
    state: dict[str, object] = _snapshot(layer)
    nnz = layer.nnz
    if damage == "rowptr past nnz":
        state["rowptr"][1] = 1000
    elif damage == "column past in_features":
        state["col"][-1] = 100000
    elif damage == "negative column":
        state["col"][0] = -1
    elif damage == "rowptr that wraps in int32":
        state["rowptr"] = torch.tensor([0, 2_000_000_000, -2_000_000_000, nnz],
                                       dtype=torch.int32)
    elif damage == "float rowptr":
        state["rowptr"] = state["rowptr"].float()
    elif damage == "col no tensor":
        state["col"] = state["col"].tolist()
    elif damage == "values one short":
        state["values"] = state["values"][:-1]
    elif damage == "integer values":
        state["values"] = torch.ones(nnz, dtype=torch.int64)
    elif damage == "another structure, bad bias":  # the structure alone would load
        state = _snapshot(_sparse(1, 0.9)) | {"bias": torch.zeros(5)}
    elif damage == "bad rowptr alone":  # strict=False: col is the layer's own
        state = {"rowptr": state["rowptr"].flip(0).contiguous()}
    return state


DAMAGES = ["rowptr past nnz", "column past in_features", "negative column",
           "rowptr that wraps in int32", "float rowptr", "col no tensor", "values one short",
           "integer values", "another structure, bad bias", "bad rowptr alone"]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("damage", DAMAGES)
def test_sparse_linear_load_refuses_a_forged_state_whole(damage, strict):
    """The base loader copied a same-shaped forged rowptr/col into the buffers the products
    index with (the next forward segfaulted or read out of bounds), strict=False too."""
    layer = _sparse()
    x = torch.randn(2, 4)
    before, y = _snapshot(layer), layer(x)
    with pytest.raises(RuntimeError, match=r"SparseLinear \(root\): (rowptr|col|values|bias)"):
        layer.load_state_dict(_damaged(layer, damage), strict=strict)
    assert _same(layer, before)
    assert layer._structure.rowptr is layer.rowptr and layer._structure.col is layer.col
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("damage", ["rowptr past nnz", "column past in_features",
                                    "negative column"])
def test_sparse_linear_structure_check_names_the_layer_and_value(damage):
    layer = _sparse()
    with pytest.raises(ValueError, match=r"SparseLinear 0: (rowptr must rise from 0 to "
                                         r"len\(col\)=\d+, got|col must hold .* got values)"):
        layer.structure_from_state({f"0.{k}": v for k, v in _damaged(layer, damage).items()},
                                   "0.")


def test_sparse_linear_still_loads_a_good_state_of_another_structure():
    layer, other = _sparse(), _sparse(1, 0.9)
    layer.load_state_dict(other.state_dict())
    assert layer.nnz == other.nnz and _same(layer, _snapshot(other))
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), other(x))


def test_structure_from_state_names_missing_keys():
    """An empty state was a bare KeyError 'rowptr'."""
    with pytest.raises(ValueError, match=r"state has no \['rowptr', 'col'\]"):
        _sparse().structure_from_state({})
    with pytest.raises(ValueError, match=r"state has no \['2.col'\]"):
        _sparse().structure_from_state({"2.rowptr": _sparse().rowptr}, "2.")


def test_optimizer_step_after_loading_another_structure_says_what_to_do():
    """Adam's moments kept the old size: the next step failed inside torch with "The size
    of tensor a (8) must match the size of tensor b (12)"."""
    layer = _sparse()
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    layer.load_state_dict(_sparse(1, 0.95).state_dict())
    values = layer.values.detach().clone()
    layer(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"optimizer: its state \['exp_avg', 'exp_avg_sq'\] "
                                         r".*\(optimizer\.load_state_dict\)"):
        opt.step()
    assert torch.equal(layer.values, values)  # refused before the step changed anything
    opt.state.pop(layer.values)  # what the message says: drop the old state
    opt.step()
    assert not torch.equal(layer.values, values)


def test_optimizer_step_after_set_structure_without_it_says_what_to_do():
    layer = _sparse()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    layer.set_structure(torch.ones(3, 4, dtype=torch.bool))
    layer(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"momentum_buffer.* set_structure"):
        opt.step()


def test_optimizer_loaded_with_the_checkpoint_steps_after_another_structure():
    saved, layer = _sparse(1, 0.95), _sparse()
    saved_opt, opt = torch.optim.Adam(saved.parameters()), torch.optim.Adam(layer.parameters())
    for m, o in ((saved, saved_opt), (layer, opt)):
        m(torch.randn(2, 4)).sum().backward()
        o.step()
    layer.load_state_dict(saved.state_dict())
    opt.load_state_dict(saved_opt.state_dict())
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()


# -- SparseLinear: arguments ------------------------------------------------------------------


@pytest.mark.parametrize("build, error, match", [
    (lambda m: SparseLinear(4, 3, m, device="nonsense"), ValueError, "device 'nonsense'"),
    (lambda m: SparseLinear(4, 3, m, device="meta"), ValueError, "device must be a device"),
    (lambda m: SparseLinear(4, 3, m.to("meta")), ValueError, "mask is on the meta device"),
    (lambda m: SparseLinear.from_linear(nn.Linear(4, 3, device="meta")), ValueError,
     "linear's weight is on the meta device"),
    (lambda m: SparseLinear.from_linear(nn.Conv1d(4, 3, 1)), ArgumentTypeError,
     "linear must be an nn.Linear, got Conv1d"),
    (lambda m: SparseLinear(4, 3, m)(torch.ones(2, 4, dtype=torch.long)), ArgumentTypeError,
     "x must have the weight's dtype torch.float32, got torch.int64"),
    (lambda m: SparseLinear(4, 3, m)([[1.0] * 4]), ArgumentTypeError, "x must be a torch.Tensor"),
])
def test_sparse_linear_names_bad_arguments(build, error, match):
    """torch's RuntimeError for an unknown device, NotImplementedError from nonzero() on
    meta, and plain TypeErrors before."""
    with pytest.raises(error, match=match):
        build(torch.rand(3, 4) > 0.4)


# -- ActivationSparseLinear: loading ----------------------------------------------------------


def _weight(out: int = 300, inp: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < 0.5] = 0
    return w


def _bit_past_out(state: dict[str, torch.Tensor]) -> None:
    """Move one stored bit of column 0's last block past out_features=300 (same count)."""
    bits = state["bitmap"][0, -1].to(torch.int32) & 0xFFFF  # words of outputs 256..511
    word = int(bits.nonzero()[0])
    low = int(bits[word]) & -int(bits[word])  # its lowest bit
    state["bitmap"][0, -1, word] = torch.tensor(int(bits[word]) ^ low).to(torch.int16)
    state["bitmap"][0, -1, 15] |= torch.tensor(-32768, dtype=torch.int16)  # output 511


def _forge(kernel: str, damage: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if damage == "every bit set":
        state["bitmap"].fill_(-1)
    elif damage == "bit past out_features":
        _bit_past_out(state)
    elif damage == "offsets shifted":
        state["offsets"][0, 1] += 1
    elif damage == "row past its block":
        state["row_indices"].fill_(30000)
    elif damage == "colptr falls":
        state["colptr"][0, 1] = state["values"].numel()
    elif damage == "int64 index":
        key = "row_indices" if kernel == "act_sparse_gemv" else "bitmap"
        state[key] = state[key].long()
    elif damage == "NaN threshold":
        state["threshold"][0] = float("nan")
    elif damage == "bitmap alone":  # strict=False: the other buffers are the layer's own
        state = {"bitmap": state["bitmap"].fill_(-1)}
    return state


ACT_DAMAGES = [("act_bitmap_gemv", d) for d in ("every bit set", "bit past out_features",
                                                "offsets shifted", "int64 index",
                                                "NaN threshold", "bitmap alone")] + [
    ("act_sparse_gemv", d) for d in ("row past its block", "colptr falls", "int64 index")]


@pytest.mark.parametrize("kernel, damage", ACT_DAMAGES)
def test_activation_load_state_dict_refuses_a_forged_index_whole(kernel, damage):
    """Neither kind was checked by load_state_dict: row_indices=30000 loaded and the next
    forward wrote out of bounds."""
    layer = ActivationSparseLinear(_weight(), torch.randn(300), 0.1, kernel=kernel)
    x = torch.randn(16)
    before, y = _snapshot(layer), layer(x)
    with pytest.raises(RuntimeError, match="layer: "):
        layer.load_state_dict(_forge(kernel, damage, _snapshot(layer)),
                              strict=damage != "bitmap alone")
    assert _same(layer, before)
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("kernel", ["act_gemv", "act_sparse_gemv", "act_bitmap_gemv"])
def test_activation_load_state_dict_still_loads_a_good_state(kernel):
    layer = ActivationSparseLinear(_weight(), torch.randn(300), 0.1, kernel=kernel)
    state = _snapshot(layer)
    state["bias"] += 1
    layer.load_state_dict(state)
    assert _same(layer, state)


def test_sparsekit_load_refuses_a_forged_bitmap(tmp_path):
    """expected_state validated act_sparse_gemv layers only: a bitmap with every bit set
    loaded, and the forward read past each column's values."""
    forged = nn.Sequential(ActivationSparseLinear(_weight(), None, 0.0, kernel="act_bitmap_gemv"))
    with torch.no_grad():
        forged[0].bitmap.fill_(-1)  # offsets unchanged
    path = tmp_path / "f.sk"
    sparsekit.save(forged, path)
    target = nn.Sequential(ActivationSparseLinear(_weight(), None, 0.0, kernel="act_bitmap_gemv"))
    before = _snapshot(target)
    with pytest.raises(ValueError, match="0: inconsistent bitmap columns"):
        sparsekit.load(target, path)
    assert _same(target, before)


# -- ActivationSparseLinear: arguments --------------------------------------------------------


def _act(**kwargs):
    args = dict(weight=_weight(), bias=None, threshold=0.0) | kwargs
    return ActivationSparseLinear(args.pop("weight"), args.pop("bias"), args.pop("threshold"),
                                  **args)


@pytest.mark.parametrize("build, error, match", [
    (lambda: _act(prefill=nn.Linear(16, 5)), ValueError,
     "prefill must compute this layer's product .* out_features=5"),
    (lambda: _act(prefill=nn.Linear(8, 300)), ValueError, "in_features=8"),
    (lambda: _act(bias=torch.ones(300, dtype=torch.int64)), ArgumentTypeError,
     "bias must be None or a floating-point tensor .* got dtype torch.int64"),
    (lambda: _act(bias=[0.0] * 300), ArgumentTypeError, "bias must be .* got list"),
    (lambda: _act(threshold=True), ArgumentTypeError, "threshold must be .* got True"),
    (lambda: _act(threshold=torch.ones(16, dtype=torch.bool)), ArgumentTypeError,
     "threshold must be .* torch.bool"),
    (lambda: _act(threshold="0.1"), ArgumentTypeError, "threshold must be .* got '0.1'"),
    (lambda: _act(threads=10**6), ValueError, r"threads must be an int in \[1, 65536\]"),
    (lambda: _act(weight=[[1.0]]), ArgumentTypeError, "weight must be a 2-D tensor"),
    (lambda: _act(dtype="float32"), ArgumentTypeError, "dtype must be a floating-point"),
    (lambda: _act(kernel=["act_gemv"]), ArgumentTypeError, "kernel must be one of"),
    (lambda: _act(weight=torch.ones(300, 16, dtype=torch.int8), scales=[1.0] * 300),
     ArgumentTypeError, "scales must be None or a float tensor"),
    (lambda: ActivationSparseLinear.tuned(nn.Linear(4, 4), 0.0, rows="ab"), ArgumentTypeError,
     "rows must be a sequence of row counts"),
    (lambda: ActivationSparseLinear.tuned(nn.Linear(4, 4), 0.0, rows=[-3, 0]), ValueError,
     r"rows must be an int ≥ 1, got -3"),
    (lambda: ActivationSparseLinear.tuned(nn.Linear(4, 4), 0.0, rows=[1, 2.0]),
     ArgumentTypeError, r"rows must be an int ≥ 1, got 2.0"),
])
def test_activation_sparse_linear_names_bad_arguments(build, error, match):
    """A (16 -> 5) prefill gave multi-row outputs of the wrong width, an int64 bias was cast,
    threshold=True meant 1.0, threads=10**6 failed in the kernel, a list weight or a string
    dtype raised AttributeError and a string threshold a raw TypeError."""
    with pytest.raises(error, match=match):
        build()


def test_activation_float_bias_of_another_dtype_is_stored_as_the_layer_dtype():
    layer = _act(bias=torch.randn(300, dtype=torch.float64))
    assert layer.bias.dtype == torch.float32
    assert _act(threshold=torch.zeros(16, dtype=torch.long)).threshold.dtype == torch.float32


def test_check_mask_names_the_mask_and_refuses_meta_and_wrong_shapes():
    keep = torch.ones(3, 4, dtype=torch.bool)
    layer = SparseLinear(4, 3, keep)
    assert torch.equal(layer.check_mask(keep), keep)
    with pytest.raises(ValueError, match=r"^masks\['x'\] is on the meta device"):
        layer.check_mask(keep.to("meta"), "masks['x']")
    with pytest.raises(ValueError, match="mask"):
        layer.check_mask(torch.ones(4, 3, dtype=torch.bool))
