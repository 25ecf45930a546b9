"""The logging pipeline: JSON shape, foreign records, destinations, redaction, reconfiguration."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from scheduler_publisher import __version__
from scheduler_publisher.logs import redaction
from scheduler_publisher.logs.ecs import format_timestamp
from scheduler_publisher.logs.setup import (
    LogSettings,
    configure_logging,
    echo_line,
    get_logger,
    log_startup_failure,
    register_secret,
    shutdown_logging,
)

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ECS_KEYS = [
    "@timestamp",
    "log.level",
    "message",
    "ecs.version",
    "log.logger",
    "service.name",
    "service.version",
    "process.pid",
]


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
    assert list(event)[:8] == ECS_KEYS
    assert TIMESTAMP.match(event["@timestamp"])
    assert event == {
        "@timestamp": event["@timestamp"],
        "log.level": "info",
        "message": "config_reloaded",
        "ecs.version": "9.4.0",
        "log.logger": "scheduler_publisher.config",
        "service.name": "sp-test",
        "service.version": __version__,
        "process.pid": os.getpid(),
        "event.action": "config_reloaded",
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
    assert event["error.type"] == "ConnectionError"
    assert event["error.message"] == "broker unreachable"
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
    assert list(event)[:8] == ECS_KEYS
    assert TIMESTAMP.match(event["@timestamp"])
    assert "event.action" not in event  # free text, not one of our event names
    assert event["log.level"] == "warning"
    assert event["log.logger"] == "paho.mqtt.client"
    assert event["message"] == "Connection lost rc=7"
    assert event["service.name"] == "scheduler-publisher"
    assert event["peer"] == "b1"


def test_foreign_exception_gets_the_same_error_fields(out: io.StringIO) -> None:
    """A stdlib logger.exception (APScheduler's "Job raised") gives error.type, error.message
    and error.stack_trace like ours."""
    configure(out)
    try:
        connect("", "no route")
    except ConnectionError:
        logging.getLogger("apscheduler.executors.default").exception("Job %r raised", "j1")

    (event,) = events(out)
    assert event["message"] == "Job 'j1' raised"
    assert (event["error.type"], event["error.message"]) == ("ConnectionError", "no route")
    assert event["error.stack_trace"].endswith("ConnectionError: no route")


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


def test_the_log_folder_is_created_by_the_first_line_not_before(
    out: io.StringIO, tmp_path: Path
) -> None:
    """A missing log folder appears with the first line written to it, not at set-up."""
    path = tmp_path / "logs" / "app.log"
    configure(out, file=path)
    assert not path.parent.exists()

    get_logger("t").info("first")
    shutdown_logging()
    assert json.loads(path.read_text())["message"] == "first"


def test_sensitive_keys_are_redacted(out: io.StringIO) -> None:
    """Fields named like password/passwd/secret/token/authorization become "***" at any depth."""
    configure(out)
    get_logger("t").info(
        "connecting",
        password="p1",
        DB_PASSWD="p2",
        client_secret="p3",
        ApiToken="p4",
        Authorization="p5",
        auth={"password": "p6", "user": "bob"},
        user="bob",
    )
    logging.getLogger("paho.mqtt.client").info("connect", extra={"mqtt_password": "p7"})

    own, foreign = events(out)
    for key in ("password", "DB_PASSWD", "client_secret", "ApiToken", "Authorization"):
        assert own[key] == "***"
    assert own["auth"] == {"password": "***", "user": "bob"}
    assert own["scheduler_publisher.user"] == "bob"  # `user` is an ECS field set
    assert foreign["mqtt_password"] == "***"
    assert not re.search(r"\bp\d\b", out.getvalue())


def test_registered_secret_is_hidden_everywhere(out: io.StringIO) -> None:
    """A value carrying a registered secret is replaced whole, in fields, foreign messages and
    exception text (there line by line), at any level."""
    secret = unique_secret()
    register_secret(secret)
    configure(out, level="DEBUG")
    log = get_logger("t")
    log.debug("connect_args", target=f"mqtt://bob:{secret}@broker", args=[secret, 1])
    logging.getLogger("paho.mqtt.client").debug("CONNECT u=bob p=%s", secret)
    try:
        connect("", f"bad credentials {secret}")
    except ConnectionError:
        log.exception("connect_failed")

    assert secret not in out.getvalue()
    own, foreign, failure = events(out)
    assert own["target"] == "***"
    assert own["args"] == ["***", 1]
    assert foreign["message"] == "***"
    assert failure["error.message"] == "***"
    trace = failure["error.stack_trace"].splitlines()
    assert trace[0] == "Traceback (most recent call last):"
    assert trace[-1] == "***"


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
    assert "error.message" in warning
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


# ---- ECS field mapping ----------------------------------------------------------------------


def test_error_string_and_exception_become_ecs_error_fields(out: io.StringIO) -> None:
    """`error="text"` becomes error.message; an exception passed as `error` adds error.type."""
    configure(out)
    log = get_logger("t")
    log.error("config_reload_failed", error="not JSON at line 3", kept_entries=2)
    log.error("state_checkpoint_failed", error=PermissionError(13, "Permission denied"))

    text, exc = events(out)
    assert "error" not in text
    assert text["error.message"] == "not JSON at line 3"
    assert "error.type" not in text
    assert exc["error.type"] == "PermissionError"
    assert exc["error.message"] == "[Errno 13] Permission denied"


def test_endpoints_become_server_address_and_port(out: io.StringIO) -> None:
    """host/port (HTTP) and broker="host:port" (MQTT, IPv6 too) are logged as server.*."""
    configure(out)
    log = get_logger("t")
    log.info("http_listening", host="127.0.0.1", port=8080)
    log.info("mqtt_connected", broker="[::1]:8883", client_id="c1")
    log.info("mqtt_connected", broker="broker.example")

    http, mqtt6, bare = events(out)
    assert (http["server.address"], http["server.port"]) == ("127.0.0.1", 8080)
    assert (mqtt6["server.address"], mqtt6["server.port"]) == ("::1", 8883)
    assert bare["server.address"] == "broker.example"
    for event in (http, mqtt6, bare):
        assert not {"host", "port", "broker"} & set(event)


def test_fields_named_like_ecs_sets_move_under_the_namespace(out: io.StringIO) -> None:
    """A field whose name ECS uses for something else moves under scheduler_publisher.*; an
    ECS field with ECS's type stays where it is."""
    configure(out)
    logging.getLogger("foreign").warning(
        "odd extras", extra={"url": "x", "event": "worker", "file.path": ["a"], "topic": "a/b"}
    )
    get_logger("t").error(
        "service_start_failed", **{"process.exit_code": 3, "server.port": "not a number"}
    )

    foreign, own = events(out)
    assert foreign["scheduler_publisher.url"] == "x"
    assert foreign["scheduler_publisher.event"] == "worker"
    assert foreign["scheduler_publisher.file.path"] == ["a"]
    assert foreign["topic"] == "a/b"
    assert own["process.exit_code"] == 3
    assert own["scheduler_publisher.server.port"] == "not a number"
    assert "server.port" not in own


def test_a_field_cannot_overwrite_the_fields_the_pipeline_writes(out: io.StringIO) -> None:
    """`message=` or `process.pid=` given by a caller moves under the namespace."""
    configure(out)
    get_logger("t").info("tick", message="hello", **{"process.pid": 1, "ecs.version": "1.0"})

    (event,) = events(out)
    assert (event["message"], event["process.pid"], event["ecs.version"]) == (
        "tick",
        os.getpid(),
        "9.4.0",
    )
    assert event["scheduler_publisher.message"] == "hello"
    assert event["scheduler_publisher.process.pid"] == 1
    assert event["scheduler_publisher.ecs.version"] == "1.0"


def test_long_id_lists_are_capped_with_their_count(out: io.StringIO) -> None:
    """3,000 ids log as the first 20, "and 2980 more" and added_count, in one short line."""
    configure(out)
    ids = [f"sensor-{i:05d}-with-a-longer-name" for i in range(3000)]
    get_logger("t").info("config_reloaded", added=ids, removed=[], numbers=list(range(50)))

    line = out.getvalue().splitlines()[0]
    assert len(line.encode()) < 8192
    event = json.loads(line)
    assert event["added"] == [*ids[:20], "and 2980 more"]
    assert event["added_count"] == 3000
    assert event["removed"] == []
    assert "removed_count" not in event
    assert event["numbers"] == list(range(20))  # no string marker in a list of numbers
    assert event["numbers_count"] == 50


def test_an_oversized_value_is_cut_in_the_middle(out: io.StringIO) -> None:
    """A 100 KB value is cut so the line stays within 8 KiB; its start and end survive."""
    configure(out)
    value = "START" + "x" * 100_000 + "END"
    get_logger("t").error("config_reload_failed", error=value, problem=["y" * 30_000])

    line = out.getvalue().splitlines()[0]
    assert len(line.encode()) + 1 <= 8192
    event = json.loads(line)
    assert event["error.message"].startswith("START")
    assert event["error.message"].endswith("END")
    assert "chars cut]" in event["error.message"]
    assert event["message"] == "config_reload_failed"


def test_not_a_number_is_logged_as_null(out: io.StringIO) -> None:
    """NaN and infinity, which JSON cannot carry, become null: the line stays valid JSON."""
    configure(out)
    get_logger("t").info(
        "publisher_statistics", uptime_seconds=float("nan"), lateness=[1.5, float("inf")], fine=2.5
    )

    (event,) = events(out)
    assert (event["uptime_seconds"], event["lateness"], event["fine"]) == (None, [1.5, None], 2.5)
    assert "NaN" not in out.getvalue()


def test_many_small_fields_are_dropped_and_named_as_a_last_resort(out: io.StringIO) -> None:
    """When no single string is long, the largest fields are dropped and listed instead."""
    configure(out)
    get_logger("t").info("odd", table={f"k{i}": i for i in range(5000)}, small=1)

    line = out.getvalue().splitlines()[0]
    assert len(line.encode()) + 1 <= 8192
    event = json.loads(line)
    assert event["scheduler_publisher.dropped_fields"] == ["table"]
    assert event["small"] == 1
    assert event["message"] == "odd"


# ---- redaction must not rewrite names (issue 11 #18) ----------------------------------------


@pytest.mark.parametrize("password", ["mqtt", "publisher", "info", "connected"])
def test_a_secret_that_is_a_common_word_rewrites_no_name(
    out: io.StringIO, password: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Event names, logger names, field names and generated fields keep their text when the
    password is a substring of them; a value that carries it is replaced whole."""
    monkeypatch.setattr(redaction, "_secrets", ())  # the registry is process-wide; start empty
    register_secret(password)
    configure(out)
    get_logger("scheduler_publisher.connection").info(
        "mqtt_connected", broker="127.0.0.1:1883", client_id="scheduler-publisher-gw"
    )
    logging.getLogger("paho.mqtt.client").info("Received CONNACK (0, 0)")

    own, foreign = events(out)
    assert own["message"] == own["event.action"] == "mqtt_connected"
    assert own["log.logger"] == "scheduler_publisher.connection"
    assert own["service.name"] == "scheduler-publisher"
    assert own["log.level"] == "info"
    assert "client_id" in own
    expected_id = "***" if password in "scheduler-publisher-gw" else "scheduler-publisher-gw"
    assert own["client_id"] == expected_id
    assert foreign["log.logger"] == "paho.mqtt.client"
    assert "***" not in out.getvalue().replace('"***"', "")  # never a partial replacement


# ---- console escaping (issue 11 #23) --------------------------------------------------------


def test_console_format_escapes_control_characters_from_values(out: io.StringIO) -> None:
    """ANSI escapes, BEL and bidi overrides in ids reach the console as visible escapes."""
    configure(out, format="console")
    hostile = "id\x1b]0;pwned\x07\x1b[31m-red\u202e"
    get_logger("t").error("config_entry_invalid", entry_id=hostile, **{"k\x1b[2J": "v"})

    text = out.getvalue()
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", text)
    assert "id\\x1b]0;pwned\\x07\\x1b[31m-red\\u202e" in text
    assert "k\\x1b[2J=v" in text


# ---- journald priority prefixes -------------------------------------------------------------


def test_journal_stream_gets_sd_daemon_priority_prefixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $JOURNAL_STREAM naming stdout, each stdout line starts with <3>/<4>/<6>/<7>;
    the file never has a prefix."""
    with (tmp_path / "stdout").open("w+") as stdout:
        st = os.fstat(stdout.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging(LogSettings(level="DEBUG", file=tmp_path / "app.log"), stream=stdout)
        log = get_logger("t")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        logging.getLogger("paho.mqtt.client").critical("c")
        shutdown_logging()
        stdout.seek(0)
        lines = stdout.read().splitlines()

    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<3>"]
    assert [json.loads(line[3:])["message"] for line in lines] == ["d", "i", "w", "e", "c"]
    assert all(line.startswith("{") for line in (tmp_path / "app.log").read_text().splitlines())


def test_a_journal_stream_naming_another_file_adds_no_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inherited $JOURNAL_STREAM that names another file (stdout redirected) is ignored."""
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    with (tmp_path / "stdout").open("w+") as stdout:
        configure_logging(LogSettings(file=None), stream=stdout)
        get_logger("t").warning("w")
        shutdown_logging()
        stdout.seek(0)
        assert json.loads(stdout.read())["message"] == "w"


# ---- one writer for stdout (issue 11 #1) ----------------------------------------------------


def test_echo_lines_and_log_lines_never_split_each_other(tmp_path: Path) -> None:
    """Echo lines and log lines written at once from many threads to a real file stay whole."""
    with (tmp_path / "stdout").open("w+") as stdout:
        configure_logging(LogSettings(file=None), stream=stdout)
        start = threading.Barrier(6)

        def logger(n: int) -> None:
            start.wait(5)
            for i in range(300):
                get_logger("t").info("tick", worker=n, i=i, pad="p" * 200)

        def echoer(n: int) -> None:
            start.wait(5)
            for i in range(300):
                echo_line(f"echo site/{n}: " + json.dumps({"i": i, "pad": "q" * 200}))

        threads = [
            threading.Thread(target=f, args=(n,)) for n in range(3) for f in (logger, echoer)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        shutdown_logging()
        stdout.seek(0)
        lines = stdout.read().splitlines()

    assert len(lines) == 1800
    logs = [json.loads(line) for line in lines if line.startswith("{")]
    echoes = [json.loads(line.split(": ", 1)[1]) for line in lines if line.startswith("echo ")]
    assert (len(logs), len(echoes)) == (900, 900)


def test_echo_line_escapes_control_characters(tmp_path: Path) -> None:
    """A payload's control characters are printed as escapes, one line per message."""
    with (tmp_path / "stdout").open("w+") as stdout:
        configure_logging(LogSettings(file=None), stream=stdout)
        echo_line('echo a/b: {"x": "\x1b[2J\nforged"}')
        shutdown_logging()
        stdout.seek(0)
        assert stdout.read() == 'echo a/b: {"x": "\\x1b[2J\\x0aforged"}\n'


# ---- a log file that cannot be written (issue 11 #22) ---------------------------------------


def _full_device(path: Path) -> None:
    """A device like /dev/full (every write: ENOSPC) at `path`. A node of its own as root, so
    that the log's writer lock (`.<name>.lock` beside the real path) lands in the test's folder,
    not in /dev where parallel runs of the suite would take each other's lock; a symlink to
    /dev/full otherwise."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        path.symlink_to("/dev/full")


def test_a_full_disk_is_reported_once_not_per_record(
    tmp_path: Path, out: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    """Writes to a full disk (/dev/full) give one stderr line and one JSON event, however many
    records fail, and never the stdlib's `--- Logging error ---` traceback."""
    full = tmp_path / "app.log"
    _full_device(full)
    configure(out, file=full)
    log = get_logger("t")
    for i in range(50):
        log.info("tick", i=i)

    err = capfd.readouterr().err
    assert "Logging error" not in err
    assert err.count("cannot write the log file") == 1
    assert "No space left on device" in err
    reports = [e for e in events(out) if e["message"] == "log_file_write_failed"]
    assert len(reports) == 1
    assert reports[0]["log.level"] == "error"
    assert reports[0]["path"] == str(full)
    assert "No space left" in reports[0]["error.message"]
    assert len([e for e in events(out) if e["message"] == "tick"]) == 50


# ---- start-up failures ----------------------------------------------------------------------


def test_startup_failure_before_logging_is_set_up_goes_to_stdout_and_an_existing_file(
    tmp_path: Path, out: io.StringIO
) -> None:
    """log_startup_failure sets logging up for one line: stdout, and the file when its folder
    exists; it creates no folder."""
    settings = LogSettings(file=tmp_path / "app.log")
    log_startup_failure(settings, FileNotFoundError(2, "No such file"), exit_code=5, stream=out)
    log_startup_failure(
        replace(settings, file=tmp_path / "absent" / "app.log"),
        ValueError("bad"),
        exit_code=3,
        stream=out,
    )

    first, second = events(out)
    assert first["message"] == "service_start_failed"
    assert first["log.level"] == "error"
    assert (first["process.exit_code"], first["error.type"]) == (5, "FileNotFoundError")
    assert second["process.exit_code"] == 3
    (line,) = (tmp_path / "app.log").read_text().splitlines()
    assert json.loads(line)["process.exit_code"] == 5
    assert not (tmp_path / "absent").exists()


# ---- what a plain run imports -----------------------------------------------------------------

# Run in a fresh interpreter: the service's entry point, its service module and both log
# formats set up and used (an exception included), then what got imported.
_PLAIN_RUN = """
import io, json, sys
import scheduler_publisher.cli.main, scheduler_publisher.service
from scheduler_publisher.logs.setup import LogSettings, configure_logging, get_logger
for fmt in ("json", "console"):
    configure_logging(LogSettings(format=fmt, file=None), stream=io.StringIO())
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("t").exception("tick_failed")
imported = sorted(m for m in sys.modules if m == "rich" or m.startswith("rich."))
import rich  # still importable by anybody else
print(json.dumps({"imported": imported, "rich_later": rich.__name__}))
"""


def test_a_plain_run_does_not_import_rich() -> None:
    """structlog imports rich whenever it is installed (5 MB, 70 ms); the service never uses
    it, so its entry point and both log formats run without it, and rich stays importable."""
    assert importlib.util.find_spec("rich") is not None, "rich must be installed for this test"
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_RUN], capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"imported": [], "rich_later": "rich"}
