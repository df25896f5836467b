"""Where a command writes: checked before any work, written after everything that can fail.

A command calls :func:`check_output` first, so a path it cannot or must not write is
refused before anything is loaded or pruned, and :func:`write_output` last, so a failure
anywhere before it leaves no output behind and a failed write names the path in one line.
An output never replaces one of the command's inputs unless the user asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from sparsekit.cli._errors import UsageError

T = TypeVar("T")


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None],
    overwrite: bool = False,
    directory: bool = False,
    flag: str = "--out",
) -> Path:
    """Return ``out`` as a path after checking it can be written without losing an input.

    ``out`` is a file (or a directory with ``directory=True``); an existing ``out`` must be
    of that kind, since replacing a directory, device or pipe is never what was meant. An
    ``out`` that is the same file as one of ``inputs`` (also through a symlink or hard link)
    is refused unless ``overwrite``; an output directory is never an input. The directory
    written into (or its nearest existing ancestor, created on write) must be writable.
    """
    path = Path(out)
    if path.exists():
        if directory and not path.is_dir():
            raise UsageError(f"{flag} {str(path)!r} exists and is not a directory")
        if not directory and path.is_dir():
            raise UsageError(f"{flag} {str(path)!r} is a directory; give the file to write")
        if not directory and not path.is_file():
            raise UsageError(f"{flag} {str(path)!r} exists and is not a regular file")
        same = [s for s in inputs if s is not None and Path(s).exists()
                and os.path.samefile(path, s)]
        if same and (directory or not overwrite):
            raise UsageError(
                f"{flag} {str(path)!r} is the input {str(same[0])!r}; "
                + ("write to another directory" if directory else "pass --overwrite to replace it")
            )
    parent = path.absolute() if directory and path.is_dir() else path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def write_output(path: Path, write: Callable[[Path], T], *, flag: str = "--out") -> T:
    """Run ``write(path)``; a file-system failure (disk full, read-only) becomes one line."""
    try:
        return write(path)
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"{flag}: cannot write {str(path)!r}: {reason}") from None
