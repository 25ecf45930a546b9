"""Where log lines go: stdout (with journald priority prefixes under the journal) and a
rotated file whose write failures are reported once, not once per line, and which one process
writes (and rotates) at a time."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from scheduler_publisher.logs.ecs import format_timestamp
from scheduler_publisher.logs.writer_lock import WriterLock

if TYPE_CHECKING:
    from scheduler_publisher.logs.setup import LogSettings

__all__ = ["FileHandler", "StdoutHandler", "file_reporter", "is_journal_stream"]


def _journald_priority(levelno: int) -> int:
    """sd-daemon(3) priority prefixes: journald files the line at it and strips the prefix."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def is_journal_stream(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """True when `stream` is the journal systemd connected: $JOURNAL_STREAM names its device and
    inode (systemd.exec(5)). A child whose stdout was redirected inherits the variable, but
    its stdout is another file, so the check fails there as it should."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False  # no file descriptor (io.StringIO raises UnsupportedOperation, a ValueError)
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class StdoutHandler(logging.StreamHandler[TextIO]):
    """Whole lines under the handler's lock, for log records and `echo_line` alike."""

    def __init__(self, stream: TextIO, *, journald: bool) -> None:
        super().__init__(stream)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self._journald:
            return text
        prefix = f"<{_journald_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))

    def write_line(self, text: str) -> None:
        self.acquire()  # the lock `handle` takes around each record
        try:
            self.stream.write(text + self.terminator)
            self.flush()
        finally:
            self.release()


# Tells stderr and stdout that the file failed or works again; returns the record it sent.
Report = Callable[[str, OSError | None], logging.LogRecord]


class FileHandler(logging.handlers.RotatingFileHandler):
    """A rotated file whose write failures (disk full, file gone read-only) are reported once,
    and once more on recovery, instead of one `--- Logging error ---` traceback per record.

    A missing folder is created with the first line written to it, not before: a start that
    fails before logging anything leaves no empty `./logs/` behind.

    The file is opened only under its writer lock (writer_lock.py), taken at the first open
    and held until close(): two processes on one file would rotate it under each other. When
    the folder exists, that is at construction, which then raises FileInUseError; otherwise
    a second writer's lines fail (reported once, as any write failure) and never touch it."""

    def __init__(self, path: Path, settings: LogSettings, report: Report) -> None:
        self.path = path  # before super().__init__, which may call _open()
        self.writer: WriterLock | None = None
        super().__init__(
            path,
            maxBytes=settings.file_max_bytes,
            backupCount=settings.file_backups,
            encoding="utf-8",
            delay=not path.parent.is_dir(),
        )
        self._report = report
        self._failure: OSError | None = None
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under the handler's lock (Handler.handle), so the state needs no lock of its own.
        self._failure = None
        self._reopen_if_moved()
        super().emit(record)
        failure = self._take_failure()
        if failure is not None and not self._failing:
            self._failing = True
            self._report("log_file_write_failed", failure)
        elif failure is None and self._failing:
            self._failing = False
            # Into the file too, so the file shows where its gap ends.
            super().emit(self._report("log_file_write_recovered", None))

    def _open(self) -> Any:  # the stdlib's name and (untyped) signature
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.writer is None:  # a rotation reopens the file under the lock it holds
            self.writer = WriterLock.acquire(self.path, "log file")
        return super()._open()

    def close(self) -> None:
        try:
            super().close()
        finally:
            writer, self.writer = self.writer, None
            if writer is not None:
                writer.release()

    @property
    def opened(self) -> bool:
        return self.stream is not None

    def reopen(self) -> None:
        """Close the file, so that the next line opens its path again (SIGHUP, after
        logrotate's rename): the lines go to the new file, not the renamed one. Any thread."""
        self.acquire()
        try:
            self._swap_stream()
        finally:
            self.release()

    def _reopen_if_moved(self) -> None:
        """The path no longer names the open file (renamed, deleted or replaced): open it
        again, as logging's WatchedFileHandler does. One stat per line; lines are few."""
        if self.stream is None:
            return
        try:
            at_path = self.path.stat()
            opened = os.fstat(self.stream.fileno())
        except FileNotFoundError:
            self._swap_stream()
            return
        except (OSError, ValueError):
            return  # the write that follows reports a file that fails
        if (at_path.st_dev, at_path.st_ino) != (opened.st_dev, opened.st_ino):
            self._swap_stream()

    def _swap_stream(self) -> None:
        """Close the stream; the next line opens the path again (emit does, under the writer
        lock this process holds, and reports a failure to open as any write failure)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):  # a full disk's unflushed tail: the file is gone
                stream.close()

    def _take_failure(self) -> OSError | None:
        failure, self._failure = self._failure, None
        return failure

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 -- stdlib name
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self._failure = exc
        else:
            super().handleError(record)  # a bug, not the disk: keep the stdlib's traceback


def _own_record(level: int, event: str, **fields: Any) -> logging.LogRecord:
    """A record that the formatter treats as one of ours (see `wrap_for_formatter`), for
    handlers to receive directly, without passing through the logger and every handler."""
    record = logging.LogRecord(__name__, level, __file__, 0, None, None, None)
    record.msg = {
        "event": event,
        "level": logging.getLevelName(level).lower(),
        "logger": __name__,
        "@timestamp": format_timestamp(record.created),
        **fields,
    }
    record.__dict__.update(_logger=None, _name=logging.getLevelName(level).lower())
    return record


def file_reporter(path: Path, stdout: logging.Handler) -> Report:
    def report(event: str, error: OSError | None) -> logging.LogRecord:
        if error is not None:
            sys.stderr.write(
                f"scheduler-publisher: cannot write the log file {path}: {error}; "
                "logging continues on stdout and retries the file\n"
            )
            record = _own_record(logging.ERROR, event, path=str(path), error=str(error))
        else:
            sys.stderr.write(f"scheduler-publisher: the log file {path} is writable again\n")
            record = _own_record(logging.WARNING, event, path=str(path))
        stdout.handle(record)
        return record

    return report
