"""A disk that fills up, for the disk-full tests of every writer (nothing real is filled).

``fill_disk`` counts the bytes written to files under one directory; once ``capacity`` more have
gone in, a write is cut short and the next one fails with ``ENOSPC``, as a real full disk does.
``on="fsync"`` makes the fsync fail instead, where network and thin-provisioned filesystems
report it. Writes anywhere else (pytest's own output) pass through untouched.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

WAYS = ["write", "fsync"]  # where the disk reports that it is full


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike, capacity: int = 0, *,
              on: str = "write") -> None:
    """From now on, files under ``root`` take ``capacity`` more bytes, then ``ENOSPC``.

    Args:
        root: the directory whose filesystem is full.
        capacity: bytes that still fit (``on="write"``).
        on: ``"write"`` (the write fails part way) or ``"fsync"`` (every fsync of a file fails).
    """
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file a descriptor writes")
    prefix = str(Path(root).resolve()) + os.sep
    left = capacity
    real_write, real_fsync = os.write, os.fsync

    def under_root(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(prefix)
        except OSError:
            return False

    def write(fd, data):
        nonlocal left
        if not under_root(fd):
            return real_write(fd, data)
        if left == 0:
            raise _no_space()
        n = min(len(data), left)  # a short write first, as the kernel does
        left -= n
        return real_write(fd, memoryview(data)[:n])

    def fsync(fd):
        if under_root(fd) and not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise _no_space()
        return real_fsync(fd)

    if on == "write":
        monkeypatch.setattr(os, "write", write)
    elif on == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        raise ValueError(f"on must be one of {WAYS}, got {on!r}")
