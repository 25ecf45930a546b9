"""Pre-encoded QoS 0 packets (packet.py): the encoding against paho's own, the paho internals
they are written through, and on the wire against a real Mosquitto: byte-identical delivery,
whole phase groups, QoS 1 beside them, keepalive, a broker that stops reading, a restart."""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from scheduler_publisher import MQTTConnectionManager, PublishConfig
from scheduler_publisher.config.loader import MessageProperties
from scheduler_publisher.mqtt.netloop import FLUSH_BYTES
from scheduler_publisher.mqtt.packet import (
    RAW_COMMAND,
    PacketQueue,
    check_paho,
    encode_qos0,
    has_static_packet,
    static_header,
)
from scheduler_publisher.mqtt.session import MAIN_LINK, MAX_PENDING_PER_ENTRY, LinkKey, Session
from scheduler_publisher.settings import BrokerSettings, MQTTVersion
from tests.netproxy import NetProxy, packet_end
from tests.support import (
    InProcessServices,
    Mosquitto,
    Subscriber,
    SubscriberFactory,
    entry,
    group_ids,
    wait_until,
)

PROTOCOLS: list[MQTTVersion] = ["3.1.1", "5"]


# ---- encoding -----------------------------------------------------------------------------------
def paho_encoded(topic: str, payload: bytes, retain: bool, protocol: MQTTVersion) -> bytes:
    """What paho itself queues for a QoS 0 publish of these."""
    version = MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=version)
    client._sock = socket.socket()  # paho queues only with a socket; nothing is sent
    client.on_socket_register_write = lambda *_: None  # queue, do not write
    try:
        client.publish(topic, payload, 0, retain)
        return bytes(client._out_packet[-1]["packet"])
    finally:
        client._sock.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("topic", "payload", "retain"),
    [
        ("a/b", b'{"x":1}', False),
        ("caf\u00e9/\u6e29\u5ea6", b'{"t":21.5}', True),
        ("t", b"", False),
        ("long/" + "x" * 300, b"y" * 20_000, True),  # a three-byte remaining length
    ],
)
def test_encoding_matches_paho_byte_for_byte(
    topic: str, payload: bytes, retain: bool, protocol: MQTTVersion
) -> None:
    """The pre-encoded packet is exactly what paho would have written for the message."""
    ours = encode_qos0(topic, payload, retain=retain, protocol=protocol)
    assert ours == paho_encoded(topic, payload, retain, protocol)


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", "", "x" * 65_536])
def test_topics_paho_refuses_get_no_packet(topic: str) -> None:
    """A topic paho's publish would reject is left to paho, which reports the rejection."""
    assert encode_qos0(topic, b"{}", retain=False, protocol="5") is None


def test_only_static_qos0_entries_have_a_packet() -> None:
    """QoS 1/2 entries stay on paho's path (packet ids, in-flight tracking)."""
    zero = PublishConfig(id="z", topic="t/z", data={"v": 1}, interval=1)
    one = PublishConfig(id="o", topic="t/o", data={"v": 1}, interval=1, qos=1)
    assert has_static_packet(zero)
    header = static_header(zero, "5")
    assert header is not None
    assert header + zero.payload == encode_qos0("t/z", zero.payload, retain=False, protocol="5")
    assert not has_static_packet(one)
    assert static_header(one, "5") is None


def test_templated_entries_and_entries_with_properties_have_no_packet() -> None:
    """A templated entry renders each payload, and an entry with MQTT 5 properties sends them
    in its PUBLISH: neither has a static packet, whatever its QoS."""
    templated = PublishConfig(id="t", topic="t/t", data={"n": "{{seq}}"}, interval=1, template=True)
    with_properties = PublishConfig(
        id="p",
        topic="t/p",
        data={"v": 1},
        interval=1,
        properties=MessageProperties(content_type="application/json"),
    )
    for config in (templated, with_properties):
        assert not has_static_packet(config)
        assert static_header(config, "5") is None
        assert static_header(config, "3.1.1") is None


# ---- the paho internals written through -------------------------------------------------------
def test_paho_has_the_internals_we_use() -> None:
    """Fails loudly if a paho upgrade drops or reshapes `Client._out_packet` (the pre-encoded
    packets go through it) or the methods `client.ResetAwareClient` overrides or calls."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    check_paho(client)
    with pytest.raises(TypeError, match="_sock_recv"):
        check_paho(object())  # type: ignore[arg-type]
    overridden = (
        "_sock_recv",
        "_sock_send",
        "_send_pingreq",
        "_handle_pingresp",
        "_handle_pubackcomp",
    )
    with pytest.raises(TypeError, match="_handle_pingresp"):
        check_paho(types.SimpleNamespace(**{n: getattr(client, n) for n in overridden[:3]}))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="_handle_pubackcomp"):
        check_paho(types.SimpleNamespace(**{n: getattr(client, n) for n in overridden[:4]}))  # type: ignore[arg-type]
    wrappers = types.SimpleNamespace(**{name: getattr(client, name) for name in overridden})
    with pytest.raises(TypeError, match="_out_packet"):
        check_paho(wrappers)  # type: ignore[arg-type]


class Wired:
    """A real paho client whose socket is one end of a socket pair (the test reads the other)."""

    def __init__(self, sndbuf: int | None = None) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        ours, self.peer = socket.socketpair()
        if sndbuf is not None:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        ours.setblocking(False)
        self.client._sock = ours
        self.client.on_socket_register_write = lambda *_: None  # queue; the test writes
        self.published: list[int] = []
        self.client.on_publish = lambda _c, _u, mid, *_: self.published.append(mid)

    def read_until(self, done: Callable[[bytes], bool]) -> bytes:
        data = b""
        self.peer.settimeout(5)
        while not done(data):
            self.client.loop_write()
            data += self.peer.recv(1 << 20)
        return data

    def close(self) -> None:
        self.client._sock_close()
        self.peer.close()


def test_paho_writes_a_queued_batch_as_plain_bytes_in_one_item() -> None:
    """A group's packets share one item of paho's out-queue, which loop_write sends as plain
    bytes (no on_publish for it) and then reports as written."""
    wired = Wired()
    try:
        queue = PacketQueue()
        packets = [encode_qos0(f"t/{i}", b"{}", retain=False, protocol="5") for i in range(50)]
        for i, packet in enumerate(packets):
            assert packet is not None
            queue.put(wired.client, packet[:-2], packet[-2:], f"e{i}")
        assert len(wired.client._out_packet) == 1  # the group is one item: one send()
        assert wired.client._out_packet[0]["command"] == RAW_COMMAND
        expected = b"".join(p for p in packets if p is not None)
        assert wired.read_until(lambda got: len(got) >= len(expected)) == expected
        assert list(queue.written()) == [f"e{i}" for i in range(50)]
        assert wired.published == []
    finally:
        wired.close()


def split_packets(stream: bytes) -> list[tuple[int, bytes]]:
    """(first byte, whole packet) for each MQTT packet in `stream`; fails on a torn one."""
    packets, pos = [], 0
    while pos < len(stream):
        end = packet_end(stream, pos)
        assert end is not None, "a packet cut short"
        packets.append((stream[pos], stream[pos:end]))
        pos = end
    return packets


def test_a_partial_write_keeps_packets_whole_and_in_order_with_pahos_own() -> None:
    """A batch the socket takes only in part is finished before paho's QoS 1 packet queued
    behind it, and packets queued after that go behind it: nothing interleaves."""
    wired = Wired(sndbuf=4096)
    try:
        queue = PacketQueue()
        first = [encode_qos0(f"a/{i}", b"p" * 3000, retain=False, protocol="5") for i in range(40)]
        for i, packet in enumerate(first):
            assert packet is not None
            queue.put(wired.client, packet[:-3000], packet[-3000:], f"a{i}")
        wired.client.loop_write()  # the socket buffer fills: EAGAIN, the rest stays queued
        assert wired.client.want_write()
        assert list(queue.written()) == []
        info = wired.client.publish("q/1", b"qos1", qos=1)
        last = encode_qos0("b/0", b"late", retain=False, protocol="5")
        assert last is not None
        queue.put(wired.client, last[:-4], last[-4:], "b0")  # behind the QoS 1 packet: a new item
        stream = wired.read_until(lambda got: got.endswith(last))
        kinds = [(first_byte & 0xF0, pkt) for first_byte, pkt in split_packets(stream)]
        assert [k for k, _ in kinds] == [0x30] * 40 + [0x30, 0x30]
        assert [pkt for _, pkt in kinds[:40]] == first
        assert kinds[40][1][0] == 0x32  # paho's QoS 1 PUBLISH, then ours
        assert b"q/1" in kinds[40][1]
        assert kinds[41][1] == last
        assert list(queue.written()) == [f"a{i}" for i in range(40)] + ["b0"]
        assert info.mid in wired.client._out_messages  # paho still awaits its PUBACK
    finally:
        wired.close()


# ---- on the wire --------------------------------------------------------------------------------
class PahoPublishes:
    """The topics that went through paho's `Client.publish` (the path the packets bypass)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.topics: list[str] = []
        real = mqtt.Client.publish

        def spy(client: mqtt.Client, topic: str, *args: Any, **kwargs: Any) -> Any:
            self.topics.append(topic)
            return real(client, topic, *args, **kwargs)

        monkeypatch.setattr(mqtt.Client, "publish", spy)


Manager = Callable[..., MQTTConnectionManager]


@pytest.fixture
def manager() -> Iterator[Manager]:
    made: list[MQTTConnectionManager] = []

    def make(port: int, **settings: Any) -> MQTTConnectionManager:
        base: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port,
            "backoff_min": 0.2,
            "backoff_max": 0.5,
            "client_id": f"pk-{uuid.uuid4().hex[:8]}",
        }
        m = MQTTConnectionManager(BrokerSettings(**{**base, **settings}))
        made.append(m)
        return m

    yield make
    for m in made:
        m.disconnect(3)


def configs(*entries: PublishConfig) -> dict[str, PublishConfig]:
    return {e.id: e for e in entries}


def main_session(m: MQTTConnectionManager) -> Session:
    session = m.event_loop.get(MAIN_LINK)  # the loop's session: the only view of paho's queues
    assert isinstance(session, Session)
    return session


def published(m: MQTTConnectionManager, entry_id: str) -> int:
    return m.stats.entry(entry_id).published


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_static_qos0_entries_arrive_as_configured_without_paho_publish(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    manager: Manager,
    monkeypatch: pytest.MonkeyPatch,
    protocol: MQTTVersion,
) -> None:
    """Topic, payload, QoS 0 and the retain flag reach subscribers as paho would send them,
    none of them through paho's publish, and each write is counted as published."""
    spy = PahoPublishes(monkeypatch)
    plain = PublishConfig(id="plain", topic=f"{topic_base}/plain", data={"v": 1.5}, interval=60)
    kept = PublishConfig(
        id="kept", topic=f"{topic_base}/k\u00e9pt", data={"s": "\u00fc"}, interval=60, retain=True
    )
    sub = subscriber_factory(f"{topic_base}/#", qos=1)
    m = manager(broker.port, protocol=protocol)
    m.set_entries(configs(plain, kept))
    assert m.connect(wait=10)
    for e in (plain, kept):
        got = sub.wait_for(e.topic)[0]
        assert (got.payload, got.qos, got.retain) == (e.payload, 0, False)  # live: retain off
    wait_until(
        lambda: published(m, "plain") == 1 and published(m, "kept") == 1,
        10,
        message="both writes counted",
    )
    late = Subscriber(broker.port, [f"{topic_base}/#"], 1).start()  # gets the retained one
    try:
        got = late.wait_for(kept.topic)[0]
        assert (got.payload, got.qos, got.retain) == (kept.payload, 0, True)
        assert late.on(plain.topic) == []
    finally:
        late.stop()
    assert not {plain.topic, kept.topic} & set(spy.topics)


def test_a_whole_phase_group_with_a_qos1_entry_among_it_all_arrives(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    manager: Manager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A phase group of static QoS 0 entries and one QoS 1 entry, ticked together several
    times: every message arrives, the QoS 0 writes are counted, and paho tracks the QoS 1
    publishes to their PUBACK (counted on acknowledgement, nothing left in flight)."""
    spy = PahoPublishes(monkeypatch)
    ids = group_ids(200, 0.5)
    entries = [
        PublishConfig(id=i, topic=f"{topic_base}/{i}", data={"i": i}, interval=0.5) for i in ids
    ]
    sure = PublishConfig(id="sure", topic=f"{topic_base}/sure", data={"q": 1}, interval=0.5, qos=1)
    sub = subscriber_factory(f"{topic_base}/#", qos=1)
    m = manager(broker.port)
    m.set_entries(configs(*entries, sure))
    assert m.connect(wait=10)
    wait_until(
        lambda: all(published(m, e.id) == 1 for e in entries), 10, message="the birth burst written"
    )
    wait_until(lambda: published(m, "sure") == 1, 10, message="the birth QoS 1 acknowledged")
    session = main_session(m)
    # Ticks within half the interval of a connect are skipped (docs/design.md, "Publish on
    # connect, then the grid"): start once past that.
    wait_until(lambda: time.monotonic() - session.connected_at > 0.3, 5, message="past it")
    rounds = 3
    for _ in range(rounds):
        for i, e in enumerate(entries):
            m.publish_entry(e.id)
            if i == len(entries) // 2:
                m.publish_entry("sure")  # the QoS 1 packet lands mid-group
    for e in entries:
        sub.wait_for(e.topic, count=1 + rounds)
    sub.wait_for(sure.topic, count=1 + rounds)
    wait_until(
        lambda: all(published(m, e.id) == 1 + rounds for e in entries),
        10,
        message="every QoS 0 write counted",
    )
    wait_until(
        lambda: published(m, "sure") == 1 + rounds,
        10,
        message="every QoS 1 publish acknowledged and counted",
    )
    wait_until(
        lambda: not session.inflight and not session.pending,
        10,
        message="nothing left in paho or in the packet queue",
    )
    assert spy.topics.count(sure.topic) == 1 + rounds  # QoS 1 went through paho
    assert not {e.topic for e in entries} & set(spy.topics)
    assert m.stats.entry("sure").errors == 0


class PahoLog(logging.Handler):
    """The times paho logged sending a PINGREQ and receiving a PINGRESP."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.pingreq: list[float] = []
        self.pingresp: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Sending PINGREQ"):
            self.pingreq.append(time.monotonic())
        elif message.startswith("Received PINGRESP"):
            self.pingresp.append(time.monotonic())


@pytest.fixture
def paho_log() -> Iterator[PahoLog]:
    logger = logging.getLogger("paho.mqtt.client")
    handler, level = PahoLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_keepalive_pings_go_out_while_only_packets_are_written(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    manager: Manager,
    paho_log: PahoLog,
) -> None:
    """With keepalive 2 and nothing but pre-encoded QoS 0 traffic, paho still sends a PINGREQ
    about every keepalive and gets its PINGRESP, so neither the broker nor the service's
    silence check (1.5x keepalive without a byte from the broker) drops the connection over
    more than three keepalive periods."""
    e = PublishConfig(id="ka", topic=f"{topic_base}/ka", data={"k": 1}, interval=0.2)
    sub = subscriber_factory(e.topic, qos=0)
    m = manager(broker.port, keepalive=2)
    m.set_entries(configs(e))
    assert m.connect(wait=10)
    session = main_session(m)
    connected_at = session.connected_at
    start = time.monotonic()
    stop = threading.Event()
    while time.monotonic() - start < 7.5:  # the entry's own ticks, as the scheduler would
        m.publish_entry(e.id)
        stop.wait(0.2)
    sub.wait_for(e.topic, count=20)
    assert m.stats.reconnects == 0
    assert session.is_up
    assert session.connected_at == connected_at
    assert m.event_loop.get(MAIN_LINK) is session
    pings = [t for t in paho_log.pingreq if t >= start]
    assert len(pings) >= 2, paho_log.pingreq
    assert len(paho_log.pingresp) >= len(paho_log.pingreq) - 1
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # paho pings once `keepalive` has passed since it last heard from the broker, checked
    # once a second (netloop.MISC_PERIOD): every 2 to 3 s, with slack for a busy machine.
    assert all(1.5 <= gap <= 4.5 for gap in gaps), gaps


def test_a_broker_that_stops_reading_gets_no_unbounded_queue_and_ticks_count_as_dropped(
    broker: Mosquitto,
    proxy: NetProxy,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    manager: Manager,
) -> None:
    """While the path is dark, at most MAX_PENDING_PER_ENTRY packets per entry wait unwritten;
    further ticks are counted as dropped. After the path heals the entries publish again."""
    entries = [
        PublishConfig(
            id=f"d{i}", topic=f"{topic_base}/d{i}", data={"blob": "z" * 60_000}, interval=0.1
        )
        for i in range(20)
    ]
    sub = subscriber_factory(f"{topic_base}/#", qos=0)
    m = manager(proxy.port, keepalive=60)
    m.set_entries(configs(*entries))
    assert m.connect(wait=10)
    wait_until(
        lambda: all(published(m, e.id) >= 1 for e in entries), 10, message="the birth burst written"
    )
    session = main_session(m)
    proxy.blackhole()
    stop = threading.Event()

    def dropped() -> int:
        return sum(m.stats.entry(e.id).dropped for e in entries)

    deadline = time.monotonic() + 60
    while dropped() < 100 and time.monotonic() < deadline:
        for e in entries:
            m.publish_entry(e.id)
        stop.wait(0.02)
    assert dropped() >= 100
    wait_until(
        lambda: all(session.pending.get(e.id, 0) == MAX_PENDING_PER_ENTRY for e in entries),
        10,
        message="every entry held at its limit",
    )
    queued = sum(len(b.item["packet"]) - b.item["pos"] for b in session.packets.batches)
    packet_size = len(static_header(entries[0], "5") or b"") + len(entries[0].payload)
    assert queued <= len(entries) * MAX_PENDING_PER_ENTRY * packet_size
    proxy.resume()
    healed = time.monotonic()
    wait_until(lambda: not session.pending, 30, message="the queue written once the path heals")
    m.publish_entry("d0")
    sub.wait_for(f"{topic_base}/d0", where=lambda msg: msg.at > healed, timeout=20)


def test_every_tick_is_counted_once_as_published_or_dropped_when_the_link_dies_full(
    broker: Mosquitto, proxy: NetProxy, topic_base: str, manager: Manager
) -> None:
    """Packets still queued when a stalled connection dies count as dropped: for each entry,
    published + dropped is exactly the number of times it was handed to the connection."""
    entries = [
        PublishConfig(
            id=f"c{i}", topic=f"{topic_base}/c{i}", data={"blob": "c" * 60_000}, interval=0.1
        )
        for i in range(10)
    ]
    m = manager(proxy.port, keepalive=60)
    m.set_entries(configs(*entries))
    assert m.connect(wait=10)
    wait_until(
        lambda: all(published(m, e.id) == 1 for e in entries), 10, message="the birth burst written"
    )
    session = main_session(m)
    # Ticks within half the interval of a connect are skipped (docs/design.md): start later.
    wait_until(lambda: time.monotonic() - session.connected_at > 0.1, 5, message="past it")
    proxy.blackhole()
    ticks, stop = 0, threading.Event()
    deadline = time.monotonic() + 60
    while not all(m.stats.entry(e.id).dropped for e in entries) and time.monotonic() < deadline:
        for e in entries:
            m.publish_entry(e.id)
        ticks += 1
        stop.wait(0.02)
    wait_until(
        lambda: (
            session.packets.batches
            and all(session.pending.get(e.id, 0) == MAX_PENDING_PER_ENTRY for e in entries)
        ),
        10,
        message="packets held unwritten",
    )
    proxy.sever()
    wait_until(lambda: not m.is_connected(), 10, message="the loss noticed")
    assert not session.pending
    assert not session.packets.batches
    for e in entries:
        counters = m.stats.entry(e.id)
        assert counters.published + counters.dropped == 1 + ticks, (e.id, counters)


def test_packets_flow_again_after_a_broker_restart(
    broker: Mosquitto, topic_base: str, subscriber_factory: SubscriberFactory, manager: Manager
) -> None:
    """After the broker restarts, the new connections (shared and an lwt entry's own) carry
    the entries' packets again: the birth burst and later ticks, counted as published."""
    e = PublishConfig(id="r", topic=f"{topic_base}/r", data={"r": 1}, interval=0.2)
    lwt = PublishConfig(id="own", topic=f"{topic_base}/own", data={"o": 1}, interval=0.2, lwt=True)
    m = manager(broker.port)
    m.set_entries(configs(e, lwt))
    assert m.connect(wait=10)
    wait_until(
        lambda: published(m, "r") == 1 and published(m, "own") == 1,
        10,
        message="the first connection's birth publishes",
    )
    broker.restart()
    wait_until(lambda: m.stats.reconnects >= 1, 15, message="the loss noticed")
    sub = subscriber_factory(f"{topic_base}/#", qos=0)
    wait_until(
        lambda: published(m, "r") >= 2 and published(m, "own") >= 2,
        20,
        message="the birth publishes of the new connections",
    )
    links = [m.event_loop.get(MAIN_LINK), m.event_loop.get(LinkKey("own"))]
    wait_until(
        lambda: all(lk is not None and time.monotonic() - lk.connected_at > 0.15 for lk in links),
        5,
        message="past half the interval (see above)",
    )
    for entry_id in ("r", "own"):
        m.publish_entry(entry_id)
    sub.wait_for(e.topic, count=1)
    sub.wait_for(lwt.topic, count=1)
    wait_until(
        lambda: published(m, "r") >= 3 and published(m, "own") >= 3, 10, message="the ticks counted"
    )


def test_the_service_writes_each_phase_group_in_one_piece(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    services: InProcessServices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real service: each scheduler wake-up's group of static QoS 0 entries (here under
    FLUSH_BYTES) reaches the connection as one item of paho's queue, written whole (one
    send()), and every message arrives."""
    ids = group_ids(40, 1.0)
    items: list[list[str]] = []  # the entries of each written item
    real = PacketQueue.written

    def spy(queue: PacketQueue) -> Iterator[str]:
        items.extend(list(b.entry_ids) for b in queue.batches if b.item["to_process"] == 0)
        return real(queue)

    monkeypatch.setattr(PacketQueue, "written", spy)
    sub = subscriber_factory(f"{topic_base}/#", qos=0)
    services.start(broker.port, [entry(i, f"{topic_base}/{i}", 1) for i in ids])
    for i in ids:
        sub.wait_for(f"{topic_base}/{i}", count=4, timeout=20)  # the birth, then 3 slots
    # The scheduler runs on the network thread, so a group is queued and written in one turn
    # of its loop: from the first whole group on, no item holds less than a whole group.
    whole = [k for k, group in enumerate(items) if sorted(group) == sorted(ids)]
    assert len(whole) >= 3, [len(group) for group in items]
    assert all(sorted(group) == sorted(ids) for group in items[whole[0] :]), [
        len(group) for group in items
    ]


def test_a_large_phase_group_leaves_in_sends_of_about_flush_bytes(
    broker: Mosquitto,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
    services: InProcessServices,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A group bigger than FLUSH_BYTES is not held back until its last tick has run: once the
    queued packets reach FLUSH_BYTES they are written, while the rest of the group queues
    behind them. Every message still arrives."""
    count = 200  # ~70 B a packet: about 14 KB a group, so at least 3 sends
    written: list[tuple[int, int]] = []  # (bytes, packets queued in the turn so far) per item
    queued = [0]
    real_written, real_put = PacketQueue.written, PacketQueue.put

    def put(queue: PacketQueue, *args: Any) -> None:
        queued[0] += 1
        real_put(queue, *args)

    def spy(queue: PacketQueue) -> Iterator[str]:
        written.extend(
            (len(b.item["packet"]), queued[0]) for b in queue.batches if b.item["to_process"] == 0
        )
        return real_written(queue)

    monkeypatch.setattr(PacketQueue, "put", put)
    monkeypatch.setattr(PacketQueue, "written", spy)
    sub = subscriber_factory(f"{topic_base}/#", qos=0)
    ids = [f"big-{n}" for n in range(count)]
    services.start(broker.port, [entry(i, f"{topic_base}/{i}", 1) for i in ids], phase_slots=1)
    for i in ids:
        sub.wait_for(f"{topic_base}/{i}", count=3, timeout=20)  # the birth, then 2 slots
    largest_packet = 200
    assert all(size < FLUSH_BYTES + largest_packet for size, _ in written), written
    full = [(size, at) for size, at in written if size >= FLUSH_BYTES]
    assert len(full) >= 3, written
    # Written part-way through a group's turn: fewer than the whole group queued by then.
    assert any(at % count != 0 for _, at in full), written
