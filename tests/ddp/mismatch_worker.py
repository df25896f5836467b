"""Run under torchrun --nproc_per_node=2: wrapped models given different masks on each rank,
and one clipped step of a masked model under DDP and FSDP2.

Each mismatch case must raise ``ValueError`` on every rank; rank r writes the messages (or
"no error"), and the clipped steps' gradient norms and weights, to ``<stem>.rank<r>.pt``.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _leave import leave
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsekit import DynamicSparsity, MaskSet, SparseLinear
from sparsekit.prune import compute_masks


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))


def outcome(build) -> str:
    try:
        build()
    except ValueError as err:
        return str(err)
    return "no error"


def clipped_step(wrap, masks: dict[str, torch.Tensor], rank: int) -> dict:
    """One SGD step of ``net()`` masked by ``masks``, wrapped by ``wrap``, on this rank's
    half of 16 rows, its gradients clipped to norm 0.01: the norm clipping measured and the
    weights after the step (whole, gathered from FSDP2's shards)."""
    model = net()
    masked = MaskSet(model, masks)
    wrapped = wrap(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    masked.attach(opt)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    y = x[:, :4].argmax(1)
    F.cross_entropy(wrapped(x[8 * rank:8 * rank + 8]), y[8 * rank:8 * rank + 8]).backward()
    norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.01)
    opt.step()
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return {"norm": float(norm),
            "weights": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                        for n, p in model.named_parameters()}}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine, _ = compute_masks(net(), 0.7, method="random", seed=rank)  # differs per rank
    same, _ = compute_masks(net(), 0.7, method="random", seed=0)

    def fsdp() -> nn.Module:
        model = net()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)

    def sparse_ddp() -> nn.Module:  # same number of weights on each rank, other positions
        g = torch.Generator().manual_seed(rank)
        mask = torch.zeros(10 * 12, dtype=torch.bool)
        mask[torch.randperm(120, generator=g)[:30]] = True
        return DDP(nn.Sequential(SparseLinear(12, 10, mask.view(10, 12)), nn.ReLU(),
                                 nn.Linear(10, 4)))

    def prune_then_wrap() -> None:  # masks from each rank's own weights, then DDP
        masks = MaskSet(net(), mine)
        model = DDP(masks.model)
        masks.attach(torch.optim.SGD(model.parameters(), lr=0.1))

    def load_differs() -> None:  # each rank loads its own state
        masks = MaskSet(DDP(net()), {f"module.{n}": m for n, m in same.items()})
        masks.load_state_dict({"masks": {f"module.{n}": m for n, m in mine.items()}})

    results = {
        "prune_then_wrap": outcome(prune_then_wrap),
        "load_differs": outcome(load_differs),
        "clip_ddp": clipped_step(DDP, same, rank),
        "clip_fsdp": clipped_step(lambda m: (fully_shard(m[0]), fully_shard(m[2]),
                                             fully_shard(m))[-1], same, rank),
        "ddp": outcome(lambda: MaskSet(DDP(net()), {f"module.{n}": m for n, m in mine.items()})),
        "fsdp": outcome(lambda: MaskSet(fsdp(), mine)),
        "fsdp_same": outcome(lambda: MaskSet(fsdp(), same)),
        "sparse_ddp": outcome(lambda: DynamicSparsity(
            (m := sparse_ddp()), torch.optim.SGD(m.parameters(), lr=0.1), 0.8,
            method="snfs", end_step=10)),
    }
    torch.save(results, f"{out}.rank{rank}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
