"""Run under torchrun --nproc_per_node=2: DynamicSparsity under DDP, masks written per rank.

Arguments: the output stem, then one or more runs, each a method (dense layers) or
``method:sparse`` (SparseLinear layers). One launch serves every run (start-up dominates);
each rank writes ``{run: {"history": [...], "weights": {...}}}``.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _leave import leave
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsekit import DynamicSparsity, SparseLinear


def _net(sparse: bool) -> nn.Module:
    if not sparse:
        return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    return nn.Sequential(SparseLinear(12, 32, torch.rand(32, 12, generator=g) < 0.2), nn.ReLU(),
                         SparseLinear(32, 4, torch.rand(4, 32, generator=g) < 0.2))


def run(method: str, sparse: bool, rank: int) -> dict:
    torch.manual_seed(0)  # identical initial weights on every rank
    model = DDP(_net(sparse))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dst = DynamicSparsity(model, opt, 0.8, method=method, every=10, end_step=180,
                          seed=7)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    history = []
    for _ in range(200):
        x = torch.randn(16, 12, generator=gen)
        y = (x[:, :4]).argmax(1)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if dst.step():
            history.append({n: m.clone() for n, m in dst.masks.masks.items()})
    return {"history": history, "weights": model.state_dict()}


def main(out: str, runs: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in runs:
        method, _, layers = name.partition(":")
        results[name] = run(method, layers == "sparse", rank)
    torch.save(results, f"{out}.rank{rank}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
