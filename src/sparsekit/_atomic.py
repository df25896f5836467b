"""Atomic, durable file writes: a file is replaced whole or not at all, even across a crash.

Checkpoints, Hugging Face configs, SAE directories and the decision cache all write files
that a reader (or a concurrent writer) must never see half written. :func:`atomic_write`
is the one way they do it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "sync"]


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Give a temporary file to write in place of ``path``; on leaving the block, it
    becomes ``path``.

    The temporary file, ``.NAME.PID-XXXXXXXX.tmp``, is created empty in ``path``'s
    directory (so the rename never crosses file systems) with a new file's usual
    permissions: the umask applies, not ``mkstemp``'s 0600, which would outlive the rename.
    The block writes it by its path, so writers that take only a path (safetensors'
    ``save_file``) fit. When the block ends, the file is fsynced, renamed over ``path``
    (``os.replace``: readers see the old file or the new one, never half of one) and the
    directory is fsynced, so the rename survives a power loss too. If the block, the fsync
    or the rename raises (``KeyboardInterrupt`` included), the temporary file is removed and
    ``path`` is as it was.

    The directory must exist. A writer killed outright leaves its temporary file behind;
    the PID in its name lets a later writer tell whether that writer is gone
    (:func:`sparsekit.checkpoint._remove_stale_temps`).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                                dir=path.parent)
    tmp = Path(name)
    try:
        try:
            if hasattr(os, "fchmod"):  # Windows (before 3.13) has only a read-only flag
                os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sync(file: str | os.PathLike[str]) -> None:
    """Flush ``file``'s data to the disk now (fsync is per file, whichever descriptor wrote
    it). Inside an :func:`atomic_write` block, after writing its temporary file: what can
    fail before the rename then fails before the block does anything it cannot undo (the
    writers of several files delete an old file only after this)."""
    _fsync(Path(file))


def _umask() -> int:
    """The process's umask (reading it means setting it: there is no getter)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(file: Path) -> None:
    """Flush ``file``'s data to the disk, whichever descriptor wrote it (fsync is per file)."""
    fd = os.open(file, os.O_RDWR)  # Windows cannot flush a read-only descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; Windows cannot open directories)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
