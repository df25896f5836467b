"""Whole models, dense vs ``sparsekit.compile``: latency and memory side by side in one run.

LeNet-300-100 and the convolutional LeNet-5 pruned to 90% (global magnitude) at batch 1
and 64, and a stack of
transformer blocks (d_model 512, FFN 2048, attention built from ``nn.Linear``) pruned to
50% 2:4 and to 90% unstructured, run on 1 and 64 tokens. Latency is the best of many
blocks of calls, dense and compiled taking turns so machine load hits both alike; memory is
the bytes of parameters + buffers. Writes ``results/end_to_end.json`` and ``.md`` and exits
non-zero listing the misses: compiled slower than 0.95x dense, or not smaller at 90%.

    python benchmarks/end_to_end.py            # 4 transformer blocks
    python benchmarks/end_to_end.py --quick    # 2 blocks, shorter timing (CI, < 30 s)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import _timing
import torch
import torch.nn.functional as F
from _machine import machine
from _report import conclude
from torch import nn

import sparsekit
from sparsekit.models import lenet5, lenet_300_100

RESULTS = Path(__file__).parent / "results"
NOISE = 0.95  # "never slower than dense" allows 5% timing noise


class Block(nn.Module):
    """Pre-norm transformer block whose projections are all exact ``nn.Linear``."""

    def __init__(self, d_model: int = 512, ffn: int = 2048, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.up, self.down = nn.Linear(d_model, ffn), nn.Linear(ffn, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (
            p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Stack(nn.Module):
    """``depth`` transformer blocks."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (each tensor counted once)."""
    seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def time_ms(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    """Best ms per call, ~10 ms blocks each started warm (this model's weights in cache)."""
    return _timing.time_ms(fns, budget_s, block_s=0.01, max_reps=1000, min_rounds=5,
                           max_rounds=200, rewarm=True)


def cases(quick: bool) -> list[tuple[str, str, nn.Module, dict[int, torch.Tensor]]]:
    """(model, sparsity label, pruned dense model, inputs by batch) for every case."""
    torch.manual_seed(0)
    lenet = lenet_300_100().eval()
    sparsekit.prune(lenet, 0.9, allocation="global")
    out = [("lenet_300_100", "90% global", lenet, {b: torch.randn(b, 784) for b in (1, 64)})]
    cnn = lenet5().eval()
    sparsekit.prune(cnn, 0.9, allocation="global")
    out.append(("lenet5", "90% global", cnn, {b: torch.randn(b, 1, 28, 28) for b in (1, 64)}))
    depth = 2 if quick else 4
    for label, kwargs in (("50% 2:4", {"pattern": "2:4"}), ("90% unstructured", {})):
        stack = Stack(depth).eval()
        sparsekit.prune(stack, 0.9 if "90" in label else 0.5, **kwargs)
        tokens = {b: torch.randn(1, b, 512) for b in (1, 64)}
        out.append((f"transformer_{depth}x512", label, stack, tokens))
    return out


def run(quick: bool, budget: float) -> list[dict[str, object]]:
    rows = []
    for name, label, dense, inputs in cases(quick):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = sparsekit.compile(dense, next(iter(inputs.values())), rows=(1, 64),
                                         cache=False)
        compile_s = time.perf_counter() - t0
        formats: dict[str, int] = {}
        for choice in compiled.sparsekit_choices.values():
            formats[choice["format"]] = formats.get(choice["format"], 0) + 1
        dense_b, compiled_b = model_bytes(dense), model_bytes(compiled)
        for batch, x in inputs.items():
            with torch.inference_mode():
                ms = time_ms({"dense": partial(dense, x), "compiled": partial(compiled, x)}, budget)
            rows.append({
                "model": name, "sparsity": label, "batch": batch,
                "ms_dense": ms["dense"], "ms_compiled": ms["compiled"],
                "speedup": ms["dense"] / ms["compiled"],
                "bytes_dense": dense_b, "bytes_compiled": compiled_b,
                "memory_ratio": compiled_b / dense_b, "formats": formats,
                "compile_s": compile_s,
            })
            print(f"{name:18s} {label:17s} b={batch:<3d} dense {ms['dense']:8.3f} ms  "
                  f"compiled {ms['compiled']:8.3f} ms  x{rows[-1]['speedup']:.2f}  "
                  f"mem {compiled_b / dense_b:.2f}  {formats}", flush=True)
    return rows


def check(rows: list[dict[str, object]]) -> list[str]:
    misses = []
    for r in rows:
        case = f"{r['model']} {r['sparsity']} batch {r['batch']}"
        if r["speedup"] < NOISE:
            misses.append(f"{case}: compiled is {r['speedup']:.2f}x dense (< {NOISE})")
        if r["sparsity"].startswith("90") and r["bytes_compiled"] >= r["bytes_dense"]:
            misses.append(f"{case}: compiled {r['bytes_compiled']} B >= dense {r['bytes_dense']} B")
    return misses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, short timing (CI)")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per case")
    parser.add_argument("--no-check", action="store_true", help="report misses, exit 0")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 2.0)
    if budget <= 0:
        parser.error(f"--budget must be a positive number of seconds, got {budget}")
    start = time.perf_counter()
    rows = run(args.quick, budget)
    misses = check(rows)
    env = {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": machine(), "quick": args.quick,
        "budget_s": budget, "wall_s": round(time.perf_counter() - start, 1),
    }
    name = "end_to_end_quick" if args.quick else "end_to_end"
    md = [
        "# End to end: dense vs `sparsekit.compile`",
        "",
        f"torch {env['torch']}, {env['threads']} threads, {env['machine']}; best of "
        f"interleaved blocks, {budget} s per case; memory = parameter + buffer bytes.",
        "",
        "| model | sparsity | batch | dense ms | compiled ms | speedup | dense MB | compiled MB "
        "| memory | formats |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        *[
            f"| {r['model']} | {r['sparsity']} | {r['batch']} | {r['ms_dense']:.3f} | "
            f"{r['ms_compiled']:.3f} | {r['speedup']:.2f}x | {r['bytes_dense'] / 1e6:.2f} | "
            f"{r['bytes_compiled'] / 1e6:.2f} | {r['memory_ratio']:.2f}x | "
            f"{', '.join(f'{k}: {v}' for k, v in r['formats'].items())} |"
            for r in rows
        ],
        "",
        "Misses: " + ("none" if not misses else ""),
        *[f"- {m}" for m in misses],
    ]
    print(f"end to end: {env['wall_s']} s")
    return conclude([(m, False) for m in misses], {
        args.out / f"{name}.json": {"env": env, "rows": rows, "misses": misses},
        args.out / f"{name}.md": "\n".join(md) + "\n"}, no_check=args.no_check)


if __name__ == "__main__":
    sys.exit(main())
