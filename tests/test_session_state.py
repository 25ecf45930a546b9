"""The connection lifecycle as a state machine (session.py), driven by the network loop
(netloop.py) with a fake paho client: no broker, no sockets to a broker, no threads.

The end-to-end behaviour against a real Mosquitto is in test_connection.py, test_lwt.py and
test_faults.py; these tests pin down each transition and what the loop does with it.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import DisconnectFlags
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from scheduler_publisher.mqtt.netloop import NetworkLoop, SessionView
from scheduler_publisher.mqtt.session import (
    MAIN_LINK,
    MAX_PENDING_PER_ENTRY,
    TRANSITIONS,
    Backoff,
    Event,
    IllegalTransitionError,
    LinkKey,
    Session,
    SessionCallbacks,
    State,
    Will,
    transition_table_markdown,
)
from scheduler_publisher.settings import BrokerSettings

S, E = State, Event
DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"

# The lifecycle as read from the MQTT 5 spec, written out pair by pair (not derived from the
# code's table, so that a change to either shows here).
EXPECTED: dict[tuple[State, Event], State] = {
    (S.BACKOFF, E.BACKOFF_ELAPSED): S.CONNECTING,
    (S.BACKOFF, E.MAX_RETRIES_REACHED): S.GIVEN_UP,
    (S.BACKOFF, E.CLOSE_REQUESTED): S.CLOSED,
    (S.BACKOFF, E.RENEW_REQUESTED): S.BACKOFF,
    (S.CONNECTING, E.SOCKET_OPENED): S.HANDSHAKE,
    (S.CONNECTING, E.CONNECT_FAILED): S.BACKOFF,
    (S.CONNECTING, E.CLOSE_REQUESTED): S.CLOSING,
    (S.CONNECTING, E.RENEW_REQUESTED): S.RENEWING,
    (S.HANDSHAKE, E.CONNACK_OK): S.CONNECTED,
    (S.HANDSHAKE, E.CONNACK_REFUSED): S.BACKOFF,
    (S.HANDSHAKE, E.DISCONNECT_RECEIVED): S.BACKOFF,
    (S.HANDSHAKE, E.SOCKET_CLOSED): S.BACKOFF,
    (S.HANDSHAKE, E.CONNACK_TIMEOUT): S.BACKOFF,
    (S.HANDSHAKE, E.CLOSE_REQUESTED): S.CLOSING,
    (S.HANDSHAKE, E.RENEW_REQUESTED): S.RENEWING,
    (S.CONNECTED, E.STALL_DETECTED): S.STALLED,
    (S.CONNECTED, E.DISCONNECT_RECEIVED): S.BACKOFF,
    (S.CONNECTED, E.SOCKET_CLOSED): S.BACKOFF,
    (S.CONNECTED, E.SILENCE_TIMEOUT): S.BACKOFF,
    (S.CONNECTED, E.CLOSE_REQUESTED): S.CLOSING,
    (S.CONNECTED, E.RENEW_REQUESTED): S.RENEWING,
    (S.STALLED, E.STALL_CLEARED): S.CONNECTED,
    (S.STALLED, E.DISCONNECT_RECEIVED): S.BACKOFF,
    (S.STALLED, E.SOCKET_CLOSED): S.BACKOFF,
    (S.STALLED, E.SILENCE_TIMEOUT): S.BACKOFF,
    (S.STALLED, E.CLOSE_REQUESTED): S.CLOSING,
    (S.STALLED, E.RENEW_REQUESTED): S.RENEWING,
    (S.CLOSING, E.SOCKET_OPENED): S.CLOSING,
    (S.CLOSING, E.CONNACK_OK): S.CLOSING,
    (S.CLOSING, E.CONNECT_FAILED): S.CLOSED,
    (S.CLOSING, E.DISCONNECT_RECEIVED): S.CLOSED,
    (S.CLOSING, E.SOCKET_CLOSED): S.CLOSED,
    (S.CLOSING, E.CLOSE_TIMEOUT): S.CLOSED,
    (S.CLOSING, E.CLOSE_REQUESTED): S.CLOSING,
    (S.CLOSING, E.RENEW_REQUESTED): S.RENEWING,
    (S.RENEWING, E.SOCKET_OPENED): S.RENEWING,
    (S.RENEWING, E.CONNACK_OK): S.RENEWING,
    (S.RENEWING, E.CONNECT_FAILED): S.BACKOFF,
    (S.RENEWING, E.DISCONNECT_RECEIVED): S.BACKOFF,
    (S.RENEWING, E.SOCKET_CLOSED): S.BACKOFF,
    (S.RENEWING, E.CLOSE_TIMEOUT): S.BACKOFF,
    (S.RENEWING, E.CLOSE_REQUESTED): S.CLOSING,
    (S.RENEWING, E.RENEW_REQUESTED): S.RENEWING,
    (S.GIVEN_UP, E.CLOSE_REQUESTED): S.CLOSED,
}
ILLEGAL = [pair for pair in itertools.product(State, Event) if pair not in TRANSITIONS]


# ---- a fake paho client ---------------------------------------------------------------------
@dataclass
class FakeInfo:
    rc: int
    mid: int


@dataclass(eq=False)
class FakeClient:
    """What the loop calls on a paho client, recorded; the test plays the broker's part by
    calling the callbacks the session bound, as paho would."""

    will: Will | None
    fail_connect: BaseException | None = None
    keepalive: int = 30
    published: list[tuple[str, bytes, int, bool]] = field(default_factory=list)
    disconnects: list[int | None] = field(default_factory=list)  # reason code, None = normal
    sock: socket.socket | None = None
    peer: socket.socket | None = None
    misc_calls: int = 0
    _mids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    on_connect: Any = None
    on_disconnect: Any = None
    on_publish: Any = None
    on_socket_register_write: Any = None
    on_socket_close: Any = None

    def reconnect(self) -> None:
        if self.fail_connect is not None:
            raise self.fail_connect
        self.sock, self.peer = socket.socketpair()

    def socket(self) -> socket.socket | None:
        return self.sock

    def will_set(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties: Any = None
    ) -> None:
        self.will = Will(topic, payload, qos, retain)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None = None,
    ) -> FakeInfo:
        assert properties is None  # the entries of these tests have none
        self.published.append((topic, payload, qos, retain))
        return FakeInfo(0, next(self._mids))

    def disconnect(self, reasoncode: ReasonCode | None = None) -> None:
        self.disconnects.append(None if reasoncode is None else reasoncode.value)

    def loop_write(self) -> None:
        pass

    def want_write(self) -> bool:
        return False

    def loop_misc(self) -> None:
        self.misc_calls += 1

    def _sock_close(self) -> None:
        self.close_socket()

    def close_socket(self) -> None:
        for s in (self.sock, self.peer):
            if s is not None:
                if self.on_socket_close is not None and s is self.sock:
                    self.on_socket_close(self, None, s)
                s.close()
        self.sock = self.peer = None

    # the broker's side, as paho reports it
    def connack(self, code: int = 0) -> None:
        self.on_connect(self, None, None, ReasonCode(PacketTypes.CONNACK, identifier=code), None)

    def broker_disconnect(self, code: int) -> None:
        self.close_socket()
        self.on_disconnect(
            self,
            None,
            DisconnectFlags(is_disconnect_packet_from_server=True),
            ReasonCode(PacketTypes.DISCONNECT, identifier=code),
            None,
        )

    def socket_lost(self) -> None:
        self.close_socket()
        self.on_disconnect(
            self,
            None,
            DisconnectFlags(is_disconnect_packet_from_server=False),
            ReasonCode(PacketTypes.DISCONNECT, identifier=0x80),
            None,
        )

    def ack(self, mid: int) -> None:
        self.on_publish(self, None, mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None)


@dataclass
class Heard:
    """A SessionListener that writes down what it hears."""

    events: list[tuple[str, LinkKey, Any]] = field(default_factory=list)

    def link_up(self, session: SessionView) -> None:
        self.events.append(("up", session.key, None))

    def link_down(self, session: SessionView, reason: str, was_up: bool) -> None:
        self.events.append(("down", session.key, (reason, was_up)))

    def link_refused(self, session: SessionView, reason: str) -> None:
        self.events.append(("refused", session.key, reason))

    def link_closed(self, session: SessionView) -> None:
        self.events.append(("closed", session.key, None))

    def published(
        self, session: SessionView, entry_id: str | None, qos: int, failure: str | None
    ) -> None:
        self.events.append(("published", session.key, entry_id))

    def written(self, session: SessionView, entry_ids: list[str]) -> None:
        self.events.extend(("published", session.key, entry_id) for entry_id in entry_ids)

    def lost_unsent(self, session: SessionView, entry_id: str | None) -> None:
        self.events.append(("lost_unsent", session.key, entry_id))

    def kinds(self, key: LinkKey) -> list[str]:
        return [kind for kind, k, _ in self.events if k == key]


class Inline:
    """Runs the connector's work at once, on the test's thread; or, while `held`, keeps it
    until `release`, as a connector thread still busy with the TCP connect would."""

    def __init__(self) -> None:
        self.held = False
        self.waiting: list[tuple[Callable[[Session], None], Session]] = []

    def submit(self, fn: Callable[[Session], None], session: Session, /) -> None:
        if self.held:
            self.waiting.append((fn, session))
        else:
            fn(session)

    def release(self) -> None:
        waiting, self.waiting, self.held = self.waiting, [], False
        for fn, session in waiting:
            fn(session)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.waiting.clear()


class Harness:
    """A NetworkLoop that is never started: the test runs its turns by hand."""

    def __init__(self, **settings: Any) -> None:
        self.clients: list[FakeClient] = []
        self.fail_connect: BaseException | None = None
        self.heard = Heard()
        base = {"client_id": "fake", "backoff_min": 1.0, "backoff_max": 8.0, "connect_rate": 1000.0}
        self.connector = Inline()
        self.loop = NetworkLoop(
            BrokerSettings(**{**base, **settings}),
            self.heard,
            make_client=self._make,
            connector=self.connector,
        )
        self.loop.drive()  # the test's thread is the loop's

    def _make(self, session: Session) -> Any:
        client = FakeClient(session.will, fail_connect=self.fail_connect)
        session.bind(client)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def session(self, key: LinkKey = MAIN_LINK) -> Session:
        found = self.loop.get(key)
        assert isinstance(found, Session), f"no session {key}"
        return found

    def client(self, key: LinkKey = MAIN_LINK) -> FakeClient:
        client: FakeClient = self.session(key).client  # type: ignore[assignment]
        return client

    def turn(self, *, due_now: bool = True) -> None:
        """One loop turn: queued commands, then due connects (every session's, by default)."""
        if due_now:
            for view in self.loop.sessions():
                assert isinstance(view, Session)
                view.due = 0.0
        self.loop.turn(self.now())

    def open(self, key: LinkKey = MAIN_LINK, will: Will | None = None) -> Session:
        self.loop.open(key, f"fake/{key.entry_id}" if key.entry_id else "fake", will)
        return self.session(key)

    def connect(self, key: LinkKey = MAIN_LINK, will: Will | None = None) -> Session:
        session = self.open(key, will)
        self.turn()
        assert state_of(session) is State.HANDSHAKE
        self.client(key).connack()
        assert state_of(session) is State.CONNECTED
        return session

    @staticmethod
    def now() -> float:
        import time  # noqa: PLC0415 - the loop's own clock, read where it is needed

        return time.monotonic()

    def close(self) -> None:
        for client in self.clients:
            for s in (client.sock, client.peer):
                if s is not None:
                    s.close()
        self.loop.stop(timeout=0)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def state_of(session: Session) -> State:
    """The state now (a call, so that mypy does not narrow it across events)."""
    return session.state


def fake_session(state: State) -> Session:
    ignore: Any = lambda *_: None  # noqa: E731 - callbacks these tests do not watch
    callbacks = SessionCallbacks(
        connected=ignore,
        refused=ignore,
        lost=ignore,
        published=ignore,
        want_write=ignore,
        socket_closed=ignore,
    )
    session = Session(
        MAIN_LINK,
        "fake",
        None,
        BrokerSettings(client_id="fake"),
        callbacks,
        make_client=lambda s: FakeClient(s.will),  # type: ignore[arg-type,return-value]
    )
    session.state = state
    return session


# ---- the table --------------------------------------------------------------------------------
def test_the_table_is_the_lifecycle_read_from_the_spec() -> None:
    """The code's transition table holds exactly the transitions written out above."""
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(
    ("pair", "after"), list(TRANSITIONS.items()), ids=[f"{s.name}-{e.name}" for s, e in TRANSITIONS]
)
def test_every_transition_in_the_table_moves_the_session(
    pair: tuple[State, Event], after: State
) -> None:
    """Firing an allowed event moves the session to the state the table names."""
    before, event = pair
    session = fake_session(before)
    assert session.fire(event) is after
    assert state_of(session) is after


@pytest.mark.parametrize("pair", ILLEGAL, ids=[f"{s.name}-{e.name}" for s, e in ILLEGAL])
def test_every_pair_missing_from_the_table_is_refused(pair: tuple[State, Event]) -> None:
    """An event the state does not allow raises, names both, and leaves the state alone."""
    before, event = pair
    session = fake_session(before)
    with pytest.raises(IllegalTransitionError, match=re.escape(event.value)) as caught:
        session.fire(event)
    assert caught.value.state is before
    assert state_of(session) is before


def test_closed_is_final() -> None:
    """No event leads out of CLOSED, and GIVEN_UP leads only to CLOSED."""
    assert not any(s is State.CLOSED for s, _ in TRANSITIONS)
    assert {n for (s, _), n in TRANSITIONS.items() if s is State.GIVEN_UP} == {State.CLOSED}


def test_design_doc_shows_the_codes_table() -> None:
    """docs/design.md carries the table generated from TRANSITIONS, row for row."""
    assert transition_table_markdown() in DESIGN.read_text(encoding="utf-8")


# ---- backoff and giving up --------------------------------------------------------------------
def test_backoff_doubles_with_jitter_up_to_the_maximum_and_resets() -> None:
    """Each delay lies between half and all of min * 2^failures, capped at the maximum."""
    backoff = Backoff(1.0, 8.0)
    for step in (1, 2, 4, 8, 8, 8):
        assert step / 2 <= backoff.next_delay() <= step
    assert backoff.failures == 6
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_failed_attempts_back_off_and_are_counted(harness: Harness) -> None:
    """A connect that fails goes back to BACKOFF with the next attempt in the future, and
    the failure is reported with the socket error's words."""
    harness.fail_connect = ConnectionRefusedError()
    session = harness.open()
    for attempt in (1, 2, 3):
        harness.turn()
        assert state_of(session) is State.BACKOFF
        assert session.failures == attempt
        assert session.due > harness.now()
    assert harness.heard.events[-1] == ("refused", MAIN_LINK, "connection refused")


def test_max_retries_failed_attempts_give_up_and_stop_attempting() -> None:
    """--max-retries 2: the second failed attempt gives up; no attempt follows; a close
    request then forgets the session."""
    h = Harness(max_retries=2)
    try:
        h.fail_connect = ConnectionRefusedError()
        session = h.open()
        h.turn()
        assert state_of(session) is State.BACKOFF
        h.turn()
        assert state_of(session) is State.GIVEN_UP
        assert len(h.clients) == 1
        refused = h.heard.kinds(MAIN_LINK).count("refused")
        h.turn()
        assert h.heard.kinds(MAIN_LINK).count("refused") == refused, "no further attempt"
        h.loop.close_announcing(MAIN_LINK)
        assert h.loop.get(MAIN_LINK) is None
        assert h.heard.events[-1] == ("closed", MAIN_LINK, None)
    finally:
        h.close()


def test_entry_connections_never_give_up() -> None:
    """max_retries is the main connection's: an lwt entry's keeps retrying."""
    h = Harness(max_retries=1)
    try:
        h.connect()
        h.fail_connect = ConnectionRefusedError()
        session = h.open(LinkKey("e"))
        for _ in range(3):
            h.turn()
        assert state_of(session) is State.BACKOFF
        assert session.failures == 3
    finally:
        h.close()


def test_a_refused_connack_backs_off_with_the_brokers_reason(harness: Harness) -> None:
    """CONNACK "not authorized", then paho's close: one refusal with the broker's words."""
    session = harness.open()
    harness.turn()
    client = harness.client()
    client.connack(0x87)
    client.socket_lost()
    assert state_of(session) is State.BACKOFF
    assert session.failures == 1
    assert session.last_error == "not authorized"
    assert harness.heard.kinds(MAIN_LINK) == ["refused"]


def test_a_connack_resets_the_backoff(harness: Harness) -> None:
    """After failed attempts, a CONNACK starts the backoff over."""
    harness.fail_connect = ConnectionRefusedError()
    session = harness.open()
    harness.turn()
    harness.turn()
    harness.fail_connect = None
    session.client = harness._make(session)  # the next attempt succeeds
    harness.turn()
    harness.client().connack()
    assert state_of(session) is State.CONNECTED
    assert session.failures == 0
    assert harness.heard.kinds(MAIN_LINK)[-1] == "up"


# ---- the connection's life --------------------------------------------------------------------
def test_entry_connections_wait_for_the_main_one(harness: Harness) -> None:
    """An lwt entry's session stays in BACKOFF until the main one is connected."""
    entry = harness.open(LinkKey("e"))
    main = harness.open()
    harness.turn()
    assert state_of(main) is State.HANDSHAKE
    assert state_of(entry) is State.BACKOFF
    harness.client().connack()
    harness.turn()
    assert state_of(entry) is State.HANDSHAKE


def test_a_broker_disconnect_after_connack_is_a_loss_with_its_reason(harness: Harness) -> None:
    """DISCONNECT "server shutting down" while connected: BACKOFF, reported as a loss of an
    established connection with the reason's name."""
    session = harness.connect()
    harness.client().broker_disconnect(0x8B)
    assert state_of(session) is State.BACKOFF
    assert harness.heard.events[-1] == ("down", MAIN_LINK, ("server shutting down", True))
    assert session.due > harness.now()


def test_unsent_qos0_messages_are_reported_lost_with_the_connection(harness: Harness) -> None:
    """QoS 0 messages paho still held die with the socket; QoS 1 ones stay to be resent."""
    harness.connect()
    harness.loop.publish(MAIN_LINK, "t/a", b"x", 0, False, "a")
    harness.loop.publish(MAIN_LINK, "t/b", b"x", 1, False, "b")
    harness.client().socket_lost()
    assert ("lost_unsent", MAIN_LINK, "a") in harness.heard.events
    assert ("lost_unsent", MAIN_LINK, "b") not in harness.heard.events
    assert harness.session().awaiting_acks


def test_silence_for_one_and_a_half_keepalives_drops_the_connection(harness: Harness) -> None:
    """Nothing from the broker for more than 1.5x keepalive: the socket is dropped and the
    session backs off; within it, paho's keepalive bookkeeping runs."""
    session = harness.connect()
    now = harness.now()
    session.last_read = now - 1.4 * 30
    harness.loop.check_timeouts(now)
    assert state_of(session) is State.CONNECTED
    assert harness.client().misc_calls == 1
    session.last_read = now - 1.6 * 30
    harness.loop.check_timeouts(now)
    assert state_of(session) is State.BACKOFF
    kind, _, (reason, was_up) = harness.heard.events[-1]
    assert (kind, was_up) == ("down", True)
    assert "1.5x keepalive" in reason


def test_no_connack_in_time_drops_the_handshake(harness: Harness) -> None:
    """A CONNECT left unanswered past the limit is a failed attempt."""
    session = harness.open()
    harness.turn()
    harness.loop.check_timeouts(session.handshake_since + 60)
    assert state_of(session) is State.BACKOFF
    assert session.failures == 1
    assert "no CONNACK" in (session.last_error or "")


def test_a_stall_is_detected_at_the_per_entry_limit_and_cleared_by_an_ack(harness: Harness) -> None:
    """paho holding MAX_PENDING_PER_ENTRY messages of one entry is a stall; the connection
    still counts as up; the first acknowledgement clears it."""
    session = harness.connect()
    for _ in range(MAX_PENDING_PER_ENTRY - 1):
        assert harness.loop.publish(MAIN_LINK, "t/e", b"x", 1, False, "e")
    assert state_of(session) is State.CONNECTED
    assert not session.saturated("e")
    assert harness.loop.publish(MAIN_LINK, "t/e", b"x", 1, False, "e")
    assert state_of(session) is State.STALLED
    assert session.saturated("e")
    assert session.is_up
    harness.client().ack(1)
    assert state_of(session) is State.CONNECTED
    assert ("published", MAIN_LINK, "e") in harness.heard.events


def test_a_stall_survives_a_reconnect_while_paho_still_holds_the_messages(harness: Harness) -> None:
    """QoS 1 messages resent after a reconnect still count: the new connection starts
    STALLED."""
    session = harness.connect()
    for _ in range(MAX_PENDING_PER_ENTRY):
        harness.loop.publish(MAIN_LINK, "t/e", b"x", 1, False, "e")
    harness.client().socket_lost()
    harness.turn()
    harness.client().connack()
    assert state_of(session) is State.STALLED


# ---- the three ways to end a connection ----------------------------------------------------
WILL = Will("t/e", b'{"online":0}', 1, True)
NEW_WILL = Will("t/e", b'{"online":0,"v":2}', 1, True)


def test_close_announcing_on_mqtt5_disconnects_with_reason_4(harness: Harness) -> None:
    """MQTT 5 without a will delay: DISCONNECT 0x04, the broker publishes the will; the
    session is forgotten once the socket closes."""
    key = LinkKey("e")
    harness.connect()
    session = harness.connect(key, WILL)
    harness.loop.close_announcing(key)
    assert state_of(session) is State.CLOSING
    client = harness.client(key)
    assert client.disconnects == [4]
    client.socket_lost()
    assert harness.loop.get(key) is None
    assert harness.heard.events[-1] == ("closed", key, None)


def test_close_announcing_on_mqtt311_publishes_the_will_then_disconnects() -> None:
    """MQTT 3.1.1: the offline payload is published by the service, and the DISCONNECT
    waits for its acknowledgement."""
    h = Harness(protocol="3.1.1")
    try:
        key = LinkKey("e")
        h.connect()
        h.connect(key, WILL)
        h.loop.close_announcing(key)
        client = h.client(key)
        assert client.published == [(WILL.topic, WILL.payload, WILL.qos, WILL.retain)]
        assert client.disconnects == []
        client.ack(1)
        assert client.disconnects == [None]
    finally:
        h.close()


def test_close_quietly_disconnects_without_the_will(harness: Harness) -> None:
    """An entry moved to the main connection: a normal DISCONNECT, nothing published."""
    key = LinkKey("e")
    harness.connect()
    harness.connect(key, WILL)
    harness.loop.close_quietly(key)
    client = harness.client(key)
    assert client.disconnects == [None]
    assert client.published == []
    client.socket_lost()
    assert harness.loop.get(key) is None


def test_renew_reconnects_with_the_new_will(harness: Harness) -> None:
    """A new will: DISCONNECT without it, then a fresh client with the new will, due at once,
    and the same session (its backoff and conflict history) stays."""
    key = LinkKey("e")
    harness.connect()
    session = harness.connect(key, WILL)
    old = harness.client(key)
    harness.loop.renew(key, NEW_WILL)
    assert state_of(session) is State.RENEWING
    assert old.disconnects == [None]
    old.socket_lost()
    assert state_of(session) is State.BACKOFF
    assert harness.loop.get(key) is session
    assert harness.client(key) is not old
    assert harness.client(key).will == NEW_WILL
    assert session.due <= harness.now()
    assert "closed" not in harness.heard.kinds(key)


def test_a_templated_will_is_rendered_before_every_connect_attempt(harness: Harness) -> None:
    """A will with a renderer is rendered for the client id before each CONNECT, again after a
    loss, and the session holds what the broker was given (issue 13, templated values)."""
    renders: list[str] = []

    def render(client_id: str) -> bytes:
        renders.append(client_id)
        return f'{{"online":0,"n":{len(renders)}}}'.encode()

    key = LinkKey("e")
    harness.connect()
    session = harness.connect(key, Will("t/e", b'{"online":0,"n":"{{seq}}"}', 1, True, render))
    assert renders == ["fake/e"]
    assert harness.client(key).will == Will("t/e", b'{"online":0,"n":1}', 1, True)
    assert session.will == Will("t/e", b'{"online":0,"n":1}', 1, True)  # what the broker holds

    harness.client(key).socket_lost()
    harness.turn()
    assert renders == ["fake/e", "fake/e"]
    assert harness.client(key).will == Will("t/e", b'{"online":0,"n":2}', 1, True)


def test_renew_in_backoff_rebuilds_at_once(harness: Harness) -> None:
    """No socket to close: the new client is built right away."""
    key = LinkKey("e")
    session = harness.open(key, WILL)
    harness.loop.renew(key, NEW_WILL)
    assert state_of(session) is State.BACKOFF
    assert harness.client(key).will == NEW_WILL


def test_close_after_renew_wins(harness: Harness) -> None:
    """A close request while renewing: the session is forgotten instead of reconnected."""
    key = LinkKey("e")
    harness.connect()
    harness.connect(key, WILL)
    harness.loop.renew(key, NEW_WILL)
    harness.loop.close_announcing(key)
    harness.client(key).socket_lost()
    assert harness.loop.get(key) is None


def test_a_close_while_connecting_says_goodbye_on_the_fresh_socket(harness: Harness) -> None:
    """Closed while the connector runs: once the socket is up, DISCONNECT goes out on it, and
    no CONNACK that crosses it makes the session connected."""
    session = harness.open()
    harness.connector.held = True
    harness.turn()  # the connector has the client now, and is still connecting
    harness.loop.close_quietly(MAIN_LINK)
    assert state_of(session) is State.CLOSING
    client = harness.client()
    harness.connector.release()  # the TCP connect succeeds
    harness.turn(due_now=False)  # the loop adopts the fresh socket
    assert client.disconnects == [None]
    client.connack()
    assert state_of(session) is State.CLOSING
    assert "up" not in harness.heard.kinds(MAIN_LINK)
    client.socket_lost()
    assert harness.loop.get(MAIN_LINK) is None


def test_a_close_in_backoff_forgets_the_session_at_once(harness: Harness) -> None:
    """No socket: nothing to send, the session is gone and the listener hears it."""
    harness.open()
    harness.loop.close_announcing(MAIN_LINK)
    assert harness.loop.get(MAIN_LINK) is None
    assert harness.heard.events == [("closed", MAIN_LINK, None)]


def test_a_disconnect_that_cannot_be_sent_times_out(harness: Harness) -> None:
    """CLOSING for longer than the limit: the socket is dropped and the session forgotten."""
    session = harness.connect()
    harness.loop.close_quietly(MAIN_LINK)
    harness.loop.check_timeouts(session.closing_since + 60)
    assert harness.loop.get(MAIN_LINK) is None


# ---- call_and_wait: the main loop reads what the network thread owns ------------------------
def _started_loop() -> NetworkLoop:
    loop = NetworkLoop(BrokerSettings(client_id="fake"), Heard())
    loop.start()
    return loop


def test_call_and_wait_runs_on_the_network_thread_and_returns_its_result() -> None:
    loop = _started_loop()
    try:
        assert loop.call_and_wait(lambda: threading.current_thread().name, 5.0) == "mqtt-network"
        with pytest.raises(ZeroDivisionError):
            loop.call_and_wait(lambda: 1 // 0, 5.0)
    finally:
        loop.stop(5.0)


def test_call_and_wait_runs_on_the_caller_when_the_loop_is_not_running() -> None:
    loop = NetworkLoop(BrokerSettings(client_id="fake"), Heard())
    here = threading.current_thread().name
    assert loop.call_and_wait(lambda: threading.current_thread().name, 5.0) == here


def test_call_and_wait_does_not_wait_longer_than_its_timeout_for_a_wedged_loop() -> None:
    """The network thread stuck in a command: the caller gets the answer computed itself, and
    the queued call, cancelled, never runs once the loop comes back."""
    loop = _started_loop()
    release, stuck = threading.Event(), threading.Event()
    ran_on: list[str] = []

    def wedge() -> None:
        stuck.set()
        release.wait(30)

    def where() -> str:
        ran_on.append(threading.current_thread().name)
        return ran_on[-1]

    try:
        loop.call_soon(wedge)
        assert stuck.wait(5)
        assert loop.call_and_wait(where, 0.2) == threading.current_thread().name
        release.set()
        assert loop.call_and_wait(lambda: "back", 5.0) == "back"  # the loop turned since
        assert ran_on == [threading.current_thread().name]
    finally:
        release.set()
        loop.stop(5.0)
