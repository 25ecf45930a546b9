"""Faults end to end: broker restarts, silent network cuts, stalls, long outages, hostile config
edits and signal storms. Real Mosquitto, the real service process, and tests/netproxy.py."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.netproxy import NetProxy
from tests.support import (
    Mosquitto,
    ServiceProcess,
    Subscriber,
    SubscriberFactory,
    call,
    cli_args,
    entry,
    free_port,
    offline,
    online,
    wait_until,
    write_config,
)


class Service:
    """One real service process with an HTTP port, and helpers to look at it."""

    def __init__(self, proc: ServiceProcess, config: Path, http_port: int) -> None:
        self.proc = proc
        self.config = config
        self.http_port = http_port

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        reply = call(self.http_port, path, timeout=15)
        return reply.status, json.loads(reply.body or b"{}")

    def status(self) -> dict[str, Any]:
        return self.get("/status")[1]

    def healthy(self) -> bool:
        return self.alive() and self.get("/health")[0] == 200

    def reload(self) -> dict[str, Any]:
        reply = call(self.http_port, "/reload", "POST", timeout=30)
        assert reply.status == 200, reply
        body: dict[str, Any] = reply.json()
        return body

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def count(self, event: str) -> int:
        return sum(1 for e in self.proc.events() if e.get("message") == event)

    def wait_count(self, event: str, count: int, timeout: float = 30) -> None:
        wait_until(
            lambda: self.count(event) >= count,
            timeout,
            message=f"{count} x {event!r} (output: {self.proc.stdout[-5:]})",
        )

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Starts the real CLI (HTTP on a free port) against `port`; killed at teardown."""
    started: list[Service] = []

    def start(port: int, entries: list[dict[str, Any]], *extra: str) -> Service:
        config = tmp_path / "config.json"
        write_config(config, entries)
        http_port = free_port()
        args = cli_args(
            port,
            config,
            *extra,
            http_port=http_port,
            log_file=tmp_path / "service.log",
            backoff=(0.2, 1),
        )
        service = Service(ServiceProcess(args, cwd=tmp_path), config, http_port)
        started.append(service)
        service.proc.wait_for_event("service_started", timeout=30)
        wait_until(lambda: service.get("/health")[0] == 200, 20, message="/health 200")
        return service

    yield start
    for service in started:
        service.proc.stop()


# ---- broker restarts ------------------------------------------------------------------------


def test_broker_killed_and_restarted_five_times_publishing_resumes_each_time(
    broker: Mosquitto, topic_base: str, start_service: Callable[..., Service]
) -> None:
    """SIGKILL the broker 5 times: each time publishing resumes within the backoff (max 1 s)."""
    topic = f"{topic_base}/r"
    service = start_service(broker.port, [entry("r", topic, 0.5)])
    service.wait_count("mqtt_connected", 1)
    for cycle in range(1, 6):
        broker.kill()
        service.wait_count("mqtt_disconnected", cycle)
        broker.start()
        back = time.monotonic()
        sub = Subscriber(broker.port, [topic]).start()
        try:
            got = sub.wait_for(topic, timeout=20)
        finally:
            sub.stop()
        # Backoff max 1 s + one 0.5 s interval + a busy machine's slack.
        assert got[0].at - back < 5.0, f"cycle {cycle}: {got[0].at - back:.2f}s"
        service.wait_count("mqtt_connected", cycle + 1)
        assert service.alive()
    assert service.healthy()


@pytest.mark.parametrize(
    ("protocol", "entries", "interval"), [("5", 20, 0.2), ("3.1.1", 20, 0.2), ("5", 1, 1.0)]
)
def test_broker_restarts_quarantine_nobody_and_claim_no_client_id_conflict(
    broker: Mosquitto,
    topic_base: str,
    start_service: Callable[..., Service],
    protocol: str,
    entries: int,
    interval: float,
) -> None:
    """A broker that goes away (SIGTERM or SIGKILL) right after some publishes gives no
    evidence against them: after five restarts, each once publishing has resumed, no entry
    is quarantined, no client-id conflict is claimed, and every entry publishes again."""
    topics = [f"{topic_base}/e{n}" for n in range(entries)]
    service = start_service(
        broker.port,
        [entry(f"e{n}", topic, interval) for n, topic in enumerate(topics)],
        "--mqtt-version",
        protocol,
    )
    service.wait_count("mqtt_connected", 1)
    for cycle in range(1, 7):
        sub = Subscriber(broker.port, [f"{topic_base}/#"]).start()
        try:
            for topic in topics:
                sub.wait_for(topic, count=2, timeout=20)
        finally:
            sub.stop()
        if cycle == 6:
            break
        if cycle % 2:
            broker.kill()
        else:
            broker.stop()
        service.wait_count("mqtt_disconnected", cycle)
        broker.start()
    assert service.count("entry_quarantined") == 0
    assert service.count("mqtt_client_id_conflict") == 0
    connection = service.status()["connection"]
    assert connection["quarantined_entries"] == {}
    assert connection["client_id_conflict"] is None


# ---- a silent network cut -------------------------------------------------------------------


def test_blackholed_network_is_noticed_wills_fire_and_service_reconnects(
    broker: Mosquitto,
    proxy: NetProxy,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Service],
) -> None:
    """No FIN, no RST: with --keepalive 2 the service notices within 1.5x keepalive, the broker
    fires the lwt will (1.5x keepalive), and once the path is back it reconnects."""
    sub = subscriber_factory(f"{topic_base}/#")
    service = start_service(
        proxy.port,
        [entry("w", f"{topic_base}/w", 1, qos=1, lwt=True), entry("p", f"{topic_base}/p", 1)],
        "--keepalive",
        "2",
    )
    sub.wait_for(f"{topic_base}/w", where=online, timeout=20)
    sub.wait_for(f"{topic_base}/p", timeout=20)

    cut = time.monotonic()
    proxy.blackhole()
    will = sub.wait_for(f"{topic_base}/w", where=offline, timeout=20)[0]
    assert will.json() == {"online": 0, "sensor": "w"}
    assert will.at - cut < 3 + 4, "mosquitto fires the will 1.5x keepalive after the cut"
    lost = service.proc.wait_for_event("mqtt_disconnected", timeout=20)
    noticed = time.monotonic() - cut
    # Our silence check noticed it, not paho's keepalive (which would take 2 x keepalive + 1 s)
    # and not a TCP error (a blackhole sends none).
    assert lost["reason"] == "no answer from the broker for 1.5x keepalive", lost
    # The last PUBACK came up to 1 s before the cut, silence for 1.5 x 2 s, the once-a-second
    # check, + generous slack for a shared machine.
    assert noticed < 1 + 1.5 * 2 + 1 + 5, noticed
    assert service.healthy()

    proxy.resume()
    healed = time.monotonic()
    sub.wait_for(f"{topic_base}/w", where=lambda m: online(m) and m.at > healed, timeout=30)
    sub.wait_for(f"{topic_base}/p", where=lambda m: m.at > healed, timeout=30)
    service.wait_count("mqtt_connected", 2)


# ---- a stalled broker must not stall the scheduler --------------------------------------------


def ticks(service: Service) -> dict[str, int]:
    return {
        i: e.get("lateness", {}).get("count", 0) for i, e in service.status()["entries"].items()
    }


@pytest.mark.parametrize("fault", ["blackhole", "throttle"])
def test_stalled_broker_does_not_block_the_scheduler(
    broker: Mosquitto,
    proxy: NetProxy,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Service],
    fault: str,
) -> None:
    """A broker that stops reading (or trickles): ticks keep running on time and /health is 200."""
    sub = subscriber_factory(f"{topic_base}/#")
    entries = [
        entry(f"s{i}", f"{topic_base}/s{i}", 0.2, qos=1, data={"blob": "x" * 2000})
        for i in range(10)
    ]
    service = start_service(proxy.port, entries, "--keepalive", "60")
    sub.wait_for(f"{topic_base}/s9", timeout=20)
    if fault == "blackhole":
        proxy.blackhole()
    else:
        proxy.throttle(2000)  # far below the ~100 kB/s the entries produce
    before = ticks(service)
    deferred_before = sum(e.get("deferred", 0) for e in service.status()["entries"].values())
    # 25 more ticks per entry is 5 s of schedule at 0.2 s.
    wait_until(
        lambda: all(n >= before[i] + 25 for i, n in ticks(service).items()),
        30,
        message="ticks to keep coming during the stall",
    )
    assert service.healthy()
    status = service.status()
    assert status["connected"] is True  # keepalive 60: the stall is not a disconnect (yet)
    # Still "connected", but ticks are no longer piled into paho: at most a few per entry wait
    # there, the rest are counted as deferred (of 250 ticks, far more than 10 x 4 + slack).
    deferred = sum(e.get("deferred", 0) for e in status["entries"].values()) - deferred_before
    assert deferred >= 150, deferred
    assert status["health"]["ok"] is True
    for entry_id, e in status["entries"].items():
        assert e["lateness"]["mean_ms"] < 1000, (entry_id, e["lateness"])
    proxy.throttle(0)
    proxy.resume()
    healed = time.monotonic()
    sub.wait_for(f"{topic_base}/s0", where=lambda m: m.at > healed, timeout=60)


# ---- a long QoS 1 outage ----------------------------------------------------------------------


def test_qos1_outage_keeps_memory_bounded_and_sends_only_the_newest_after_reconnect(
    broker: Mosquitto,
    proxy: NetProxy,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Service],
) -> None:
    """60 s without the broker at 200 QoS 1 ticks/s of 8 KB: RSS stays flat (no backlog), and
    after reconnect each entry sends its current payload, not the stale backlog."""
    sub = subscriber_factory(f"{topic_base}/#", qos=1)
    entries = [
        entry(f"q{i}", f"{topic_base}/q{i}", 0.1, qos=1, data={"blob": "y" * 8000})
        for i in range(20)
    ]
    service = start_service(proxy.port, entries)
    wait_until(
        lambda: all(e.get("published", 0) >= 20 for e in service.status()["entries"].values()),
        30,
        message="every entry publishing",
    )
    baseline = service.rss_kib()

    proxy.sever()
    service.wait_count("mqtt_disconnected", 1)
    start = {i: e.get("deferred", 0) for i, e in service.status()["entries"].items()}
    # A 60 s outage: 595 deferred ticks per entry at 0.1 s.
    wait_until(
        lambda: all(
            e.get("deferred", 0) >= start[i] + 595 for i, e in service.status()["entries"].items()
        ),
        120,
        message="60 s of deferred QoS 1 ticks",
    )
    grown = service.rss_kib() - baseline
    # A replayed backlog would be 20 x 595 x 8 KB, about 95 MB, plus paho's message objects.
    assert grown < 6 * 1024, f"RSS grew by {grown} KiB during the outage"

    proxy.resume()
    healed = time.monotonic()
    service.wait_count("mqtt_connected", 2)
    for i in range(20):
        topic = f"{topic_base}/q{i}"
        first = sub.wait_for(topic, where=lambda m: m.at > healed, timeout=30)[0]
        burst = [m for m in sub.on(topic) if first.at <= m.at <= first.at + 1.0]
        # Birth + at most ~10 grid ticks in that second; a backlog would be ~600.
        assert len(burst) <= 14, (topic, len(burst))
        assert all(m.json() == {"online": 1, "blob": "y" * 8000} for m in burst)
    assert service.healthy()


# ---- hostile config edits ---------------------------------------------------------------------


def deep(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels):
        value = {"d": value}
    return value


def hostile_files(topic: str, limit: int) -> list[tuple[str, bytes | None]]:
    """(name, content); None content means "swap a directory in for the file"."""
    good = {"id": "keep", "topic": topic, "data": {"sensor": "keep"}, "interval": 0.5}
    return [
        (
            "wrong types",
            json.dumps(
                [{**good, "data": "text", "interval": "fast", "qos": "1", "retain": "yes"}]
            ).encode(),
        ),
        ("huge numbers", json.dumps([{**good, "interval": 1e308, "qos": 10**30}]).encode()),
        ("overflowing float", json.dumps([good]).replace("0.5", "1e999").encode()),
        (
            "integer above the str digit limit",
            json.dumps([good]).replace("0.5", "9" * 5000).encode(),
        ),
        ("NaN", json.dumps([good]).replace("0.5", "NaN").encode()),
        ("deep data", json.dumps([{**good, "data": deep(40)}]).encode()),
        ("deep document", b"[" * 5000 + b"]" * 5000),
        ("invalid UTF-8", json.dumps([good]).encode().replace(b"keep", b"k\xffep", 1)),
        ("empty", b""),
        ("half written", json.dumps([good]).encode()[:20]),
        ("not an array", b'{"id": "keep"}'),
        (
            "above the size limit",
            json.dumps([{**good, "data": {"pad": "z" * (limit + 10)}}]).encode(),
        ),
        ("directory", None),
    ]


def write_bytes(path: Path, content: bytes | None) -> None:
    if path.is_dir():
        path.rmdir()
    if content is None:
        path.unlink(missing_ok=True)
        path.mkdir()
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


def assert_keeps_running(service: Service, topic: str, after: str = "") -> None:
    assert service.alive(), after
    assert service.healthy(), after
    kept = service.status()["entries"]
    assert kept["keep"]["topic"] == topic, after
    assert kept["keep"]["interval"] == 0.5, after


def test_hostile_config_edits_never_kill_the_service(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Service],
    tmp_path: Path,
) -> None:
    """Wrong types, huge numbers, NaN, deep nesting, bad UTF-8, empty, a directory, too big: the
    service keeps the last good entry publishing and then applies the next valid file."""
    topic = f"{topic_base}/keep"
    sub = subscriber_factory(f"{topic_base}/#")
    limit = 4096
    service = start_service(
        broker.port, [entry("keep", topic, 0.5)], "--max-config-bytes", str(limit)
    )
    sub.wait_for(topic, timeout=20)
    for name, content in hostile_files(topic, limit):
        write_bytes(service.config, content)
        service.reload()  # synchronous: returns once the main loop has handled the file
        assert_keeps_running(service, topic, name)
        assert service.status()["entries"]["keep"]["topic"] == topic, name
    mark = time.monotonic()
    sub.wait_for(topic, where=lambda m: m.at > mark, count=2, timeout=10)

    write_bytes(service.config, None)  # leave the directory for the next valid write to replace
    (service.config).rmdir()
    write_config(service.config, [entry("keep", topic, 0.5), entry("fresh", f"{topic_base}/f", 1)])
    assert service.reload()["success"] is True
    sub.wait_for(f"{topic_base}/f", timeout=20)
    assert service.status()["active_configs"] == 2
    errors = [e for e in service.proc.events() if e.get("message") == "config_reload_failed"]
    assert errors, "the unusable files were reported"
    assert all(e["kept_entries"] == 1 for e in errors)


def test_a_100_mb_config_file_is_refused_without_reading_it_into_memory(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Service],
) -> None:
    """A 100 MB file (default 16 MiB limit) is refused with a clear error; the running entry
    keeps publishing and the process does not swallow the file (RSS grows far less)."""
    topic = f"{topic_base}/keep"
    sub = subscriber_factory(f"{topic_base}/#")
    service = start_service(broker.port, [entry("keep", topic, 0.5)])
    sub.wait_for(topic, timeout=20)
    before = service.rss_kib()
    with service.config.open("wb") as stream:  # in place, 1 MiB at a time
        stream.write(b"[")
        for _ in range(100):
            stream.write(b" " * (1024 * 1024))
    reply = service.reload()
    assert reply["success"] is False
    assert "16777216" in reply["error"] or "16 MiB" in reply["error"], reply
    assert_keeps_running(service, topic)
    assert service.rss_kib() - before < 40 * 1024, "the whole file was read into memory"
    mark = time.monotonic()
    sub.wait_for(topic, where=lambda m: m.at > mark, count=2, timeout=10)


def test_random_byte_flips_of_a_valid_file_never_kill_the_service(
    broker: Mosquitto,
    topic_base: str,
    start_service: Callable[..., Service],
    subscriber_factory: SubscriberFactory,
) -> None:
    """Hypothesis flips bytes of a valid file; after each reload the service is alive and
    healthy, and it applies the next valid file."""
    topic = f"{topic_base}/keep"
    good = [entry("keep", topic, 0.5, qos=1), entry("two", f"{topic_base}/two", 2, lwt=True)]
    original = json.dumps(good, indent=1).encode()
    service = start_service(broker.port, good)
    sub = subscriber_factory(f"{topic_base}/#")

    @settings(
        max_examples=30,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.lists(
            st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)),
            min_size=1,
            max_size=6,
        )
    )
    def flips(changes: list[tuple[int, int]]) -> None:
        mutated = bytearray(original)
        for at, value in changes:
            mutated[at] = value
        write_bytes(service.config, bytes(mutated))
        service.reload()
        assert service.alive(), service.proc.stderr[-10:]
        assert service.healthy()

    flips()
    write_config(service.config, [entry("keep", topic, 0.5), entry("last", f"{topic_base}/l", 1)])
    assert service.reload()["success"] is True
    sub.wait_for(f"{topic_base}/l", timeout=20)
    assert set(service.status()["entries"]) == {"keep", "last"}
    assert not [
        e
        for e in service.proc.events()
        if e.get("message") in ("network_loop_error", "network_command_failed")
    ]


# ---- signals ----------------------------------------------------------------------------------


def test_sighup_storm_leaves_the_service_healthy_and_sigterm_exits_zero(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Service],
) -> None:
    """50 SIGHUPs in a row: still healthy and publishing; then SIGTERM exits 0."""
    topic = f"{topic_base}/h"
    sub = subscriber_factory(topic)
    service = start_service(broker.port, [entry("h", topic, 0.5)])
    sub.wait_for(topic, timeout=20)
    for _ in range(50):
        service.proc.signal(signal.SIGHUP)
    wait_until(service.healthy, 20, message="healthy after the storm")
    mark = time.monotonic()
    sub.wait_for(topic, where=lambda m: m.at > mark, count=2, timeout=20)
    assert service.status()["active_configs"] == 1
    service.proc.signal(signal.SIGTERM)
    assert service.proc.wait(15) == 0


@pytest.mark.parametrize("moment", ["logging configured", "service started"])
def test_sigterm_during_startup_exits_zero(
    broker: Mosquitto, tmp_path: Path, topic_base: str, moment: str
) -> None:
    """SIGTERM while the service is still starting up ends it cleanly with exit code 0."""
    # The window between "logging configured" and "service built" is tens of ms: try it a few
    # times so that at least one signal lands inside it.
    for attempt in range(3 if moment == "logging configured" else 1):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        config = run_dir / "config.json"
        write_config(config, [entry("s", f"{topic_base}/s", 1, lwt=True)])
        log_file = run_dir / "service.log"
        args = cli_args(broker.port, config, state_db=run_dir / "state.db", log_file=log_file)
        proc = ServiceProcess(args, cwd=run_dir)
        try:
            if moment == "logging configured":
                # The log file is opened as logging is configured, before the service is built.
                wait_until(log_file.exists, 30, interval=0.001, message="the log file")
            else:
                proc.wait_for_event("service_started", timeout=30)
            proc.signal(signal.SIGTERM)
            assert proc.wait(15) == 0, "\n".join(proc.stderr[-20:])
        finally:
            proc.stop()
        assert any(e.get("message") == "service_stopped" for e in proc.events())


# ---- messages in flight when the link dies ----------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_qos1_message_in_flight_when_the_link_dies_arrives_after_reconnect(
    broker: Mosquitto,
    proxy: NetProxy,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    protocol: str,
) -> None:
    """A QoS 1 message written but never acknowledged (the path went dark under it) is sent
    again on the new connection, as MQTT requires, and reaches subscribers."""
    from scheduler_publisher import MQTTConnectionManager  # noqa: PLC0415
    from scheduler_publisher.mqtt.session import MAIN_LINK, Session  # noqa: PLC0415
    from scheduler_publisher.settings import BrokerSettings  # noqa: PLC0415

    topic = f"{topic_base}/inflight"
    sub = subscriber_factory(topic, qos=1)
    manager = MQTTConnectionManager(
        BrokerSettings(
            host="127.0.0.1",
            port=proxy.port,
            protocol=protocol,  # type: ignore[arg-type]
            backoff_min=0.2,
            backoff_max=0.5,
            client_id=f"inflight-{uuid.uuid4().hex[:8]}",
        )
    )
    try:
        assert manager.connect(wait=10)
        proxy.blackhole()
        payload = f"in-flight {uuid.uuid4().hex}".encode()
        assert manager.publish(topic, payload, qos=1)
        main = manager.event_loop.get(MAIN_LINK)  # the loop's session: paho's in-flight set
        assert isinstance(main, Session)
        wait_until(
            lambda: any(qos == 1 for _, qos in list(main.inflight.values())),
            10,
            message="the message handed to paho and unacknowledged",
        )
        proxy.sever()  # the dark connection dies; what it carried never reached the broker
        wait_until(lambda: not manager.is_connected(), 10, message="the loss noticed")
        assert sub.on(topic) == []
        proxy.resume()
        got = sub.wait_for(topic, timeout=20)
        assert got[0].payload == payload
    finally:
        manager.disconnect(3)
