"""Run under torchrun --nproc_per_node=2: MaskSet and DynamicSparsity on an FSDP2 model.

Arguments: output stem, then the DST methods to run. Each rank writes ``<stem>.rank<r>.pt``
holding, for a MaskSet run and for each method: the whole masks after every update, the
whole weights at the end, and the same for a run stopped halfway and resumed from state
dicts into a newly built and sharded model. Each rank trains on different data.
"""

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _leave import leave
from torch import nn
from torch.distributed.fsdp import fully_shard

import sparsekit
from sparsekit import DynamicSparsity, GradualPruner, MaskSet
from sparsekit.distributed import full, local, shard_like
from sparsekit.prune import compute_masks

STEPS, EVERY, END = 40, 5, 35


def sharded_net() -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    net = nn.Sequential(nn.Linear(12, 31), nn.ReLU(), nn.Linear(31, 9), nn.ReLU(),
                        nn.Linear(9, 4))  # 31 and 9 rows: uneven shards
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    return net


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # per-rank data
    x = torch.randn(16, 12, generator=g)
    return x, x[:, :4].argmax(1)


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def train(model, opt, dst, start: int, stop: int, history: list) -> None:
    for t in range(start, stop):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if dst is not None and dst.step():
            history.append({n: m.clone() for n, m in dst.masks.masks.items()})
        masks = dst.masks if dst is not None else None
        for n, p in (masks.params.items() if masks is not None else ()):
            # the mask holds on this rank's shard after every step, state included
            shard = local(p.detach())
            part = local(shard_like(masks.masks[n], p))
            assert part.shape == shard.shape, (n, part.shape, shard.shape)
            assert not shard[~part].any(), n
            for v in opt.state[p].values():
                if v.shape == p.shape:
                    assert not local(v)[~part].any(), n


def dst_run(method: str, stop_at: int | None) -> dict:
    model = sharded_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = DynamicSparsity(model, opt, 0.8, method=method, every=EVERY, end_step=END, seed=3)
    history: list = []
    if stop_at is None:
        train(model, opt, dst, 0, STEPS, history)
        return {"history": history, "weights": whole(model), "masks": dst.masks.masks}
    train(model, opt, dst, 0, stop_at, history)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "dst": dst.state_dict()})
    del model, opt, dst
    model = sharded_net()  # a new process would rebuild everything from scratch
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dst = DynamicSparsity(model, opt, 0.8, method=method, every=EVERY, end_step=END, seed=3)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    dst.load_state_dict(saved["dst"])
    train(model, opt, dst, stop_at, STEPS, history)
    return {"history": history, "weights": whole(model), "masks": dst.masks.masks}


def mask_set_run() -> dict:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 31), nn.ReLU(), nn.Linear(31, 9), nn.ReLU(),
                          nn.Linear(9, 4))
    masks, _ = compute_masks(dense, 0.7, method="random", seed=5)
    model = sharded_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ms = MaskSet(model, masks).attach(opt)

    class Holder:  # what train() reads of a schedule
        def __init__(self):
            self.masks = ms

        def step(self):
            return False

    train(model, opt, Holder(), 0, 10, [])
    return {"weights": whole(model), "masks": masks}


def gradual_run() -> dict:
    """GradualPruner and then sparsekit.prune on a sharded model: both failed inside the
    ranks' agreement check (masks built from sharded weights are sharded DTensors)."""
    model = sharded_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, 0.8, start_step=0, end_step=10, every=5, optimizer=opt)
    train(model, opt, pruner, 0, 12, [])
    once = sparsekit.prune(sharded_net(), 0.5)
    return {"weights": whole(model), "masks": pruner.masks.masks,
            "prune": {"weights": whole(once.model), "masks": once.masks}}


def main(out: str, methods: list[str]) -> None:
    dist.init_process_group("gloo")
    results = {"maskset": mask_set_run(), "gradual": gradual_run()}
    for method in methods:
        results[method] = dst_run(method, None)
        results[method + "/resumed"] = dst_run(method, 17)
    torch.save(results, f"{out}.rank{dist.get_rank()}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
