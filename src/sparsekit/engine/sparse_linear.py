"""CompiledLinear: an inference-only ``nn.Linear`` whose weight lives in a compressed format."""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.engine.formats import FORMATS, Format, format_from_state

__all__ = ["CompiledLinear"]


class CompiledLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held in one :class:`~sparsekit.engine.formats.Format`.

    Built by :func:`sparsekit.engine.compile`; accepts inputs of shape ``(..., in_features)``
    like ``nn.Linear``. It is for inference: the compressed weight is a buffer, not a
    parameter. :meth:`to_dense` recovers the (masked) dense weight, :meth:`to_linear` an
    equivalent ``nn.Linear``.

    Its ``state_dict`` holds the format's compressed tensors (``format.<buffer>``) and the
    bias. Loading one rebuilds the format from the loaded tensors, so a layer takes the
    format and number of nonzeros of the saved layer, not its own.
    """

    def __init__(self, fmt: Format, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(fmt, Format):
            raise TypeError(f"fmt must be a sparsekit Format, got {type(fmt).__name__}")
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        self.format = fmt
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, format: str = "dense", **kwargs: object
    ) -> CompiledLinear:
        """Compress ``linear`` (its zero weights are the pruned ones) into ``format``."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        fmt = FORMATS[format].from_dense(linear.weight.detach(), None, **kwargs)
        return cls(fmt, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.matmul(x, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, zeros where pruned."""
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

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (e.g. to fine-tune again)."""
        weight = self.to_dense()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format.name!r}"
        )
