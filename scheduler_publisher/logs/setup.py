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

import contextlib
import errno
import logging
import logging.handlers
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from scheduler_publisher.logs import ecs
from scheduler_publisher.logs.ecs import format_timestamp
from scheduler_publisher.logs.log_outputs import (
    FileHandler,
    StdoutHandler,
    file_reporter,
    is_journal_stream,
)
from scheduler_publisher.logs.redaction import (
    escape_controls,
    escape_for_terminal,
    redact,
    register_secret,
)
from scheduler_publisher.logs.writer_lock import FileInUseError

__all__ = [
    "LogFormat",
    "LogSettings",
    "configure_logging",
    "echo_line",
    "get_logger",
    "log_startup_failure",
    "register_secret",
    "reopen_log_file",
    "shutdown_logging",
]

LogFormat = Literal["json", "console"]

_OWN_PREFIX = "scheduler_publisher."
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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


# --- processors ------------------------------------------------------------------------------
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
    """`error.type`: a builtin's name, a library's module and class, or for the package's own
    errors its subpackage and class (`scheduler_publisher.config.ConfigError`), which does not
    change when a module inside a subpackage is split or renamed."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    module = cls.__module__
    if module.startswith(_OWN_PREFIX):
        module = ".".join(module.split(".")[:2])
    return f"{module}.{cls.__qualname__}"


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
        shaped = ecs.shape(
            event_dict,
            service_name=self.service_name,
            service_version=self.service_version,
            pid=os.getpid(),
        )
        return ecs.cap_lists(shaped)


def _render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    return ecs.render_line(event_dict)


def _cap_lists(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    return ecs.cap_lists(event_dict)


_RECORD_KEYS = frozenset(logging.LogRecord("n", 0, "p", 0, "m", (), None).__dict__)


def _add_extras(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor (foreign records): `extra=` fields become fields. Unlike structlog's
    ExtraAdder, an extra named like a key the pipeline owns ("event" is the message) cannot
    overwrite it: it moves under the project's namespace."""
    record = event_dict.get("_record")
    for key, value in record.__dict__.items() if record is not None else ():
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
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_FOREIGN_PRE_CHAIN, processors=list(processors)
    )


def _json_formatter(service_name: str, service_version: str) -> logging.Formatter:
    # No remove_processors_meta: the shape step reads `_from_structlog`, then drops the meta.
    return _formatter(
        [error_fields, redact, _EcsShape(service_name, service_version), _render_json]
    )


def _console_formatter(stream: TextIO) -> logging.Formatter:
    renderer = structlog.dev.ConsoleRenderer(
        colors=stream.isatty(),
        # The default (Rich, when installed) shows locals; the traceback is already a string.
        exception_formatter=structlog.dev.plain_traceback,
        timestamp_key="@timestamp",
    )
    return _formatter(
        [
            structlog.processors.format_exc_info,
            redact,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _cap_lists,
            escape_for_terminal,
            renderer,
        ]
    )


# --- installation ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Installed:
    stdout: StdoutHandler
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
    """Route structlog and stdlib records to stdout (and the file), replacing any earlier set-up.

    Raises FileInUseError (writer_lock.py) when another process writes the log file: logging
    then goes to stdout only, and the caller decides whether to go on."""
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
    in_use: FileInUseError | None = None
    with _install_lock:
        previous = _installed
        if previous is not None:
            _uninstall(previous.handlers)  # first: its file's lock, if the file is the same
        console = _console_handler(settings, out, version)
        try:
            file_handler, file_error = _open_file_handler(settings, version, console)
        except FileInUseError as exc:
            file_handler, file_error, in_use = None, None, exc
        _installed = _Installed(
            console,
            file_handler,
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
    _report_file(settings, file_handler, file_error)
    if in_use is not None:
        raise in_use


def _console_handler(settings: LogSettings, out: TextIO, version: str) -> StdoutHandler:
    console = StdoutHandler(out, journald=is_journal_stream(out))
    console.setFormatter(
        _console_formatter(out)
        if settings.format == "console"
        else _json_formatter(settings.service_name, version)
    )
    return console


def _report_file(
    settings: LogSettings, handler: logging.Handler | None, error: OSError | None
) -> None:
    log = get_logger("scheduler_publisher.logs")
    if error is not None:
        log.warning("log_file_unavailable", path=str(settings.file), error=str(error))
    writer = handler.writer if isinstance(handler, FileHandler) else None
    if writer is not None and writer.unsupported is not None:
        log.warning(
            "file_lock_unsupported",
            path=str(settings.file),
            error=writer.unsupported,
            hint="another process could write the file too",
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
    settings: LogSettings,
    version: str,
    stdout: logging.Handler,
) -> tuple[logging.Handler | None, OSError | None]:
    if settings.file is None:
        return None, None
    try:
        _check_folder(settings.file.parent)
        handler = FileHandler(settings.file, settings, file_reporter(settings.file, stdout))
    except FileInUseError:
        raise  # not a file to do without: the caller refuses to start
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


def reopen_log_file() -> None:
    """SIGHUP: the log file's next line goes to its path afresh (logrotate renamed it, or
    removed it and wants a new one). Nothing when no file is written."""
    installed = _installed
    if installed is not None and isinstance(installed.file, FileHandler):
        installed.file.reopen()


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


def log_startup_failure(
    settings: LogSettings, error: BaseException, *, exit_code: int, stream: TextIO | None = None
) -> None:
    """Log why the service could not start (`service_start_failed`), to stdout and the log file.

    When logging is not set up yet, it is set up for this one line. The log file gets it only
    when the file is already open (its folder existed): a failed start creates no folder.
    """
    temporary = _installed is None
    if temporary:
        # Another process's log file stays theirs: the line then goes to stdout only.
        with contextlib.suppress(FileInUseError):
            configure_logging(settings, stream=stream)
    installed = _installed
    unopened = (
        installed.file
        if installed is not None
        and isinstance(installed.file, FileHandler)
        and not installed.file.opened
        else None
    )
    root = logging.getLogger()
    if unopened is not None:
        root.removeHandler(unopened)
    try:
        get_logger("scheduler_publisher.cli").error(
            "service_start_failed", error=error, **{"process.exit_code": exit_code}
        )
    finally:
        if temporary:
            shutdown_logging()
        elif unopened is not None:
            root.addHandler(unopened)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger whose `name` becomes the `log.logger` field."""
    return structlog.stdlib.get_logger(name)
