"""One writer per state database and per log file (issue 27 #2): the lock itself, the
StateStore and the log file under it, a shard's own default paths, and real service
processes that meet on one file, the second refused with exit 6 while the first runs on."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from scheduler_publisher.cli import main as cli
from scheduler_publisher.cli import options
from scheduler_publisher.config.shard import Shard
from scheduler_publisher.logs.log_outputs import FileHandler
from scheduler_publisher.logs.setup import (
    LogSettings,
    configure_logging,
    get_logger,
    shutdown_logging,
)
from scheduler_publisher.logs.writer_lock import FileInUseError, WriterLock, lock_path
from scheduler_publisher.settings import shard_path
from scheduler_publisher.statestore import EntryCounters, SavedState, StateStore, Totals
from tests.support import (
    Mosquitto,
    ServiceProcess,
    SubscriberFactory,
    cli_args,
    entry,
    write_config,
)

EXIT_IN_USE = 6


@pytest.fixture
def logging_restored() -> Iterator[None]:
    yield
    shutdown_logging()


# ---- the lock -------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid_until_the_first_lets_go(
    tmp_path: Path,
) -> None:
    """Two locks on one file, even in one process: the second raises FileInUseError with
    the file, the lock file and the holder's pid in one line; after release() it is free."""
    path = tmp_path / "state.db"
    first = WriterLock.acquire(path, "state database")
    with pytest.raises(FileInUseError) as refused:
        WriterLock.acquire(path, "state database")
    text = str(refused.value)
    assert "\n" not in text
    assert str(path) in text
    assert f"process {os.getpid()}" in text
    assert str(lock_path(path)) in text
    assert "--state-db" in text
    assert refused.value.pid == os.getpid()
    first.release()
    first.release()  # idempotent
    WriterLock.acquire(path, "state database").release()


def test_a_symlink_to_the_file_finds_the_same_lock(tmp_path: Path) -> None:
    """The lock sits beside the real path: a second name for the file is the same file."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "service.log"
    link = tmp_path / "link.log"
    link.symlink_to(target)
    held = WriterLock.acquire(target, "log file")
    try:
        with pytest.raises(FileInUseError, match="--log-file"):
            WriterLock.acquire(link, "log file")
        assert lock_path(link) == held.lock == tmp_path / "real" / ".service.log.lock"
    finally:
        held.release()


def test_a_lock_file_planted_as_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """`.state.db.lock` pointing at another file: refused (OSError), the target untouched,
    rather than truncated to hold our pid."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock_path(tmp_path / "state.db").symlink_to(victim)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        WriterLock.acquire(tmp_path / "state.db", "state database")
    assert victim.read_text() == "precious\n"


# ---- the state database ---------------------------------------------------------------------


def test_a_state_database_has_one_writer(tmp_path: Path) -> None:
    """A second StateStore on an open database is refused before it reads or writes a byte;
    once the first closes, it opens and finds the first one's counters."""
    path = tmp_path / "state.db"
    first = StateStore(path)
    first.open()
    first.checkpoint(SavedState(Totals(published=5), {"a": EntryCounters(5, seq=5)}), now=1.0)
    second = StateStore(path)
    with pytest.raises(FileInUseError, match="state database"):
        second.open()
    first.checkpoint(SavedState(Totals(published=6), {"a": EntryCounters(6, seq=6)}), now=2.0)
    first.close()
    saved = second.open()
    second.close()
    assert saved.entries["a"].seq == 6


def test_a_shards_new_database_starts_from_the_unsharded_one(tmp_path: Path) -> None:
    """A shard's own database that does not exist yet is a copy of its predecessor (the
    file a release without per-shard paths wrote); once it exists, it is never copied over."""
    legacy = tmp_path / "state.db"
    old = StateStore(legacy)
    old.open()
    old.checkpoint(SavedState(Totals(published=9), {"a": EntryCounters(9, seq=9)}), now=1.0)
    old.close()
    own = shard_path(legacy, Shard(1, 2))
    assert own == tmp_path / "state-1-of-2.db"

    store = StateStore(own, adopt_from=legacy)
    saved = store.open()
    assert (store.adopted_from, saved.entries["a"].seq, saved.totals.published) == (legacy, 9, 9)
    store.checkpoint(SavedState(Totals(published=12), {"a": EntryCounters(12, seq=12)}), now=2.0)
    store.close()

    again = StateStore(own, adopt_from=legacy)
    saved = again.open()
    again.close()
    assert (again.adopted_from, saved.entries["a"].seq) == (None, 12)


# ---- the log file ---------------------------------------------------------------------------


def test_a_log_file_has_one_writer(tmp_path: Path, logging_restored: None) -> None:
    """configure_logging on a file another writer holds raises FileInUseError and logs to
    stdout only; the file gets none of its lines."""
    path = tmp_path / "service.log"
    other = WriterLock.acquire(path, "log file")
    out = io.StringIO()
    try:
        with pytest.raises(FileInUseError, match="log file"):
            configure_logging(LogSettings(file=path), stream=out)
        get_logger("scheduler_publisher.test").info("after_refusal")
    finally:
        other.release()
    assert "after_refusal" in out.getvalue()
    assert not path.exists()


def test_a_second_handler_on_a_log_file_whose_folder_appears_later_writes_nothing(
    tmp_path: Path,
) -> None:
    """Both handlers were made before the folder existed; the first to write takes the lock,
    the second's lines fail (reported once), and the file holds only the first's lines."""
    path = tmp_path / "later" / "service.log"
    reports: list[str] = []

    def report(event: str, _error: OSError | None) -> logging.LogRecord:
        reports.append(event)
        return _record(event)

    settings = LogSettings(file=path)
    handlers = [FileHandler(path, settings, report) for _ in range(2)]
    try:
        for n, handler in enumerate(handlers):
            handler.emit(_record(f"line-{n}"))
    finally:
        for handler in handlers:
            handler.close()
    assert path.read_text().splitlines() == ["line-0"]
    assert reports == ["log_file_write_failed"]


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 0, text, None, None)


# ---- a shard's own default paths ------------------------------------------------------------


@pytest.fixture
def no_options_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("SCHEDULER_PUBLISHER_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(options, "DEFAULT_OPTIONS_FILE", tmp_path / "absent.toml")


def shown(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["show-options", *argv])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split(" = ")[0]: line.split(" = ", 1)[1] for line in lines if " = " in line}


def test_show_options_shows_a_shards_own_paths(
    no_options_file: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --shard 2/3 and no --state-db or --log-file, the defaults are the shard's own
    files, shown as derived; without --shard, or with a path given, nothing changes."""
    sharded = shown(capsys, "--shard", "2/3")
    assert sharded["state-db"] == '"logs/state-2-of-3.db"  # default (derived: --shard)'
    assert sharded["log-file"] == '"logs/mqtt_publisher-2-of-3.log"  # default (derived: --shard)'
    plain = shown(capsys)
    assert plain["state-db"] == '"logs/state.db"  # default'
    assert plain["log-file"] == '"logs/mqtt_publisher.log"  # default'
    given = shown(capsys, "--shard", "2/3", "--state-db", "x.db", "--log-file", "")
    assert given["state-db"] == '"x.db"  # flag --state-db'
    assert given["log-file"] == '""  # flag --log-file'


def test_paths_in_the_shared_options_file_become_each_shards_own(
    no_options_file: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The template unit's instances share the options file: a log-file or state-db set there
    gets the shard's suffix, so each instance writes its own file; one from a variable (the
    instance's own .env) or a flag is used as it is."""
    opts = tmp_path / "shared.toml"
    opts.write_text(
        'log-file = "/var/log/sp/scheduler-publisher.log"\nstate-db = "/var/lib/sp/state.db"\n'
    )
    sharded = shown(capsys, "--options-file", str(opts), "--shard", "2-of-3")
    assert sharded["log-file"] == (
        f'"/var/log/sp/scheduler-publisher-2-of-3.log"  # file {opts} (derived: --shard)'
    )
    assert sharded["state-db"] == f'"/var/lib/sp/state-2-of-3.db"  # file {opts} (derived: --shard)'
    monkeypatch.setenv("SCHEDULER_PUBLISHER_LOG_FILE", "/var/log/sp/mine.log")
    own = shown(capsys, "--options-file", str(opts), "--shard", "2-of-3")
    assert own["log-file"] == '"/var/log/sp/mine.log"  # env SCHEDULER_PUBLISHER_LOG_FILE'
    monkeypatch.delenv("SCHEDULER_PUBLISHER_LOG_FILE")
    plain = shown(capsys, "--options-file", str(opts))
    assert plain["log-file"] == f'"/var/log/sp/scheduler-publisher.log"  # file {opts}'


# ---- real processes on one file -------------------------------------------------------------


def only_line(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert len(found) == 1, lines
    return found[0]


def refused_for(second: ServiceProcess, path: Path, first: ServiceProcess) -> None:
    """`second` exited 6 with one line naming `path` and `first`'s pid, and logged it."""
    assert second.wait(30) == EXIT_IN_USE
    second.stop()
    line = only_line(second.stderr, "cannot start")
    assert str(path) in line
    assert f"process {first.proc.pid}" in line
    failed = [e for e in second.events() if e["message"] == "service_start_failed"]
    assert [e["process.exit_code"] for e in failed] == [EXIT_IN_USE]


def test_a_second_process_on_one_state_database_exits_6_and_the_first_runs_on(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    processes: list[ServiceProcess],
    tmp_path: Path,
    topic_base: str,
) -> None:
    """Two services on one explicit --state-db: the second exits 6 before it connects, with
    one line naming the file and the first's pid; the first keeps publishing and saving."""
    config = tmp_path / "entries.json"
    topic = f"{topic_base}/a"
    write_config(config, [entry("a", topic, 0.3, template=True, data={"n": "{{seq}}"})])
    db = tmp_path / "state.db"
    sub = subscriber_factory(topic)
    first = ServiceProcess(
        cli_args(broker.port, config, "--checkpoint-interval", "0.2", state_db=db), tmp_path
    )
    processes.append(first)
    first.wait_for_event("service_started")
    second = ServiceProcess(
        cli_args(broker.port, config, state_db=db, log_file=tmp_path / "second.log"), tmp_path
    )
    processes.append(second)

    refused_for(second, db, first)
    assert not [e for e in second.events() if e["message"] == "mqtt_connected"]

    seen = len(sub.on(topic))
    sub.wait_for(topic, count=seen + 3)
    assert first.proc.poll() is None
    with closing(sqlite3.connect(db)) as conn:
        (saved,) = conn.execute("SELECT seq FROM entries WHERE entry_id = 'a'").fetchone()
    assert saved >= seen


def test_a_second_process_on_one_log_file_exits_6_and_never_writes_it(
    broker: Mosquitto, processes: list[ServiceProcess], tmp_path: Path, topic_base: str
) -> None:
    """Two services on one explicit --log-file (their own state databases): the second exits
    6 naming the file and the first's pid; every line in the file is the first's."""
    config = tmp_path / "entries.json"
    write_config(config, [entry("a", f"{topic_base}/a", 0.5)])
    log_file = tmp_path / "service.log"
    first = ServiceProcess(
        cli_args(broker.port, config, state_db=tmp_path / "1.db", log_file=log_file), tmp_path
    )
    processes.append(first)
    first.wait_for_event("service_started")
    second = ServiceProcess(
        cli_args(broker.port, config, state_db=tmp_path / "2.db", log_file=log_file), tmp_path
    )
    processes.append(second)

    refused_for(second, log_file, first)
    assert not (tmp_path / "2.db").exists()  # refused before the service was built
    assert first.proc.poll() is None
    pids = {json.loads(text)["process.pid"] for text in log_file.read_text().splitlines()}
    assert pids == {first.proc.pid}
