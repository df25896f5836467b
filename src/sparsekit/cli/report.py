"""``sparsekit report CKPT``: per-layer sparsity and FLOPs of a checkpoint."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

import sparsekit
from sparsekit.cli._model import add_checkpoint_arguments, example_inputs, load_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-layer sparsity and FLOPs of a checkpoint")
    add_checkpoint_arguments(p, "a sparsekit (or plain safetensors) checkpoint")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, masks = load_checkpoint(args.ckpt, args.model)
    rep = sparsekit.report(model, example_inputs(args.input_shape, model), masks=masks)
    show(rep, markdown=args.markdown)
    return 0


def show(rep: sparsekit.Report, *, markdown: bool = False) -> None:
    """Print ``rep`` as Markdown or as a rich table (120 columns when not a terminal)."""
    if markdown:
        print(rep.to_markdown())
    else:
        Console(width=None if sys.stdout.isatty() else 120).print(rep.to_rich())
