"""``sparsekit llm-prune MODEL_DIR --calib FILE --out OUT_DIR``: prune a transformers model.

Every check runs before the work and the outputs are written last; ``OUT_DIR`` is never
``MODEL_DIR`` (the model may still be memory-mapped from there), nor inside it, nor holding
it or the text files. The output is built in a temporary directory beside ``OUT_DIR`` and
put in place only when complete (:func:`sparsekit.cli._output.write_directory`), so a run
that fails leaves no output, and an existing ``OUT_DIR`` as it was. ``OUT_DIR`` is one copy of
the model, written by :func:`sparsekit.save_pretrained` (pruned layers compressed; load it
with :func:`sparsekit.from_pretrained`), with the tokenizer and, when ``MODEL_DIR`` is a
sentence-transformers model, its module files (``modules.json``, the pooling and
normalisation folders, ``sentence_bert_config.json``, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import sparsekit
from sparsekit._checks import check_seed, check_sparsity
from sparsekit.blocks import find_blocks, home_device
from sparsekit.cli._errors import UsageError
from sparsekit.cli._output import check_output, write_directory
from sparsekit.cli.report import pruned_sparsity, show
from sparsekit.patterns import Pattern
from sparsekit.pretrained import check_no_transformers_weights

EVAL_SENTENCES = 64
# the files a sentence-transformers model adds to its transformers directory
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json",
                               "config_sentence_transformers.json")


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
    p.add_argument("--quantize", choices=["int8"],
                   help="also round the kept weights to int8 (per output channel; SparseGPT "
                   "compensates the rounding error)")
    p.add_argument("--group-size", type=int,
                   help="with --quantize: one int8 scale per row and group of this many "
                   "inputs (e.g. 128; must divide every pruned layer's inputs)")
    p.add_argument("--dense-dtype", choices=["bf16"],
                   help="store the tensors that stay dense (embeddings, norms) in this dtype")
    p.add_argument("--device", help="device to prune each block on (e.g. cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", action="store_true", help="print Markdown instead of a table")
    p.set_defaults(run=run)


def _grid(args: argparse.Namespace) -> str:
    """The int8 grid for the summary line: ``", int8"`` or ``", int8 g128"``."""
    if args.quantize is None:
        return ""
    return f", int8{'' if args.group_size is None else f' g{args.group_size}'}"


def run(args: argparse.Namespace) -> int:
    from sparsekit import llm
    from sparsekit.llm.prune import _check_device, check_options, check_seqlen

    if not args.model_dir.strip():  # Path("") is the current directory, loaded as the model
        raise UsageError(f"MODEL_DIR must be a save_pretrained directory, got "
                         f"{args.model_dir!r}")
    if args.method not in llm.METHODS:  # fail fast, before loading anything
        raise UsageError(f"--method: unknown method {args.method!r}; accepted: "
                         f"{', '.join(llm.METHODS.names())}")
    check_sparsity(args.sparsity, "--sparsity")  # check_options names no flag: "sparsity …"
    try:  # its messages name the parameters ("sparsity 0.5 exceeds …"), not the flags
        pattern = check_options(args.sparsity, args.pattern, args.allocation)
    except ValueError as err:
        raise UsageError(f"--sparsity {args.sparsity:g} --pattern {args.pattern} --allocation "
                         f"{args.allocation}: {err}") from None
    # checked by llm.prune too, but only after the model was loaded and the dense model
    # evaluated: minutes of work before a one-line mistake was named
    check_seed("--seed", args.seed)
    if args.nsamples < 1:
        raise UsageError(f"--nsamples must be an int ≥ 1 (calibration windows), got "
                         f"{args.nsamples}")
    if args.seqlen is not None and args.seqlen < 2:  # 1 passed, then the evaluation refused it
        raise UsageError(f"--seqlen must be an int ≥ 2 (tokens per window; perplexity scores "
                         f"each token after the first), got {args.seqlen}")
    if args.group_size is not None and (args.quantize is None or args.group_size < 1):
        raise UsageError(f"--group-size must be an int ≥ 1 given with --quantize int8 (one "
                         f"int8 scale per group of inputs), got {args.group_size}"
                         f"{'' if args.quantize else ' without --quantize'}")
    if args.eval_tokens < 2:
        raise UsageError(f"--eval-tokens must be an int ≥ 2 (perplexity scores each token "
                         f"after the first), got {args.eval_tokens}")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device must be a torch device such as cpu or cuda:0, got "
                             f"{args.device!r}") from None
        # one this machine lacks (cuda:7, or meta, which holds no values) was refused only by
        # llm.prune, after the model was loaded and the dense model evaluated
        try:
            _check_device(args.device)
        except ValueError as err:
            raise UsageError(f"--device: {err}") from None
    for flag, path in (("--calib", args.calib), ("--eval", args.eval)):
        if path is not None and not path.strip():  # Path("") is ".": "… is a directory"
            raise UsageError(f"{flag} must be the path of a text file, got {path!r}")
        if path is not None and not Path(path).is_file():  # a directory was "no such file"
            what = "is a directory" if Path(path).is_dir() else "does not exist"
            raise FileNotFoundError(f"{flag}: the text file {path!r} {what}")
    out = check_output(args.out, inputs=[args.model_dir, args.calib, args.eval],
                       directory=True)
    # the output is merged into an existing directory: its old weights were kept beside
    # the new config (and loaded by a concrete transformers class)
    check_no_transformers_weights(out, f"--out: {str(out)!r}")
    extra = sentence_transformers_files(Path(args.model_dir))
    model, tokenizer, causal = _load(args.model_dir)
    # before the evaluation, which caps its windows at 512 tokens: past the model's context
    # a --seqlen of 1000 was refused as "seqlen 512 exceeds the model's context"
    try:
        seqlen = check_seqlen(model, args.seqlen, minimum=2)
    except ValueError as err:  # named "seqlen", not the flag
        raise UsageError(f"--seqlen: {err}") from None
    _check_layers(model, pattern, args)
    calibration = _calibration(args, tokenizer, seqlen)
    text = Path(args.eval or args.calib)
    quality = _quality(model, tokenizer, causal, text, args)
    dense = None if causal else copy.deepcopy(model)
    before = quality(dense)

    with Progress(TextColumn("pruning blocks"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("blocks", total=None)
        masks = llm.prune(
            model, calibration, tokenizer=tokenizer, method=args.method, sparsity=args.sparsity,
            pattern=args.pattern, allocation=args.allocation, nsamples=args.nsamples,
            seqlen=args.seqlen, device=args.device, seed=args.seed, quantize=args.quantize,
            group_size=args.group_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    after = quality(dense)

    example = torch.zeros(1, 8, dtype=torch.long, device=home_device(model))
    rep = sparsekit.report(model, example, masks=masks)
    write_directory(out, lambda path: _write(path, model, tokenizer, masks, extra, args))
    show(rep, markdown=args.markdown)
    metric = "perplexity" if causal else "embedding similarity to dense"
    print(f"{metric}: {before:.4f} dense -> {after:.4f} pruned "
          f"({args.method}, {args.pattern}{_grid(args)}, "
          f"{pruned_sparsity(masks)})"
          # measured on the model in memory: the bf16 copy written differs by its rounding
          + (f"; measured before --dense-dtype {args.dense_dtype} rounded the dense tensors"
             if args.dense_dtype else ""))
    before_size, after_size = directory_size(Path(args.model_dir)), directory_size(out)
    print(f"wrote {out}/ (sparsekit.save_pretrained; load with sparsekit.from_pretrained): "
          f"{after_size:,} bytes, {after_size / max(before_size, 1):.2f}x the input's "
          f"{before_size:,}")
    return 0


def _check_layers(model: torch.nn.Module, pattern: Pattern, args: argparse.Namespace) -> None:
    """Refuse a ``--pattern``, ``--quantize`` or ``--group-size`` that does not fit one of
    the layers :func:`sparsekit.llm.prune` would prune (chosen as it chooses them), before
    the dense evaluation: ``llm.prune`` checks them too, but only after that evaluation
    (minutes on a real model) had run."""
    from sparsekit.llm.blocks import DEFAULT_EXCLUDE, block_layers

    layers = [x for block in block_layers(model, find_blocks(model), None, DEFAULT_EXCLUDE)
              for x in block]
    for layer in layers:
        try:
            pattern.check(layer.shape, layer.name)
        except ValueError as err:
            raise UsageError(f"--pattern {pattern.spec!r}: {err}") from None
        if args.quantize is not None and layer.transposed:
            raise UsageError(f"--quantize {args.quantize} needs nn.Linear layers (per-output-"
                             f"channel scales); {layer.name!r} is a "
                             f"{type(layer.module).__name__}: leave out --quantize")
        group_size = args.group_size
        if group_size is not None and layer.shape[1] % group_size:
            raise UsageError(
                f"--group-size must divide the inputs of every pruned layer (one int8 scale "
                f"per group, the groups of a row equal); {layer.name!r} has {layer.shape[1]} "
                f"inputs, got {group_size} (accepted: a divisor of "
                f"{math.gcd(*(x.shape[1] for x in layers))}, or no --group-size for one "
                "scale per row)"
            )


def _calibration(args: argparse.Namespace, tokenizer, seqlen: int) -> torch.Tensor:
    """The calibration windows of ``--calib``, drawn as :func:`sparsekit.llm.prune` draws
    them from the file, before the dense evaluation: with ``--eval``, an empty ``--calib``
    was refused only after it, and so were more ``--nsamples`` than the memory holds (with
    messages naming no flag)."""
    from sparsekit.llm.calibration import calibration_tokens, tokenize

    stream = tokenize(Path(args.calib), tokenizer, "--calib")
    try:
        return calibration_tokens(stream, nsamples=args.nsamples, seqlen=seqlen,
                                  seed=args.seed)
    except ValueError as err:
        raise UsageError(f"--calib {args.calib!r} with --nsamples {args.nsamples}: "
                         f"{err}") from None


def _write(out: Path, model, tokenizer, masks: sparsekit.MaskSet, extra: list[Path],
           args: argparse.Namespace) -> None:
    """The compressed directory, then the sentence-transformers files of the input (into
    the new, empty directory ``out``: the temporary one of :func:`write_directory`)."""
    sparsekit.save_pretrained(model, out, masks, tokenizer=tokenizer,
                              dense_dtype=args.dense_dtype)
    source = Path(args.model_dir)
    for path in extra:
        target = out / path.relative_to(source)
        if path.is_dir():
            shutil.copytree(path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(path, target)


def sentence_transformers_files(model_dir: Path) -> list[Path]:
    """The files and module folders a sentence-transformers model keeps beside its
    transformers files (none for a plain transformers directory). Module folders are those
    ``modules.json`` names that exist; one outside ``model_dir`` is refused."""
    found = [model_dir / name for name in SENTENCE_TRANSFORMERS_FILES
             if (model_dir / name).is_file()]
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return found
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
        folders = {e["path"] for e in entries if isinstance(e, dict) and e.get("path")}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError,
            RecursionError) as err:
        raise UsageError(f"{modules}: not a sentence-transformers modules list ({err})") from None
    root = model_dir.resolve()
    for folder in sorted(folders):
        path = (model_dir / str(folder)).resolve()
        if root not in path.parents:
            raise UsageError(f"{modules}: module path {folder!r} is no folder inside {model_dir}")
        if path.is_dir():  # a module without settings (Normalize) may have no folder
            found.append(model_dir / str(folder))
    for folder in (f for f in found if f.is_dir()):  # copied at the end: refused now
        for file in sorted(folder.rglob("*")):
            if not file.exists():
                raise UsageError(f"{modules}: module folder {str(folder)!r} holds a broken "
                                 f"symlink {str(file)!r}")
    return found


def directory_size(path: Path) -> int:
    """Bytes of the regular files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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

    # the flag that named the file: without --eval it is --calib's ("--eval: the text is
    # empty" named a flag not given; a sentence model's empty or non-UTF-8 text named none)
    flag = "--calib" if args.eval is None else "--eval"
    if causal:
        ids = tokenize(text, tokenizer, flag)[: args.eval_tokens]
        if ids.numel() < 2:  # was "seqlen must be an int ≥ 2, got 1", for a --seqlen of 32
            raise UsageError(f"{flag}: the text file {str(text)!r} holds {ids.numel()} token(s); "
                             "perplexity needs at least 2 (it scores each token after the first)")
        seqlen = min(args.seqlen or context_length(model), 512, ids.numel())
        return lambda _dense: llm.perplexity(model, ids, seqlen=seqlen)
    try:
        content = text.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag}: the text file {str(text)!r} is not UTF-8 text ({err})") from None
    lines = [s.strip() for s in content.splitlines() if s.strip()]
    if not lines:  # was "sentences must be a non-empty list of strings", naming no flag
        raise UsageError(f"{flag}: the text is empty")
    sentences = lines[:EVAL_SENTENCES]
    return lambda dense: llm.embedding_similarity(model, tokenizer, sentences, dense)
