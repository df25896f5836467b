import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from _kernels import kernels_ok
from rich.table import Table
from torch import nn

from sparsekit.report import LayerRow, Report, report


def mlp() -> nn.Sequential:
    """Linear(4, 3) with 4 of 12 weights zero, Linear(3, 2) with 3 of 6 zero."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 3], [0, 4, 5, 0], [6, 7, 0, 8]]))
        model[2].weight.copy_(torch.tensor([[0.0, 1, 0], [2, 0, 3]]))
    return model


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=2))


def test_linear_counts_with_batch():
    r = report(mlp(), torch.randn(5, 4))
    assert [(row.name, row.kind, row.shape) for row in r.rows] == [
        ("0", "Linear", (3, 4)),
        ("2", "Linear", (2, 3)),
    ]
    fc1, fc2 = r.rows
    assert (fc1.params, fc1.nonzeros, fc1.sparsity) == (12, 8, pytest.approx(4 / 12))
    assert (fc2.params, fc2.nonzeros, fc2.sparsity) == (6, 3, pytest.approx(0.5))
    assert (fc1.dense_flops, fc1.sparse_flops) == (2 * 4 * 3 * 5, 2 * 8 * 5)
    assert (fc2.dense_flops, fc2.sparse_flops) == (2 * 3 * 2 * 5, 2 * 3 * 5)
    assert r.totals == {
        "params": 18,
        "nonzeros": 11,
        "sparsity": pytest.approx(7 / 18),
        "dense_flops": 120 + 60,
        "sparse_flops": 80 + 30,
        "flops_complete": True,
    }


def test_linear_counts_every_leading_dim():
    r = report(nn.Linear(4, 3), torch.randn(2, 7, 4))
    assert r.rows[0].name == ""
    assert r.rows[0].dense_flops == 2 * 4 * 3 * (2 * 7)


def test_linear_without_inputs_is_per_row():
    fc1, fc2 = report(mlp()).rows
    assert (fc1.dense_flops, fc1.sparse_flops) == (2 * 12, 2 * 8)
    assert (fc2.dense_flops, fc2.sparse_flops) == (2 * 6, 2 * 3)
    assert report(mlp()).totals["flops_complete"]


def test_conv_flops():
    model = convnet()
    with torch.no_grad():
        model[0].weight[0] = 0  # one of 4 output channels: 18 of 72 weights
    conv1, conv2 = report(model, torch.randn(1, 2, 8, 8)).rows
    # conv1: output 1x4x8x8, each output sums 2 in-channels x 3x3
    assert conv1.dense_flops == 2 * (1 * 4 * 8 * 8) * (2 * 3 * 3) == 9216
    assert (conv1.nonzeros, conv1.sparse_flops) == (54, 9216 * 54 // 72)
    # conv2: output 1x4x6x6, each output sums 4/2 in-channels x 3x3
    assert conv2.dense_flops == 2 * (1 * 4 * 6 * 6) * (2 * 3 * 3) == 5184
    assert conv2.shape == (4, 2, 3, 3)


def test_conv_without_inputs_is_unknown():
    r = report(nn.Sequential(nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(4, 1)))
    assert [(row.kind, row.dense_flops, row.sparse_flops) for row in r.rows] == [
        ("Conv1d", None, None),
        ("Linear", 8, 8),
    ]
    totals = r.totals
    assert (totals["dense_flops"], totals["flops_complete"]) == (8, False)
    assert r.to_markdown().splitlines()[-1].count("**≥8**") == 2


def test_shared_layer_counts_every_call_and_uncalled_is_unknown():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.shared(x))

    shared, unused = report(Model(), torch.randn(2, 3)).rows
    assert shared.dense_flops == 2 * (2 * 2 * 9)
    assert unused.dense_flops is None


def test_masks_override_weights():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0] = True
    masks = SimpleNamespace(masks={"0.weight": mask})
    fc1, fc2 = report(mlp(), torch.randn(5, 4), masks=masks).rows
    # the mask keeps row 0, [1, 0, 2, 3]: its 0 is no nonzero (it was counted as kept)
    assert (fc1.nonzeros, fc1.sparse_flops) == (3, 2 * 3 * 5)
    assert fc2.nonzeros == 3  # not in masks: counted from the weight


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        report(torch.randn(2))
    with pytest.raises(TypeError, match="example_inputs"):
        report(mlp(), [torch.randn(1, 4)])
    with pytest.raises(TypeError, match="masks"):
        report(mlp(), masks={"0.weight": torch.ones(3, 4)})
    wrong = SimpleNamespace(masks={"0.weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['0.weight'\].*\(3, 4\)"):
        report(mlp(), masks=wrong)


def test_hooks_removed_and_modes_restored():
    model = mlp().train()
    model[2].eval()
    report(model, torch.randn(5, 4))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert all(not m._forward_hooks for m in model.modules())

    with pytest.raises(ValueError, match="example_inputs"):
        report(model, torch.randn(5, 7))  # wrong feature size
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert all(not m._forward_hooks for m in model.modules())


def test_forward_runs_in_eval_without_grad():
    seen = []
    model = mlp()
    model[0].register_forward_hook(lambda m, a, o: seen.append((m.training, o.requires_grad)))
    report(model, torch.randn(5, 4))
    assert seen == [(False, False)]


def test_empty_model():
    r = report(nn.Sequential(nn.ReLU()), torch.randn(2))
    assert r.rows == []
    assert r.totals == {
        "params": 0,
        "nonzeros": 0,
        "sparsity": 0.0,
        "dense_flops": 0,
        "sparse_flops": 0,
        "flops_complete": True,
    }
    assert len(r.to_markdown().splitlines()) == 3


def test_to_dict_is_json():
    data = report(convnet(), torch.randn(1, 2, 8, 8)).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["rows"][0]["shape"] == [4, 2, 3, 3]
    assert data["totals"]["dense_flops"] == 9216 + 5184


def test_markdown():
    r = report(mlp(), torch.randn(5, 4))
    lines = r.to_markdown().splitlines()
    assert len(lines) == len(r.rows) + 3
    assert lines[0] == (
        "| layer | kind | shape | params | nonzeros | sparsity | dense FLOPs | sparse FLOPs |"
    )
    assert lines[2] == "| 0 | Linear | 3x4 | 12 | 8 | 33.3% | 120 | 80 |"
    assert lines[-1] == "| **total** |  |  | **18** | **11** | **38.9%** | **180** | **110** |"
    assert str(r) == r.to_markdown()


def test_markdown_human_units():
    model = nn.Linear(1000, 600, bias=False)
    nn.init.ones_(model.weight)
    line = report(model, torch.randn(2500, 1000)).to_markdown().splitlines()[2]
    assert line == "|  | Linear | 600x1000 | 600,000 | 600,000 | 0.0% | 3.0G | 3.0G |"


def test_rich_table():
    r = report(mlp(), torch.randn(5, 4))
    table = r.to_rich()
    assert isinstance(table, Table)
    assert table.row_count == len(r.rows) + 1
    assert [c.header for c in table.columns][-2:] == ["dense FLOPs", "sparse FLOPs"]
    assert table.columns[3].justify == "right"


def test_extra_columns():
    r = report(mlp(), torch.randn(5, 4))
    r.rows[0].extra.update(format="csr", ms=0.125)
    r.rows[1].extra["ms"] = 0.25
    lines = r.to_markdown().splitlines()
    assert lines[0].endswith("| format | ms |")
    assert lines[1].endswith("| :--- | ---: |")
    assert lines[2].endswith("| csr | 0.125 |")
    assert lines[3].endswith("|  | 0.25 |")
    rows = r.to_dict()["rows"]
    assert (rows[0]["format"], rows[0]["ms"], rows[1]["format"]) == ("csr", 0.125, None)
    assert [c.header for c in r.to_rich().columns][-2:] == ["format", "ms"]


def test_extra_columns_cannot_shadow_builtins():
    r = Report([LayerRow("fc", "Linear", (1, 1), 1, 1, None, None, extra={"params": 3})])
    with pytest.raises(ValueError, match="params"):
        r.to_dict()
    with pytest.raises(ValueError, match="params"):
        r.to_markdown()


def test_engine_report_shows_value_dtype_bytes_and_quantization_error():
    from sparsekit.engine import compile as engine_compile
    from sparsekit.engine import report as engine_report

    model, x = mlp(), torch.randn(2, 4)
    compiled = engine_compile(model, x, formats="dense", rows=(1,))
    rows = engine_report(compiled, x).rows
    assert [r.extra["values"] for r in rows] == ["float32", "float32"]
    assert [r.extra["bytes"] for r in rows] == [12 * 4, 6 * 4]  # the dense weight buffers
    assert [r.extra["quant err"] for r in rows] == [0.0, 0.0]  # nothing was rounded
    assert json.dumps(engine_report(compiled).to_dict())


def test_engine_report_tells_w8a8_layers_from_int8_weight_layers():
    """A W8A8 layer (int8 weights and int8-quantized inputs) read "int8" like a layer that
    keeps float inputs; the report names the activation dtype too."""
    from sparsekit.engine import compile as engine_compile
    from sparsekit.engine import report as engine_report

    if not kernels_ok():
        pytest.skip("compiled kernels unavailable")
    model, x = mlp(), torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        w8a8 = engine_compile(model, x, formats="dense_lowp", weight_dtype="int8",
                              activation_dtype="int8", rows=(1,), cache=False)
        w8 = engine_compile(model, x, formats="dense_lowp", weight_dtype="int8", rows=(1,),
                            cache=False)
    assert [r.extra["values"] for r in engine_report(w8a8, x).rows] == ["int8 (W8A8)"] * 2
    assert [r.extra["values"] for r in engine_report(w8, x).rows] == ["int8"] * 2


def test_layers_that_store_only_their_kept_weights_are_counted():
    """A SparseLinear and the layers of sparsekit.compile hold no dense weight: they were
    left out (a SparseLinear-only model reported 0 parameters, "complete"). They count by
    their shape and nonzeros, in model order, their FLOPs measured like the others'."""
    import sparsekit
    from sparsekit import SparseLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(),
                          SparseLinear.from_linear(nn.Linear(5, 5), torch.eye(5, dtype=torch.bool)),
                          nn.Linear(5, 3))
    x = torch.randn(4, 6)
    rep = report(model, x)
    assert [r.name for r in rep.rows] == ["0", "2", "3"]
    assert rep.rows[1].kind == "SparseLinear" and rep.rows[1].shape == (5, 5)
    assert rep.totals["params"] == 30 + 25 + 15 and rep.totals["nonzeros"] == 30 + 5 + 15
    assert rep.rows[1].dense_flops == 2 * 4 * 25 and rep.rows[1].sparse_flops == 2 * 4 * 5
    plain = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        plain[0].weight[:, ::2] = 0
    compiled = sparsekit.compile(plain, torch.randn(2, 8), formats=["dense"], cache=False)
    assert report(compiled).totals["params"] == 64
    assert report(compiled).totals["nonzeros"] == report(plain).totals["nonzeros"] == 32
