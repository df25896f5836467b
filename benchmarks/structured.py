"""Structured pruning benchmark: sparsekit side by side with Torch-Pruning on a ResNet-18 for
Fashion-MNIST.

One trained ResNet-18-style network (cached under benchmarks/cache/) is cut to 50 % and 70 %
fewer MACs four ways — sparsekit ``pattern="channel:R"`` + ``shrink`` ranked by magnitude
(L2, a criterion registered here in four lines) and by first-order Taylor, and Torch-Pruning
(DepGraph) with its ``MagnitudeImportance`` (L2) and ``TaylorImportance`` — each with the
same uniform per-layer ratio search to hit the MAC budget, the same ``round_to`` and the
same fine-tuning budget (fused Adam, same batches). Reports accuracy, parameters, MACs and
batch-1 / batch-64 latency, timed interleaved with conv+BN folded (``torch.fx`` fuse, as
deployed; the same for every model). Checks, printing each MISS and exiting 1:

* every sparsekit model computes what its masked model does (before fine-tuning);
* accuracy within 0.3 points of Torch-Pruning's (or better) at the same budget and importance;
* batch-64 latency falls by at least 80 % of the MAC reduction.

With ``--llm``, also the byte-level LLaMA of ``benchmarks/llm_pruning.py`` (trained and cached
there): 20 % of FFN neurons and 20 % of heads removed by magnitude, Wanda-SP and FLAP
(``llm.prune_structured``), and 25 % of the layers by ShortGPT's block influence;
perplexity relative to dense, and whether the published order FLAP ≤ Wanda-SP holds (reported
as measured, never a MISS: small models need not follow it).

Torch-Pruning (``torch-pruning``, the ``bench`` extra) is not a sparsekit dependency: without it
the comparison rows and checks are skipped with a note. Without the Fashion-MNIST IDX files
the run falls back to scikit-learn's digits and says so (then accuracies mean little).
Writes benchmarks/results/structured.{json,md} (``--quick``: structured_quick.*).

    python benchmarks/structured.py            # ~10 min on 2 free cores (+ ~9 min once: training)
    python benchmarks/structured.py --quick    # smoke run, under a minute
    python benchmarks/structured.py --llm      # plus the LLaMA rows (first run trains ~5 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_info  # noqa: E402
from _timing import time_ms  # noqa: E402

import sparsekit  # noqa: E402
from sparsekit.data import load_image_dataset  # noqa: E402
from sparsekit.models import BasicBlock  # noqa: E402
from sparsekit.scores import CRITERIA, ScoreContext  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / "cache"
MAC_CUTS = (0.5, 0.7)  # the MAC budgets: half and 70 % of the dense model's MACs removed
METHODS = (("sparsekit", "magnitude"), ("sparsekit", "taylor"),
           ("torch-pruning", "magnitude"), ("torch-pruning", "taylor"))
ACCURACY_SLACK = 0.3  # points
LATENCY_SHARE = 0.8  # of the MAC reduction


@dataclass(frozen=True)
class Setup:
    width: int = 16
    train_steps: int = 938  # two epochs of batch 128
    finetune_steps: int = 150  # a third of an epoch of batch 128
    batch: int = 128
    lr: float = 1e-3
    score_batches: int = 4  # Taylor's calibration: 4 × 64 training images
    eval_images: int = 10000
    search_steps: int = 10
    round_to: int = 8
    timing_s: float = 3.0
    threads: int = 2
    mac_cuts: tuple[float, ...] = MAC_CUTS


QUICK = Setup(width=8, train_steps=0, finetune_steps=2, batch=32, score_batches=1,
              eval_images=256, search_steps=3, timing_s=0.1, mac_cuts=MAC_CUTS[:1])


@CRITERIA.register("magnitude_l2")
def magnitude_l2(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """w²: a channel's mean score is its squared L2 norm per weight (Torch-Pruning's p=2)."""
    return {t.name: t.param.detach().float().pow(2) for t in ctx.targets}


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


# -- training -----------------------------------------------------------------------------


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
          setup: Setup, seed: int) -> nn.Module:
    """``steps`` of fused Adam on seeded shuffles of the training set (same order for every
    model given the same seed)."""
    if steps <= 0:
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), setup.lr, fused=True)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < setup.batch:
            order = torch.randperm(len(images), generator=gen)
        idx, order = order[:setup.batch], order[setup.batch:]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
               for i in range(0, len(images), 500))
    return 100.0 * hits / len(images)


def dense_model(images: torch.Tensor, labels: torch.Tensor, setup: Setup, data: str
                ) -> nn.Module:
    """The trained dense network, from the cache when these settings were trained before."""
    torch.manual_seed(0)
    model = ResNet18(setup.width)
    steps = setup.train_steps
    path = CACHE / f"structured_resnet18_w{setup.width}_{data}_{steps}steps_b{setup.batch}.pt"
    if steps and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    train(model, images, labels, steps, setup, seed=0)
    if steps:
        print(f"trained the dense model: {steps} steps in {time.perf_counter() - start:.0f} s")
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


# -- pruning ------------------------------------------------------------------------------


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return sparsekit.report(model, x).totals["dense_flops"] // 2


def sparsekit_prune(model: nn.Module, amount: float, method: str, batches: list,
                    setup: Setup, x: torch.Tensor) -> tuple[nn.Module, float]:
    """``pattern="channel:R"`` then ``shrink``; also how far the shrunk model is from the
    masked one (max |Δ| of the logits on ``x``)."""
    masked = copy.deepcopy(model)
    masks = sparsekit.prune(masked, amount, pattern=f"channel:{setup.round_to}",
                            method="magnitude_l2" if method == "magnitude" else method,
                            data=batches if method == "taylor" else None)
    small = sparsekit.shrink(masked, masks)
    with torch.inference_mode():
        diff = float((small(x) - masked(x)).abs().max())
    return small, diff


def torch_pruning_prune(model: nn.Module, amount: float, method: str, batches: list,
                        setup: Setup, x: torch.Tensor) -> tuple[nn.Module, float]:
    """The same network pruned by Torch-Pruning with the same ratio and rounding."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    importance = tp.importance.MagnitudeImportance(p=2) if method == "magnitude" \
        else tp.importance.TaylorImportance()
    pruner = tp.pruner.MetaPruner(pruned, x[:1], importance=importance, pruning_ratio=amount,
                                  ignored_layers=[pruned.fc], round_to=setup.round_to)
    if method == "taylor":
        pruned.zero_grad()
        for images, labels in batches:
            F.cross_entropy(pruned(images), labels).backward()
    pruner.step()
    pruned.zero_grad(set_to_none=True)
    return pruned, 0.0


PRUNERS = {"sparsekit": sparsekit_prune, "torch-pruning": torch_pruning_prune}


def ratio_for(library: str, model: nn.Module, target: float, setup: Setup, x: torch.Tensor
              ) -> tuple[float, float]:
    """The channel ratio whose (magnitude-)pruned model's MACs come closest to ``target``
    of the dense ones, by bisection, and that MAC fraction. With uniform ratios the kept
    counts, and so the MACs, do not depend on the importance."""
    dense, lo, hi = macs(model, x), 0.0, 0.95
    best = (float("inf"), 0.0, 1.0)
    for _ in range(setup.search_steps):
        mid = (lo + hi) / 2
        pruned, _ = PRUNERS[library](model, mid, "magnitude", [], setup, x)
        frac = macs(pruned, x) / dense
        best = min(best, (abs(frac - target), mid, frac))
        lo, hi = (mid, hi) if frac > target else (lo, mid)
    return best[1], best[2]


def llm_rows(quick: bool) -> tuple[float, list[dict[str, object]]]:
    """Dense validation perplexity of the benchmark LLaMA and one row per structured cut."""
    from llm_pruning import EVAL_TOKENS, SEQLEN, shakespeare, train_llama

    from sparsekit import llm

    data = shakespeare()
    split = int(0.9 * data.numel())
    train_ids, val = data[:split], data[split:]
    model = train_llama(train_ids, steps=40 if quick else 400)
    val = val[: 8 * SEQLEN if quick else EVAL_TOKENS]
    calib = {"nsamples": 8 if quick else 64, "seqlen": SEQLEN}
    dense = llm.perplexity(model, val, seqlen=SEQLEN)
    rows = []
    cuts = [(m, (("ffn", 0.2), ("heads", 0.2))) for m in ("magnitude", "wanda", "flap")]
    cuts.append(("block_influence", (("layers", 0.25),)))
    for method, units in cuts:
        pruned = copy.deepcopy(model)
        for unit, amount in units:
            llm.prune_structured(pruned, train_ids, amount, unit=unit, method=method, **calib)
        ppl = llm.perplexity(pruned, val, seqlen=SEQLEN)
        rows.append({"method": method, "cut": " + ".join(f"{a:.0%} {u}" for u, a in units),
                     "params": sum(p.numel() for p in pruned.parameters()),
                     "perplexity": ppl, "relative": ppl / dense})
        print(f"  {method:15s} {rows[-1]['cut']:18s} ppl {ppl:.3f} ({ppl / dense:.3f}x dense)",
              flush=True)
    return dense, rows


# -- measuring ----------------------------------------------------------------------------


def deployed(model: nn.Module) -> nn.Module:
    """Eval copy with every conv+BN pair folded (what a deployment runs)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval())


def latency(models: dict[str, nn.Module], setup: Setup) -> dict[str, tuple[float, float]]:
    x1, x64 = torch.randn(1, 1, 28, 28), torch.randn(64, 1, 28, 28)
    fused = {k: deployed(m) for k, m in models.items()}
    with torch.inference_mode():
        t1 = time_ms({k: (lambda m=m: m(x1)) for k, m in fused.items()}, setup.timing_s)
        t64 = time_ms({k: (lambda m=m: m(x64)) for k, m in fused.items()}, setup.timing_s)
    return {k: (t1[k], t64[k]) for k in models}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny width and budgets: a smoke run")
    parser.add_argument("--no-check", action="store_true", help="report only, never exit 1")
    parser.add_argument("--llm", action="store_true", help="add the structured LLaMA rows")
    for field in ("train_steps", "finetune_steps", "eval_images", "round_to", "threads"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int,
                            help=f"override the setup's {field} (full: {getattr(Setup, field)})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else Setup()
    setup = Setup(**{**asdict(setup), **{k: v for k, v in vars(args).items()
                                         if k in asdict(setup) and v is not None}})
    torch.set_num_threads(setup.threads)
    start = time.perf_counter()

    data = load_image_dataset()
    if data.name != "fashion-mnist":
        print(f"NOTE: Fashion-MNIST not found; running on {data.name} instead (accuracies are "
              "not comparable with published numbers)")
    train_x, train_y = data.train.tensors
    test_x, test_y = (t[:setup.eval_images] for t in data.test.tensors)
    dense = dense_model(train_x, train_y, setup, data.name)
    gen = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(train_x), generator=gen)[:64 * setup.score_batches]
    batches = [(train_x[i], train_y[i]) for i in pick.split(64)]
    x = test_x[:1]
    try:
        import torch_pruning  # noqa: F401
        libraries = ("sparsekit", "torch-pruning")
    except ImportError:
        libraries = ("sparsekit",)
        print("note: torch_pruning is not installed; the Torch-Pruning side by side is skipped "
              "(pip install torch-pruning, the bench extra)")

    rows = [{"model": "dense", "library": "-", "method": "-", "budget": 0.0, "ratio": 0.0,
             "accuracy_pruned": None, "accuracy": accuracy(dense, test_x, test_y),
             "params": sum(p.numel() for p in dense.parameters()), "macs": macs(dense, x)}]
    models, checks = {"dense": dense}, []
    for cut in setup.mac_cuts:
        ratios = {lib: ratio_for(lib, dense, 1 - cut, setup, x) for lib in libraries}
        for library, method in METHODS:
            if library not in libraries:
                continue
            ratio = ratios[library][0]
            print(f"{library} {method} -{cut:.0%}: channel ratio {ratio:.3f}, fine-tuning "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            pruned, diff = PRUNERS[library](dense, ratio, method, batches, setup, x)
            name = f"{library} {method} -{cut:.0%}"
            if library == "sparsekit":
                checks.append({"claim": f"{name}: shrunk == masked (max |Δ| ≤ 1e-4)",
                               "ok": diff <= 1e-4, "value": diff})
            before = accuracy(pruned, test_x[:1000], test_y[:1000])
            train(pruned, train_x, train_y, setup.finetune_steps, setup, seed=2)
            models[name] = pruned
            rows.append({"model": name, "library": library, "method": method, "budget": cut,
                         "ratio": round(ratio, 4), "accuracy_pruned": before,
                         "accuracy": accuracy(pruned, test_x, test_y),
                         "params": sum(p.numel() for p in pruned.parameters()),
                         "macs": macs(pruned, x)})
    times = latency(models, setup)
    dense_macs = rows[0]["macs"]
    for r in rows:
        r["macs_vs_dense"] = r["macs"] / dense_macs
        r["batch1_ms"], r["batch64_ms"] = times[r["model"]]
        r["batch1_speedup"] = times["dense"][0] / r["batch1_ms"]
        r["batch64_speedup"] = times["dense"][1] / r["batch64_ms"]
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        if r["library"] != "sparsekit":
            continue
        mac_cut, time_cut = 1 - r["macs_vs_dense"], 1 - 1 / r["batch64_speedup"]
        checks.append({"claim": f"{r['model']}: batch-64 latency cut ≥ {LATENCY_SHARE:.0%} of "
                                f"the MAC cut", "ok": time_cut >= LATENCY_SHARE * mac_cut,
                       "value": round(time_cut / mac_cut, 3)})
        peer = by_name.get(r["model"].replace("sparsekit", "torch-pruning"))
        if peer is not None:
            gap = r["accuracy"] - peer["accuracy"]
            checks.append({"claim": f"{r['model']}: accuracy ≥ Torch-Pruning's − "
                                    f"{ACCURACY_SLACK} points (MACs {r['macs_vs_dense']:.3f} vs "
                                    f"{peer['macs_vs_dense']:.3f} of dense)",
                           "ok": gap >= -ACCURACY_SLACK, "value": round(gap, 2)})

    llm_dense, llm_table = llm_rows(args.quick) if args.llm else (None, [])
    elapsed = time.perf_counter() - start
    stem = "structured_quick" if args.quick else "structured"
    args.out.mkdir(parents=True, exist_ok=True)
    cpu, isa = cpu_info()
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"setup": asdict(setup), "cpu": cpu, "isa_flags": isa,
         "dataset": data.name, "seconds": round(elapsed),
         "rows": rows, "checks": checks, "llm_dense_perplexity": llm_dense,
         "llm_rows": llm_table}, indent=2))
    lines = [f"CPU: {cpu} ({' '.join(isa) or 'no AVX2'}); torch {torch.__version__}", "",
             f"{data.name}, ResNet-18 width {setup.width} trained {setup.train_steps} steps; "
             f"fine-tuning {setup.finetune_steps} steps of {setup.batch} (fused Adam, lr "
             f"{setup.lr}); accuracy on {len(test_x)} test images; round_to {setup.round_to}; "
             f"{setup.threads} threads; latency with conv+BN folded; {elapsed:.0f} s", "",
             "| model | channel ratio | acc. pruned (1k images) | acc. fine-tuned | params | "
             "MACs | MACs vs dense | batch-1 ms | batch-64 ms | batch-1 speed-up | "
             "batch-64 speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['ratio']:.3f} | "
              f"{'-' if r['accuracy_pruned'] is None else format(r['accuracy_pruned'], '.2f')} | "
              f"{r['accuracy']:.2f} | {r['params']:,} | {r['macs']:,} | "
              f"{r['macs_vs_dense']:.3f} | {r['batch1_ms']:.3f} | {r['batch64_ms']:.2f} | "
              f"{r['batch1_speedup']:.2f}× | {r['batch64_speedup']:.2f}× |" for r in rows]
    lines += ["", *[f"- {'✓' if c['ok'] else '✗'} {c['claim']} ({c['value']})" for c in checks]]
    if llm_table:
        ppl = {r["method"]: r["perplexity"] for r in llm_table}
        lines += ["", f"Byte-level LLaMA (benchmarks/llm_pruning.py), dense perplexity "
                      f"{llm_dense:.3f}:", "", "| method | cut | params | perplexity | vs dense |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['cut']} | {r['params']:,} | {r['perplexity']:.3f} | "
                  f"{r['relative']:.3f}× |" for r in llm_table]
        lines += ["", f"FLAP ≤ Wanda-SP (the published order): "
                      f"{'holds' if ppl['flap'] <= ppl['wanda'] else 'does not hold'} "
                      f"({ppl['flap']:.3f} vs {ppl['wanda']:.3f})"]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        print(f"MISS: {c['claim']} ({c['value']})")
    return 1 if failed and not args.no_check else 0


if __name__ == "__main__":
    sys.exit(main())
