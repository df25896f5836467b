"""Entry point: ``sparsekit {prune,report,demo,llm-prune,run,diff} ...``.

User mistakes print one line, ``sparsekit COMMAND: error: ...``, and exit with status 2:
a :class:`~sparsekit.cli._errors.UsageError` raised by a command, a ``ValueError`` or
``TypeError`` from the library's argument checks, and file-system or missing-package
errors. Anything else is a bug in sparsekit and keeps its traceback. Ctrl-C (status 130)
and SIGTERM (status 143) stop a command after its cleanup: no temporary output is left.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

import torch

import sparsekit
from sparsekit.cli import demo, diff, llm_prune, prune, report, run
from sparsekit.cli._errors import UsageError

COMMANDS = {"prune": prune, "report": report, "demo": demo, "llm-prune": llm_prune, "run": run,
            "diff": diff}
USER_ERRORS = (UsageError, ValueError, TypeError, OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    """``argparse``'s parser, whose mistakes (a missing argument, ``--sparsity abc``) are one
    line as every other user error is, not the whole usage text before it; ``--help`` still
    shows that. The subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
        with _printable_stdout(), _terminate_cleanly():
            return args.run(args) or 0
    except BrokenPipeError:  # `sparsekit diff A B --json | head`: the reader is gone, as
        # for `cat | head` nothing is wrong (it was "error: [Errno 32] Broken pipe", status 2)
        return 128 + signal.SIGPIPE
    except USER_ERRORS as err:
        print(f"sparsekit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


class _Terminated(BaseException):
    """SIGTERM arrived while a command ran (see :func:`_terminate_cleanly`)."""


@contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a job scheduler's stop) ends a command as Ctrl-C
    does, unwinding it: Python's default ended the process at once, so the cleanup of a
    command's temporary output never ran and ``llm-prune``/``demo`` left their partial
    ``.OUT.PID-….tmp`` directory (a copy of the model) beside ``--out``. Only the main
    thread can install a handler; elsewhere the default stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(_signum: int, _frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


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
