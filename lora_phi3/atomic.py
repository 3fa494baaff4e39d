"""Crash-safe file writes: a reader never sees a half-written file or directory.

Every writer here builds its output under a temporary name in the target's directory, fsyncs it,
and renames it into place (atomic on POSIX), then fsyncs the parent directory so the rename itself
survives a power loss. This module is the one place that does so:

* :func:`write_bytes_atomic` / :func:`write_json_atomic`: one file;
* :func:`atomic_dir`: a whole directory, filled by the caller (checkpoints, merged models);
* :func:`atomic_write_dir`: a directory of given files, also over an existing one (adapters).

Everything written gets the usual permissions, 0666 (files) or 0777 (directories) minus the
umask, as ``open()`` and ``mkdir()`` would give; ``tempfile`` alone would make them private.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["fsync_dir", "write_synced", "write_bytes_atomic", "write_json_atomic", "make_temp_dir",
           "atomic_dir", "atomic_write_dir", "default_mode"]


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) gives under the current umask."""
    umask = os.umask(0)  # the umask can only be read by setting it; put it straight back
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


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


def _temp_file(directory: Path, prefix: str, suffix: str = "") -> Path:
    """A new empty file in ``directory`` with the usual mode (``mkstemp`` makes it 0600)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(fd)
    os.chmod(name, default_mode())
    return Path(name)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file in the same directory, then rename)."""
    p = Path(path)
    tmp = _temp_file(p.parent, prefix=f".{p.name}.", suffix=".tmp")
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
    os.chmod(path, default_mode(directory=True))
    return path


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and then each directory, deepest first."""
    dirs = [root]
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            continue
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, prefix: str | None = None) -> Iterator[Path]:
    """Build the directory ``path`` in a temporary directory, and rename it into place on success.

    The caller fills the yielded directory. When the block ends without an exception, every file
    in it is fsynced and it is renamed to ``path`` in one step, so a crash at any moment leaves
    either no ``path`` or a complete one. On an exception the temporary directory is removed and
    ``path`` is left as it was.

    Args:
        path: the directory to create. It must not exist when the block ends, or be empty (an empty
            directory is replaced); a caller replacing a full one removes it inside the block.
        prefix: name prefix of the temporary directory (default ``.<name>.tmp-``), so that a
            caller can recognise and clean up the leftovers of a killed process.

    Yields:
        The temporary directory (in the same parent as ``path``).

    Raises:
        ValueError: ``path`` exists and is not a directory.
        OSError: ``path`` is a non-empty directory when the block ends.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    parent = path.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(parent, prefix if prefix is not None else f".{path.name}.tmp-")
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # rename() replaces an empty directory on POSIX only
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)


def atomic_write_dir(path: str | Path, files: list[tuple[str, bytes]]) -> Path:
    """Write ``files`` (name, bytes) into directory ``path`` so a crash never leaves a mixed set.

    A new directory is built complete by :func:`atomic_dir`. An existing directory gets temp files
    that are fsynced and then renamed over the old ones in the order given: the last file is the
    commit record (the adapter json carries the checksum of the tensor file, so a crash between
    two renames leaves a pair that ``load_adapter`` refuses).

    Raises:
        ValueError: if ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    if not path.exists():
        with atomic_dir(path) as tmp:
            for name, data in files:
                write_synced(tmp / name, data)
        return path
    temps: list[tuple[Path, str]] = []
    try:
        for name, data in files:
            tmp_name = _temp_file(path, prefix=f".{name}.tmp-")
            temps.append((tmp_name, name))
            write_synced(tmp_name, data)
        for tmp_name, name in temps:
            os.replace(tmp_name, path / name)
    finally:
        for tmp_name, _ in temps:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    fsync_dir(path)
    return path
