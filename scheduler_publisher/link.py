"""One MQTT connection: a paho client, its Last Will, its state and its reconnect backoff.

A Link is owned by the network thread (network.py). paho is only ever called from that thread,
except `reconnect()`, which a connector thread runs while the network thread leaves the link
alone (state CONNECTING): the blocking TCP connect and TLS handshake must not stall the loop.
"""

from __future__ import annotations

import enum
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from scheduler_publisher.settings import BrokerSettings

PAHO_LOGGER = logging.getLogger("paho.mqtt.client")


@dataclass(frozen=True, slots=True)
class Will:
    """What the broker publishes for a connection that dies."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class LinkKey:
    """Which connection: the shared main one, or the own one of the lwt entry `entry_id`.

    A type of its own rather than a string, so that no entry id can ever name the main
    connection: an entry called "main" is `LinkKey("main")`, never `MAIN_LINK` (issue 11 #9).
    """

    entry_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.entry_id is None

    def __str__(self) -> str:
        return "main" if self.entry_id is None else f"entry {self.entry_id!r}"


MAIN_LINK = LinkKey()


class LinkState(enum.Enum):
    WAITING = "waiting"  # backoff before the next attempt (or not started yet)
    CONNECTING = "connecting"  # a connector thread owns the client right now
    HANDSHAKE = "handshake"  # TCP is up, CONNECT sent, no CONNACK yet
    CONNECTED = "connected"
    CLOSING = "closing"  # DISCONNECT queued, waiting for the socket to close
    CLOSED = "closed"  # final; the link is forgotten


class Backoff:
    """Exponential backoff with jitter (half to full of the exponential step), so that a fleet
    of gateways, or a thousand links in one process, do not reconnect in lockstep."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay(self) -> float:
        step = min(self.maximum, self.minimum * (2 ** min(self.failures, 30)))
        self.failures += 1
        return self._rng.uniform(step / 2, step)

    def reset(self) -> None:
        self.failures = 0


# Callbacks a Link reports through; all run on the network thread.
@dataclass(frozen=True, slots=True)
class LinkCallbacks:
    connected: Callable[[Link], None]
    refused: Callable[[Link, str], None]
    lost: Callable[[Link, str, bool], None]  # reason, whether the broker said it was taken over
    published: Callable[[Link, int, str | None], None]  # mid, failure reason (None = ok)
    want_write: Callable[[Link], None]
    socket_closed: Callable[[Link, Any], None]


@dataclass(eq=False)
class Link:
    """One connection: the main one, or the one of the lwt entry it carries (`key`)."""

    key: LinkKey
    client_id: str
    will: Will | None
    settings: BrokerSettings
    callbacks: LinkCallbacks
    state: LinkState = LinkState.WAITING
    due: float = 0.0  # monotonic time of the next connect attempt (state WAITING)
    was_connected: bool = False
    close_with_will: bool = False  # when closing: let subscribers see the will
    reopen_after_close: bool = False  # when closing: build a fresh client (new will) and reconnect
    last_error: str | None = None
    handshake_since: float = 0.0  # monotonic; when the CONNECT went out
    connected_at: float = 0.0  # monotonic; when the last CONNACK arrived
    # Client-id conflict detection (see network.py): short-lived connections the broker
    # ended although it accepted the reconnect at once, and what is suspected.
    flaps: int = 0
    quick_reconnect: bool = False  # the last connect succeeded at the first attempt
    conflict: str | None = None
    warned_error: str | None = None  # the last refusal logged at warning, to log each once
    broker_reason: int | None = None  # the reason code of the broker's last DISCONNECT, if any
    closing_since: float = 0.0
    inflight: dict[int, tuple[str | None, int]] = field(default_factory=dict)  # mid -> (entry, qos)
    pending: dict[str, int] = field(default_factory=dict)  # entry -> messages not yet gone
    last_read: float = 0.0  # monotonic; when the broker last sent us anything
    client: mqtt.Client = field(init=False)
    backoff: Backoff = field(init=False)

    def __post_init__(self) -> None:
        self.backoff = Backoff(self.settings.backoff_min, self.settings.backoff_max)
        self.client = self._new_client()

    @property
    def is_v5(self) -> bool:
        return self.settings.protocol == "5"

    def _new_client(self) -> mqtt.Client:
        s = self.settings
        protocol = MQTTProtocolVersion.MQTTv5 if self.is_v5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=protocol, reconnect_on_failure=False)
        client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        client.enable_logger(PAHO_LOGGER)
        client.connect_timeout = s.connect_timeout
        client.max_inflight_messages_set(s.max_inflight)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls_context is not None:
            client.tls_set_context(s.tls_context)
            client.tls_insecure_set(s.tls_insecure)
        self._set_will(client)
        self._bind_callbacks(client)
        client.connect_async(s.host, s.port, keepalive=s.keepalive,
                             properties=self._connect_properties())
        return client

    def _set_will(self, client: mqtt.Client) -> None:
        if self.will is None:
            return
        props = None
        if self.is_v5 and self.settings.will_delay > 0:
            props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            props.WillDelayInterval = self.settings.will_delay
        client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain,
                        properties=props)

    def _connect_properties(self) -> Properties | None:
        if not self.is_v5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # The will delay only works while the session lives: the broker also releases the will
        # when the session ends, so the session must outlive the delay (notes §2.7).
        if self.settings.will_delay > 0:
            props.SessionExpiryInterval = self.settings.will_delay + 30
        return props

    def _bind_callbacks(self, client: mqtt.Client) -> None:
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_register_write = lambda _c, _u, _s: self.callbacks.want_write(self)
        client.on_socket_close = lambda _c, _u, sock: self.callbacks.socket_closed(self, sock)

    def rebuild(self, will: Will | None) -> None:
        """A new paho client with a new will; only while the old one is closed."""
        self.will = will
        self.inflight.clear()
        self.pending.clear()
        self.client = self._new_client()

    # Bookkeeping of what paho holds for us: `inflight` by message id, `pending` by entry, so
    # that a stalled connection can be told apart from a healthy one per entry in O(1).
    def track(self, mid: int, entry_id: str | None, qos: int) -> None:
        self.inflight[mid] = (entry_id, qos)
        if entry_id is not None:
            self.pending[entry_id] = self.pending.get(entry_id, 0) + 1

    def settle(self, mid: int) -> tuple[str | None, int]:
        """A message left (QoS 0: written) or was acknowledged (QoS 1/2)."""
        entry_id, qos = self.inflight.pop(mid, (None, 0))
        if entry_id is not None:
            left = self.pending.get(entry_id, 0) - 1
            if left > 0:
                self.pending[entry_id] = left
            else:
                self.pending.pop(entry_id, None)
        return entry_id, qos

    def drop_unsent_qos0(self) -> list[str | None]:
        """The connection is gone: paho discards unsent QoS 0 packets (QoS 1/2 are resent)."""
        lost = [mid for mid, (_, qos) in self.inflight.items() if qos == 0]
        return [self.settle(mid)[0] for mid in lost]

    # paho callbacks: network thread (or a connector thread during reconnect(), for none of these)
    def _on_connect(self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode,
                    _props: Any) -> None:
        if reason.is_failure:
            self.last_error = describe_reason(reason)
            self.callbacks.refused(self, self.last_error)
            return
        self.callbacks.connected(self)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, flags: DisconnectFlags,
                       reason: ReasonCode, _props: Any) -> None:
        self.broker_reason = reason.value if flags.is_disconnect_packet_from_server else None
        if flags.is_disconnect_packet_from_server:
            self.callbacks.lost(self, describe_reason(reason), reason.value == SESSION_TAKEN_OVER)
            return
        # No DISCONNECT packet: paho names every such loss "Unspecified error". Say what we
        # know instead: the socket was closed under us (Mosquitto 2.0 closes a taken-over or
        # over-limit connection without a packet).
        words = "connection closed by the broker before CONNACK" \
            if self.state is LinkState.HANDSHAKE else "connection closed by the broker"
        self.callbacks.lost(self, words, False)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode,
                    _props: Any) -> None:
        self.callbacks.published(self, mid, describe_reason(reason) if reason.is_failure else None)


def describe_reason(reason: ReasonCode | int) -> str:
    """Words for a paho reason code ("not authorized", "session taken over"), never a bare
    number."""
    if isinstance(reason, ReasonCode):
        return str(reason.getName()).lower()
    return str(mqtt.error_string(reason))


def describe_error(exc: BaseException) -> str:
    """Words for a failed connect attempt, naming a certificate problem when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return f"{type(exc).__name__}: {exc}"


DISCONNECT_WITH_WILL = ReasonCode(PacketTypes.DISCONNECT, identifier=4)
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another client connected with our id
