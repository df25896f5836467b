"""Sparse training benchmark: accuracy of every schedule at the same epoch budget.

Fashion-MNIST (digits fallback), LeNet-300-100 and LeNet-5, sparsity 90/95/98 %:
dense, static random (ERK), one-shot magnitude + fine-tune, gradual magnitude
(Zhu & Gupta), SET, RigL, SNFS, GraNet and SRigL; mean ± std over seeds, training time
relative to dense measured in the same run. Checks the published trends
(RigL ≥ SET ≥ static at ≥ 95 %, gradual ≥ one-shot) and exits 1 when one does not
reproduce (``--no-check`` to only report). Writes benchmarks/results/sparse_training.*
(``--suffix TEXT``: sparse_training_TEXT.*, so that a run of a subset or on another machine
does not overwrite the committed one; ``--out`` picks the folder).

    python benchmarks/sparse_training.py            # full run, ~20 min on 2 cores
    python benchmarks/sparse_training.py --quick    # CI smoke, < 1 min
    python benchmarks/sparse_training.py --models lenet5 --suffix lenet5   # ..._lenet5.*
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import conclude, stem, suffix_arg, verdict
from torch.utils.data import TensorDataset

import sparsekit
from sparsekit.data import load_image_dataset
from sparsekit.models import lenet5, lenet_300_100
from sparsekit.training import accuracy, train_epoch

RESULTS = Path(__file__).parent / "results"
DST = ("set", "rigl", "snfs", "granet", "srigl")
METHODS = ("dense", "static", "one-shot", "gradual", *DST)


def run(method: str, factory: Callable, train: TensorDataset, test: TensorDataset,
        sparsity: float, epochs: int, seed: int, batch: int = 128) -> tuple[float, float]:
    """Train one model with ``method``; return (test accuracy, seconds)."""
    torch.manual_seed(seed)
    model = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * -(-len(train) // batch)
    end = int(0.75 * steps)
    schedule = None
    start = time.perf_counter()
    if method == "static":
        masks = sparsekit.prune(model, sparsity, method="random", allocation="erk", seed=seed)
        masks.attach(opt)
    elif method == "gradual":
        schedule = sparsekit.GradualPruner(model, sparsity, start_step=steps // epochs,
                                           end_step=end, every=50, allocation="global",
                                           optimizer=opt)
    elif method in DST:
        schedule = sparsekit.DynamicSparsity(model, opt, sparsity, method=method,
                                             every=max(1, end // 15), end_step=end,
                                             seed=seed)
    on_step = schedule.step if schedule is not None else None
    for epoch in range(epochs):
        if method == "one-shot" and epoch == epochs // 2:
            sparsekit.prune(model, sparsity, allocation="global").attach(opt)
        train_epoch(model, train, opt, batch_size=batch, seed=seed * 1000 + epoch,
                    on_step=on_step)
    seconds = time.perf_counter() - start
    return accuracy(model, test), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run for CI")
    parser.add_argument("--no-check", action="store_true", help="report trends, never fail")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--suffix", type=suffix_arg, default="", metavar="TEXT",
                        help="appended to the results' file names: sparse_training_TEXT.* "
                        "(e.g. lenet5 with --models lenet5)")
    parser.add_argument("--models", default="lenet_300_100,lenet5",
                        help="comma-separated subset of lenet_300_100,lenet5")
    args = parser.parse_args(argv)

    data = load_image_dataset()
    if args.quick:
        config = {"models": {"lenet_300_100": (lenet_300_100, 5000, 2)},
                  "sparsities": (0.95,), "seeds": (0,)}
    else:
        config = {"models": {"lenet_300_100": (lenet_300_100, None, 6),
                             "lenet5": (lenet5, None, 4)},
                  "sparsities": (0.9, 0.95, 0.98), "seeds": (0, 1)}
        wanted = args.models.split(",")
        unknown = set(wanted) - set(config["models"])
        if unknown:
            parser.error(f"--models: unknown {sorted(unknown)}; accepted: lenet_300_100, lenet5")
        config["models"] = {k: v for k, v in config["models"].items() if k in wanted}
    rows = []
    for name, (factory, limit, epochs) in config["models"].items():
        train = TensorDataset(*(t[:limit] for t in data.train.tensors))
        dense = [run("dense", factory, train, data.test, 0.0, epochs, s)
                 for s in config["seeds"]]
        dense_time = statistics.mean(t for _, t in dense)
        rows.append(_row(name, "dense", 0.0, dense, dense_time))
        for sparsity in config["sparsities"]:
            for method in METHODS[1:]:
                results = [run(method, factory, train, data.test, sparsity, epochs, s)
                           for s in config["seeds"]]
                rows.append(_row(name, method, sparsity, results, dense_time))
                print(_line(rows[-1]), flush=True)
    checks = _checks(rows)
    meta = {"dataset": data.name, "sparsities": config["sparsities"], "seeds": config["seeds"],
            "epochs": {k: v[2] for k, v in config["models"].items()},
            "threads": torch.get_num_threads()}
    name = stem("sparse_training", args.suffix)
    _plot(args.out / f"{name}.png", rows)
    return conclude([(f"{c['claim']} ({c['detail']})", c["ok"]) for c in checks], {
        args.out / f"{name}.json": {"config": meta, "rows": rows, "checks": checks},
        args.out / f"{name}.md": _markdown(meta, rows, checks)}, no_check=args.no_check)


def _row(model: str, method: str, sparsity: float, results, dense_time: float) -> dict:
    accs = [a for a, _ in results]
    return {"model": model, "method": method, "sparsity": sparsity,
            "acc_mean": statistics.mean(accs),
            "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "time_vs_dense": statistics.mean(t for _, t in results) / dense_time}


def _line(r: dict) -> str:
    return (f"{r['model']:>14} {r['method']:>9} {r['sparsity']:>5.0%}  "
            f"acc {r['acc_mean']:.4f} ± {r['acc_std']:.4f}  time {r['time_vs_dense']:.2f}× dense")


def _checks(rows: list[dict]) -> list[dict]:
    acc = {(r["model"], r["method"], r["sparsity"]): r["acc_mean"] for r in rows}
    checks = []
    for (model, method, s), a in acc.items():
        if method != "rigl" or s < 0.95:
            continue
        rigl, set_, static = a, acc[(model, "set", s)], acc[(model, "static", s)]
        checks.append({"claim": f"{model} {s:.0%}: RigL ≥ SET ≥ static",
                       "ok": rigl >= set_ >= static,
                       "detail": f"{rigl:.4f} / {set_:.4f} / {static:.4f}"})
    for (model, method, s), a in acc.items():
        if method == "gradual":
            one = acc[(model, "one-shot", s)]
            checks.append({"claim": f"{model} {s:.0%}: gradual ≥ one-shot", "ok": a >= one,
                           "detail": f"{a:.4f} / {one:.4f}"})
    return checks


def _markdown(meta: dict, rows: list[dict], checks: list[dict]) -> str:
    lines = [f"Dataset {meta['dataset']}; epochs {meta['epochs']}; seeds {list(meta['seeds'])}; "
             f"{meta['threads']} threads. Accuracy mean ± std; time relative to dense.", "",
             "| model | method | sparsity | accuracy | time vs dense |",
             "| :--- | :--- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['method']} | {r['sparsity']:.0%} | "
              f"{r['acc_mean']:.2%} ± {r['acc_std']:.2%} | {r['time_vs_dense']:.2f}× |"
              for r in rows]
    lines += ["", "| trend | result | values |", "| :--- | :--- | :--- |"]
    lines += [f"| {c['claim']} | {verdict(c['ok'])} | {c['detail']} |" for c in checks]
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in METHODS[1:]:
            pts = [r for r in rows if r["model"] == model and r["method"] == method]
            ax.errorbar([r["sparsity"] for r in pts], [r["acc_mean"] for r in pts],
                        yerr=[r["acc_std"] for r in pts], marker="o", label=method, capsize=3)
        ax.set_title(model)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
