"""One MQTT session: a paho client (client.py), its Last Will, and the state machine of its
lifecycle.

`TRANSITIONS` is the lifecycle, as data: every change of `Session.state` goes through
`Session.fire(event)`, which looks the pair up there and refuses any pair it does not hold.
docs/design.md shows the same table (a test keeps the two equal).

A Session is owned by the network thread (netloop.py). paho is only ever called from that
thread, except `reconnect()`, which a connector thread runs while the session is CONNECTING
and the network thread leaves it alone: the blocking TCP connect and TLS handshake must not
stall the loop.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.client import DisconnectFlags
from paho.mqtt.reasoncodes import ReasonCode

from scheduler_publisher.config.loader import MessageProperties
from scheduler_publisher.mqtt.client import (
    SESSION_TAKEN_OVER,
    ResetAwareClient,
    describe_reason,
    paho_client,
    set_will,
)
from scheduler_publisher.mqtt.packet import PacketQueue

if TYPE_CHECKING:
    from scheduler_publisher.endpoints import Endpoint
    from scheduler_publisher.mqtt.capabilities import BrokerLimits
    from scheduler_publisher.settings import BrokerSettings

# Messages per entry handed to paho and not yet written (QoS 0) or acknowledged (QoS 1/2).
# More than one, so a QoS 1 entry faster than the broker's round trip still sends every tick.
MAX_PENDING_PER_ENTRY = 4
# A client-id conflict is claimed only on the broker's word (MQTT 5 reason 0x8E, session taken
# over), and cleared once the connection has stayed up for STABLE_AFTER seconds. Mosquitto 2.0
# closes a taken-over connection without a DISCONNECT, exactly as a broker that restarts does,
# so without that word nothing is claimed.
STABLE_AFTER = 30.0
# DISCONNECT reasons by which an MQTT 5 broker blames a packet we sent (MQTT 5.0 §3.14.2.1):
# malformed packet, protocol error, topic name invalid, packet too large, payload format
# invalid, retain not supported, QoS not supported.
PACKET_FAULTS = frozenset({0x81, 0x82, 0x90, 0x95, 0x99, 0x9A, 0x9B})


@dataclass(frozen=True, slots=True)
class Will:
    """What the broker publishes for a connection that dies."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    # A templated will: the payload for a client id, rendered before each CONNECT, since the
    # broker keeps the will it was given at CONNECT (MQTT 5 3.1.2.5). Not compared: two wills
    # of the same template are the same will.
    render: Callable[[str], bytes] | None = field(default=None, compare=False)
    properties: MessageProperties | None = None  # the entry's (MQTT 5 only: its will's too)


class LinkKey(NamedTuple):
    """Which connection: the shared main one, or the own one of the lwt entry `entry_id`.

    A type of its own rather than a string, so that no entry id can ever name the main
    connection: an entry called "main" is `LinkKey("main")`, never `MAIN_LINK` (issue 11 #9).
    A named tuple, not a frozen dataclass: every publish looks its connection up by it, and a
    tuple hashes in C where the dataclass's `__hash__` is Python.
    """

    entry_id: str | None = None

    @property
    def is_main(self) -> bool:
        return self.entry_id is None

    def __str__(self) -> str:
        return "main" if self.entry_id is None else f"entry {self.entry_id!r}"


MAIN_LINK = LinkKey()


class State(enum.Enum):
    """Where one session is. The values are what `/status` shows for a connection that is down."""

    BACKOFF = "waiting"  # no socket; the next attempt is due at `Session.due` (or now, if new)
    CONNECTING = "connecting"  # a connector thread owns the client: TCP connect, TLS handshake
    HANDSHAKE = "handshake"  # CONNECT sent, no CONNACK yet (MQTT 5 3.1.4)
    CONNECTED = "connected"
    STALLED = "stalled"  # connected, but paho holds the most it may for an entry (see below)
    CLOSING = "closing"  # DISCONNECT queued (or due once the socket is up); then forgotten
    RENEWING = "renewing"  # closing in order to connect again with another will
    GIVEN_UP = "given up"  # --max-retries failed attempts in a row; no more attempts
    CLOSED = "closed"  # final; the loop forgets the session


UP_STATES = frozenset({State.CONNECTED, State.STALLED})


class Event(enum.Enum):
    BACKOFF_ELAPSED = "backoff elapsed"  # due, and the connect rate allows an attempt
    SOCKET_OPENED = "socket opened"  # reconnect() returned: TCP (and TLS) up, CONNECT queued
    CONNECT_FAILED = "connect failed"  # reconnect() raised: DNS, TCP, TLS
    CONNACK_OK = "CONNACK ok"
    CONNACK_REFUSED = "CONNACK refused"  # reported once paho has closed the socket after it
    DISCONNECT_RECEIVED = "DISCONNECT received"  # the broker's DISCONNECT packet (MQTT 5 3.14)
    SOCKET_CLOSED = "socket closed"  # closed without a DISCONNECT from the broker, or after ours
    CONNACK_TIMEOUT = "CONNACK timeout"
    SILENCE_TIMEOUT = "silence timeout"  # nothing from the broker for 1.5x keepalive
    CLOSE_TIMEOUT = "close timeout"  # our DISCONNECT could not be written
    STALL_DETECTED = "stall detected"
    STALL_CLEARED = "stall cleared"
    CLOSE_REQUESTED = "close requested"
    RENEW_REQUESTED = "renew requested"  # a new will: the will is fixed at CONNECT (3.1.2.5)
    MAX_RETRIES_REACHED = "max retries reached"


S, E = State, Event
_LIVE = (S.CONNECTING, S.HANDSHAKE, S.CONNECTED, S.STALLED, S.CLOSING, S.RENEWING)

# The lifecycle: (state, event) -> next state. A pair that is missing is a bug, and refused.
TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (S.BACKOFF, E.BACKOFF_ELAPSED): S.CONNECTING,
    (S.BACKOFF, E.MAX_RETRIES_REACHED): S.GIVEN_UP,
    (S.CONNECTING, E.SOCKET_OPENED): S.HANDSHAKE,
    (S.CONNECTING, E.CONNECT_FAILED): S.BACKOFF,
    (S.HANDSHAKE, E.CONNACK_OK): S.CONNECTED,
    (S.HANDSHAKE, E.CONNACK_REFUSED): S.BACKOFF,  # the server closes after a refusal (3.2.2.2)
    (S.HANDSHAKE, E.DISCONNECT_RECEIVED): S.BACKOFF,
    (S.HANDSHAKE, E.SOCKET_CLOSED): S.BACKOFF,
    (S.HANDSHAKE, E.CONNACK_TIMEOUT): S.BACKOFF,  # 3.1.4: the client may close if none comes
    (S.CONNECTED, E.STALL_DETECTED): S.STALLED,
    (S.STALLED, E.STALL_CLEARED): S.CONNECTED,
    **{
        (up, ev): S.BACKOFF
        for up in UP_STATES
        for ev in (E.DISCONNECT_RECEIVED, E.SOCKET_CLOSED, E.SILENCE_TIMEOUT)
    },  # 3.1.2.10
    # A socket that comes up after a close request gets its DISCONNECT; a CONNACK that
    # crosses our DISCONNECT changes nothing.
    (S.CLOSING, E.SOCKET_OPENED): S.CLOSING,
    (S.RENEWING, E.SOCKET_OPENED): S.RENEWING,
    (S.CLOSING, E.CONNACK_OK): S.CLOSING,
    (S.RENEWING, E.CONNACK_OK): S.RENEWING,
    **{
        (S.CLOSING, ev): S.CLOSED
        for ev in (E.CONNECT_FAILED, E.DISCONNECT_RECEIVED, E.SOCKET_CLOSED, E.CLOSE_TIMEOUT)
    },
    **{
        (S.RENEWING, ev): S.BACKOFF
        for ev in (E.CONNECT_FAILED, E.DISCONNECT_RECEIVED, E.SOCKET_CLOSED, E.CLOSE_TIMEOUT)
    },
    (S.BACKOFF, E.CLOSE_REQUESTED): S.CLOSED,
    (S.GIVEN_UP, E.CLOSE_REQUESTED): S.CLOSED,
    **{(live, E.CLOSE_REQUESTED): S.CLOSING for live in _LIVE},
    (S.BACKOFF, E.RENEW_REQUESTED): S.BACKOFF,  # rebuilt at once, due now
    **{(live, E.RENEW_REQUESTED): S.RENEWING for live in _LIVE},
}


class IllegalTransitionError(RuntimeError):
    """An event the session's current state does not allow: a bug in the caller."""

    def __init__(self, key: LinkKey, state: State, event: Event) -> None:
        super().__init__(
            f"connection {key}: event {event.value!r} is not allowed in state {state.value!r}"
        )
        self.state = state
        self.event = event


def transition_table_markdown() -> str:
    """The table as docs/design.md shows it, one row per transition, grouped by state."""
    order = list(State)
    rows = sorted(
        TRANSITIONS.items(), key=lambda kv: (order.index(kv[0][0]), list(Event).index(kv[0][1]))
    )
    lines = ["| state | event | next state |", "|---|---|---|"]
    lines += [f"| {s.name} | {e.value} | {n.name} |" for (s, e), n in rows]
    return "\n".join(lines)


class Backoff:
    """Exponential backoff with jitter (half to full of the exponential step), so that a fleet
    of gateways, or a thousand connections in one process, do not reconnect in lockstep."""

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


# What a Session reports through; all run on the network thread.
@dataclass(frozen=True, slots=True)
class SessionCallbacks:
    connected: Callable[[Session], None]
    refused: Callable[[Session, str], None]
    # the event (DISCONNECT_RECEIVED or SOCKET_CLOSED), the reason, whether it was a take-over
    lost: Callable[[Session, Event, str, bool], None]
    published: Callable[[Session, int, str | None], None]  # mid, failure reason (None = ok)
    want_write: Callable[[Session], None]
    socket_closed: Callable[[Session, Any], None]


@dataclass(eq=False)
class Session:
    """One connection: the main one, or the one of the lwt entry it carries (`key`).

    `make_client` builds the paho client (a fake one in unit tests); `max_retries` failed
    attempts in a row give up (None: never)."""

    key: LinkKey
    client_id: str
    will: Will | None
    settings: BrokerSettings
    callbacks: SessionCallbacks
    max_retries: int | None = None
    make_client: Callable[[Session], mqtt.Client] = paho_client
    # The broker its next client connects to; None: the first of settings.brokers. The loop
    # moves every session at once (NetworkLoop.fail_over); a client keeps its broker.
    endpoint: Endpoint | None = None
    state: State = State.BACKOFF
    due: float = 0.0  # monotonic time of the next connect attempt (state BACKOFF)
    announce_offline: bool = False  # when closing: let subscribers see the will
    next_will: Will | None = None  # when renewing: the will of the new client
    # The will as last handed to paho, fitted to the broker's limits (capabilities.py)
    sent_will: Will | None = None
    connack_properties: Any = None  # paho's Properties of the last CONNACK (MQTT 5), or None
    connack_reason: int = 0  # the last CONNACK's reason code
    last_error: str | None = None
    handshake_since: float = 0.0  # monotonic; when the CONNECT went out
    connected_at: float = 0.0  # monotonic; when the last CONNACK arrived
    conflict: str | None = None  # the broker said another client took over the client id
    broker_reason: int | None = None  # the reason code of the broker's last DISCONNECT, if any
    reset_by_broker: bool = False  # the last loss was a TCP reset, no DISCONNECT read
    dropped_by_broker: bool = False  # the last loss was the broker's doing (or the path's)
    closing_since: float = 0.0
    inflight: dict[int, tuple[str | None, int]] = field(default_factory=dict)  # mid -> (entry, qos)
    # QoS 1/2 mid -> monotonic time it went out (or the connection came back), in that order
    ack_since: dict[int, float] = field(default_factory=dict)
    unacked_said: set[str] = field(default_factory=set)  # entries logged as unacknowledged
    pending: dict[str, int] = field(default_factory=dict)  # entry -> messages not yet gone
    last_read: float = 0.0  # monotonic; when the broker last sent us anything
    packets: PacketQueue = field(default_factory=PacketQueue)  # pre-encoded QoS 0, unwritten
    client: mqtt.Client = field(init=False)
    backoff: Backoff = field(init=False)
    _saturated: int = field(default=0, init=False)  # entries at MAX_PENDING_PER_ENTRY

    def __post_init__(self) -> None:
        self.backoff = Backoff(self.settings.backoff_min, self.settings.backoff_max)
        self.client = self.make_client(self)

    # ---- the state machine ----------------------------------------------------------------
    def fire(self, event: Event) -> State:
        """Move along the table; an event the current state does not allow is refused."""
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransitionError(self.key, self.state, event) from None
        return self.state

    @property
    def is_up(self) -> bool:
        # UP_STATES, spelt out: asked twice per publish, and an Enum hashes in Python
        state = self.state
        return state is State.CONNECTED or state is State.STALLED

    @property
    def is_v5(self) -> bool:
        return self.settings.protocol == "5"

    @property
    def may_blame_a_packet(self) -> bool:
        """The broker may have dropped this connection for something we sent: its DISCONNECT
        names a packet fault, or it closed or reset the connection without naming any cause.
        An MQTT 3.1.1 broker never names one; an MQTT 5 broker that refuses a packet sends its
        DISCONNECT and closes while the rest of our write is unread, and the reset that follows
        can discard the DISCONNECT before we read it. Only a probe (faults.py) tells a refused
        packet from a broker that went away (docs/design.md, "An entry that gets the shared
        connection dropped")."""
        if self.broker_reason is not None:
            return self.broker_reason in PACKET_FAULTS
        return self.dropped_by_broker

    @property
    def failures(self) -> int:
        """Failed attempts (and losses) since the last reset of the backoff."""
        return self.backoff.failures

    def schedule_retry(self, now: float, *, failed_attempt: bool) -> None:
        """In BACKOFF: the next attempt after the backoff delay. A failed attempt (not a loss
        of an established connection) counts towards `max_retries`."""
        self.due = now + self.backoff.next_delay()
        if (
            failed_attempt
            and self.max_retries is not None
            and self.backoff.failures >= self.max_retries
        ):
            self.fire(Event.MAX_RETRIES_REACHED)

    def judge_loss(self, taken_over: bool) -> None:
        """A client-id conflict, on the broker's word only (MQTT 5 reason 0x8E)."""
        if taken_over:
            self.conflict = (
                f"the broker says another client took over client id {self.client_id}: "
                "another process is using it"
            )

    def settled(self) -> None:
        """Up long enough: whoever shared the client id has gone."""
        self.conflict = None
        self.backoff.reset()

    def render_will(self) -> None:
        """Before a connect attempt (network thread; the client is idle): a templated will gets
        this connect's values. `will` then holds what the broker will keep, which is also what
        a graceful stop announces on MQTT 3.1.1."""
        will = self.will
        if will is None or will.render is None:
            return
        self.will = replace(will, payload=will.render(self.client_id))
        self.sent_will = None  # set again by fit_will

    def fit_will(self, limits: BrokerLimits) -> None:
        """Before a connect attempt, after render_will: the will as the broker takes it (a
        will above its limits gets the CONNECT refused, MQTT 5 3.2.2.2)."""
        if self.will is None:
            return
        fitted = limits.fit(self.will)
        if fitted != self.sent_will:
            set_will(self.client, fitted, self.settings)
            self.sent_will = fitted

    def rebuild(self) -> None:
        """A new paho client with `next_will`; only while the old one is closed."""
        self.will, self.next_will = self.next_will, None
        self.sent_will = None
        self.announce_offline = False
        self.inflight.clear()
        self.ack_since.clear()
        self.pending.clear()
        self.packets.drop()
        self._saturated = 0
        self.client = self.make_client(self)

    # ---- what paho holds for us -------------------------------------------------------------
    # `inflight` by message id, `pending` by entry, so that a stalled connection can be told
    # apart from a healthy one per entry in O(1).
    def saturated(self, entry_id: str) -> bool:
        """paho holds as many messages of this entry as it may: the broker is not taking them."""
        return self.pending.get(entry_id, 0) >= MAX_PENDING_PER_ENTRY

    @property
    def awaiting_acks(self) -> bool:
        return any(qos for _, qos in self.inflight.values())

    def track(self, mid: int, entry_id: str | None, qos: int) -> None:
        self.inflight[mid] = (entry_id, qos)
        if qos:
            self.ack_since[mid] = time.monotonic()
        if entry_id is not None:
            self._hold(entry_id)

    def send_packet(self, header: bytes, payload: bytes, entry_id: str) -> None:
        """A pre-encoded QoS 0 packet (packet.py): queued on paho's socket queue, held (like a
        message in paho) until written."""
        self.packets.put(self.client, header, payload, entry_id)
        self._hold(entry_id)

    def settle(self, mid: int) -> tuple[str | None, int]:
        """A message left (QoS 0: written) or was acknowledged (QoS 1/2)."""
        entry_id, qos = self.inflight.pop(mid, (None, 0))
        if qos:
            self.ack_since.pop(mid, None)
        if entry_id is not None:
            self.release(entry_id)
        return entry_id, qos

    def written_packets(self) -> list[str]:
        """The entries whose pre-encoded packets paho has written since the last call."""
        done = list(self.packets.written())
        for entry_id in done:  # one stall check for the lot: releases only lower the counts,
            self._unhold(entry_id)  # so the last check decides
        if done:
            self.check_stall()
        return done

    def _hold(self, entry_id: str) -> None:
        count = self.pending.get(entry_id, 0) + 1
        self.pending[entry_id] = count
        if count == MAX_PENDING_PER_ENTRY:
            self._saturated += 1
            self.check_stall()

    def release(self, entry_id: str) -> None:
        self._unhold(entry_id)
        self.check_stall()

    def _unhold(self, entry_id: str) -> None:
        left = self.pending.get(entry_id, 0) - 1
        if left == MAX_PENDING_PER_ENTRY - 1:
            self._saturated -= 1
        if left > 0:
            self.pending[entry_id] = left
        else:
            self.pending.pop(entry_id, None)

    def check_stall(self) -> None:
        """STALLED while some entry is at its limit in paho, CONNECTED again once none is."""
        if self.state is State.CONNECTED and self._saturated:
            self.fire(Event.STALL_DETECTED)
        elif self.state is State.STALLED and not self._saturated:
            self.fire(Event.STALL_CLEARED)

    def restart_ack_clocks(self, now: float) -> None:
        """Connected again: paho sends the unacknowledged QoS 1/2 messages again, so their
        wait for an answer starts now."""
        self.ack_since = dict.fromkeys(self.ack_since, now)
        self.unacked_said.clear()

    def overdue(self, now: float, limit: float) -> list[int]:
        """The QoS 1/2 messages the broker has not acknowledged within `limit` seconds."""
        late: list[int] = []
        for mid, since in self.ack_since.items():
            if now - since <= limit:
                break  # in the order they went out: the rest are younger
            late.append(mid)
        return late

    def drop_unsent_qos0(self) -> list[str | None]:
        """The connection is gone: paho discards unsent QoS 0 packets (QoS 1/2 are resent),
        and the pre-encoded ones go with them."""
        lost = [mid for mid, (_, qos) in self.inflight.items() if qos == 0]
        dropped: list[str | None] = [self.settle(mid)[0] for mid in lost]
        for entry_id in self.packets.drop():
            self.release(entry_id)
            dropped.append(entry_id)
        return dropped

    # ---- paho callbacks (network thread) ----------------------------------------------------
    def bind(self, client: mqtt.Client) -> None:
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_register_write = lambda _c, _u, _s: self.callbacks.want_write(self)
        client.on_socket_close = lambda _c, _u, sock: self.callbacks.socket_closed(self, sock)

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, props: Any
    ) -> None:
        self.connack_properties = props if self.is_v5 else None
        self.connack_reason = reason.value
        if reason.is_failure:
            self.last_error = describe_reason(reason)
            self.callbacks.refused(self, self.last_error)
            return
        self.callbacks.connected(self)

    def _on_disconnect(
        self, client: mqtt.Client, _u: Any, flags: DisconnectFlags, reason: ReasonCode, _props: Any
    ) -> None:
        from_server = flags.is_disconnect_packet_from_server
        self.dropped_by_broker = True
        self.broker_reason = reason.value if from_server else None
        self.reset_by_broker = (
            not from_server and isinstance(client, ResetAwareClient) and client.take_reset()
        )
        if from_server:
            self.callbacks.lost(
                self,
                Event.DISCONNECT_RECEIVED,
                describe_reason(reason),
                reason.value == SESSION_TAKEN_OVER,
            )
            return
        # No DISCONNECT packet: paho names every such loss "Unspecified error". Say what we
        # know instead: the socket was closed under us (Mosquitto 2.0 closes a taken-over or
        # over-limit connection without a packet).
        words = (
            "connection closed by the broker before CONNACK"
            if self.state is State.HANDSHAKE
            else "connection reset by the broker"
            if self.reset_by_broker
            else "connection closed by the broker"
        )
        self.callbacks.lost(self, Event.SOCKET_CLOSED, words, False)

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        self.callbacks.published(self, mid, describe_reason(reason) if reason.is_failure else None)
