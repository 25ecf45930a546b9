"""The logging pipeline: JSON shape, foreign records, destinations, redaction, reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from scheduler_publisher.logs import (
    LogSettings,
    configure_logging,
    format_timestamp,
    get_logger,
    register_secret,
    shutdown_logging,
)

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ECS_KEYS = ["@timestamp", "log.level", "log.logger", "message", "service.name"]


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    shutdown_logging()


def configure(stream: io.StringIO, **overrides: Any) -> None:
    configure_logging(LogSettings(**{"file": None, **overrides}), stream=stream)


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def unique_secret() -> str:
    return f"s3cr3t-{uuid.uuid4().hex}"


def connect(password: str, message: str) -> None:
    """Fails with `password` as a local of the raising frame, as a real connect would."""
    raise ConnectionError(message)


def test_own_event_is_one_json_line_with_every_field(out: io.StringIO) -> None:
    """Our event renders as one JSON object with the ECS fields first, then its keywords."""
    configure(out, service_name="sp-test")
    get_logger("scheduler_publisher.config").info("config_reloaded", added=2, topics=["a/b"])

    (event,) = events(out)
    assert list(event)[:5] == ECS_KEYS
    assert TIMESTAMP.match(event["@timestamp"])
    assert event == {
        "@timestamp": event["@timestamp"],
        "log.level": "info",
        "log.logger": "scheduler_publisher.config",
        "message": "config_reloaded",
        "service.name": "sp-test",
        "added": 2,
        "topics": ["a/b"],
    }


def test_timestamp_is_utc_with_milliseconds() -> None:
    """Epoch seconds format as UTC ISO-8601 with three fractional digits and Z."""
    assert format_timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert format_timestamp(1_767_225_600.0429) == "2026-01-01T00:00:00.042Z"


def test_exception_logs_at_error_with_a_traceback_without_locals(out: io.StringIO) -> None:
    """log.exception gives level "error" and a string traceback that shows no local values."""
    configure(out)
    local_value = f"local-{uuid.uuid4().hex}"
    try:
        connect(local_value, "broker unreachable")
    except ConnectionError:
        get_logger("t").exception("connect_failed", attempt=3)

    (event,) = events(out)
    assert event["log.level"] == "error"
    trace = event["error.stack_trace"]
    assert isinstance(trace, str)
    assert trace.startswith("Traceback (most recent call last):")
    assert "ConnectionError: broker unreachable" in trace
    assert local_value not in out.getvalue()
    assert "exception" not in event
    assert "exc_info" not in event


def test_foreign_paho_record_has_the_same_shape(out: io.StringIO) -> None:
    """A stdlib record from paho comes out with the same fields, its text as the message."""
    configure(out)
    logging.getLogger("paho.mqtt.client").warning("Connection lost rc=%d", 7, extra={"peer": "b1"})

    (event,) = events(out)
    assert list(event)[:5] == ECS_KEYS
    assert TIMESTAMP.match(event["@timestamp"])
    assert event["log.level"] == "warning"
    assert event["log.logger"] == "paho.mqtt.client"
    assert event["message"] == "Connection lost rc=7"
    assert event["service.name"] == "scheduler-publisher"
    assert event["peer"] == "b1"


def test_apscheduler_info_is_suppressed_and_warning_kept(out: io.StringIO) -> None:
    """APScheduler's per-run INFO lines are dropped even at DEBUG; its warnings still show."""
    configure(out, level="DEBUG")
    scheduler_log = logging.getLogger("apscheduler.executors.default")
    scheduler_log.info('Running job "publish"')
    scheduler_log.warning('Run time of job "publish" was missed by 0:00:02')

    assert [e["message"] for e in events(out)] == [
        'Run time of job "publish" was missed by 0:00:02'
    ]


def test_console_format_renders_human_text_without_colours(out: io.StringIO) -> None:
    """format="console" writes structlog's key=value text, with no ANSI codes on a non-TTY."""
    configure(out, format="console")
    get_logger("scheduler_publisher.service").info("service_started", entries=3)

    text = out.getvalue()
    assert "service_started" in text
    assert "entries=3" in text
    assert "[scheduler_publisher.service]" in text
    assert "\x1b[" not in text
    with pytest.raises(ValueError):
        json.loads(text)


def test_file_is_json_and_rotates(out: io.StringIO, tmp_path: Path) -> None:
    """The file (parent created on demand) gets JSON lines even with console stdout, and rotates."""
    path = tmp_path / "nested" / "dir" / "app.log"
    configure(out, format="console", file=path, file_max_bytes=300, file_backups=2)
    log = get_logger("t")
    for i in range(10):
        log.info("tick", n=i)
    shutdown_logging()

    backup = path.with_name("app.log.1")
    assert backup.exists()
    lines = [*backup.read_text().splitlines(), *path.read_text().splitlines()]
    assert lines
    assert all(json.loads(line)["message"] == "tick" for line in lines)
    assert not path.with_name("app.log.3").exists()


def test_sensitive_keys_are_redacted(out: io.StringIO) -> None:
    """Fields named like password/passwd/secret/token/authorization become "***" at any depth."""
    configure(out)
    get_logger("t").info(
        "connecting", password="p1", DB_PASSWD="p2", client_secret="p3", ApiToken="p4",
        Authorization="p5", auth={"password": "p6", "user": "bob"}, user="bob",
    )
    logging.getLogger("paho.mqtt.client").info("connect", extra={"mqtt_password": "p7"})

    own, foreign = events(out)
    for key in ("password", "DB_PASSWD", "client_secret", "ApiToken", "Authorization"):
        assert own[key] == "***"
    assert own["auth"] == {"password": "***", "user": "bob"}
    assert own["user"] == "bob"
    assert foreign["mqtt_password"] == "***"
    assert not re.search(r"\bp\d\b", out.getvalue())


def test_registered_secret_is_hidden_everywhere(out: io.StringIO) -> None:
    """A registered value is masked in fields, foreign messages and exception text, at any level."""
    secret = unique_secret()
    register_secret(secret)
    configure(out, level="DEBUG")
    log = get_logger("t")
    log.debug("connect_args", url=f"mqtt://bob:{secret}@broker", args=[secret, 1])
    logging.getLogger("paho.mqtt.client").debug("CONNECT u=bob p=%s", secret)
    try:
        connect("", f"bad credentials {secret}")
    except ConnectionError:
        log.exception("connect_failed")

    assert secret not in out.getvalue()
    own, foreign, failure = events(out)
    assert own["url"] == "mqtt://bob:***@broker"
    assert own["args"] == ["***", 1]
    assert foreign["message"] == "CONNECT u=bob p=***"
    assert "ConnectionError: bad credentials ***" in failure["error.stack_trace"]


def test_registered_secret_is_hidden_in_console_output(out: io.StringIO) -> None:
    """The console renderer is fed the same scrubbed fields as the JSON one."""
    secret = unique_secret()
    register_secret(secret)
    configure(out, format="console")
    get_logger("t").warning("odd_value", value=secret)

    assert secret not in out.getvalue()
    assert "***" in out.getvalue()


def test_empty_secret_is_ignored(out: io.StringIO) -> None:
    """Registering "" changes nothing (it would otherwise match everywhere)."""
    register_secret("")
    configure(out)
    get_logger("t").info("plain", text="visible")

    assert events(out)[0]["text"] == "visible"


def test_level_filters_own_and_foreign_records(out: io.StringIO) -> None:
    """Below the configured level nothing is written, from structlog or from stdlib loggers."""
    configure(out, level="warning")
    log = get_logger("t")
    log.debug("dropped_debug")
    log.info("dropped_info")
    logging.getLogger("paho.mqtt.client").info("dropped foreign")
    log.warning("kept_warning")
    logging.getLogger("paho.mqtt.client").error("kept foreign")

    assert [(e["log.level"], e["message"]) for e in events(out)] == [
        ("warning", "kept_warning"),
        ("error", "kept foreign"),
    ]


def test_reconfiguration_replaces_handlers(out: io.StringIO) -> None:
    """Configuring again swaps the handlers: no duplicate lines, the old stream gets nothing."""
    old = io.StringIO()
    configure(old)
    configure(out)
    configure(out, service_name="second")
    get_logger("t").info("once")

    assert old.getvalue() == ""
    assert [(e["message"], e["service.name"]) for e in events(out)] == [("once", "second")]


def test_shutdown_detaches_handlers_and_restores_levels(out: io.StringIO) -> None:
    """After shutdown_logging nothing reaches the stream and the root level is back."""
    root_level = logging.getLogger().level
    configure(out, level="ERROR")
    shutdown_logging()
    shutdown_logging()
    get_logger("t").error("after_shutdown")

    assert out.getvalue() == ""
    assert logging.getLogger().level == root_level


def test_unusable_log_file_warns_and_continues(out: io.StringIO, tmp_path: Path) -> None:
    """A log file whose directory cannot be created is skipped with a warning, never a crash."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    configure(out, file=blocker / "logs" / "app.log")
    get_logger("t").info("still_logging")

    warning, event = events(out)
    assert warning["message"] == "log_file_unavailable"
    assert warning["log.level"] == "warning"
    assert warning["path"] == str(blocker / "logs" / "app.log")
    assert event["message"] == "still_logging"


def test_invalid_settings_report_every_problem() -> None:
    """Bad settings raise once, naming each bad field."""
    with pytest.raises(ValueError) as info:
        LogSettings(level="LOUD", format="xml", file_max_bytes=-1, file_backups=-1)  # type: ignore[arg-type]

    for field in ("level", "format", "file_max_bytes", "file_backups"):
        assert f"{field}:" in str(info.value)


def test_lines_from_many_threads_do_not_interleave(out: io.StringIO) -> None:
    """Concurrent loggers each produce whole lines."""
    configure(out)
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        start.wait(5)
        log = get_logger(f"worker{n}")
        for i in range(100):
            log.info("tick", worker=n, i=i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    assert len(events(out)) == 400


def test_capture_logs_works_after_configuration(out: io.StringIO) -> None:
    """capture_logs sees events from get_logger loggers, and the JSON output resumes after it."""
    log = get_logger("t")
    configure(out)
    log.info("before_capture")
    with structlog.testing.capture_logs() as captured:
        log.info("captured_event", n=1)
    log.info("after_capture")

    assert captured == [{"event": "captured_event", "n": 1, "log_level": "info"}]
    assert [e["message"] for e in events(out)] == ["before_capture", "after_capture"]
