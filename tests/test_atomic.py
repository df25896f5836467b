"""``sparsekit._atomic.atomic_write``: the destination is replaced whole or not at all."""

from __future__ import annotations

import os
import re
import stat

import pytest
from _state import record_durability

from sparsekit._atomic import atomic_write, blocking_parent


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_the_content_is_written_and_no_temporary_file_is_left(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path  # beside the destination: the rename stays on one disk
        assert re.fullmatch(rf"\.out\.bin\.{os.getpid()}-[a-z0-9_]{{8}}\.tmp", tmp.name)
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_the_file_gets_a_new_files_usual_permissions(tmp_path):
    """Not mkstemp's 0600, which would otherwise outlive the rename."""
    target = tmp_path / "out.txt"
    with atomic_write(target) as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existed", [True, False])
def test_a_raising_writer_leaves_the_destination_untouched(tmp_path, error, existed):
    target = tmp_path / "out.bin"
    if existed:
        target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise error
    assert target.read_bytes() == b"old" if existed else not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out.bin"] if existed else [])


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failing_fsync_or_replace_leaves_the_old_file(tmp_path, monkeypatch, failing):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(*_args):
        raise OSError(f"{failing} failed")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match=f"{failing} failed"), atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = record_durability(monkeypatch)
    with atomic_write(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    dir_synced = ["fsync dir"] if hasattr(os, "O_DIRECTORY") else []
    assert events == ["fsync file", "rename", *dir_synced]


def test_blocking_parent_names_the_nearest_file_or_broken_link_on_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert blocking_parent(tmp_path / "file" / "a" / "b") == (tmp_path / "file", "a file")
    assert blocking_parent(tmp_path / "dangling" / "a") == (tmp_path / "dangling",
                                                            "a broken symbolic link")
    assert blocking_parent(tmp_path / "new" / "a") is None
