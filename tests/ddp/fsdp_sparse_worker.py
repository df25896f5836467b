"""Run under torchrun --nproc_per_node=2: an FSDP2 model of SparseLinear layers.

Argument: output stem. Each rank writes ``<stem>.rank<r>.pt`` holding the whole weights of a
straight run, of the same run in one process on both ranks' batches (the reference), of a
run stopped halfway and resumed from state dicts into a newly built and sharded model, and
the errors of the structure changes FSDP2 cannot follow.
"""

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _leave import leave
from torch import nn
from torch.distributed.fsdp import fully_shard

from sparsekit import SparseLinear
from sparsekit.distributed import full
from sparsekit.prune import compute_masks

STEPS, STOP = 12, 5


def net() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    dense = nn.Sequential(nn.Linear(12, 31), nn.ReLU(), nn.Linear(31, 9), nn.ReLU(),
                          nn.Linear(9, 4))  # 31 and 9 rows: uneven shards
    masks, _ = compute_masks(dense, 0.7, method="random", seed=5)
    with torch.no_grad():
        for i in (0, 2, 4):
            dense[i].weight.mul_(masks[f"{i}.weight"])
            dense[i] = SparseLinear.from_linear(dense[i], masks[f"{i}.weight"])
    return dense


def sharded_net() -> nn.Module:
    model = net()
    for layer in model:
        if isinstance(layer, SparseLinear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)  # per-rank data
    x = torch.randn(16, 12, generator=g)
    return x, x[:, :4].argmax(1)


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int,
          ranks: list[int]) -> None:
    for t in range(start, stop):
        x, y = (torch.cat(parts) for parts in zip(*(batch(t, r) for r in ranks)))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    me = [dist.get_rank()]
    model = sharded_net()
    opt = optimizer(model)
    train(model, opt, 0, STEPS, me)
    results = {"sharded": whole(model),
               "masks": {n: m.mask for n, m in net().named_modules()
                         if isinstance(m, SparseLinear)}}
    results["dense"] = {n: m.to_dense() for n, m in model.named_modules()
                        if isinstance(m, SparseLinear)}

    reference = net()  # one process, both ranks' batches: FSDP2 averages the gradients
    ref_opt = optimizer(reference)
    train(reference, ref_opt, 0, STEPS, list(range(dist.get_world_size())))
    results["one_process"] = whole(reference)

    model = sharded_net()
    opt = optimizer(model)
    train(model, opt, 0, STOP, me)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    del model, opt
    model = sharded_net()  # a new process would rebuild everything from scratch
    opt = optimizer(model)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, STOP, STEPS, me)
    results["resumed"] = whole(model)

    layer = model[0]
    try:
        layer.set_structure(torch.ones(31, 12, dtype=torch.bool))
        results["set_structure"] = "no error"
    except ValueError as err:
        results["set_structure"] = str(err)
    other = net()
    other[0].set_structure(torch.ones(31, 12, dtype=torch.bool))
    try:
        model.load_state_dict(other.state_dict(), strict=False)
        results["load_other"] = "no error"
    except (ValueError, RuntimeError) as err:
        results["load_other"] = str(err)
    torch.save(results, f"{out}.rank{dist.get_rank()}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
