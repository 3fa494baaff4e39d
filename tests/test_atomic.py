"""Crash-safe writes (lora_phi3/atomic.py): all-or-nothing files and directories, fsync, the
usual permissions (0666 / 0777 minus the umask) on everything written, and a full disk."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import stat
from pathlib import Path

import pytest

from lora_phi3 import atomic
from lora_phi3.atomic import (DiskFullError, atomic_dir, atomic_write_dir, default_mode,
                              make_temp_dir, write_bytes_atomic, write_json_atomic, write_synced)
from full_disk import WAYS, fill_disk


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _plain_file_mode(tmp_path: Path) -> int:
    """What ``open()`` gives a new file here: the reference the writers must match."""
    ref = tmp_path / "reference"
    ref.write_bytes(b"")
    mode = _mode(ref)
    ref.unlink()
    return mode


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_writer_gives_files_the_mode_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
        assert _plain_file_mode(tmp_path) == want_file
        assert default_mode() == want_file and default_mode(directory=True) == want_dir
        write_bytes_atomic(tmp_path / "a.bin", b"1")
        write_json_atomic(tmp_path / "b.json", {"x": 1})
        atomic_write_dir(tmp_path / "new", [("t", b"1"), ("j", b"2")])  # fresh directory
        atomic_write_dir(tmp_path / "new", [("t", b"3"), ("k", b"4")])  # over an existing one
        with atomic_dir(tmp_path / "tree") as d:
            (d / "sub").mkdir()
            (d / "sub" / "f").write_text("x")
            write_bytes_atomic(d / "g", b"y")
        made = make_temp_dir(tmp_path, ".tmp-")
    finally:
        os.umask(old)
    assert _mode(made) == want_dir
    made.rmdir()
    modes = {str(p.relative_to(tmp_path)): _mode(p) for p in tmp_path.rglob("*")}
    assert modes == {"a.bin": want_file, "b.json": want_file, "new": want_dir,
                     "new/t": want_file, "new/j": want_file, "new/k": want_file,
                     "tree": want_dir, "tree/sub": want_dir, "tree/sub/f": want_file,
                     "tree/g": want_file}


def test_write_bytes_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch, umask_022):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"

    def crash(src, dst):
        raise OSError("simulated crash")
    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_bytes_atomic(path, b"new")
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert os.listdir(tmp_path) == ["f.json"]  # the temp file is gone


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path, umask_022):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_dir(target) as d:
            (d / "part").write_text("x")
            assert not target.exists()  # nothing visible while it is being built
            raise RuntimeError("half way")
    assert os.listdir(tmp_path) == []  # neither the target nor the temp dir

    with atomic_dir(target, prefix=".mine-") as d:
        assert d.parent == tmp_path and d.name.startswith(".mine-")
        (d / "a").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "a").read_text() == "1"


def test_atomic_dir_replaces_an_empty_dir_but_never_a_full_one_or_a_file(tmp_path, umask_022):
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as d:
        (d / "a").write_text("1")
    assert (empty / "a").read_text() == "1"

    with pytest.raises(OSError):
        with atomic_dir(empty) as d:  # now full: the rename refuses, the old content stays
            (d / "b").write_text("2")
    assert sorted(os.listdir(empty)) == ["a"]
    assert sorted(os.listdir(tmp_path)) == ["empty"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"'.*file' exists and is not a directory"):
        with atomic_dir(tmp_path / "file"):
            pass
    with pytest.raises(ValueError, match=r"'.*file' exists and is not a directory"):
        atomic_write_dir(tmp_path / "file", [("a", b"1")])


def test_atomic_dir_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
    synced, order = [], []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src, dst):
        order.append(("rename", len(synced)))
        real_rename(src, dst)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "rename", rename)
    with atomic_dir(tmp_path / "out") as d:
        (d / "sub").mkdir()
        (d / "sub" / "f").write_text("x")
        (d / "g").write_text("y")
        tmp = str(d)
    files_synced = {Path(p).name for p in synced if p.startswith(tmp)}
    assert {"f", "g"} <= files_synced
    assert order == [("rename", order[0][1])] and order[0][1] >= 2  # the rename came after


def test_atomic_write_dir_into_a_new_parent_and_over_old_files(tmp_path, umask_022):
    path = atomic_write_dir(tmp_path / "a" / "b", [("x", b"1"), ("y", b"2")])
    assert path == tmp_path / "a" / "b"
    assert (path / "x").read_bytes() == b"1"
    atomic_write_dir(path, [("x", b"3")])
    assert (path / "x").read_bytes() == b"3" and (path / "y").read_bytes() == b"2"
    assert sorted(os.listdir(path)) == ["x", "y"]  # no temp files left


# -- a full disk -----------------------------------------------------------------------------------
@pytest.mark.parametrize("on", WAYS)
def test_write_json_atomic_on_a_full_disk_says_what_and_where_and_keeps_the_old_file(
        tmp_path, monkeypatch, on):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"step": 1})
    new = {"step": 2, "note": "x" * 100}
    size = len(json.dumps(new, indent=2, sort_keys=True)) + 1
    fill_disk(monkeypatch, tmp_path, capacity=40, on=on)
    with pytest.raises(DiskFullError, match=(
            rf"^No space left on device: writing {re.escape(repr(str(path)))} needs {size} bytes; "
            r"its filesystem has [\d,]+ bytes( \([\d.]+ MB\))? free\. "
            r"Nothing there was changed: free some space and write again$")) as info:
        write_json_atomic(path, new)
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC  # callers catching OSError still do
    assert (e.filename, e.needed, e.at_least, e.unchanged) == (str(path), size, False, True)
    assert 0 < e.free <= shutil.disk_usage(tmp_path).free + 2**20
    assert json.loads(path.read_text()) == {"step": 1}
    assert os.listdir(tmp_path) == ["summary.json"]  # the temp file is gone
    copy = pickle.loads(pickle.dumps(e))  # e.g. sent from a worker process: the same error
    assert type(copy) is DiskFullError and str(copy) == str(e) and copy.errno == errno.ENOSPC


def test_write_synced_on_a_full_disk_removes_the_part_it_wrote(tmp_path, monkeypatch):
    fill_disk(monkeypatch, tmp_path, capacity=10)
    with pytest.raises(DiskFullError, match=r"needs 2,000 bytes; its filesystem has") as info:
        write_synced(tmp_path / "f", b"x" * 2000)
    assert not info.value.unchanged and "Nothing there was changed" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_atomic_dir_on_a_full_disk_reports_at_least_what_was_written(tmp_path, monkeypatch):
    fill_disk(monkeypatch, tmp_path, capacity=150)
    with pytest.raises(DiskFullError, match=(
            rf"writing {re.escape(repr(str(tmp_path / 'out')))} needs at least 300 bytes; ")):
        with atomic_dir(tmp_path / "out") as d:
            write_synced(d / "a", b"a" * 100)
            write_synced(d / "b", b"b" * 200)  # 50 bytes fit: the error counts all 200
            write_synced(d / "c", b"c" * 400)  # never reached
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("on", WAYS)
def test_atomic_dir_replace_keeps_the_old_directory_until_the_new_one_is_whole(
        tmp_path, monkeypatch, on):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "old").write_text("1")
    fill_disk(monkeypatch, tmp_path, capacity=5, on=on)
    with pytest.raises(DiskFullError, match="Nothing there was changed"):
        with atomic_dir(target, replace=True) as d:
            write_synced(d / "new", b"2" * 10)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["old"]
    monkeypatch.undo()
    with atomic_dir(target, replace=True) as d:
        (d / "new").write_text("2")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["new"]
