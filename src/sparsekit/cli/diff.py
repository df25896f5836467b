"""``sparsekit diff A B``: how sparse the update from checkpoint ``A`` to ``B`` is, per tensor.

``A`` and ``B`` are sparsekit (or plain safetensors) files, ``save_pretrained``
directories of sparsekit or Hugging Face; see :func:`sparsekit.diff`.
"""

from __future__ import annotations

import argparse
import json

import sparsekit
from sparsekit._checks import check_nonnegative
from sparsekit.cli._errors import UsageError
from sparsekit.cli._output import console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="per-tensor update sparsity between two checkpoints")
    p.add_argument("a", help="the checkpoint before (file or save_pretrained directory)")
    p.add_argument("b", help="the checkpoint after")
    p.add_argument("--atol", type=float, default=0.0,
                   help="an entry counts as changed when |b - a| exceeds this (default 0)")
    p.add_argument("--changed-only", action="store_true", help="list only tensors that changed")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the table as JSON")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_nonnegative("--atol", args.atol)  # sparsekit.diff's own check names "atol"
    for name, path in (("A", args.a), ("B", args.b)):
        if not path.strip():  # Path("") is ".": "directory '.' holds no weights"
            raise UsageError(f"{name} must be the path of a checkpoint file or a "
                             f"save_pretrained directory, got {path!r}")
    result = sparsekit.diff(args.a, args.b, atol=args.atol)
    shown = type(result)(result.changed()) if args.changed_only else result
    if args.json:
        print(json.dumps(shown.to_dict(), indent=2))
    elif args.markdown:
        print(shown.to_markdown())
    else:
        console(120).print(shown.to_rich())
    return 0
