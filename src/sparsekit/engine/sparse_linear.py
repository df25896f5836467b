"""SparseLinear: an ``nn.Linear`` that trains with sparse forward and backward products.

The weight is a dense 1-D ``nn.Parameter`` of its nonzero values (row-major order), so any
optimizer — Adam and AdamW included — updates only the kept weights and keeps state only
for them. The structure is two int32 index vectors plus its transpose: a row pointer into
the values for ``y = x Wᵀ`` and a column-major permutation of the same values for
``dx = dy W``. ``dW`` is computed only at the nonzeros (a sampled dense-dense product), so a
step costs time proportional to the number of nonzeros, not to ``in × out``.

The products run in the compiled ``spmm_train`` kernels on CPU (float32/float64), or in
chunked PyTorch ops (``index_add_`` and gathers) anywhere else.

Under FSDP2 (``fully_shard``) ``values`` and ``bias`` are sharded like any parameters
(``values`` along its one dimension, so each rank holds a run of the row-major nonzeros) and
the index buffers are replicated; a step is gathered, computed and reduce-scattered as for
``nn.Linear``. The structure is then fixed: the shards were laid out for it, so
:meth:`SparseLinear.set_structure` and loading a state with another structure refuse.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_device,
    check_int,
    check_materialized,
    check_optimizer,
    is_float8,
)
from sparsekit.distributed import full, is_dtensor
from sparsekit.engine import kernels
from sparsekit.engine._moved import moved
from sparsekit.engine.compiled_linear import dense_linear
from sparsekit.masks import check_mask, elementwise_state, optimizer_state

__all__ = ["SparseLinear"]

# CompiledLayer/CompiledLinear lived here before SparseLinear did.
__getattr__ = moved(
    __name__,
    {n: "sparsekit.engine.compiled_linear" for n in ("CompiledLayer", "CompiledLinear")},
)

_CHUNK_ELEMENTS = 1 << 22  # fallback gathers materialise at most this many elements at once
_STRUCTURE_KEYS = ("rowptr", "col")

# ``values`` parameters resized without their optimizer (a load of another structure, or
# set_structure without ``optimizer``) -> their number of nonzeros before. An optimizer
# whose per-weight state for one of them still has another size is stopped, with a message
# saying what to do, before its step fails inside torch with a bare size mismatch.
_resized: weakref.WeakKeyDictionary[torch.Tensor, int] = weakref.WeakKeyDictionary()
_stale_state_hook: object | None = None


def _refuse_stale_state(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """Global optimizer step pre-hook: raise ``ValueError`` if ``optimizer`` holds
    per-weight state of the old size for a ``values`` parameter that was resized without it."""
    if not _resized:
        return
    for p, old in list(_resized.items()):
        state = optimizer.state.get(p)
        if not state:
            continue
        stale = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor)
                       and v.dim() == 1 and v.shape != p.shape)
        if stale:
            raise ValueError(
                f"optimizer: its state {stale} for a SparseLinear's values has "
                f"{state[stale[0]].numel()} entries, but the layer now stores {p.numel()} "
                f"weights (it had {old}): loading a state with another structure, or "
                "set_structure without optimizer=, resized them. Load the optimizer state "
                "saved with that structure (optimizer.load_state_dict), pass the optimizer "
                "to set_structure, or drop the old state (optimizer.state.pop(layer.values)) "
                "before the next step"
            )


def _mark_resized(values: torch.Tensor, old: int) -> None:
    """Remember that ``values`` was resized from ``old`` nonzeros without its optimizer."""
    global _stale_state_hook
    if values.numel() == old:
        return
    _resized[values] = old
    if _stale_state_hook is None:
        _stale_state_hook = register_optimizer_step_pre_hook(
            _refuse_stale_state
        )


class _Structure:
    """Index tensors of one sparsity pattern, row-major and column-major.

    ``retired`` is set once a layer replaces it (:meth:`SparseLinear._install`): a backward
    through a forward that used it would put the gradients on the new structure's weights.
    """

    retired = False  # a class default: layers pickled before it existed still load

    def __init__(self, row: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> None:
        out_features, in_features = self.shape = shape
        row, col = row.long(), col.long()  # row-major: the order of the values
        self.row = row.to(torch.int32)
        self.col = col.to(torch.int32)
        self.rowptr = _rowptr(torch.bincount(row, minlength=out_features))
        t_perm = torch.argsort(col * out_features + row)  # column-major order of the values
        self.t_perm = t_perm
        self.t_col = self.row[t_perm].contiguous()  # columns of Wᵀ are rows of W
        self.t_rowptr = _rowptr(torch.bincount(col, minlength=in_features))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> _Structure:
        row, col = mask.nonzero(as_tuple=True)
        return cls(row, col, tuple(mask.shape))

    def to(self, device: torch.device) -> _Structure:
        """Move every index tensor to ``device`` in place; returns ``self``."""
        for name, t in vars(self).items():
            if isinstance(t, torch.Tensor):
                setattr(self, name, t.to(device))
        return self


def _rowptr(counts: torch.Tensor) -> torch.Tensor:
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr


def _use_kernels(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and (
        kernels.available()
    )


def _spmm(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    perm: torch.Tensor | None,
    xt: torch.Tensor,
    bias: torch.Tensor | None,
    cols: int,
) -> torch.Tensor:
    """``yᵀ = W xᵀ (+ bias)`` for ``W`` (``cols`` columns, the rows of ``xt``) in CSR whose
    values are ``values[perm]``."""
    if _use_kernels(xt):
        return torch.ops.sparsekit.spmm_rows(
            rowptr, col, values, perm, xt, bias, cols, torch.get_num_threads()
        )
    rows, batch = rowptr.numel() - 1, xt.shape[1]
    v = values if perm is None else values[perm]
    row = torch.repeat_interleave(
        torch.arange(rows, device=xt.device), (rowptr[1:] - rowptr[:-1]).long()
    )
    yt = xt.new_zeros(rows, batch) if bias is None else bias[:, None].expand(rows, batch).clone()
    step = max(1, _CHUNK_ELEMENTS // max(1, batch))
    for start in range(0, v.numel(), step):
        sl = slice(start, start + step)
        yt.index_add_(0, row[sl], v[sl, None] * xt[col[sl].long()])
    return yt


def _sddmm(s: _Structure, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[k] = <a[row[k]], b[col[k]]>``: the product ``a bᵀ`` sampled at the nonzeros."""
    row, col = s.row, s.col
    if _use_kernels(a):
        return torch.ops.sparsekit.sddmm(s.rowptr, col, a, b, s.shape[1], torch.get_num_threads())
    out = a.new_empty(row.numel())
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[1]))
    for start in range(0, row.numel(), step):
        sl = slice(start, start + step)
        out[sl] = (a[row[sl].long()] * b[col[sl].long()]).sum(1)
    return out


class _SparseLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + bias`` with ``W`` given by its nonzero ``values`` and a ``_Structure``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
        s: _Structure,
        sink: SparseLinear | None,
    ) -> torch.Tensor:
        xt = x.t().contiguous()  # free when x is the transposed output of another SparseLinear
        yt = _spmm(s.rowptr, s.col, values, None, xt, bias, s.shape[1])
        ctx.save_for_backward(xt, values)
        ctx.structure = s
        ctx.has_bias = bias is not None
        ctx.sink = sink
        # (out, batch): the caller takes the (batch, out) view outside this function, so
        # that in-place ops on it (ReLU(inplace=True)) are allowed; made in here, autograd
        # refused them ("a view … created inside a custom Function")
        return yt

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled() and not grad.requires_grad:
            # backward(create_graph=True) of a constant incoming gradient (out.sum()): the
            # gradients came back as constants, without the error once_differentiable gives
            # a second backward, so an input-gradient penalty's share was silently dropped
            raise RuntimeError(
                "SparseLinear is differentiable once: its kernels have no derivative of their "
                "own, so a gradient computed with create_graph=True (to differentiate it "
                "again) is not supported; accepted: create_graph=False, or nn.Linear with "
                "its masks (sparsekit.engine.decompile or MaskSet) for higher-order terms")
        return _backward(ctx, grad)


@once_differentiable  # the kernels have no derivative: a second one came back as zeros
def _backward(ctx: torch.autograd.function.FunctionCtx,
              grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """:class:`_SparseLinearFunction`'s gradients (``grad``: of the ``(out, batch)``
    result)."""
    s: _Structure = ctx.structure
    if s.retired:  # before saved_tensors, whose version check fails with a raw error
        raise ValueError(
            "SparseLinear: its structure was changed (set_structure, or loading a state "
            "with another structure) between this forward and its backward, whose "
            "gradients would land on the new structure's weights. Accepted: backward (and "
            "the optimizer step) before changing the structure, or a new forward after it"
        )
    xt, values = ctx.saved_tensors
    gt = grad.contiguous()  # (out, batch), as the result
    dx = dv = db = None
    if ctx.needs_input_grad[0]:
        dx = _spmm(s.t_rowptr, s.t_col, values, s.t_perm, gt, None, s.shape[0]).t()
    if ctx.needs_input_grad[1]:
        dv = _sddmm(s, gt, xt)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = gt.sum(1)
    if ctx.sink is not None:
        ctx.sink._accumulate_dense_grad(gt @ xt.t())
    return dx, dv, db, None, None


def _check_linear_tensors(linear: nn.Linear) -> None:
    """Raise ``ValueError`` (:class:`ArgumentTypeError` for a dtype) naming ``linear``'s
    weight or bias unless the weight is a floating-point ``(out_features, in_features)``
    tensor and the bias (if any) a floating-point ``(out_features,)`` one with values:
    :meth:`SparseLinear.from_linear` copies them, and a replaced bias of another shape
    failed in that copy (a raw ``RuntimeError``, or ``NotImplementedError`` on the meta
    device), an integer one was cast, and the error of an integer weight named a ``dtype``
    the caller never passed."""
    shape = (linear.out_features, linear.in_features)
    for name, t, want in (("weight", linear.weight, shape),
                          ("bias", linear.bias, shape[:1])):
        if t is None:
            continue
        accepted = (f"a floating-point tensor of 16 bits or more and shape {want} "
                    f"(in_features={shape[1]}, out_features={shape[0]})")
        if not t.is_floating_point() or is_float8(t.dtype):  # float8: a raw error below
            raise ArgumentTypeError(f"linear's {name} must be {accepted}, got dtype {t.dtype}")
        if tuple(t.shape) != want:
            raise ValueError(f"linear's {name} must be {accepted}, got shape {tuple(t.shape)}")
        check_materialized(f"linear's {name}", t)


class SparseLinear(nn.Module):
    """``y = x Wᵀ + bias`` where only the nonzeros of ``W`` are stored, computed and trained.

    ``values`` is a 1-D ``nn.Parameter`` holding the kept weights in row-major order, so any
    ``torch.optim`` optimizer trains the layer directly. Build one with :meth:`from_linear`
    (or from a ``mask``), change its pattern between steps with :meth:`set_structure`, and
    get a dense layer back with :meth:`to_linear`. Inputs have shape ``(..., in_features)``.
    The output of a 2-D input is a transposed (non-contiguous) view: the next
    ``SparseLinear`` then reads it without a copy. With ``capture_dense_grad`` set, backward
    also accumulates the dense ``dL/dW = dyᵀ x`` (what RigL-style regrowth scores) into
    ``dense_grad``: a dense product, so :class:`~sparsekit.DynamicSparsity` sets it only
    for the steps that need it. The structure is saved in ``state_dict()`` as int32 buffers
    ``rowptr`` and ``col``; loading installs the saved structure (and its number of
    nonzeros), resizing ``values`` in place, once the whole incoming state is checked
    (a refused load changes nothing). An optimizer holding ``values`` still holds it then,
    but its per-weight state (momenta, Adam moments) is of the old size: load the optimizer
    state saved with that structure (``optimizer.load_state_dict``) or drop the old one
    (``optimizer.state.pop(layer.values)``) before its next step, which otherwise raises a
    ``ValueError`` saying so (as after :meth:`set_structure` without ``optimizer``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mask: torch.Tensor,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_int("in_features", in_features, minimum=0)
        check_int("out_features", out_features, minimum=0)
        check_bool("bias", bias)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentTypeError(
                f"dtype must be a floating-point torch.dtype or None, got {dtype!r}"
            )
        device = check_device(device)
        if device is not None and device.type == "meta":
            raise ValueError(
                "device must be a device with data ('cpu', 'cuda', ...), got 'meta': a "
                "SparseLinear's structure is read from its mask's values"
            )
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        mask = self.check_mask(mask).to(device)
        self._install(_Structure.from_mask(mask))
        # Same initialisation as nn.Linear, restricted to the kept weights.
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        nnz = self._structure.row.numel()
        self.values = nn.Parameter(
            torch.empty(nnz, device=device, dtype=dtype).uniform_(-bound, bound)
        )
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self.bias: nn.Parameter | None
        if bias:
            b = torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound)
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> SparseLinear:
        """The sparse layer keeping ``linear``'s weights where ``mask`` is True.

        ``mask`` defaults to the nonzero weights of ``linear`` (e.g. after ``MaskSet.apply``).
        """
        if not isinstance(linear, nn.Linear):
            raise ArgumentTypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.device.type == "meta":
            raise ValueError(
                "linear's weight is on the meta device (not materialized: it holds no values "
                "to keep); accepted: an nn.Linear with data, e.g. after "
                "linear.to_empty(device=...) and its initialization or a loaded state"
            )
        _check_linear_tensors(linear)
        mask = weight != 0 if mask is None else mask
        layer = cls(
            linear.in_features,
            linear.out_features,
            mask,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            s = layer._structure
            layer.values.copy_(weight[s.row.long(), s.col.long()])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same (dense, zero-filled) weight and bias."""
        return dense_linear(self.to_dense(), self.bias)

    # -- structure ----------------------------------------------------------------------

    @property
    def nnz(self) -> int:
        """Number of stored (trainable) weights."""
        return self.values.numel()

    @property
    def mask(self) -> torch.Tensor:
        """The boolean ``(out_features, in_features)`` pattern; True where a weight is kept."""
        s = self._structure
        m = torch.zeros(
            self.out_features, self.in_features, dtype=torch.bool, device=self.values.device
        )
        m[s.row.long(), s.col.long()] = True
        return m

    def to_dense(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, zeros where pruned (under FSDP2
        gathered from every rank: a collective that every rank must call)."""
        s = self._structure
        v = full(self.values.detach())
        w = v.new_zeros(self.out_features, self.in_features)
        w[s.row.long(), s.col.long()] = v
        return w

    @torch.no_grad()
    @torch.inference_mode(False)  # as _load_from_state_dict: the layer must stay trainable
    def set_structure(
        self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Change the pattern to ``mask`` in place (a prune/regrow step).

        Weights kept by both patterns keep their values; new ones start at zero. The same
        ``values`` parameter object is resized, so an optimizer holding it keeps working;
        pass that ``optimizer`` to carry its per-weight state (momenta, Adam moments) over
        the same way — surviving entries keep theirs, new ones start at zero. Without it,
        per-weight state whose shape no longer matches must be reset by the caller (an
        optimizer step with such state raises a ``ValueError`` saying so). Refused under
        FSDP2 (see the module docstring).
        """
        self._check_unsharded("set_structure")
        mask = self.check_mask(mask).to(self.values.device)
        optimizer = check_optimizer(optimizer, optional=True)
        old, new = self._structure, _Structure.from_mask(mask)
        old_key = old.row.long() * self.in_features + old.col.long()
        new_key = new.row.long() * self.in_features + new.col.long()
        pos = torch.searchsorted(old_key, new_key).clamp_(max=max(old_key.numel() - 1, 0))
        kept = (
            old_key[pos] == new_key if old_key.numel() else torch.zeros_like(new_key, dtype=bool)
        )
        src, dst = pos[kept], kept.nonzero(as_tuple=True)[0]

        def remap(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(new_key.numel())
            out[dst] = t[src]
            return out

        p, nnz = self.values, self.values.numel()
        if optimizer is not None:
            for k, v in elementwise_state(optimizer, p).items():  # values are 1-D
                optimizer_state(optimizer)[p][k] = remap(v)
        p.data = remap(p.data)
        p.grad = None
        self._install(new)
        if optimizer is None:
            _mark_resized(p, nnz)

    def _install(self, s: _Structure) -> None:
        """Make ``s`` the structure; ``rowptr`` and ``col`` are its persistent buffers. The
        structure it replaces is retired: a pending backward through it refuses."""
        old = self.__dict__.get("_structure")
        if old is not None and old is not s:
            old.retired = True
        self._structure = s
        self.register_buffer("rowptr", s.rowptr)
        self.register_buffer("col", s.col)

    # -- persistence --------------------------------------------------------------------

    def structure_from_state(self, state: dict[str, torch.Tensor], prefix: str = "") -> _Structure:
        """The index structure stored under ``prefix`` in ``state``, checked for this shape.

        Raises ``ValueError`` naming the layer and the entry if ``rowptr``/``col`` are
        missing or do not describe a valid row-major pattern of ``(out_features,
        in_features)`` (int32 row pointers rising from 0 to ``len(col)``, int32 columns
        increasing within each row, in ``[0, in_features)``), or if ``values``, when
        present, is not one value per stored weight; :class:`ArgumentTypeError` if one of
        them is no tensor.
        """
        where = f"SparseLinear {prefix.rstrip('.') or '(root)'}"
        if not isinstance(state, Mapping):
            raise ArgumentTypeError(f"state must be a dict of tensors (a state_dict), got "
                                    f"{type(state).__name__}")
        missing = [f"{prefix}{k}" for k in _STRUCTURE_KEYS if f"{prefix}{k}" not in state]
        if missing:
            raise ValueError(f"{where}: state has no {missing} (the structure: int32 rowptr "
                             f"of shape ({self.out_features + 1},) and int32 col); it holds "
                             f"{sorted(state)[:8]}")
        rowptr, col = state[f"{prefix}rowptr"], state[f"{prefix}col"]
        for name, t in (("rowptr", rowptr), ("col", col)):
            if not isinstance(t, torch.Tensor):
                raise ArgumentTypeError(f"{where}: {name} must be an int32 tensor, got "
                                        f"{type(t).__name__}")
            if t.device.type == "meta":
                raise ValueError(f"{where}: {name} is on the meta device and holds no indices")
        if rowptr.dtype != torch.int32 or tuple(rowptr.shape) != (self.out_features + 1,):
            raise ValueError(
                f"{where}: rowptr must be int32 of shape ({self.out_features + 1},), got "
                f"{rowptr.dtype} {tuple(rowptr.shape)}"
            )
        if col.dtype != torch.int32 or col.dim() != 1:
            raise ValueError(f"{where}: col must be a 1-D int32 tensor, got {col.dtype} "
                             f"{tuple(col.shape)}")
        nnz = col.numel()
        ptr = rowptr.cpu().long()  # int32 differences could wrap around
        counts = ptr[1:] - ptr[:-1]
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((counts < 0).any()):
            raise ValueError(f"{where}: rowptr must rise from 0 to len(col)={nnz}, got "
                             f"{ptr[0].item()} .. {ptr[-1].item()}"
                             f"{' with a fall' if bool((counts < 0).any()) else ''}")
        row = torch.repeat_interleave(torch.arange(self.out_features), counts)
        key = row * self.in_features + col.cpu().long()
        if nnz and (int(col.min()) < 0 or int(col.max()) >= self.in_features
                    or bool((key[1:] <= key[:-1]).any())):
            raise ValueError(
                f"{where}: col must hold increasing column indices in [0, {self.in_features}) "
                f"within each row, got values in [{int(col.min())}, {int(col.max())}]"
            )
        values = state.get(f"{prefix}values")
        if values is not None and not isinstance(values, torch.Tensor):
            raise ArgumentTypeError(f"{where}: values must be a tensor, got "
                                    f"{type(values).__name__}")
        if values is not None and tuple(values.shape) != (nnz,):
            raise ValueError(f"{where}: values has shape {tuple(values.shape)}, the structure "
                             f"has {nnz} nonzeros")
        return _Structure(row, col.cpu(), (self.out_features, self.in_features))

    def expected_state(
        self, state: dict[str, torch.Tensor], prefix: str = ""
    ) -> dict[str, torch.Tensor] | None:
        """This layer's ``state_dict`` entries (under ``prefix``) as they will be after
        loading ``state``: its structure and number of nonzeros are those in ``state``.

        ``None`` unless ``state`` holds all of ``values``, ``rowptr`` and ``col`` (the caller
        reports the missing keys); ``ValueError`` naming the layer if they form no valid
        structure (see :meth:`structure_from_state`). Used by :func:`sparsekit.load` to check
        a file before loading it.
        """
        keys = [f"{prefix}{k}" for k in ("values", "rowptr", "col")]
        if not all(k in state for k in keys):
            return None
        self.structure_from_state(state, prefix)
        return self.state_dict(prefix=prefix) | {k: state[k] for k in keys}

    def load_errors(
        self, state: Mapping[str, object], prefix: str = ""
    ) -> tuple[list[str], _Structure | None]:
        """Why the entries of ``state`` under ``prefix`` cannot be loaded into this layer
        (empty: they can), missing entries aside, and the structure they install (``None``:
        the layer keeps its own).

        The structure is ``rowptr``/``col`` from ``state`` (either one missing is this
        layer's own), checked whole (:meth:`structure_from_state`); ``values`` must be one
        floating-point value per stored weight of it and ``bias`` (when the layer has one)
        a floating-point tensor of shape ``(out_features,)``, neither on the meta device.
        """
        errors: list[str] = []
        where = f"SparseLinear {prefix.rstrip('.') or '(root)'}"
        s = None
        nnz = self.values.numel()
        if any(f"{prefix}{k}" in state for k in _STRUCTURE_KEYS):
            merged = {f"{prefix}{k}": state.get(f"{prefix}{k}", self._buffers[k])
                      for k in _STRUCTURE_KEYS}
            try:
                s = self.structure_from_state(merged, prefix)
                if not self._same_structure(s):
                    self._check_unsharded("loading a state with another structure")
                    nnz = s.row.numel()
                else:
                    s = None
            except ValueError as err:  # ArgumentTypeError included
                errors.append(str(err))
                return errors, None
        for name, shape in (("values", (nnz,)), ("bias", (self.out_features,))):
            t = state.get(f"{prefix}{name}")
            if t is None or getattr(self, name) is None:
                continue  # missing, or unexpected: torch reports those
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                errors.append(f"{where}: {name} must be a floating-point tensor, got {got}")
            elif t.is_meta:  # torch's copy fails only after the new structure is installed
                errors.append(f"{where}: {name} is on the meta device and holds no values; "
                              "accepted: a tensor on a real device (cpu, cuda)")
            elif tuple(t.shape) != shape:
                errors.append(f"{where}: {name} must have shape {shape}"
                              f"{' (one per stored weight)' if name == 'values' else ''}, got "
                              f"{tuple(t.shape)}")
        return errors, s

    # Not under a caller's inference_mode: a structure and values made there were inference
    # tensors, and the layer could not be trained after (a raw "Inference tensors cannot be
    # saved for backward"), where an nn.Linear loaded the same way could.
    @torch.inference_mode(False)
    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        # torch copies the entries one by one, and rowptr/col are the structure the products
        # index with: the whole incoming state is checked first, and nothing is copied (nor
        # the structure installed) unless all of it passes.
        errors, s = self.load_errors(state_dict, prefix)
        if errors:
            own = [*self._parameters, *(k for k in self._buffers
                                        if k not in self._non_persistent_buffers_set)]
            missing_keys.extend(prefix + k for k in own
                                if getattr(self, k) is not None and prefix + k not in state_dict)
            error_msgs.extend(errors)
            return
        if any(f"{prefix}{k}" in state_dict for k in _STRUCTURE_KEYS):
            self.values.grad = None
        if s is not None:  # another structure: install it, resizing ``values`` in place
            nnz = self.values.numel()
            self.values.data = self.values.data.new_zeros(s.row.numel())
            self._install(s.to(self.values.device))
            _mark_resized(self.values, nnz)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # assign=True made the buffers the state's own tensors, beside the structure built
        # from copies of them: a non-contiguous col, or one its owner changes later, reached
        # the products after the next .to(). The buffers are the structure's again.
        self._install(self._structure)

    def _same_structure(self, s: _Structure) -> bool:
        own = self._structure
        return torch.equal(own.rowptr.cpu(), s.rowptr.cpu()) and torch.equal(own.col.cpu(),
                                                                               s.col.cpu())

    def _check_unsharded(self, what: str) -> None:
        """Raise ``ValueError`` if ``values`` is an FSDP2 shard (a ``DTensor``): changing
        the number of nonzeros would invalidate the layout of every rank's shard."""
        if is_dtensor(self.values):
            raise ValueError(
                f"SparseLinear: {what} changes the number of stored weights, which FSDP2 "
                "cannot follow (fully_shard laid out the values' shards for the structure "
                "they had); change structures before fully_shard, or train with dynamic "
                "sparsity on nn.Linear layers and a MaskSet (DynamicSparsity works under "
                "FSDP2), or wrap SparseLinear models in DistributedDataParallel"
            )

    def check_mask(self, mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
        """``mask`` (named ``name`` in errors), detached, once checked to be a bool
        ``(out_features, in_features)`` tensor with values (not on the meta device): what
        :meth:`set_structure` and :class:`~sparsekit.engine.structure_set.StructureSet`
        install."""
        check_mask(name, mask, (self.out_features, self.in_features))
        if mask.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device and holds no values; accepted: a bool mask on "
                "a device with data (it is moved to the layer's device)"
            )
        return mask.detach()

    # -- compute ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (isinstance(x, torch.Tensor) and x.is_floating_point()
                and x.dtype != self.values.dtype and torch.is_autocast_enabled(x.device.type)):
            # under autocast the kernels run in the weight's dtype (they take one dtype), as
            # autocast runs its float32 ops: a bf16 input was refused, naming a dtype the
            # caller never chose
            x = x.to(self.values.dtype)
        self._check_input(x)
        sink = self if self.capture_dense_grad else None
        if x.dim() == 2:
            return _SparseLinearFunction.apply(x, self.values, self.bias, self._structure,
                                               sink).t()
        yt = _SparseLinearFunction.apply(
            x.reshape(-1, self.in_features), self.values, self.bias, self._structure, sink
        )
        return yt.t().reshape(*x.shape[:-1], self.out_features)

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise unless ``x`` is ``(..., in_features)`` of the weight's dtype and device, and
        the weights hold values (not moved to the meta device)."""
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        values = self.values
        # moved there by .to("meta"): the products failed inside PyTorch
        check_materialized("SparseLinear.values", values)
        if x.dtype != values.dtype:
            raise ArgumentTypeError(
                f"x must have the weight's dtype {values.dtype}, got {x.dtype}"
            )
        if x.device != values.device:
            raise ValueError(f"x must be on the weight's device {values.device}, got {x.device}")
        bias = self.bias
        if isinstance(bias, torch.Tensor) and bias.dtype != values.dtype:  # assigned after
            # the layer was built: a raw "bias must be Float, got Double" of the kernel
            raise ArgumentTypeError(f"bias must have the weight's dtype {values.dtype}, got "
                                    f"{bias.dtype}; cast it (layer.bias.data = "
                                    f"layer.bias.data.to({values.dtype}))")

    def _accumulate_dense_grad(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad if self.dense_grad is None else self.dense_grad + grad

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Move the index tensors along with the parameters (``.to``, ``.cuda``, ...).

        The buffers ``fn`` made hold the structure's indices: ``to_empty()`` left them
        uninitialized, and the products (which trust ``col``) read those garbage indices."""
        super()._apply(fn, recurse)
        unmoved = self._structure.rowptr  # the buffer before fn: kept as it is by a no-op
        s = self._structure.to(self.values.device)
        if not self.rowptr.is_meta and self.rowptr is not unmoved:  # new buffers: fill them
            self.rowptr.copy_(s.rowptr)
            self.col.copy_(s.col)
        s.rowptr, s.col = self.rowptr, self.col  # the buffers, moved by super()._apply
        return self

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        density = self.nnz / total if total else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nnz={self.nnz}, density={density:.4f}"
        )

