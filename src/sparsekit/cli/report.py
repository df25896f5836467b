"""``sparsekit report CKPT``: per-layer sparsity and FLOPs of a checkpoint.

``CKPT`` is a sparsekit (or plain safetensors) file, or a directory written by
:func:`sparsekit.save_pretrained` (e.g. by ``llm-prune --out``), measured on random token
ids (``--tokens BATCH,SEQ``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

import sparsekit
from sparsekit.cli._errors import UsageError
from sparsekit.cli._model import (
    add_checkpoint_arguments,
    example_inputs,
    load_checkpoint,
    token_inputs,
)
from sparsekit.cli._output import console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-layer sparsity and FLOPs of a checkpoint")
    add_checkpoint_arguments(p, "a sparsekit (or plain safetensors) checkpoint, or a "
                             "sparsekit.save_pretrained directory")
    p.add_argument("--tokens", help="BATCH,SEQ random token ids in the model's vocabulary as "
                   "the example input (transformers models; default for a directory: 1,128, or "
                   "shorter to fit the model's context)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # one output and one example input: the flag that would be ignored is refused (--json
    # printed JSON under --markdown; --input-shape went unused beside --tokens or a directory)
    if args.json and args.markdown:
        raise UsageError("--json and --markdown each choose the output; pass one")
    if args.tokens is not None and args.input_shape is not None:
        raise UsageError("--tokens and --input-shape each give the example input; pass one "
                         "(--tokens for a transformers model)")
    # "" is no directory (Path("") is the current one): load_checkpoint refuses it
    if args.ckpt.strip() and Path(args.ckpt).is_dir():
        if not (Path(args.ckpt) / "config.json").is_file():
            raise UsageError(f"checkpoint {args.ckpt!r} is not a regular file, nor a "
                             "save_pretrained directory (it has no config.json)")
        if args.model is not None:
            raise UsageError("--model does not apply to a save_pretrained directory (its "
                             "config.json names the architecture)")
        if args.input_shape is not None:
            raise UsageError("--input-shape does not apply to a save_pretrained directory "
                             "(its model reads token ids): use --tokens BATCH,SEQ")
        model = sparsekit.from_pretrained(args.ckpt)
        masks = getattr(model, "sparsekit_masks", None)
        # `or` took --tokens "" for the default: refused as for a file (comma-separated ints)
        x = token_inputs(_default_tokens(model) if args.tokens is None else args.tokens, model)
    else:
        model, masks = load_checkpoint(args.ckpt, args.model)
        x = (token_inputs(args.tokens, model) if args.tokens is not None
             else example_inputs(args.input_shape, model))
    rep = sparsekit.report(model, x, masks=masks)
    show(rep, markdown=args.markdown, as_json=args.json)
    return 0


def _default_tokens(model: nn.Module) -> str:
    """``--tokens`` when not given: ``1,128``, or one sequence as long as the model's
    context where that is shorter (a GPT-2 of 64 positions failed the default with
    "--tokens '1,128' does not fit the model", a flag the user had not given)."""
    from sparsekit.llm.prune import max_positions

    return f"1,{min(128, max_positions(model) or 128)}"


def show(rep: sparsekit.Report, *, markdown: bool = False, as_json: bool = False) -> None:
    """Print ``rep`` as JSON, as Markdown or as a rich table (120 columns when not a
    terminal)."""
    if as_json:
        print(json.dumps(rep.to_dict(), indent=2, default=str))
    elif markdown:
        print(rep.to_markdown())
    else:
        console(120).print(rep.to_rich())


def pruned_sparsity(masks: sparsekit.MaskSet) -> str:
    """``"sparsity X% of the N pruned tensors"``: the zeros of the weights ``masks`` prune,
    as the weights hold them. ``masks.sparsity()`` counted what the masks drop: a kept
    weight that is 0 (a row pattern over an unstructured prune, int8 rounding) was not
    counted, and beside ``--exclude`` the line read as the model's sparsity."""
    weights = list(masks.params.values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    return (f"sparsity {zeros / max(total, 1):.2%} of the {len(weights)} pruned "
            f"tensor{'s' if len(weights) != 1 else ''}")
