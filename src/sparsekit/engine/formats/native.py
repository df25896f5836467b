"""Shared base of the formats run by sparsekit's own compiled kernels."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from sparsekit._checks import ArgumentTypeError, check_int, check_materialized
from sparsekit.engine import kernels
from sparsekit.engine.bound import BoundArguments, no_backward
from sparsekit.engine.formats.base import Format, masked
from sparsekit.quantize import (
    check_scale_values,
    check_within_grid,
    dequantize_grid,
    dequantize_int8,
    group_size_of,
    quantize_int8,
    scales_at,
)

__all__ = ["INT8_INPUTS", "MAX_INT8_INPUTS", "MAX_THREADS", "SCALES", "NativeFormat", "Operands",
           "check_threads"]

MAX_THREADS = 65536
"""The most threads the kernels take (``common.h``)."""


def check_threads(threads: object) -> None:
    """Raise unless ``threads`` is ``None`` or an int in [1, :data:`MAX_THREADS`] (a bool
    is no count): the ``threads=`` of every format, activation-sparse layer and compile."""
    if threads is not None:
        check_int("threads", threads, minimum=1)
        if threads > MAX_THREADS:
            raise ValueError(f"threads must be an int in [1, {MAX_THREADS}] (the kernels' "
                             f"limit) or None, got {threads}")

SCALES = "scales"
"""The optional buffer of int8 values: one float32 scale per output row ``(out,)``, or, in
formats with :attr:`NativeFormat.group_scales`, one per row and group of consecutive inputs
``(out, groups)`` (``groups`` dividing ``in``)."""

Operands = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], tuple[int, ...]]
"""A format's kernel op, its tensors before ``x`` and its ints between ``bias`` and
``threads``: every op runs as ``op(*tensors, x, bias, *ints, threads, *scale_args())``."""

MAX_INT8_INPUTS = 65536
"""The most inputs of a W8A8 layer (:data:`INT8_INPUTS`): its int32 sums of int8 products
stay exact up to this width, and the kernels refuse wider rows."""


def _check_int8_inputs(in_features: int) -> None:
    """Raise ``ValueError`` unless a W8A8 layer of ``in_features`` inputs stays within
    :data:`MAX_INT8_INPUTS` (a wider one was built, and each of its products failed with the
    kernel's raw ``RuntimeError``)."""
    if in_features > MAX_INT8_INPUTS:
        raise ValueError(f"activation_dtype=torch.int8 (W8A8) takes layers of at most "
                         f"{MAX_INT8_INPUTS} inputs (exact int32 sums of int8 products), got "
                         f"in_features={in_features}; accepted: float inputs "
                         f"(activation_dtype=None)")


INT8_INPUTS = "int8_inputs"
"""The optional buffer (after :data:`SCALES`) of a format whose int8 values multiply inputs
quantized to int8 (W8A8): a 0-d bool tensor holding ``True``, so that the mode travels with
the ``state_dict``."""


class NativeFormat(BoundArguments, Format):
    """A CPU format multiplied by a compiled kernel over ``threads`` OpenMP threads.

    It holds weights of one of :attr:`dtypes` (float32; formats whose kernels also read
    bfloat16 add it) and stores their values in one of :attr:`value_dtypes`: the weight's
    own dtype by default, or int8 codes on the symmetric grid of :mod:`sparsekit.quantize`
    with one float32 scale per output row in the extra buffer :data:`SCALES` (formats whose
    kernels read int8 list it). Products and sums are float32 whatever the values. Inputs in
    one of :attr:`dtypes` are passed as they are and the output takes their dtype; other
    inputs are computed in float32. :meth:`to_dense` is the dequantized weight.

    Formats with ``torch.int8`` in :attr:`activation_dtypes` may also hold int8 values in
    W8A8 mode (``from_dense(..., activation_dtype=torch.int8)``, the buffer
    :data:`INT8_INPUTS`): each input row is then quantized to int8 codes with its own scale
    (the grid of :mod:`sparsekit.quantize`: its largest magnitude / 127) inside the kernel,
    and the products are exact integer dot products; :attr:`activation_dtype` says which.

    Where the kernels are missing (a model loaded on another machine) :meth:`_fallback_mm`
    multiplies with the dense weight, rebuilt once and kept until the buffers move.
    ``threads=None`` follows ``torch.get_num_threads()`` (one thread for small layers).
    """

    threaded = True
    dtypes = (torch.float32,)
    value_dtypes = (torch.float32,)
    activation_dtypes: tuple[torch.dtype, ...] = ()  # int8: has W8A8 kernels
    group_scales = False  # whose float-input kernels read int8 scales per group of inputs
    group_multiple = 1  # the group sizes they take: multiples of this
    device = "cpu"

    def __init__(
        self, tensors: Sequence[torch.Tensor], shape: tuple[int, int], threads: int | None = None
    ) -> None:
        check_threads(threads)
        super().__init__(tensors, shape)
        self.threads = threads
        self._stored = max(t.numel() for t in tensors)  # work per input row, for _threads
        self.quantizes_inputs = INT8_INPUTS in self._buffers  # read per call: a plain attribute

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """CPU weights of one of :attr:`dtypes`, where the compiled kernels are available."""
        return super().supports(weight) and kernels.available()

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        threads: int | None = None,
        *,
        value_dtype: torch.dtype | None = None,
        scales: torch.Tensor | None = None,
        activation_dtype: torch.dtype | None = None,
        **options: object,
    ) -> NativeFormat:
        """Compress ``weight * mask`` with values of ``value_dtype``, one of
        :attr:`value_dtypes` (see :meth:`compress` for ``options``).

        ``value_dtype=None`` keeps ``weight``'s dtype, or is ``torch.int8`` when ``scales``
        are given. int8 values are the kept weights rounded to nearest on the grid of
        ``scales`` (float32 ``(out_features,)``, used exactly: a layer's ``weight_scale``;
        ``(out_features, groups)`` per group of inputs where :attr:`group_scales`), by default
        :func:`sparsekit.quantize.int8_scales` of the kept weights.
        ``activation_dtype=torch.int8`` (one of :attr:`activation_dtypes`; int8 values only,
        one scale per row) quantizes the inputs too (W8A8).
        """
        weight = masked(weight, mask, materialized=True)
        cls._check_dtype(weight)
        value_dtype = cls._value_dtype(weight, value_dtype, scales)
        cls._check_activation_dtype(activation_dtype, value_dtype, weight.shape[1])
        if value_dtype != torch.int8:
            if scales is not None:
                raise ValueError(f"scales are only for int8 values, got value_dtype={value_dtype}")
            tensors = cls.compress(weight.to(value_dtype), **options)
            return cls(tensors, tuple(weight.shape), threads)
        if isinstance(scales, torch.Tensor):  # None: int8_scales of the weight; others: refused
            cls.check_scales(cls.values_name or cls.buffer_names[0], torch.int8, scales,
                             tuple(weight.shape), activation_dtype, stored=False)
            check_within_grid("weight", weight, scales)  # else clamped to ±127 steps
        codes, scales = quantize_int8(weight, scales, group_size_of(weight, scales))
        scales = scales.to(torch.float32).contiguous()
        tensors = (*cls.compress(codes, **options), scales)
        if activation_dtype is not None:
            tensors = (*tensors, torch.tensor(True))
        return cls(tensors, tuple(weight.shape), threads)

    @classmethod
    def _check_activation_dtype(
        cls, activation_dtype: torch.dtype | None, value_dtype: torch.dtype, in_features: int
    ) -> None:
        if activation_dtype is None:
            return
        if activation_dtype not in cls.activation_dtypes:
            raise ValueError(f"activation_dtype must be None or one of {cls.activation_dtypes} "
                             f"for the {cls.name} format, got {activation_dtype}")
        if value_dtype != torch.int8:
            raise ValueError(f"activation_dtype={activation_dtype} needs int8 values (W8A8), got "
                             f"value_dtype={value_dtype}")
        _check_int8_inputs(in_features)

    @classmethod
    def _value_dtype(
        cls, weight: torch.Tensor, value_dtype: torch.dtype | None, scales: torch.Tensor | None
    ) -> torch.dtype:
        if value_dtype is None:
            value_dtype = torch.int8 if scales is not None else weight.dtype
        if value_dtype not in cls.value_dtypes:
            raise ValueError(f"value_dtype must be one of {cls.value_dtypes} for the {cls.name} "
                             f"format, got {value_dtype}")
        return value_dtype

    @classmethod
    def compress(cls, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The format's tensors (in :attr:`buffer_names` order) for a ``weight`` (of one of
        :attr:`value_dtypes`: int8 codes for int8 values) whose zeros are the pruned
        weights."""
        raise NotImplementedError

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        """:meth:`check_layout` of the :attr:`buffer_names` tensors, then the int8
        :data:`SCALES`: required with int8 values (float32, finite, one per row), refused
        with any others; then the W8A8 mark :data:`INT8_INPUTS` (a 0-d bool ``True``, only
        where :attr:`activation_dtypes` has int8). No tensor may be on the meta device: the
        checks read their values (a meta one failed inside ``Tensor.item()``)."""
        names = cls.stored_names(len(tensors))
        for name, tensor in zip(names, tensors, strict=True):
            check_materialized(f"buffer {name!r}", tensor)
        count = len(cls.buffer_names)
        cls.check_layout(tensors[:count], shape)
        values_name = cls.values_name or names[0]
        values = tensors[names.index(values_name)]
        mark = tensors[names.index(INT8_INPUTS)] if INT8_INPUTS in names else None
        cls.check_scales(values_name, values.dtype,
                         tensors[count] if len(tensors) > count else None, tuple(shape),
                         None if mark is None else torch.int8)
        if mark is not None:
            if mark.dtype != torch.bool or mark.dim() != 0 or not bool(mark):
                raise ValueError(f"buffer {INT8_INPUTS!r} must be a 0-d bool tensor holding True, "
                                 f"got {mark.dtype} of shape {tuple(mark.shape)}")
            if torch.int8 not in cls.activation_dtypes:
                raise ValueError(f"the {cls.name} format has no int8-input (W8A8) kernels; "
                                 f"buffer {INT8_INPUTS!r} is not accepted")
            _check_int8_inputs(shape[1])

    @classmethod
    def check_layout(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless ``tensors`` (in :attr:`buffer_names` order) form a
        valid ``shape`` weight of this format (the values' dtype: :meth:`check_values`)."""
        raise NotImplementedError

    @classmethod
    def check_scales(
        cls,
        values_name: str,
        value_dtype: torch.dtype,
        scales: torch.Tensor | None,
        shape: tuple[int, int],
        activation_dtype: torch.dtype | None = None,
        *,
        stored: bool = True,
    ) -> None:
        """Raise ``ValueError`` unless int8 values (``value_dtype``) of a ``shape`` weight come
        with float32 ``scales`` of shape ``(rows,)`` or, where :attr:`group_scales`
        and the inputs are not quantized (``activation_dtype``), ``(rows, groups)`` with
        ``groups`` dividing the inputs; and other values with none. Scales given to
        ``from_dense`` (not ``stored``) may be of any floating dtype: they are made
        float32. Every scale must be positive and finite; meta scales, which hold no values,
        are named (their check was a raw ``RuntimeError``), and a group holds at least one
        input (a weight without inputs has one scale per row: groups of 0 inputs crashed the
        bitmap kernel)."""
        if value_dtype != torch.int8:
            if scales is not None:
                raise ValueError(f"buffer {SCALES!r} is only for int8 values; {values_name} "
                                 f"are {value_dtype}")
            return
        rows, cols = shape
        if scales is None:
            raise ValueError(f"int8 {values_name} need the float32 buffer {SCALES!r} of shape "
                             f"({rows},), got none")
        dtype_ok = scales.dtype == torch.float32 if stored else scales.is_floating_point()
        groups = scales.shape[1] if scales.dim() == 2 else 0
        grouped = (cls.group_scales and activation_dtype is None and scales.dim() == 2
                   and scales.shape[0] == rows and 1 <= groups <= cols and cols % groups == 0
                   and (cols // groups) % cls.group_multiple == 0)
        if not (grouped or tuple(scales.shape) == (rows,)) or not dtype_ok:
            accepted = f"({rows},)"
            if cls.group_scales and activation_dtype is None:
                accepted += f" or ({rows}, groups) with groups dividing {cols}"
                if cls.group_multiple > 1:
                    accepted += f" into groups of a multiple of {cls.group_multiple} inputs"
            elif cls.group_scales:
                accepted += " (W8A8 kernels take one scale per row)"
            raise ValueError(f"buffer {SCALES!r} of the {cls.name} format must be float32 of "
                             f"shape {accepted}, got {scales.dtype} {tuple(scales.shape)}")
        check_materialized(f"buffer {SCALES!r}", scales)
        # positive too: a zero or negative scale of a (resealed) file zeroed or flipped its
        # row or group without a word, where from_dense and weight_scale refuse them
        check_scale_values(scales, f"buffer {SCALES!r}")

    @classmethod
    def check_values(cls, name: str, values: torch.Tensor) -> None:
        """Raise ``ValueError`` unless the stored ``values`` (buffer ``name``) have one of
        :attr:`value_dtypes`."""
        if values.dtype not in cls.value_dtypes:
            raise ValueError(f"{name} must be of a dtype in {cls.value_dtypes}, got "
                             f"{values.dtype}")

    @property
    def activation_dtype(self) -> torch.dtype | None:
        """``torch.int8`` where the inputs are quantized to int8 (W8A8), else ``None``."""
        return torch.int8 if self.quantizes_inputs else None

    def scale_args(self) -> tuple[torch.Tensor, ...]:
        """The trailing ``scales`` argument of the kernel ops: ``(scales,)`` for int8 values,
        else nothing (the ops' default ``None``)."""
        scales = self._buffers.get(SCALES)
        return () if scales is None else (scales,)

    def to_dense(self) -> torch.Tensor:
        """The dense weight, zeros where pruned: int8 values dequantized (float32), others
        in their dtype."""
        dense = self.stored_dense()
        scales = self._buffers.get(SCALES)
        if scales is None:
            return dense
        return dequantize_grid(dense, scales)

    def stored_dense(self) -> torch.Tensor:
        """The dense matrix of the stored values (int8 codes for int8 values)."""
        raise NotImplementedError

    def _float_values(
        self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Stored ``values`` at ``rows`` and ``cols`` (int64 tensors broadcasting to their
        shape) in float32: int8 codes times the scale of their row, or of their row and
        group of inputs."""
        scales = self._buffers.get(SCALES)
        values = values.to(torch.float32)
        if scales is None:
            return values
        return values * scales_at(scales, rows, cols, self.in_features)

    def _threads(self, rows: int) -> int:
        if self.threads is not None:
            return self.threads
        work = (self._stored + self.out_features) * rows  # nnz may cost a pass; matmul inlines this
        # a fork costs a few µs. torch.sym_max/min: rows traced with a dynamic batch
        # (torch.export's Dim) stay an expression the exported program evaluates per call
        # (the builtins lost the lower bound of 1: threads=0 for a small batch)
        return torch.sym_max(1, torch.sym_min(kernels.num_threads(), work // 16384))

    def takes(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for ``x`` of shape ``(..., in_features)``, passed to the
        kernel as it is: the ops take all its dimensions but the last as rows, so a decoded
        token, ``(1, 1, in_features)``, needs no reshape before the op and none after.

        At batch 1 the Python around a kernel call counts, most of all cold, as in a decode
        step (:mod:`sparsekit.engine.bound`): an input the kernel takes as it is (of one of
        :attr:`dtypes`, contiguous, a float32 tensor or no ``bias``) goes straight to the
        op's C++ entry with the arguments bound in :meth:`_bind`, and the op checks the rest
        itself. Anything else, and any input the op rejects, takes the checked path: it
        records an ``x`` (or ``bias``) that requires grad so that a backward raises (the ops
        have none: :func:`~sparsekit.engine.bound.no_backward`), converts what must be, or raises
        ``ValueError`` for any other shape (see
        :meth:`check_input` and :meth:`check_bias`; a ``bias`` that is no tensor is an
        :class:`~sparsekit._checks.ArgumentTypeError`).
        """
        bound = self.__dict__.get("_bound") or self._bind()
        if (bound is not None and x.dtype in self.dtypes and x.is_cpu and x.is_contiguous()
                and not x.requires_grad
                and (bias is None or isinstance(bias, torch.Tensor)
                     and bias.dtype is torch.float32 and not bias.requires_grad)
                and not torch.compiler.is_compiling()):
            op, tensors, ints, scales, work = bound
            threads = self.threads or max(  # as _threads
                1, min(torch.get_num_threads(), work * (x.numel() // self.in_features) // 16384))
            try:
                return op(*tensors, x, bias, *ints, threads, *scales)
            except RuntimeError:
                pass  # the checked path says what is wrong
        return self._checked_matmul(x, bias)

    def _bind(self) -> tuple[object, ...] | None:
        """The op's C++ entry (``OpOverload._op``: a Python frame less than the op), its
        tensors and ints (:meth:`_operands`), scales and the work per input row
        (:meth:`_threads`), kept until the buffers change; ``None`` without kernels, for an
        empty layer, for buffers off the CPU or while ``torch.compile`` traces."""
        if kernels.load() is None or not self.in_features or not self._bindable():
            return None
        op, tensors, ints = self._operands()
        return self._keep((op.default._op, tensors, ints, self.scale_args(),
                           self._stored + self.out_features))

    def _checked_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = no_backward(self._converted_matmul(x, bias), x, self.name)
        # a bias that requires grad got none, torch only warning that it "may" be wrong
        return y if bias is None else no_backward(y, bias, self.name)

    def _converted_matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape  # read once: each read builds a torch.Size
        if not shape or shape[-1] != self.in_features:
            self.check_input(x)  # raises
        self.check_bias(bias)
        if x.dtype not in self.dtypes:  # convert only what must be
            if not x.is_floating_point():
                raise ArgumentTypeError(f"x must be a floating-point tensor, got {x.dtype}")
            x = x.to(torch.float32)
        if not x.is_contiguous():
            x = x.contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.to(torch.float32).contiguous()
        rows = math.prod(shape[:-1])  # not reshape(-1, 0): a layer may have no inputs
        if kernels.load() is None:  # e.g. a checkpoint loaded where the kernels cannot be built
            y = self._fallback_mm(x.reshape(rows, self.in_features).to(torch.float32), bias)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if not x.is_cpu:
            raise ValueError(f"x must be on the CPU for the {self.name} kernel, got {x.device}")
        if bias is not None and not bias.is_cpu:  # the op named no argument
            raise ValueError(f"bias must be on the CPU for the {self.name} kernel, got "
                             f"{bias.device}")
        return self._kernel(x, bias, self._threads(rows))

    def _kernel(self, x: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
        """The compiled product for a contiguous CPU ``x`` of one of :attr:`dtypes` and shape
        ``(..., in_features)`` (and a float32 ``bias``), of shape ``(..., out_features)`` in
        ``x``'s dtype; the op checks every size again."""
        op, tensors, ints = self._operands()
        return op(*tensors, x, bias, *ints, threads, *self.scale_args())

    def _operands(self) -> Operands:
        """The kernel op and its arguments around ``x``, ``bias`` and ``threads``
        (:data:`Operands`)."""
        raise NotImplementedError

    def _fallback_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` in float32 for a float32 ``x`` with the dense weight, rebuilt only
        when the buffers moved (W8A8: of ``x`` rounded to its per-row int8 grid, as the
        kernels do; a row with a NaN or infinite input has no grid and gives NaN, as the
        kernels do)."""
        if self.quantizes_inputs:
            finite = x.isfinite().all(-1, keepdim=True)
            x = dequantize_int8(*quantize_int8(x.where(finite, 0.0))).where(finite, torch.nan)
        return F.linear(x, self.derived(lambda: self.to_dense().to(torch.float32)), bias)

    def extra_repr(self) -> str:
        inputs = ", inputs=int8" if self.quantizes_inputs else ""
        return f"{super().extra_repr()}{inputs}, threads={self.threads}"
