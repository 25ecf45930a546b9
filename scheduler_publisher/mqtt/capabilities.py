"""What the broker can do, as far as the service has learnt it, and which entries need more.

An MQTT 5 broker says it in its CONNACK (Maximum QoS, Retain Available; MQTT 5 3.2.2.3), and
a client must then stay within it [MQTT-3.2.2-11, -14]: Mosquitto with `max_qos 1` drops the
connection at a QoS 2 PUBLISH, and refuses a CONNECT whose will asks for more (reasons 0x9B,
0x9A). An MQTT 3.1.1 broker says nothing; RabbitMQ answers a QoS 2 PUBLISH with a PUBACK, which
shows it handled it as QoS 1. The network loop keeps one `BrokerLimits` (one broker at a time)
and publishes within it; the connection manager warns with the entries affected
(`broker_feature_missing`, docs/brokers.md). Pure: no paho, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from scheduler_publisher.config.entry import PublishConfig
    from scheduler_publisher.mqtt.session import Will

Limit = Literal["qos2", "qos1", "retain"]  # what a broker may say it lacks
Feature = Limit | Literal["will_delay"]  # and what MQTT 3.1.1 lacks
# CONNACK reasons that name a feature the CONNECT's will asked for (MQTT 5 3.2.2.2)
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    """The highest QoS the broker takes and whether it keeps retained messages; `how` says how
    the service learnt each limit, for the warning."""

    max_qos: int = 2
    retain: bool = True
    how: tuple[tuple[Limit, str], ...] = ()

    def qos(self, wanted: int) -> int:
        return wanted if wanted <= self.max_qos else self.max_qos

    def fit(self, will: Will) -> Will:
        """The will as this broker takes it: at most its QoS, retained only if it can."""
        qos, retain = self.qos(will.qos), will.retain and self.retain
        if (qos, retain) == (will.qos, will.retain):
            return will
        return replace(will, qos=qos, retain=retain)

    def learnt(self, feature: Limit, how: str) -> BrokerLimits:
        """These limits and the broker's lack of `feature` (qos2: QoS 1 at most; qos1: QoS 0)."""
        if feature == "retain":
            if not self.retain:
                return self
            return replace(self, retain=False, how=(*self.how, (feature, how)))
        ceiling = 1 if feature == "qos2" else 0
        if self.max_qos <= ceiling:
            return self
        return replace(self, max_qos=ceiling, how=(*self.how, (feature, how)))

    def missing(self) -> tuple[Limit, ...]:
        found: list[Limit] = []
        if self.max_qos < 2:
            found.append("qos2")
        if self.max_qos < 1:
            found.append("qos1")
        if not self.retain:
            found.append("retain")
        return tuple(found)

    def said(self, feature: Limit) -> str:
        return next((how for f, how in self.how if f == feature), "")


UNLIMITED = BrokerLimits()


def from_connack(limits: BrokerLimits, properties: Any) -> BrokerLimits:
    """`limits` and what an MQTT 5 CONNACK's properties say (paho's `Properties`, or None)."""
    max_qos = getattr(properties, "MaximumQoS", None)
    if max_qos == 0:
        limits = limits.learnt("qos1", "CONNACK Maximum QoS 0")
    if max_qos in (0, 1):
        limits = limits.learnt("qos2", f"CONNACK Maximum QoS {max_qos}")
    if getattr(properties, "RetainAvailable", None) == 0:
        limits = limits.learnt("retain", "CONNACK Retain Available 0")
    return limits


def from_refusal(limits: BrokerLimits, reason: int, will: Will | None) -> BrokerLimits:
    """`limits` and what a CONNACK refused for the will's QoS or retain flag tells."""
    if reason == RETAIN_NOT_SUPPORTED:
        return limits.learnt("retain", "CONNECT refused: retain not supported")
    if reason == QOS_NOT_SUPPORTED and will is not None and will.qos > 0:
        feature: Limit = "qos2" if limits.qos(will.qos) == 2 else "qos1"
        return limits.learnt(feature, "CONNECT refused: QoS not supported")
    return limits


def needs(entry: PublishConfig, feature: Feature) -> bool:
    """Whether the entry's publishes (or its will) use `feature`."""
    if feature == "will_delay":
        return entry.lwt
    if feature == "retain":
        return entry.retain
    return entry.qos >= (2 if feature == "qos2" else 1)


def affected(entries: Iterable[PublishConfig], feature: Feature) -> list[str]:
    return sorted(e.id for e in entries if needs(e, feature))


DOES: dict[Feature, str] = {
    "qos2": "QoS 2 entries publish (and their wills go) at QoS 1",
    "qos1": "QoS 1 and 2 entries publish (and their wills go) at QoS 0",
    "retain": "retained entries, wills and the status topic publish without the retain flag: "
    "a new subscriber gets nothing until the next publish",
    "will_delay": "wills go out as soon as a connection is lost, without --will-delay",
}
