"""Crash-safe file writes: a reader never sees a half-written file.

Every writer here builds its bytes in a temporary file in the target's directory, fsyncs it, and
renames it over the target with ``os.replace`` (atomic on POSIX and Windows), then fsyncs the
directory so the rename itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "write_synced", "write_bytes_atomic", "write_json_atomic", "make_temp_dir",
           "atomic_write_dir"]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic by itself: write to a temp name)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file in the same directory, then rename)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write_synced(tmp, data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh directory in ``parent`` to build output in before renaming it into place.

    ``tempfile.mkdtemp`` makes it private (0700); it gets the usual permissions (0777 minus the
    umask) instead, so the renamed adapter or checkpoint is as readable as any other output.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def atomic_write_dir(path: str | Path, files: list[tuple[str, bytes]]) -> Path:
    """Write ``files`` (name, bytes) into directory ``path`` so a crash never leaves a mixed set.

    A new directory is built complete in a temp directory next to it and renamed into place in one
    step. An existing directory gets temp files that are fsynced and then renamed over the old ones
    in the order given: the last file is the commit record (the adapter json carries the checksum
    of the tensor file, so a crash between two renames leaves a pair that ``load_adapter`` refuses).

    Raises:
        ValueError: if ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = make_temp_dir(parent, f".{path.name}.tmp-")
        try:
            for name, data in files:
                write_synced(tmp / name, data)
            fsync_dir(tmp)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)
        return path
    temps: list[tuple[str, str]] = []
    try:
        for name, data in files:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=path)
            os.close(fd)
            temps.append((tmp_name, name))
            write_synced(Path(tmp_name), data)
        for tmp_name, name in temps:
            os.replace(tmp_name, path / name)
    finally:
        for tmp_name, _ in temps:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    fsync_dir(path)
    return path
