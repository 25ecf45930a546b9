"""Topic validation against the broker it protects: what validation refuses, a real Mosquitto
refuses too (it drops the connection, or discards the publish), and what it lets through is
delivered."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from scheduler_publisher.config.loader import parse_config
from tests.support import (
    InProcessServices,
    Mosquitto,
    SubscriberFactory,
    entry,
    write_config,
)

REFUSED_BY_THE_BROKER = [
    "a\x07b",
    "a\nb",
    "a\x7fb",
    "a\x85b",
    "a\ufffeb",
    "a\uffffb",
    "a\ufdd0b",
    "a\U0001fffeb",
    "/".join("l" * 202),
]
ACCEPTED = ["/".join("l" * 200), "a\u200bb", "a\ue000b"]


def _validation_errors(topic: str) -> list[str]:
    raw = json.dumps([{"id": "a", "topic": topic, "data": {}, "interval": 1}]).encode()
    return [str(p) for p in parse_config(raw).errors]


class _Publisher:
    """A bare paho client: the broker's verdict on one publish, as a disconnect reason."""

    def __init__(self, port: int) -> None:
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.reason = ""
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"tw-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = lambda *_: self.connected.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = str(reason)
        self.dropped.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("topic", REFUSED_BY_THE_BROKER, ids=ascii)
def test_topics_validation_refuses_make_mosquitto_drop_the_connection(
    broker: Mosquitto, topic: str
) -> None:
    """Each kind of topic validation refuses (control character, noncharacter, too many levels)
    really gets a publisher's connection dropped by Mosquitto."""
    assert _validation_errors(topic), f"validation let {topic!r} through"
    publisher = _Publisher(broker.port)
    try:
        publisher.client.publish(topic, b"x", qos=1)
        assert publisher.dropped.wait(10), "the broker kept the connection"
        assert publisher.reason in {"Malformed packet", "Protocol error"}
    finally:
        publisher.close()


@pytest.mark.parametrize("topic", ACCEPTED, ids=ascii)
def test_topics_validation_accepts_are_delivered(
    broker: Mosquitto, subscriber_factory: SubscriberFactory, topic: str
) -> None:
    """The limits are not stricter than needed: 200 levels, format and private-use characters
    pass validation and reach a subscriber."""
    assert _validation_errors(topic) == []
    sub = subscriber_factory("#")
    publisher = _Publisher(broker.port)
    try:
        publisher.client.publish(topic, b"x", qos=1)
        sub.wait_for(topic)
        assert not publisher.dropped.is_set()
    finally:
        publisher.close()


def test_an_entry_with_a_refused_topic_is_rejected_and_the_others_keep_their_connection(
    broker: Mosquitto,
    subscriber_factory: SubscriberFactory,
    services: InProcessServices,
    tmp_path: Path,
    topic_base: str,
) -> None:
    """A file with a control character in one entry's topic: that entry is reported by
    position, field and what was received, and the good entry publishes on a connection that
    is never dropped."""
    config = tmp_path / "conf.json"
    good = entry("good", f"{topic_base}/good", 0.2)
    write_config(config, [good, entry("bell", f"{topic_base}/a\x07b", 0.2)])
    sub = subscriber_factory(f"{topic_base}/#")
    service = services.create(broker.port, config=config)
    with structlog.testing.capture_logs() as logs:
        service.start()
        try:
            sub.wait_for(good["topic"], count=10, timeout=15)
            assert service.stats.reconnects == 0
        finally:
            service.stop()
    (invalid,) = [e for e in logs if e["event"] == "config_entry_invalid"]
    where = (invalid["entry_position"], invalid["entry_id"], invalid["field"])
    assert where == (2, "bell", "topic")
    assert "U+0007 (a control character) at character" in invalid["error"]
    assert not [e for e in logs if e["event"] == "mqtt_disconnected"]
