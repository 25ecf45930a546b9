"""One writer per file: the log file and the state database are each written by one process.

Two processes on one state database delete each other's counters at every checkpoint, and two
on one log file rotate it under each other (issue 27 #2). A process that writes such a file
first takes an exclusive `flock` on `.<name>.lock` beside it (beside its real path, so a
symlink to the file finds the same lock) and holds it for as long as it writes; a second
writer, in another process or the same one, is refused with `FileInUseError`, naming the
holder's pid, which the holder writes into the lock file. The kernel drops the lock when its
holder exits, however it exits, so a lock file left behind is harmless and never removed
(removing it would race a process that has just opened it). SQLite's own locks do not serve:
they are taken per transaction, not for a process's life.

A lock file rather than a lock on the file itself: a rotation renames the log file and a
corrupt state database is moved aside (statestore.py), while the lock file stays put. The
name starts with a dot so that a log shipper's `mqtt_publisher.log*` does not read it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["FileInUseError", "WriterLock", "lock_path"]

# Filesystems without flock (some FUSE mounts): the file is used unlocked, and the caller says so.
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


class FileInUseError(OSError):
    """Another writer holds the file: `what` (the state database, the log file) at `path`, held
    by process `pid` (None when the lock file does not say)."""

    def __init__(self, what: str, path: Path, lock: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        self.what, self.path, self.lock, self.pid = what, path, lock, pid
        self.text = (
            f"{what} {path} is in use by {holder} (lock {lock}): one process writes a file; "
            f"give each process its own {_OPTION.get(what, 'file')}"
        )
        super().__init__(errno.EWOULDBLOCK, self.text)

    def __str__(self) -> str:
        return self.text  # one line, without OSError's "[Errno 11]"


_OPTION = {"state database": "--state-db", "log file": "--log-file"}


def lock_path(path: Path) -> Path:
    """`.<name>.lock` beside the real path of `path` (which need not exist yet)."""
    real = Path(os.path.realpath(path))
    return real.with_name(f".{real.name}.lock")


class WriterLock:
    """An exclusive lock on `path`'s lock file, held until `release()` (or the process ends).
    `unsupported` says why the filesystem could not lock (the file is then used unlocked)."""

    def __init__(self, lock: Path, fd: int | None, unsupported: str | None = None) -> None:
        self.lock = lock
        self.unsupported = unsupported
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path, what: str) -> WriterLock:
        """Take the lock of `path`, or raise FileInUseError; OSError when the lock file cannot
        be created (the folder is missing or read-only) or is a symlink."""
        lock = lock_path(path)
        # O_NOFOLLOW: a lock file planted as a symlink must not make us truncate its target.
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise FileInUseError(what, path, lock, pid) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                return cls(lock, None, f"cannot lock {lock}: {exc.strerror or exc}")
            raise
        with contextlib.suppress(OSError):  # the pid is only for the message: never fatal
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(lock, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let another writer have the file (idempotent): closing the descriptor drops the lock."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
