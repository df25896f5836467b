"""Hostile inputs, round 29: compiled layers under torch.compile's autograd, fused
projections under ``torch.inference_mode``.

- Under ``torch.compile`` a backward through a compiled layer's product completed and left
  the layers before it without a gradient (``None``), with only torch's warning that no
  autograd kernel was registered; eager raised the documented ``ValueError``. The recording
  that raises is traced now, with ``fullgraph=True`` too.
- A fused group's member called twice with one inference tensor (a static input buffer
  refilled in place between two decode steps, the first of which called only that member)
  returned the first step's kept output.

Report-only probes found these (repros in the session's scratch directory); each test here
fails with the files before the fix.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

from sparsekit.engine import CompiledLinear
from sparsekit.engine.fused import FusedProjections, stack


def _pruned(rows: int, cols: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(cols, rows)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.5)
    return linear


@needs_kernels
@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("format", ["bitmap", "csr16"])
def test_backward_through_a_compiled_layer_raises_under_torch_compile(fullgraph, format):
    head = nn.Linear(16, 32)
    model = nn.Sequential(head, CompiledLinear.from_linear(_pruned(8, 32), format))
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph, backend="eager")
    y = compiled(x)  # the forward runs where autograd records
    with torch.no_grad():
        assert torch.allclose(y, model(x), atol=1e-6)
    with pytest.raises(ValueError, match=f"the {format} kernel has no backward"):
        y.sum().backward()
    assert head.weight.grad is None
    with pytest.raises(ValueError, match=f"the {format} kernel has no backward"):
        model(x).sum().backward()  # eager, as before


@needs_kernels
def test_fused_member_called_again_with_a_refilled_inference_buffer_recomputes():
    q, k = _pruned(16, 32, seed=1), _pruned(8, 32, seed=2)
    group = FusedProjections(CompiledLinear.from_linear(stack([q, k]), "bitmap"), [16, 8])
    fq, fk = group.members()
    with torch.inference_mode():
        buffer = torch.randn(1, 32)
        first = fq(buffer)  # a step that calls only q
        buffer.copy_(torch.randn(1, 32))  # the next step's input, in place
        second, other = fq(buffer), fk(buffer)
        assert not torch.equal(first, second)
        assert torch.allclose(second, q(buffer), atol=1e-5)
        assert torch.allclose(other, k(buffer), atol=1e-5)
