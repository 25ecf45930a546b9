"""The MQTT connections: their lifecycle, their ids, and what the service says about them."""

from __future__ import annotations

import os
import resource
import socket
import stat
import struct
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import capture_logs

from scheduler_publisher import MQTTConnectionManager
from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.mqtt.client import ResetAwareClient, describe_reason
from scheduler_publisher.mqtt.faults import RETRY_FIRST
from scheduler_publisher.mqtt.session import (
    MAIN_LINK,
    LinkKey,
    Session,
    SessionCallbacks,
    State,
)
from scheduler_publisher.service import PublisherService
from scheduler_publisher.settings import BrokerSettings, MQTTVersion, default_client_id
from tests.netproxy import NetProxy
from tests.support import (
    InProcessServices,
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


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def leaked(before: set[str]) -> set[str]:
    """Descriptors open now that were not before. Not an equality: an earlier test's threads
    may still be closing theirs."""
    return open_fds() - before


def test_constructor_opens_nothing_and_disconnect_before_connect_is_a_no_op() -> None:
    """No descriptor is held by a manager that never connects; disconnect() is safe anyway."""
    before = open_fds()
    manager = MQTTConnectionManager(BrokerSettings(host="127.0.0.1", port=1))
    assert not leaked(before)
    manager.disconnect(0.5)
    manager.disconnect(0.5)
    assert not leaked(before)


def test_connect_then_disconnect_twice_releases_every_descriptor(broker: Mosquitto) -> None:
    """After a graceful disconnect (even a repeated one) the loop's descriptors are closed."""
    before = open_fds()
    manager = MQTTConnectionManager(BrokerSettings(host="127.0.0.1", port=broker.port))
    assert manager.connect(wait=10)
    manager.disconnect(3)
    manager.disconnect(3)
    assert not manager.is_connected()
    assert not leaked(before)


def broker_sockets(port: int) -> list[socket.socket]:
    """This process's TCP sockets connected to `port`, found through /proc, not the code."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # closed meanwhile
        try:
            if (
                sock.family == socket.AF_INET
                and sock.type == socket.SOCK_STREAM
                and sock.getpeername()[1] == port
            ):
                found.append(sock)
                continue
        except OSError:
            pass  # not connected
        sock.close()
    return found


def test_every_connection_turns_nagle_off(broker: Mosquitto) -> None:
    """TCP_NODELAY is set on the main and the lwt connections: with Nagle on, a PINGREQ held
    back for the broker's delayed ACK stalled the publishes behind it by ~40 ms."""
    manager = MQTTConnectionManager(
        BrokerSettings(
            host="127.0.0.1", port=broker.port, client_id=f"sp-nd-{uuid.uuid4().hex[:8]}"
        )
    )
    try:
        manager.set_entries(
            {
                "nd": PublishConfig(
                    id="nd",
                    topic=f"sp-test/{uuid.uuid4().hex}/nd",
                    data={"k": 1},
                    interval=30,
                    lwt=True,
                )
            }
        )
        assert manager.connect(wait=10)
        wait_until(lambda: manager.connection_counts() == (2, 2), 10, message="2 connections up")
        socks = broker_sockets(broker.port)
        try:
            # One per connection (a descriptor can show up twice: dups share the socket).
            assert len({s.getsockname() for s in socks}) == 2
            assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
        finally:
            for s in socks:
                s.close()
    finally:
        manager.disconnect(3)


# ---- the service's connections against a real broker ------------------------------------------

StartService = Callable[..., PublisherService]


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[StartService]:
    """In-process services (no watcher, no HTTP unless asked); stopped at teardown.

    Request it after the broker fixtures, so that teardown stops the services first."""
    services = InProcessServices(tmp_path)

    def start(
        port: int,
        entries: list[dict[str, Any]],
        *,
        client_id: str | None = None,
        protocol: MQTTVersion | None = None,
        **overrides: Any,
    ) -> PublisherService:
        chosen = {"client_id": client_id, "protocol": protocol}
        broker = {k: v for k, v in chosen.items() if v is not None} or None
        return services.start(port, entries, broker=broker, watch=False, **overrides)

    yield start
    services.close()


def reconfigure(service: PublisherService, entries: list[dict[str, Any]]) -> None:
    write_config(service.settings.config_path, entries)
    assert service.reload_config()


def test_an_entry_named_main_leaves_the_main_connection_alone(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """Entries with id "main", added and removed live, plain or lwt, never close the shared
    main connection: the other entries keep publishing and the status topic stays online."""
    keep = entry("keep", f"{topic_base}/keep", 0.5)
    sub = subscriber_factory(f"{topic_base}/#")
    service = start_service(broker.port, [keep])
    sub.wait_for(f"{topic_base}/keep")
    for named_main in (
        entry("main", f"{topic_base}/plain-main", 0.5),
        entry("main", f"{topic_base}/lwt-main", 0.5, lwt=True),
    ):
        reconfigure(service, [keep, named_main])
        sub.wait_for(named_main["topic"], where=online)
        reconfigure(service, [keep])
    before = len(sub.on(f"{topic_base}/keep"))
    sub.wait_for(f"{topic_base}/keep", count=before + 3)
    assert service.is_connected()
    status_topic = service.settings.broker.effective_status_topic
    late = subscriber_factory(status_topic)  # the retained status: still online
    assert late.wait_for(status_topic)[-1].json() == {"online": 1}
    # The lwt "main" went offline with its own will, on its own topic.
    assert any(offline(m) for m in sub.on(f"{topic_base}/lwt-main"))


def test_lwt_entries_with_control_characters_in_their_id_connect(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    start_service: StartService,
    topic_base: str,
) -> None:
    """lwt entries whose ids hold NUL, BEL, a newline, a space or a wildcard get client ids the
    broker accepts: each connects, publishes and has its will."""
    ids = ["nul\x00id", "bell\x07", "line\nbreak", "with space", "wild+#", "~tilde", "x" * 80]
    entries = [entry(i, f"{topic_base}/{n}", 0.5, lwt=True) for n, i in enumerate(ids)]
    sub = subscriber_factory(f"{topic_base}/#")
    service = start_service(broker.port, entries)
    for n in range(len(ids)):
        sub.wait_for(f"{topic_base}/{n}", where=online)
    assert service.get_status()["connection"]["connections_up"] == len(ids) + 1
    service.stop()
    for n in range(len(ids)):
        sub.wait_for(f"{topic_base}/{n}", where=offline)


def test_entry_client_ids_are_always_valid_and_distinct() -> None:
    """Derived client ids hold only printable ASCII, fit 64 bytes, differ per entry and never
    equal the main connection's id."""
    broker = BrokerSettings(client_id="svc")
    ids = ["a", "a\x00", "a\x07", "a b", "~a", "a/b", "é", "x" * 100, "x" * 101, "main", ""]
    derived = [broker.entry_client_id(i) for i in ids]
    assert len(set(derived)) == len(ids)
    assert "svc" not in derived
    for cid in derived:
        assert cid.isascii(), cid
        assert cid.isprintable(), cid
        assert " " not in cid, cid
        assert len(cid.encode()) <= 64, cid
    assert broker.entry_client_id("a/b") == "svc/a/b"  # plain ids stay readable


def test_default_client_id_differs_per_config_path_and_is_stable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two config files on one host give two client ids; one file gives the same id every
    time, whether written relative or absolute."""
    one, other = tmp_path / "one.json", tmp_path / "other.json"
    assert default_client_id(one) != default_client_id(other)
    assert default_client_id(one) == default_client_id(one)
    monkeypatch.chdir(tmp_path)
    assert default_client_id(Path("one.json")) == default_client_id(one)
    assert default_client_id(Path("sub/../one.json")) == default_client_id(one)
    assert len(default_client_id(one).encode()) <= 64
    assert default_client_id(one).startswith(default_client_id())


def test_mqtt5_reason_codes_are_named_in_words() -> None:
    """Broker reason codes read as their MQTT 5 names, never as a bare number."""

    def name(code: int) -> str:
        return describe_reason(ReasonCode(PacketTypes.DISCONNECT, identifier=code))

    assert name(0x8E) == "session taken over"
    assert name(0x8B) == "server shutting down"
    assert name(0x87) == "not authorized"


def get_json(port: int, path: str) -> dict[str, Any]:
    body: dict[str, Any] = call(port, path, timeout=5).json()  # /health's 503 is JSON too
    return body


def test_two_services_with_one_client_id_name_each_loss_and_claim_nothing_unproven(
    broker: Mosquitto, start_service: StartService, topic_base: str
) -> None:
    """Two processes on one client id against Mosquitto, which closes a taken-over connection
    without a reason, exactly as when it restarts: every disconnect names its cause and the
    broker, and no client-id conflict is claimed without the broker's word (MQTT 5 reason
    0x8E), in the log, /status or /health."""
    client_id = f"sp-twin-{uuid.uuid4().hex[:8]}"
    port = free_port()
    with capture_logs() as logs:
        first = start_service(
            broker.port, [entry("a", f"{topic_base}/a", 1)], client_id=client_id, http_port=port
        )
        assert first.connection.connect(wait=10)
        second = start_service(broker.port, [entry("b", f"{topic_base}/b", 1)], client_id=client_id)
        wait_until(
            lambda: first.stats.reconnects + second.stats.reconnects >= 6,
            30,
            message="six take-overs",
        )
        status = get_json(port, "/status")
    lost = [e for e in logs if e["event"] == "mqtt_disconnected"]
    assert lost
    assert all(
        e["reason"] == "connection closed by the broker"
        and e["broker"] == f"mqtt://127.0.0.1:{broker.port}"
        for e in lost
    ), lost
    assert not [e for e in logs if e["event"] == "mqtt_client_id_conflict"]
    assert status["connection"]["client_id_conflict"] is None


def test_the_main_connection_comes_first_under_a_connection_limit(
    tmp_path: Path, start_service: StartService, topic_base: str
) -> None:
    """With fewer broker connections than links, the main connection still gets one: plain
    entries publish, each refused lwt entry is warned about with its cause, and /status and
    /health name the entries without a connection."""
    limited = Mosquitto(tmp_path, extra="max_connections 3")  # room for 4 (see below)
    limited.start()
    sub = Subscriber(limited.port, [f"{topic_base}/#"]).start()  # takes one of the three
    try:
        lwt = [entry(f"lwt-{n}", f"{topic_base}/lwt-{n}", 1, lwt=True) for n in range(6)]
        with capture_logs() as logs:
            service = start_service(limited.port, [*lwt, entry("plain", f"{topic_base}/p", 0.5)])
            sub.wait_for(f"{topic_base}/p", count=3)

            def warned() -> set[str]:
                return {
                    e["entry_id"]
                    for e in list(logs)
                    if e["log_level"] == "warning" and e["event"] == "entry_connection_failed"
                }

            def unconnected() -> dict[str, Any]:
                found: dict[str, Any] = service.get_status()["connection"][
                    "entries_without_connection"
                ]
                return found

            # Mosquitto counts its limit loosely: some lwt entries connect, most do not.
            wait_until(
                lambda: (
                    unconnected()["lwt_entries_total"] >= 2
                    and warned() == set(unconnected()["lwt_entries"])
                ),
                30,
                message="a warning for each lwt entry without a connection",
            )
        assert service.is_connected()
        failed = [e for e in logs if e["event"] == "entry_connection_failed"]
        assert all(
            e["reason"] == "connection closed by the broker before CONNACK"
            and e["broker"] == f"mqtt://127.0.0.1:{limited.port}"
            for e in failed
        ), failed
        # One warning per entry and cause, however often it is retried.
        assert len([e for e in failed if e["log_level"] == "warning"]) == len(warned())
        status = unconnected()
        assert not status["main_connection_down"]
        assert status["count"] == status["lwt_entries_total"] == len(status["lwt_entries"])
        assert set(status["lwt_entries"].values()) == {
            "connection closed by the broker before CONNACK"
        }
        assert any(
            f"{status['count']} lwt entries have no connection" in w
            for w in service.health_warnings()
        )
    finally:
        sub.stop()
        limited.stop()


def test_status_last_error_carries_why_the_main_connection_fails_before_connack(
    tmp_path: Path, start_service: StartService, topic_base: str
) -> None:
    """While the broker turns the main connection away before CONNACK, /status
    connection.last_error says what the log says, and /health names the main connection."""
    full = Mosquitto(tmp_path, extra="max_connections 1")
    full.start()
    # Mosquitto 2.0 accepts one connection more than max_connections: two fill it.
    holders = [Subscriber(full.port, [f"{topic_base}/#"]).start() for _ in range(2)]
    try:
        with capture_logs() as logs:
            service = start_service(full.port, [entry("a", f"{topic_base}/a", 1)])
            failed = wait_until(
                lambda: [e for e in list(logs) if e["event"] == "mqtt_connect_failed"],
                20,
                message="a failed connect",
            )
        status = service.get_status()["connection"]
        assert failed[0]["reason"] == "connection closed by the broker before CONNACK"
        assert failed[0]["broker"] == f"mqtt://127.0.0.1:{full.port}"
        assert status["last_error"] == failed[0]["reason"]
        assert not status["connected"]
        assert status["entries_without_connection"]["main_connection_down"]
        assert any(
            "main connection" in w and failed[0]["reason"] in w for w in service.health_warnings()
        )
    finally:
        for holder in holders:
            holder.stop()
        full.stop()


def test_the_main_connection_comes_first_under_a_low_open_file_limit(
    tmp_path: Path, broker: Mosquitto, subscriber_factory: SubscriberFactory, topic_base: str
) -> None:
    """Under a `ulimit -n` (soft and hard) too low for every link, the main connection still
    connects and the plain entry publishes; the lwt entries left without a descriptor wait,
    and the log says so once (issue 27 #8; tests/test_descriptors.py)."""
    config = tmp_path / "config.json"
    write_config(
        config,
        [
            *(entry(f"lwt-{n}", f"{topic_base}/lwt-{n}", 1, lwt=True) for n in range(40)),
            entry("plain", f"{topic_base}/plain", 0.5),
        ],
    )
    sub = subscriber_factory(f"{topic_base}/#")
    proc = ServiceProcess(
        cli_args(broker.port, config, "--no-watch", "--backoff-min", "0.5", command=()),
        cwd=tmp_path,
        before_exec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32)),
    )
    try:
        proc.wait_for_event("mqtt_connected", timeout=20)
        sub.wait_for(f"{topic_base}/plain", count=3)
        short = proc.wait_for_event("descriptors_short", timeout=20)
        assert short["links_waiting"] > 0, short
        assert short["log.level"] == "warning", short
        assert not [e for e in proc.events() if e.get("reason") == "Too many open files"]
    finally:
        proc.stop()


MAX_PACKET = 400  # the strict broker's max_packet_size: the "big" entry's payload is over it
LogEvents = MutableMapping[str, Any]


def small_entries(topic_base: str) -> list[dict[str, Any]]:
    return [entry(f"small-{n}", f"{topic_base}/small-{n}", 0.5) for n in range(3)]


def run_until_quarantined(
    start_service: StartService, port: int, topic_base: str, protocol: MQTTVersion = "5"
) -> tuple[PublisherService, list[LogEvents], list[LogEvents]]:
    """Three small entries and "big", whose payload is over the broker's max_packet_size, until
    "big" is quarantined: the service, the quarantine events (only "big"'s) and the log."""
    big = entry("big", f"{topic_base}/big", 1, data={"blob": "x" * (MAX_PACKET + 200)})
    with capture_logs() as logs:
        service = start_service(port, [*small_entries(topic_base), big], protocol=protocol)
        held = wait_until(
            lambda: [e for e in list(logs) if e["event"] == "entry_quarantined"],
            60,
            message="the entry quarantined",
        )
    assert [e["entry_id"] for e in held] == ["big"], held
    return service, held, logs


def test_an_entry_whose_publish_gets_the_connection_dropped_is_quarantined(
    tmp_path: Path, start_service: StartService, topic_base: str
) -> None:
    """An entry the broker refuses at runtime (here a payload over its max_packet_size) is
    named, held back and reported, and the other entries keep publishing on a connection that
    stays up."""
    strict = Mosquitto(tmp_path, extra=f"max_packet_size {MAX_PACKET}")
    strict.start()
    sub = Subscriber(strict.port, [f"{topic_base}/#"]).start()
    try:
        small = small_entries(topic_base)
        service, held, logs = run_until_quarantined(start_service, strict.port, topic_base)
        # The broker sends DISCONNECT "packet too large" and closes with the rest of our write
        # unread: a reset, which may discard the packet (the test below makes it always do).
        reasons = {e["reason"] for e in logs if e["event"] == "mqtt_disconnected"}
        assert reasons <= {"packet too large", "connection reset by the broker"}, reasons
        named = "packet too large" in reasons
        assert held[0]["reason"] == (
            "packet too large" if named else "connection reset by the broker"
        )
        assert not [e for e in logs if e["event"] == "mqtt_client_id_conflict"]
        assert held[0]["log_level"] == "error"
        wait_until(service.is_connected, 10, message="connected again")
        reconnects = service.stats.reconnects
        seen = len(sub.on(f"{topic_base}/small-0"))
        sub.wait_for(f"{topic_base}/small-0", count=seen + 6)  # three seconds of ticks
        assert service.stats.reconnects == reconnects, "the connection stays up"
        status = service.get_status()
        assert held[0]["reason"] in status["entries"]["big"]["quarantined"]
        assert status["entries"]["small-0"]["quarantined"] is None
        assert set(status["connection"]["quarantined_entries"]) == {"big"}
        assert any("big" in w for w in service.health_warnings())
        # An edit releases it: a payload the broker takes is published again.
        reconfigure(service, [*small, entry("big", f"{topic_base}/big", 1)])
        sub.wait_for(f"{topic_base}/big", where=online)
        assert service.get_status()["entries"]["big"]["quarantined"] is None
    finally:
        sub.stop()
        strict.stop()


def test_on_mqtt_311_a_refused_entry_is_quarantined_and_tried_again_with_backoff(
    tmp_path: Path, start_service: StartService, topic_base: str
) -> None:
    """MQTT 3.1.1 has no DISCONNECT from the broker: a packet over max_packet_size just closes
    the connection. The entry is still found (published alone, it drops the connection again),
    quarantined and reported in /status and metrics; the others keep publishing on a connection
    that stays up, no client-id conflict is claimed, and the entry is tried again alone after
    its backoff."""
    strict = Mosquitto(tmp_path, extra=f"max_packet_size {MAX_PACKET}")
    strict.start()
    sub = Subscriber(strict.port, [f"{topic_base}/#"]).start()
    try:
        with capture_logs() as logs:
            service, held, _ = run_until_quarantined(
                start_service, strict.port, topic_base, protocol="3.1.1"
            )
            # No reason on 3.1.1: a close, or a reset when our write was still unread.
            assert held[0]["reason"] in {
                "connection closed by the broker",
                "connection reset by the broker",
            }
            assert held[0]["times"] == 1
            assert held[0]["retry_in_s"] == pytest.approx(RETRY_FIRST, abs=1)
            wait_until(service.is_connected, 10, message="connected again")
            reconnects = service.stats.reconnects
            seen = len(sub.on(f"{topic_base}/small-0"))
            sub.wait_for(f"{topic_base}/small-0", count=seen + 6)  # three seconds of ticks
            assert service.stats.reconnects == reconnects, "the connection stays up"
            assert service.connection.quarantined_count() == 1
            again = wait_until(
                lambda: [e for e in list(logs) if e["event"] == "entry_quarantined"],
                RETRY_FIRST + 30,
                message="the retry, alone, quarantines it again",
            )
        assert [(e["entry_id"], e["times"]) for e in again] == [("big", 2)]
        assert again[0]["retry_in_s"] == pytest.approx(2 * RETRY_FIRST, abs=1)
        assert set(service.get_status()["connection"]["quarantined_entries"]) == {"big"}
        conflicts = [e for e in logs if e["event"] == "mqtt_client_id_conflict"]
        assert conflicts == []
        assert service.get_status()["connection"]["client_id_conflict"] is None
    finally:
        sub.stop()
        strict.stop()


def test_a_reset_that_swallows_the_brokers_disconnect_still_finds_the_entry(
    tmp_path: Path, start_service: StartService, topic_base: str
) -> None:
    """A broker that refuses a packet sends its DISCONNECT and closes with the rest of our
    write unread, so the close is a TCP reset, which can discard the DISCONNECT before we read
    it. Here a proxy makes every such close a reset without the packet: the entry is still
    found and quarantined, and the resets are not taken for a client-id conflict."""
    strict = Mosquitto(tmp_path, extra=f"max_packet_size {MAX_PACKET}")
    strict.start()
    proxy = NetProxy(strict.port).start()
    proxy.reset_at_disconnect()
    sub = Subscriber(strict.port, [f"{topic_base}/#"]).start()
    try:
        service, held, logs = run_until_quarantined(start_service, proxy.port, topic_base)
        assert held[0]["reason"] == "connection reset by the broker"
        drops = [e for e in logs if e["event"] == "mqtt_disconnected"]
        assert drops
        assert {e["reason"] for e in drops} == {"connection reset by the broker"}
        assert not [e for e in logs if e["event"] == "mqtt_client_id_conflict"]
        wait_until(service.is_connected, 10, message="connected again")
        seen = len(sub.on(f"{topic_base}/small-0"))
        sub.wait_for(f"{topic_base}/small-0", count=seen + 4)
        assert "connection reset" in service.get_status()["entries"]["big"]["quarantined"]
    finally:
        sub.stop()
        proxy.stop()
        strict.stop()


def test_the_client_notes_a_reset_once_and_forgets_it_on_the_next_connect() -> None:
    """ResetAwareClient, on real sockets: a peer that resets the connection is noted by the
    read that meets it; take_reset() reports it once; a reset noted but never reported (the
    loop dropped the socket itself) does not outlive the next connect."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = ResetAwareClient(CallbackAPIVersion.VERSION2, client_id="reset-test")

    def connect_and_reset() -> None:
        assert client.reconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS
        peer, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # an RST: the CONNECT it did not read is discarded
        wait_until(
            lambda: client.loop_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST,
            5,
            message="the read that meets the reset",
        )

    try:
        client.connect_async("127.0.0.1", listener.getsockname()[1])
        connect_and_reset()
        assert client.take_reset() is True
        assert client.take_reset() is False
        connect_and_reset()
        assert client.reconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS  # noted, never taken
        assert client.take_reset() is False
    finally:
        client._sock_close()
        listener.close()


def test_which_losses_may_blame_a_packet() -> None:
    """A DISCONNECT that names a packet fault, or any close or reset by the broker that names
    no cause (on either protocol: MQTT 3.1.1 brokers never name one), may blame a packet we
    sent and makes the entries just published suspects; a DISCONNECT naming another cause, or
    a loss we caused ourselves (a timeout), does not."""
    ignore: Any = lambda *_: None  # noqa: E731 - the callbacks this test does not watch
    callbacks = SessionCallbacks(
        connected=ignore,
        refused=ignore,
        lost=ignore,
        published=ignore,
        want_write=ignore,
        socket_closed=ignore,
    )
    cases: list[tuple[MQTTVersion, int | None, bool, bool]] = [  # DISCONNECT, broker's doing
        ("5", 0x95, True, True),
        ("5", 0x8E, True, False),
        ("5", 0x8B, True, False),
        ("5", None, False, False),
        ("5", None, True, True),
        ("3.1.1", None, True, True),
        ("3.1.1", None, False, False),
    ]
    for protocol, reason, by_broker, blames in cases:
        link = Session(
            MAIN_LINK, "p", None, BrokerSettings(client_id="p", protocol=protocol), callbacks
        )
        link.broker_reason, link.dropped_by_broker = reason, by_broker
        assert link.may_blame_a_packet is blames, (protocol, reason, by_broker)


def test_an_mqtt5_take_over_is_named_and_marks_a_conflict_at_once() -> None:
    """A DISCONNECT with reason 0x8E reaches the loop as "session taken over" and marks a
    client-id conflict at the first occurrence; a drop without a reason never does, however
    often, and the conflict clears once the connection has stayed up."""
    lost: list[tuple[str, bool]] = []
    ignore: Any = lambda *_: None  # noqa: E731 - the callbacks this test does not watch
    callbacks = SessionCallbacks(
        connected=ignore,
        refused=ignore,
        lost=lambda _s, _event, why, over: lost.append((why, over)),
        published=ignore,
        want_write=ignore,
        socket_closed=ignore,
    )
    link = Session(MAIN_LINK, "twin", None, BrokerSettings(client_id="twin"), callbacks)
    link.state = State.CONNECTED
    taken = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    link._on_disconnect(
        link.client, None, DisconnectFlags(is_disconnect_packet_from_server=True), taken, None
    )
    assert lost == [("session taken over", True)]
    link.judge_loss(taken_over=lost[0][1])
    assert link.conflict is not None
    assert "twin" in link.conflict

    silent = Session(LinkKey("e"), "twin/e", None, BrokerSettings(client_id="twin"), callbacks)
    silent.state = State.CONNECTED
    silent._on_disconnect(
        silent.client, None, DisconnectFlags(is_disconnect_packet_from_server=False), taken, None
    )
    assert lost[-1] == ("connection closed by the broker", False)
    for _ in range(5):  # a broker restarting looks just like this: nothing is claimed
        silent.judge_loss(taken_over=False)
        assert silent.conflict is None
    silent.judge_loss(taken_over=True)
    assert silent.conflict is not None
    silent.settled()  # up for STABLE_AFTER: whoever took it over has gone
    assert silent.conflict is None
