"""``sparsekit report CKPT``: per-layer sparsity and FLOPs of a checkpoint."""

from __future__ import annotations

import argparse
import sys

import torch
from rich.console import Console

import sparsekit
from sparsekit.cli._model import model_for


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="per-layer sparsity and FLOPs of a checkpoint")
    p.add_argument("ckpt", help="a sparsekit (or plain safetensors) checkpoint")
    p.add_argument("--model", help="registered model name or module:factory (default: from CKPT)")
    p.add_argument("--input-shape", default="1,1,28,28",
                   help="example input shape for FLOPs (default: 1,1,28,28)")
    p.add_argument("--markdown", action="store_true", help="print Markdown instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model = model_for(args.ckpt, args.model)
    masks = sparsekit.load(model, args.ckpt)
    rep = sparsekit.report(model, example_inputs(args.input_shape), masks=masks)
    show(rep, markdown=args.markdown)
    return 0


def example_inputs(shape: str) -> torch.Tensor:
    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        raise ValueError(
            f"--input-shape must be comma-separated integers like 1,1,28,28, got {shape!r}"
        ) from None
    return torch.zeros(dims)


def show(rep: sparsekit.Report, *, markdown: bool = False) -> None:
    if markdown:
        print(rep.to_markdown())
    else:
        Console(width=None if sys.stdout.isatty() else 120).print(rep.to_rich())
