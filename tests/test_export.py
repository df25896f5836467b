"""A compiled model traces whole: every kernel is a torch.library op with a fake
implementation, and nothing in the call path breaks a Dynamo graph (issue 18, item 4)."""

import warnings

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

import sparsekit

pytestmark = needs_kernels


def _compiled(fmt: str, pattern: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    sparsekit.prune(model, 0.5 if pattern == "2:4" else 0.9, pattern=pattern)
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compiled = sparsekit.compile(model, x, formats=[fmt], cache=False)
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {fmt}
    return compiled, x


@pytest.mark.parametrize(("fmt", "pattern"), [("csr16", "unstructured"),
                                              ("bitmap", "unstructured"), ("nm", "2:4")])
def test_torch_export_of_a_compiled_model(fmt, pattern):
    compiled, x = _compiled(fmt, pattern)
    program = torch.export.export(compiled, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("sparsekit.") for t in targets), targets
    torch.testing.assert_close(program.module()(x), compiled(x))


@pytest.mark.parametrize(("fmt", "pattern"), [("csr16", "unstructured"), ("nm", "2:4")])
def test_fullgraph_torch_compile_of_a_compiled_model(fmt, pattern):
    compiled, x = _compiled(fmt, pattern)
    traced = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), compiled(x))


def _two_formats() -> nn.Module:
    from sparsekit.engine import CompiledLinear
    from sparsekit.engine.formats import CSR16, DenseFormat

    compiled, _ = _compiled("csr16", "unstructured")
    weight = compiled[0].to_dense()
    compiled[0] = CompiledLinear(CSR16.from_dense(weight), compiled[0].bias,
                                 format_large=DenseFormat.from_dense(weight), split=2)
    return compiled


@pytest.mark.parametrize("rows", [1, 4])
def test_a_layer_of_two_formats_traces_the_path_of_its_rows(rows):
    compiled, x = _two_formats(), torch.randn(rows, 64)
    program = torch.export.export(compiled, (x,))  # static rows: the cond takes one side
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("sparsekit.csr_linear.default") == (2 if rows <= 2 else 1), targets
    torch.testing.assert_close(program.module()(x), compiled(x))
    torch._dynamo.reset()
    traced = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), compiled(x))


@pytest.mark.parametrize("fmt", ["csr16", "bitmap", "dense", "two formats"])
@pytest.mark.parametrize("weight_dtype", [None, "int8"])
def test_a_program_exported_with_a_dynamic_batch_serves_every_row_count(fmt, weight_dtype):
    """The thread count of a kernel call depends on the rows: it was specialised (a guard
    on the traced batch, or threads=0 for a small one), and a layer of two formats traced
    only the side of the example's rows."""
    if fmt == "two formats":
        compiled = _two_formats()
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
        sparsekit.prune(model, 0.7)
        compiled = sparsekit.compile(model, torch.randn(4, 64), formats=[fmt], cache=False,
                                     weight_dtype=weight_dtype)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(compiled, (torch.randn(8, 64),),
                                  dynamic_shapes={"input": {0: batch}})
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert ("cond" in targets) == (fmt == "two formats"), targets
    for rows in (1, 2, 3, 300):
        x = torch.randn(rows, 64)
        assert torch.equal(program.module()(x), compiled(x))


def test_num_threads_carries_what_assume_constant_result_marks():
    # kernels.num_threads sets the decorator's mark itself (the decorator imports Dynamo,
    # about a second, on `import sparsekit`); this fails if torch marks some other way
    from sparsekit.engine import kernels

    def probe() -> int:
        return 1

    before = dict(vars(probe))
    torch.compiler.assume_constant_result(probe)
    marks = {k: v for k, v in vars(probe).items() if k not in before}
    assert marks and all(getattr(kernels.num_threads, k, None) == v for k, v in marks.items())
