"""Atomic writes: all or nothing, usual permissions, no temp files left behind."""

import os
import stat

import pytest

from histofed.atomic import atomic_path, atomic_write_text


def test_write_and_permissions(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "a.md", "hello")
    assert target.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
