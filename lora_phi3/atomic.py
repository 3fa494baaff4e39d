"""Crash-safe file writes: a reader never sees a half-written file or directory.

Every writer here builds its output under a temporary name in the target's directory, fsyncs it,
and renames it into place (atomic on POSIX), then fsyncs the parent directory so the rename itself
survives a power loss. This module is the one place that does so:

* :func:`write_bytes_atomic` / :func:`write_json_atomic`: one file;
* :func:`atomic_dir`: a whole directory, filled by the caller (checkpoints, merged models);
* :func:`atomic_write_dir`: a directory of given files, also over an existing one (adapters).

Everything written gets the usual permissions, 0666 (files) or 0777 (directories) minus the
umask, as ``open()`` and ``mkdir()`` would give; ``tempfile`` alone would make them private.

A full disk (``ENOSPC``, or ``EDQUOT`` for a full quota) raises :class:`DiskFullError`, an
``OSError`` that names the target, the bytes it needed and the space left. It is raised after the
temporary files are removed, so the target is as it was and the free space reported is real.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["fsync_dir", "write_synced", "write_bytes_atomic", "write_json_atomic", "make_temp_dir",
           "atomic_dir", "atomic_write_dir", "default_mode", "DiskFullError", "is_disk_full"]

# The errors that mean "no room": the filesystem is full, or the user's quota is.
_DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None))
                              if code is not None)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is an ``OSError`` saying the filesystem (or the quota) is full."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS


def _free_bytes(path: Path) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem ``path`` is or would be on."""
    for candidate in (path, *path.parents):  # the target itself may not exist (any more)
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(n: int) -> str:
    return f"{n:,} bytes" + (f" ({n / 1e6:.1f} MB)" if n >= 10**6 else "")


class DiskFullError(OSError):
    """A write ran out of space: names the target, the bytes it needed and the bytes free.

    An ``OSError`` with the original ``errno`` (``ENOSPC``, or ``EDQUOT``) and the target as
    ``filename``, so ``except OSError`` and ``e.errno == errno.ENOSPC`` still work.

    Attributes:
        needed: bytes the write needed (its data; the filesystem adds its block overhead).
        at_least: True when ``needed`` is a lower bound (a directory whose writer failed part way).
        free: bytes free on the target's filesystem when the error was raised, or None if unknown.
        unchanged: True when the writer left the target as it was.
    """

    def __init__(self, path: str | os.PathLike, needed: int, *, code: int = errno.ENOSPC,
                 at_least: bool = False, unchanged: bool = False) -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.needed, self.at_least, self.unchanged = needed, at_least, unchanged
        self.free = _free_bytes(Path(path).absolute())

    def __str__(self) -> str:
        need = ("at least " if self.at_least else "") + _size(self.needed)
        text = f"{self.strerror}: writing {self.filename!r} needs {need}"
        if self.free is not None:
            text += f"; its filesystem has {_size(self.free)} free"
        if self.unchanged:
            text += ". Nothing there was changed: free some space and write again"
        return text

    def __reduce__(self):  # OSError pickles its args only; keep the target and the numbers
        return _rebuild_disk_full_error, (self.filename, self.needed, self.errno, self.at_least,
                                          self.unchanged, self.free)


def _rebuild_disk_full_error(path, needed, code, at_least, unchanged, free) -> DiskFullError:
    error = DiskFullError(path, needed, code=code, at_least=at_least, unchanged=unchanged)
    error.free = free
    return error


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
    """Write ``data`` to ``path`` and fsync it (not atomic by itself: write to a temp name).

    Raises:
        DiskFullError: the disk (or quota) is full; the partly written ``path`` is removed, since
            its old content was already truncated and its blocks are what the disk lacks.
    """
    # os.write in a loop rather than a file object: the kernel may write part of a buffer before
    # it reports ENOSPC, and every byte of every writer passes through this one call.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # a network or thin-provisioned filesystem may report ENOSPC only here
        finally:
            os.close(fd)
    except OSError as e:
        if not is_disk_full(e):
            raise
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise DiskFullError(path, len(data), code=e.errno) from e


def _temp_file(directory: Path, prefix: str, suffix: str = "") -> Path:
    """A new empty file in ``directory`` with the usual mode (``mkstemp`` makes it 0600)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(fd)
    os.chmod(name, default_mode())
    return Path(name)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file in the same directory, then rename).

    Raises:
        DiskFullError: the disk is full; ``path`` is as it was and no temp file is left.
    """
    p = Path(path)
    tmp = None
    try:
        tmp = _temp_file(p.parent, prefix=f".{p.name}.", suffix=".tmp")
        write_synced(tmp, data)
        os.replace(tmp, p)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if is_disk_full(e):
            raise DiskFullError(p, len(data), code=e.errno, unchanged=True) from e
        raise
    fsync_dir(p.parent)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON to ``path`` atomically.

    Raises:
        DiskFullError: as :func:`write_bytes_atomic`.
    """
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


def _tree_size(root: Path) -> int:
    """Bytes in the regular files under ``root`` (0 if it is gone)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _rename_into_place(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished directory ``tmp`` to ``path``, moving a full old ``path`` aside first
    when ``replace`` (it is removed only once the new one is in place)."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # rename() replaces an empty directory on POSIX only
    if not (replace and path.is_dir()):
        os.rename(tmp, path)
        return
    # The old directory goes under the temp prefix, so a kill between the two renames leaves
    # leftovers the caller already knows how to clean up.
    aside = tmp.with_name(tmp.name + "-replaced")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, prefix: str | None = None,
               replace: bool = False) -> Iterator[Path]:
    """Build the directory ``path`` in a temporary directory, and rename it into place on success.

    The caller fills the yielded directory. When the block ends without an exception, every file
    in it is fsynced and it is renamed to ``path`` in one step, so a crash at any moment leaves
    either no ``path`` or a complete one. On an exception the temporary directory is removed and
    ``path`` is left as it was.

    Args:
        path: the directory to create. It must not exist when the block ends, or be empty (an empty
            directory is replaced), unless ``replace``.
        prefix: name prefix of the temporary directory (default ``.<name>.tmp-``), so that a
            caller can recognise and clean up the leftovers of a killed process.
        replace: replace a full ``path``, only once the new directory is complete and synced (so a
            failed write, a full disk included, leaves the old one whole).

    Yields:
        The temporary directory (in the same parent as ``path``).

    Raises:
        ValueError: ``path`` exists and is not a directory.
        DiskFullError: the disk filled up; ``needed`` is at least what had been written (the
            block may have had more to write). ``path`` is as it was.
        OSError: ``path`` is a non-empty directory when the block ends (and not ``replace``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    parent = path.absolute().parent
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(parent, prefix if prefix is not None else f".{path.name}.tmp-")
        yield tmp
        _fsync_tree(tmp)
        _rename_into_place(tmp, path, replace)
    except BaseException as e:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = _tree_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):  # raised after the cleanup, so the free space it reports is real
            failed_write = e.needed if isinstance(e, DiskFullError) else 0
            raise DiskFullError(path, written + failed_write, code=e.errno, at_least=True,
                                unchanged=True) from e
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
        DiskFullError: the disk filled up before any file was replaced (``needed`` is the size of
            all ``files``); ``path`` is as it was and no temp file is left.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} exists and is not a directory")
    total = sum(len(data) for _, data in files)
    if not path.exists():
        try:
            with atomic_dir(path) as tmp:
                for name, data in files:
                    write_synced(tmp / name, data)
        except DiskFullError as e:
            raise DiskFullError(path, total, code=e.errno, unchanged=True) from e
        return path
    temps: list[Path] = []
    try:
        for name, data in files:
            tmp_name = _temp_file(path, prefix=f".{name}.tmp-")
            temps.append(tmp_name)
            write_synced(tmp_name, data)
    except BaseException as e:
        for tmp_name in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        if is_disk_full(e):
            raise DiskFullError(path, total, code=e.errno, unchanged=True) from e
        raise
    try:
        for tmp_name, (name, _) in zip(temps, files):
            os.replace(tmp_name, path / name)
    finally:
        for tmp_name in temps:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    fsync_dir(path)
    return path
