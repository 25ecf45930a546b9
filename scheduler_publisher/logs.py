"""structlog set-up: one JSON line per event; paho and APScheduler records rendered the same way.

Every record, ours or a foreign stdlib one, reaches the root logger's handlers and is rendered
by a `structlog.stdlib.ProcessorFormatter`; the redaction step runs last before the renderer,
so no destination can see a value that the pipeline has not scrubbed.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LogFormat",
    "LogSettings",
    "configure_logging",
    "get_logger",
    "register_secret",
    "shutdown_logging",
]

LogFormat = Literal["json", "console"]

REDACTED = "***"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SENSITIVE_KEY = re.compile("password|passwd|secret|token|authorization", re.IGNORECASE)
# Fields we generate ourselves: a very short registered secret ("1") must not mangle them.
_GENERATED_KEYS = frozenset({"@timestamp", "level", "log.level"})
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
# swaps in a new immutable tuple (longest first, so a secret containing another is hidden whole).
_secrets: tuple[str, ...] = ()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Hide every later occurrence of `value` in rendered log fields."""
    global _secrets  # noqa: PLW0603 -- a process-wide registry is the point
    if not value:
        return
    with _secrets_lock:
        if value not in _secrets:
            _secrets = tuple(sorted({*_secrets, value}, key=len, reverse=True))


def _hide_secrets(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _clean(value: Any, secrets: tuple[str, ...]) -> Any:
    """Redact sensitive keys at any depth and, when secrets are registered, their values."""
    if isinstance(value, str):
        return _hide_secrets(value, secrets) if secrets else value
    if isinstance(value, dict):
        return {k: _clean_field(k, v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, secrets) for v in value]
    if secrets and not isinstance(value, _SCALARS):
        # The renderers would repr() it anyway; do it first so the repr is scrubbed too.
        return _hide_secrets(repr(value), secrets)
    return value


def _clean_field(key: Any, value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(key, str) and _SENSITIVE_KEY.search(key):
        return REDACTED
    return _clean(value, secrets)


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: sensitive keys become "***", and so does every registered secret."""
    secrets = _secrets
    return {
        key: value if key in _GENERATED_KEYS else _clean_field(key, value, secrets)
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


@dataclass(frozen=True, slots=True)
class _EcsShape:
    """Renames structlog's keys to the ECS names ELK expects, and puts those first."""

    service_name: str

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        shaped: EventDict = {
            "@timestamp": event_dict.pop("@timestamp", None),
            "log.level": event_dict.pop("level", None),
            "log.logger": event_dict.pop("logger", None),
            "message": event_dict.pop("event", None),
            "service.name": self.service_name,
        }
        if "exception" in event_dict:
            event_dict["error.stack_trace"] = event_dict.pop("exception")
        shaped.update(event_dict)
        return shaped


_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _add_timestamp,
]
# Extras only exist on foreign records: ours carry their fields as keywords.
_FOREIGN_PRE_CHAIN: list[Processor] = [*_SHARED, structlog.stdlib.ExtraAdder()]
_STRUCTLOG_CHAIN: list[Processor] = [
    structlog.stdlib.filter_by_level,
    *_SHARED,
    structlog.processors.StackInfoRenderer(),
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,  # must be last
]


def _formatter(renderer: Iterable[Processor]) -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_FOREIGN_PRE_CHAIN,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # A plain string traceback: never dict_tracebacks, whose locals would hold passwords.
            structlog.processors.format_exc_info,
            *renderer,
        ],
    )


def _json_formatter(service_name: str) -> logging.Formatter:
    return _formatter([_EcsShape(service_name), redact, structlog.processors.JSONRenderer()])


def _console_formatter(stream: TextIO) -> logging.Formatter:
    renderer = structlog.dev.ConsoleRenderer(
        colors=stream.isatty(),
        # The default (Rich, when installed) shows locals; the traceback is already a string.
        exception_formatter=structlog.dev.plain_traceback,
        timestamp_key="@timestamp",
    )
    return _formatter([redact, renderer])


# --- installation ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Installed:
    handlers: tuple[logging.Handler, ...]
    previous_root_level: int
    previous_apscheduler_level: int


_installed: _Installed | None = None
_install_lock = threading.Lock()


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
    root = logging.getLogger()
    apscheduler = logging.getLogger("apscheduler")
    with _install_lock:
        previous = _installed
        if previous is not None:
            _uninstall(previous.handlers)
        console = logging.StreamHandler(out)
        console.setFormatter(
            _console_formatter(out) if settings.format == "console"
            else _json_formatter(settings.service_name)
        )
        file_handler, file_error = _open_file_handler(settings)
        handlers = (console,) if file_handler is None else (console, file_handler)
        _installed = _Installed(
            handlers,
            previous.previous_root_level if previous else root.level,
            previous.previous_apscheduler_level if previous else apscheduler.level,
        )
        level = logging.getLevelNamesMapping()[settings.level.upper()]
        root.setLevel(level)
        # APScheduler logs two INFO lines per job run.
        apscheduler.setLevel(max(level, logging.WARNING))
        for handler in handlers:
            handler.addFilter(_not_watchdog_debug)
            root.addHandler(handler)
    if file_error is not None:
        get_logger(__name__).warning(
            "log_file_unavailable", path=str(settings.file), error=str(file_error)
        )


def _not_watchdog_debug(record: logging.LogRecord) -> bool:
    # watchdog logs every event in the config's folder at DEBUG: with the log file (or the
    # redirected stdout) in that folder, each line would trigger the next one, forever.
    return record.levelno >= logging.INFO or not record.name.startswith("watchdog")


def _open_file_handler(
    settings: LogSettings,
) -> tuple[logging.Handler | None, OSError | None]:
    if settings.file is None:
        return None, None
    try:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            settings.file,
            maxBytes=settings.file_max_bytes,
            backupCount=settings.file_backups,
            encoding="utf-8",
        )
    except OSError as exc:
        return None, exc
    handler.setFormatter(_json_formatter(settings.service_name))
    return handler, None


def _uninstall(handlers: Iterable[logging.Handler]) -> None:
    root = logging.getLogger()
    for handler in handlers:
        root.removeHandler(handler)
        handler.flush()
        handler.close()  # a StreamHandler leaves its stream open; the file handler closes


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


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger whose `name` becomes the `log.logger` field."""
    return structlog.stdlib.get_logger(name)
