"""What the rest of sparsekit needs to know about ``torch.distributed``, in one place.

Sparsity decisions must be the same on every rank. Three kinds of training job reach
sparsekit, and each needs one thing from here:

- a plain process group (``torchrun`` around :func:`sparsekit.llm.prune` or a data-driven
  :func:`sparsekit.prune`): which share of the calibration data this rank takes
  (:func:`rank_slice`) and sums over ranks (:func:`all_reduce_sum`);
- ``DistributedDataParallel``: a check that the ranks start from the same masks
  (:func:`check_same_on_ranks`) and, when a truly sparse layer changes its number of
  weights, a new gradient reducer (:func:`rebuild_reducer`);
- FSDP2 (``fully_shard``), whose parameters, gradients and optimizer state are ``DTensor``
  shards: masks are kept whole (the same on every rank, saved and loaded whole), applied
  to each rank's shard (:func:`local`, :func:`shard_like`), and decisions read whole
  tensors (:func:`full`, :func:`unsharded`).

Without a process group (or on plain tensors) every function but :func:`rebuild_reducer`
is a no-op or the identity, so callers need no ``if distributed`` branches of their own.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsekit._checks import ArgumentTypeError, check_int, check_mapping, check_materialized

MASKS_HINT = (
    "a wrapped model needs the same masks on every rank: compute them with the same seed and "
    "data on every rank (after DDP has given every rank rank 0's weights, when they are "
    "computed from the weights), or on rank 0 and torch.distributed.broadcast them"
)

__all__ = [
    "all_reduce_sum",
    "check_same_on_ranks",
    "full",
    "is_dtensor",
    "is_sharded",
    "local",
    "rank",
    "rank_slice",
    "rebuild_reducer",
    "shard_like",
    "unsharded",
    "world_size",
]


def world_size() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_slice(n: int, what: str, unit: str, count: str) -> slice:
    """The contiguous share of ``n`` items (the same on every rank) that this rank takes:
    all of them in one process.

    Every rank takes as many, so ``n`` must be a multiple of the number of ranks, else a
    ``ValueError`` names ``what`` (the argument holding the items), the ``unit`` and the
    nearest accepted values of ``count`` (what sets ``n``). A criterion sums its statistics
    over its share and then over the ranks (:func:`all_reduce_sum`): every rank ends with
    the statistics of all ``n`` items. ``n`` must be an int ≥ 0 (checked in one process
    too: a negative count gave ``slice(0, n)``, which drops items from the end).
    """
    check_int(f"{what}: the number of {unit}", n, minimum=0)
    n = int(n)
    ranks = world_size()
    if n % ranks:
        near = [k for k in (n - n % ranks, n - n % ranks + ranks) if k > 0]
        raise ValueError(
            f"{what}: {n} {unit} cannot be shared evenly by {ranks} ranks; accepted: a "
            f"multiple of {ranks} {unit} ({count}={' or '.join(map(str, near))})"
        )
    per = n // ranks
    return slice(rank() * per, (rank() + 1) * per)


@torch.no_grad()
def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Replace each tensor, in place, by its sum over all ranks (nothing in one process;
    the arguments must be tensors there too)."""
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


# -- FSDP2 shards -------------------------------------------------------------------------


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor``. ``torch.distributed.tensor`` is not imported for the
    question (its import takes about a second, a third of ``import sparsekit``): until
    something has imported it, no ``DTensor`` exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (the model went through
    ``fully_shard`` or tensor parallelism)."""
    _check_module(model)
    return any(is_dtensor(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` gathered from every rank (a collective: every rank
    must call it, in the same order), any other tensor as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (sharing its storage: writes reach the
    ``DTensor``), any other tensor as it is."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():  # the shard itself, not an autograd view of it
        return t.to_local()


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor ``t`` laid out like ``like``: a ``DTensor`` with its mesh and
    placements when ``like`` is one (each rank keeps its own part; no communication, so
    ``t`` must be the same on every rank), else ``t``. Both must be tensors (checked in one
    process too), ``t`` one with values: anything else failed deep inside
    ``distribute_tensor`` ("'int' object has no attribute 'shape'", "Cannot copy out of
    meta tensor")."""
    for name, value in (("t", t), ("like", like)):
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not is_dtensor(like):
        return t
    from torch.distributed.tensor import distribute_tensor  # imported already: like is one

    check_materialized("t", t)
    if t.shape != like.shape:
        raise ValueError(f"tensor of shape {tuple(t.shape)} cannot be laid out like a DTensor "
                         f"of shape {tuple(like.shape)}")
    return distribute_tensor(t.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter of an FSDP2 ``model`` is whole (``unshard()`` on each
    ``fully_shard``-ed module, ``reshard()`` after); anything else is left as it is. Read
    only: FSDP2 does not copy changes of the whole parameters back into the shards."""
    _check_module(model)
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


# -- agreement between ranks ----------------------------------------------------------------


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Three int64 numbers that differ between two tensors unless they are equal (almost
    surely): the size, the sum of the values and a sum weighted by position. Floating
    tensors are read by their bits — float64 by its own (as float32, values that differ
    beyond its precision agreed), complex ones as their real and imaginary parts (the cast
    to int64 dropped the imaginary one); sums wrap around the same way on every rank."""
    flat = t.detach().flatten()
    if flat.is_complex():
        flat = torch.view_as_real(flat).flatten()
    if flat.dtype == torch.float64:
        flat = flat.view(torch.int64)
    elif flat.is_floating_point():
        flat = flat.float().view(torch.int32)
    v = flat.to(torch.int64)
    weight = torch.arange(v.numel(), dtype=torch.int64, device=v.device) % 1_000_003 + 1
    return torch.stack([torch.tensor(v.numel(), device=v.device), v.sum(), (v * weight).sum()])


def check_same_on_ranks(tensors: Mapping[str, torch.Tensor], what: str = "masks",
                        hint: str = MASKS_HINT) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` (whole tensors, the same names
    on every rank) that is not the same on every rank; ``hint`` says what to do. Two small
    all-reduces; nothing in one process (the arguments are checked there too).

    Across ranks each tensor must hold values in the dense layout: a tensor on the meta
    device, a sparse, nested or quantized one failed deep inside PyTorch ("Cannot copy out
    of meta tensor", "reshape is not implemented for sparse tensors") instead of naming it.
    """
    check_mapping("tensors", tensors, torch.Tensor, "a torch.Tensor")
    if world_size() == 1 or not tensors:
        return
    for name, t in tensors.items():
        check_materialized(f"{what} {name!r}", t)
        kind = ("nested" if t.is_nested else "sparse" if t.layout != torch.strided
                else "quantized" if t.is_quantized else None)
        if kind is not None:
            raise ArgumentTypeError(f"{what} {name!r} must be a dense tensor to compare "
                                    f"between ranks, got a {kind} one ({t.layout}, {t.dtype})")
    prints = torch.stack([_fingerprint(t).cpu() for t in tensors.values()])
    low, high = prints.clone(), prints.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).any(1)
    if bool(differ.any()):
        names = [n for n, d in zip(tensors, differ.tolist(), strict=True) if d]
        raise ValueError(f"{what} differ between the {world_size()} ranks, first at "
                         f"{names[0]!r} ({len(names)} of {len(tensors)} differ); {hint}")


# -- DistributedDataParallel ----------------------------------------------------------------


def rebuild_reducer(ddp: DistributedDataParallel) -> None:
    """Give ``ddp`` a new gradient reducer for parameters that changed size.

    The reducer keeps each parameter's gradient accumulator alive, and an accumulator
    checks every gradient against the size the parameter had when it was made; a
    :class:`~sparsekit.SparseLinear` that gained or lost weights would fail its next
    backward. The old reducer is let go first (with it the stale accumulators), then one
    is built as ``DistributedDataParallel`` does when it is unpickled; comm hooks
    registered with ``register_comm_hook`` are registered again. Call it between steps,
    on every rank, after the same change.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise ArgumentTypeError(
            f"ddp must be a torch.nn.parallel.DistributedDataParallel (the wrapped model, "
            f"whose reducer is rebuilt), got {type(ddp).__name__}"
        )
    ddp.reducer = ddp.logger = None
    gc.collect()  # the accumulators must die before the new reducer asks for them
    params, expect_sparse = ddp._build_params_for_reducer()
    ddp._ddp_init_helper(params, expect_sparse, ddp._build_debug_param_to_name_mapping(params),
                         ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    for hook, state in ddp._comm_hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)
