"""Exclusive ownership of a data directory by one process.

Two Pullers appending to one log directory, or two Streamers replacing one
progress file, corrupt each other's data without noticing. The owner of a
directory takes a ``flock`` on ``DIR/LOCK`` and writes its pid there; a
second process is refused with the holder's pid. The kernel drops the lock
when its holder exits, however it exits (``kill -9`` included), so a crash
never leaves a stale lock behind. The file descriptor is not inherited by
child processes (Python's default), so a child cannot keep the lock alive.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from streamer.errors import StreamerError

LOCK_NAME = "LOCK"


class DirectoryInUse(StreamerError, BlockingIOError):
    """Another process holds the directory's lock; the message names it."""


class DirectoryLock:
    """``acquire`` takes the lock (raising ``DirectoryInUse`` when another
    process has it, ``OSError`` when the file cannot be created);
    ``release`` gives it back."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DirectoryInUse(
                f"{self.path.parent} is in use by another process (pid {holder}); "
                "one process per directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing drops the flock; the file stays (removing it would race
            # with a process that has just opened it).
            os.close(self._fd)
            self._fd = None
