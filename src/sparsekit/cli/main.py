"""Entry point: ``sparsekit {prune,report,demo,llm-prune,run,diff} ...``.

User mistakes print one line, ``sparsekit COMMAND: error: ...``, and exit with status 2:
a :class:`~sparsekit.cli._errors.UsageError` raised by a command, a ``ValueError`` or
``TypeError`` from the library's argument checks, and file-system or missing-package
errors. Anything else is a bug in sparsekit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

import sparsekit
from sparsekit.cli import demo, diff, llm_prune, prune, report, run
from sparsekit.cli._errors import UsageError

COMMANDS = {"prune": prune, "report": report, "demo": demo, "llm-prune": llm_prune, "run": run,
            "diff": diff}
USER_ERRORS = (UsageError, ValueError, TypeError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsekit",
        description="Prune, train sparse and measure PyTorch models.",
    )
    parser.add_argument("--version", action="version",
                        version=f"sparsekit {sparsekit.__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _printable_stdout():
            return args.run(args) or 0
    except USER_ERRORS as err:
        print(f"sparsekit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def _printable_stdout() -> Iterator[None]:
    """Standard output that escapes what its encoding cannot write, while a command runs.

    A file name that is not valid UTF-8 (``--out $'\\xff.safetensors'``) is a string with
    surrogates; on a UTF-8 terminal outside Python's UTF-8 mode, printing ``wrote <name>``
    raised ``UnicodeEncodeError`` after the file was written, and the command exited 2.
    Standard error escapes such characters already.
    """
    stream = sys.stdout
    errors = getattr(stream, "errors", None)
    if errors != "strict" or not callable(getattr(stream, "reconfigure", None)):
        yield
        return
    stream.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        stream.reconfigure(errors=errors)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
