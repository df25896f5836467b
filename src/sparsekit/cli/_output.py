"""Where a command writes: checked before any work, written after everything that can fail.

A command calls :func:`check_output` first, so a path it cannot or must not write is
refused before anything is loaded or pruned, and :func:`write_output` (or, for an output
directory, :func:`write_directory`) last, so a failure anywhere before it leaves no output
behind and a failed write names the path in one line. An output never replaces one of the
command's inputs unless the user asks for it, and an output directory never holds an input
or lies inside an input directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from sparsekit._atomic import lands_on, sync_directory, umask
from sparsekit.cli._errors import UsageError

T = TypeVar("T")


def check_output(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None],
    overwrite: bool = False,
    directory: bool = False,
    flag: str = "--out",
    overwrite_flag: str | None = "--overwrite",
) -> Path:
    """Return ``out`` as a path after checking it can be written without losing an input.

    ``out`` is a file (or a directory with ``directory=True``); an existing ``out`` must be
    of that kind, since replacing a directory, device or pipe is never what was meant. An
    ``out`` that is the same file as one of ``inputs`` (also through a symlink or hard link)
    is refused unless ``overwrite`` (the command's ``overwrite_flag``; ``None`` for a
    command without one); an output directory is never an input. No output lies inside an
    input directory (at any depth, through symlinks too) and no output directory holds an
    input. The directory written into (or its nearest existing ancestor, created on write)
    must be writable. An empty ``out`` (an unset shell variable: ``Path("")`` is the current
    directory, which a directory output merged into), one holding a NUL, one the file
    system cannot look up (a name too long) and, for a file, one ending in a
    separator, ``.`` or ``..`` (``x/`` and ``x/.`` wrote the file ``x``) are refused; an
    empty input is no file and is skipped here (the command's own check names it).
    """
    text = os.fspath(out)
    if not text.strip() or "\0" in text:
        raise UsageError(f"{flag} must be the path of the {'directory' if directory else 'file'}"
                         f" to write, got {text!r}")
    if not directory and os.path.basename(text) in ("", ".", ".."):  # Path() drops "/", "/."
        raise UsageError(f"{flag} {text!r} names a directory (it ends with a path separator, "
                         "'.' or '..'); give the file to write, such as "
                         f"{os.path.join(text, 'model.safetensors')!r}")
    path = Path(out)
    try:
        path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        pass  # not there yet, or a file on the way (refused below)
    except OSError as err:  # a name too long, a folder that cannot be searched: unnamed
        raise UsageError(f"{flag} {text!r}: {err.strerror or err}") from None
    try:
        path.stat()
    except OSError as err:  # a link that leads to itself was refused after the work, as 'path'
        if err.errno == errno.ELOOP:
            raise UsageError(f"{flag} {text!r} is a symbolic link that loops ("
                             f"{err.strerror}); give a path that leads to a file") from None
    existing = [Path(s) for s in inputs
                if s is not None and os.fspath(s).strip() and Path(s).exists()]
    if path.exists():
        if directory and not path.is_dir():
            raise UsageError(f"{flag} {str(path)!r} exists and is not a directory")
        if not directory and path.is_dir():
            raise UsageError(f"{flag} {str(path)!r} is a directory; give the file to write")
        if not directory and not path.is_file():
            raise UsageError(f"{flag} {str(path)!r} exists and is not a regular file")
    # where the write lands: "nodir/../in" (and a dangling link to it) names no file yet,
    # but is the input once the save has created nodir; os.path.realpath resolves it so
    same = [s for s in existing if lands_on(path, s)]
    if same and (directory or not overwrite):
        hint = ("write to another directory" if directory
                else f"pass {overwrite_flag} to replace it" if overwrite_flag
                else "write to another file")
        raise UsageError(f"{flag} {str(path)!r} is the input {str(same[0])!r}; {hint}")
    for source in existing:
        if source.is_dir() and _within(path, source):
            raise UsageError(f"{flag} {str(path)!r} is inside the input directory "
                             f"{str(source)!r}; write to another directory")
        if directory and path.is_dir() and _within(source, path):
            raise UsageError(f"{flag} {str(path)!r} holds the input {str(source)!r}; write "
                             f"to another directory")
    parent = path.absolute() if directory and path.is_dir() else path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {str(path)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def write_output(path: Path, write: Callable[[Path], T], *, flag: str = "--out") -> T:
    """Run ``write(path)``; a file-system failure (disk full, read-only) becomes one line.
    A failure removes the folders created for ``path`` again (as :func:`write_directory`
    does): a full disk left ``--out new/deeper/x.safetensors``'s ``new/deeper`` behind."""
    target = path.absolute()
    created = next((a for a in reversed(target.parents) if not a.exists()), None)
    try:
        return write(path)
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"{flag}: cannot write {str(path)!r}: {reason}") from None
    finally:
        if created is not None and not target.exists():
            _remove_empty(target.parent, stop=created.parent)


def _within(path: Path, directory: Path) -> bool:
    """Whether ``path`` (existing or not) is ``directory`` or lies inside it, at any depth:
    one of its existing ancestors (symlinks resolved) is that directory (also through a
    hard link, bind mount or another spelling of it)."""
    target = os.stat(directory)
    for ancestor in (p := path.resolve(), *p.parents):
        try:
            if os.path.samestat(os.stat(ancestor), target):
                return True
        except OSError:
            continue  # not created yet
    return False


def write_directory(path: Path, write: Callable[[Path], T], *, flag: str = "--out",
                    last: Sequence[str] = ("config.json",)) -> T:
    """Run ``write(tmp)`` on a new, empty temporary directory beside ``path``, then put what
    it wrote in place: the whole directory becomes ``path`` (one rename) when there is
    none, else its files replace those of the same name in ``path`` (each one rename;
    other files of ``path`` stay). A failure before that (``write`` raising, a file that
    would replace a directory) removes the temporary directory and the parents created
    for it, so ``path`` is as it was; a file-system failure becomes one line naming
    ``path``. The files named in ``last`` (``config.json``: what makes the directory
    loadable) are removed from ``path`` first and put in place last, so a crash in between
    leaves no old config describing new weights. ``path``'s parents are created."""
    target = path.absolute()
    created = next((a for a in reversed(target.parents) if not a.exists()), None)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        home = target.resolve().parent if target.is_dir() else target.parent
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp",
                                    dir=home))
        os.chmod(tmp, 0o777 & ~umask())  # a new directory's usual permissions, not 0700
        result = write(tmp)
        if not target.exists():
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # created meanwhile (rename fails): merge into it
                    raise
            else:
                sync_directory(target.parent)
                return result
        real = target.resolve()
        _check_replaceable(tmp, real, path, flag)
        final = [name for name in last if (tmp / name).is_file()]
        for name in final:
            (real / name).unlink(missing_ok=True)
        _move_into(tmp, real, skip=set(final))
        for name in final:
            os.replace(tmp / name, real / name)
        sync_directory(real)
        return result
    except OSError as err:
        raise UsageError(f"{flag}: cannot write {str(path)!r}: {_reason(err)}") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if created is not None and not target.exists():
            _remove_empty(target.parent, stop=created.parent)


def _reason(err: OSError) -> str:
    """What went wrong, in a line: ``shutil.copytree``'s list of failed copies as its first
    (their destinations are in the temporary directory, which is gone)."""
    problems = err.args[0] if isinstance(err, shutil.Error) and err.args else None
    if isinstance(problems, list) and problems and len(problems[0]) == 3:
        source, _, why = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"cannot copy {str(source)!r}: {why}{more}"
    return err.strerror or str(err)


def _check_replaceable(source: Path, target: Path, out: Path, flag: str) -> None:
    """Raise unless every entry of ``source`` can be renamed over ``target``'s of that name:
    a directory only merges into a directory, a file replaces no directory."""
    for entry in sorted(source.iterdir()):
        there = target / entry.name
        if not os.path.lexists(there):
            continue
        is_dir, there_dir = entry.is_dir() and not entry.is_symlink(), there.is_dir()
        if is_dir and there_dir and not there.is_symlink():
            _check_replaceable(entry, there, out, flag)
        elif is_dir or there_dir:
            raise UsageError(f"{flag} {str(out)!r}: {str(there)!r} is in the way of the "
                             f"{'directory' if is_dir else 'file'} to write there")


def _move_into(source: Path, target: Path, *, skip: set[str]) -> None:
    """Rename each entry of ``source`` into ``target`` (directories merged entry by entry)."""
    for entry in sorted(source.iterdir()):
        if entry.name in skip:
            continue
        there = target / entry.name
        if (entry.is_dir() and not entry.is_symlink() and there.is_dir()
                and not there.is_symlink()):
            _move_into(entry, there, skip=set())
        else:
            os.replace(entry, there)


def _remove_empty(directory: Path, *, stop: Path) -> None:
    """Remove ``directory`` and its parents up to (not including) ``stop`` while empty."""
    while directory != stop and directory != directory.parent:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def console(width: int) -> Console:
    """A rich ``Console`` as wide as the terminal, or ``width`` columns when the output is
    no terminal or closed (``>&-`` left ``sys.stdout`` None: its ``isatty`` was a raw
    ``AttributeError``, after ``prune`` had written its output)."""
    tty = sys.stdout is not None and sys.stdout.isatty()
    return Console(width=None if tty else width)
