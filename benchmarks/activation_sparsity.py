"""Training-free activation sparsity: kernel speed, perplexity and decode speed.

(a) Activation-sparse layers at LLaMA MLP shapes (5632x2048, 11008x4096), 1 and 128 rows,
    float32 and bfloat16, weight dense or 50 % pruned, TEAL 50 % (thresholds from
    ``activation.calibrate``): ``sparsekit.compile(model, activation_sparsity=...)`` against
    dense ``F.linear`` and against the same layer compiled without activation sparsity
    ("base": dense, or the weight-sparse format compile chose), timed interleaved.
(b) The byte-level LLaMA of the LLM-pruning benchmark (4 x 256, trained on tinyshakespeare by
    ``llm_pruning.train_llama``, cached under benchmarks/cache/): validation perplexity against
    model-wide activation sparsity for TEAL, WINA and CATS with uniform and greedy allocation.
(k) With --kernels: the activation-sparse kernels alone at the 2048/5632 LLaMA's layer shapes
    and 11008x4096 (fp32, bf16 and int8 values, 50 and 70 % pruned, TEAL 50 %), one row, one
    thread (CPU time) and two (wall time), on every vector ISA of the CPU, interleaved with
    the dense peer and the row-bitmap weight-only kernel of the same values, in ms and % of
    their bytes' floor.
(c) Batch-1 decode tokens/s (KV cache, one ``model(...)`` per token) of the dense model, TEAL
    50% (``sparsekit.compile(model, activation_sparsity=...)``), 50% magnitude weight sparsity
    (``sparsekit.compile`` of the pruned model) and both, timed interleaved. On the trained
    4 x 256 model and on an untrained LLaMA of the same architecture at realistic width
    (hidden 1024, intermediate 2752; thresholds calibrated on its activations over
    tinyshakespeare), whose weights do not fit in cache, so decoding is memory-bound.

Targets: (a) TEAL 50 % >= 1.3x the same layer without activation sparsity at 1 row, and
never slower than dense ``F.linear`` at 128 rows (within autotune's 5 % noise margin);
(b) 50% sparsity at <= 5% relative perplexity increase; (c) decode >= 1.4x (checked on the
wide model, where weight reads dominate a decode step); (k) ``act_gemv`` (TEAL 50 % over the
dense-stored weight) >= 1.3x the dense GEMV of the same values in every row of the table.
The script exits non-zero listing the misses unless --no-check; --quick is a CI smoke run
(no checks); --layers runs (a) only, --kernels (k) only. Results:
benchmarks/results/activation_sparsity{,_quick,_layers}.{json,md} and
activation_sparsity_kernels{,_quick}.{json,md}; ``--suffix TEXT`` appends ``_TEXT`` to the
name (``--kernels --suffix zen3``: activation_sparsity_kernels_zen3), ``--out`` picks the
folder.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_info
from _report import checklist, conclude, stem, suffix_arg
from _timing import time_ms
from llm_pruning import SEQLEN, shakespeare, train_llama
from transformers import LlamaConfig, LlamaForCausalLM

import sparsekit
from sparsekit import activation, llm
from sparsekit.engine import kernels

RESULTS = Path(__file__).parent / "results"
WIDE = {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 4,
        "num_attention_heads": 8}  # the memory-bound decode model (untrained)
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65)
METHODS = ("teal", "wina", "cats")
ALLOCATIONS = ("uniform", "greedy")
SHAPES = ((5632, 2048), (11008, 4096))  # LLaMA MLP projections: 1B-class and 7B
ROWS = (1, 128)  # a decode step and a prompt
DECODE_TARGET, NOISE = 1.3, 0.05  # TEAL 50 % over no activation sparsity; autotune.MARGIN


def layer_row(out: int, cols: int, dtype: torch.dtype, pruned: float, quick: bool) -> dict:
    """(a) One layer: dense ``F.linear``, compiled without and with TEAL 50 %, per row count."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(cols, out, bias=False)).to(dtype).eval()
    with torch.no_grad():
        model[0].weight[torch.rand(out, cols, generator=g) < pruned] = 0
    weight = model[0].weight.detach().clone()
    act = activation.calibrate(model, torch.randn(256, cols, generator=g).to(dtype),
                               sparsity=0.5, method="teal")
    base = sparsekit.compile(model, rows=ROWS)
    teal = sparsekit.compile(model, rows=ROWS, activation_sparsity=act)
    layer = teal[0]
    row = {"shape": [out, cols], "dtype": str(dtype).removeprefix("torch."), "pruned": pruned,
           "base_format": base.sparsekit_choices["0"]["format"], "kernel": layer.kernel,
           "prefill": "W.T (one copy)" if layer.prefill is None else layer.prefill.format.name,
           "ms": {}, "x_dense": {}, "x_base": {}}
    for rows in ROWS:
        x = torch.randn(rows, cols, generator=g).to(dtype)
        with torch.no_grad():
            t = time_ms({"dense": lambda x=x: F.linear(x, weight), "base": lambda x=x: base(x),
                         "teal": lambda x=x: teal(x)}, budget_s=0.5 if quick else 4)
        row["ms"][rows] = t
        row["x_dense"][rows] = t["dense"] / t["teal"]
        row["x_base"][rows] = t["base"] / t["teal"]
    print(f"  {out}x{cols} {row['dtype']:8s} pruned {pruned:.0%}: kernel {row['kernel']}, "
          f"prefill {row['prefill']}, base {row['base_format']}; " + ", ".join(
              f"{r} rows {row['x_dense'][r]:.2f}x dense {row['x_base'][r]:.2f}x base"
              for r in ROWS), flush=True)
    return row


def layer_rows(quick: bool) -> list[dict]:
    """(a) every shape x dtype x weight sparsity (the smaller shape only with ``quick``), on
    one thread: on the loaded 2-core machine a 2-thread kernel stalls whenever one of its
    threads is descheduled, which times the machine's load rather than the kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [layer_row(out, cols, dtype, pruned, quick)
                for out, cols in SHAPES[:1 if quick else None]
                for dtype in (torch.float32, torch.bfloat16) for pruned in (0.0, 0.5)]
    finally:
        torch.set_num_threads(threads)


# -- (k) the kernels alone, against their bytes ----------------------------------------

KERNEL_SHAPES = ((2048, 2048), (5632, 2048), (2048, 5632), (11008, 4096))
"""q/k/v/o, gate/up and down of the 2048/5632 LLaMA, and a LLaMA-7B MLP projection."""
STREAM_BYTES = 160e6  # weights cycled per timed function: more than an L3, so calls stream
KERNEL_VALUES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}
"""Stored values -> the dtype of x (int8 codes take float32 inputs)."""
CLOCKS = {1: time.thread_time, 2: time.perf_counter}
"""Threads -> clock: one thread in its own CPU time (load on the other core does not count),
two threads in wall time (what a caller waits for)."""
KERNEL_TARGET = 1.3
"""(k) ``act_gemv`` at 50 % input sparsity over the dense peer of the same values. Its bytes
say 2x: it reads the kept half of the rows of the transposed weight (``n_kept * out`` values
against the dense GEMV's ``out * cols``), both streaming from memory. 1.3x asks for 65 % of
that, leaving room for the skipped rows' scattered starts (a kept row is a short run the
prefetchers learn late) and for a noisy shared machine; the Zen 3 table
(activation_sparsity_kernels_zen3.md) has 1.50-3.94x over its 48 rows."""


def stream_gb_s(budget_s: float, clock=time.perf_counter) -> float:  # type: ignore[no-untyped-def]
    """Read bandwidth (GB/s) of torch's threads summing STREAM_BYTES of float32 (``clock``
    times it): the floor's rate at the current thread count."""
    data = torch.ones(int(STREAM_BYTES // 4))
    return STREAM_BYTES / (time_ms({"sum": data.sum}, budget_s, clock=clock)["sum"] * 1e6)


def _cycled(tensors: list):  # type: ignore[no-untyped-def]
    """A function returning the items in turn (each call reads a weight not in cache)."""
    state = {"i": 0}

    def nxt():  # type: ignore[no-untyped-def]
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]
    return nxt


def _copies(nbytes: int) -> int:
    return int(STREAM_BYTES // max(nbytes, 1)) + 2


def kernel_row(out: int, cols: int, value: str, pruned: float, threads: int, gb_s: float,
               budget_s: float) -> dict:
    """One layer at weight sparsity ``pruned`` and 50 % input sparsity on ``threads``
    threads (:data:`CLOCKS` says how each is timed): ms per call of the dense peer of the
    same values (``F.linear`` for fp32, sparsekit's ``dense_linear`` for bf16 and int8),
    the row-bitmap weight-only kernel (``bitmap_linear``) and the activation-sparse kernels
    (``act_gemv`` on the transposed dense weight, ``act_sparse_gemv`` and ``act_bitmap_gemv``
    on the pruned one), timed interleaved on weights cycled through enough copies to stream
    from memory, each with its floor (its own bytes at ``gb_s``)."""
    import importlib

    from sparsekit.engine.activation_linear import ActivationSparseLinear
    from sparsekit.quantize import quantize_int8

    value_op = importlib.import_module("sparse_kernels").value_op
    g = torch.Generator().manual_seed(out + cols)
    w = torch.randn(out, cols, generator=g)
    w[torch.rand(out, cols, generator=g) < pruned] = 0
    xdtype = KERNEL_VALUES[value]
    x = torch.randn(cols, generator=g).to(xdtype)
    threshold = x.float().abs().median().expand(cols).contiguous().to(xdtype)  # TEAL 50 %
    kept = x.float().abs() >= threshold.float()
    if value == "int8":
        stored, scales = quantize_int8(w)
    else:
        stored, scales = w.to(xdtype), None
    size, ops, row2d = stored.element_size(), torch.ops.sparsekit, x.view(1, -1)
    copies = _copies(stored.numel() * size)
    dense = _cycled([stored.clone() for _ in range(copies)])
    wt = _cycled([stored.t().contiguous() for _ in range(copies)])
    bitmap, bitmap_bytes = value_op("bitmap", value, w)
    layers = {k: [ActivationSparseLinear(stored, None, threshold, kernel=k, scales=scales,
                                         dtype=xdtype, threads=threads)
                  for _ in range(_copies(stored_bytes(stored, scales)))]
              for k in ("act_sparse_gemv", "act_bitmap_gemv")}
    sparse, bits = _cycled(layers["act_sparse_gemv"]), _cycled(layers["act_bitmap_gemv"])
    first = layers["act_bitmap_gemv"][0]
    fns = {
        "dense": (lambda: F.linear(row2d, dense())) if value == "fp32"
        else (lambda: ops.dense_linear(dense(), row2d, None, cols, threads, scales)),
        "bitmap_linear": lambda: bitmap(row2d),
        "act_gemv": lambda: ops.act_gemv(wt(), x, threshold, None, threads, scales),
        "act_sparse_gemv": lambda: sparse()(x),
        "act_bitmap_gemv": lambda: bits()(x),
    }
    stored_kept = int((w[:, kept] != 0).sum())
    blocks = -(-out // first.block)
    n_kept = int(kept.sum())
    floor_bytes = {
        "dense": stored.numel() * size, "bitmap_linear": bitmap_bytes,
        "act_gemv": n_kept * out * size,
        "act_sparse_gemv": stored_kept * (size + 2) + n_kept * -(-out // 2048) * 4,
        "act_bitmap_gemv": stored_kept * size + n_kept * blocks * (first.block // 8 + 4),
    }
    ms = time_ms(fns, budget_s, clock=CLOCKS[threads])
    floor = {k: floor_bytes[k] / (gb_s * 1e6) for k in ms}
    return {"shape": [out, cols], "values": value, "pruned": pruned, "threads": threads,
            "clock": CLOCKS[threads].__name__, "ms": ms, "floor_ms": floor,
            "pct_floor": {k: 100 * floor[k] / ms[k] for k in ms},
            "x_dense": {k: ms["dense"] / ms[k] for k in ms},
            "x_bitmap": {k: ms["bitmap_linear"] / ms[k] for k in ms}}


def stored_bytes(stored: torch.Tensor, scales: torch.Tensor | None) -> int:
    """Bytes of a weight's values (and int8 scales) at its density: a pruned layer's size."""
    nbytes = int(stored.count_nonzero()) * stored.element_size()
    return nbytes + (0 if scales is None else scales.numel() * 4)


def kernel_rows(quick: bool) -> tuple[list[dict], dict[int, float]]:
    """(k) every real layer shape x {fp32, bf16, int8 (float inputs)} x weight sparsity
    {50, 70} % on every vector ISA of this CPU, one thread (CPU time) and two (wall); and the
    stream bandwidth measured at each thread count."""
    threads = torch.get_num_threads()
    budget = 0.2 if quick else 1.0
    rows, gb_s = [], {}
    try:
        for t in CLOCKS:
            torch.set_num_threads(t)
            gb_s[t] = stream_gb_s(budget, CLOCKS[t])
            for isa in [i for i in kernels.isas() if i != "scalar"]:
                with kernels.use_isa(isa):
                    for out, cols in KERNEL_SHAPES[:1 if quick else None]:
                        for value in KERNEL_VALUES:
                            for pruned in (0.5, 0.7):
                                row = {"isa": isa, **kernel_row(out, cols, value, pruned, t,
                                                                gb_s[t], budget)}
                                print(f"  {isa} {t}T {out}x{cols} {value} {pruned:.0%}: "
                                      + ", ".join(f"{k} {v:.3f} ms "
                                                  f"({row['pct_floor'][k]:.0f} % floor)"
                                                  for k, v in row["ms"].items()), flush=True)
                                rows.append(row)
        return rows, gb_s
    finally:
        torch.set_num_threads(threads)


def kernel_checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """(k) ``act_gemv`` >= :data:`KERNEL_TARGET` x the dense peer of the same values, per row
    (ISA, threads, shape, values, weight sparsity)."""
    results = []
    for r in rows:
        x = r["x_dense"]["act_gemv"]
        results.append((f"{r['isa']} {r['threads']}T {r['shape'][0]}x{r['shape'][1]} "
                        f"{r['values']} pruned {r['pruned']:.0%}: act_gemv (TEAL 50 %) "
                        f">= {KERNEL_TARGET}x the dense {r['values']} GEMV ({x:.2f}x)",
                        x >= KERNEL_TARGET))
    return results


def kernels_markdown(rows: list[dict], gb_s: dict[int, float]) -> list[str]:
    rates = ", ".join(f"{gb:.1f} GB/s at {t} thread{'s' * (t > 1)}" for t, gb in gb_s.items())
    lines = ["## (k) Activation-sparse kernels against their bytes (TEAL 50 %, one row)", "",
             f"Floor: the kernel's own bytes at the stream rate of torch summing float32 from "
             f"memory at the same thread count ({rates}); weights cycle through copies larger "
             "than the L3. One thread is timed in its CPU time (`time.thread_time`), two in "
             "wall time. `dense` is the dense peer of the same values (`F.linear` for fp32, "
             "`dense_linear` for bf16 and int8), `bitmap_linear` the row-bitmap weight-only "
             "kernel.", "",
             "| ISA | threads | shape | values | pruned | kernel | ms | floor ms | % of floor "
             "| vs dense | vs bitmap_linear |",
             "| :--- | ---: | :--- | :--- | ---: | :--- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for k, v in r["ms"].items():
            lines.append(f"| {r['isa']} | {r['threads']} | {r['shape'][0]}x{r['shape'][1]} | "
                         f"{r['values']} | {r['pruned']:.0%} | {k} | {v:.3f} | "
                         f"{r['floor_ms'][k]:.3f} | {r['pct_floor'][k]:.0f} % | "
                         f"{r['x_dense'][k]:.2f}x | {r['x_bitmap'][k]:.2f}x |")
    return [*lines, ""]


def windows(data: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of SEQLEN tokens."""
    starts = torch.randint(0, data.numel() - SEQLEN, (n,), generator=gen).tolist()
    return torch.stack([data[s:s + SEQLEN] for s in starts])


def perplexity(model: LlamaForCausalLM, val: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(sum(model(x[None], labels=x[None]).loss.item() for x in val) / len(val))


def decode_tokens_per_s(models: dict[str, torch.nn.Module], prompt: torch.Tensor, steps: int,
                        rounds: int) -> dict[str, float]:
    """Batch-1 greedy decode speed (KV cache): 1 / median time of one decode step.

    Models take turns each round; the median ignores the steps a busy machine stalled.
    """
    def run(model: torch.nn.Module, times: list[float]) -> None:
        with torch.no_grad():
            out = model(prompt, use_cache=True)
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                out = model(token, cache=out.cache, use_cache=True)
                times.append(time.perf_counter() - start)

    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            run(model, times[name])
    return {n: 1 / statistics.median(t) for n, t in times.items()}


def llama_rows(model: LlamaForCausalLM, calibration: list[torch.Tensor], val: torch.Tensor,
               quick: bool) -> dict:
    """(b) validation perplexity against activation sparsity, per method and allocation."""
    dense_ppl = perplexity(model, val)
    rows = []
    for method in METHODS:
        for allocation in ALLOCATIONS[:1] if quick else ALLOCATIONS:
            for sparsity in (0.5,) if quick else SPARSITIES[1:]:
                act = activation.calibrate(model, calibration, sparsity=sparsity, method=method,
                                           allocation=allocation)
                act.apply(model)
                try:
                    ppl = perplexity(model, val)
                    realised = act.model_sparsity(act.stats())
                finally:
                    act.remove()
                rows.append({"method": method, "allocation": allocation, "sparsity": sparsity,
                             "realised": realised, "ppl": ppl,
                             "ppl_increase": ppl / dense_ppl - 1})
                print(f"  {method:4s} {allocation:7s} {sparsity:.2f}  realised {realised:.3f}  "
                      f"ppl {ppl:.3f} ({ppl / dense_ppl - 1:+.1%})", flush=True)
    return {"dense_ppl": dense_ppl, "val_tokens": val.numel(), "rows": rows}


def decode_row(model: LlamaForCausalLM, calibration: torch.Tensor, prompt: torch.Tensor,
               quick: bool) -> dict:
    """(c) batch-1 decode tokens/s: dense, TEAL 50%, 50% weight sparsity, and both.

    The weight-sparse models are ``model`` pruned to 50% by weight magnitude and compiled
    (sparse formats where they are faster); combined, the pruned model's layers run through
    the activation-sparse GEMV with thresholds calibrated on the pruned model.
    """
    act = activation.calibrate(model, calibration, sparsity=0.5, method="teal")
    pruned = copy.deepcopy(model)
    llm.prune(pruned, calibration, method="magnitude", sparsity=0.5, seqlen=SEQLEN,
              nsamples=calibration.shape[0])
    pruned_act = activation.calibrate(pruned, calibration, sparsity=0.5, method="teal")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine, 2 threads stall ~100x per step
    try:
        models = {
            "dense": model,
            "act 50%": sparsekit.compile(model, activation_sparsity=act),
            "weight 50%": sparsekit.compile(pruned),
            "weight 50% + act 50%": sparsekit.compile(pruned, activation_sparsity=pruned_act),
        }
        tps = decode_tokens_per_s(models, prompt, steps=8 if quick else 32,
                                  rounds=1 if quick else 5)
    finally:
        torch.set_num_threads(threads)
    params = sum(p.numel() for p in model.parameters())
    print(f"  {params / 1e6:.1f}M parameters: " + ", ".join(
        f"{n} {t:.1f} tok/s ({t / tps['dense']:.2f}x)" for n, t in tps.items()), flush=True)
    return {"params": params, "tokens_per_s": tps,
            "speedup": {n: t / tps["dense"] for n, t in tps.items()}}


def wide_llama(quick: bool, seed: int = 0) -> LlamaForCausalLM:
    """An untrained LLaMA of the trained model's architecture at the width of :data:`WIDE`
    (half of it with ``quick``)."""
    torch.manual_seed(seed)
    shape = {k: v // 2 if quick and k.endswith("size") else v for k, v in WIDE.items()}
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=SEQLEN, tie_word_embeddings=False, **shape,
    )).eval()


def layer_checks(layers: list[dict]) -> list[tuple[str, bool]]:
    """(a) TEAL 50 % >= DECODE_TARGET x its base at 1 row; never slower than dense at more."""
    results = []
    for row in layers:
        what = f"{row['shape'][0]}x{row['shape'][1]} {row['dtype']} pruned {row['pruned']:.0%}"
        one, many = row["x_base"][1], row["x_dense"][max(ROWS)]
        results += [
            (f"{what}: TEAL 50 % at 1 row >= {DECODE_TARGET}x without it ({one:.2f}x)",
             one >= DECODE_TARGET),
            (f"{what}: TEAL 50 % at {max(ROWS)} rows not slower than dense F.linear, within "
             f"{NOISE:.0%} ({many:.2f}x)", many >= 1 - NOISE),
        ]
    return results


def model_checks(llama: dict, decode: dict) -> list[tuple[str, bool]]:
    at_50 = [r for r in llama["rows"] if r["sparsity"] == 0.5]
    best = min(r["ppl_increase"] for r in at_50)
    wide = decode["wide"]["speedup"]["act 50%"]
    return [
        (f"50% activation sparsity with <= 5% perplexity increase (best {best:+.1%})",
         best <= 0.05),
        (f"batch-1 decode >= 1.4x dense at 50% activation sparsity, wide model ({wide:.2f}x)",
         wide >= 1.4),
    ]


def layers_markdown(layers: list[dict]) -> list[str]:
    lines = [
        "## (a) Activation-sparse layers, TEAL 50 %", "",
        "Speed of `sparsekit.compile(model, activation_sparsity=...)` as a ratio to dense "
        "`F.linear` (x dense) and to the same layer compiled without activation sparsity "
        "(x base; base is the format compile chose for the pruned weight), best times of "
        "interleaved blocks. 'kernel' is the 1-row kernel compile chose, 'prefill' the format "
        "of the multi-row path.", "",
        "| shape | dtype | pruned | base | kernel | prefill | "
        + " | ".join(f"{r} row{'s' * (r > 1)} ms (dense / base / TEAL) | x dense | x base"
                     for r in ROWS) + " |",
        "|---|---|---|---|---|---|" + "---|---|---|" * len(ROWS),
    ]
    for row in layers:
        cells = [f"{row['ms'][r]['dense']:.2f} / {row['ms'][r]['base']:.2f} / "
                 f"{row['ms'][r]['teal']:.2f} | {row['x_dense'][r]:.2f}x | {row['x_base'][r]:.2f}x"
                 for r in ROWS]
        lines.append(f"| {row['shape'][0]}x{row['shape'][1]} | {row['dtype']} | "
                     f"{row['pruned']:.0%} | {row['base_format']} | {row['kernel']} | "
                     f"{row['prefill']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def model_markdown(llama: dict, decode: dict, quick: bool) -> list[str]:
    lines = [
        f"## (b) Byte-level LLaMA ({llama['model']}), {llama['val_tokens']} validation tokens",
        "", f"Dense perplexity {llama['dense_ppl']:.3f}. Model-wide sparsity is the size-weighted "
        "mean over the thresholded layers (CATS: the down projections only); 'realised' is "
        "measured on the validation data with all thresholds applied.", "",
        "| method | allocation | target | realised | perplexity | increase |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['allocation']} | {r['sparsity']:.0%} | {r['realised']:.1%} "
        f"| {r['ppl']:.3f} | {r['ppl_increase']:+.1%} |" for r in llama["rows"]
    ]
    names = list(decode["trained"]["tokens_per_s"])
    lines += [
        "", "## (c) Batch-1 decode", "",
        "Greedy decode with KV cache, one `model(...)` call per token, 1 thread; tokens/s from "
        "the median step of interleaved runs, speedup against dense in brackets. 'weight 50%' "
        "is the model pruned by weight magnitude and compiled with `sparsekit.compile`; "
        "'act 50%' is TEAL at 50% through the activation-sparse GEMV. The trained 4 x 256 "
        "model's step is dominated by Python and Hugging Face overhead, not weight reads; the "
        f"wide model ({decode['wide']['params'] / 1e6:.0f}M parameters, "
        f"{WIDE['num_hidden_layers']} layers, {'half of ' * quick}hidden "
        f"{WIDE['hidden_size']} and intermediate {WIDE['intermediate_size']}, untrained, "
        "thresholds calibrated on tinyshakespeare) is memory-bound like a real LLM.", "",
        "| model | parameters | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for key, label in (("trained", "trained 4 x 256"), ("wide", "wide, untrained")):
        row = decode[key]
        cells = [f"{row['tokens_per_s'][n]:.1f} ({row['speedup'][n]:.2f}x)" for n in names]
        lines.append(f"| {label} | {row['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return [*lines, ""]


def models(quick: bool) -> tuple[dict, dict]:
    """(b) perplexity and (c) decode speed on the byte-level LLaMA (and the wide one)."""
    data = shakespeare()
    split = int(0.9 * data.numel())
    train, val_data = data[:split], data[split:]
    steps = 40 if quick else 400  # the LLM-pruning benchmark's model (shared cache)
    model = train_llama(train, steps).eval()
    gen = torch.Generator().manual_seed(1)
    calibration = windows(train, 8 if quick else 16, gen)
    val = windows(val_data, 4 if quick else 16, gen)
    print("(c) decode", flush=True)
    prompt = val[0, :32][None]
    decode = {"trained": decode_row(model, calibration, prompt, quick),
              "wide": decode_row(wide_llama(quick), calibration[:2 if quick else 4],
                                 prompt, quick)}
    print(f"(b) LLaMA, llm_pruning.train_llama {steps} steps", flush=True)
    # batches of 4 windows: greedy replays blocks on the first one only
    llama = {"model": f"llm_pruning.train_llama, {steps} steps",
             **llama_rows(model, list(calibration.split(4)), val, quick)}
    return llama, decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run, no checks")
    parser.add_argument("--no-check", action="store_true", help="do not fail on missed targets")
    parser.add_argument("--layers", action="store_true", help="(a) only: the layer table")
    parser.add_argument("--kernels", action="store_true",
                        help="(k) only: the kernels against their bytes, per ISA")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--suffix", type=suffix_arg, default="", metavar="TEXT",
                        help="appended to the results' file names (e.g. zen3), so that a run "
                        "on another CPU does not overwrite a committed one")
    args = parser.parse_args()
    if args.kernels:
        return kernels_main(args)
    torch.manual_seed(0)
    note = (f"torch {torch.__version__}, {torch.get_num_threads()} threads ((a) and (c): 1), "
            f"CPU {cpu_info()[0]}, compiled kernels "
            f"{'on' if kernels.available() else 'off (PyTorch fallback)'}. The machine was "
            "shared with other jobs while this ran: absolute times are noisy, ratios are "
            "measured side by side.")
    print("(a) layers", flush=True)
    layers = layer_rows(args.quick)
    results, body = layer_checks(layers), layers_markdown(layers)
    llama = decode = None
    if not args.layers:
        llama, decode = models(args.quick)
        results += model_checks(llama, decode)
        body += model_markdown(llama, decode, args.quick)
    name = stem("activation_sparsity", "quick" if args.quick else "layers" if args.layers else "",
                args.suffix)
    report = "\n".join(["# Activation sparsity (TEAL / WINA / CATS)", "", note, "", *body,
                        "## Targets", "", *checklist(results)]) + "\n"
    print(report)
    return conclude(results, {
        args.out / f"{name}.json": {"layers": layers, "llama": llama, "decode": decode,
                                    "checks": dict(results), "note": note},
        args.out / f"{name}.md": report}, no_check=args.quick or args.no_check)


def kernels_main(args: argparse.Namespace) -> int:
    """(k) alone: benchmarks/results/activation_sparsity_kernels{,_quick}{_SUFFIX}.{json,md};
    exits 1 on a missed :data:`KERNEL_TARGET` unless --no-check or --quick (a smoke run)."""
    print("(k) kernels", flush=True)
    rows, gb_s = kernel_rows(args.quick)
    results = kernel_checks(rows)
    name = stem("activation_sparsity_kernels", "quick" if args.quick else "", args.suffix)
    machine = cpu_info()
    report = "\n".join([f"# Activation-sparse kernels (CPU {machine[0]}; "
                        f"{' '.join(machine[1])})", "", *kernels_markdown(rows, gb_s),
                        "## Targets", "", *checklist(results)]) + "\n"
    print(report)
    return conclude(results, {
        args.out / f"{name}.json": {"cpu": machine[0], "flags": machine[1],
                                    "stream_gb_s": {str(t): v for t, v in gb_s.items()},
                                    "rows": rows, "checks": dict(results)},
        args.out / f"{name}.md": report}, no_check=args.quick or args.no_check)


if __name__ == "__main__":
    raise SystemExit(main())
