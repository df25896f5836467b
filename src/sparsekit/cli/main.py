"""Entry point: ``sparsekit {prune,report,demo,llm-prune} ...``.

User mistakes (bad values, missing files) print one readable line and exit with
status 2; only genuine bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparsekit.cli import demo, llm_prune, prune, report

COMMANDS = {"prune": prune, "report": report, "demo": demo, "llm-prune": llm_prune}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsekit",
        description="Prune, train sparse and measure PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"sparsekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
