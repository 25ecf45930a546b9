"""Operating the service: counters across restarts and kills, history, statistics, systemd."""

from __future__ import annotations

import contextlib
import itertools
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from scheduler_publisher.service import PublisherService
from scheduler_publisher.statestore import SavedState
from tests.support import (
    InProcessServices,
    Mosquitto,
    NotifySocket,
    ServiceProcess,
    SubscriberFactory,
    cli_args,
    entry,
    free_port,
    in_process_settings,
    wait_until,
    write_config,
)

LogEvent = MutableMapping[str, Any]  # what structlog's capture_logs() collects


@pytest.fixture
def config_path(tmp_path: Path, topic_base: str) -> Path:
    path = tmp_path / "config.json"
    write_config(
        path,
        [
            entry("fast", f"{topic_base}/fast", 0.2),
            entry("willed", f"{topic_base}/willed", 0.3, lwt=True),
        ],
    )
    return path


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """The test's stand-in for systemd's notification socket."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def run_process(
    processes: list[ServiceProcess],
    tmp_path: Path,
    port: int,
    config: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> ServiceProcess:
    args = cli_args(port, config, *extra, command=(), backoff=(0.1, 0.5))
    proc = ServiceProcess(args, cwd=tmp_path, env=env)
    processes.append(proc)
    return proc


def db_totals(db: Path) -> int | None:
    """The published total in the last committed checkpoint, read as a second process would."""
    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        try:
            row = conn.execute("SELECT published FROM totals WHERE id = 1").fetchone()
        except sqlite3.OperationalError:
            return None  # not created yet
    return None if row is None else int(row[0])


def stats_events(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e.get("message") == "publisher_statistics"]


# ---- counters across restarts ---------------------------------------------------------------
def test_totals_continue_after_a_graceful_restart(
    tmp_path: Path, broker: Mosquitto, config_path: Path
) -> None:
    """A restart with the same state DB carries on from the previous run's totals."""
    settings = in_process_settings(config_path, broker.port, state_db=tmp_path / "state.db")
    first = PublisherService(settings)
    first.start()
    wait_until(lambda: first.stats.totals().published >= 6, 10, message="first run publishes")
    first.stop()
    before = first.stats.totals()
    per_entry = {i: e.published for i, e in first.stats.entries.items()}

    second = PublisherService(settings)
    second.start()
    try:
        statistics = second.get_status()["statistics"]
        assert statistics["total_published"] >= before.published
        assert second.stats.base.published == before.published
        assert second.stats.base.uptime_seconds > 0  # the first run's, as checkpointed at stop
        assert statistics["lifetime_uptime_seconds"] >= second.stats.base.uptime_seconds
        entries = second.get_status()["entries"]
        for entry_id, published in per_entry.items():
            assert entries[entry_id]["published"] >= published
        wait_until(lambda: second.stats.published >= 3, 10, message="second run publishes")
        after = second.get_status()["statistics"]
        assert after["total_published"] == before.published + after["published_this_run"]
    finally:
        second.stop()


def test_checkpoints_copy_the_counters_on_the_network_thread(
    tmp_path: Path, broker: Mosquitto, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the service runs, a checkpoint copies the counters on their one writer, the network
    thread, between two of its turns: copied on the main loop they would hold the GIL for
    milliseconds at thousands of entries, just when a phase group may be due. The last
    checkpoint, once the network thread has stopped, copies them where it runs."""
    db = tmp_path / "state.db"
    service = PublisherService(
        in_process_settings(config_path, broker.port, state_db=db, checkpoint_interval=0.2)
    )
    copied_on: list[str] = []
    copy = service.stats.saved_state

    def recorded() -> SavedState:
        copied_on.append(threading.current_thread().name)
        return copy()

    monkeypatch.setattr(service.stats, "saved_state", recorded)
    service.start()
    try:
        wait_until(
            lambda: len(copied_on) >= 2 and (db_totals(db) or 0) > 0,
            10,
            message="two checkpoints, one with publishes",
        )
    finally:
        service.stop()
    assert copied_on[:2] == ["mqtt-network", "mqtt-network"]
    assert copied_on[-1] != "mqtt-network"  # at stop
    assert db_totals(db) == service.stats.totals().published


def test_totals_survive_sigkill_from_the_last_checkpoint(
    tmp_path: Path,
    broker: Mosquitto,
    config_path: Path,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    processes: list[ServiceProcess],
) -> None:
    """After SIGKILL the next run starts from at least the last committed checkpoint."""
    db = tmp_path / "state.db"
    sub = subscriber_factory(f"{topic_base}/#")
    extra = ("--state-db", str(db), "--checkpoint-interval", "1", "--stats-interval", "0.3")
    first = run_process(processes, tmp_path, broker.port, config_path, *extra)
    sub.wait_for(f"{topic_base}/fast", 5)
    checkpointed = wait_until(
        lambda: (n := db_totals(db)) is not None and n >= 5 and n,
        15,
        message="a checkpoint with at least 5 published",
    )

    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert not any(e.get("message") == "service_stopping" for e in first.events())
    at_kill = db_totals(db)
    assert at_kill is not None
    assert at_kill >= checkpointed

    second = run_process(processes, tmp_path, broker.port, config_path, *extra)
    event = second.wait_for_event("publisher_statistics")
    assert event["total_published"] >= at_kill
    later = second.wait_for_event(
        "publisher_statistics", where=lambda e: e["total_published"] > at_kill
    )
    assert later["total_published"] > at_kill


def test_history_keeps_only_the_newest_rows(
    tmp_path: Path, broker: Mosquitto, config_path: Path, processes: list[ServiceProcess]
) -> None:
    """--history-retention bounds the history table to the newest rows, oldest pruned first."""
    db = tmp_path / "state.db"
    run_process(
        processes,
        tmp_path,
        broker.port,
        config_path,
        "--state-db",
        str(db),
        "--history-interval",
        "0.1",
        "--history-retention",
        "3",
    )

    def history() -> list[tuple[int, int]]:
        if not db.exists():
            return []
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            try:
                return conn.execute("SELECT id, published FROM history ORDER BY id").fetchall()
            except sqlite3.OperationalError:
                return []  # not created yet

    seen: list[int] = []

    def pruned_past_ten() -> bool:
        rows = history()
        seen.append(len(rows))
        return bool(rows) and rows[-1][0] >= 10

    wait_until(pruned_past_ten, 20, message="ten history rows written")
    assert max(seen) <= 3
    rows = history()
    assert len(rows) == 3
    ids = [r[0] for r in rows]
    assert ids == list(range(ids[0], ids[0] + 3)), "the newest rows, contiguous"
    published = [r[1] for r in rows]
    assert published == sorted(published)


# ---- the statistics event ---------------------------------------------------------------------
def test_statistics_event_carries_the_totals(
    broker: Mosquitto, config_path: Path, services: InProcessServices
) -> None:
    """publisher_statistics reports totals and connection state every stats_interval."""
    service = services.create(broker.port, config=config_path, stats_interval=0.2)
    with capture_logs() as logs:
        service.start()
        try:

            def stats(where: Callable[[LogEvent], bool]) -> LogEvent:
                found: list[LogEvent] = wait_until(
                    lambda: [
                        e for e in list(logs) if e["event"] == "publisher_statistics" and where(e)
                    ],
                    10,
                    message="publisher_statistics",
                )
                return found[-1]

            up = stats(lambda e: e["total_published"] >= 3)
            assert up["log_level"] == "info"
            assert up["connected"] is True
            assert (up["active_configs"], up["connections"], up["connections_up"]) == (2, 2, 2)
            assert up["total_published"] <= service.stats.totals().published
            assert (up["total_errors"], up["reconnects"]) == (0, 0)
            # A tick that runs before its connection's CONNACK (a busy machine can take longer
            # than the 0.2 s interval to connect) is dropped and counted, so not asserted as 0.
            assert up["total_dropped"] <= service.stats.totals().dropped
            assert up["uptime_seconds"] > 0

            broker.stop()
            down = stats(lambda e: e["connected"] is False and e["total_dropped"] > 0)
            assert down["connections_up"] == 0
            assert down["reconnects"] >= 1
            assert down["total_published"] >= up["total_published"]
        finally:
            service.stop()


# ---- systemd notifications from the real process ----------------------------------------------
def test_ready_is_sent_before_the_broker_is_up(
    tmp_path: Path, config_path: Path, notify_socket: NotifySocket, processes: list[ServiceProcess]
) -> None:
    """READY=1 does not wait for the broker; STATUS= then says when it is connected."""
    port = free_port()  # nothing listens here yet
    run_process(
        processes,
        tmp_path,
        port,
        config_path,
        "--stats-interval",
        "0.2",
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
    )

    (ready,) = notify_socket.wait_for("READY=1", timeout=15)
    assert ready.lines[0] == "READY=1"
    assert ready.lines[1].startswith("STATUS=not connected; 2 entries; 0/")

    late = Mosquitto(tmp_path, port=port)
    late.start()
    try:
        notify_socket.wait_for("STATUS=connected; 2 entries; 2/2 connections up", timeout=15)
    finally:
        late.stop()


def test_sighup_sends_reloading_then_ready(
    tmp_path: Path,
    broker: Mosquitto,
    config_path: Path,
    notify_socket: NotifySocket,
    processes: list[ServiceProcess],
) -> None:
    """SIGHUP: RELOADING=1 with MONOTONIC_USEC=, then READY=1 once the reload is done."""
    proc = run_process(
        processes,
        tmp_path,
        broker.port,
        config_path,
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
    )
    notify_socket.wait_for("READY=1", timeout=15)
    mark = time.monotonic()

    proc.signal(signal.SIGHUP)

    notify_socket.wait_for("READY=1", since=mark)
    after = [d for d in notify_socket.datagrams(mark) if not d.lines[0].startswith("STATUS=")]
    assert [d.lines[0] for d in after[:2]] == ["RELOADING=1", "READY=1"]
    (usec,) = [x for x in after[0].lines if x.startswith("MONOTONIC_USEC=")]
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 < now_usec - int(usec.removeprefix("MONOTONIC_USEC=")) < 30_000_000
    assert any(x.startswith("STATUS=") for x in after[1].lines)
    assert proc.proc.poll() is None


def test_watchdog_pings_at_half_of_watchdog_usec(
    tmp_path: Path,
    broker: Mosquitto,
    config_path: Path,
    notify_socket: NotifySocket,
    processes: list[ServiceProcess],
) -> None:
    """WATCHDOG_USEC=1000000: WATCHDOG=1 about every 0.5 s, never a gap near the limit."""
    run_process(
        processes,
        tmp_path,
        broker.port,
        config_path,
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"},
    )
    notify_socket.wait_for("READY=1", timeout=15)

    pings = notify_socket.wait_for("WATCHDOG=1", count=9, timeout=15)
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.9, gaps
    assert 0.35 < sorted(gaps)[len(gaps) // 2] < 0.65, gaps


def test_no_watchdog_pings_without_watchdog_usec(
    tmp_path: Path,
    broker: Mosquitto,
    config_path: Path,
    notify_socket: NotifySocket,
    processes: list[ServiceProcess],
) -> None:
    """Without WATCHDOG_USEC the service never pings the watchdog."""
    run_process(
        processes,
        tmp_path,
        broker.port,
        config_path,
        "--stats-interval",
        "0.2",
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
    )
    notify_socket.wait_for("STATUS=connected", count=3, timeout=15)
    assert notify_socket.with_line("WATCHDOG=1") == []


def test_sigterm_sends_stopping_and_exits_cleanly(
    tmp_path: Path,
    broker: Mosquitto,
    config_path: Path,
    notify_socket: NotifySocket,
    processes: list[ServiceProcess],
) -> None:
    """SIGTERM: STOPPING=1, then a clean exit with code 0."""
    proc = run_process(
        processes,
        tmp_path,
        broker.port,
        config_path,
        env={"NOTIFY_SOCKET": str(notify_socket.path)},
    )
    notify_socket.wait_for("READY=1", timeout=15)
    mark = time.monotonic()

    proc.signal(signal.SIGTERM)

    assert proc.wait(15) == 0
    (stopping,) = notify_socket.wait_for("STOPPING=1", since=mark)
    assert stopping.lines == ["STOPPING=1"]
    assert notify_socket.with_line("READY=1", since=mark) == []


# ---- the watchdog and health (in-process) -----------------------------------------------------
@pytest.fixture
def watched_service(
    monkeypatch: pytest.MonkeyPatch,
    notify_socket: NotifySocket,
    broker: Mosquitto,
    config_path: Path,
) -> Iterator[PublisherService]:
    """An in-process service under a 0.4 s systemd watchdog (a ping every 0.2 s)."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    services = InProcessServices(config_path.parent)
    service = services.start(broker.port, config=config_path)
    wait_until(service.is_connected, 10, message="connected")
    notify_socket.wait_for("WATCHDOG=1", count=3)
    yield service
    services.close()


def wedge_watcher(service: PublisherService) -> None:
    service._watcher.stop()  # the observer thread ends, as if it had died


def wedge_scheduler(service: PublisherService) -> None:
    service._schedule.shutdown()  # the scheduler thread ends, as if it had died


@pytest.mark.parametrize(
    ("wedge", "problem"),
    [
        (wedge_watcher, "config watcher not running"),
        (wedge_scheduler, "scheduler not running"),
    ],
)
def test_watchdog_pings_stop_when_a_component_is_wedged(
    watched_service: PublisherService,
    notify_socket: NotifySocket,
    wedge: Callable[[PublisherService], None],
    problem: str,
) -> None:
    """A dead component is a health problem: the pings stop, so systemd restarts the service."""
    service = watched_service
    with capture_logs() as logs:
        wedge(service)
        assert problem in wait_until(service.health_problems, 10, message="a health problem")

        def withheld() -> int:
            return sum(1 for e in list(logs) if e["event"] == "watchdog_ping_withheld")

        wait_until(lambda: withheld() >= 2, 10, message="two pings withheld")
        pings = len(notify_socket.with_line("WATCHDOG=1"))
        count = withheld()
        wait_until(lambda: withheld() >= count + 4, 10, message="four more pings withheld")

    assert len(notify_socket.with_line("WATCHDOG=1")) == pings
    event = next(e for e in logs if e["event"] == "watchdog_ping_withheld")
    assert problem in event["problems"]
    assert event["log_level"] == "error"


def test_watchdog_pings_go_on_through_a_broker_outage(
    watched_service: PublisherService, notify_socket: NotifySocket, broker: Mosquitto
) -> None:
    """A broker outage is not a liveness problem: restarting would not fix it."""
    service = watched_service
    with capture_logs() as logs:
        broker.stop()
        wait_until(lambda: not service.is_connected(), 10, message="disconnected")
        mark = time.monotonic()
        notify_socket.wait_for("WATCHDOG=1", count=5, since=mark)
        assert service.health_problems() == []
    assert not any(e["event"] == "watchdog_ping_withheld" for e in logs)
    assert not service.is_connected()
