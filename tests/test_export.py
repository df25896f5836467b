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
    program = torch.export.export(compiled, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("sparsekit.csr_linear.default") == (2 if rows <= 2 else 1), targets
    torch.testing.assert_close(program.module()(x), compiled(x))
    torch._dynamo.reset()
    traced = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(x), compiled(x))


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
