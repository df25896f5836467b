"""Bound kernel arguments: a layer's op and its arguments kept ready for the next call.

In a batch-1 decode step each layer runs once per token, and by its next call the weights
of all the other layers have gone through the caches: the interpreter's lines for its Python
are cold too, so every attribute lookup and method call before the op costs several times
its warm price (a 256 × 256 int8 layer took 117 µs cold against 11 µs warm; a tiny torch op
63 µs cold). A layer's hot path therefore fetches its buffers and constants once, into a
tuple in ``__dict__["_bound"]``, and calls the op's C++ entry with them directly.
:class:`BoundArguments` drops that tuple whenever a buffer may be replaced, so a stale
tensor is never passed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BoundArguments", "no_backward"]


@torch.library.custom_op("sparsekit::no_backward", mutates_args=())
def _no_backward(grad: torch.Tensor, shape: list[int], layer: str) -> torch.Tensor:
    """The gradient of a kernel's input that a compiled layer cannot give: raises. An op,
    not a ``raise`` in :class:`_NoBackward`'s backward, so that ``torch.compile`` (even with
    ``fullgraph=True``) traces the backward through its fake and the compiled backward raises
    when it runs, as the eager one does."""
    raise ValueError(
        f"the {layer} kernel has no backward: a compiled layer's product carries no "
        "gradient to its input. Compiled layers are for inference; take gradients from "
        "the masked model or SparseLinear layers"
    )


@_no_backward.register_fake
def _(grad: torch.Tensor, shape: list[int], layer: str) -> torch.Tensor:
    return grad.new_empty(shape)


class _NoBackward(torch.autograd.Function):
    """The identity on a kernel's product, whose backward raises (see :func:`no_backward`)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, layer: str) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.shape, ctx.dtype = layer, x.shape, x.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:  # type: ignore[override]
        return None, _no_backward(grad, list(ctx.shape), ctx.layer).to(ctx.dtype), None


def no_backward(y: torch.Tensor, x: torch.Tensor, layer: str) -> torch.Tensor:
    """``y``, a kernel's product of ``x``, recorded so that a backward through it raises
    where autograd would record it (``x`` requires grad, grad mode on): the sparsekit ops
    have no backward, and torch would otherwise only warn and leave ``x`` without its
    gradient. The forward is unchanged (a model whose dense layers' parameters require grad
    still runs). ``torch.compile`` traces the recording too, so a backward through a compiled
    graph raises alike (it had left the input without its gradient, with only torch's
    warning). The hot paths leave such inputs to their checked paths, which call this."""
    if x.requires_grad and torch.is_grad_enabled():
        return _NoBackward.apply(y, x, layer)
    return y


class BoundArguments(nn.Module):
    """An ``nn.Module`` whose hot path keeps its op's arguments, buffers among them, in
    ``__dict__["_bound"]`` (built by the subclass on first use): dropped whenever a buffer
    may be replaced (``.to()`` and every other ``_apply``, attribute assignment,
    ``register_buffer``, ``load_state_dict(assign=True)``), and never copied or pickled.
    ``load_state_dict`` copies into the bound tensors, which therefore stay right."""

    def _bindable(self) -> bool:
        """Whether arguments may be bound now: the buffers are all on the CPU (where the
        kernels run) and ``torch.compile`` is not tracing (it traces the checked path)."""
        return not torch.compiler.is_compiling() and all(
            t.is_cpu for t in self._buffers.values() if t is not None)

    def _keep(self, bound: tuple[object, ...]) -> tuple[object, ...]:
        """``bound``, kept as this module's bound arguments."""
        self.__dict__["_bound"] = bound
        return bound

    def _unbind(self) -> None:
        self.__dict__.pop("_bound", None)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        self._unbind()

    def register_buffer(self, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._unbind()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)
        self._unbind()
        return out

    def __getstate__(self) -> dict[str, object]:
        state = super().__getstate__()  # a copy
        state.pop("_bound", None)
        return state
