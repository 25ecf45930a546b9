"""The log stream of the real process: start-up failures as JSON, one writer for stdout under
--echo, and a log file on a full disk."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler_publisher.cli.arguments import apply_options, build_parser
from scheduler_publisher.cli.main import log_settings
from scheduler_publisher.logs.setup import configure_logging, get_logger, shutdown_logging
from scheduler_publisher.logs.writer_lock import WriterLock
from tests.support import (
    Mosquitto,
    ServiceProcess,
    call,
    cli_args,
    entry,
    free_port,
    wait_until,
    write_config,
)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """The real CLI with tmp_path as its working folder; killed at teardown if still running."""
    procs: list[ServiceProcess] = []

    def start(*args: str) -> ServiceProcess:
        proc = ServiceProcess(["run", "--http-port", "0", "--state-db", "", *args], cwd=tmp_path)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


# ---- start-up failures ----------------------------------------------------------------------


def test_a_failed_start_is_a_json_line_on_stdout_and_creates_no_log_folder(
    tmp_path: Path, launch: Callable[..., ServiceProcess]
) -> None:
    """Exit 5 (unreadable password file) before logging is set up: the short stderr message
    stays, stdout gets `service_start_failed`, and the default ./logs/ is not created."""
    proc = launch(
        "--broker",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--password-file",
        str(tmp_path / "missing"),
    )
    assert proc.wait(30) == 5
    proc.stop()

    assert any("cannot start" in line for line in proc.stderr)
    (event,) = json_lines(proc.stdout)
    assert event["message"] == "service_start_failed"
    assert event["log.level"] == "error"
    assert event["process.exit_code"] == 5
    assert str(tmp_path / "missing") in event["error.message"]
    assert event["error.type"] == "scheduler_publisher.cli.StartupError"
    assert not (tmp_path / "logs").exists()


def test_a_failed_start_reaches_a_log_file_whose_folder_exists(
    tmp_path: Path, launch: Callable[..., ServiceProcess]
) -> None:
    """The same failure is written to --log-file when its folder is there."""
    log_file = tmp_path / "service.log"
    proc = launch("--password-file", str(tmp_path / "missing"), "--log-file", str(log_file))
    assert proc.wait(30) == 5
    proc.stop()

    (event,) = json_lines(log_file.read_text().splitlines())
    assert (event["message"], event["process.exit_code"]) == ("service_start_failed", 5)


def test_an_unusable_config_at_start_creates_no_log_folder(
    tmp_path: Path, launch: Callable[..., ServiceProcess]
) -> None:
    """Exit 3 with the default --log-file: the failure is on stdout, and ./logs/ (which only
    the failure line would have created) does not appear."""
    (tmp_path / "config.json").write_text("[")
    proc = launch(
        "--broker",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--config",
        str(tmp_path / "config.json"),
    )
    assert proc.wait(30) == 3
    proc.stop()

    (event,) = json_lines(proc.stdout)
    assert (event["message"], event["process.exit_code"]) == ("service_start_failed", 3)
    assert not (tmp_path / "logs").exists()


def test_an_unusable_config_and_the_insecure_tls_warning_reach_stdout_and_the_file(
    tmp_path: Path, launch: Callable[..., ServiceProcess]
) -> None:
    """Exit 3 (config not JSON) with --tls-insecure: the warning and the failure are JSON
    lines on stdout and in the log file, besides the human text on stderr."""
    (tmp_path / "config.json").write_text("{not json")
    log_file = tmp_path / "service.log"
    proc = launch(
        "--broker",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--tls",
        "--tls-insecure",
        "--config",
        str(tmp_path / "config.json"),
        "--log-file",
        str(log_file),
    )
    assert proc.wait(30) == 3
    proc.stop()

    assert any("NOT verified" in line for line in proc.stderr)
    assert any("cannot start" in line for line in proc.stderr)
    for events in (json_lines(proc.stdout), json_lines(log_file.read_text().splitlines())):
        warning, failure = (
            e
            for e in events
            if e["message"] in ("tls_verification_disabled", "service_start_failed")
        )
        assert (warning["message"], warning["log.level"]) == (
            "tls_verification_disabled",
            "warning",
        )
        assert (failure["message"], failure["process.exit_code"]) == ("service_start_failed", 3)
        assert "config.json" in failure["error.message"]


# ---- usage errors, and every failed start under the journal (issue 28, 3.1) ---------------


def usage_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """Ways to start `run` with a usage error: (arguments, environment, text of the error)."""
    options = tmp_path / "options.toml"
    options.write_text("brokr = 'x'\n")
    return {
        "unknown flag": (["--frobnicate"], {}, "--frobnicate"),
        "bad flag value": (["--port", "abc"], {}, "'abc'"),
        "options-file typo": (["--options-file", str(options)], {}, "'brokr'"),
        "bad variable": ([], {"SCHEDULER_PUBLISHER_KEEPALIVE": "0"}, "KEEPALIVE"),
        "two options": (["--backoff-min", "9", "--backoff-max", "1"], {}, "backoff-min"),
    }


@pytest.mark.parametrize(
    "case", ["unknown flag", "bad flag value", "options-file typo", "bad variable", "two options"]
)
def test_a_usage_error_of_run_is_one_stderr_line_and_one_json_line(
    case: str, tmp_path: Path
) -> None:
    """Exit 2 from a flag, the options file, a variable or two options together: the one line
    on stderr, and one `service_start_failed` JSON line with error.* on stdout (no log
    file: the log options may be the refused ones)."""
    argv, env, needle = usage_cases(tmp_path)[case]
    proc = ServiceProcess(["run", "--http-port", "0", *argv], cwd=tmp_path, env=env)
    assert proc.wait(30) == 2
    proc.stop()

    (line,) = proc.stderr
    assert needle in line
    (event,) = json_lines(proc.stdout)
    assert (event["message"], event["log.level"]) == ("service_start_failed", "error")
    assert event["process.exit_code"] == 2
    assert needle in event["error.message"]
    assert event["error.type"].endswith("UsageError")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("command", ["validate", "show-options"])
def test_a_usage_error_of_a_command_run_by_hand_is_only_on_stderr(
    command: str, tmp_path: Path
) -> None:
    """validate and show-options answer on stdout (validate --format json: one object), so a
    usage error there stays the one stderr line."""
    for argv in (["--frobnicate"], ["--options-file", str(tmp_path / "missing.toml")]):
        proc = ServiceProcess([command, *argv], cwd=tmp_path)
        assert proc.wait(30) == 2
        proc.stop()
        assert (len(proc.stderr), proc.stdout) == (1, [])


def run_under_journal(tmp_path: Path, argv: list[str]) -> tuple[int, list[str]]:
    """The CLI with stdout on a file that $JOURNAL_STREAM names, as systemd connects it."""
    out = tmp_path / "journal.out"
    with out.open("w") as stream:
        st = os.fstat(stream.fileno())
        done = subprocess.run(
            [sys.executable, "-m", "scheduler_publisher", *argv],
            cwd=tmp_path,
            stdout=stream,
            stderr=subprocess.PIPE,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            timeout=60,
            check=False,
        )
    return done.returncode, out.read_text().splitlines()


@pytest.mark.parametrize("code", [2, 3, 5, 6])
def test_every_failed_start_reaches_the_journal_at_priority_3(code: int, tmp_path: Path) -> None:
    """Under the journal, the failure line of exits 2, 3, 5 and 6 carries the `<3>` prefix, so
    journald files it as an error (`journalctl -p err` shows it)."""
    config = tmp_path / "config.json"
    write_config(config, [entry("a", "t/a")])
    state = tmp_path / "state.db"
    argv = {
        2: ["--port", "abc"],
        3: ["--config", str(tmp_path / "missing.json")],
        5: ["--password-file", str(tmp_path / "missing")],
        6: ["--state-db", str(state)],
    }[code]
    base = ["run", "--http-port", "0", "--log-file", "", "--config", str(config)]
    holder = WriterLock.acquire(state, "state database")  # another process's, for exit 6
    try:
        returncode, lines = run_under_journal(tmp_path, [*base, "--state-db", "", *argv])
    finally:
        holder.release()

    assert returncode == code
    failures = [line for line in lines if "service_start_failed" in line]
    assert len(failures) == 1, lines
    assert failures[0].startswith("<3>{")
    assert json.loads(failures[0][3:])["process.exit_code"] == code


# ---- logrotate (issue 28, 3.2) ---------------------------------------------------------------


def file_events(path: Path) -> list[dict[str, Any]]:
    return json_lines(path.read_text().splitlines()) if path.exists() else []


def logged_to(path: Path, name: str, **fields: Any) -> bool:
    return any(e["message"] == name and fields.items() <= e.items() for e in file_events(path))


@pytest.mark.parametrize("how", ["rename, then SIGHUP", "rename", "delete"])
def test_the_log_file_is_reopened_after_logrotate_moves_it(
    how: str, broker: Mosquitto, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    """logrotate's rename + SIGHUP, a rename alone, or a deletion: the next lines go to a new
    file at the path, not into the renamed (or deleted) one."""
    config = tmp_path / "config.json"
    write_config(config, [entry("a", f"sp-test/{uuid.uuid4().hex[:8]}/a", 5)])
    log_file = tmp_path / "service.log"
    http_port = free_port()
    proc = ServiceProcess(
        cli_args(broker.port, config, log_file=log_file, http_port=http_port), cwd=tmp_path
    )
    processes.append(proc)
    proc.wait_for_event("service_started")
    wait_until(lambda: logged_to(log_file, "service_started"), 10, message="the first lines")
    rotated = tmp_path / "service.log.1"
    if how == "delete":
        log_file.unlink()
    else:
        log_file.rename(rotated)

    if how == "rename, then SIGHUP":
        proc.signal(signal.SIGHUP)
        trigger = "signal"
    else:
        assert call(http_port, "/reload", "POST").status == 200
        trigger = "http"

    wait_until(
        lambda: logged_to(log_file, "config_unchanged", trigger=trigger),
        15,
        message="the next line in a new file at the path",
    )
    assert not logged_to(log_file, "service_started")
    if how != "delete":
        assert logged_to(rotated, "service_started")
        assert not logged_to(rotated, "config_unchanged")


def test_built_in_rotation_follows_its_options(tmp_path: Path) -> None:
    """--log-file-max-bytes and --log-file-backups reach the file: rotated at the size, that
    many copies kept; 0 bytes turns rotation off (logrotate does it)."""
    for size, backups in ((2000, 2), (0, 5)):
        folder = tmp_path / f"rotate-{size}"
        folder.mkdir()
        log_file = folder / "service.log"
        argv = [
            "run",
            "--log-file",
            str(log_file),
            "--log-file-max-bytes",
            str(size),
            "--log-file-backups",
            str(backups),
        ]
        parser = build_parser()
        args = parser.parse_args(argv)
        args.origins = apply_options(parser, argv, args, {})
        settings = log_settings(args)
        assert (settings.file_max_bytes, settings.file_backups) == (size, backups)
        configure_logging(settings, stream=io.StringIO())
        try:
            for n in range(200):
                get_logger("test").info("filler_line", n=n, padding="x" * 40)
        finally:
            shutdown_logging()
        copies = sorted(p.name for p in folder.glob("service.log.*"))
        if size:
            assert copies == ["service.log.1", "service.log.2"]
            assert log_file.stat().st_size <= size
        else:
            assert copies == []
            assert log_file.stat().st_size > 20_000


# ---- one writer for stdout (issue 11 #1) ----------------------------------------------------


@pytest.mark.slow
def test_echo_and_debug_logs_under_load_keep_every_line_whole(
    tmp_path: Path, broker: Mosquitto, launch: Callable[..., ServiceProcess]
) -> None:
    """--echo with DEBUG logs, 50 entries at 0.1 s against a real Mosquitto: every stdout line
    is a whole JSON log line or a whole echo line."""
    base = f"sp-test/{uuid.uuid4().hex[:8]}"
    # QoS 1: paho logs each publish and PUBACK at DEBUG (static QoS 0 entries bypass paho's
    # publish, and its log lines with it: packet.py).
    write_config(
        tmp_path / "config.json", [entry(f"e{i}", f"{base}/{i}", 0.1, qos=1) for i in range(50)]
    )
    proc = launch(
        *cli_args(
            broker.port, tmp_path / "config.json", "--echo", "--log-level", "DEBUG", command=()
        )
    )
    wait_until(
        lambda: sum(line.startswith(f"echo {base}/") for line in proc.stdout) >= 1500,
        60,
        message="1500 echo lines",
    )
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc.stop()

    logs = echoes = 0
    for line in proc.stdout:
        if line.startswith("echo "):
            payload = json.loads(line.split(": ", 1)[1])
            assert payload["online"] in (0, 1), line
            echoes += 1
        else:
            assert isinstance(json.loads(line), dict), line
            logs += 1
    assert echoes >= 1500
    assert logs > 100  # paho's DEBUG lines were interleaved with them


# ---- a log file on a full disk (issue 11 #22) -----------------------------------------------


def _limit_file_size() -> None:
    # A regular file that cannot grow past 32 KB: writes fail with EFBIG, as on a full disk.
    # SIGXFSZ would kill the process; ignored, the write just fails (setrlimit(2)).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_log_file_that_stops_growing_is_reported_once_and_again_on_recovery(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A log file that cannot grow gives one stderr line and one JSON event, not a traceback
    per record; when it can grow again, one recovery line, and the file carries on."""
    base = f"sp-test/{uuid.uuid4().hex[:8]}"
    # QoS 1, so that paho's DEBUG lines for each publish fill the file (packet.py: static
    # QoS 0 entries bypass paho's publish and its log lines).
    write_config(
        tmp_path / "config.json", [entry(f"e{i}", f"{base}/{i}", 0.1, qos=1) for i in range(5)]
    )
    log_file = tmp_path / "service.log"
    proc = ServiceProcess(
        cli_args(
            broker.port,
            tmp_path / "config.json",
            "--log-level",
            "DEBUG",
            command=(),
            log_file=log_file,
        ),
        cwd=tmp_path,
        before_exec=_limit_file_size,
    )
    stdout, stderr = proc.stdout, proc.stderr
    try:
        wait_until(
            lambda: any("log_file_write_failed" in line for line in stdout),
            60,
            message="the failure report",
        )
        lines_at_failure = len(stdout)
        wait_until(lambda: len(stdout) > lines_at_failure + 200, 30, message="more records")
        resource.prlimit(
            proc.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        wait_until(
            lambda: any("log_file_write_recovered" in line for line in stdout),
            30,
            message="the recovery report",
        )
    finally:
        proc.signal(signal.SIGTERM)
        proc.wait(30)
        proc.stop()

    assert proc.wait(0) == 0
    assert not [line for line in stderr if "Logging error" in line or "Traceback" in line]
    assert sum("cannot write the log file" in line for line in stderr) == 1
    assert sum("is writable again" in line for line in stderr) == 1
    events = [json.loads(line) for line in stdout]
    failed = [e for e in events if e["message"] == "log_file_write_failed"]
    recovered = [e for e in events if e["message"] == "log_file_write_recovered"]
    assert len(failed) == len(recovered) == 1
    assert "File too large" in failed[0]["error.message"]
    assert failed[0]["path"] == str(log_file)
    text = log_file.read_text(encoding="utf-8", errors="replace")
    assert "log_file_write_recovered" in text
    assert "service_stopped" in text  # the file carries on after the recovery
