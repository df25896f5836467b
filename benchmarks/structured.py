"""Structured pruning benchmark: a ResNet-18-style CNN cut to 50 % and 30 % of its MACs by
``pattern="channel"`` + ``shrink``, against the dense model.

Reports parameters, MACs and measured batch-1 / batch-64 latency (28×28 single-channel
inputs, the Fashion-MNIST shape), and checks that the shrunk model computes what the
masked one does and that its latency falls by at least 80 % of its MAC reduction. When
``torch_pruning`` (Torch-Pruning 1.6.1, not a sparsekit dependency) is installed, the same
network pruned to the same channel ratio by its magnitude pruner is timed side by side;
otherwise a note says it was skipped. No training: accuracy comparisons need Fashion-MNIST
and a fine-tuning budget (not part of this run). Writes benchmarks/results/structured.{json,md}.

    python benchmarks/structured.py            # ~2 min on 2 cores
    python benchmarks/structured.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import time_ms  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.models import BasicBlock  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MAC_CUTS = (0.5, 0.7)  # the MAC budgets: half and 70 % of the dense model's MACs removed


class ResNet18(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks, widths w·(1, 2, 4, 8)) for 28×28 inputs."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stages.append(nn.Sequential(BasicBlock(cin, cout, 1 if i == 0 else 2),
                                        BasicBlock(cout, cout)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def torch_pruning_model(model: nn.Module, ratio: float, x: torch.Tensor) -> nn.Module | None:
    """The same network pruned by Torch-Pruning's magnitude pruner, or ``None`` when the
    package is not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MagnitudePruner(
        pruned, x[:1], importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[pruned.fc])
    pruner.step()
    return pruned


def measure(models: dict[str, nn.Module], x1: torch.Tensor, x64: torch.Tensor, budget: float
            ) -> list[dict[str, object]]:
    rows = []
    dense = sparsekit.report(models["dense"], x1)
    with torch.inference_mode():
        t1 = time_ms({k: (lambda m=m: m(x1)) for k, m in models.items()}, budget)
        t64 = time_ms({k: (lambda m=m: m(x64)) for k, m in models.items()}, budget)
    for name, model in models.items():
        rel = sparsekit.report(model, x1).relative_to(dense)
        rows.append({
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "macs": sparsekit.report(model, x1).totals["dense_flops"] // 2,
            "macs_vs_dense": rel["dense_flops"],
            "batch1_ms": t1[name], "batch64_ms": t64[name],
            "batch1_speedup": t1["dense"] / t1[name], "batch64_speedup": t64["dense"] / t64[name],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small width, short timing")
    parser.add_argument("--no-check", action="store_true", help="report only, never exit 1")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    width, budget = (16, 0.3) if args.quick else (64, 3.0)
    x1, x64 = torch.randn(1, 1, 28, 28), torch.randn(64, 1, 28, 28)
    dense = ResNet18(width)
    dense.train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(3):
            dense(torch.randn(32, 1, 28, 28))
    dense.eval()

    models, checks = {"dense": dense}, []
    for budget_cut in MAC_CUTS:
        # both sides of most convolutions shrink: MACs ≈ (1 - channel fraction)²
        amount = 1 - (1 - budget_cut) ** 0.5
        masked = copy.deepcopy(dense)
        masks = sparsekit.prune(masked, amount, pattern="channel")
        small = sparsekit.shrink(masked, masks)
        with torch.no_grad():
            diff = float((small(x64) - masked(x64)).abs().max())
        label = f"-{budget_cut:.0%} MACs ({amount:.0%} of channels)"
        checks.append({"claim": f"{label}: shrunk == masked (max |Δ| ≤ 1e-4)",
                       "ok": diff <= 1e-4, "value": diff})
        models[f"sparsekit {label}"] = small
        tp_model = torch_pruning_model(dense, amount, x1)
        if tp_model is not None:
            models[f"torch-pruning {label}"] = tp_model.eval()
    if not any(k.startswith("torch-pruning") for k in models):
        print("note: torch_pruning is not installed; Torch-Pruning side by side skipped "
              "(pip install torch-pruning==1.6.1 to include it)")

    rows = measure(models, x1, x64, budget)
    for r in rows:
        if r["model"].startswith("sparsekit"):
            mac_cut = 1 - r["macs_vs_dense"]
            time_cut = 1 - 1 / r["batch64_speedup"]
            checks.append({"claim": f"{r['model']}: batch-64 latency cut ≥ 80 % of MAC cut",
                           "ok": time_cut >= 0.8 * mac_cut,
                           "value": round(time_cut / mac_cut, 3) if mac_cut else None})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps(
        {"width": width, "rows": rows, "checks": checks}, indent=2))
    lines = ["| model | params | MACs | MACs vs dense | batch-1 ms | batch-64 ms | "
             "batch-1 speed-up | batch-64 speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params']:,} | {r['macs']:,} | {r['macs_vs_dense']:.3f} | "
              f"{r['batch1_ms']:.3f} | {r['batch64_ms']:.2f} | {r['batch1_speedup']:.2f}× | "
              f"{r['batch64_speedup']:.2f}× |" for r in rows]
    lines += ["", *[f"- {'✓' if c['ok'] else '✗'} {c['claim']} ({c['value']})" for c in checks]]
    (args.out / "structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [c["claim"] for c in checks if not c["ok"]]
    return 1 if failed and not args.no_check else 0


if __name__ == "__main__":
    sys.exit(main())
