"""``sparsekit llm-prune MODEL_DIR --calib FILE --out OUT_DIR``: prune a transformers model.

Every check runs before the work and the outputs are written last; ``OUT_DIR`` is never
``MODEL_DIR`` (the model may still be memory-mapped from there).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import sparsekit
from sparsekit.cli._errors import UsageError
from sparsekit.cli._output import check_output, write_output
from sparsekit.cli.report import show

EVAL_SENTENCES = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm-prune", help="prune a transformers model block by block "
                       "(magnitude, Wanda, SparseGPT)")
    p.add_argument("model_dir", help="a save_pretrained directory with model and tokenizer")
    p.add_argument("--calib", required=True, help="calibration text file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", default="wanda", help="magnitude, wanda or sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (e.g. 2:4)")
    p.add_argument("--allocation", default="uniform", help="uniform or owl")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, help="tokens per window (default: model context)")
    p.add_argument("--eval", help="text file to evaluate on (default: --calib)")
    p.add_argument("--eval-tokens", type=int, default=16384,
                   help="tokens of the evaluation text scored by perplexity")
    p.add_argument("--device", help="device to prune each block on (e.g. cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="print Markdown instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sparsekit import llm
    from sparsekit.llm.prune import check_options

    llm.METHODS.get(args.method)  # fail fast, before loading anything
    check_options(args.sparsity, args.pattern, args.allocation)
    for flag, path in (("--calib", args.calib), ("--eval", args.eval)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: no such text file {path!r}")
    out = check_output(args.out, inputs=[args.model_dir], directory=True)
    model, tokenizer, causal = _load(args.model_dir)
    text = Path(args.eval or args.calib)
    quality = _quality(model, tokenizer, causal, text, args)
    dense = None if causal else copy.deepcopy(model)
    before = quality(dense)

    with Progress(TextColumn("pruning blocks"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("blocks", total=None)
        masks = llm.prune(
            model, args.calib, tokenizer=tokenizer, method=args.method, sparsity=args.sparsity,
            pattern=args.pattern, allocation=args.allocation, nsamples=args.nsamples,
            seqlen=args.seqlen, device=args.device, seed=args.seed,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    after = quality(dense)

    example = torch.zeros(1, 8, dtype=torch.long, device=next(model.parameters()).device)
    rep = sparsekit.report(model, example, masks=masks)
    ckpt = write_output(out, lambda path: _write(path, model, tokenizer, masks))
    show(rep, markdown=args.markdown)
    metric = "perplexity" if causal else "embedding similarity to dense"
    print(f"{metric}: {before:.4f} dense -> {after:.4f} pruned "
          f"({args.method}, {args.pattern}, sparsity {masks.sparsity():.2%})")
    print(f"wrote {out}/ (save_pretrained) and {ckpt} ({ckpt.stat().st_size:,} bytes)")
    return 0


def _write(out: Path, model, tokenizer, masks: sparsekit.MaskSet) -> Path:
    """The sparsekit checkpoint first (it checks the masks), then ``save_pretrained``."""
    ckpt = sparsekit.save(model, out / "sparsekit.safetensors", masks)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return ckpt


def _load(model_dir: str):
    """Model, tokenizer and whether the model is a causal LM."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ImportError("llm-prune needs transformers: pip install 'sparsekit[llm]'") from err
    transformers.utils.logging.disable_progress_bar()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a save_pretrained directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel"))
                     for a in config.architectures or [])
        auto = AutoModelForCausalLM if causal else AutoModel
        return auto.from_pretrained(path), AutoTokenizer.from_pretrained(path), causal
    except (OSError, ValueError, KeyError, TypeError) as err:  # transformers' "cannot load"
        raise UsageError(f"{model_dir}: cannot load the model or tokenizer ({err})") from None


def _quality(model, tokenizer, causal: bool, text: Path, args: argparse.Namespace):
    """A function of the dense copy giving perplexity (causal) or embedding similarity."""
    from sparsekit import llm
    from sparsekit.llm.calibration import tokenize
    from sparsekit.llm.prune import context_length

    if causal:
        ids = tokenize(text, tokenizer, "--eval")[: args.eval_tokens]
        seqlen = min(args.seqlen or context_length(model), 512, ids.numel())
        return lambda _dense: llm.perplexity(model, ids, seqlen=seqlen)
    lines = [s.strip() for s in text.read_text(encoding="utf-8").splitlines() if s.strip()]
    sentences = lines[:EVAL_SENTENCES]
    return lambda dense: llm.embedding_similarity(model, tokenizer, sentences, dense)
