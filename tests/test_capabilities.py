"""What the broker lacks, as the network loop learns it (mqtt/capabilities.py): pure rules.
The wire-level behaviour against real brokers is in tests/test_brokers.py."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from scheduler_publisher.mqtt.capabilities import (
    QOS_NOT_SUPPORTED,
    RETAIN_NOT_SUPPORTED,
    UNLIMITED,
    from_connack,
    from_refusal,
)
from scheduler_publisher.mqtt.session import Will


def connack(**values: int) -> Properties:
    props = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_a_connack_without_limits_changes_nothing() -> None:
    """No Maximum QoS or Retain Available (Mosquitto's default), or MQTT 3.1.1: no limits."""
    assert from_connack(UNLIMITED, connack(ReceiveMaximum=20)) is UNLIMITED
    assert from_connack(UNLIMITED, None) is UNLIMITED
    assert from_connack(UNLIMITED, connack(RetainAvailable=1)) is UNLIMITED


def test_maximum_qos_caps_publishes_and_wills() -> None:
    """Maximum QoS 1 caps QoS 2 at 1; Maximum QoS 0 caps everything at 0."""
    one = from_connack(UNLIMITED, connack(MaximumQoS=1))
    assert (one.qos(2), one.qos(1), one.qos(0)) == (1, 1, 0)
    assert one.missing() == ("qos2",)
    will = Will("t", b"x", 2, False)
    assert one.fit(will) == Will("t", b"x", 1, False)
    zero = from_connack(UNLIMITED, connack(MaximumQoS=0))
    assert zero.qos(2) == 0
    assert zero.missing() == ("qos2", "qos1")


def test_retain_unavailable_clears_the_flag_and_says_how() -> None:
    limits = from_connack(UNLIMITED, connack(RetainAvailable=0))
    assert limits.fit(Will("t", b"x", 1, True)) == Will("t", b"x", 1, False)
    assert limits.missing() == ("retain",)
    assert limits.said("retain") == "CONNACK Retain Available 0"
    assert from_connack(limits, connack(RetainAvailable=0)) == limits  # learnt once


def test_a_refused_will_teaches_the_limit_it_broke() -> None:
    """0x9A: no retain. 0x9B: the will's QoS (as it went, fitted) is one too many."""
    retained = Will("t", b"x", 1, True)
    assert not from_refusal(UNLIMITED, RETAIN_NOT_SUPPORTED, retained).retain
    qos2 = Will("t", b"x", 2, False)
    assert from_refusal(UNLIMITED, QOS_NOT_SUPPORTED, qos2).max_qos == 1
    after = from_refusal(UNLIMITED, QOS_NOT_SUPPORTED, qos2)
    assert from_refusal(after, QOS_NOT_SUPPORTED, qos2).max_qos == 0  # refused at 1 too
    assert from_refusal(UNLIMITED, 0x87, retained) is UNLIMITED  # not authorized: no limit
    assert from_refusal(UNLIMITED, QOS_NOT_SUPPORTED, None) is UNLIMITED
