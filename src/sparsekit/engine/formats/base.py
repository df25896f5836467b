"""The :class:`Format` interface every compressed weight format implements."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError, check_int, check_materialized
from sparsekit.masks import check_mask

__all__ = ["Format", "check_shape", "masked"]


class Format(nn.Module):
    """Base class: a compressed ``(out_features, in_features)`` weight.

    A format's buffers are its compressed tensors, named :attr:`buffer_names`; building one
    from them (``cls(tensors, shape)``) is all :meth:`from_state` needs beyond the format's
    own :meth:`check_state`. The constructor trusts its tensors (the kernels read the
    indices unchecked); tensors from elsewhere come in through :meth:`from_state` or
    ``load_state_dict``, which both run :meth:`check_state` first.

    A format may also hold :attr:`optional_buffers` (the per-row ``scales`` of int8
    values): those present follow the :attr:`buffer_names` in ``tensors``, in order.
    """

    name: str = ""
    buffer_names: tuple[str, ...] = ()  # its state_dict keys, which identify the format
    optional_buffers: tuple[str, ...] = ()  # keys it may also hold (int8 scales)
    values_name: str | None = None  # the buffer of the stored weights (None: the first)
    value_dtypes: tuple[torch.dtype, ...] | None = None  # stored dtypes (None: the weight's)
    threaded: bool = False  # from_dense/from_state take ``threads`` (compiled kernels)
    dtypes: tuple[torch.dtype, ...] | None = None  # weight dtypes it holds (None: any)
    device: str | None = None  # the device type it runs on (None: any)

    def __init__(self, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        names = self.stored_names(len(tensors))
        for name, tensor in zip(names, tensors, strict=True):
            self.register_buffer(name, tensor)

    @classmethod
    def stored_names(cls, count: int) -> tuple[str, ...]:
        """The buffer names of ``count`` tensors: :attr:`buffer_names`, then the first
        optional ones."""
        extra = count - len(cls.buffer_names)
        if not 0 <= extra <= len(cls.optional_buffers):
            raise ValueError(f"a {cls.name} format holds the tensors {cls.buffer_names} and "
                             f"optionally {cls.optional_buffers}, got {count} tensors")
        return cls.buffer_names + cls.optional_buffers[:extra]

    @classmethod
    def state_tensors(cls, state: Mapping[str, object], prefix: str = "") -> list[object]:
        """The entries of ``state`` under ``prefix`` this format is built from: every one of
        :attr:`buffer_names` (``None`` where missing), then the optional ones present."""
        tensors = [state.get(prefix + k) for k in cls.buffer_names]
        return tensors + [state[prefix + k] for k in cls.optional_buffers if prefix + k in state]

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        """Whether this format can hold ``weight`` on this machine (its :attr:`dtypes` and
        :attr:`device`; formats add their structural conditions)."""
        return (cls.dtypes is None or weight.dtype in cls.dtypes) and (
            cls.device is None or weight.device.type == cls.device
        )

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> Format:
        """Compress ``weight * mask`` (``mask=None``: keep the nonzeros of ``weight``)."""
        raise NotImplementedError

    @classmethod
    def _check_dtype(cls, weight: torch.Tensor) -> None:
        """Raise ``TypeError`` unless ``weight`` is floating and of one of :attr:`dtypes`:
        a format built from any other weight could not multiply it."""
        if not weight.is_floating_point() or (cls.dtypes is not None
                                              and weight.dtype not in cls.dtypes):
            accepted = f"dtype {cls.dtypes}" if cls.dtypes else "a floating dtype"
            raise ArgumentTypeError(f"{cls.__name__} needs a weight of {accepted}, got "
                                    f"{weight.dtype}")

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], shape: tuple[int, int], **kwargs: object
    ) -> Format:
        """Rebuild from the tensors of a ``state_dict`` (keys :attr:`buffer_names`), copied.

        ``kwargs`` (``threads``) go to the constructor. Raises ``ValueError`` if the
        tensors do not form a valid ``shape`` weight (see :meth:`check_state`), or
        ``shape`` is not two ints ≥ 0 (see :func:`check_shape`), ``TypeError`` for an entry
        that is no tensor.
        """
        shape = check_shape(shape)
        tensors = cls.state_tensors(state)
        for name, t in zip(cls.stored_names(len(tensors)), tensors, strict=True):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"state entry {name!r} must be a tensor, got "
                                        f"{type(t).__name__}")
        cls.check_state(tensors, shape)
        return cls([t.clone(memory_format=torch.contiguous_format) for t in tensors], shape,
                   **kwargs)

    @classmethod
    def check_state(cls, tensors: Sequence[torch.Tensor], shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` unless ``tensors`` (in :meth:`stored_names` order) form a
        valid ``shape`` weight of this format."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` for ``x`` of shape ``(..., in_features)``.

        Raises ``ValueError`` for any other shape (see :meth:`check_input`): no kernel ever
        reads past the end of ``x``; and for a ``bias`` other than ``None`` or a tensor of
        shape ``(out_features,)`` (see :meth:`check_bias`), which would broadcast.
        """
        shape = x.shape  # read once: each read builds a torch.Size (µs count at batch 1)
        if not shape or shape[-1] != self.in_features:
            self.check_input(x)  # raises
        if bias is not None:
            self.check_bias(bias)
        if len(shape) == 2:  # no reshapes
            return self._mm(x, bias)
        # rows, not -1: a (0,) x of a layer without inputs has one row of no elements
        y = self._mm(x.reshape(math.prod(shape[:-1]), self.in_features), bias)
        return y.reshape(*shape[:-1], self.out_features)

    def trusted_matmul(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """The product a layer calls on its hot path with a bias it checked once
        (:meth:`check_bias`, e.g. :class:`~sparsekit.engine.compiled_linear.CompiledLayer`):
        :meth:`matmul`, or one that skips checking the bias again where that check would
        cost a noticeable part of a small call (:class:`~sparsekit.engine.formats.DenseFormat`,
        whose ``F.linear`` would broadcast a wrong bias silently). It still checks ``x``."""
        return self.matmul

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` has shape ``(..., in_features)``."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (..., in_features={self.in_features}) for this "
                f"{self.out_features}x{self.in_features} {self.name} weight, got shape "
                f"{tuple(x.shape)}"
            )

    def check_bias(self, bias: torch.Tensor | None) -> None:
        """Raise unless ``bias`` is ``None`` or a tensor of shape ``(out_features,)``: an
        :class:`~sparsekit._checks.ArgumentTypeError` for anything but a tensor (a number, a
        list), a ``ValueError`` for any other shape, one that would broadcast (``(1,)``,
        ``(rows, out_features)``) included. Every format refuses the same biases."""
        if bias is None or isinstance(bias, torch.Tensor) and bias.shape == (self.out_features,):
            return  # the message is built only when it is needed (µs count at batch 1)
        accepted = (f"None or a tensor of shape ({self.out_features},) for this "
                    f"{self.out_features}x{self.in_features} {self.name} weight")
        if not isinstance(bias, torch.Tensor):
            raise ArgumentTypeError(f"bias must be {accepted}, got {type(bias).__name__}")
        raise ValueError(f"bias must be {accepted}, got {tuple(bias.shape)}")

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The product for a 2-D ``x`` of ``in_features`` columns."""
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, zeros where pruned."""
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """Number of stored weights."""
        raise NotImplementedError

    def takes(self, dtype: torch.dtype) -> bool:
        """Whether an input of ``dtype`` is multiplied as it is, the product coming back in
        ``dtype``: the values' own dtype here (``F.linear`` and torch's sparse products take
        no other); native formats take each of their :attr:`dtypes`."""
        return dtype == self.value_dtype

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):  # type: ignore[no-untyped-def]
        """``.to()``, ``.half()``, ``.double()``...: the stored values take a cast's dtype
        only where this format stores that dtype (:attr:`value_dtypes`, else :attr:`dtypes`);
        otherwise, like int8 codes, which no float cast changes, they keep theirs and only
        move. The other floating buffers (the float32 scales of int8 values) keep their dtype
        too, unrounded. ``model.half()`` on a compiled model had cast the values of every
        native format and the scales of every int8 one, and each product after it failed
        with a raw ``RuntimeError``; the layer holding a format converts at its boundary
        instead (:class:`~sparsekit.engine.compiled_linear.CompiledLayer`)."""
        values = self.values_name or self.buffer_names[0]
        stored = self.value_dtypes or self.dtypes
        kept = {name: t for name, t in self._buffers.items()
                if t is not None and t.is_floating_point()
                and (name != values or (stored is not None
                                        and fn(t.new_empty(0)).dtype not in stored))}
        out = super()._apply(fn, recurse)
        for name, t in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != t.dtype:
                self._buffers[name] = t.to(moved.device)
        return out

    @property
    def value_dtype(self) -> torch.dtype:
        """The dtype of the stored weights (``torch.int8``: codes on the grid of per-row
        ``scales``)."""
        return self._buffers[self.values_name or self.buffer_names[0]].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers: what a product streams and a checkpoint stores."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def derived(self, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor built from the buffers (a torch sparse tensor, the dense weight), kept
        until the buffers move (``.to()``) or are written in place (``load_state_dict``
        copies into them: their version counters change) and then rebuilt. Buffers made under
        ``torch.inference_mode`` keep no version counter (reading it was a raw
        ``RuntimeError``): their tensor is built on every call, never cached stale."""
        try:
            key = tuple((t.data_ptr(), t._version)
                        for t in self._buffers.values() if t is not None)
        except RuntimeError:  # an inference tensor (no check on the hot path)
            return build()
        cached = self.__dict__.get("_derived")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_derived"] = (key, build())
        return cached[1]

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # torch copies the entries one by one and the kernels trust the buffers: the whole
        # incoming state is checked first, and nothing is copied unless all of it passes.
        missing = [prefix + k for k in self._buffers if prefix + k not in state_dict]
        errors = self.load_errors(state_dict, prefix)
        if missing or errors:
            missing_keys.extend(missing)
            error_msgs.extend(f"{prefix or self.name}: {e}" for e in errors)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def load_errors(self, state: Mapping[str, object], prefix: str = "") -> list[str]:
        """Why the entries of ``state`` under ``prefix`` cannot be copied into this format's
        buffers (empty: they can), missing entries aside.

        Each entry present must be a tensor of its buffer's dtype and shape (``copy_`` would
        cast float values into int8 codes, or the reverse), the optional buffers present
        must be this format's (int8 ``scales`` only with int8 values), and, once all are
        present, they must pass :meth:`check_state`: a load is refused whole or done whole.
        """
        errors = [
            f"{k} is not a buffer of this format (values {self.value_dtype}: it holds "
            f"{list(self._buffers)}), got one in the state"
            for k in self.optional_buffers
            if k not in self._buffers and prefix + k in state
        ]
        for name, own in self._buffers.items():
            if (t := state.get(prefix + name)) is None:
                continue
            if not isinstance(t, torch.Tensor):
                errors.append(f"{name} must be a tensor, got {type(t).__name__}")
            elif t.dtype != own.dtype or t.shape != own.shape:
                errors.append(
                    f"{name} must be {own.dtype} of shape {tuple(own.shape)} like the buffer "
                    f"it is copied into, got {t.dtype} {tuple(t.shape)}"
                )
        if errors or any(prefix + k not in state for k in self._buffers):
            return errors
        try:
            self.check_state([state[prefix + k] for k in self._buffers],
                             (self.out_features, self.in_features))
        except ValueError as err:
            return [str(err)]
        return []

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()  # copies and pickles carry the compressed buffers only
        state.pop("_derived", None)  # (sparse tensors can be neither deep-copied nor pickled)
        return state

    def extra_repr(self) -> str:
        values = str(self.value_dtype).removeprefix("torch.")
        return f"{self.out_features}x{self.in_features}, nnz={self.nnz}, values={values}"


def check_shape(shape: object) -> tuple[int, int]:
    """``shape`` as the tuple ``(out_features, in_features)``; raises unless it is a
    sequence of two ints ≥ 0 (a float or a string would only fail later, in a kernel)."""
    accepted = "a tuple (out_features, in_features) of two ints ≥ 0"
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ArgumentTypeError(f"shape must be {accepted}, got {shape!r}")
    for i, size in enumerate(shape):
        check_int(f"shape[{i}]", size, minimum=0)
    return int(shape[0]), int(shape[1])


def masked(
    weight: torch.Tensor, mask: torch.Tensor | None, *, materialized: bool = False
) -> torch.Tensor:
    """``weight`` (detached) with zeros where ``mask`` is False; checks that ``weight`` is a
    2-D tensor and ``mask`` a bool one of its shape (see :func:`~sparsekit.masks.check_mask`),
    and with ``materialized`` that neither is on the meta device (a format that compresses
    the weight reads which entries are nonzero: a meta one failed inside ``nonzero``)."""
    if not isinstance(weight, torch.Tensor):
        raise ArgumentTypeError(f"weight must be a 2-D tensor (out, in), got "
                                f"{type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if materialized:
        check_materialized("weight", weight)
    weight = weight.detach()
    if mask is None:
        return weight
    check_mask("mask", mask, weight.shape)
    if materialized:
        check_materialized("mask", mask)
    return weight.masked_fill(~mask.to(weight.device), 0)  # +0, not -0
