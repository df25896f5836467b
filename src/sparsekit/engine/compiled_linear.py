"""CompiledLinear: an inference-only ``nn.Linear`` whose weight lives in a compressed format.

:class:`CompiledLayer` is the part shared with the compiled convolution
(:mod:`sparsekit.engine.compiled_conv`): the format and bias buffers, and loading a
``state_dict`` whose format differs from the layer's own. A :class:`CompiledLinear` may
hold a second format for inputs of many rows (the prompt of a language model) when the
one that is fastest for few rows (decoding) is slower there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int, check_loadable, layer_input_error
from sparsekit.engine.formats import FORMATS, Format, format_from_state
from sparsekit.engine.formats.native import SCALES
from sparsekit.quantize import attach_scales, attached_scales

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
        if bias is not None and not isinstance(bias, torch.Tensor):  # (a raw AttributeError)
            raise ArgumentTypeError(f"bias must be None or a tensor of shape "
                                    f"({fmt.out_features},), got {type(bias).__name__}")
        if bias is not None and tuple(bias.shape) != (fmt.out_features,):
            raise ValueError(
                f"bias must have shape ({fmt.out_features},), got {tuple(bias.shape)}"
            )
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.format = fmt
        # the dtype of the layer this one replaces (inputs, outputs and the weight that
        # decompile gives back); None: the stored values' dtype. Not part of the state:
        # compile sets it, a loaded checkpoint keeps the skeleton's.
        self.io_dtype: torch.dtype | None = None

    # The hot path reads the format's matmul and the bias from the instance __dict__ rather
    # than through nn.Module.__getattr__: at batch 1 a small layer takes a few µs, and the
    # two lookups cost a fifth of that. They are refreshed whenever either is replaced. The
    # bias is checked when it is set, so the product need not check it on every call
    # (Format.trusted_matmul).
    _hot = ("format", "bias", "io_dtype")  # the attributes _cache() reads

    def __setattr__(self, name: str, value: object) -> None:
        fmt = self._modules.get("format") if name == "bias" and value is not None else None
        if isinstance(fmt, Format):
            fmt.check_bias(value)  # type: ignore[arg-type]
        super().__setattr__(name, value)
        if name in self._hot and "format" in self._modules:
            self._cache()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)
        dtype = self.__dict__.get("io_dtype")
        if dtype is not None:  # .to(torch.bfloat16), .half(): the layer now takes that dtype,
            # and decompile gives it back (it gave the compile-time dtype, which the cast
            # model's other layers no longer take)
            self.io_dtype = fn(torch.empty(0, dtype=dtype)).dtype
        self._cache()  # .to() may have replaced the bias tensor
        return out

    def _cache(self) -> None:
        self.__dict__["_matmul"] = self._at_boundary(self._modules["format"])
        self.__dict__["_bias"] = self._buffers["bias"]
        dtype = self.__dict__.get("io_dtype")
        self.__dict__["_io"] = dtype if dtype is not None and dtype.is_floating_point else None

    def _refuse_dtype(self, x: torch.Tensor) -> None:
        """Raise :class:`~sparsekit._checks.ArgumentTypeError` for an input ``x`` that is not
        of :attr:`io_dtype`, as the layer this one replaces refused it. Which dtypes a layer
        took had depended on the format autotuning chose: the native formats computed a
        float16 or float64 input in float32 (and took bfloat16), ``dense`` and ``torch_csr``
        refused all three, so one model took an input in decoding and refused it in its
        prompt, or on another machine."""
        if not isinstance(x, torch.Tensor):
            raise layer_input_error(x, self.in_features)
        raise ArgumentTypeError(
            f"x must be {self.io_dtype} (the dtype of the layer this "
            f"{self.out_features}x{self.in_features} compiled layer replaces; cast the input, "
            f"or the model with model.to(dtype) to take another), got {x.dtype}")

    def _at_boundary(self, fmt: Format) -> Callable[[torch.Tensor, torch.Tensor | None],
                                                    torch.Tensor]:
        """``fmt``'s product for inputs of :attr:`io_dtype`, which a cast of the layer
        (``model.half()``) may have made a dtype ``fmt`` does not multiply (its values keep
        theirs, :meth:`Format._apply`): the input and bias are then converted to float32
        where ``fmt`` takes it (the native formats, whatever their values), else to the
        values' dtype, and the output back, so the layer still takes and returns
        :attr:`io_dtype`. The product of every other layer is the format's own."""
        matmul = fmt.trusted_matmul()
        dtype = self.__dict__.get("io_dtype")
        if dtype is None or not dtype.is_floating_point or fmt.takes(dtype):
            return matmul
        inner = torch.float32 if fmt.takes(torch.float32) else fmt.value_dtype

        def converted(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return matmul(x.to(inner), None if bias is None else bias.to(inner)).to(x.dtype)
        return converted

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

    def _module_weight(self) -> torch.Tensor:
        """:meth:`to_dense` in the dtype of the layer this one replaces (:attr:`io_dtype`):
        a float32 layer compiled to bfloat16 values decompiles to a float32 layer again, so
        that it still takes the model's float32 inputs."""
        weight = self.to_dense()
        dtype = self.__dict__.get("io_dtype")
        return weight if dtype is None or not weight.is_floating_point() else weight.to(dtype)

    def format_from_state(self, state: dict[str, torch.Tensor], prefix: str = "") -> Format:
        """The format stored under ``prefix + "format."`` in ``state`` (not installed).

        Raises ``ValueError`` naming the layer if the entries form no valid format of
        this layer's shape, or the bias entry does not match.
        """
        bias = state.get(f"{prefix}bias")
        if (bias is None) != (self.bias is None) or (
            bias is not None and tuple(bias.shape) != (self.out_features,)
        ):
            raise ValueError(
                f"{prefix or 'layer'}: bias entry does not match a layer with "
                f"bias={self.bias is not None} and out_features={self.out_features}"
            )
        return self._read_format(state, f"{prefix}format.")

    def _read_format(self, state: dict[str, torch.Tensor], head: str) -> Format:
        """The format of this layer's shape stored under ``head`` in ``state``."""
        own = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
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
        try:  # an inference tensor outside inference mode: the format went, then it raised
            check_loadable(self, state_dict, prefix, local_metadata)
        except ValueError as err:
            error_msgs.append(str(err))
            # torch loads the children next, from this dict (its own copy, which it lets a
            # layer change): without the entries, the old format is left as it is
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]
            return
        # Install the saved layer's format first; load_state_dict then fills it as usual.
        try:
            self._install_from_state(state_dict, prefix)
        except ValueError as err:
            error_msgs.append(str(err))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _install_from_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Take the format(s) stored in ``state``, on this layer's device."""
        fmt = self.format_from_state(state, prefix)
        old = next(iter(self.format.buffers()), None)
        self.format = fmt if old is None else fmt.to(old.device)


class CompiledLinear(CompiledLayer):
    """``y = x @ W.T + bias`` with ``W`` held in one :class:`~sparsekit.engine.formats.Format`,
    or in two: ``format`` for inputs of at most ``split`` rows and ``format_large`` for
    more (rows: the product of all dimensions but the last).

    Built by :func:`sparsekit.engine.compile`; accepts inputs of shape ``(..., in_features)``
    like ``nn.Linear``. :meth:`to_dense` recovers the (masked) dense weight,
    :meth:`to_linear` an equivalent ``nn.Linear``. The row threshold is a plain ``int``
    (the buffer ``split_rows`` carries it through a ``state_dict``), so the dispatch is
    a Python ``if`` on the input's shape; ``torch.export`` and ``torch.compile`` trace
    both formats behind a ``torch.cond`` instead, so a program exported with a dynamic
    batch serves every row count.
    """

    def __init__(
        self,
        fmt: Format,
        bias: torch.Tensor | None = None,
        *,
        format_large: Format | None = None,
        split: int | None = None,
    ) -> None:
        super().__init__(fmt, bias)
        if (format_large is None) != (split is None):
            raise ValueError(
                f"format_large and split go together, got format_large="
                f"{type(format_large).__name__} and split={split!r}"
            )
        if format_large is not None:
            if not isinstance(format_large, Format):
                raise TypeError(
                    f"format_large must be a sparsekit Format, got {type(format_large).__name__}"
                )
            shape = (format_large.out_features, format_large.in_features)
            if shape != (fmt.out_features, fmt.in_features):
                raise ValueError(
                    f"format_large must hold a {fmt.out_features}x{fmt.in_features} weight, "
                    f"got {shape[0]}x{shape[1]}"
                )
            check_int("split", split, minimum=1)
        self.register_buffer("split_rows", None)
        self._install_large(format_large, split)

    @property
    def format_large(self) -> Format | None:
        """The format for inputs of more than :attr:`split` rows (``None``: one format)."""
        return self._modules.get("format_large")

    def _install_large(self, large: Format | None, split: int | None) -> None:
        if large is None:
            self._modules.pop("format_large", None)
        else:
            self._modules["format_large"] = large
        device = next(iter(self.format.buffers()), torch.empty(0)).device
        self.split_rows = None if split is None else torch.tensor(split, device=device)
        self.__dict__["split"] = split
        # the hot path compares x.numel() with this (in_features reads the format module)
        self.__dict__["_split_numel"] = None if split is None else split * self.in_features
        self._cache()

    def _cache(self) -> None:
        super()._cache()
        large = self._modules.get("format_large")
        self.__dict__["_large"] = None if large is None else self._at_boundary(large)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, format: str = "dense", **kwargs: object
    ) -> CompiledLinear:
        """Compress ``linear`` (its zero weights are the pruned ones) into ``format``; the
        dense format keeps the int8 grid ``linear`` carries (``weight_scale``,
        :func:`sparsekit.quantize.attach_scales`), which :meth:`to_linear` gives back."""
        if not isinstance(linear, nn.Linear):
            raise ArgumentTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        scales = attached_scales(linear)
        if format == "dense" and scales is not None:
            kwargs = {"scales": scales, **kwargs}
        layer = cls(cls._compress(linear.weight.detach(), format, **kwargs), linear.bias)
        layer.io_dtype = linear.weight.dtype
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        io = self._io
        if io is not None and getattr(x, "dtype", None) != io:
            self._refuse_dtype(x)
        large = self._large
        if large is not None:
            if torch.compiler.is_compiling():
                return self._traced_split(x)
            if x.numel() > self._split_numel:
                return large(x, self._bias)
        return self._matmul(x, self._bias)

    def _traced_split(self, x: torch.Tensor) -> torch.Tensor:
        """Both formats behind ``torch.cond`` on the rows: a program exported with a dynamic
        batch (``torch.export.Dim``) keeps the split, where the Python ``if`` traced one
        side and guarded the rows to it."""
        bias = self._bias
        return torch.cond(x.numel() > self._split_numel, lambda x: self._large(x, bias),
                          lambda x: self._matmul(x, bias), (x,))

    def expected_state(
        self, state: dict[str, torch.Tensor], prefix: str = ""
    ) -> dict[str, torch.Tensor] | None:
        entries = super().expected_state(state, prefix)
        if entries is None:
            return None
        self._large_from_state(state, prefix)
        loaded = (f"{prefix}format_large.", f"{prefix}split_rows")
        own = {k: v for k, v in entries.items() if not k.startswith(loaded)}
        return own | {k: v for k, v in state.items() if k.startswith(loaded)}

    def _large_from_state(
        self, state: dict[str, torch.Tensor], prefix: str
    ) -> tuple[Format | None, int | None]:
        """The second format and its row threshold stored in ``state`` (``None, None``
        for a layer of one format); ``ValueError`` naming the entries if they are invalid."""
        head = f"{prefix}format_large."
        split = state.get(f"{prefix}split_rows")
        if split is None and not any(k.startswith(head) for k in state):
            return None, None
        if (
            not isinstance(split, torch.Tensor) or split.shape != () or split.dtype != torch.int64
            or int(split) < 1
        ):
            raise ValueError(
                f"{prefix}split_rows must be a 0-d int64 tensor ≥ 1 stored with "
                f"{head}*, got {split!r}"
            )
        return self._read_format(state, head), int(split)

    def _install_from_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        large, split = self._large_from_state(state, prefix)  # checked before any change
        super()._install_from_state(state, prefix)
        device = next(iter(self.format.buffers()), torch.empty(0)).device
        self._install_large(None if large is None else large.to(device), split)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight and bias (e.g. to fine-tune again); an int8
        layer's dequantized weight with its scales attached
        (:func:`sparsekit.quantize.attach_scales`), as
        :meth:`ActivationSparseLinear.to_module` gives it, so that compiling it again with
        ``weight_dtype=None`` stores the same int8 codes."""
        linear = dense_linear(self._module_weight(), self.bias)
        scales = [f._buffers.get(SCALES) for f in (self.format, self.format_large)
                  if f is not None]
        if all(s is not None and torch.equal(s, scales[0]) for s in scales):  # one int8 grid
            attach_scales(linear, scales[0])
        return linear

    to_module = to_linear

    def extra_repr(self) -> str:
        large = self.format_large
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format.name!r}"
            + ("" if large is None else f", format_large={large.name!r}, split={self.split}")
        )
