"""Crash-safe file writes: a reader never sees a half-written file.

Every writer here builds its bytes in a temporary file in the target's directory, fsyncs it, and
renames it over the target with ``os.replace`` (atomic on POSIX and Windows), then fsyncs the
directory so the rename itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["fsync_dir", "write_synced", "write_bytes_atomic", "write_json_atomic", "make_temp_dir"]


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
