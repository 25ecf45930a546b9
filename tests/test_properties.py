"""MQTT 5 properties per entry, end to end against a real Mosquitto: on every publish, on the
will, on reload, retained messages that expire, and MQTT 3.1.1 (ignored, with a warning)."""

from __future__ import annotations

import json
import queue
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from structlog.testing import capture_logs

from scheduler_publisher.config.loader import parse_config
from scheduler_publisher.mqtt.client import publish_properties
from tests.support import (
    InProcessServices,
    Mosquitto,
    Received,
    ServiceProcess,
    Subscriber,
    SubscriberFactory,
    barrier,
    cli_args,
    entry,
    offline,
    online,
    wait_until,
    write_config,
)

PROPERTIES = {
    "message_expiry": 600,
    "content_type": "application/json",
    "user_properties": {"site": "gw01", "b": "2", "a": "1"},
    "payload_format_utf8": True,
}
# How paho's Properties.json() shows them: the expiry aside (it arrives as what remains).
ON_THE_WIRE = {
    "ContentType": "application/json",
    "PayloadFormatIndicator": 1,
    "UserProperty": [("site", "gw01"), ("b", "2"), ("a", "1")],
}


def shown(message: Received) -> dict[str, Any]:
    """The message's properties but the expiry, which the broker counts down."""
    return {k: v for k, v in message.properties.items() if k != "MessageExpiryInterval"}


def expiry(message: Received) -> int | None:
    value = message.properties.get("MessageExpiryInterval")
    return int(value) if value is not None else None


def connect_count(broker: Mosquitto, client_id: str) -> int:
    """How often the broker accepted a connection with this client id (its notice log)."""
    text = broker.log.read_text(errors="replace") if broker.log.exists() else ""
    return text.count(f" as {client_id} (")


def retained_on(broker: Mosquitto, topic: str) -> list[Received]:
    """What a subscriber that connects now gets as retained on `topic`. A marker published
    after its subscription arrives after anything the broker had retained for it."""
    marker_topic = f"{topic}-marker-{uuid.uuid4().hex[:6]}"
    sub = Subscriber(broker.port, [topic, marker_topic], qos=1).start()
    try:
        barrier(broker.port, sub, marker_topic)
        return [m for m in sub.on(topic) if m.retain]
    finally:
        sub.stop()


class Newcomer:
    """A client connected ahead of time that subscribes only when asked: it receives what a
    new subscriber receives, one round trip after the asking."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda *_: connected.set()
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(10), "the newcomer could not connect"

    def first_message(self, topic: str) -> mqtt.MQTTMessage:
        self.client.subscribe(topic, qos=1)
        return self.messages.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- the packet ------------------------------------------------------------------------------


def test_publish_properties_pack_as_paho_packs_them_and_only_once() -> None:
    """An entry's PUBLISH properties are the bytes paho itself would pack, in the file's order
    of user properties, and packing them again returns the same bytes object."""
    (config,) = parse_config(json.dumps([entry("a", "t", properties=PROPERTIES)]).encode()).entries
    assert config.properties is not None
    built = publish_properties(config.properties)
    reference = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    reference.MessageExpiryInterval = 600
    reference.ContentType = "application/json"
    reference.UserProperty = ("site", "gw01")
    reference.UserProperty = ("b", "2")
    reference.UserProperty = ("a", "1")
    reference.PayloadFormatIndicator = 1
    assert built.pack() == reference.pack()  # type: ignore[no-untyped-call]
    assert built.pack() is built.pack()  # type: ignore[no-untyped-call]


# ---- every publish --------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt5_subscriber_sees_the_properties_on_every_publish(
    broker: Mosquitto,
    services: InProcessServices,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
    qos: int,
) -> None:
    """Each publish of an entry carries its expiry (as what remains of it), content type,
    user properties in the file's order and payload format indicator; an entry without
    properties on the same connection carries none."""
    sub = subscriber_factory(f"{topic_base}/#")
    services.start(
        broker.port,
        [
            entry("with", f"{topic_base}/with", 0.2, qos=qos, properties=PROPERTIES),
            entry("without", f"{topic_base}/without", 0.2, qos=qos),
        ],
    )
    published = sub.wait_for(f"{topic_base}/with", count=3)
    for message in published:
        assert shown(message) == ON_THE_WIRE
        remaining = expiry(message)
        assert remaining is not None
        assert 0 < remaining <= 600
        assert message.qos == qos
    plain = sub.wait_for(f"{topic_base}/without", count=3)
    assert [m.properties for m in plain] == [{}, {}, {}]


def test_a_templated_entry_carries_its_properties_and_fresh_values(
    broker: Mosquitto,
    services: InProcessServices,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
) -> None:
    """An entry that is both templated and has properties publishes freshly rendered payloads
    ({{seq}} counting up) with its properties on each of them."""
    topic = f"{topic_base}/both"
    sub = subscriber_factory(topic)
    services.start(
        broker.port,
        [entry("both", topic, 0.2, template=True, properties=PROPERTIES, data={"seq": "{{seq}}"})],
    )
    published = sub.wait_for(topic, count=3)
    assert [m.json()["seq"] for m in published] == [1, 2, 3]
    assert all(shown(m) == ON_THE_WIRE for m in published)


# ---- retained messages expire ---------------------------------------------------------------


def test_retained_status_with_message_expiry_expires_at_the_broker(
    broker: Mosquitto,
    services: InProcessServices,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
) -> None:
    """A retained entry with message_expiry: a subscriber that comes before the expiry gets
    the retained value; once the gateway is gone and the expiry has passed, a new subscriber
    gets nothing retained, while a retained entry without expiry is still there."""
    expiring, lasting = f"{topic_base}/status", f"{topic_base}/lasting"
    watcher = subscriber_factory(f"{topic_base}/#")
    service = services.start(
        broker.port,
        [
            entry("status", expiring, 3600, retain=True, properties={"message_expiry": 2}),
            entry("lasting", lasting, 3600, retain=True, properties={"content_type": "x/y"}),
        ],
    )
    newcomer = Newcomer(broker.port)  # connected now, so that it subscribes at once below
    try:
        watcher.wait_for(expiring)
        early = newcomer.first_message(expiring)
    finally:
        newcomer.close()
    assert early.retain
    assert json.loads(early.payload) == {"online": 1, "sensor": "status"}
    assert early.properties is not None
    assert early.properties.json()["MessageExpiryInterval"] <= 2  # type: ignore[no-untyped-call]

    service.stop()  # the gateway vanishes: nothing refreshes the retained values

    wait_until(
        lambda: not retained_on(broker, expiring),
        timeout=20,
        interval=0.2,
        message="the retained message to expire",
    )
    (kept,) = retained_on(broker, lasting)
    assert kept.properties == {"ContentType": "x/y"}


# ---- the will -------------------------------------------------------------------------------


def test_sigkill_will_of_an_lwt_entry_carries_its_properties(
    broker: Mosquitto, tmp_path: Path, subscriber_factory: SubscriberFactory, topic_base: str
) -> None:
    """Killed hard, the broker publishes the lwt entry's will with the entry's properties as
    will properties."""
    sub = subscriber_factory(f"{topic_base}/#")
    config = tmp_path / "config.json"
    write_config(config, [entry("a", f"{topic_base}/a", 1, qos=1, lwt=True, properties=PROPERTIES)])
    run = ServiceProcess(cli_args(broker.port, config, backoff=(0.2, 1)), cwd=tmp_path)
    try:
        sub.wait_for(f"{topic_base}/a", where=online, timeout=20)
        run.signal(signal.SIGKILL)
        run.wait(10)
        (will,) = sub.wait_for(f"{topic_base}/a", where=offline, timeout=10)
    finally:
        run.stop()
    assert will.json() == {"online": 0, "sensor": "a"}
    assert shown(will) == ON_THE_WIRE
    remaining = expiry(will)
    assert remaining is not None
    assert 0 < remaining <= 600


@pytest.mark.parametrize("will_delay", [0, 5], ids=["broker-sends-will", "service-announces"])
def test_graceful_stop_announces_an_lwt_entry_offline_with_its_properties(
    broker: Mosquitto,
    services: InProcessServices,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
    will_delay: int,
) -> None:
    """On a clean stop the offline message carries the properties, whether the broker sends
    the will (DISCONNECT 0x04) or the service announces it itself (a will delay)."""
    sub = subscriber_factory(f"{topic_base}/#")
    service = services.start(
        broker.port,
        [entry("a", f"{topic_base}/a", 1, qos=1, lwt=True, properties=PROPERTIES)],
        broker={"will_delay": will_delay},
    )
    sub.wait_for(f"{topic_base}/a", where=online, timeout=20)
    service.stop()
    (gone,) = sub.wait_for(f"{topic_base}/a", where=offline, timeout=10)
    assert shown(gone) == ON_THE_WIRE


# ---- reload ---------------------------------------------------------------------------------


def test_editing_properties_renews_only_that_lwt_entrys_connection_and_will(
    broker: Mosquitto,
    services: InProcessServices,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
    tmp_path: Path,
) -> None:
    """A properties edit publishes the new properties at once, and renews the will of that
    lwt entry alone: its connection reconnects, the other lwt entry's does not."""
    sub = subscriber_factory(f"{topic_base}/#")
    config = tmp_path / "edited.json"
    first = [
        entry("a", f"{topic_base}/a", 3600, lwt=True, properties=PROPERTIES),
        entry("b", f"{topic_base}/b", 3600, lwt=True, properties=PROPERTIES),
    ]
    service = services.start(broker.port, first, config=config)
    for key in ("a", "b"):
        sub.wait_for(f"{topic_base}/{key}", where=online, timeout=20)
    edited = {**PROPERTIES, "user_properties": {"site": "gw02"}}

    write_config(config, [{**first[0], "properties": edited}, first[1]])
    service.reload_config()

    (fresh,) = sub.wait_for(
        f"{topic_base}/a",
        timeout=10,
        where=lambda m: m.properties.get("UserProperty") == [("site", "gw02")],
    )
    assert online(fresh)
    client_id = service.settings.broker.client_id
    assert connect_count(broker, service.settings.broker.entry_client_id("a")) == 2
    assert connect_count(broker, service.settings.broker.entry_client_id("b")) == 1
    assert connect_count(broker, client_id) == 1
    service.stop()
    (will,) = sub.wait_for(f"{topic_base}/a", where=offline, timeout=10)
    assert will.properties["UserProperty"] == [("site", "gw02")]
    (other,) = sub.wait_for(f"{topic_base}/b", where=offline, timeout=10)
    assert shown(other) == ON_THE_WIRE


# ---- MQTT 3.1.1 -----------------------------------------------------------------------------


def test_mqtt311_ignores_properties_with_one_warning_per_entry_and_still_publishes(
    broker: Mosquitto,
    services: InProcessServices,
    subscriber_factory: SubscriberFactory,
    topic_base: str,
    tmp_path: Path,
) -> None:
    """On MQTT 3.1.1 each entry with properties gets one warning at load time (again only
    when its properties change), and every entry publishes, without properties."""
    sub = subscriber_factory(f"{topic_base}/#")
    config = tmp_path / "v311.json"
    entries = [
        entry("p", f"{topic_base}/p", 0.2, properties=PROPERTIES),
        entry("q", f"{topic_base}/q", 0.2, lwt=True, properties={"message_expiry": 5}),
        entry("plain", f"{topic_base}/plain", 0.2),
    ]
    with capture_logs() as logs:
        service = services.start(broker.port, entries, config=config, broker={"protocol": "3.1.1"})
        for key in ("p", "q", "plain"):
            published = sub.wait_for(f"{topic_base}/{key}", count=2, timeout=20)
            assert [m.properties for m in published[:2]] == [{}, {}]
        # A data edit is not a properties change: no second warning for "p".
        write_config(config, [{**entries[0], "data": {"v": 2}}, entries[1], entries[2]])
        service.reload_config()
        sub.wait_for(f"{topic_base}/p", where=lambda m: m.json().get("v") == 2)
        write_config(
            config,
            [
                {**entries[0], "data": {"v": 2}},
                {**entries[1], "properties": {"message_expiry": 6}},
                entries[2],
            ],
        )
        service.reload_config()
        wait_until(
            lambda: sum(e["event"] == "entry_properties_ignored" for e in logs) == 3,
            10,
            message="the warning for q's new properties",
        )
    warned = [e for e in logs if e["event"] == "entry_properties_ignored"]
    assert [(e["log_level"], e["entry_id"]) for e in warned] == [
        ("warning", "p"),
        ("warning", "q"),
        ("warning", "q"),
    ]
    assert warned[0]["ignored"] == [
        "message_expiry",
        "content_type",
        "user_properties",
        "payload_format_utf8",
    ]
    assert warned[0]["mqtt_version"] == "3.1.1"
