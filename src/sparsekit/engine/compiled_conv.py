"""CompiledConv2d: an inference-only ``nn.Conv2d`` whose weight lives in a compressed format.

A convolution is a matrix product of its ``(out_channels, in_channels * kh * kw)`` weight
matrix with the unfolded input patches (im2col). The dense format keeps PyTorch's own
convolution (``F.conv2d`` on a view of the stored matrix, so oneDNN still runs it); the
sparse formats multiply the patches, which pays only when the weight is sparse enough to
make up for building them. :func:`sparsekit.engine.compile` times both per layer.

Like ``nn.Conv2d``, a layer computes in its input's dtype and refuses inputs it cannot:
every format takes the same dtypes here, where a kernel format alone would compute the
others silently in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int
from sparsekit.engine.compiled_linear import CompiledLayer
from sparsekit.engine.formats import DenseFormat, Format
from sparsekit.engine.formats.native import NativeFormat

__all__ = ["CompiledConv2d", "convertible"]


def convertible(conv: nn.Conv2d) -> str | None:
    """``None`` if ``conv`` can be compiled, else the reason why not."""
    if conv.groups != 1:
        return f"groups={conv.groups} (only 1 is supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (only explicit integers are supported)"
    return None


def _input_dtypes(fmt: Format) -> tuple[torch.dtype, ...]:
    """The input dtypes ``fmt`` computes in as they are: those a kernel format's kernels
    read (it would compute any other in float32), else its stored weight's, the only one
    PyTorch's own ops (``F.conv2d``, sparse ``addmm``) take, as ``nn.Conv2d`` does."""
    return type(fmt).dtypes if isinstance(fmt, NativeFormat) else (fmt.value_dtype,)


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """``value`` as a tuple of two ints ≥ ``minimum``; raise naming ``name`` otherwise."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ArgumentTypeError(f"{name} must be a pair of ints ≥ {minimum}, got {value!r}")
    for i, v in enumerate(value):
        check_int(f"{name}[{i}]", v, minimum=minimum)
    return int(value[0]), int(value[1])


class CompiledConv2d(CompiledLayer):
    """``nn.Conv2d`` (groups 1, zero padding) with its weight matrix in one ``Format``.

    Accepts ``(N, C, H, W)`` and unbatched ``(C, H, W)`` inputs like ``nn.Conv2d``, of
    the dtype of the layer it replaces (:attr:`io_dtype`; one built from a format alone
    takes the dtypes its format computes in as they are). ``kernel_size``,
    ``stride`` and ``dilation`` are pairs of ints ≥ 1, ``padding`` a pair of ints ≥ 0.
    :meth:`to_conv2d` gives back an equivalent ``nn.Conv2d``.
    """

    def __init__(
        self,
        fmt: Format,
        bias: torch.Tensor | None,
        *,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
    ) -> None:
        kh, kw = _pair("kernel_size", kernel_size, 1)
        stride, dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
        padding = _pair("padding", padding, 0)
        super().__init__(fmt, bias)
        if fmt.in_features % (kh * kw):
            raise ValueError(
                f"a {fmt.out_features}x{fmt.in_features} weight matrix does not fit "
                f"kernel_size={kernel_size}"
            )
        self.in_channels = fmt.in_features // (kh * kw)
        self.out_channels = fmt.out_features
        self.kernel_size, self.stride = (kh, kw), stride
        self.padding, self.dilation = padding, dilation

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, format: str = "dense", **kwargs: object
    ) -> CompiledConv2d:
        """Compress ``conv`` (its zero weights are the pruned ones) into ``format``."""
        if not isinstance(conv, nn.Conv2d):
            raise ArgumentTypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        reason = convertible(conv)
        if reason is not None:
            raise ValueError(f"cannot compile this Conv2d: {reason}")
        matrix = conv.weight.detach().reshape(conv.out_channels, -1)
        layer = cls(
            cls._compress(matrix, format, **kwargs), conv.bias,
            kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation,
        )
        layer.io_dtype = conv.weight.dtype
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if isinstance(self.format, DenseFormat):
            weight = self.format.weight.view(self.out_channels, self.in_channels, *self.kernel_size)
            return F.conv2d(x, weight, self._bias, self.stride, self.padding, self.dilation)
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        y = self._matmul(patches.transpose(1, 2), self._bias)  # (N, L, out)
        out_h, out_w = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                (h, w), self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        y = y.transpose(1, 2).reshape(n, self.out_channels, out_h, out_w)
        return y if batched else y.squeeze(0)

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` has :attr:`io_dtype` (where set; else every
        format can compute it in its own dtype: one of :func:`_input_dtypes`), of shape
        ``(N, in_channels, H, W)`` or unbatched, with ``H, W`` at least the dilated
        kernel's extent once padded (and at least 1)."""
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(
                f"x must be a torch.Tensor of shape (N, in_channels={self.in_channels}, H, W) "
                f"or (in_channels, H, W), got {type(x).__name__}"
            )
        io = self._io  # the replaced layer's dtype: the one it took, whatever the format
        accepted = (io,) if io is not None else _input_dtypes(self.format)
        if x.dtype not in accepted:
            names = " or ".join(str(d).removeprefix("torch.") for d in accepted)
            raise ValueError(f"x must be {names} for this {self.format.name} weight, got "
                             f"{str(x.dtype).removeprefix('torch.')}")
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, in_channels={self.in_channels}, H, W) or "
                f"(in_channels, H, W), got shape {tuple(x.shape)}"
            )
        least = [max(d * (k - 1) + 1 - 2 * p, 1)
                 for k, p, d in zip(self.kernel_size, self.padding, self.dilation, strict=True)]
        if any(size < n for size, n in zip(x.shape[-2:], least, strict=True)):
            raise ValueError(
                f"x must be at least {least[0]}x{least[1]} (H x W) for kernel_size="
                f"{self.kernel_size}, padding={self.padding} and dilation={self.dilation}, "
                f"got shape {tuple(x.shape)}"
            )

    def to_conv2d(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same weight and bias (e.g. to fine-tune again)."""
        weight = self._module_weight()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, bias=self.bias is not None, device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight.view_as(conv.weight))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    to_module = to_conv2d

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, format={self.format.name!r}"
        )
