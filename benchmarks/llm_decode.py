"""Batch-1 decode of a pruned Hugging Face LLaMA: sparsekit against dense and quantized peers.

The README's headline table. ``LlamaForCausalLM`` with memory-bound shapes (hidden 2048,
intermediate 5632, 4 layers, a 256-token vocabulary so the decoder layers dominate as in a
7B model; then one 4096/11008 layer, the LLaMA-7B shape) with random weights (the Hugging
Face initialisation: speed does not depend on what the weights say), pruned by magnitude with
:func:`sparsekit.llm.prune` (for the int8 rows with ``quantize="int8"``, so the weights lie on
the grid the engine stores). Every configuration of one model decodes greedily with a KV
cache, the configurations taking turns token by token in one run (a change in machine load
hits them all alike); tokens/s is one over the median decode step. The prefill of one
512-token prompt is timed interleaved too, in at least five rounds: its tokens/s is the
best round's, its ratio to dense (the prefill check) the median over rounds of the two
models' ratio in the same round.

Configurations: dense fp32; dense bf16 (``model.to(torch.bfloat16)``); torch int8 dynamic
quantization (``torch.ao.quantization.quantize_dynamic``); ``_weight_int8pack_mm`` (int8
weights, per-channel scales, bf16 activations: its only vectorised x86 path); and sparsekit at
50 %, 2:4 and 70 % × {fp32, bf16, int8} × {no activation sparsity, TEAL 50 %
(``sparsekit.activation``)}, compiled with ``sparsekit.compile(model, prompt,
weight_dtype=..., grow=True)`` (a layer may hold a decode and a prompt format even if together
larger than dense: serving trades that memory for speed; bf16: the bf16 model; fp32 and int8:
the fp32 model, fp32 activations). Each sparsity also has an ``int8 W8A8`` row: the int8
model compiled with ``activation_dtype="int8"`` (inputs quantized per row to int8, integer dot
products), held to the int8 targets too, with and without TEAL 50 % (the W8A8 activation-sparse
kernel ``act_bitmap_qgemv``). A configuration the installed sparsekit refuses is
skipped with a printed note and counts as a miss.

Targets, as ratios in one run (checked on every model): 50 % bf16 ≥ 1.5× dense bf16; 2:4 bf16
≥ 1.4× dense bf16; 50 % int8 ≥ 1.5× the best torch int8 peer and ≥ 3× dense fp32; 70 % int8
≥ 5× dense fp32; TEAL 50 % on top of each of these ≥ 1.3× more; every sparsekit prefill not
slower than dense of its activation dtype (within 5 % timing noise). Each miss is printed and
the script exits 1 (``--no-check`` only reports). Writes
benchmarks/results/llm_decode{,_quick}{_SUFFIX}{_avx2}.{json,md}, naming the CPU model and ISA
(``--suffix SUFFIX`` names a run after its model, CPU and session, as the README's files are:
``--shape 2048x5632x4 --suffix 2048x4_zen4_s49_bf16`` writes
``llm_decode_2048x4_zen4_s49_bf16.{json,md}``; ``--out`` picks the folder).

``--torch-compile`` adds rows of the sparsekit configurations in :data:`COMPILED` decoding
under ``torch.compile`` with a static KV cache (:class:`StaticDecode`), held to the int8
targets against the best peer eager or compiled; the dense peers so compiled are timed each
in a rotation of their own (:func:`compiled_peer_ratios`).

Accuracy of the int8 rows: the byte-level LLaMA of benchmarks/llm_pruning.py (4 x 256, trained
400 steps on tinyshakespeare, cached under benchmarks/cache/) pruned by magnitude, Wanda and
SparseGPT at 50 % and 2:4, once in fp32 and once with ``quantize="int8"``; target: int8 adds
≤ 1 % relative validation perplexity over the sparse fp32 model. Reported beside it: int8
with one scale per group of 16 inputs (``group_size=16``, what divides the model's widths).

    python benchmarks/llm_decode.py           # full run (tens of minutes on 2 cores)
    python benchmarks/llm_decode.py --quick   # hidden 1024 / 2816, 2 layers, 128-token prefill
    python benchmarks/llm_decode.py --quick --shape 2048x5632x4 --only decode --configs "50% int8"
    python benchmarks/llm_decode.py --quick --shape 2048x5632x4 --only decode --isa avx2

``--isa avx2`` runs the table as on an AVX2-only CPU (AMD Zen 3, for one), on any CPU that
has AVX2: sparsekit's kernels on their AVX2 path (``kernels.use_isa``) and the peers' libraries
limited to AVX2 by their own switches (:data:`AVX2_ONLY`; set before torch loads, so the
script runs itself again with them). Without AVX-512 BF16 PyTorch's bf16 ``F.linear`` leaves
oneDNN, as it does on such CPUs. The memory system stays this machine's: the run shows the
AVX2 code paths against the AVX2 peers, not a Zen 3's absolute speeds. Results get the suffix
``_avx2``, after ``--suffix``'s (``--suffix 2048x4_intel_emr_s43 --isa avx2``:
``llm_decode_2048x4_intel_emr_s43_avx2``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from _machine import describe
from _report import checklist, conclude, stem, suffix_arg
from _timing import median_ratios, time_rounds
from llm_pruning import EVAL_TOKENS, SEQLEN, shakespeare, train_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sparsekit
from sparsekit import activation, llm
from sparsekit.engine import autotune, kernels
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.compile import streams_weights
from sparsekit.quantize import quantize_int8

RESULTS = Path(__file__).parent / "results"
VOCAB = 256
SHAPES = {  # name: (hidden, intermediate, layers, heads)
    "llama-2048x4": (2048, 5632, 4, 16),
    "llama-4096x1": (4096, 11008, 1, 32),
}
QUICK_SHAPES = {"llama-1024x2": (1024, 2816, 2, 8)}
SPARSE = (("50%", "unstructured", 0.5), ("2:4", "2:4", 0.5), ("70%", "unstructured", 0.7))
DTYPES = ("fp32", "bf16", "int8")
TEAL = 0.5
PEERS = ("torch int8 dynamic", "int8pack")
PROFILED = ("dense bf16", "torch int8 dynamic", "sparsekit 2:4 bf16", "sparsekit 50% bf16",
            "sparsekit 50% int8", "sparsekit 50% int8 W8A8")  # --profile
COMPILED = ("sparsekit 2:4 bf16", "sparsekit 50% bf16", "sparsekit 50% int8",
            "sparsekit 50% int8 W8A8", "sparsekit 70% int8 W8A8")  # --torch-compile
COMPILED_PEERS = ("dense fp32", "dense bf16", "torch int8 dynamic", "int8pack")
STATIC_LEN = 64  # positions of a compiled decode's static KV cache: 16 prompt + the steps
FLOOR = "no linear layers (floor)"  # --profile: the step with every nn.Linear free
TORCH_COMPILED = " + torch.compile"
# Ops whose self time is a weight matmul (the rest of a decode step is attention, norms, RoPE,
# the KV cache, and Python/framework time between ops).
MATMUL_OPS = ("sparsekit::", "aten::mm", "aten::addmm", "aten::_weight_int8pack_mm",
              "quantized::", "mkldnn::_linear_pointwise", "mkl::")
METHODS = ("magnitude", "wanda", "sparsegpt")
PPL_SETTINGS = (("unstructured", 0.5), ("2:4", 0.5))
GROUP = 16  # int8 scales per group of inputs (reported): 16 divides the model's 256 and 688
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
"""``--isa avx2``: the switches that hold ATen's vectorised kernels, oneDNN, MKL and FBGEMM
(torch int8 dynamic quantization) to AVX2, read once when each library loads."""
AVX2_SWITCHES = ", ".join(f"{k}={v}" for k, v in AVX2_ONLY.items())


# -- the models ---------------------------------------------------------------------------


def build(hidden: int, intermediate: int, layers: int, heads: int) -> LlamaForCausalLM:
    """A randomly initialised LLaMA (seeded) with a small vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


class Int8PackLinear(nn.Module):
    """An ``nn.Linear`` whose weight is int8 with per-output-channel scales, multiplied by
    ``torch.ops.aten._weight_int8pack_mm`` (PyTorch's int8-weight-only CPU matmul, the one
    gpt-fast uses) the way PyTorch intends it: bfloat16 activations and bfloat16 scales.

    On x86 its only vectorised kernels (AVX2 and AVX-512) are the bfloat16 ones; float32
    inputs run a scalar loop (an earlier version of this peer passed float32 and measured
    that loop). Those kernels read the activations with 32-byte aligned loads in steps of 16
    inputs, so ``in_features`` must be a multiple of 16 and an input whose data does not
    start on a 64-byte boundary (a view at an offset) is copied first; PyTorch does not check
    either and crashes on a misaligned input.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.in_features % 16:
            raise ValueError(f"_weight_int8pack_mm needs in_features divisible by 16, got "
                             f"{linear.in_features}")
        codes, scales = quantize_int8(linear.weight.detach().float())
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.to(torch.bfloat16))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.data_ptr() % 64 or not rows.is_contiguous():
            rows = rows.clone(memory_format=torch.contiguous_format)  # fresh: 64-byte aligned
        y = torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8pack(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``model`` with every ``nn.Linear`` an :class:`Int8PackLinear`
    (quantized from the float32 weights)."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8PackLinear(child))
    return out.to(torch.bfloat16)  # norms and embeddings; the int8 codes keep their dtype


class FreeLinear(nn.Module):
    """Stands in for an ``nn.Linear`` at no cost: zeros of the output's shape and dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` a :class:`FreeLinear`: its decode step is
    the floor no linear layer can go below (the Python and framework time of the model,
    attention, norms, RoPE, the KV cache)."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, FreeLinear(child))
    return out


def dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with PyTorch's dynamic int8 ``nn.Linear`` layers (deprecated in
    favour of torchao, which is not a dependency here; its warnings are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                      dtype=torch.qint8)


def configurations(model: LlamaForCausalLM, prompt: torch.Tensor, calibration: torch.Tensor,
                   skipped: dict[str, str], selected: Callable[[str], bool] = lambda name: True,
                   ) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Every configuration's model, by name, and the seconds each took to prepare;
    refused ones go to ``skipped`` with the reason. Of the sparsekit configurations only
    those whose name is ``selected`` are built (the dense ones and the peers always are).

    Where the dense fp32 model's weights alone outgrow the cache, they compile inside
    :func:`~sparsekit.engine.autotune.cold_cache`: each model decodes taking turns token by
    token with that one and the others (:func:`decode_tokens_per_s`), so its weights come
    from memory, as a 7B model's would, even where it fits the cache alone. Without it,
    compile timed the int8 models (207 MB at 2048/5632 x 4) warm in a 300 MiB L3 (Intel
    Xeon) and kept dense int8 in decode layers that, read from memory, the 2:4 W8A8 kernel
    ran 1.4x faster on the AVX2 path (session 43). A small shape whose models all stay in
    the cache is compiled as compile decides (cold timing of it would only cost time)."""
    models: dict[str, nn.Module] = {"dense fp32": model}
    seconds: dict[str, float] = {}
    streams = streams_weights(model)  # compile's own rule, for the dense fp32 model

    def add(name: str, make: Callable[[], nn.Module]) -> None:
        if name.startswith("sparsekit") and not selected(name):
            return
        start = time.perf_counter()
        try:
            with autotune.cold_cache() if streams else contextlib.nullcontext():
                models[name] = make()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(f"  skipped {name}: {skipped[name]}", flush=True)
            return
        seconds[name] = time.perf_counter() - start
        print(f"  {name}: ready in {seconds[name]:.1f} s", flush=True)

    add("dense bf16", lambda: copy.deepcopy(model).to(torch.bfloat16))
    add("torch int8 dynamic", lambda: dynamic_int8(model))
    add("int8pack", lambda: int8pack(model))
    for label, pattern, sparsity in SPARSE:
        if not any(selected(config_name(label, dtype, with_teal))
                   for dtype in (*DTYPES, W8A8) for with_teal in (False, True)):
            continue
        sources, teal = pruned_sources(model, calibration, pattern, sparsity)
        for dtype in DTYPES:
            for act in (None, teal):
                add(config_name(label, dtype, act is not None), functools.partial(
                    sparsekit.compile, sources[dtype], prompt,
                    weight_dtype=None if dtype == "fp32" else dtype, activation_sparsity=act,
                    grow=True))
        add_w8a8(add, label, sources["int8"], prompt, teal)
        del sources, teal
    return models, seconds


# -- W8A8: int8 weights × int8 activations (compile(..., activation_dtype="int8")) ----------

W8A8 = "int8 W8A8"  # the dtype label of these rows: int8 weights, inputs quantized per row


def add_w8a8(add: Callable[[str, Callable[[], nn.Module]], None], label: str,
             source: nn.Module, prompt: torch.Tensor,
             teal: activation.ActivationSparsity) -> None:
    """The W8A8 configurations of one sparsity: the int8-pruned ``source`` compiled with
    int8 inputs, without and with the TEAL thresholds ``teal``."""
    for act in (None, teal):
        add(config_name(label, W8A8, act is not None), functools.partial(
            sparsekit.compile, source, prompt, weight_dtype="int8", activation_dtype="int8",
            activation_sparsity=act, grow=True))


def w8a8_targets(fp32: float | None, best_peer: float | None) -> list[tuple[str, str, float | None,
                                                                        float]]:
    """The issue's int8 targets, for the W8A8 rows too."""
    return [("50% W8A8 vs best torch int8 peer", config_name("50%", W8A8, False), best_peer, 1.5),
            ("50% W8A8 vs dense fp32", config_name("50%", W8A8, False), fp32, 3.0),
            ("70% W8A8 vs dense fp32", config_name("70%", W8A8, False), fp32, 5.0)]


def pruned_sources(model: LlamaForCausalLM, calibration: torch.Tensor, pattern: str,
                   sparsity: float) -> tuple[dict[str, nn.Module], object]:
    """The magnitude-pruned model to compile for each value dtype (int8: pruned with
    ``quantize="int8"``; bf16: cast to bfloat16) and TEAL thresholds calibrated on it."""
    pruned = {}
    for quantize in (None, "int8"):
        pruned[quantize] = copy.deepcopy(model)
        llm.prune(pruned[quantize], calibration, method="magnitude", sparsity=sparsity,
                  pattern=pattern, nsamples=calibration.shape[0], seqlen=calibration.shape[1],
                  quantize=quantize)
    teal = activation.calibrate(pruned[None], calibration, sparsity=TEAL)
    sources = {"fp32": pruned[None], "bf16": copy.deepcopy(pruned[None]).to(torch.bfloat16),
               "int8": pruned["int8"]}
    return sources, teal


def config_name(label: str, dtype: str, teal: bool) -> str:
    return f"sparsekit {label} {dtype}" + (" + TEAL 50%" if teal else "")


# -- timing -------------------------------------------------------------------------------


def decode_tokens_per_s(models: dict[str, nn.Module], prompt: torch.Tensor, steps: int,
                        rounds: int) -> dict[str, float]:
    """Batch-1 greedy decode (KV cache) tokens/s of each model: one over its median step.

    Each round prefills ``prompt`` in every model, then decodes ``steps`` tokens with the
    models taking turns token by token (the first to go rotates), so a change in machine
    load hits every configuration alike; the median ignores the steps a busy machine stalled.
    """
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(rounds):
            outs = {name: models[name](prompt, use_cache=True) for name in names}
            for step in range(steps):
                for name in names[step % len(names):] + names[:step % len(names)]:
                    token = outs[name].logits[:, -1:].argmax(-1)
                    start = time.perf_counter()
                    outs[name] = models[name](token, cache=outs[name].cache, use_cache=True)
                    times[name].append(time.perf_counter() - start)
            del outs
    return {name: 1 / statistics.median(t) for name, t in times.items()}


def prefill_rounds(models: dict[str, nn.Module], prompt: torch.Tensor,
                   budget_s: float) -> dict[str, list[float]]:
    """Milliseconds of one forward pass over ``prompt`` of each model in every round, the
    models taking turns (at least 5 rounds: the prefill check's 5 % is narrower than the
    spread of a best of 3, which put an F.linear-for-F.linear bf16 prompt path at 0.94x
    its dense model in session 48's run, 0.995x in 60 paired rounds)."""
    with torch.no_grad():
        return time_rounds({name: (lambda m=m: m(prompt, use_cache=False))
                            for name, m in models.items()},
                           budget_s, block_s=0.0, max_reps=1, min_rounds=5, max_rounds=9)


def prefill_dense(name: str, names: Collection[str]) -> str | None:
    """The dense model whose prompt speed ``name``'s is held to: dense of its dtype (bf16
    rows against dense bf16, the others against dense fp32), compiled if ``name`` is and
    that one was."""
    if not name.startswith("sparsekit"):
        return None
    dense = "dense bf16" if " bf16" in name else "dense fp32"
    if name.endswith(TORCH_COMPILED) and dense + TORCH_COMPILED in names:
        dense += TORCH_COMPILED
    return dense if dense in names else None


class StaticDecode(nn.Module):
    """``model`` decoding under ``torch.compile(dynamic=False)`` with a static KV cache
    (Hugging Face's ``StaticCache`` of :data:`STATIC_LEN` positions): every decode step has
    one shape, so one graph serves them all and its guards do not grow with the cache, as
    ``dynamic=True`` over the growing ``DynamicCache`` did (session 16: 2.7 → 6.9 ms of
    Python and framework time a step). The prompt runs eager into the (reset) cache; a call
    without ``use_cache`` (the prefill timing) is the eager model's."""

    def __init__(self, model: nn.Module, fullgraph: bool = True) -> None:
        super().__init__()
        from transformers import StaticCache

        self.model = model
        self.compiled = torch.compile(model, dynamic=False, fullgraph=fullgraph)
        self.cache = StaticCache(config=model.config, max_cache_len=STATIC_LEN)
        self.position = 0

    def forward(self, input_ids: torch.Tensor, cache: object = None,
                use_cache: bool = False) -> object:
        if not use_cache:
            return self.model(input_ids, use_cache=False)
        if cache is None:  # a prompt: the cache starts over (one object: no recompile)
            self.cache.reset()
            self.position = input_ids.shape[1]
            return self.model(input_ids, cache=self.cache, use_cache=True,
                              cache_position=torch.arange(self.position))
        if self.position >= STATIC_LEN:
            raise RuntimeError(f"StaticDecode holds {STATIC_LEN} positions")
        out = self.compiled(input_ids, cache=self.cache, use_cache=True,
                            cache_position=torch.tensor([self.position]))
        self.position += 1
        return out


def compiled_decode(name: str, model: nn.Module) -> StaticDecode:
    """The :class:`StaticDecode` of configuration ``name``: fullgraph but for torch's dynamic
    int8, whose packed weights break the graph at every linear layer."""
    return StaticDecode(model, fullgraph=name != "torch int8 dynamic")


def with_torch_compile(models: dict[str, nn.Module], names: tuple[str, ...]) -> None:
    """Add ``<name> + torch.compile`` (:class:`StaticDecode`) for each of ``names`` present.
    The models share ``LlamaForCausalLM.forward``, whose compiled versions (one per model,
    guarded on it) would overflow Dynamo's default limit of 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               8 * len(models))
    for name in names:
        if name in models:
            models[name + TORCH_COMPILED] = compiled_decode(name, models[name])


def compiled_peer_ratios(models: dict[str, nn.Module], prompt: torch.Tensor, steps: int,
                         rounds: int) -> dict[str, float]:
    """Compiled over eager decode speed of each dense peer in ``models`` (:data:`COMPILED_PEERS`),
    each timed in a rotation of its own — the peer, its :class:`StaticDecode` and dense fp32
    eager (which evicts the caches as the main rotation does) — and its compiled code
    dropped afterwards (``torch._dynamo.reset()``). In one rotation with the compiled
    sparsekit models, compiled peers made those slower than their eager selves (session 42:
    50 % W8A8 7.81 against 7.58 ms a step; 7.13 against 8.27 without them); apart, each side
    is measured against its own eager model, and the main rotation's eager speeds anchor the
    comparison."""
    ratios = {}
    for name in COMPILED_PEERS:
        if name not in models:
            continue
        rotation = {"dense fp32": models["dense fp32"], name: models[name],  # (fp32: once)
                    name + TORCH_COMPILED: compiled_decode(name, models[name])}
        try:
            tok = decode_tokens_per_s(rotation, prompt, steps, rounds)
            ratios[name] = tok[name + TORCH_COMPILED] / tok[name]
        except Exception as err:  # noqa: BLE001 - torch.compile's failures are many
            print(f"  {name + TORCH_COMPILED}: not compiled ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:160]}); its eager row stands", flush=True)
        del rotation
        torch._dynamo.reset()
    return ratios


def decode_profile(models: dict[str, nn.Module], prompt: torch.Tensor, steps: int,
                   step_ms: dict[str, float]) -> dict[str, dict[str, float]]:
    """Where a decode step of each model goes, in ms per step: ``matmul`` (the self time of
    the weight-matmul ops, :data:`MATMUL_OPS`), ``attention`` (scaled dot-product attention),
    ``other ops`` (every other op: norms, RoPE, the KV cache's ``cat``, casts, allocation)
    under ``torch.profiler``, and ``python`` = the median of as many unprofiled steps run
    the same way just before (``warm_step_ms``) minus all of those: the Python and framework
    time between ops. ``step_ms`` is the model's step in the main rotation, where the other
    configurations' weights evicted its own: its excess over ``warm_step_ms`` is those cache
    misses (session 46: subtracting the warm ops from it put 3.7 ms of them under Python)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    with torch.no_grad():
        for name, model in models.items():
            def step(result: object, model: nn.Module = model) -> object:  # one greedy token
                return model(result.logits[:, -1:].argmax(-1), cache=result.cache,
                             use_cache=True)

            result = model(prompt, use_cache=True)
            for _ in range(2):  # warm: first-call allocations, torch.compile's recompiles
                result = step(result)
            warm = []
            for _ in range(steps):  # timed as profiled: the argmax, then the model
                start = time.perf_counter()
                result = step(result)
                warm.append(time.perf_counter() - start)
            warm_ms = statistics.median(warm) * 1e3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    result = step(result)
            split = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
            for event in prof.key_averages():
                ms = event.self_cpu_time_total / 1e3 / steps
                if event.key.startswith(MATMUL_OPS):
                    split["matmul"] += ms
                elif "scaled_dot_product" in event.key:
                    split["attention"] += ms
                elif "::" in event.key:  # ops, not the profiler's own or Python ranges
                    split["other ops"] += ms
            split["python"] = max(0.0, warm_ms - sum(split.values()))
            out[name] = {"step_ms": step_ms[name], "warm_step_ms": warm_ms, **split}
            del result
    return out


# -- targets ------------------------------------------------------------------------------


def times(ratio: float, target: float) -> str:
    """``ratio`` as ``"1.23x"``, with as many more decimals as it takes not to round it
    across ``target`` (a 1.49994x miss printed as "1.50x (target 1.5x)" reads as a pass)."""
    digits = 2
    while digits < 8 and (round(ratio, digits) >= target) != (ratio >= target):
        digits += 1
    return f"{ratio:.{digits}f}x"


def checks(rows: dict[str, dict], skipped: dict[str, str]) -> list[tuple[str, bool]]:
    """The issue's targets as ``(claim, met)``; a skipped configuration is a miss, one left
    out by ``--configs`` has no check."""
    def tok(name: str) -> float | None:
        return rows[name]["decode_tok_s"] if name in rows else None

    out: list[tuple[str, bool]] = []

    def ratio(claim: str, name: str, base: float | None, target: float) -> None:
        if name not in rows and name not in skipped:  # not selected
            return
        value = tok(name)
        if value is None or base is None:
            missing = name if value is None else "its baseline"
            out.append((f"{claim}: {missing} was skipped", False))
            return
        r = value / base
        out.append((f"{claim}: {times(r, target)} (target {target}x)", r >= target))

    fp32, bf16 = tok("dense fp32"), tok("dense bf16")
    peers = [tok(p) for p in PEERS if tok(p) is not None]
    best_peer = max(peers) if peers else None
    targets = [  # (claim, configuration, baseline, target)
        ("50% bf16 vs dense bf16", config_name("50%", "bf16", False), bf16, 1.5),
        ("2:4 bf16 vs dense bf16", config_name("2:4", "bf16", False), bf16, 1.4),
        ("50% int8 vs best torch int8 peer", config_name("50%", "int8", False), best_peer, 1.5),
        ("50% int8 vs dense fp32", config_name("50%", "int8", False), fp32, 3.0),
        ("70% int8 vs dense fp32", config_name("70%", "int8", False), fp32, 5.0),
    ]
    for claim, name, base, target in targets:
        ratio(claim, name, base, target)
    w8a8 = w8a8_targets(fp32, best_peer)
    for claim, name, base, target in w8a8:
        ratio(claim, name, base, target)
    for name in dict.fromkeys(t[1] for t in [*targets, *w8a8]):
        ratio(f"TEAL 50% on top of {name.removeprefix('sparsekit ')}", name + " + TEAL 50%",
              tok(name), 1.3)
    if any(name.endswith(TORCH_COMPILED) for name in rows):  # --torch-compile: both sides
        compiled = [tok(p + TORCH_COMPILED) for p in PEERS]
        best_any = max((v for v in [*peers, *compiled] if v is not None), default=None)
        for label, dtype in (("int8", "int8"), ("W8A8", W8A8)):
            ratio(f"50% {label}{TORCH_COMPILED} vs best torch int8 peer (eager or compiled)",
                  config_name("50%", dtype, False) + TORCH_COMPILED, best_any, 1.5)
        fp32_any = max((v for v in (fp32, tok("dense fp32" + TORCH_COMPILED)) if v is not None),
                       default=None)
        ratio(f"70% W8A8{TORCH_COMPILED} vs dense fp32 (eager or compiled)",
              config_name("70%", W8A8, False) + TORCH_COMPILED, fp32_any, 5.0)
    for name, row in rows.items():
        dense = prefill_dense(name, rows)
        if dense is not None:
            r = row["prefill_vs_dense"]
            out.append((f"prefill {name.removeprefix('sparsekit ')} vs {dense}: "
                        f"{times(r, 0.95)} (target >= 0.95x)", r >= 0.95))
    out += [(f"{name} was skipped ({why})", False) for name, why in skipped.items()]
    return out


# -- one model ----------------------------------------------------------------------------


def decode_text() -> torch.Tensor:
    """Prompt and calibration tokens for the speed rows: tinyshakespeare's bytes, or seeded
    random bytes where the data is missing (said on stdout; speed does not depend on them,
    the random weights make no text meaningful anyway)."""
    try:
        return shakespeare()
    except FileNotFoundError as err:
        print(f"{err}; prompting with seeded random bytes instead", flush=True)
        return torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))


def run_model(name: str, shape: tuple[int, int, int, int], quick: bool, *,
              torch_compile: bool = False, profile: bool = False,
              configs: tuple[str, ...] = ()) -> dict:
    hidden, intermediate, layers, heads = shape
    model = build(*shape)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: hidden {hidden}, intermediate {intermediate}, {layers} layer(s), "
          f"{params / 1e6:.0f}M parameters", flush=True)
    text = decode_text()
    prefill = 128 if quick else 512
    prompt = text[:prefill][None]
    calibration = text[10_000:10_000 + 4 * 128].reshape(4, 128)
    skipped: dict[str, str] = {}
    models, prepare_s = configurations(model, prompt, calibration, skipped,
                                       functools.partial(selected, configs))
    steps, rounds = (16, 2) if quick else (32, 4)
    peer_ratios = {}
    if torch_compile:
        print("  timing the compiled peers, each in a rotation of its own", flush=True)
        peer_ratios = compiled_peer_ratios(models, prompt[:, :16], steps, rounds)
        with_torch_compile(models, COMPILED)
    print(f"  timing {len(models)} configurations", flush=True)
    decode = decode_tokens_per_s(models, prompt[:, :16], steps=steps, rounds=rounds)
    prefill_ms = prefill_rounds(models, prompt, budget_s=45 if quick else 150)
    prefill_rate = {name: prefill / (min(t) / 1e3) for name, t in prefill_ms.items()}
    rows = {}
    for config, model_ in models.items():
        dense = prefill_dense(config, models)
        rows[config] = {
            "decode_tok_s": decode[config], "prefill_tok_s": prefill_rate[config],
            # the median over rounds of the dense model's time over this one's in the round
            "prefill_vs_dense": (None if dense is None
                                 else median_ratios(prefill_ms, dense)[config]),
            "decode_vs_dense_fp32": decode[config] / decode["dense fp32"],
            "decode_vs_dense_bf16": (decode[config] / decode["dense bf16"]
                                     if "dense bf16" in decode else None),
            "prepare_s": prepare_s.get(config, 0.0),
            "formats": formats_of(model_),
        }
        print(f"  {config:34s} {decode[config]:8.2f} tok/s "
              f"({rows[config]['decode_vs_dense_fp32']:.2f}x fp32)  prefill "
              f"{prefill_rate[config]:8.1f} tok/s", flush=True)
    for peer, ratio in peer_ratios.items():  # timed apart: its eager speed here times that
        row = dict(rows[peer], formats={}, own_rotation_ratio=ratio)
        row["decode_tok_s"] = decode[peer] * ratio
        row["decode_vs_dense_fp32"] = row["decode_tok_s"] / decode["dense fp32"]
        row["decode_vs_dense_bf16"] = (row["decode_tok_s"] / decode["dense bf16"]
                                       if "dense bf16" in decode else None)
        rows[peer + TORCH_COMPILED] = row
        print(f"  {peer + TORCH_COMPILED:34s} {row['decode_tok_s']:8.2f} tok/s "
              f"({ratio:.2f}x its eager self, in a rotation of its own)", flush=True)
    split = {}
    if profile:
        profiled = {n: m for n, m in models.items() if n.removesuffix(TORCH_COMPILED) in PROFILED}
        step_ms = {n: 1e3 / decode[n] for n in profiled}
        floors = {FLOOR: without_linears(model)}
        if torch_compile:
            floors[FLOOR + TORCH_COMPILED] = StaticDecode(floors[FLOOR])
        step_ms |= {n: 1e3 / tok_s for n, tok_s in decode_tokens_per_s(
            floors, prompt[:, :16], steps=steps, rounds=rounds).items()}
        split = decode_profile(profiled | floors, prompt[:, :16], steps=8 if quick else 16,
                               step_ms=step_ms)
    return {"model": name, "hidden": hidden, "intermediate": intermediate, "layers": layers,
            "parameters": params, "prefill_tokens": prefill, "rows": rows,
            "profile": split, "skipped": skipped, "checks": checks(rows, skipped)}


def selected(configs: tuple[str, ...], name: str) -> bool:
    """Whether configuration ``name`` contains one of ``configs`` (all when there are none)."""
    return not configs or any(c in name for c in configs)


def formats_of(model: nn.Module) -> dict[str, int]:
    """How many of a compiled model's layers took each format (empty if not compiled): for
    few rows (decoding), ``prompt <format>`` where a second one serves many rows, ``fused``
    where the layer runs in a stacked group; layers with activation thresholds count as
    ``activation-sparse``."""
    if isinstance(model, StaticDecode):
        model = model.model
    counts: dict[str, int] = {}
    for choice in getattr(model, "sparsekit_choices", {}).values():
        large = choice.get("format_large")
        fused = (choice.get("fused") or {}).get("format") == "fused"
        for fmt in (str(choice.get("format")), large and f"prompt {large}", fused and "fused"):
            if fmt:
                counts[fmt] = counts.get(fmt, 0) + 1
    act = sum(isinstance(m, ActivationSparseLinear) for m in model.modules())
    return {**counts, "activation-sparse": act} if act else counts


# -- accuracy of the int8 grid --------------------------------------------------------------


def perplexity_rows(quick: bool) -> dict:
    """Validation perplexity of the trained benchmark LLaMA pruned in fp32 and pruned onto
    the int8 grid, per method and pattern, with the ≤ 1 % check of each."""
    data = shakespeare()
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    steps = 40 if quick else 400
    model = train_llama(train, steps=steps)
    val = val[: 8 * SEQLEN if quick else EVAL_TOKENS]
    nsamples = 16 if quick else 64
    dense = llm.perplexity(model, val, seqlen=SEQLEN)
    rows, results = [], []
    for pattern, sparsity in PPL_SETTINGS[:1] if quick else PPL_SETTINGS:
        for method in METHODS:
            ppl = {}
            for quantize, group in ((None, None), ("int8", None), ("int8", GROUP)):
                pruned = copy.deepcopy(model)
                llm.prune(pruned, train, method=method, sparsity=sparsity, pattern=pattern,
                          nsamples=nsamples, seqlen=SEQLEN, quantize=quantize,
                          group_size=group)
                ppl[quantize, group] = llm.perplexity(pruned, val, seqlen=SEQLEN)
            fp32, int8, grouped = ppl[None, None], ppl["int8", None], ppl["int8", GROUP]
            added, added_grouped = int8 / fp32 - 1, grouped / fp32 - 1
            rows.append({"method": method, "pattern": pattern, "sparsity": sparsity,
                         "ppl_fp32": fp32, "ppl_int8": int8, "added": added,
                         "ppl_int8_grouped": grouped, "added_grouped": added_grouped})
            results.append((f"int8 on {method} {pattern} {sparsity:.0%}: {added:+.2%} "
                            "perplexity over sparse fp32 (target <= +1%)", added <= 0.01))
            print(f"  {method:9s} {pattern:12s} ppl fp32 {fp32:.3f}  int8 {int8:.3f} "
                  f"({added:+.2%})  int8 g{GROUP} {grouped:.3f} ({added_grouped:+.2%})",
                  flush=True)
    setup = (f"llm_pruning.train_llama, {steps} steps (4 x 256 byte-level LLaMA); dense "
             f"perplexity {dense:.3f} on {val.numel():,} validation bytes; {nsamples} "
             f"calibration windows of {SEQLEN} bytes")
    return {"setup": setup, "dense": dense, "rows": rows, "checks": results}


# -- report -------------------------------------------------------------------------------


def cpu_line(machine: dict[str, str]) -> str:
    """The machine as the printout and the report name it: CPU model, the kernels' ISA,
    threads, and what ``--isa`` limited."""
    return (f"CPU: {machine['model']}; ISA: {machine['isa']}; {machine['threads']} threads"
            + (f"; limited to {machine['limited to']}" if "limited to" in machine else ""))


def markdown(machine: dict[str, str], results: list[dict], ppl: dict | None, note: str,
             quick: bool) -> str:
    lines = [f"# Batch-1 decode of a pruned LLaMA{' (quick run)' if quick else ''}", "",
             cpu_line(machine) + ". " + note, ""]
    for res in results:
        lines += [f"## {res['model']}: hidden {res['hidden']}, intermediate "
                  f"{res['intermediate']}, {res['layers']} layer(s), "
                  f"{res['parameters'] / 1e6:.0f}M parameters", "",
                  "| configuration | decode tok/s | vs dense fp32 | vs dense bf16 | "
                  f"prefill ({res['prefill_tokens']} tokens) tok/s | formats |",
                  "| :--- | ---: | ---: | ---: | ---: | :--- |"]
        for config, r in res["rows"].items():
            vs_bf16 = "" if r["decode_vs_dense_bf16"] is None else \
                f"{r['decode_vs_dense_bf16']:.2f}x"
            formats = ", ".join(f"{f} {n}" for f, n in sorted(r["formats"].items()))
            lines.append(f"| {config} | {r['decode_tok_s']:.2f} | "
                         f"{r['decode_vs_dense_fp32']:.2f}x | {vs_bf16} | "
                         f"{r['prefill_tok_s']:.1f} | {formats} |")
        for config, why in res["skipped"].items():
            lines.append(f"| {config} | skipped: {why} | | | | |")
        if res.get("profile"):
            lines += ["", "Where one decode step goes (ms per step; in turns: the median step "
                      "in the rotation above, the other configurations' weights having evicted "
                      "its own; alone: the median of the same model's steps run back to back; "
                      "matmul, attention and other ops: self time under torch.profiler, run "
                      "back to back; Python & framework: the step alone minus those; "
                      f"{FLOOR}: the dense fp32 model with every linear layer free, timed on "
                      "its own):", "",
                      "| configuration | step in turns | step alone | matmul | attention | "
                      "other ops | Python & framework |",
                      "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            lines += [f"| {config} | {p['step_ms']:.2f} | {p['warm_step_ms']:.2f} | "
                      f"{p['matmul']:.2f} | {p['attention']:.2f} | {p['other ops']:.2f} | "
                      f"{p['python']:.2f} |" for config, p in res["profile"].items()]
        lines += ["", "Targets:", ""]
        lines += checklist(res["checks"])
        lines.append("")
    if ppl is not None:
        lines += ["## Perplexity: int8 over sparse fp32", "", ppl["setup"] + ".", "",
                  "| method | pattern | sparsity | fp32 | int8 | added | "
                  f"int8 g{GROUP} | added |",
                  "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['method']} | {r['pattern']} | {r['sparsity']:.0%} | "
                  f"{r['ppl_fp32']:.3f} | {r['ppl_int8']:.3f} | {r['added']:+.2%} | "
                  f"{r['ppl_int8_grouped']:.3f} | {r['added_grouped']:+.2%} |"
                  for r in ppl["rows"]]
        lines += ["", "Targets:", ""]
        lines += checklist(ppl["checks"])
        lines.append("")
    return "\n".join(lines)


def shape_arg(text: str) -> tuple[int, int, int, int]:
    """``"HIDDENxINTERMEDIATExLAYERS"`` as a model shape (128-wide attention heads, as LLaMA)."""
    try:
        hidden, intermediate, layers = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIDDENxINTERMEDIATExLAYERS such as "
                                         f"128x256x1, got {text!r}") from None
    if min(hidden, intermediate, layers) < 1 or hidden % 128:
        raise argparse.ArgumentTypeError(f"sizes must be positive and hidden a multiple of 128, "
                                         f"got {text!r}")
    return hidden, intermediate, layers, hidden // 128


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one smaller model (hidden 1024, 2 layers), shorter timing")
    parser.add_argument("--no-check", action="store_true", help="do not fail on missed targets")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--suffix", type=suffix_arg, default="", metavar="TEXT",
                        help="appended to the results' file names, before --isa's: e.g. "
                        "2048x4_zen4_s49_bf16 writes llm_decode_2048x4_zen4_s49_bf16.{json,md}, "
                        "so that a run on another CPU does not overwrite a committed one")
    parser.add_argument("--shape", type=shape_arg, metavar="HIDDENxINTERMEDIATExLAYERS",
                        help="one model of this shape instead (a smoke test: --quick "
                        "--shape 128x256x1)")
    parser.add_argument("--only", choices=("decode", "perplexity"),
                        help="run one part (default: both)")
    profiled = ", ".join(PROFILED).replace("%", "%%")  # argparse formats help with %
    parser.add_argument("--torch-compile", action="store_true",
                        help=f"also time {', '.join(COMPILED).replace('%', '%%')} decoding "
                        "under torch.compile "
                        "with a static KV cache, and the dense peers so compiled, each in a "
                        "rotation of its own")
    parser.add_argument("--profile", action="store_true",
                        help=f"split a decode step of {profiled} into matmul, attention, other "
                        "ops and Python time (torch.profiler), beside the step of the model "
                        "without linear layers")
    parser.add_argument("--configs", nargs="+", default=(), metavar="TEXT",
                        help="build only the sparsekit configurations whose name contains one "
                        "of these (e.g. '50%% int8' 'TEAL'); the dense ones and the peers always "
                        "run, and targets of configurations left out are not checked")
    parser.add_argument("--isa", metavar="ISA",
                        help="'avx2': run as on an AVX2-only CPU, sparsekit's kernels and the "
                        "peers' libraries alike (the script runs itself again with "
                        + AVX2_SWITCHES + ")")
    args = parser.parse_args()
    if args.isa is not None and (args.isa != "avx2" or "avx2" not in kernels.isas()):
        parser.error(f"--isa must be avx2 on a CPU whose kernels run it (this one runs "
                     f"{', '.join(kernels.isas()) or 'no kernels'}), got {args.isa}")
    if args.isa and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ONLY})
    with kernels.use_isa(args.isa) if args.isa else contextlib.nullcontext():
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The benchmark as ``args`` (of :func:`main`) ask; returns the exit status."""
    machine = describe()
    if args.isa:
        machine["limited to"] = (f"{args.isa} (sparsekit kernels on {kernels.isa()}; PyTorch "
                                 f"ATen {torch.backends.cpu.get_cpu_capability()}; "
                                 + AVX2_SWITCHES + ")")
    note = (f"torch {torch.__version__}; sparsekit kernels "
            f"{'on' if kernels.available() else 'off (PyTorch fallback)'}; random weights "
            "(Hugging Face initialisation), magnitude pruning; decode tokens/s is one over the "
            "median step of greedy decoding with a KV cache after a 16-token prompt, the "
            "configurations taking turns token by token in one run. Absolute speeds depend on "
            "how busy the machine was; the ratios are measured side by side."
            + (" Only the sparsekit configurations containing "
               + " or ".join(repr(c) for c in args.configs) + " (--configs)."
               if args.configs else "")
            + (f" '{TORCH_COMPILED.strip(' +')}' rows decode under torch.compile with a static "
               f"KV cache of {STATIC_LEN} positions (their prompt runs eager); the compiled "
               "dense peers were each timed in a rotation of their own (beside their eager "
               "selves and dense fp32) and are shown at their eager speed here times that "
               "ratio: compiled peers in the main rotation slowed the compiled sparsekit "
               "models." if args.torch_compile else ""))
    print(cpu_line(machine), flush=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shape:
        shapes = {"llama-{}x{}x{}".format(*args.shape[:3]): args.shape}
    results = ([] if args.only == "perplexity" else
               [run_model(name, shape, args.quick, torch_compile=args.torch_compile,
                          profile=args.profile, configs=tuple(args.configs))
                for name, shape in shapes.items()])
    ppl = None
    if args.only != "decode":
        print("perplexity: int8 over sparse fp32", flush=True)
        ppl = perplexity_rows(args.quick)
    out_stem = stem("llm_decode_quick" if args.quick else "llm_decode", args.suffix, args.isa or "")
    report = markdown(machine, results, ppl, note, args.quick)
    print(report)
    verdicts = [(f"{r['model']}: {claim}", ok) for r in results for claim, ok in r["checks"]]
    verdicts += (ppl or {"checks": []})["checks"]
    return conclude(verdicts, {
        args.out / f"{out_stem}.json": {
            "cpu": machine, "note": note, "quick": args.quick,
            "models": [{**r, "checks": [{"claim": c, "met": ok} for c, ok in r["checks"]]}
                       for r in results],
            "perplexity": ppl and {**ppl, "checks": [{"claim": c, "met": ok}
                                                     for c, ok in ppl["checks"]]}},
        args.out / f"{out_stem}.md": report}, no_check=args.no_check)


if __name__ == "__main__":
    raise SystemExit(main())
