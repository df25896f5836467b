"""Training step of a sparse MLP: dense, masked dense and SparseLinear, side by side.

MLP 784-1024-1024-10, batch 128, ``Adam(fused=True)`` (the fastest CPU Adam for the dense
peers: foreach Adam takes ``sqrt`` of the masked model's zero moments, which AVX-512 CPUs
compute ~8x slower), cross-entropy. For each sparsity this times one
training step (forward + backward + ``optimizer.step()``) of

* ``dense``:  plain ``nn.Linear`` layers (no sparsity at all),
* ``masked``: ``nn.Linear`` + a ``sparsekit.MaskSet`` attached to the optimizer — what a
  user trains with today,
* ``sparse``: ``sparsekit.SparseLinear`` layers with the same masks,

round-robin in the same run, best of N. Then, with RigL (``sparsekit.DynamicSparsity``,
an update every ``--update-every`` steps) on the masked dense model and on the SparseLinear
model started from the same masks, it times whole update periods, so each step's time
includes its share of the update (dense-gradient capture, drop/grow, ``set_structure``).
Writes ``results/sparse_linear_training.json`` and ``.md`` and exits non-zero listing the
missed targets (``sparse`` vs ``masked`` speedup, both tables) unless ``--no-check``.

    python benchmarks/sparse_linear_training.py            # 90%, 95%, 99%
    python benchmarks/sparse_linear_training.py --quick    # fewer repetitions (CI)
    python benchmarks/sparse_linear_training.py --threads 1  # steadier on a loaded machine
    python benchmarks/sparse_linear_training.py --threads 1 --isa avx2  # the AVX2 kernels
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine
from _report import conclude
from _timing import time_ms
from torch import nn

from sparsekit import DynamicSparsity, MaskSet
from sparsekit.engine import kernels
from sparsekit.engine.sparse_linear import SparseLinear

RESULTS = Path(__file__).parent / "results"
SIZES = (784, 1024, 1024, 10)
BATCH = 128
SPARSITIES = (0.9, 0.95, 0.99)
TARGETS = {0.9: 1.5, 0.99: 8.0}  # required speedup of sparse over masked dense
DST_SPARSITIES = (0.9, 0.99)


def mlp(layers: list[nn.Module]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, layer in enumerate(layers):
        mods.append(layer)
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _data(seed: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (BATCH,), generator=g)
    torch.manual_seed(seed)
    return g, x, y


def build(sparsity: float, seed: int = 0) -> dict[str, Callable[[], None]]:
    """The three training steps for one sparsity, on the same data and masks."""
    g, x, y = _data(seed)
    linears = [nn.Linear(i, o) for i, o in zip(SIZES[:-1], SIZES[1:])]
    masks = [torch.rand(lin.weight.shape, generator=g) >= sparsity for lin in linears]

    dense = mlp([_copy(lin) for lin in linears])
    masked = mlp([_copy(lin) for lin in linears])
    names = [n for n, p in masked.named_parameters() if n.endswith("weight")]
    mask_set = MaskSet(masked, dict(zip(names, masks)))
    sparse = mlp([SparseLinear.from_linear(lin, m) for lin, m in zip(linears, masks)])

    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for k, m in
            (("dense", dense), ("masked", masked), ("sparse", sparse))}
    mask_set.attach(opts["masked"])
    return {
        "dense": make_step(dense, opts["dense"], x, y),
        "masked": make_step(masked, opts["masked"], x, y),
        "sparse": make_step(sparse, opts["sparse"], x, y),
    }


def build_rigl(sparsity: float, update_every: int, seed: int = 0) -> dict[str, Callable[[], None]]:
    """One RigL update period (``update_every`` steps, the last one updating), masked vs sparse.

    The SparseLinear model starts from the masked model's initial RigL masks and weights.
    ``end_step`` is far away, so every period drops and regrows about 30% of each layer.
    """
    _, x, y = _data(seed)
    masked = mlp([nn.Linear(i, o) for i, o in zip(SIZES[:-1], SIZES[1:])])
    periods = {}

    def rigl(model: nn.Module) -> tuple[Callable[[], None], DynamicSparsity]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        ds = DynamicSparsity(model, opt, sparsity, method="rigl", every=update_every,
                             end_step=10**9, seed=seed)
        step = make_step(model, opt, x, y)

        def period() -> None:
            for _ in range(update_every):
                step()
                ds.step()

        return period, ds

    periods["masked"], ds = rigl(masked)
    sparse = mlp([SparseLinear.from_linear(m, ds.masks.masks[f"{i}.weight"])
                  for i, m in enumerate(masked) if isinstance(m, nn.Linear)])
    periods["sparse"], _ = rigl(sparse)
    return periods


def _copy(lin: nn.Linear) -> nn.Linear:
    new = nn.Linear(lin.in_features, lin.out_features)
    new.load_state_dict(lin.state_dict())
    return new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 30 s)")
    ap.add_argument("--no-check", action="store_true", help="report only, never fail")
    ap.add_argument(
        "--threads", type=int, default=0,
        help="torch/OpenMP threads (default: torch's); 1 is steadier on a loaded machine",
    )
    ap.add_argument("--update-every", type=int, default=0,
                    help="RigL update period in steps (default 100, 10 with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and MD")
    ap.add_argument("--isa", default=None,
                    help="run SparseLinear's kernels on this instruction set (one of "
                         "kernels.isas(), e.g. avx2; default: the best this CPU runs)")
    args = ap.parse_args(argv)

    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.update_every < 0:
        ap.error(f"--update-every must be >= 1 (0: the default), got {args.update_every}")
    if args.isa is not None and args.isa not in kernels.isas():
        ap.error(f"--isa must be one of {', '.join(kernels.isas()) or 'none (no kernels)'}, "
                 f"got {args.isa!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with kernels.use_isa(args.isa) if args.isa else contextlib.nullcontext():
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    """The tables of ``main``'s arguments on the active instruction set; writes the results,
    returns the exit status."""
    budget_s, rounds = (1.0, 2) if args.quick else (6.0, 4)
    update_every = args.update_every or (10 if args.quick else 100)
    load_before = os.getloadavg()
    rows = []
    for sp in SPARSITIES:
        ms = time_ms(build(sp), budget_s, min_rounds=rounds)
        rows.append({
            "sparsity": sp,
            **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
            "sparse_vs_masked": ms["masked"] / ms["sparse"],  # unrounded: checked
            "sparse_vs_dense": ms["dense"] / ms["sparse"],
        })
    rigl_rows = []
    for sp in DST_SPARSITIES:  # whole periods: one call is update_every steps
        ms = time_ms(build_rigl(sp, update_every), 0.0, block_s=0.0, min_rounds=rounds)
        rigl_rows.append({
            "sparsity": sp,
            **{f"{k}_ms": round(v / update_every, 3) for k, v in ms.items()},
            "sparse_vs_masked": ms["masked"] / ms["sparse"],  # unrounded: checked
        })
    load_after = os.getloadavg()

    misses = [
        f"{what}sparsity {r['sparsity']}: sparse is {r['sparse_vs_masked']:.2f}x masked dense, "
        f"target >= {TARGETS[r['sparsity']]}x"
        for what, table in (("", rows), ("RigL, ", rigl_rows))
        for r in table
        if r["sparsity"] in TARGETS and r["sparse_vs_masked"] < TARGETS[r["sparsity"]]
    ]
    meta = {
        "model": "MLP " + "-".join(map(str, SIZES)),
        "batch": BATCH,
        "optimizer": "Adam(fused=True)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernels": kernels.available(),
        "isa": kernels.isa(),
        "machine": machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "quick": args.quick,
        "rounds": f">= {rounds}",
        "rigl_update_every": update_every,
    }
    md = _markdown(rows, rigl_rows, meta, misses)
    print(md)
    stem = "sparse_linear_training" + ("_quick" if args.quick else "")
    stem += f"_threads{args.threads}" if args.threads else ""
    stem += f"_{args.isa}" if args.isa else ""
    return conclude([(m, False) for m in misses], {
        args.out / f"{stem}.json": {"meta": meta, "rows": rows, "rigl_rows": rigl_rows,
                                    "misses": misses},
        args.out / f"{stem}.md": md}, no_check=args.no_check)


def _markdown(rows: list[dict], rigl_rows: list[dict], meta: dict, misses: list[str]) -> str:
    lines = [
        f"# SparseLinear training step: {meta['model']}, batch {meta['batch']}, Adam",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpus']} CPUs, "
        f"compiled kernels: {meta['kernels']} (ISA {meta['isa']}); load average before "
        f"{meta['loadavg_before']}, after {meta['loadavg_after']}; best of "
        f"{meta['rounds']} interleaved rounds.",
        "",
        "| sparsity | dense ms | masked dense ms | SparseLinear ms | vs masked | vs dense |"
        " target vs masked |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = TARGETS.get(r["sparsity"])
        lines.append(
            f"| {r['sparsity']:.0%} | {r['dense_ms']:.2f} | {r['masked_ms']:.2f} | "
            f"{r['sparse_ms']:.2f} | {r['sparse_vs_masked']:.2f}x | {r['sparse_vs_dense']:.2f}x | "
            + (f">= {target}x |" if target else "— |")
        )
    lines += [
        "",
        f"## RigL, an update every {meta['rigl_update_every']} steps "
        "(time per step over whole update periods)",
        "",
        "| sparsity | masked dense + RigL ms | SparseLinear + RigL ms | vs masked |"
        " target vs masked |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rigl_rows:
        target = TARGETS.get(r["sparsity"])
        lines.append(
            f"| {r['sparsity']:.0%} | {r['masked_ms']:.2f} | {r['sparse_ms']:.2f} | "
            f"{r['sparse_vs_masked']:.2f}x | " + (f">= {target}x |" if target else "— |")
        )
    lines += ["", "Missed targets: " + ("; ".join(misses) if misses else "none"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
