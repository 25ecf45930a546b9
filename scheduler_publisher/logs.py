"""structlog set-up: one ECS JSON line per event; paho and APScheduler records rendered alike.

Every record, ours or a foreign stdlib one, reaches the root logger's handlers and is rendered
by a `structlog.stdlib.ProcessorFormatter`. The steps after it (docs/logging.md):

1. exceptions become `error.type`, `error.message` and a plain `error.stack_trace`;
2. redaction, before any renderer, so no destination sees a value the pipeline has not
   scrubbed;
3. the ECS shape (`ecs.py`) and the 8 KiB line cap, for stdout JSON and the file alike.

stdout has one writer: the handler's lock also serialises `echo_line`, so `--echo` output and
log lines never split each other.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from scheduler_publisher import ecs

__all__ = [
    "LogFormat",
    "LogSettings",
    "configure_logging",
    "echo_line",
    "get_logger",
    "log_startup_failure",
    "register_secret",
    "shutdown_logging",
]

LogFormat = Literal["json", "console"]

REDACTED = "***"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SENSITIVE_KEY = re.compile("password|passwd|secret|token|authorization", re.IGNORECASE)
# Written by the pipeline or the code, never by a peer: a registered secret that happens to be
# a substring of one ("mqtt", "publisher") must not rewrite it (and so give itself away).
_NEVER_REDACTED = frozenset({"@timestamp", "level", "logger", "error.type", "_record",
                             "_from_structlog"})
_SCALARS = (int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = "INFO"
    format: LogFormat = "json"  # stdout only; the file is always JSON
    file: Path | None = Path("logs/mqtt_publisher.log")
    file_max_bytes: int = 10 * 1024 * 1024
    file_backups: int = 5
    service_name: str = "scheduler-publisher"

    def __post_init__(self) -> None:
        problems = []
        if self.level.upper() not in _LEVELS:
            problems.append(f"level: must be one of {', '.join(_LEVELS)}, got {self.level!r}")
        if self.format not in get_args(LogFormat):
            problems.append(f"format: must be 'json' or 'console', got {self.format!r}")
        if self.file_max_bytes < 0:
            problems.append(f"file_max_bytes: must be >= 0, got {self.file_max_bytes}")
        if self.file_backups < 0:
            problems.append(f"file_backups: must be >= 0, got {self.file_backups}")
        if problems:
            raise ValueError("; ".join(problems))


# --- secrets registry ------------------------------------------------------------------------
# Any thread may register; the pipeline reads the tuple without locking because registration
# swaps in a new immutable tuple.
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Redact every later log value that contains `value`."""
    global _secrets  # noqa: PLW0603 -- a process-wide registry is the point
    if not value:
        return
    with _secrets_lock:
        if value not in _secrets:
            _secrets = (*_secrets, value)


def _hide_secrets(text: str, secrets: tuple[str, ...]) -> str:
    """A value that carries a secret is replaced whole (a multi-line one, line by line).

    Replacing only the secret inside it would show where it sat, and so what it is, whenever
    the rest of the value is known: "paho.***.client" gives the password "mqtt" away.
    """
    if not any(secret in text for secret in secrets):
        return text
    if "\n" not in text:
        return REDACTED
    return "\n".join(REDACTED if any(s in line for s in secrets) else line
                     for line in text.split("\n"))


def _clean(value: Any, secrets: tuple[str, ...]) -> Any:
    """Redact sensitive keys at any depth and, when secrets are registered, values carrying them."""
    if isinstance(value, str):
        return _hide_secrets(value, secrets) if secrets else value
    if isinstance(value, dict):
        return {k: _clean_field(k, v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, secrets) for v in value]
    if secrets and not isinstance(value, _SCALARS):
        # The renderers would str() it anyway; do it first so the text is scrubbed too.
        return _hide_secrets(str(value), secrets)
    return value


def _clean_field(key: Any, value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(key, str) and _SENSITIVE_KEY.search(key):
        return REDACTED
    return _clean(value, secrets)


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: sensitive keys become "***", and so does every value carrying a secret.

    Field names, logger names and our own event names are never touched; a foreign record's
    message is free text and is scrubbed like any value.
    """
    secrets = _secrets
    own_event = event_dict.get("_from_structlog", True)
    return {
        key: value
        if key in _NEVER_REDACTED or (key == "event" and own_event)
        else _clean_field(key, value, secrets)
        for key, value in event_dict.items()
    }


# --- processors ------------------------------------------------------------------------------
def format_timestamp(epoch: float) -> str:
    """UTC ISO-8601 with milliseconds and `Z`, e.g. 2026-01-02T03:04:05.678Z."""
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # A foreign record keeps the time it was created at, not the time it was formatted.
    record = event_dict.get("_record")
    event_dict["@timestamp"] = format_timestamp(record.created if record else time.time())
    return event_dict


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def _exc_info(value: Any) -> ExcInfo | None:
    if isinstance(value, BaseException):
        return type(value), value, value.__traceback__
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return type(value[1]), value[1], value[2]
    if value is True:
        exc = sys.exc_info()[1]
        return None if exc is None else (type(exc), exc, exc.__traceback__)
    return None


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def error_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: an exception (exc_info, or an exception passed as `error=`) becomes
    `error.type`, `error.message` and `error.stack_trace`: a plain string, never
    dict_tracebacks, whose locals would hold passwords."""
    error = event_dict.get("error")
    if isinstance(error, BaseException):
        del event_dict["error"]
        event_dict["error.type"] = _type_name(error)
        event_dict["error.message"] = str(error)
    info = _exc_info(event_dict.pop("exc_info", None))
    if info is not None:
        event_dict.setdefault("error.type", _type_name(info[1]))
        event_dict.setdefault("error.message", str(info[1]))
        event_dict["error.stack_trace"] = "".join(traceback.format_exception(*info)).rstrip("\n")
    return event_dict


@dataclass(frozen=True, slots=True)
class _EcsShape:
    """Processor: the ECS field names and order, with the service's constant fields."""

    service_name: str
    service_version: str

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        shaped = ecs.shape(event_dict, service_name=self.service_name,
                           service_version=self.service_version, pid=os.getpid())
        return ecs.cap_lists(shaped)


def _render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    return ecs.render_line(event_dict)


def _cap_lists(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    return ecs.cap_lists(event_dict)


# C0 and C1 controls, DEL, and the bidi overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """Control characters as visible escapes (\\x1b), so a value cannot drive the terminal."""
    pattern = _CONTROL_KEEP_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escape_char, text)


def _escape_value(value: Any) -> Any:
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, dict):
        return {_escape_value(k): _escape_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_value(v) for v in value]
    return value


def _escape_for_terminal(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor (console only; JSON escapes them itself): ids, topics and foreign messages
    come from files and peers, and must not reach a terminal as escape sequences."""
    return {
        escape_controls(str(key)): escape_controls(value, keep_newlines=True)
        if key == "exception" and isinstance(value, str) else _escape_value(value)
        for key, value in event_dict.items()
    }


_RECORD_KEYS = frozenset(logging.LogRecord("n", 0, "p", 0, "m", (), None).__dict__)


def _add_extras(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor (foreign records): `extra=` fields become fields. Unlike structlog's
    ExtraAdder, an extra named like a key the pipeline owns ("event" is the message) cannot
    overwrite it: it moves under the project's namespace."""
    record = event_dict.get("_record")
    for key, value in (record.__dict__.items() if record is not None else ()):
        if key not in _RECORD_KEYS:
            event_dict[f"{ecs.NAMESPACE}.{key}" if key in event_dict else key] = value
    return event_dict


_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _add_timestamp,
]
# Extras only exist on foreign records: ours carry their fields as keywords.
_FOREIGN_PRE_CHAIN: list[Processor] = [*_SHARED, _add_extras]
_STRUCTLOG_CHAIN: list[Processor] = [
    structlog.stdlib.filter_by_level,
    *_SHARED,
    structlog.processors.StackInfoRenderer(),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,  # must be last
]


def _formatter(processors: Iterable[Processor]) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_FOREIGN_PRE_CHAIN,
                                               processors=list(processors))


def _json_formatter(service_name: str, service_version: str) -> logging.Formatter:
    # No remove_processors_meta: the shape step reads `_from_structlog`, then drops the meta.
    return _formatter([error_fields, redact, _EcsShape(service_name, service_version),
                       _render_json])


def _console_formatter(stream: TextIO) -> logging.Formatter:
    renderer = structlog.dev.ConsoleRenderer(
        colors=stream.isatty(),
        # The default (Rich, when installed) shows locals; the traceback is already a string.
        exception_formatter=structlog.dev.plain_traceback,
        timestamp_key="@timestamp",
    )
    return _formatter([
        structlog.processors.format_exc_info,
        redact,
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _cap_lists,
        _escape_for_terminal,
        renderer,
    ])


# --- destinations ----------------------------------------------------------------------------
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


class _StdoutHandler(logging.StreamHandler[TextIO]):
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


class _FileHandler(logging.handlers.RotatingFileHandler):
    """A rotated file whose write failures (disk full, file gone read-only) are reported once,
    and once more on recovery, instead of one `--- Logging error ---` traceback per record.

    A missing folder is created with the first line written to it, not before: a start that
    fails before logging anything leaves no empty `./logs/` behind."""

    def __init__(self, path: Path, settings: LogSettings, report: Report) -> None:
        self.path = path  # before super().__init__, which may call _open()
        super().__init__(path, maxBytes=settings.file_max_bytes,
                         backupCount=settings.file_backups, encoding="utf-8",
                         delay=not path.parent.is_dir())
        self._report = report
        self._failure: OSError | None = None
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        # Runs under the handler's lock (Handler.handle), so the state needs no lock of its own.
        self._failure = None
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
        return super()._open()

    @property
    def opened(self) -> bool:
        return self.stream is not None

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
    record.msg = {"event": event, "level": logging.getLevelName(level).lower(),
                  "logger": __name__, "@timestamp": format_timestamp(record.created), **fields}
    record.__dict__.update(_logger=None, _name=logging.getLevelName(level).lower())
    return record


def _file_reporter(path: Path, stdout: logging.Handler) -> Report:
    def report(event: str, error: OSError | None) -> logging.LogRecord:
        if error is not None:
            sys.stderr.write(f"scheduler-publisher: cannot write the log file {path}: {error}; "
                             "logging continues on stdout and retries the file\n")
            record = _own_record(logging.ERROR, event, path=str(path), error=str(error))
        else:
            sys.stderr.write(f"scheduler-publisher: the log file {path} is writable again\n")
            record = _own_record(logging.WARNING, event, path=str(path))
        stdout.handle(record)
        return record
    return report


# --- installation ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Installed:
    stdout: _StdoutHandler
    file: logging.Handler | None
    previous_root_level: int
    previous_apscheduler_level: int

    @property
    def handlers(self) -> tuple[logging.Handler, ...]:
        return (self.stdout,) if self.file is None else (self.stdout, self.file)


_installed: _Installed | None = None
_install_lock = threading.Lock()
_echo_lock = threading.Lock()


def configure_logging(settings: LogSettings, *, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib records to stdout (and the file), replacing any earlier set-up."""
    global _installed  # noqa: PLW0603 -- logging is process-wide state by nature
    structlog.configure(
        processors=list(_STRUCTLOG_CHAIN),  # capture_logs edits the configured list in place
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Caching would pin loggers to one configuration; tests and capture_logs reconfigure.
        cache_logger_on_first_use=False,
    )
    out = sys.stdout if stream is None else stream
    version = _service_version()
    root = logging.getLogger()
    apscheduler = logging.getLogger("apscheduler")
    with _install_lock:
        previous = _installed
        if previous is not None:
            _uninstall(previous.handlers)
        console = _StdoutHandler(out, journald=is_journal_stream(out))
        console.setFormatter(
            _console_formatter(out) if settings.format == "console"
            else _json_formatter(settings.service_name, version)
        )
        file_handler, file_error = _open_file_handler(settings, version, console)
        _installed = _Installed(
            console, file_handler,
            previous.previous_root_level if previous else root.level,
            previous.previous_apscheduler_level if previous else apscheduler.level,
        )
        level = logging.getLevelNamesMapping()[settings.level.upper()]
        root.setLevel(level)
        # APScheduler logs two INFO lines per job run.
        apscheduler.setLevel(max(level, logging.WARNING))
        for handler in _installed.handlers:
            handler.addFilter(_not_watchdog_debug)
            root.addHandler(handler)
    if file_error is not None:
        get_logger(__name__).warning(
            "log_file_unavailable", path=str(settings.file), error=str(file_error)
        )


def _service_version() -> str:
    # Read late: this module is imported while the package's __init__ is still running.
    import scheduler_publisher  # noqa: PLC0415

    return str(getattr(scheduler_publisher, "__version__", "unknown"))


def _not_watchdog_debug(record: logging.LogRecord) -> bool:
    # watchdog logs every event in the config's folder at DEBUG: with the log file (or the
    # redirected stdout) in that folder, each line would trigger the next one, forever.
    return record.levelno >= logging.INFO or not record.name.startswith("watchdog")


def _open_file_handler(
    settings: LogSettings, version: str, stdout: logging.Handler,
) -> tuple[logging.Handler | None, OSError | None]:
    if settings.file is None:
        return None, None
    try:
        _check_folder(settings.file.parent)
        handler = _FileHandler(settings.file, settings,
                               _file_reporter(settings.file, stdout))
    except OSError as exc:
        return None, exc
    handler.setFormatter(_json_formatter(settings.service_name, version))
    return handler, None


def _check_folder(folder: Path) -> None:
    """Raise now, not at the first line, when `folder` cannot be (created and) written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "cannot write there", str(existing))


def _uninstall(handlers: Iterable[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        try:
            handler.flush()
            handler.close()  # a StreamHandler leaves its stream open; the file handler closes
        except OSError:
            pass  # a full disk keeps the last lines in the buffer: nothing left to tell anyone


def shutdown_logging() -> None:
    """Flush and close what `configure_logging` installed, and restore the levels it changed."""
    global _installed
    with _install_lock:
        installed, _installed = _installed, None
        if installed is None:
            return
        _uninstall(installed.handlers)
        logging.getLogger().setLevel(installed.previous_root_level)
        logging.getLogger("apscheduler").setLevel(installed.previous_apscheduler_level)


def echo_line(text: str) -> None:
    """Print one line on stdout (`--echo`) through the log stream's writer, so an echo line and
    a log line never split each other. Control characters are escaped: payloads come from
    anyone who can publish on the broker."""
    line = escape_controls(text)
    installed = _installed
    if installed is not None:
        installed.stdout.write_line(line)
        return
    with _echo_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def log_startup_failure(settings: LogSettings, error: BaseException, *, exit_code: int,
                        stream: TextIO | None = None) -> None:
    """Log why the service could not start (`service_start_failed`), to stdout and the log file.

    When logging is not set up yet, it is set up for this one line. The log file gets it only
    when the file is already open (its folder existed): a failed start creates no folder.
    """
    temporary = _installed is None
    if temporary:
        configure_logging(settings, stream=stream)
    installed = _installed
    unopened = installed.file if installed is not None and isinstance(
        installed.file, _FileHandler) and not installed.file.opened else None
    root = logging.getLogger()
    if unopened is not None:
        root.removeHandler(unopened)
    try:
        get_logger("scheduler_publisher.cli").error(
            "service_start_failed", error=error, **{"process.exit_code": exit_code})
    finally:
        if temporary:
            shutdown_logging()
        elif unopened is not None:
            root.addHandler(unopened)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger whose `name` becomes the `log.logger` field."""
    return structlog.stdlib.get_logger(name)
