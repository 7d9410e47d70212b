"""fs.atomic_write, the one atomic write (environment markers, the index cache, the trust list,
exported files): whole file or old file, never a part, and no temporary file left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from envlock.fs import atomic_write


def test_writes_replaces_and_creates_parents(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.json"
    atomic_write(target, "first\n")
    atomic_write(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_private_unless_a_mode_is_given(tmp_path: Path) -> None:
    atomic_write(tmp_path / "private", "x")
    atomic_write(tmp_path / "shared", "x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644


def test_text_is_utf8_with_newlines_as_given(tmp_path: Path) -> None:
    atomic_write(tmp_path / "t", "ä\r\nb\n")
    assert (tmp_path / "t").read_bytes() == "ä\r\nb\n".encode()


def test_a_failed_rename_leaves_the_old_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "folder"
    target.mkdir()
    (target / "kept").write_text("old")
    with pytest.raises(OSError):
        atomic_write(target, "new")  # a file cannot replace a non-empty folder
    assert (target / "kept").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
