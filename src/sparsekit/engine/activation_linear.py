"""ActivationSparseLinear: an ``nn.Linear`` that skips the weight columns of small inputs.

At batch 1 a linear layer is memory-bound: every weight is read once for one multiply-add.
If input feature ``j`` is zero, column ``W[:, j]`` need not be read at all. This module zeroes
inputs with ``|x_j| < threshold_j`` and, for a single input row, reads only the columns of the
inputs that are left, with one of these kernels:

- ``"act_gemv"`` keeps ``W.T`` (each column one contiguous row) and reads whole kept columns;
- ``"act_sparse_gemv"`` keeps only the stored (unpruned) weights of each column, in blocks of
  :data:`BLOCK` outputs (uint16 row indices within the block; the threads own whole blocks),
  and reads only those: on a 50 %-pruned weight at 50 % activation sparsity a quarter of the
  weights are touched (37.5 % of the dense bytes in float32, 50 % in bfloat16, with the
  indices), so weight sparsity and activation sparsity compound;
- ``"act_bitmap_gemv"`` keeps the same stored weights as bitmap columns: per input column and
  block of :data:`BITMAP_BLOCK` outputs, one bit per output and an int32 offset to its packed
  values (a column's values are one run), which the kernel expands into the lanes of their
  outputs instead of scattering them one index at a time. One bit per weight instead of a
  2-byte index: at 50 % x 50 % it reads about half of the row-bitmap weight-only format's
  bytes, which is what makes activation sparsity pay on top of a pruned weight;
- ``"act_bitmap_qgemv"`` is ``"act_bitmap_gemv"`` on int8 values as W8A8: the kept inputs of
  the row are quantized to int8 codes with one scale (their largest magnitude / 127, the
  grid of the W8A8 formats, :func:`sparsekit.compile`'s ``activation_dtype="int8"``) and
  each output is an exact integer dot product. Four kept columns share one VNNI
  ``vpdpbusd`` per 16 outputs where the float-input kernel widens every code to a float
  (compute-bound, so TEAL barely paid on int8 weights). It is still bound by its
  shuffles, not its bytes, on the Intel Xeons of the benchmarks: the byte expansions and
  the interleaving of four columns run on one port, about 2.6x as often per weight as in
  the row bitmap (6144x2048 at 50 %, two threads, every column kept from cache: 0.48 ms
  against 0.18), so TEAL's half of the columns takes what the row kernel takes for all of
  them from memory, and compile keeps the weight-only W8A8 formats there (README, "TEAL
  on W8A8" and session 41).

The stored weights are float32 or bfloat16 (inputs of the same dtype), or int8 codes with one
float32 scale per output row (``scales``; inputs float32 or bfloat16, the layer's ``dtype``)
or, in every kernel but ``"act_bitmap_qgemv"``, one per output row and group of inputs
(GPTQ's groups: each group's run of kept inputs is summed apart, then scaled): an int8 layer
reads a quarter of the float32 bytes, and the sums stay float32 (exact int32 with
``"act_bitmap_qgemv"``, whose layers store int8 values only).

Several rows (a prompt) are multiplied by the ``prefill`` module, after the same input
sparsification: :func:`sparsekit.compile` passes the layer's fastest measured multi-row format
(dense ``F.linear`` on a contiguous ``(out, in)`` weight, or a weight-sparse format). The
transposed copy alone can be slow there: at 5632x2048 and 128 rows ``x @ W.T`` took 30 ms
against 17 ms for ``F.linear`` in float32 and, without oneDNN's bfloat16 GEMM (CPUs without
AVX-512 BF16, the prompt pass that ran 60x slower than dense), 2.7 s against 0.1 s in
bfloat16. Where it is no slower, :meth:`ActivationSparseLinear.tuned` drops the dense
``prefill`` and the rows run on the single-row storage: one copy of the weight.
"""

from __future__ import annotations

import functools
import math
import numbers
import statistics
import threading
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from sparsekit._checks import (
    ArgumentTypeError,
    check_int,
    check_loadable,
    check_materialized,
    check_module,
    is_float8,
    layer_input_error,
)
from sparsekit.engine import autotune, kernels
from sparsekit.engine.bound import BoundArguments, no_backward
from sparsekit.engine.compiled_linear import CompiledLayer, CompiledLinear, dense_linear
from sparsekit.engine.formats.native import check_threads
from sparsekit.quantize import (
    attach_scales,
    attached_scales,
    check_scale_values,
    check_within_grid,
    dequantize_grid,
    group_size_of,
    is_grouped,
    quantize_int8,
    scales_at,
)

__all__ = ["BITMAP_BLOCK", "BLOCK", "GROUPED_KERNELS", "KERNELS", "THRESHOLD_MARK",
           "ActivationSparseLinear", "applied_layers", "check_bitmap_index", "check_column_index",
           "conform", "kernels_of", "sparsify_input"]

KERNELS = ("act_gemv", "act_sparse_gemv", "act_bitmap_gemv", "act_bitmap_qgemv")
"""The single-row kernels: on the transposed dense weight, or on its stored weights only (with
a row index per weight, or as bitmap columns, with float or int8 inputs)."""

GROUPED_KERNELS = ("act_gemv", "act_sparse_gemv", "act_bitmap_gemv")
"""The kernels that read int8 scales per row and group of inputs too (the W8A8
``"act_bitmap_qgemv"`` one per row)."""

BLOCK = 2048
"""Outputs per block of the column-stored weight of ``"act_sparse_gemv"``: 8 KiB of float32
sums stay in L1 while a column's weights scatter into them, and a kept column is a run of
~1000 stored weights at 50 % (512-output blocks ran 1.7x slower at 5632x2048, 4096 alike)."""

BITMAP_BLOCK = 256
"""Outputs per block of the bitmap columns of ``"act_bitmap_gemv"``: the threads write whole
blocks of the outputs (each thread adds a share of the kept columns), and the int32 offset per
column and block costs 1/64 byte per weight. The same on
every CPU, so a saved layer loads anywhere."""

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # inputs of both kernels; sums in float32
_SPARSE_UP_TO = 0.75  # the weight-sparse kernels are candidates up to this weight density
_SPARSE_KERNELS = ("act_sparse_gemv", "act_bitmap_gemv")  # weight-sparse, float inputs
_BITMAP_KERNELS = ("act_bitmap_gemv", "act_bitmap_qgemv")  # the bitmap-column storage
_SCRATCH_BYTES = 16 << 20  # largest thresholded input kept in the per-thread scratch
_scratch = threading.local()  # dtype -> flat buffer: the thresholded inputs of this thread


def _scratch_for(x: torch.Tensor) -> torch.Tensor | None:
    """A buffer of ``x``'s shape and dtype that this thread reuses for every thresholded
    input, or ``None`` where a fresh tensor is needed: under autograd (``x`` requires grad:
    the product saves its input), while tracing (``torch.compile``, ``torch.export``,
    ``torch.jit``: the graph takes the functional op) and for inputs over
    :data:`_SCRATCH_BYTES`.

    A fresh allocation per call is what the multi-row path paid otherwise: glibc returns
    freed megabyte blocks to the kernel, so a 128 x 5632 bfloat16 input faulted in 70-210
    pages on each call, 6-12 % of the thresholding and the 2048 x 5632 product after it
    (Intel Xeon, two threads). The result never leaves
    :meth:`ActivationSparseLinear.forward`: the layer's product reads it before the thread
    thresholds again (:meth:`ActivationSparseLinear._product_only_reads`)."""
    if x.requires_grad or torch.compiler.is_compiling() or torch.compiler.is_exporting() \
            or torch.jit.is_tracing() or x.numel() * x.element_size() > _SCRATCH_BYTES:
        return None
    buffers = _scratch.__dict__.setdefault("buffers", {})
    flat = buffers.get(x.dtype)
    if flat is None or flat.numel() < x.numel():
        flat = buffers[x.dtype] = torch.empty(x.numel(), dtype=x.dtype)
    return flat[: x.numel()].view(x.shape)


def sparsify_input(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with the entries ``|x_j| < threshold_j`` set to zero (compared in ``x.dtype``).

    Each row is decided on its own, so the result does not depend on the batch. A product
    with the kept mask (a zero may keep x's sign) is one pass cheaper than ``masked_fill``:
    0.2 against 1.1 ms for 128 x 2048 float32 rows on one thread, a cost the multi-row path
    adds to every prompt. PyTorch's bfloat16 elementwise ops are much slower than its
    bfloat16 GEMM (3.8 ms for those rows in bfloat16, 6 % of the 5632 x 2048 layer's
    product), so 16-bit inputs are compared as integers: the magnitude bits of a float
    order like the magnitudes (0.19 ms); NaN stays NaN either way.

    ``x`` must be a floating-point tensor (an integer one compared against thresholds
    truncated to integers) and ``threshold`` a float tensor of one value or one per
    feature of ``x``, on any device (it is moved to ``x``'s); only their types and shapes
    are checked, never their values, which would wait for an accelerator on every call.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ArgumentTypeError(f"x must be a floating-point tensor, got "
                                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    width = x.shape[-1] if x.dim() else 1
    accepted = f"a float tensor of 1 or {width} values (one per feature of x)"
    if not isinstance(threshold, torch.Tensor) or not threshold.is_floating_point():
        got = threshold.dtype if isinstance(threshold, torch.Tensor) else type(threshold).__name__
        raise ArgumentTypeError(f"threshold must be {accepted}, got {got}")
    if threshold.dim() > 1 or threshold.numel() not in (1, width):
        raise ValueError(f"threshold must be {accepted}, got shape {tuple(threshold.shape)}")
    threshold = threshold.to(x.device, x.dtype)  # a CPU one failed with a CUDA x
    if x.is_floating_point() and x.element_size() == 2:
        bits = x.view(torch.int16)
        kept = (bits & 0x7FFF).ge(threshold.clamp_min(0).view(torch.int16))
        return kept.mul(bits).view(x.dtype)
    return x * (x.abs() >= threshold)


def check_threshold(name: str, threshold: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``threshold`` is a 1-D float tensor of
    thresholds ≥ 0 (one per input feature; ``inf`` zeroes its feature), not on the meta
    device: a NaN threshold would zero every input without a word."""
    if not isinstance(threshold, torch.Tensor) or threshold.dim() != 1 \
            or not threshold.is_floating_point():
        got = (f"a tensor of shape {tuple(threshold.shape)} and dtype {threshold.dtype}"
               if isinstance(threshold, torch.Tensor) else type(threshold).__name__)
        raise ValueError(f"{name} must be a 1-D float tensor (one threshold per input "
                         f"feature), got {got}")
    check_materialized(name, threshold)  # a meta one failed inside the comparison below
    if not bool((threshold >= 0).all()):  # also NaN
        raise ValueError(f"{name} must hold thresholds ≥ 0 (inf allowed; NaN would zero every "
                         "input), got a NaN or negative one")


THRESHOLD_MARK = "_sparsekit_activation_threshold"
"""An attribute set on the hooks :meth:`sparsekit.activation.ActivationSparsity.apply`
installs, by which :func:`applied_layers` finds them."""


def applied_layers(layers: Mapping[str, nn.Module]) -> list[str]:
    """The names of ``layers`` whose inputs an applied :class:`ActivationSparsity`
    thresholds (whichever object applied it)."""
    return [n for n, m in layers.items()
            if any(getattr(h, THRESHOLD_MARK, False) for h in m._forward_pre_hooks.values())]


def thresholded_layers(thresholds: Mapping[str, torch.Tensor], model: nn.Module,
                       name: str = "thresholds") -> dict[str, nn.Module]:
    """The modules of ``model`` that ``thresholds`` (the argument ``name``: calibrated input
    thresholds by module name) names, each threshold checked (:func:`check_threshold`) and
    as wide as its layer's input; ``ValueError`` naming the first that is not."""
    if not isinstance(thresholds, Mapping):
        raise ArgumentTypeError(f"{name} must be a mapping of module names to tensors, got "
                                f"{type(thresholds).__name__}")
    modules = dict(model.named_modules())
    missing = [n for n in thresholds if n not in modules]
    if missing:
        raise ValueError(f"{name}: model has no modules named {missing} (calibrated on another "
                         "model?)")
    for layer, threshold in thresholds.items():
        check_threshold(f"{name}[{layer!r}]", threshold)
        width = getattr(modules[layer], "in_features", threshold.numel())
        if threshold.numel() != width:
            raise ValueError(f"{name}[{layer!r}] has {threshold.numel()} thresholds, but layer "
                             f"{layer!r} of model takes {width} input features")
    return {n: modules[n] for n in thresholds}


def _measure(modules: dict[str, nn.Module], weight: torch.Tensor, rows: list[int],
             inputs: torch.Tensor | None) -> autotune.Samples:
    return autotune.measure(modules, (weight.shape[1],), rows, weight.dtype, weight.device,
                            inputs)


def _by_column(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """``weight`` (out, in) stored by input column per block of ``block`` outputs: the kept
    values, their int16 row within the block, and int32 ``colptr`` (blocks, in + 1)."""
    out, cols = weight.shape
    values, rows, colptr, stored = [], [], [], 0
    for o0 in range(0, out, block):
        part = weight[o0:o0 + block].t()  # (in, n): nonzero() walks it column by column
        j, o = part.nonzero(as_tuple=True)
        values.append(part[j, o])
        rows.append(o.to(torch.int32).to(torch.int16))  # < 65536, read back as uint16
        counts = torch.bincount(j, minlength=cols)
        colptr.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]) + stored)
        stored += j.numel()
    if stored >= 2**31:
        raise ValueError(f"weight has {stored} nonzeros; act_sparse_gemv holds fewer than 2^31")
    empty = weight.new_empty(0)
    return (torch.cat(values) if values else empty,
            torch.cat(rows) if rows else empty.to(torch.int16),
            torch.stack(colptr).to(torch.int32) if colptr
            else torch.zeros(0, cols + 1, dtype=torch.int32))


def _bitmap_columns(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """``weight`` (out, in) as bitmap columns in blocks of ``block`` outputs: the stored values
    (column after column, each in output order, so a column is one run), the int16 bitmap
    (in, blocks, block / 16) whose bit ``r`` of word ``w`` marks output ``16 w + r`` of the
    block, and int32 ``offsets`` (in, blocks + 1) of each (column, block)'s first value,
    rising from 0 through every column to the number of values."""
    out, cols = weight.shape
    blocks = -(-out // block)
    padded = weight.new_zeros(blocks * block, cols)
    padded[:out] = weight
    by_column = padded.view(blocks, block, cols).permute(2, 0, 1)  # (in, blocks, block)
    kept = by_column != 0
    values = by_column[kept]
    if values.numel() >= 2**31:
        raise ValueError(f"weight has {values.numel()} nonzeros; act_bitmap_gemv holds fewer "
                         "than 2^31")
    weights = torch.ones(16, dtype=torch.int32) << torch.arange(16, dtype=torch.int32)
    words = (kept.reshape(cols, blocks, block // 16, 16).to(torch.int32) * weights).sum(-1)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)  # read back as uint16
    counts = kept.sum(-1, dtype=torch.int32)  # (in, blocks)
    ends = counts.view(-1).cumsum(0, dtype=torch.int32).view(cols, blocks)
    starts = ends - counts
    last = ends[:, -1:] if blocks else starts.new_zeros(cols, 1)
    return (values.contiguous(), words.to(torch.int16).contiguous(),
            torch.cat([starts, last], 1).contiguous())


def _bitmap_weight(values: torch.Tensor, bitmap: torch.Tensor, out: int) -> torch.Tensor:
    """The weight (out, in) of bitmap columns (:func:`_bitmap_columns`), zeros where pruned."""
    cols, blocks, words = bitmap.shape
    bits = (bitmap.to(torch.int32)[..., None] >> torch.arange(16, dtype=torch.int32)) & 1
    kept = bits.view(cols, blocks, words * 16).bool()
    by_column = values.new_zeros(cols, blocks, words * 16)
    by_column[kept] = values
    return by_column.permute(1, 2, 0).reshape(blocks * words * 16, cols)[:out].contiguous()


class ActivationSparseLinear(BoundArguments):
    """``y = sparsify_input(x, threshold) @ W.T + bias``, reading only the weights it needs.

    ``threshold`` is a scalar or one value per input feature (``in_features``). ``weight``
    is float32 or bfloat16, or int8 codes with ``scales`` (float32, one per output row:
    ``W = weight * scales[:, None]``, or with the kernels of :data:`GROUPED_KERNELS` one per
    output row and group of inputs, ``(out, groups)`` with ``groups`` dividing
    ``in_features``); ``dtype`` is the dtype of the inputs, thresholds, bias
    and outputs (default: the weight's; float32 for int8 codes). ``bias`` is a
    floating-point tensor of shape ``(out_features,)``, stored as ``dtype`` (a float64 or
    float32 bias of a bfloat16 layer is rounded to it, as ``nn.Linear.to`` would; an
    integer one is refused). Inputs have shape
    ``(..., in_features)``; a single row of ``dtype`` (float32 or bfloat16, summed in
    float32) runs ``kernel`` (one of :data:`KERNELS`) with ``threads`` OpenMP threads
    (default ``torch.get_num_threads()``); several rows run through ``prefill`` (a module
    computing ``x @ W.T + bias``, e.g. a compiled layer) after the same thresholding, or,
    without one, on the single-row storage; a ``prefill`` that declares ``in_features`` /
    ``out_features`` must declare this layer's. Inference only: the weights are buffers.
    Loading a state (``load_state_dict``, :func:`sparsekit.load`) checks all of it first
    (:meth:`load_errors`: every buffer's dtype and shape, the column index or bitmap
    against its values, the thresholds and scales) and copies nothing unless all passes.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        threshold: torch.Tensor | float,
        *,
        threads: int | None = None,
        kernel: str = "act_gemv",
        prefill: nn.Module | None = None,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor):
            raise ArgumentTypeError(f"weight must be a 2-D tensor (out, in), got "
                                    f"{type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        check_materialized("weight", weight)  # its storage is built from its values
        self.out_features, self.in_features = weight.shape
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ArgumentTypeError(f"dtype must be a floating-point torch.dtype or None, got "
                                    f"{dtype!r}")
        if scales is not None and not isinstance(scales, torch.Tensor):
            raise ArgumentTypeError(f"scales must be None or a float tensor of shape "
                                    f"({self.out_features},), got {type(scales).__name__}")
        dtype = _check_storage(weight, scales, dtype)
        if is_grouped(scales) and kernel not in GROUPED_KERNELS:
            raise ValueError(f"kernel {kernel!r} takes one int8 scale per row, got scales of "
                             f"shape {tuple(scales.shape)} (one per group of inputs); the "
                             f"kernels that take them: {GROUPED_KERNELS}")
        threshold = _threshold_tensor(threshold, self.in_features)
        if bias is not None:
            _check_bias(bias, self.out_features)
        check_threads(threads)
        if not isinstance(kernel, str):
            raise ArgumentTypeError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel == "act_bitmap_qgemv" and weight.dtype != torch.int8:
            raise ValueError(f"kernel 'act_bitmap_qgemv' (int8 inputs) needs int8 weight codes "
                             f"with scales, got a {weight.dtype} weight")
        if prefill is not None:
            _check_prefill(prefill, self.in_features, self.out_features)
        self.threads, self.kernel, self.dtype = threads, kernel, dtype
        self.block = BITMAP_BLOCK if kernel in _BITMAP_KERNELS else BLOCK
        weight = weight.detach()
        if kernel == "act_gemv":
            self.register_buffer("weight_t", weight.t().contiguous())
        elif kernel == "act_sparse_gemv":
            for name, tensor in zip(("values", "row_indices", "colptr"),
                                    _by_column(weight, BLOCK), strict=True):
                self.register_buffer(name, tensor)
        else:
            for name, tensor in zip(("values", "bitmap", "offsets"),
                                    _bitmap_columns(weight, BITMAP_BLOCK), strict=True):
                self.register_buffer(name, tensor)
        self.register_buffer("scales", None if scales is None
                             else scales.detach().to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        self.register_buffer(
            "threshold", threshold.expand(self.in_features).to(dtype).contiguous()
        )
        self.prefill = prefill

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        threshold: torch.Tensor | float,
        *,
        threads: int | None = None,
        kernel: str = "act_gemv",
        prefill: nn.Module | None = None,
        value_dtype: torch.dtype | None = None,
    ) -> ActivationSparseLinear:
        """The activation-sparse equivalent of ``linear`` with the given input threshold.

        ``value_dtype`` is the dtype of the stored weights: ``None`` keeps ``linear``'s,
        except that a layer carrying int8 scales (:func:`sparsekit.quantize.attach_scales`)
        stores exactly those int8 codes; ``torch.int8`` rounds the weight to int8 codes on
        its attached scales, else on one scale per row (largest magnitude / 127). A grid
        with one scale per group of inputs (``sparsekit.llm.prune(..., group_size=...)``)
        keeps its codes and groups (the kernels of :data:`GROUPED_KERNELS`; the W8A8
        ``"act_bitmap_qgemv"``, which reads one scale per row, refuses it). Inputs and
        outputs keep ``linear``'s dtype.
        """
        if not isinstance(linear, nn.Linear):  # an nn.Embedding's weight was taken as one
            raise ArgumentTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        scales = attached_scales(linear)
        if value_dtype not in (None, torch.int8):
            raise ValueError(f"value_dtype must be None or torch.int8, got {value_dtype!r}")
        if is_grouped(scales) and kernel not in GROUPED_KERNELS:
            raise ValueError(
                f"kernel {kernel!r} takes one int8 scale per row, and linear's grid has one "
                f"per group of inputs (scales of shape {tuple(scales.shape)}); accepted for "
                f"it: a kernel of {GROUPED_KERNELS}")
        if value_dtype is None and scales is None:
            return cls(linear.weight, linear.bias, threshold, threads=threads, kernel=kernel,
                       prefill=prefill)
        weight = linear.weight.detach()
        if scales is not None:  # else clamped to ±127 steps of a grid it outgrew
            check_within_grid("linear", weight, scales)
        codes, scales = quantize_int8(weight, scales, group_size_of(weight, scales))
        return cls(codes, linear.bias, threshold, threads=threads, kernel=kernel,
                   prefill=prefill, scales=scales, dtype=linear.weight.dtype)

    @classmethod
    def tuned(
        cls,
        linear: nn.Linear,
        threshold: torch.Tensor | float,
        *,
        threads: int | None = None,
        prefill: nn.Module | None = None,
        rows: Sequence[int] = (1,),
        value_dtype: torch.dtype | None = None,
        inputs: torch.Tensor | None = None,
        activation_dtype: torch.dtype | None = None,
    ) -> tuple[ActivationSparseLinear, dict[str, object] | None]:
        """The layer with the fastest single-row kernel for ``linear``'s weight, and the
        record of the choice (``None`` when there was nothing to time).

        The weight-sparse kernels (``"act_sparse_gemv"``, ``"act_bitmap_gemv"``) are timed
        against ``"act_gemv"`` (the ``"dense"`` of the :func:`~sparsekit.engine.autotune.choose`
        record) only for a weight of density at most 75 % and dtype float32 or bfloat16 with
        the kernels built; one is taken only if it wins by
        :data:`~sparsekit.engine.autotune.MARGIN`, as a format replaces dense.
        A dense ``prefill`` next to ``"act_gemv"`` is a second copy of the weight: it is
        dropped (``"single_copy"`` in the record) where the transposed copy multiplies the
        ``rows`` above 1 no slower in the median at every row count. Both kernels store
        ``value_dtype`` (see :meth:`from_linear`). The timings run on ``inputs`` (rows of
        real activations: the skipped columns depend on them), else on random normal ones.
        ``activation_dtype=torch.int8`` (int8 values only; W8A8) adds ``"act_bitmap_qgemv"``
        to the weight-sparse kernels.
        """
        rows = autotune.check_rows(rows)
        if activation_dtype not in (None, torch.int8):
            raise ValueError(f"activation_dtype must be None or torch.int8, got "
                             f"{activation_dtype!r}")
        if activation_dtype is not None and value_dtype != torch.int8:
            raise ValueError(f"activation_dtype=torch.int8 needs value_dtype=torch.int8, got "
                             f"{value_dtype!r}")
        build = functools.partial(cls.from_linear, linear, threshold, threads=threads,
                                  value_dtype=value_dtype)
        dense = build(prefill=prefill)
        weight, choice = linear.weight, None
        sparse = cls.kernels_for(weight, activation_dtype)[1:]
        if sparse:
            modules = {"dense": dense, **{k: build(kernel=k, prefill=prefill) for k in sparse}}
            best, choice = autotune.choose(_measure(modules, weight, [1], inputs),
                                           ["dense", *sparse])
            choice["format"] = best.replace("dense", "act_gemv")
            if best != "dense":
                return modules[best], choice
        multi = [r for r in rows if r > 1]
        if not multi or getattr(getattr(prefill, "format", None), "name", None) != "dense":
            return dense, choice
        lean = build()
        samples = _measure({"dense": dense, "lean": lean}, weight, multi, inputs)
        single = all(statistics.median(t["lean"]) <= statistics.median(t["dense"])
                     for t in samples.values())
        return (lean if single else dense), {**(choice or {"format": "act_gemv"}),
                                             "single_copy": single}

    @staticmethod
    def kernels_for(weight: torch.Tensor,
                    activation_dtype: torch.dtype | None = None) -> list[str]:
        """The single-row kernels :meth:`tuned` times for a layer of ``weight``:
        ``"act_gemv"`` first, then, for a float32 or bfloat16 CPU weight of density at most
        75 % with the kernels built, the weight-sparse ones (``"act_bitmap_qgemv"`` too for
        ``activation_dtype=torch.int8``)."""
        if (weight.dtype not in _KERNEL_DTYPES or not weight.is_cpu or not kernels.available()
                or weight.count_nonzero() > _SPARSE_UP_TO * weight.numel()):
            return ["act_gemv"]
        return ["act_gemv", *_SPARSE_KERNELS,
                *(["act_bitmap_qgemv"] if activation_dtype is not None else [])]

    @classmethod
    def decided(
        cls,
        linear: nn.Linear,
        threshold: torch.Tensor | float,
        choice: dict[str, object] | None,
        *,
        threads: int | None = None,
        prefill: nn.Module | None = None,
        value_dtype: torch.dtype | None = None,
    ) -> ActivationSparseLinear:
        """The layer :meth:`tuned` returns with the record ``choice`` (its kernel, and
        whether the dense ``prefill`` was dropped: ``"single_copy"``), built without timing:
        :func:`~sparsekit.engine.compile` takes a decision over for a layer like one it timed
        in the same compile."""
        if choice is not None and not isinstance(choice, dict):
            raise ArgumentTypeError(f"choice must be None or the record tuned() returned (a "
                                    f"dict), got {type(choice).__name__}")
        choice = choice or {}
        return cls.from_linear(linear, threshold, threads=threads,
                               kernel=choice.get("format", "act_gemv"),
                               prefill=None if choice.get("single_copy") else prefill,
                               value_dtype=value_dtype)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to(dtype)``, ``.half()``, ...: the layer takes (and returns) the dtype its
        thresholds were cast to, and int8 scales stay float32, as the kernels read them.
        ``dtype`` stayed the old one, so inputs of either dtype reached a kernel whose
        buffers had the other, which failed with a raw ``RuntimeError``."""
        scales = self._buffers.get("scales")
        out = super()._apply(fn, recurse)
        moved = self._buffers.get("scales")
        if scales is not None and moved is not None and moved.dtype != scales.dtype:
            self._buffers["scales"] = scales.to(moved.device)  # not rounded through the cast
        self.dtype = self._buffers["threshold"].dtype
        return out

    def __setattr__(self, name: str, value: object) -> None:
        """Attributes the kernels read are checked when assigned, not in the next product
        (which failed with a raw ``RuntimeError`` or ``KeyError``, or ran a ``prefill`` of
        another width): ``threshold``, ``bias`` and ``scales`` (:meth:`_assignable`),
        ``threads``, ``prefill``, and ``kernel`` and ``dtype``, which the buffers fix
        (``.to(dtype)`` changes the dtype; another kernel is another layer)."""
        buffers = self.__dict__.get("_buffers", {})
        if name in ("threshold", "bias", "scales") and name in buffers:
            value = self._assignable(name, value)
        elif name == "threads":
            check_threads(value)
        elif name == "prefill" and value is not None:
            _check_prefill(value, self.in_features, self.out_features)
            if any(module is self for module in value.modules()):  # type: ignore[union-attr]
                raise ValueError("prefill must be another module than this layer (and hold "
                                 "no copy of it): its prompt rows ran into a RecursionError")
        elif name == "kernel" and name in self.__dict__ and value != self.kernel:
            raise ValueError(f"kernel is fixed when the layer is built (its buffers are "
                             f"{self.kernel!r}'s), got {value!r}; accepted: a new layer, "
                             f"ActivationSparseLinear.from_linear(layer.to_module(), "
                             f"layer.threshold, kernel={value!r})")
        elif name == "dtype" and "threshold" in buffers and value != buffers["threshold"].dtype:
            raise ValueError(f"dtype is that of the layer's buffers, "
                             f"{buffers['threshold'].dtype}, got {value!r}; accepted: "
                             f"layer.to({value!r})")
        super().__setattr__(name, value)

    def _assignable(self, name: str, value: object) -> torch.Tensor | None:
        """``value`` checked as the new ``threshold``, ``bias`` or ``scales`` buffer
        (``layer.threshold = t``, or ``load_state_dict(..., assign=True)``), made contiguous
        as the kernels read it: one of this layer's shape and :attr:`dtype`, thresholds ≥ 0
        (a bias may be ``None``); int8 scales float32 of the buffer's shape, positive and
        finite (``None`` only, and only, for float values). The kernels trust these
        buffers: one of another shape or dtype failed in the next product with a raw
        ``RuntimeError`` (a float64 bias only at one row), a NaN threshold zeroed every
        input and a NaN scale every output without a word, and several rows ran on codes
        whose scales were removed."""
        if name == "bias" and value is None:
            return None
        if name == "scales":
            return self._assignable_scales(value)
        accepted = (f"a 1-D float tensor of in_features={self.in_features} thresholds ≥ 0"
                    if name == "threshold" else
                    f"None or a floating-point tensor of shape (out_features="
                    f"{self.out_features},)")
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be {accepted}, got {type(value).__name__}")
        if name == "threshold":
            check_threshold("threshold", value)
            if value.numel() != self.in_features:
                raise ValueError(f"threshold must have in_features={self.in_features} values, "
                                 f"got {value.numel()}")
        else:
            _check_bias(value, self.out_features)
        if value.dtype != self.dtype:
            raise ValueError(f"{name} must be of the layer's dtype {self.dtype}, got "
                             f"{value.dtype}; accepted: {name}.to({self.dtype})")
        return value.contiguous()

    def _assignable_scales(self, value: object) -> torch.Tensor | None:
        """``value`` checked as the new int8 ``scales`` (see :meth:`_assignable`)."""
        own = self._buffers["scales"]
        if own is None or value is None:
            if own is None and value is None:
                return None
            raise ValueError(f"scales must be {'None' if own is None else 'a tensor'} for a "
                             f"layer of {'float' if own is None else 'int8'} values (only int8 "
                             f"values are scaled), got {type(value).__name__}")
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(f"scales must be a float32 tensor of shape "
                                    f"{tuple(own.shape)}, got {type(value).__name__}")
        if value.dtype != own.dtype or value.shape != own.shape:
            raise ValueError(f"scales must be {own.dtype} of shape {tuple(own.shape)} like the "
                             f"buffer, got {value.dtype} {tuple(value.shape)}")
        check_materialized("scales", value)
        check_scale_values(value)
        return value.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise layer_input_error(x, self.in_features)
        bound = self.__dict__.get("_bound") or self._bind()
        if (bound is not None and x.dim() and x.shape[-1] == self.in_features == x.numel()
                and x.dtype is self.dtype and x.is_cpu and x.is_contiguous()
                and not x.requires_grad
                and not torch.compiler.is_compiling()):  # a decode step: the op, directly
            op, before, after, scales = bound
            try:
                y = op(*before, x.view(-1), *after, self.threads or torch.get_num_threads(),
                       scales)
                return y.view(*x.shape[:-1], self.out_features)
            except RuntimeError:
                pass  # the checks below say what is wrong
        return no_backward(self._checked_forward(x), x, "activation-sparse")

    def _checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product of any ``x``, checked and converted (every input but a decode step's
        that the op takes as it is)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (..., in_features={self.in_features}), got shape "
                f"{tuple(x.shape)}"
            )
        rows = math.prod(x.shape[:-1])  # not x.numel() // in_features: a layer may have no inputs
        if rows == 1:  # decode step
            return self._gemv(x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        self._check_torch_input(x)
        x = self._sparsify(x)
        if self.prefill is not None:
            return self.prefill(x)
        if self.kernel == "act_gemv":
            return F.linear(x, self._weight(self.weight_t.t(), x.dtype), self._bias(x))
        ys = [self._gemv(row) for row in x.reshape(rows, self.in_features)]
        if not ys:  # no rows at all
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return torch.stack(ys).view(*x.shape[:-1], self.out_features)

    def _sparsify(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`sparsify_input` of several rows: one ``act_threshold`` kernel call where it
        runs (the four elementwise ops of PyTorch cost 4-5 % of a 16-row bfloat16 product of a
        2048 x 2048 layer, the whole noise margin of the multi-row path), written into this
        thread's scratch buffer (:func:`_scratch_for`) where the result only feeds this
        layer's product."""
        if x.dtype is self.dtype and x.dtype in _KERNEL_DTYPES and x.is_cpu \
                and kernels.available():
            x = x.contiguous()
            out = _scratch_for(x) if self._product_only_reads() else None
            if out is None:
                return torch.ops.sparsekit.act_threshold(x, self.threshold)
            return torch.ops.sparsekit.act_threshold.out(x, self.threshold, out=out)
        return sparsify_input(x, self.threshold)

    def _product_only_reads(self) -> bool:
        """Whether the product after the thresholding only reads its input, so that the
        thresholded rows may live in the thread's scratch buffer: this layer's own product, or
        a compiled ``prefill`` without forward hooks, its own or global ones
        (``register_module_forward_hook``, ``register_module_forward_pre_hook``). Any other
        module, or a hook, could keep the input (a captured activation), which the next call
        would then overwrite."""
        prefill = self.prefill
        return prefill is None or (isinstance(prefill, CompiledLayer)
                                   and not prefill._forward_pre_hooks
                                   and not prefill._forward_hooks
                                   and not module_hooks._global_forward_pre_hooks
                                   and not module_hooks._global_forward_hooks)

    def _operands(self) -> tuple[object, tuple[torch.Tensor, ...], tuple[object, ...]]:
        """The kernel op, its tensors before ``x`` and its arguments between ``x`` and
        ``threads`` (``scales`` comes last): ``op(*before, x, *after, threads, scales)``."""
        op = getattr(torch.ops.sparsekit, self.kernel)
        b = self._buffers
        if self.kernel == "act_gemv":
            return op, (b["weight_t"],), (b["threshold"], b["bias"])
        index = ("row_indices", "colptr") if self.kernel == "act_sparse_gemv" else ("bitmap",
                                                                                   "offsets")
        return (op, (b["values"], *(b[n] for n in index)),
                (b["threshold"], b["bias"], self.out_features, self.block))

    def _bind(self) -> tuple[object, ...] | None:
        """The op's C++ entry and its arguments but ``x`` and ``threads``
        (:mod:`sparsekit.engine.bound`); ``None`` without kernels, for inputs the kernels do
        not take, for buffers off the CPU or while ``torch.compile`` traces."""
        if not kernels.available() or self.dtype not in _KERNEL_DTYPES or not self._bindable():
            return None
        op, before, after = self._operands()
        return self._keep((op.default._op, before, after, self._kernel_scales()))

    def _kernel_scales(self) -> torch.Tensor | None:
        """The ``scales`` argument of the kernels: the buffer, or for scales per group of
        inputs ``(out, groups)`` its transpose ``(groups, out)``, whose rows are the runs of
        outputs each group's sums multiply."""
        scales = self.scales
        return scales.t().contiguous() if is_grouped(scales) else scales

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        """One row: only the weights of kept inputs are read (the checked way: a decode
        step's input goes from :meth:`forward` to the bound op directly)."""
        if x.dtype is self.dtype and x.dtype in _KERNEL_DTYPES and x.is_cpu \
                and kernels.available():
            op, before, after = self._operands()
            return op(*before, x.contiguous(), *after, self.threads or kernels.num_threads(),
                      self._kernel_scales())
        self._check_torch_input(x)
        # the kept columns are chosen by x's values (a raw NotImplementedError of nonzero()
        # for a layer and input moved to the meta device)
        check_materialized("x", x)
        if self.kernel == "act_bitmap_qgemv":
            return self._w8a8_gemv(x)
        kept = (sparsify_input(x, self.threshold) != 0).nonzero().squeeze(1)
        weight = self._weight(self._columns(kept), x.dtype, kept)
        y = weight.mv(x.index_select(0, kept))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _w8a8_gemv(self, x: torch.Tensor) -> torch.Tensor:
        """One row as ``act_bitmap_qgemv`` computes it, in PyTorch: the thresholded row on
        its int8 grid, exact integer sums (float64 holds them), ``sum * sx * scales + bias``
        in float32; every output NaN for a row with a NaN or infinite input."""
        if not bool(x.isfinite().all()):
            return x.new_full((self.out_features,), float("nan"))
        codes, sx = quantize_int8(sparsify_input(x, self.threshold).float()[None])
        sums = self.to_dense().double() @ codes[0].double()
        y = sums.float() * sx[0] * self.scales
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)

    def _columns(self, kept: torch.Tensor) -> torch.Tensor:
        """The columns ``kept`` of the weight, (out, len(kept)), in the stored dtype."""
        if self.kernel == "act_gemv":
            return self.weight_t.index_select(0, kept).t()
        return self.to_dense().index_select(1, kept)

    def _weight(self, stored: torch.Tensor, dtype: torch.dtype,
                columns: torch.Tensor | None = None) -> torch.Tensor:
        """Stored weights (out, k) of the input ``columns`` (default: all of them) as
        ``dtype``: int8 codes times their row's scale, or their row's of their group."""
        scales = self.scales
        if scales is None:
            return stored.to(dtype)
        if columns is None:
            columns = torch.arange(self.in_features, device=scales.device)
        rows = torch.arange(self.out_features, device=scales.device)[:, None]
        at = scales_at(scales, rows, columns[None], self.in_features)
        return (stored.to(torch.float32) * at).to(dtype)

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def _check_torch_input(self, x: torch.Tensor) -> None:
        """Before the PyTorch path (the weight converted to ``x.dtype``): ``TypeError``
        unless ``x`` is floating, ``ValueError`` unless it is on the weight's device."""
        if not x.is_floating_point():
            raise ArgumentTypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.device != self.threshold.device:
            raise ValueError(
                f"x must be on the weight's device {self.threshold.device}, got {x.device}"
            )

    def to_dense(self) -> torch.Tensor:
        """The stored weight (out, in) in its stored dtype (zeros where pruned): ``W``, or
        for an int8 layer its codes (``W = codes * scales[:, None]``, or times the scales of
        their row and group of inputs). On the meta device, a meta weight of that shape, as
        ``"act_gemv"`` gives (the index kernels' decoding failed with a raw
        ``RuntimeError``)."""
        if self.kernel == "act_gemv":
            return self.weight_t.t().contiguous()
        if self.values.is_meta:  # no index to decode
            return self.values.new_empty(self.out_features, self.in_features)
        if self.kernel in _BITMAP_KERNELS:
            return _bitmap_weight(self.values, self.bitmap, self.out_features)
        weight = self.values.new_zeros(self.out_features, self.in_features)
        per_block = self.colptr.diff(dim=1).to(torch.int64)  # (blocks, in): stored per column
        blocks = torch.arange(per_block.shape[0], device=per_block.device)
        cols = torch.arange(self.in_features, device=per_block.device)
        block_of = blocks.repeat_interleave(per_block.sum(1))
        col_of = cols.repeat(per_block.shape[0]).repeat_interleave(per_block.reshape(-1))
        rows = self.row_indices.to(torch.int64) & 0xFFFF  # uint16 stored as int16
        weight[block_of * self.block + rows, col_of] = self.values
        return weight

    @property
    def nbytes(self) -> int:
        """Bytes of the single-row storage (weights, indices, scales, bias, thresholds)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values()
                   if b is not None)

    @property
    def prefill_nbytes(self) -> int:
        """Bytes of the ``prefill`` module's own copy of the weight (0 without one): what
        serving the prompt rows at the weight-only format's speed costs on top of
        :attr:`nbytes`."""
        if self.prefill is None:
            return 0
        return sum(t.numel() * t.element_size() for t in
                   (*self.prefill.parameters(), *self.prefill.buffers()))

    def to_module(self) -> nn.Linear:
        """The ``nn.Linear`` this layer was built from (without the input thresholds); an
        int8 layer's dequantized weight in :attr:`dtype`, with its scales attached
        (:func:`sparsekit.quantize.attach_scales`)."""
        if self.scales is None:
            return dense_linear(self.to_dense(), self.bias)
        weight = dequantize_grid(self.to_dense(), self.scales).to(self.dtype)
        linear = dense_linear(weight, self.bias)
        attach_scales(linear, self.scales)
        return linear

    def expected_state(
        self, state: dict[str, torch.Tensor], prefix: str = ""
    ) -> dict[str, torch.Tensor] | None:
        """This layer's ``state_dict`` entries (under ``prefix``) after loading ``state``,
        once its entries there pass :meth:`load_errors` (``ValueError`` naming the layer
        otherwise): the kernels check only the ends of ``colptr`` / ``offsets`` on their hot
        path, so a forged index would read and write out of bounds. ``None`` when ``state``
        holds none of this layer's buffers. Used by :func:`sparsekit.load`.
        """
        _check_state(state, prefix)
        if not any(f"{prefix}{k}" in state for k, t in self._buffers.items() if t is not None):
            return None
        errors = self.load_errors(state, prefix)
        if errors:
            raise ValueError("; ".join(errors))
        return self.state_dict(prefix=prefix) | {
            prefix + k: state[prefix + k] for k in self._sized() if prefix + k in state}

    def _sized(self) -> tuple[str, ...]:
        """The buffers with one entry per stored weight: a state of another number of
        them loads (its index is checked against them), as a compiled layer takes the
        saved format whatever its own."""
        return {"act_sparse_gemv": ("values", "row_indices"), "act_gemv": ()}.get(
            self.kernel, ("values",))

    def load_errors(self, state: Mapping[str, object], prefix: str = "") -> list[str]:
        """Why the entries of ``state`` under ``prefix`` cannot be copied into this layer's
        buffers (empty: they can), missing entries aside; each message names the layer.

        Each entry present must be a tensor of its buffer's dtype and shape (``copy_`` would
        cast float values into int8 codes, or an int32 index into int16), a buffer with one
        entry per stored weight (``values``, ``row_indices``) of any length, and the buffers as
        they would be after the load (the entries present, this layer's own for the others)
        must hold a valid column index (:func:`check_column_index`) or bitmap columns
        (:func:`check_bitmap_index`) over the values, thresholds ≥ 0
        (:func:`check_threshold`) and positive finite int8 scales: a load is refused whole
        or done whole.
        """
        _check_state(state, prefix)
        name = prefix.rstrip(".") or "layer"
        errors = []
        sized = self._sized()
        for key, own in self._buffers.items():
            if own is None or (t := state.get(prefix + key)) is None:
                continue  # a buffer this layer lacks is an unexpected key: torch says so
            if not isinstance(t, torch.Tensor):
                errors.append(f"{name}: {key} must be a tensor, got {type(t).__name__}")
            elif key in sized and (t.dtype != own.dtype or t.dim() != 1):
                errors.append(f"{name}: {key} must be a 1-D {own.dtype} tensor (one entry per "
                              f"stored weight) like the buffer it replaces, got {t.dtype} "
                              f"{tuple(t.shape)}")
            elif key not in sized and (t.dtype != own.dtype or t.shape != own.shape):
                errors.append(f"{name}: {key} must be {own.dtype} of shape {tuple(own.shape)} "
                              f"like the buffer it is copied into, got {t.dtype} "
                              f"{tuple(t.shape)}")
        if errors:
            return errors
        after = {k: state.get(prefix + k, own) for k, own in self._buffers.items()
                 if own is not None}
        try:
            for key, t in after.items():  # the checks below read them
                check_materialized(f"{name}: {key}", t)
            if self.kernel == "act_sparse_gemv":
                check_column_index(after["colptr"], after["row_indices"], after["values"],
                                   self.out_features, self.block, name=name)
            elif self.kernel in _BITMAP_KERNELS:
                check_bitmap_index(after["bitmap"], after["offsets"], after["values"],
                                   self.out_features, self.block, name=name)
            check_threshold(f"{name}: threshold", after["threshold"])
            if "scales" in after:
                check_scale_values(after["scales"])
        except ValueError as err:
            message = str(err)
            return [message if message.startswith(f"{name}:") else f"{name}: {message}"]
        return []

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # torch copies the entries one by one and the kernels trust the index: the whole
        # incoming state is checked first, and nothing is copied unless all of it passes.
        errors = self.load_errors(state_dict, prefix)
        if not errors:
            try:  # an inference tensor outside inference mode: every buffer changed, then raised
                check_loadable(self, state_dict, prefix, local_metadata)
            except ValueError as err:
                errors = [str(err)]
        if errors:
            missing_keys.extend(prefix + k for k, t in self._buffers.items()
                                if t is not None and k not in self._non_persistent_buffers_set
                                and prefix + k not in state_dict)
            error_msgs.extend(errors)
            return
        for key in self._sized():  # another number of stored weights: a buffer of its size
            own, t = self._buffers[key], state_dict.get(prefix + key)
            if t is not None and t.shape != own.shape:
                self._buffers[key] = own.new_empty(t.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._unbind()  # the bound transposed copy of grouped scales is not the buffer
        # assign=True made the buffers the state's own tensors, which the kernels refuse
        # unless contiguous (a raw RuntimeError on the next forward)
        for key, t in list(self._buffers.items()):
            if t is not None and not t.is_contiguous():
                setattr(self, key, t.contiguous())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={self.kernel!r}"
            + ("" if self.scales is None else ", values=int8")
        )


def kernels_of(model: nn.Module) -> dict[str, str]:
    """The single-row kernel of every activation-sparse layer of ``model``, by name (what
    :func:`sparsekit.save` records: the kernel is decided by timing, so two compiles of one
    model may differ, and W8A8's and the float-input bitmap kernel store alike)."""
    check_module("model", model)
    return {name: layer.kernel for name, layer in model.named_modules()
            if isinstance(layer, ActivationSparseLinear)}


def conform(model: nn.Module, state: Mapping[str, torch.Tensor] | Collection[str],
            saved: Mapping[str, str]) -> Callable[[], None]:
    """Give the compiled layers of ``model`` the input thresholds and single-row kernels of
    the model whose state is ``state`` (its keys; where it maps them to tensors, or to
    placeholders of their dtypes, those dtypes too) and whose kernels were ``saved``
    (:func:`kernels_of`); return the function that puts the replaced modules back.

    Whether a layer is activation-sparse, its kernel and whether it keeps a ``prefill``
    copy are all decided by timing, so two compiles of one model differ. A layer here that
    differs from the saved one in any of them, or in its dtype (its thresholds'), becomes a
    skeleton of the saved kind and dtype, built from its own weight (the load then installs
    the saved buffers, of any number of stored weights; a bf16 layer fused here into a
    group without bias was a float32 skeleton, refused): a weight-only layer saved with
    thresholds an :class:`ActivationSparseLinear` (itself its ``prefill``), an
    activation-sparse one saved weight-only its ``prefill`` (or a dense compiled layer). A
    layer ``saved`` does not name (a file written before the kernels were recorded) takes
    the kernel its keys store: ``weight_t``, a column index, or bitmap columns
    (``"act_bitmap_gemv"``, or W8A8's where the layer here has it). ``saved`` must map names
    to :data:`KERNELS`, else a ``ValueError`` names the entry and
    ``model`` is left as it was."""
    check_module("model", model)
    for name, kernel in saved.items():
        if not isinstance(name, str) or kernel not in KERNELS:
            raise ValueError(f"the saved model's kernel of {name!r:.100} must be one of "
                             f"{KERNELS}, got {kernel!r:.100}")
    keys = set(state)
    replaced: list[tuple[str, nn.Module]] = []

    def undo() -> None:
        for name, old in reversed(replaced):
            model.set_submodule(name, old)

    try:
        for name, layer in list(model.named_modules()):
            if not name or not isinstance(layer, (CompiledLinear, ActivationSparseLinear)):
                continue
            head = f"{name}."
            if f"{head}threshold" in keys:
                kernel = saved.get(name) or _stored_kernel(keys, head, layer)
                prefilled = any(k.startswith(f"{head}prefill.") for k in keys)
                dtype = (state[f"{head}threshold"].dtype if isinstance(state, Mapping)
                         else input_dtype(layer))
                if (isinstance(layer, ActivationSparseLinear) and layer.kernel == kernel
                        and (layer.prefill is not None) == prefilled and layer.dtype == dtype):
                    continue
                new: nn.Module = _skeleton(layer, kernel, prefilled, f"{head}scales" in keys,
                                           dtype)
            elif (isinstance(layer, ActivationSparseLinear)
                  and any(k.startswith(f"{head}format.") for k in keys)):
                new = (layer.prefill if layer.prefill is not None
                       else CompiledLinear.from_linear(layer.to_module()))
            else:
                continue
            replaced.append((name, layer))
            model.set_submodule(name, new)
    except BaseException:
        undo()
        raise
    return undo


def input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of the inputs ``layer`` takes: an activation-sparse layer's own, a compiled
    layer's ``io_dtype`` (else its stored values'), a plain layer's weight's."""
    if isinstance(layer, ActivationSparseLinear):
        return layer.dtype
    dtype = getattr(layer, "io_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(layer, CompiledLinear):
        return layer.to_linear().weight.dtype
    weight = getattr(layer, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def _stored_kernel(keys: Collection[str], head: str, layer: nn.Module) -> str:
    """The kernel whose buffers ``keys`` hold under ``head``."""
    if f"{head}weight_t" in keys:
        return "act_gemv"
    if f"{head}row_indices" in keys:
        return "act_sparse_gemv"
    return ("act_bitmap_qgemv" if getattr(layer, "kernel", None) == "act_bitmap_qgemv"
            else "act_bitmap_gemv")


def _skeleton(layer: CompiledLinear | ActivationSparseLinear, kernel: str, prefilled: bool,
              int8: bool, dtype: torch.dtype) -> ActivationSparseLinear:
    """An activation-sparse layer of ``kernel`` and ``dtype`` over ``layer``'s weight, with
    a ``prefill`` copy if ``prefilled`` and int8 values if ``int8``, for a saved state to
    load into."""
    if isinstance(layer, CompiledLinear):
        linear, threads, prefill = layer.to_linear(), None, layer
    else:
        linear, threads, prefill = layer.to_module(), layer.threads, layer.prefill
    linear = linear.to(dtype)
    if prefilled and prefill is None:
        prefill = CompiledLinear.from_linear(linear)
    return ActivationSparseLinear.from_linear(
        linear, 0.0, threads=threads, kernel=kernel, prefill=prefill if prefilled else None,
        value_dtype=torch.int8 if int8 else None)


def _check_state(state: object, prefix: object) -> None:
    """Raise :class:`ArgumentTypeError` unless ``state`` is a mapping (a state dict) and
    ``prefix`` a str: a list held none of the layer's keys, so ``expected_state`` took it
    for a state without them, and ``None`` failed with a raw ``AttributeError``."""
    if not isinstance(state, Mapping):
        raise ArgumentTypeError(f"state must be a mapping of key to tensor (a state dict), "
                                f"got {type(state).__name__}")
    if not isinstance(prefix, str):
        raise ArgumentTypeError(f"prefix must be a str (the layer's name and a dot, or ''), "
                                f"got {prefix!r}")


def check_column_index(colptr: torch.Tensor, row_indices: torch.Tensor | None,
                       values: torch.Tensor | None, out_features: int, block: int, *,
                       name: str = "layer") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``colptr`` / ``row_indices`` form a valid
    ``act_sparse_gemv`` column index over ``values`` for ``out_features`` outputs in blocks
    of ``block``: int32 column pointers of shape (blocks, in + 1) that start at 0, never
    fall, continue from block to block and end at the number of values, and int16 row
    indices (read as uint16), one per value, inside their block."""
    if row_indices is None or values is None:
        raise ValueError(f"{name}: colptr needs row_indices and values beside it")
    _check_index_arguments(name, out_features, block, colptr=colptr, row_indices=row_indices,
                           values=values)
    blocks = -(-out_features // block)
    nnz = values.numel()
    if (values.dim() != 1 or colptr.dtype != torch.int32 or colptr.dim() != 2
            or colptr.shape[0] != blocks
            or colptr.shape[1] < 1 or row_indices.dtype != torch.int16
            or row_indices.shape != (nnz,)):
        raise ValueError(
            f"{name}: expected int32 colptr ({blocks}, in + 1), int16 row_indices ({nnz},) and "
            f"1-D values, got {colptr.dtype} {tuple(colptr.shape)}, {row_indices.dtype} "
            f"{tuple(row_indices.shape)} and {tuple(values.shape)}"
        )
    if blocks == 0:
        if nnz:
            raise ValueError(f"{name}: {nnz} values for 0 outputs")
        return
    ptr = colptr.to(torch.int64)
    per_block = ptr[:, -1] - ptr[:, 0]
    height = (out_features - torch.arange(blocks) * block).clamp(max=block)
    consistent = (
        int(ptr[0, 0]) == 0 and int(ptr[-1, -1]) == nnz and bool((ptr.diff(dim=1) >= 0).all())
        and bool((ptr[1:, 0] == ptr[:-1, -1]).all())
    )
    if not consistent or not bool(
        ((row_indices.to(torch.int64) & 0xFFFF) < height.repeat_interleave(per_block)).all()
    ):
        raise ValueError(f"{name}: inconsistent column index (colptr must rise from 0 to "
                         f"{nnz} through every block, row_indices lie inside their block)")


def _check_index_arguments(name: str, out_features: object, block: object,
                           **tensors: object) -> None:
    """Raise unless ``out_features`` is an int ≥ 0, ``block`` one ≥ 1 and every one of
    ``tensors`` a tensor with values (not on the meta device): a float width, a block of 0
    or a meta index failed inside the checks with a raw error."""
    check_int("out_features", out_features, minimum=0)
    check_int("block", block, minimum=1)
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ArgumentTypeError(f"{name}: {key} must be a tensor, got "
                                    f"{type(tensor).__name__}")
        check_materialized(f"{name}: {key}", tensor)


@functools.cache
def _popcounts() -> torch.Tensor:
    """The number of set bits of every 16-bit word (int64, indexed by the word)."""
    words = torch.arange(1 << 16, dtype=torch.int64)
    return ((words[:, None] >> torch.arange(16)) & 1).sum(1)


def check_bitmap_index(bitmap: torch.Tensor | None, offsets: torch.Tensor | None,
                       values: torch.Tensor | None, out_features: int, block: int, *,
                       name: str = "layer") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``bitmap`` / ``offsets`` form valid
    bitmap columns (:func:`_bitmap_columns`) over ``values`` for ``out_features`` outputs
    in blocks of ``block``: an int16 bitmap (in, blocks, block / 16) with no bit past
    ``out_features``, and int32 offsets (in, blocks + 1) that start at 0, step by the
    number of bits of each (column, block), continue from column to column and end at the
    number of values. The kernels check only that the offsets rise from 0 to the number
    of values; a bitmap with more bits than its offsets' step read past the column's values,
    a bit past the outputs wrote past them."""
    if bitmap is None or offsets is None or values is None:
        raise ValueError(f"{name}: bitmap needs offsets and values beside it")
    _check_index_arguments(name, out_features, block, bitmap=bitmap, offsets=offsets,
                           values=values)
    if block % 16:
        raise ValueError(f"block must be a multiple of 16 (the bits of a bitmap word), got "
                         f"{block}")
    blocks, words = -(-out_features // block), block // 16
    nnz = values.numel()
    if (bitmap.dtype != torch.int16 or bitmap.dim() != 3
            or tuple(bitmap.shape[1:]) != (blocks, words) or offsets.dtype != torch.int32
            or tuple(offsets.shape) != (bitmap.shape[0], blocks + 1) or values.dim() != 1):
        raise ValueError(
            f"{name}: expected an int16 bitmap (in, {blocks}, {words}), int32 offsets "
            f"(in, {blocks + 1}) and 1-D values, got {bitmap.dtype} {tuple(bitmap.shape)}, "
            f"{offsets.dtype} {tuple(offsets.shape)} and {tuple(values.shape)}"
        )
    cols = bitmap.shape[0]
    if nnz >= 2**31 or (cols == 0 and nnz):
        raise ValueError(f"{name}: {nnz} values for {cols} bitmap columns")
    if cols == 0:
        return
    bits = bitmap.cpu().to(torch.int64) & 0xFFFF  # read back as uint16
    ptr = offsets.cpu().to(torch.int64)
    # the bits each word of the last block may hold: outputs 16 w + r < out_features
    height = out_features - (blocks - 1) * block if blocks else 0
    room = (height - 16 * torch.arange(words)).clamp(0, 16)
    allowed = (torch.ones(words, dtype=torch.int64) << room) - 1
    consistent = (
        int(ptr[0, 0]) == 0 and int(ptr[-1, -1]) == nnz
        and bool((ptr[1:, 0] == ptr[:-1, -1]).all())
        and bool((ptr.diff(dim=1) == _popcounts()[bits].sum(-1)).all())
        and (blocks == 0 or not bool((bits[:, -1] & ~allowed).any()))
    )
    if not consistent:
        raise ValueError(
            f"{name}: inconsistent bitmap columns (offsets must rise from 0 to {nnz}, by the "
            "number of bits of each column's block, column after column; no bit may mark an "
            f"output past out_features={out_features})"
        )


def _threshold_tensor(threshold: object, in_features: int) -> torch.Tensor:
    """``threshold`` (a real number, or a tensor or sequence of one or ``in_features``
    of them, each ≥ 0) as a float32 tensor, checked."""
    accepted = (f"a float ≥ 0, or a tensor of 1 or in_features={in_features} thresholds "
                "≥ 0")
    if threshold is None or isinstance(threshold, (bool, str, bytes)) or (
            isinstance(threshold, numbers.Number) and not isinstance(threshold, numbers.Real)):
        raise ArgumentTypeError(f"threshold must be {accepted}, got {threshold!r:.80}")
    try:
        t = torch.as_tensor(threshold).detach()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentTypeError(f"threshold must be {accepted}, got {threshold!r:.80} "
                                f"({err})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise ArgumentTypeError(f"threshold must be {accepted}, got a {t.dtype} one")
    t = t.to(torch.float32)
    if t.dim() > 1 or t.numel() not in (1, in_features):
        raise ValueError(
            f"threshold must be a scalar or have in_features={in_features} values, "
            f"got shape {tuple(t.shape)}"
        )
    check_threshold("threshold", t.reshape(-1))
    return t


def _check_bias(bias: object, out_features: int) -> None:
    """Raise unless ``bias`` is a floating-point tensor of shape ``(out_features,)``, not on
    the meta device (the layer kept it, and its first product failed in the op)."""
    accepted = f"None or a floating-point tensor of shape (out_features={out_features},)"
    if not isinstance(bias, torch.Tensor):
        raise ArgumentTypeError(f"bias must be {accepted}, got {type(bias).__name__}")
    check_materialized("bias", bias)
    if bias.shape != (out_features,):
        raise ValueError(f"bias must be None or of shape (out_features={out_features},), got "
                         f"{tuple(bias.shape)}")
    if not bias.is_floating_point():
        raise ArgumentTypeError(f"bias must be {accepted}, got dtype {bias.dtype} (it would "
                                "be cast to the layer's dtype)")


def _check_prefill(prefill: object, in_features: int, out_features: int) -> None:
    """Raise unless ``prefill`` is a module whose declared ``in_features`` /
    ``out_features`` (where it has them) are the layer's."""
    if not isinstance(prefill, nn.Module):
        raise ArgumentTypeError(f"prefill must be an nn.Module or None, got "
                                f"{type(prefill).__name__}")
    for attr, want in (("in_features", in_features), ("out_features", out_features)):
        got = getattr(prefill, attr, None)
        if isinstance(got, int) and got != want:
            raise ValueError(
                f"prefill must compute this layer's product ({in_features} -> {out_features} "
                f"features), got a {type(prefill).__name__} with {attr}={got}"
            )


def _check_storage(weight: torch.Tensor, scales: torch.Tensor | None,
                   dtype: torch.dtype | None) -> torch.dtype:
    """The input dtype of a layer storing ``weight`` (with int8 ``scales`` per row, or per
    row and group of inputs), validated."""
    if weight.dtype == torch.int8:
        rows, cols = weight.shape
        groups = scales.shape[1] if scales is not None and scales.dim() == 2 else 0
        if scales is None or not scales.is_floating_point() or not (
                scales.shape == (rows,) or (scales.dim() == 2 and scales.shape[0] == rows
                                            and 1 <= groups <= cols and cols % groups == 0)):
            raise ValueError(
                f"int8 weight needs float scales of shape ({rows},) or ({rows}, groups) with "
                f"groups dividing {cols}, got {None if scales is None else tuple(scales.shape)}"
            )
        check_materialized("scales", scales)  # a meta one failed inside the check below
        check_scale_values(scales)
        dtype = torch.float32 if dtype is None else dtype
    elif scales is not None:
        raise ValueError(f"scales are for int8 weights only, got a {weight.dtype} weight")
    elif not weight.is_floating_point() or is_float8(weight.dtype):  # no kernel
        raise TypeError(f"weight must be float16, bfloat16, float32, float64 or int8 codes, "
                        f"got {weight.dtype}")
    dtype = weight.dtype if dtype is None else dtype
    if (not dtype.is_floating_point or is_float8(dtype)
            or (weight.dtype != torch.int8 and dtype != weight.dtype)):
        raise ValueError(f"dtype must be the weight's {weight.dtype} (or a floating dtype for "
                         f"int8 weights), got {dtype}")
    return dtype
