"""Atomic, durable file writes: a file is replaced whole or not at all, even across a crash.

Checkpoints, Hugging Face configs, SAE directories and the decision cache all write files
that a reader (or a concurrent writer) must never see half written. :func:`atomic_write`
is the one way they do it. Writers of several files into one directory also hold
:func:`directory_lock`, so that two of them at once give one writer's complete save.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (directory_lock does not serialise there)
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "atomic_write", "directory_lock", "lands_on", "special_kind", "sync",
           "sync_directory", "umask", "unwritable", "write_target"]

LOCK_NAME = ".sparsekit.lock"
"""The file :func:`directory_lock` locks in a directory (removed when it is released)."""


def blocking_parent(path: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """The nearest parent of ``path`` that exists and is no directory, with what it is
    (``"a file"``, or ``"a broken symbolic link"``: to nothing, or a loop), else ``None``:
    creating ``path``'s folders fails there with a raw ``NotADirectoryError`` or
    ``FileExistsError``."""
    for parent in Path(path).absolute().parents:
        if os.path.lexists(parent) and not parent.is_dir():
            return parent, "a file" if parent.exists() else "a broken symbolic link"
    return None


def special_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` (its links followed) is where it exists and is neither a regular file
    nor a directory: ``"FIFO"``, ``"character device"`` …; else ``None``."""
    try:
        mode = Path(path).stat().st_mode
    except (OSError, ValueError):  # missing, a link loop, a name too long
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = {stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def unwritable(path: str | os.PathLike[str]) -> str | None:
    """Why :func:`atomic_write` cannot write the file ``path``, said for a message (``"an
    existing directory"``, ``"a symbolic link that leads back to itself (a loop)"`` …), or
    ``None`` where it can: an existing directory or a symbolic link to one, a device, FIFO
    or socket (which the rename would replace by a regular file), a link that loops, or a
    folder on the way to the file (or to the file a link leads to) that is a file or a
    broken link. Checked before anything is written, so that a save of several files fails
    before its first one."""
    path = Path(path)
    if path.is_dir():
        return (f"a symbolic link to the directory {os.path.realpath(path)!r}"
                if path.is_symlink() else "an existing directory")
    if kind := special_kind(path):
        return f"an existing {kind}, not a regular file"
    try:
        written = write_target(path)  # a link's target is written, the link kept
    except OSError as err:  # a link to a directory is caught above
        if err.errno != errno.ELOOP:
            raise
        return "a symbolic link that leads back to itself (a loop)"
    if blocker := blocking_parent(path) or blocking_parent(written):
        return f"{str(blocker[0])!r} is {blocker[1]}, not a directory"
    return None


def write_target(path: str | os.PathLike[str]) -> Path:
    """The file a write to ``path`` replaces, the one ``open(path, "w")`` would write:
    ``path`` itself, or, where ``path`` is a symbolic link, the file the link leads to (a
    chain followed to its end), so that the write keeps the link. A link to nothing leads
    to the file it names, created by the write. A link to a directory raises
    ``IsADirectoryError`` and a loop ``OSError`` (``ELOOP``), both naming ``path``. A link
    to a device, FIFO or socket is itself the file replaced: none of those can be replaced
    whole by a file (a rename over ``/dev/zero`` would remove the device node).

    Replacing the link instead (what a rename over ``path`` does) turned a link to a file
    kept elsewhere into a regular file, leaving the file it named as it was."""
    path = Path(path)
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops at the link that leads back into the loop
        raise OSError(errno.ELOOP, f"cannot write {str(path)!r}: it is a symbolic link that "
                                   "leads back to itself (a loop); accepted: a file path, or "
                                   "a link to a file")
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {str(path)!r}: it is a symbolic "
                                              f"link to the directory {str(target)!r}; "
                                              "accepted: a file path, or a link to a file")
    if target.exists() and not target.is_file():
        return path
    return target


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Give a temporary file to write in place of ``path``; on leaving the block, it
    becomes ``path``.

    Where ``path`` is a symbolic link, the file it leads to is the one replaced, the link
    kept (:func:`write_target`; the folders of a link to nothing are created). The
    temporary file, ``.NAME.PID-XXXXXXXX.tmp``, is created empty in the directory of the
    file replaced (so the rename never crosses file systems). Once written it gets the
    permissions of the file it replaces, as ``open(path, "w")`` keeps them (a private file
    stays private, a read-only one read-only), or a new file's usual ones: the umask
    applies, not ``mkstemp``'s 0600, which would outlive the rename. The block writes it by
    its path, so writers that take only a path (safetensors' ``save_file``) fit. When the
    block ends, the file is fsynced, renamed over the file it replaces (``os.replace``:
    readers see the old file or the new one, never half of one) and the directory is
    fsynced, so the rename survives a power loss too. If the block, the fsync or the rename
    raises (``KeyboardInterrupt`` included), the temporary file is removed and the file is
    as it was.

    The directory of ``path`` must exist. A writer killed outright leaves its temporary
    file behind; the PID in its name lets a later writer tell whether that writer is gone
    (:func:`sparsekit.checkpoint._remove_stale_temps`).
    """
    target = write_target(path)
    if target != Path(path):  # a link to nothing may name a folder not made yet
        if blocker := blocking_parent(target):
            raise NotADirectoryError(
                errno.ENOTDIR, f"cannot write {os.fspath(path)!r}: it is a symbolic link to "
                               f"{str(target)!r}, under {str(blocker[0])!r}, which is "
                               f"{blocker[1]}, not a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(target.stat().st_mode) & 0o777  # never set-id bits on new bytes
    except FileNotFoundError:
        mode = 0o666 & ~umask()
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp",
                                dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        if hasattr(os, "fchmod"):  # Windows (before 3.13) has only a read-only flag
            os.chmod(tmp, mode)  # once written: a read-only file's mode refused the writes
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directory(target.parent)


@contextmanager
def directory_lock(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (which must exist) for the block; yield it.

    A writer of several files in one directory (``save_pretrained``, an SAE's ``save``)
    holds it around its writes and renames, so two writers of the same directory, in
    threads or processes of this machine, run one after the other and the directory
    ends up as one complete save, never one writer's config with the other's weights.
    The lock is ``flock`` on the file :data:`LOCK_NAME` in ``directory``; the holder
    removes that file before releasing it (a writer that locked a removed file tries
    again), so no lock file outlives the save. A writer killed while holding it leaves the
    file behind, unlocked, and harmless. Blocks until the lock is free.

    Where ``fcntl`` is missing (Windows) nothing is locked: concurrent writers of one
    directory are not supported there (each file is still replaced atomically).
    """
    directory = Path(directory)
    if fcntl is None:
        yield directory
        return
    lock = directory / LOCK_NAME
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            break  # the file still at that name is the one locked: the lock is ours
        os.close(fd)  # its holder removed it meanwhile: lock the file at that name now
    try:
        yield directory
    finally:
        with suppress(OSError):
            lock.unlink()  # before the release, so a waiter on this file tries again
        os.close(fd)


def sync(file: str | os.PathLike[str]) -> None:
    """Flush ``file``'s data to the disk now (fsync is per file, whichever descriptor wrote
    it). Inside an :func:`atomic_write` block, after writing its temporary file: what can
    fail before the rename then fails before the block does anything it cannot undo (the
    writers of several files delete an old file only after this)."""
    _fsync(Path(file))


def umask() -> int:
    """The process's umask (reading it means setting it: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(file: Path) -> None:
    """Flush ``file``'s data to the disk, whichever descriptor wrote it (fsync is per file)."""
    fd = os.open(file, os.O_RDWR)  # Windows cannot flush a read-only descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (POSIX; Windows cannot open directories)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lands_on(out: str | os.PathLike, source: str | os.PathLike) -> bool:
    """Whether a write to ``out`` lands on the existing file or directory ``source``: their
    paths resolve to one (links followed, ``..`` after a folder that does not exist yet read
    as the save reads it once it has made the folder: ``nodir/../in`` is ``in``), or
    ``out`` exists and is the same file (a hard link)."""
    if os.path.exists(out) and os.path.samefile(out, source):
        return True
    return os.path.realpath(out) == os.path.realpath(source)
