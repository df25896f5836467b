"""Run under torchrun --nproc_per_node=2: wrapped models given different masks on each rank.

Each case must raise ``ValueError`` on every rank; rank r writes the messages (or "no
error") to ``<stem>.rank<r>.pt``.
"""

import sys

import torch
import torch.distributed as dist
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

    results = {
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
