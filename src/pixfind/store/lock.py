"""pixfind's own lock on a Milvus Lite file.

Milvus Lite 2.5's own lock is unreliable (a failed second opener deletes the lock it never held,
after which two processes write one file), so pixfind takes its own before opening.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from ..errors import IndexLockedError, StoreError

#: How often a waiting opener tries the lock again.
RETRY_S = 0.2


class LiteLock:
    """An ``fcntl`` lock on a side file of a Milvus Lite database.

    The lock file holds the owner's pid, to name it in the error. It sits beside the file with
    its links resolved, so that two routes to one file (a symbolic link, the real name) take the
    one lock.
    """

    def __init__(self, db_path: Path, wait: bool = False, timeout: float | None = None) -> None:
        real = db_path.resolve()
        self.path = real.with_name(real.name + ".lock")
        self.index = db_path
        self.wait = wait
        self.timeout = timeout
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc.strerror}; choose a writable place with --uri") from exc
        self._lock(fd)
        with contextlib.suppress(OSError):  # the pid is only for messages; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def wait_until_free(self) -> None:
        """Return once nobody holds the lock (at once if its file does not exist), creating
        nothing; without ``wait``, raise IndexLockedError if it is held."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file: nobody is making or using the index
        self._lock(fd)  # closes fd if it fails
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _lock(self, fd: int) -> None:
        """Lock ``fd`` exclusively, waiting if asked; on failure ``fd`` is closed."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    owner = _read_pid(fd)
                    os.close(fd)
                    who = f"pid {owner}" if owner else "another process"
                    raise IndexLockedError(
                        f"index {self.index} is being used by {who}: "
                        "wait for it to finish (or pass --wait), or use a Milvus server for "
                        "concurrent access"
                    ) from None
                time.sleep(RETRY_S)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
