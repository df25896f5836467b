"""Run under torchrun --nproc_per_node=2: ``sparsekit.prune`` with data-driven criteria.

Arguments: output stem, then runs ``criterion@batches`` (``perturbed``: Wanda with a
different model on rank 1), all in one launch. Every rank passes the same batches and takes
its share; each rank writes ``<stem>.rank<r>.pt`` holding, per run, the masks and the scores
(or the error raised). ``pruned`` is also what the test calls in one process.
"""

import sys

import torch
import torch.distributed as dist
from _leave import leave
from torch import nn

import sparsekit
from sparsekit.prune import compute_masks
from sparsekit.scores import CRITERIA, ScoreContext
from sparsekit.targets import resolve_targets


def net(perturb: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    if perturb and dist.is_initialized() and dist.get_rank() == 1:
        with torch.no_grad():
            model[2].weight[0, 0] += 1e-3
    return model


def calibration(batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(batches):
        x = torch.randn(8, 12, generator=g)
        out.append((x, x[:, :4].argmax(1)))
    return out


def pruned(method: str, batches: int, perturb: bool = False) -> dict:
    model = net(perturb)
    data = calibration(batches)
    ctx = ScoreContext(model, resolve_targets(model, None, ()), data, None,
                       torch.Generator().manual_seed(0))
    scores = CRITERIA.get(method)(ctx)
    masks, _ = compute_masks(model, 0.6, method=method, data=data)
    applied = sparsekit.prune(model, 0.6, method=method, data=data)
    assert all(torch.equal(applied.masks[n], m) for n, m in masks.items())
    return {"masks": masks, "scores": scores}


def main(out: str, runs: list[str]) -> None:
    dist.init_process_group("gloo")
    results = {}
    for run in runs:
        method, batches = run.split("@")
        perturb = method == "perturbed"
        try:
            results[run] = pruned("wanda" if perturb else method, int(batches), perturb)
        except ValueError as err:
            results[run] = {"error": str(err)}
    torch.save(results, f"{out}.rank{dist.get_rank()}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
