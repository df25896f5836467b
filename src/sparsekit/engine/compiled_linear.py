"""CompiledLinear: an inference-only ``nn.Linear`` whose weight lives in a compressed format.

:class:`CompiledLayer` is the part shared with the compiled convolution
(:mod:`sparsekit.engine.compiled_conv`): the format and bias buffers, and loading a
``state_dict`` whose format differs from the layer's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsekit.engine.formats import FORMATS, Format, format_from_state

__all__ = ["CompiledLayer", "CompiledLinear", "dense_linear"]


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A trainable ``nn.Linear`` holding copies of ``weight`` and ``bias``, on their device
    and in their dtype: the way back from every sparse or compiled linear layer."""
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class CompiledLayer(nn.Module):
    """A layer whose ``(out, in)`` weight matrix is held in one :class:`Format`.

    Its ``state_dict`` holds the format's compressed tensors (``format.<buffer>``) and the
    bias. Loading one rebuilds the format from the loaded tensors, so a layer takes the
    format and number of nonzeros of the saved layer, not its own. Inference only: the
    compressed weight is a buffer, not a parameter.
    """

    def __init__(self, fmt: Format, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(fmt, Format):
            raise TypeError(f"fmt must be a sparsekit Format, got {type(fmt).__name__}")
        if bias is not None and tuple(bias.shape) != (fmt.out_features,):
            raise ValueError(
                f"bias must have shape ({fmt.out_features},), got {tuple(bias.shape)}"
            )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.format = fmt

    # The hot path reads the format's matmul and the bias from the instance __dict__ rather
    # than through nn.Module.__getattr__: at batch 1 a small layer takes a few µs, and the
    # two lookups cost a fifth of that. They are refreshed whenever either is replaced.
    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in ("format", "bias") and "format" in self._modules:
            self._cache()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)
        self._cache()  # .to() may have replaced the bias tensor
        return out

    def _cache(self) -> None:
        self.__dict__["_matmul"] = self._modules["format"].matmul
        self.__dict__["_bias"] = self._buffers["bias"]

    @property
    def in_features(self) -> int:
        """Columns of the weight matrix."""
        return self.format.in_features

    @property
    def out_features(self) -> int:
        """Rows of the weight matrix (output features or channels)."""
        return self.format.out_features

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight matrix, zeros where pruned."""
        return self.format.to_dense()

    def format_from_state(self, state: dict[str, torch.Tensor], prefix: str = "") -> Format:
        """The format stored under ``prefix + "format."`` in ``state`` (not installed).

        Raises ``ValueError`` naming the layer if the entries form no valid format of
        this layer's shape, or the bias entry does not match.
        """
        head = f"{prefix}format."
        own = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
        bias = state.get(f"{prefix}bias")
        if (bias is None) != (self.bias is None) or (
            bias is not None and tuple(bias.shape) != (self.out_features,)
        ):
            raise ValueError(
                f"{prefix or 'layer'}: bias entry does not match a layer with "
                f"bias={self.bias is not None} and out_features={self.out_features}"
            )
        threads = self.format.threads if self.format.threaded else None
        try:
            return format_from_state(own, (self.out_features, self.in_features), threads=threads)
        except ValueError as err:
            raise ValueError(f"{head}*: {err}") from None

    def expected_state(
        self, state: dict[str, torch.Tensor], prefix: str = ""
    ) -> dict[str, torch.Tensor] | None:
        """This layer's ``state_dict`` entries (under ``prefix``) as they will be after
        loading ``state``: its format and number of nonzeros are those in ``state``.

        ``None`` if ``state`` holds no format for this layer (the caller reports the missing
        keys); ``ValueError`` naming the layer if the entries form no valid format (see
        :meth:`format_from_state`). Used by :func:`sparsekit.load` to check a file before
        loading it.
        """
        head = f"{prefix}format."
        if not any(k.startswith(head) for k in state):
            return None
        self.format_from_state(state, prefix)
        own = {k: v for k, v in self.state_dict(prefix=prefix).items() if not k.startswith(head)}
        return own | {k: v for k, v in state.items() if k.startswith(head)}

    @staticmethod
    def _compress(matrix: torch.Tensor, format: str, **kwargs: object) -> Format:
        """``matrix`` (zeros are the pruned weights) in the format called ``format``."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS.names()}, got {format!r}")
        return FORMATS[format].from_dense(matrix, None, **kwargs)

    def to_module(self) -> nn.Module:
        """The equivalent plain PyTorch layer, with the dense (zero-filled) weight."""
        raise NotImplementedError

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict[str, object],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Install the saved layer's format first; load_state_dict then fills it as usual.
        try:
            fmt = self.format_from_state(state_dict, prefix)
        except ValueError as err:
            error_msgs.append(str(err))
        else:
            old = next(iter(self.format.buffers()), None)
            self.format = fmt if old is None else fmt.to(old.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CompiledLinear(CompiledLayer):
    """``y = x @ W.T + bias`` with ``W`` held in one :class:`~sparsekit.engine.formats.Format`.

    Built by :func:`sparsekit.engine.compile`; accepts inputs of shape ``(..., in_features)``
    like ``nn.Linear``. :meth:`to_dense` recovers the (masked) dense weight,
    :meth:`to_linear` an equivalent ``nn.Linear``.
    """

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, format: str = "dense", **kwargs: object
    ) -> CompiledLinear:
        """Compress ``linear`` (its zero weights are the pruned ones) into ``format``."""
        return cls(cls._compress(linear.weight.detach(), format, **kwargs), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self._bias)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (e.g. to fine-tune again)."""
        return dense_linear(self.to_dense(), self.bias)

    to_module = to_linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format.name!r}"
        )
