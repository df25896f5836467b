"""``sparsekit demo``: the main job — accuracy versus sparsity for three pruning methods.

Trains LeNet-300-100 on Fashion-MNIST (scikit-learn digits when absent), prunes the
trained network one-shot at several sparsities with global magnitude (class-blinded),
uniform magnitude (class-uniform) and random pruning, fine-tunes each with its masks
attached to the optimizer, and reports accuracy, nonzeros, checkpoint size and the speed
of the model ``sparsekit.compile`` makes of it with that model's own accuracy. The speed is
the median, over interleaved repeats, of the dense network's time over the compiled one's
(64 rows), with the range of those repeats; the table's caption says how noisy the
machine was, so a difference smaller than that noise is read as none.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import save_file

import sparsekit
from sparsekit._checks import MAX_EPOCHS, MAX_SEED, check_seed, check_sparsity
from sparsekit.cli._output import check_output, console, write_directory
from sparsekit.data import load_image_dataset
from sparsekit.data.images import check_image_root
from sparsekit.engine import autotune
from sparsekit.models import lenet_300_100
from sparsekit.training import accuracy, train_epoch

METHODS = {  # label -> (criterion, allocation)
    "global magnitude": ("magnitude", "global"),
    "uniform magnitude": ("magnitude", "uniform"),
    "random": ("random", "uniform"),
}
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


@dataclass
class Row:
    method: str
    sparsity: float
    acc_before: float
    acc_after: float
    nonzeros: int
    size_ratio: float
    acc_compiled: float  # the compiled model's: equal up to argmax ties at 1e-5
    speedup: float  # compiled model vs the dense network, 64 rows: median over repeats
    speedup_range: tuple[float, float]  # the lowest and highest repeat

FALLBACK = ("FALLBACK: Fashion-MNIST was not found, these are scikit-learn's 8x8 digits; "
            "install it with `apt-get install dataset-fashion-mnist` or set SPARSEKIT_DATA_DIR")

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="accuracy vs sparsity on LeNet-300-100 (the main job)")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--data-dir", help="directory of Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per run")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)),
                   help="comma-separated sparsities")
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    sparsities = _parse_sparsities(args.sparsities)
    # before any work: a bad seed failed only after the dense training, with dense.safetensors
    # written into --out (one past 2**63: "Overflow when unpacking long long", unnamed)
    check_seed("--seed", args.seed)
    # each flag by itself, with its value; at most a recipe's epochs (99999999999999 ran
    # until killed)
    if not 1 <= args.epochs <= MAX_EPOCHS:
        raise ValueError(f"--epochs must be in [1, {MAX_EPOCHS}] (dense training epochs), got "
                         f"{args.epochs}")
    if not 0 <= args.finetune_epochs <= MAX_EPOCHS:
        raise ValueError(f"--finetune-epochs must be in [0, {MAX_EPOCHS}], got "
                         f"{args.finetune_epochs}")
    if args.train_limit is not None and args.train_limit < 1:  # 0 meant all, -5 all but 5
        raise ValueError(f"--train-limit must be ≥ 1 (images to train on), got "
                         f"{args.train_limit}")
    if args.data_dir is not None:  # "root 'x' lacks the IDX files …" named no flag
        check_image_root(args.data_dir, "--data-dir")
    out = check_output(args.out, inputs=[args.data_dir], directory=True)  # not into the data
    terminal = console(130)
    torch.manual_seed(args.seed)
    data = load_image_dataset(args.data_dir)
    train = data.train
    if args.train_limit is not None:
        train = torch.utils.data.TensorDataset(*(t[: args.train_limit] for t in train.tensors))
    terminal.print(f"[bold]dataset[/]: {data.name}, {len(train):,} train / "
                  f"{len(data.test):,} test images; {torch.get_num_threads()} threads")
    if data.name == "digits":
        terminal.print(f"[bold red]{FALLBACK}[/]")
    # built in a temporary directory and put in place whole: a run failing (or interrupted)
    # midway left dense.safetensors and some checkpoints in --out, beside the results.json
    # of an earlier run that no longer described them
    dense_acc, rows = write_directory(
        out, lambda tmp: _runs(tmp, data, train, sparsities, args, terminal),
        last=("results.json",))
    terminal.print(_table(dense_acc, rows, data.name))
    terminal.print(_noise(rows))
    terminal.print(f"wrote {out / 'results.json'}, results.md and accuracy_vs_sparsity.png")
    return 0


def _runs(out: Path, data, train, sparsities: list[float], args: argparse.Namespace,
          console: Console) -> tuple[float, list[Row]]:
    """Train the dense network, prune and fine-tune every run, and write everything into
    the new directory ``out``; return the dense accuracy and the rows."""
    dense = lenet_300_100(in_features=data.image_shape[-1] * data.image_shape[-2],
                          num_classes=data.num_classes)
    runs = len(METHODS) * len(sparsities)
    with _progress(console) as progress:
        task = progress.add_task("dense training", total=args.epochs)
        opt = torch.optim.Adam(dense.parameters(), lr=1e-3)
        for epoch in range(args.epochs):
            train_epoch(dense, train, opt, seed=(args.seed + epoch) & MAX_SEED)
            progress.advance(task)
        dense_acc = accuracy(dense, data.test)
        dense_size = _dense_size(dense)
        sparsekit.save(dense, out / "dense.safetensors")

        rows = []
        task = progress.add_task("prune + fine-tune", total=runs)
        for label, (criterion, allocation) in METHODS.items():
            for s in sparsities:
                rows.append(_one_run(dense, data, train, label, criterion, allocation, s,
                                     args, out, dense_size))
                progress.advance(task)
    _write(out, dense_acc, rows, data.name)
    return dense_acc, rows


def _one_run(dense, data, train, label, criterion, allocation, s, args, out, dense_size) -> Row:
    model = copy.deepcopy(dense)
    masks = sparsekit.prune(model, s, method=criterion, allocation=allocation, seed=args.seed)
    before = accuracy(model, data.test)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    masks.attach(opt)
    for epoch in range(args.finetune_epochs):
        train_epoch(model, train, opt, seed=1000 + epoch)
    path = out / f"{criterion}-{allocation}-{s:g}.safetensors"
    sparsekit.save(model, path, masks)
    nonzeros = sum(int(m.sum()) for m in masks.masks.values())
    after = accuracy(model, data.test)
    batch = data.test.tensors[0][:64]
    fast = sparsekit.compile(model.eval(), batch, rows=len(batch))
    speedup, low, high = _speedup(dense.eval(), fast, batch)
    return Row(label, s, before, after, nonzeros, path.stat().st_size / dense_size,
               accuracy(fast, data.test), speedup, (low, high))


def _speedup(dense: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor
             ) -> tuple[float, float, float]:
    """Dense time over compiled time per call, timed in interleaved rounds as ``compile``
    times layers: the median over the rounds, the lowest and the highest."""
    with torch.inference_mode():
        (times,) = autotune.measure({"dense": dense, "compiled": fast}, tuple(x.shape[1:]),
                                    [len(x)], x.dtype, x.device).values()
    ratios = [d / c for d, c in zip(times["dense"], times["compiled"], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def _noise(rows: list[Row]) -> str:
    """How far apart the repeats of one speed measurement were, at most, and what that says."""
    worst = max((high / low for low, high in (r.speedup_range for r in rows) if low > 0),
                default=1.0)
    verdict = ("a quiet machine" if worst <= 1.15 else "a noisy machine" if worst <= 1.5
               else "a very noisy machine: read the speeds with caution")
    return (f"compiled speed: median of interleaved repeats (their range in brackets); the "
            f"repeats of one measurement differed by up to {worst:.2f}×, {verdict}")


def _dense_size(model) -> int:
    """Size of the plain dense safetensors file of ``model`` (the baseline for sizes)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dense.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return os.path.getsize(path)


def _parse_sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers, got {text!r}") from None
    for i, v in enumerate(values):
        check_sparsity(v, f"--sparsities entry {i + 1}")
        # each run writes METHOD-ALLOCATION-SPARSITY.safetensors: a repeated sparsity
        # (0.5,0.50) trained it again, replaced its checkpoint and listed it twice
        # (named to 6 significant digits: 0.1234561 and 0.1234564 are one name, not equal)
        if (j := next((j for j, w in enumerate(values[:i]) if f"{w:g}" == f"{v:g}"),
                      None)) is not None:
            same = (f"repeats {v:g} (entry {j + 1})" if values[j] == v
                    else f"names the same checkpoint ({v:g}) as entry {j + 1}")
            raise ValueError(f"--sparsities entry {i + 1} {same}; give "
                             "sparsities that differ within 6 significant digits, got "
                             f"{text!r}")
    return values


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def _title(dataset: str) -> str:
    """The dataset as the table headers name it; the digits fallback says so loudly."""
    return f"{dataset} ({FALLBACK})" if dataset == "digits" else dataset


def _table(dense_acc: float, rows: list[Row], dataset: str) -> Table:
    table = Table(title=f"LeNet-300-100 on {_title(dataset)}: dense accuracy {dense_acc:.2%}")
    for col in ("method", "sparsity", "acc. one-shot", "acc. fine-tuned", "nonzeros",
                "ckpt size vs dense", "compiled speed"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r.method, f"{r.sparsity:.0%}", f"{r.acc_before:.2%}", f"{r.acc_after:.2%}",
                      f"{r.nonzeros:,}", f"{r.size_ratio:.3f}×", _speed(r))
    return table


def _markdown(dense_acc: float, rows: list[Row], dataset: str) -> str:
    lines = [
        f"LeNet-300-100 on {_title(dataset)}, dense test accuracy {dense_acc:.2%}.",
        "",
        "| method | sparsity | acc. one-shot | acc. fine-tuned | nonzeros | ckpt size vs dense "
        "| compiled speed (64 rows) |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.method} | {r.sparsity:.0%} | {r.acc_before:.2%} | {r.acc_after:.2%} | "
        f"{r.nonzeros:,} | {r.size_ratio:.3f}× | {_speed(r)} |"
        for r in rows
    ]
    return "\n".join([*lines, "", _noise(rows) + "."]) + "\n"


def _speed(row: Row) -> str:
    low, high = row.speedup_range
    return f"{row.speedup:.2f}× ({low:.2f}–{high:.2f})"


def _write(out: Path, dense_acc: float, rows: list[Row], dataset: str) -> None:
    result = {"dataset": dataset, "model": "lenet_300_100", "dense_accuracy": dense_acc,
              "runs": [asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(_markdown(dense_acc, rows, dataset))
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install 'sparsekit[plot]'): "
              "accuracy_vs_sparsity.png not written", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = [r for r in rows if r.method == method]
        ax.plot([r.sparsity for r in pts], [r.acc_after for r in pts], marker="o", label=method)
    ax.axhline(dense_acc, color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy after fine-tuning")
    ax.set_title(f"LeNet-300-100 on {dataset}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_sparsity.png", dpi=120)
    plt.close(fig)
