"""Per-entry Last Will, end to end: the real service process against a real Mosquitto.

Every `lwt: true` entry has a connection of its own whose will is `{"online": 0, ...data}`;
the main connection carries the other entries and the retained status topic.
"""

from __future__ import annotations

import resource
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.mqtt.connection import MQTTConnectionManager
from scheduler_publisher.settings import BrokerSettings
from tests.support import (
    Mosquitto,
    Received,
    ServiceProcess,
    Subscriber,
    SubscriberFactory,
    barrier,
    call,
    cli_args,
    entry,
    free_port,
    offline,
    online,
    wait_until,
    write_config,
)


@dataclass
class Running:
    """One service process and what a test needs to know about it."""

    proc: ServiceProcess
    client_id: str
    config: Path
    http_port: int

    @property
    def status_topic(self) -> str:
        return f"scheduler-publisher/{self.client_id}/status"

    def entry_client_id(self, entry_id: str) -> str:
        return f"{self.client_id}/{entry_id}"

    def reconfigure(self, entries: list[dict[str, Any]]) -> None:
        # Entries publish as soon as they connect, which can be before the watcher is watching.
        self.proc.wait_for_event("service_started", timeout=30)
        write_config(self.config, entries)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time it was sent."""
        at = time.monotonic()
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(10)
        return at

    def status(self) -> dict[str, Any]:
        reply = call(self.http_port, "/status", timeout=5)
        assert reply.status == 200, reply
        body: dict[str, Any] = reply.json()
        return body


@pytest.fixture
def start_service(broker: Mosquitto, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Starts the real CLI process against the test's broker; killed at teardown."""
    running: list[Running] = []

    def start(entries: list[dict[str, Any]], *extra: str, http_port: int = 0) -> Running:
        client_id = f"sp-lwt-{uuid.uuid4().hex[:8]}"
        config = tmp_path / "config.json"
        write_config(config, entries)
        args = cli_args(
            broker.port,
            config,
            *extra,
            http_port=http_port,
            state_db=tmp_path / "state.db",
            log_file=tmp_path / "service.log",
            client_id=client_id,
            backoff=(0.2, 1),
        )
        run = Running(ServiceProcess(args, cwd=tmp_path), client_id, config, http_port)
        running.append(run)
        return run

    yield start
    for run in running:
        run.proc.stop()
        # Shown by pytest only when the test failed.
        print(
            f"--- service {run.client_id} (exit {run.proc.proc.returncode}) ---",
            *run.proc.stdout[-40:],
            *run.proc.stderr[-20:],
            sep="\n",
        )


def connect_count(broker: Mosquitto, client_id: str) -> int:
    """How often the broker accepted a connection with this client id (its notice log)."""
    text = broker.log.read_text(errors="replace") if broker.log.exists() else ""
    return text.count(f" as {client_id} (")


def wait_online(sub: Subscriber, topics: list[str], timeout: float = 20) -> None:
    for topic in topics:
        sub.wait_for(topic, where=online, timeout=timeout)


# ---- the entries most tests use -------------------------------------------------------------


def mixed_entries(base: str) -> list[dict[str, Any]]:
    """Three lwt entries with different QoS/retain, and one entry on the main connection."""
    return [
        entry("a", f"{base}/a", 1, qos=1, retain=True, lwt=True, data={"room": "a", "n": 1}),
        entry("b", f"{base}/b", 1, qos=2, retain=False, lwt=True, data={"room": "b"}),
        entry("c", f"{base}/c", 1, qos=0, retain=True, lwt=True, data={"room": "c"}),
        entry("plain", f"{base}/plain", 1, qos=1, retain=True, data={"room": "plain"}),
    ]


def assert_wills(sub: Subscriber, base: str, timeout: float = 10) -> None:
    """Every lwt entry's offline payload arrives, with its data and its QoS."""
    a = sub.wait_for(f"{base}/a", where=offline, timeout=timeout)[-1]
    b = sub.wait_for(f"{base}/b", where=offline, timeout=timeout)[-1]
    c = sub.wait_for(f"{base}/c", where=offline, timeout=timeout)[-1]
    assert a.json() == {"online": 0, "room": "a", "n": 1}
    assert b.json() == {"online": 0, "room": "b"}
    assert c.json() == {"online": 0, "room": "c"}
    assert (a.qos, b.qos, c.qos) == (1, 2, 0)


def assert_late_subscriber_sees_retained_wills(
    broker: Mosquitto, base: str, status_topic: str, subscriber_factory: SubscriberFactory
) -> None:
    late = subscriber_factory(f"{base}/#", status_topic)
    barrier(broker.port, late, f"{base}/marker", qos=2)
    retained = {m.topic: m for m in late.snapshot() if m.retain}
    assert retained[f"{base}/a"].json() == {"online": 0, "room": "a", "n": 1}
    assert retained[f"{base}/c"].json() == {"online": 0, "room": "c"}
    assert f"{base}/b" not in retained  # not a retain entry: nothing kept for later
    assert retained[f"{base}/plain"].json()["online"] == 1  # no will on the main connection
    assert retained[status_topic].json() == {"online": 0}


# ---- tests ----------------------------------------------------------------------------------


def test_sigkill_publishes_each_lwt_entry_will_with_its_qos_and_retain(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """SIGKILL: the broker publishes every lwt entry's will and the status will, nothing else."""
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service(mixed_entries(topic_base))
    status = subscriber_factory(run.status_topic, qos=2)
    wait_online(sub, [f"{topic_base}/{k}" for k in ("a", "b", "c", "plain")])
    status.wait_for(run.status_topic, where=online, timeout=20)

    run.kill()

    assert_wills(sub, topic_base)
    status_will = status.wait_for(run.status_topic, where=offline, timeout=10)[-1]
    assert status_will.json() == {"online": 0}
    assert status_will.qos == 1
    barrier(broker.port, sub, f"{topic_base}/marker", qos=2)
    assert not [m for m in sub.on(f"{topic_base}/plain") if offline(m)]
    assert_late_subscriber_sees_retained_wills(
        broker, topic_base, run.status_topic, subscriber_factory
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--mqtt-version", "5"],
        ["--mqtt-version", "3.1.1"],
        ["--mqtt-version", "5", "--will-delay", "5"],
    ],
    ids=["mqtt5", "mqtt311", "mqtt5-will-delay"],
)
def test_sigterm_announces_every_lwt_entry_offline_and_exits_zero(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
    args: list[str],
) -> None:
    """SIGTERM: every lwt entry and the status topic go offline within 5 s; exit code 0."""
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service(mixed_entries(topic_base), *args)
    status = subscriber_factory(run.status_topic, qos=2)
    wait_online(sub, [f"{topic_base}/{k}" for k in ("a", "b", "c", "plain")])
    status.wait_for(run.status_topic, where=online, timeout=20)

    sent = time.monotonic()
    run.proc.signal(signal.SIGTERM)

    assert_wills(sub, topic_base, timeout=5)
    status.wait_for(run.status_topic, where=offline, timeout=5)
    assert run.proc.wait(5) == 0
    assert time.monotonic() - sent < 5 + 1  # + the poll step and process reaping
    barrier(broker.port, sub, f"{topic_base}/marker", qos=2)
    assert not [m for m in sub.on(f"{topic_base}/plain") if offline(m)]
    for key in ("a", "b", "c"):  # announced once, not by both the service and the broker
        assert len([m for m in sub.on(f"{topic_base}/{key}") if offline(m)]) == 1
    assert_late_subscriber_sees_retained_wills(
        broker, topic_base, run.status_topic, subscriber_factory
    )


def test_data_edit_reconnects_only_that_entry_with_the_new_will(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """Editing an lwt entry's data swaps its will; the other connections stay up untouched."""
    entries = mixed_entries(topic_base)
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service(entries)
    status = subscriber_factory(run.status_topic, qos=2)
    wait_online(sub, [f"{topic_base}/{k}" for k in ("a", "b", "c", "plain")])
    status.wait_for(run.status_topic, where=online, timeout=20)

    entries[0] = {**entries[0], "data": {"room": "a", "n": 2}}
    run.reconfigure(entries)
    sub.wait_for(
        f"{topic_base}/a",
        where=lambda m: m.json() == {"online": 1, "room": "a", "n": 2},
        timeout=20,
    )
    barrier(broker.port, sub, f"{topic_base}/marker", qos=2)
    assert not [m for m in sub.snapshot() if m.topic != f"{topic_base}/marker" and offline(m)]
    assert connect_count(broker, run.entry_client_id("a")) == 2
    for untouched in (run.client_id, run.entry_client_id("b"), run.entry_client_id("c")):
        assert connect_count(broker, untouched) == 1, untouched

    run.kill()

    wills = sub.wait_for(f"{topic_base}/a", where=offline, timeout=10)
    assert [m.json() for m in wills] == [{"online": 0, "room": "a", "n": 2}]
    sub.wait_for(f"{topic_base}/b", where=offline, timeout=10)
    status.wait_for(run.status_topic, where=offline, timeout=10)
    assert [m.json() for m in status.on(run.status_topic)] == [{"online": 1}, {"online": 0}]


def test_lwt_turned_off_moves_the_entry_to_the_main_connection_silently(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """lwt true -> false: no offline message, it keeps publishing, and a crash leaves it alone."""
    entries = [
        entry("t", f"{topic_base}/t", 1, qos=1, lwt=True),
        entry("other", f"{topic_base}/other", 1, qos=1, lwt=True),
    ]
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service(entries)
    status = subscriber_factory(run.status_topic, qos=2)
    wait_online(sub, [f"{topic_base}/t", f"{topic_base}/other"])
    status.wait_for(run.status_topic, where=online, timeout=20)

    run.reconfigure([{**entries[0], "lwt": False}, entries[1]])
    wait_until(
        lambda: f"Client {run.entry_client_id('t')} disconnected." in broker.log.read_text(),
        20,
        message="the entry's own connection to close",
    )
    moved = time.monotonic()
    sub.wait_for(f"{topic_base}/t", count=2, where=lambda m: m.at > moved and online(m), timeout=20)
    assert connect_count(broker, run.entry_client_id("t")) == 1  # not reopened

    run.kill()

    status.wait_for(run.status_topic, where=offline, timeout=10)
    sub.wait_for(f"{topic_base}/other", where=offline, timeout=10)
    barrier(broker.port, sub, f"{topic_base}/marker", qos=2)
    assert not [m for m in sub.on(f"{topic_base}/t") if offline(m)]


def test_lwt_turned_on_gives_the_entry_a_will(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """lwt false -> true: the entry gets its own connection, and a crash announces it offline."""
    plain = entry("u", f"{topic_base}/u", 1, qos=1, data={"kind": "u"})
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service([plain])
    wait_online(sub, [f"{topic_base}/u"])
    assert connect_count(broker, run.entry_client_id("u")) == 0

    run.reconfigure([{**plain, "lwt": True}])
    wait_until(
        lambda: connect_count(broker, run.entry_client_id("u")) == 1,
        20,
        message="the entry's own connection",
    )
    moved = time.monotonic()
    sub.wait_for(f"{topic_base}/u", where=lambda m: m.at > moved and online(m), timeout=20)
    assert not [m for m in sub.on(f"{topic_base}/u") if offline(m)]

    run.kill()

    will = sub.wait_for(f"{topic_base}/u", where=offline, timeout=10)[-1]
    assert will.json() == {"online": 0, "kind": "u"}
    assert will.qos == 1


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_removing_an_lwt_entry_announces_it_offline(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
    version: str,
) -> None:
    """Removing an lwt entry publishes its offline payload (QoS, retain kept); the rest runs on."""
    gone = entry(
        "gone", f"{topic_base}/gone", 1, qos=2, retain=True, lwt=True, data={"kind": "gone"}
    )
    keep = entry("keep", f"{topic_base}/keep", 1, qos=1, lwt=True)
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service([gone, keep], "--mqtt-version", version)
    wait_online(sub, [f"{topic_base}/gone", f"{topic_base}/keep"])

    run.reconfigure([keep])

    will = sub.wait_for(f"{topic_base}/gone", where=offline, timeout=10)[-1]
    assert will.json() == {"online": 0, "kind": "gone"}
    assert will.qos == 2
    after = time.monotonic()
    sub.wait_for(f"{topic_base}/keep", where=lambda m: m.at > after and online(m), timeout=10)
    barrier(broker.port, sub, f"{topic_base}/marker", qos=2)
    assert not [m for m in sub.on(f"{topic_base}/keep") if offline(m)]
    assert len([m for m in sub.on(f"{topic_base}/gone") if offline(m)]) == 1
    assert run.proc.proc.poll() is None
    late = subscriber_factory(f"{topic_base}/gone", qos=2)
    retained = late.wait_for(f"{topic_base}/gone", where=lambda m: m.retain, timeout=10)
    assert retained[-1].json() == {"online": 0, "kind": "gone"}


def test_an_lwt_entry_back_while_its_connection_closes_gets_one_again(
    broker: Mosquitto, topic_base: str
) -> None:
    """Removed and re-added while its offline announcement is in flight: reconnected, not lost."""
    settings = BrokerSettings(
        host="127.0.0.1",
        port=broker.port,
        client_id=f"sp-lwt-{uuid.uuid4().hex[:8]}",
        protocol="3.1.1",
        backoff_min=0.2,
        backoff_max=1,
    )
    config = PublishConfig(
        id="r", topic=f"{topic_base}/r", data={"k": 1}, interval=30, qos=1, lwt=True
    )
    manager = MQTTConnectionManager(settings)
    manager.set_entries({"r": config})
    try:
        manager.connect(wait=10)
        wait_until(lambda: manager.connection_counts() == (2, 2), 20, message="2 connections up")

        # 3.1.1 announces offline itself and disconnects after the PUBACK: closing takes a trip.
        manager.set_entries({})
        manager.set_entries({"r": config})

        wait_until(
            lambda: connect_count(broker, settings.entry_client_id("r")) == 2,
            20,
            message="the entry's connection to reconnect",
        )
        wait_until(lambda: manager.connection_counts() == (2, 2), 20, message="2 connections up")
    finally:
        manager.disconnect()


# ---- will delay -----------------------------------------------------------------------------


def kick(broker: Mosquitto, client_id: str) -> None:
    """Take over `client_id`'s session (the broker drops that connection), then leave politely.

    clean_start=False with a session that outlives the connection is a reconnect as far as the
    broker is concerned: the will waits for its delay; with no session to resume, it goes now.
    """
    connected = Event()
    impostor = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )
    impostor.on_connect = lambda *_: connected.set()
    impostor.connect("127.0.0.1", broker.port, clean_start=False)
    impostor.loop_start()
    try:
        assert connected.wait(10), "the impostor was not accepted"
    finally:
        impostor.disconnect()
        impostor.loop_stop()


def test_will_delay_keeps_a_short_disconnect_quiet(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """--will-delay 5: a kicked entry connection reconnects without an offline message."""
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service([entry("w", f"{topic_base}/w", 1, qos=1, lwt=True)], "--will-delay", "5")
    wait_online(sub, [f"{topic_base}/w"])
    client_id = run.entry_client_id("w")

    kicked = time.monotonic()
    kick(broker, client_id)

    wait_until(
        lambda: connect_count(broker, client_id) >= 3,
        20,
        message="the service to reconnect after the kick",
    )
    # Past the will delay (and Mosquitto's once-a-second will timer), still publishing.
    sub.wait_for(f"{topic_base}/w", where=lambda m: m.at > kicked + 7 and online(m), timeout=20)
    barrier(broker.port, sub, f"{topic_base}/marker", qos=2)
    assert not [m for m in sub.on(f"{topic_base}/w") if offline(m)]

    killed = run.kill()

    will = sub.wait_for(f"{topic_base}/w", where=offline, timeout=20)[-1]
    assert will.at - killed > 3  # delayed on the new connection too (Mosquitto counts whole s)


def test_without_will_delay_a_kick_announces_offline_at_once(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """--will-delay 0: the same kick publishes the entry's offline payload, then it recovers."""
    sub = subscriber_factory(f"{topic_base}/#", qos=2)
    run = start_service([entry("w", f"{topic_base}/w", 1, qos=1, lwt=True)])
    wait_online(sub, [f"{topic_base}/w"])

    kicked = time.monotonic()
    kick(broker, run.entry_client_id("w"))

    will = sub.wait_for(f"{topic_base}/w", where=offline, timeout=5)[-1]
    assert will.at - kicked < 5
    sub.wait_for(f"{topic_base}/w", where=lambda m: m.at > will.at and online(m), timeout=20)


# ---- status and scale -----------------------------------------------------------------------


def connection_status(run: Running) -> dict[str, Any] | None:
    """The `connection` part of GET /status, or None while the server is not answering."""
    try:
        status: dict[str, Any] = run.status()["connection"]
    except OSError:
        return None
    return status


def test_status_reports_connections_and_connections_up(
    broker: Mosquitto, topic_base: str, start_service: Callable[..., Running]
) -> None:
    """/status counts the main connection plus one per lwt entry, and how many are up."""
    entries = [
        entry("a", f"{topic_base}/a", 1, lwt=True),
        entry("b", f"{topic_base}/b", 1, lwt=True),
        entry("plain", f"{topic_base}/plain", 1),
    ]
    run = start_service(entries, http_port=free_port())

    def counts() -> tuple[int, int] | None:
        status = connection_status(run)
        return (status["connections"], status["connections_up"]) if status else None

    wait_until(lambda: counts() == (3, 3), 20, message="3 of 3 connections up")
    body = run.status()
    assert body["connection"]["connected"] is True
    assert body["connection"]["client_id"] == run.client_id
    assert {i: e["lwt"] for i, e in body["entries"].items()} == {
        "a": True,
        "b": True,
        "plain": False,
    }

    broker.kill()
    wait_until(lambda: counts() == (3, 0), 20, message="0 of 3 connections up")
    broker.start()
    wait_until(lambda: counts() == (3, 3), 30, message="3 of 3 connections up again")

    run.reconfigure([*entries, entry("c", f"{topic_base}/c", 1, lwt=True)])
    wait_until(lambda: counts() == (4, 4), 20, message="4 of 4 connections up")


SCALE = 1000


def open_files_limit(pid: int) -> int:
    """A running process's soft RLIMIT_NOFILE, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return 1 << 30 if soft == "unlimited" else int(soft)
    raise AssertionError(f"no open-files limit for pid {pid}")


@pytest.fixture
def many_files() -> Iterator[None]:
    """Enough file descriptors for a thousand connections in the service (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * SCALE if hard == resource.RLIM_INFINITY else min(hard, 4 * SCALE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
@pytest.mark.usefixtures("many_files")
def test_a_thousand_lwt_entries_each_get_a_will(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    start_service: Callable[..., Running],
) -> None:
    """1,000 lwt entries in one process: 1,001 connections up, all publish, all wills arrive."""
    entries = [
        entry(f"e{i:04d}", f"{topic_base}/e{i:04d}", 30, lwt=True, data={"i": i})
        for i in range(SCALE)
    ]
    sub = subscriber_factory(f"{topic_base}/#", qos=1)
    run = start_service(entries, http_port=free_port())
    assert broker.proc is not None
    for pid in (broker.proc.pid, run.proc.proc.pid):
        assert open_files_limit(pid) > 2 * SCALE, pid

    def up() -> int:
        status = connection_status(run)
        return status["connections_up"] if status else 0

    wait_until(lambda: up() == SCALE + 1, 90, interval=0.5, message=f"{SCALE + 1} connections up")
    expected = {e["topic"] for e in entries}

    def topics(where: Callable[[Received], bool]) -> set[str]:
        return {m.topic for m in sub.snapshot() if where(m)}

    wait_until(
        lambda: topics(online) == expected, 60, interval=0.2, message=f"{SCALE} topics publishing"
    )

    run.kill()

    wait_until(lambda: topics(offline) == expected, 60, interval=0.2, message=f"{SCALE} wills")
    wills = {m.topic: m.json() for m in sub.snapshot() if offline(m)}
    assert all(wills[e["topic"]] == {"online": 0, "i": e["data"]["i"]} for e in entries)
