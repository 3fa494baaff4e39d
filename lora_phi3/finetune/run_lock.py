"""One writer per output directory: an OS file lock that names its holder.

``lora-phi3 finetune`` locks its run directory (``RUN/.lora-phi3.lock``) before it touches
anything in it, and ``lora-phi3 merge`` locks its output (``.NAME.lock`` beside it, because the
output directory itself is renamed into place). A second process is refused at once with the
holder's PID and host.

The lock is ``fcntl.flock`` on the lock file, not the file's existence: the kernel drops it when
the holder dies, however it dies, so a lock left by ``kill -9`` never blocks a new run. The file
only records who holds it (for the refusal message) and, when a new holder finds a record of a dead
one, that the earlier run was killed (logged as a warning). Under torchrun only rank 0 takes it.
``flock`` is advisory and, on some network filesystems, local to one host.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["RunDirLocked", "RunLock", "RUN_LOCK_NAME"]

#: The lock file in a run directory (hidden; ``--overwrite-output-dir`` never removes it).
RUN_LOCK_NAME = ".lora-phi3.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the lock of ``directory``.

    Attributes:
        directory: the directory asked for.
        holder: what the holder recorded (``pid``, ``host``, ``started``, ``command``), or {} when
            it has not written it yet.
    """

    def __init__(self, directory: Path, holder: dict) -> None:
        self.directory, self.holder = directory, holder
        who = (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
               f"running since {holder.get('started', '?')}") if holder else "a process that is starting"
        super().__init__(f"{str(directory)!r} is in use by another lora-phi3 process ({who}); "
                         "a directory has one writer: wait for that process to end (or stop it), "
                         "or choose another output directory")


class RunLock:
    """The exclusive lock of one output directory; a context manager.

    Args:
        lock_file: the file to lock.
        directory: the directory it guards (named in messages).
    """

    def __init__(self, lock_file: Path, directory: Path) -> None:
        self.lock_file, self.directory = Path(lock_file), Path(directory)
        self._fd: int | None = None

    @classmethod
    def for_run_dir(cls, run_dir: str | os.PathLike) -> "RunLock":
        """The lock of a ``finetune`` run directory (the file lives inside it)."""
        run_dir = Path(run_dir)
        return cls(run_dir / RUN_LOCK_NAME, run_dir)

    @classmethod
    def beside(cls, path: str | os.PathLike) -> "RunLock":
        """The lock of an output that is renamed into place (the file is ``.NAME.lock`` beside it)."""
        path = Path(path)
        return cls(path.absolute().parent / f".{path.name}.lock", path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock now, or refuse.

        Returns:
            self.

        Raises:
            RunDirLocked: another live process holds it.
        """
        if self._fd is not None:
            return self
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirLocked(self.directory, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that released in the meantime unlinked the file we opened: lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            logger.warning("%s: taking over the lock of PID %s on host %s (started %s), which is no "
                           "longer running: it was killed or crashed", self.directory,
                           previous.get("pid", "?"), previous.get("host", "?"),
                           previous.get("started", "?"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Unlinked while still locked: a process that opened it meanwhile sees the inode change.
            self.lock_file.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    """The holder record in the lock file, or {} (empty, being written, or not ours)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
