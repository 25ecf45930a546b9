"""The network thread: one selector (epoll) loop that drives every Session's sockets.

paho's own `loop_start()` runs a thread per client and uses select(), which fails silently past
file descriptor 1024 (paho #819, #238). Instead this loop drives all clients through paho's
external-loop API (`loop_read`, `loop_write`, `loop_misc`, the socket callbacks) and does the
reconnecting itself, with backoff and a rate limit on connection attempts. Every change of a
session's state is an event fired on the session's table (session.py); this module decides
when each event happens and what goes with it (sockets, timers, the listener).

The interface to the rest of the service is narrow: `open`, `publish`, the three ways to end
a connection (`close_quietly`, `close_announcing`, `renew`), `get` / `sessions` to read a
session (`SessionView`), and the `SessionListener` it reports to.

`start` runs the loop on a thread of its own. `drive` instead makes the calling thread the
loop's and leaves the turns to the caller, one `turn(now)` at a time: with a `Connector` that
runs attempts inline and a fake client, a test walks a session through its states with no
thread, broker or clock of its own.

Threads: everything here runs on the network thread, except `call_soon` (any thread), the
read-only `get` / `sessions` (any thread) and the blocking `client.reconnect()` (a connector
thread, while the session is CONNECTING and the network thread does not touch it).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.mqtt.capabilities import (
    UNLIMITED,
    BrokerLimits,
    from_connack,
    from_refusal,
)
from scheduler_publisher.mqtt.client import (
    DISCONNECT_WITH_WILL,
    ResetAwareClient,
    describe_error,
    paho_client,
    publish_properties,
)
from scheduler_publisher.mqtt.descriptors import (
    DescriptorBudget,
    DescriptorsView,
    open_files_limit,
)
from scheduler_publisher.mqtt.session import (
    MAIN_LINK,
    STABLE_AFTER,
    Event,
    LinkKey,
    Session,
    SessionCallbacks,
    State,
    Will,
)
from scheduler_publisher.settings import BrokerSettings

log = get_logger("scheduler_publisher.network")  # the logger name users filter on: unchanged

_T = TypeVar("_T")
MISC_PERIOD = 1.0  # keepalive bookkeeping for every session, once a second
# paho alone notices a dead path only ~2x keepalive after the last byte (PINGREQ after one
# keepalive of silence, give up one keepalive later). The broker sends PINGRESP within a round
# trip of our PINGREQ, so silence for 1.5x keepalive already means the path is gone.
SILENCE_LIMIT = 1.5
CONNECTOR_THREADS = 4
# Failed attempts in a row of the main connection, after a loss or from the start, before
# every connection moves to the next broker of --broker's list (docs/design.md, "Failover").
FAILOVER_ATTEMPTS = 3
FLUSH_BYTES = 4096  # a phase group's packets leave in sends of about this size
ACK_LIMIT_MIN = 2.0  # seconds: the shortest wait for a PUBACK/PUBCOMP (keepalive 1 s)
RETAIN_FLAG = 0x01  # of a PUBLISH fixed header (MQTT 5 3.3.1.3)
TIMER_GRAIN = 0.001  # epoll_wait's resolution (it rounds timeouts up to whole milliseconds)
# An lwt connection's last_error while it waits (descriptors.py); /status shows it as the reason.
WAITING_FOR_DESCRIPTOR = "waiting for a file descriptor (open files limit)"


class Connector(Protocol):
    """Runs the blocking connect attempts off the loop's thread (a thread pool by default)."""

    def submit(self, fn: Callable[[Session], None], session: Session, /) -> object: ...
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


class SessionView(Protocol):
    """What the rest of the service may read of a session (any thread; never written)."""

    @property
    def key(self) -> LinkKey: ...
    @property
    def client_id(self) -> str: ...
    @property
    def state(self) -> State: ...
    @property
    def is_up(self) -> bool: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def conflict(self) -> str | None: ...
    @property
    def due(self) -> float: ...
    @property
    def failures(self) -> int: ...
    @property
    def connected_at(self) -> float: ...
    @property
    def handshake_since(self) -> float: ...
    @property
    def broker_reason(self) -> int | None: ...
    @property
    def may_blame_a_packet(self) -> bool: ...
    @property
    def awaiting_acks(self) -> bool: ...
    def saturated(self, entry_id: str) -> bool: ...


class SessionListener(Protocol):
    """What the connection manager hears from the loop; all on the network thread."""

    def link_up(self, session: SessionView) -> None: ...
    def link_down(self, session: SessionView, reason: str, was_up: bool) -> None: ...
    def link_refused(self, session: SessionView, reason: str) -> None: ...
    def link_closed(self, session: SessionView) -> None: ...
    def published(
        self, session: SessionView, entry_id: str | None, qos: int, failure: str | None
    ) -> None: ...
    def written(self, session: SessionView, entry_ids: list[str]) -> None: ...
    def lost_unsent(self, session: SessionView, entry_id: str | None) -> None: ...


class TokenBucket:
    """Spreads connection attempts over time so a start or a broker restart does not storm it."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class NetworkLoop:
    """Drives the sockets of every session. `make_client` builds paho clients (unit tests pass
    a fake one)."""

    def __init__(
        self,
        settings: BrokerSettings,
        listener: SessionListener,
        *,
        make_client: Callable[[Session], mqtt.Client] | None = None,
        connector: Connector | None = None,
        make_selector: Callable[[], selectors.BaseSelector] = selectors.DefaultSelector,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.brokers = settings.brokers
        # Network thread writes; any thread reads `endpoint` (one reference, swapped whole).
        self.endpoint = self.brokers[0]
        self._main_failures = 0  # failed attempts in a row on `endpoint`
        self.heartbeat = time.monotonic()
        self._make_client = make_client or paho_client
        self._make_selector = make_selector
        self._sessions: dict[LinkKey, Session] = {}
        # The selector and the wake-up pipe are made by start(): no descriptors are held by a
        # loop that never runs.
        self._selector: selectors.BaseSelector
        self._wake_r: int
        self._wake_w: int
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_pending = False
        self._closed = True  # no wake-up pipe (not started, or stopped); commands still queue
        self._want_write: set[Session] = set()
        self._farewells: dict[Session, int] = {}  # closing session -> mid of its offline message
        self._refused: dict[Session, str] = {}  # the broker's CONNACK refusal, until closed
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._driven = False  # drive(): the caller's thread runs the turns
        self._connector: Connector = connector or ThreadPoolExecutor(
            CONNECTOR_THREADS, thread_name_prefix="mqtt-connect"
        )
        self._bucket = TokenBucket(
            settings.connect_rate, max(1.0, settings.connect_rate / 10), time.monotonic()
        )
        self._next_misc = 0.0
        self._next_connect_check = 0.0  # earliest `due` of any session in BACKOFF
        # Descriptors the lwt connections may take (descriptors.py); sized when the loop starts.
        self._budget = DescriptorBudget(lambda: None)
        self._waiting: frozenset[LinkKey] = frozenset()  # due lwt links without a descriptor
        # What the broker can do, as learnt from its CONNACKs and PUBACKs; every publish and
        # will stays within it (capabilities.py). Network thread; others read the reference.
        self.limits = UNLIMITED
        # The one timer (call_at): the scheduler's next due job, run on this thread.
        self._timer_at = math.inf
        self._timer: Callable[[], None] | None = None
        # Housekeeping timers (call_later): (when, order, fn), soonest first.
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._later_order = itertools.count()

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._open_selector()
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def drive(self) -> None:
        """Make the calling thread the loop's own without starting one: the caller then runs
        the loop with `turn` and ends it with `stop`."""
        self._open_selector()
        self._thread = threading.current_thread()
        self._driven = True

    def _open_selector(self) -> None:
        self._budget = DescriptorBudget(open_files_limit)
        self._selector = self._make_selector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the network thread. Cheap enough for every publish: one wake-up write per
        batch, not per call (the flag is cleared by the loop before it drains the queue)."""
        self._commands.append(fn)
        if not self._wake_pending:
            self._wake()

    def call_and_wait(self, fn: Callable[[], _T], timeout: float) -> _T:
        """Any thread: `fn()` run on the network thread between two of its turns, so never in
        the middle of a phase group, and its result. Run on the calling thread instead when
        that is the network thread, when the loop is not running, or when it has not answered
        within `timeout`: a wedged loop must not hold its caller (the main loop) up."""
        if self.in_loop_thread or not self.is_alive():
            return fn()
        answer: Future[_T] = Future()

        def run() -> None:
            if answer.set_running_or_notify_cancel():
                try:
                    answer.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    answer.set_exception(exc)

        self.call_soon(run)
        try:
            return answer.result(timeout)
        except TimeoutError:
            answer.cancel()  # not run yet: it never will; running: its result is dropped
            return fn()

    def _wake(self) -> None:
        if self._closed:
            return  # no pipe: before start() the thread runs the queue when it starts
        self._wake_pending = True
        # A full pipe means wake-ups are pending already: the loop is bound to wake.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def stop(self, timeout: float) -> None:
        if self._thread is None or self._closed:
            return  # never started, or stopped already: nothing runs, nothing is open
        self._stopping.set()
        if self._driven:  # the caller's thread is the loop's: nothing to wake or join
            self._connector.shutdown(wait=False, cancel_futures=True)
            self._close_all_sockets()
            self._close_pipe()
            return
        self.call_soon(lambda: None)
        self._thread.join(timeout)
        self._connector.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            # Closed here, after the join, never by the loop itself: a call_soon racing the
            # loop's exit would otherwise write to a closed (or reused) descriptor.
            self._close_pipe()

    def _close_pipe(self) -> None:
        self._closed = True
        os.close(self._wake_r)
        os.close(self._wake_w)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def get(self, key: LinkKey) -> SessionView | None:
        """The session of `key`, to read (any thread: the dict is only ever changed whole-key
        by the network thread, and a reader copes with a session that has just gone)."""
        return self._sessions.get(key)

    @property
    def queued(self) -> int:
        """How many commands wait for the loop's thread (any thread; a reading)."""
        return len(self._commands)

    @property
    def timer_due(self) -> float:
        """When the one timer (`call_at`) is due, in monotonic seconds; `math.inf`: none."""
        return self._timer_at

    def sessions(self) -> list[SessionView]:
        return list(self._sessions.values())

    def descriptors(self) -> DescriptorsView:
        """The descriptor budget, and how many lwt connections wait for one (any thread)."""
        sessions = self._sessions
        waiting = sum(1 for key in self._waiting if key in sessions)
        return DescriptorsView(self._budget.limit, self._budget.reserve, waiting)

    # ---- network thread: what the manager asks for ------------------------------------------
    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Network thread: run `fn` on this thread once `time.monotonic()` reaches `when`, in
        the turn that then writes what it queued. One timer, the scheduler's: a later call
        replaces it, and `when` of `math.inf` cancels it."""
        self._timer_at = when
        self._timer = None if when == math.inf else fn

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Network thread: run `fn` on this thread once `delay` seconds have passed, give or
        take a loop turn. For housekeeping (a probe's verdict, a retry), as many as needed;
        the scheduler has the precise timer (`call_at`)."""
        heapq.heappush(self._later, (time.monotonic() + delay, next(self._later_order), fn))

    def ping(self, key: LinkKey, answered: Callable[[], None]) -> bool:
        """Network thread: send a PINGREQ on the link, and run `answered` at its PINGRESP
        (never, if the link goes first). The broker handles a connection's packets in order,
        so the answer proves it took everything written before. False: the link is not up,
        or its client cannot ping on demand."""
        session = self._sessions.get(key)
        if session is None or not session.is_up:
            return False
        client = session.client
        if not isinstance(client, ResetAwareClient):
            return False

        def pong() -> None:
            client.on_pong = None
            answered()

        client.on_pong = pong
        client.ping()
        self._want_write.add(session)
        return True

    def open(self, key: LinkKey, client_id: str, will: Will | None) -> None:
        session = Session(
            key,
            client_id,
            will,
            self.settings,
            self._callbacks(),
            max_retries=self.settings.max_retries if key.is_main else None,
            make_client=self._make_client,
            endpoint=self.endpoint,
        )
        self._sessions[key] = session
        self._wait(session, time.monotonic())

    def publish(
        self,
        key: LinkKey,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        entry_id: str | None,
        properties: Properties | None = None,
    ) -> bool:
        """Hand a message to the session's client (with an entry's MQTT 5 `properties`, if it
        has any); False if there is no such session or paho refuses it."""
        session = self._sessions.get(key)
        if session is None:
            return False
        limits = self.limits
        if limits is not UNLIMITED:  # [MQTT-3.2.2-11, -14]: never more than the broker takes
            qos, retain = limits.qos(qos), retain and limits.retain
        try:
            info = session.client.publish(topic, payload, qos, retain, properties)
        except ValueError as exc:  # payload too large, bad topic: paho raises before queueing
            log.error("publish_rejected", topic=topic, entry_id=entry_id, error=str(exc))
            return False
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        session.track(info.mid, entry_id, qos)
        return True

    def publish_packet(self, key: LinkKey, header: bytes, payload: bytes, entry_id: str) -> bool:
        """Queue an entry's pre-encoded QoS 0 PUBLISH (packet.py) on the session's socket,
        behind whatever paho has queued; written with the rest of this turn's packets in one
        `send()`. False if there is no such session or it has no socket."""
        session = self._sessions.get(key)
        if session is None or session.client.socket() is None:
            return False
        if header[0] & RETAIN_FLAG and not self.limits.retain:
            header = bytes((header[0] & ~RETAIN_FLAG,)) + header[1:]
        session.send_packet(header, payload, entry_id)
        if session.packets.unwritten_bytes() >= FLUSH_BYTES:
            self._flush(session)  # a large group: its first packets leave while the rest queue
        self._want_write.add(session)
        return True

    def close_quietly(self, key: LinkKey) -> None:
        """End the connection for good without its will (the entry moved elsewhere)."""
        self._request(key, Event.CLOSE_REQUESTED, announce=False)

    def close_announcing(self, key: LinkKey) -> None:
        """End the connection for good and let subscribers see its will (removed, or stop)."""
        self._request(key, Event.CLOSE_REQUESTED, announce=True)

    def renew(self, key: LinkKey, will: Will | None) -> None:
        """Close without the will and connect again with `will`: a will is fixed at CONNECT."""
        session = self._sessions.get(key)
        if session is not None:
            session.next_will = will
        self._request(key, Event.RENEW_REQUESTED, announce=False)

    def _request(self, key: LinkKey, event: Event, *, announce: bool) -> None:
        session = self._sessions.get(key)
        if session is None:
            return
        before = session.state
        session.announce_offline = announce
        after = session.fire(event)
        if before in (State.CONNECTED, State.STALLED):
            self._disconnect(session)
        elif before is State.HANDSHAKE:
            session.closing_since = time.monotonic()
            session.client.disconnect()
            self._flush(session)
        elif before in (State.BACKOFF, State.GIVEN_UP):
            self._closed_or_renewed(session, before, after)
        # CONNECTING: _adopt sees the new state and says goodbye on the fresh socket.
        # CLOSING, RENEWING: the DISCONNECT is on its way already.

    def _disconnect(self, session: Session) -> None:
        will = None if session.will is None else self.limits.fit(session.will)
        session.closing_since = time.monotonic()
        if session.announce_offline and will is not None:
            if session.is_v5 and self.settings.will_delay == 0:
                # MQTT 5: reason 0x04 makes the broker publish the will itself.
                session.client.disconnect(reasoncode=DISCONNECT_WITH_WILL)
                self._flush(session)
                return
            # MQTT 3.1.1 (or a will delay the broker would honour): say it ourselves first.
            info = _publish_offline(session, will)
            if will.qos and info.rc == mqtt.MQTT_ERR_SUCCESS:
                # A DISCONNECT right behind a QoS 2 PUBLISH makes the broker discard it (it is
                # only forwarded on PUBREL): disconnect once the broker has acknowledged it.
                self._farewells[session] = info.mid
                self._flush(session)
                return
        session.client.disconnect()
        self._flush(session)

    def _closed_or_renewed(self, session: Session, before: State, after: State) -> None:
        """The socket is gone after a close request: forget the session, or (renewing) build
        its new client and connect again at once."""
        self._want_write.discard(session)
        self._farewells.pop(session, None)
        if after is State.BACKOFF and before in (State.RENEWING, State.BACKOFF):
            if not self._stopping.is_set():
                session.rebuild()
                self._wait(session, time.monotonic())
                return
            after = session.fire(Event.CLOSE_REQUESTED)  # stopping: no new connection
        if after is State.CLOSED:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]
            self.listener.link_closed(session)

    def _wait(self, session: Session, due: float) -> None:
        session.due = due
        self._next_connect_check = min(self._next_connect_check, due)

    # ---- network thread: what paho reports --------------------------------------------------
    def _callbacks(self) -> SessionCallbacks:
        return SessionCallbacks(
            connected=self._on_connected,
            refused=self._on_refused,
            lost=self._on_lost,
            published=self._on_published,
            want_write=self._on_want_write,
            socket_closed=self._on_socket_closed,
        )

    def _on_connected(self, session: Session) -> None:
        if session.fire(Event.CONNACK_OK) is not State.CONNECTED:
            return  # the CONNACK crossed our DISCONNECT
        self._learn(from_connack(self.limits, session.connack_properties))
        session.restart_ack_clocks(time.monotonic())
        session.last_error = None
        session.broker_reason = None
        session.reset_by_broker = False
        session.connected_at = time.monotonic()
        if session.conflict is None:
            # While a client-id conflict is suspected the backoff keeps growing, so that two
            # processes knocking each other off slow down instead of flapping several times a
            # second (each flap also fires the will).
            session.backoff.reset()
        session.check_stall()  # QoS 1/2 messages paho resends count as before the loss
        if session.key.is_main:
            self._main_failures = 0
            self._next_connect_check = 0.0  # the entry sessions waited for it (see below)
        self.listener.link_up(session)

    def _on_refused(self, session: Session, reason: str) -> None:
        # paho closes the socket right after a refused CONNACK, and its on_disconnect names
        # only a generic "Protocol error": report the broker's reason once, from _on_lost, when
        # the retry is scheduled (so the failure carries the real delay).
        self._refused[session] = reason

    def _on_lost(
        self, session: Session, event: Event, reason: str, taken_over: bool = False
    ) -> None:
        refused = self._refused.pop(session, None)
        if refused is not None and session.state is State.HANDSHAKE:
            self._want_write.discard(session)
            session.last_error = refused
            session.fire(Event.CONNACK_REFUSED)
            self._retry_later(session, failed_attempt=True)
            if self._learn_from_refusal(session):
                self._wait(session, time.monotonic())  # at once, with the will fitted to it
            self.listener.link_refused(session, refused)
            self._count_failure(session, refused)
            return
        was_up = session.is_up
        self._report_written(session)  # written before the loss, in the write that lost it
        for entry_id in session.drop_unsent_qos0():
            self.listener.lost_unsent(session, entry_id)
        self._want_write.discard(session)
        before = session.state
        after = session.fire(event)
        if before in (State.CLOSING, State.RENEWING):
            self._closed_or_renewed(session, before, after)
            return
        session.last_error = reason
        if was_up:
            session.judge_loss(taken_over)
        self._retry_later(session, failed_attempt=not was_up)
        self.listener.link_down(session, reason, was_up)
        if not was_up:
            self._count_failure(session, reason)

    # ---- network thread: failover ------------------------------------------------------------
    def _count_failure(self, session: Session, reason: str) -> None:
        """A failed attempt of the main connection (reported already): the FAILOVER_ATTEMPTS-th
        in a row moves every connection to the next broker of the list."""
        if not session.key.is_main or len(self.brokers) < 2 or self._stopping.is_set():
            return
        self._main_failures += 1
        if self._main_failures >= FAILOVER_ATTEMPTS and session.state is State.BACKOFF:
            self.fail_over(f"{self._main_failures} connection attempts failed: {reason}")

    def fail_over(self, why: str) -> None:
        """Move every connection to the next broker, wrapping around, so that an entry's will
        and its publishes are never on two brokers: each leaves with its will (which the old
        broker publishes, if it is still up) and connects to the new one, which gets the
        births (connection.py, on link_up); the main connection first, as always."""
        before = self.endpoint
        self.endpoint = self.brokers[(self.brokers.index(before) + 1) % len(self.brokers)]
        self._main_failures = 0
        self.limits = UNLIMITED  # what the old broker lacked says nothing of the new one
        log.warning(
            "mqtt_broker_switched", **{"from": before.url, "to": self.endpoint.url, "why": why}
        )
        for session in list(self._sessions.values()):
            self._move(session)

    def _move(self, session: Session) -> None:
        session.endpoint = self.endpoint  # read by the next client it builds (rebuild)
        if session.state in (State.CLOSING, State.RENEWING, State.GIVEN_UP, State.CLOSED):
            return  # going away, or rebuilt with the new endpoint anyway
        session.next_will = session.will
        self._request(session.key, Event.RENEW_REQUESTED, announce=True)

    def _learn(self, limits: BrokerLimits) -> None:
        if limits != self.limits:
            self.limits = limits  # swapped whole: other threads read it without a lock

    def _learn_from_refusal(self, session: Session) -> bool:
        """A CONNACK refused for the will's QoS or retain flag: learnt, and whether it was."""
        before = self.limits
        learnt = from_connack(before, session.connack_properties)
        self._learn(from_refusal(learnt, session.connack_reason, session.sent_will))
        return self.limits != before

    def _retry_later(self, session: Session, *, failed_attempt: bool) -> None:
        session.schedule_retry(time.monotonic(), failed_attempt=failed_attempt)
        self._next_connect_check = min(self._next_connect_check, session.due)

    def _on_published(self, session: Session, mid: int, failure: str | None) -> None:
        if self._farewells.get(session) == mid:
            del self._farewells[session]
            session.client.disconnect()  # queued; the loop flushes it after this read
            return
        entry_id, qos = session.settle(mid)
        if qos == 2 and self.limits.max_qos == 2 and _acked_as_qos1(session):
            self._learn(self.limits.learnt("qos2", "PUBACK for a QoS 2 PUBLISH"))
        self.listener.published(session, entry_id, qos, failure)

    def _on_want_write(self, session: Session) -> None:
        # A connector thread queues the CONNECT packet inside reconnect(); _adopt flushes it.
        if self.in_loop_thread:
            self._want_write.add(session)

    def _on_socket_closed(self, _session: Session, sock: Any) -> None:
        if not self.in_loop_thread:
            return  # reconnect() closing a socket the loop already dropped
        # Never registered (closed during the handshake) or already gone: nothing to do.
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # ---- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not (self._stopping.is_set() and not self._commands):
            try:
                self._iterate()
            except Exception:  # the network thread must survive any bug in one iteration
                log.exception("network_loop_error")
        self._close_all_sockets()

    def turn(self, now: float) -> None:
        """One turn of the loop as of monotonic time `now`, without waiting, on the thread
        given by `drive`: the ready sockets, the queued commands (the connector's outcomes
        among them), the timer if due, the writes and every connect due by `now`. The thread
        `start` runs takes the same steps, with a wait, and `check_timeouts` once a second."""
        self.heartbeat = now
        self._poll(0)
        self._run_commands()
        if self._timer_at <= now:
            self._run_timer()
        self._run_later(now)
        self._flush_all()
        self._next_connect_check = 0.0  # look at every session: a caller may have moved `due`
        self._start_due_connects(now)
        self._run_commands()  # what an inline connector answered
        self._flush_all()

    def _poll(self, timeout: float) -> None:
        for key, mask in self._selector.select(timeout):
            if key.data is None:
                self._drain_wake()
            else:
                self._service_socket(key.data, mask)

    def _iterate(self) -> None:
        now = time.monotonic()
        self.heartbeat = now
        # epoll waits in whole milliseconds, rounded up: for the timer (the scheduler's next
        # phase group) it is woken one grain early, and the rest is slept precisely below.
        timer_wake = self._timer_at - TIMER_GRAIN
        later = self._later[0][0] if self._later else math.inf
        wake = min(self._next_misc, self._next_connect_check, timer_wake, later)
        self._poll(0 if self._commands else max(0.0, wake - now))
        self._run_commands()
        early = self._timer_at - time.monotonic()
        if early <= TIMER_GRAIN:
            if early > 0:
                time.sleep(early)  # under a millisecond: nanosleep, not epoll's rounding
            self._run_timer()
        self._run_later(time.monotonic())
        self._flush_all()  # whatever the commands and the timer queued: one send() a socket
        now = time.monotonic()
        self._start_due_connects(now)
        if now >= self._next_misc:
            self._next_misc = now + MISC_PERIOD
            self.check_timeouts(now)

    def _run_timer(self) -> None:
        fn, self._timer, self._timer_at = self._timer, None, math.inf
        if fn is not None:
            _run_safely(fn)

    def _run_later(self, now: float) -> None:
        while self._later and self._later[0][0] <= now:
            _run_safely(heapq.heappop(self._later)[2])

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # drained

    def _run_commands(self) -> None:
        self._wake_pending = False  # before draining: a producer that appends now will wake us
        for _ in range(len(self._commands)):
            _run_safely(self._commands.popleft())

    def _service_socket(self, session: Session, mask: int) -> None:
        client = session.client
        if mask & selectors.EVENT_READ:
            session.last_read = time.monotonic()
            client.loop_read()
            while buffered(client.socket()):
                client.loop_read()  # TLS may hold decrypted bytes that select() cannot see
        if mask & selectors.EVENT_WRITE:
            self._flush(session)

    def _flush_all(self) -> None:
        pending, self._want_write = self._want_write, set()
        for session in pending:
            self._flush(session)

    def _flush(self, session: Session) -> None:
        client = session.client
        client.loop_write()
        if session.packets.batches:
            self._report_written(session)
        sock = client.socket()
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        try:
            if self._selector.get_key(sock).events != events:
                self._selector.modify(sock, events, session)
        except (KeyError, ValueError):
            pass  # the socket closed while writing; _on_lost has run

    def _report_written(self, session: Session) -> None:
        written = session.written_packets()
        if written:
            self.listener.written(session, written)

    def _start_due_connects(self, now: float) -> None:
        if now < self._next_connect_check or self._stopping.is_set():
            return
        next_check = now + MISC_PERIOD  # also when waiting links look for a descriptor again
        # The main connection comes first, always: the entry sessions wait until it is up. A
        # broker's max_connections or a low `ulimit -n` then cannot be used up by lwt
        # connections while the main connection (every other entry, and the status topic) has
        # none.
        main = self._sessions.get(MAIN_LINK)
        entries_may_connect = main is not None and main.is_up
        waiting: list[Session] = []
        for session in list(self._sessions.values()):
            if session.state is not State.BACKOFF:
                continue
            if not (session.key.is_main or entries_may_connect):
                continue  # re-checked when the main session comes up (_on_connected)
            if session.due > now:
                next_check = min(next_check, session.due)
            elif not self._descriptor_for(session, now, waiting):
                waiting.append(session)
            elif self._bucket.take(now):
                self._begin_attempt(session)
            else:  # rate limited: come back when the bucket has a token again
                if not session.key.is_main:
                    self._budget.refund()
                next_check = min(next_check, now + 1 / self._bucket.rate)
        self._next_connect_check = next_check
        if entries_may_connect:  # else no entry asked for a descriptor: the last word stands
            self._note_waiting(waiting)

    def _descriptor_for(self, session: Session, now: float, waiting: list[Session]) -> bool:
        """The main connection always gets one; an lwt connection only while the reserve stays
        free, and not before the ones that already wait in this pass (descriptors.py)."""
        return session.key.is_main or (not waiting and self._budget.admit(now))

    def _begin_attempt(self, session: Session) -> None:
        if session.last_error == WAITING_FOR_DESCRIPTOR:
            session.last_error = None
        session.fire(Event.BACKOFF_ELAPSED)
        session.render_will()
        session.fit_will(self.limits)
        self._connector.submit(self._attempt, session)

    def _note_waiting(self, waiting: list[Session]) -> None:
        """Mark the lwt links that wait for a descriptor; log once when links start to wait,
        and once when none waits any more: never once per attempt."""
        for session in waiting:
            session.last_error = WAITING_FOR_DESCRIPTOR
        before, self._waiting = self._waiting, frozenset(s.key for s in waiting)
        if self._waiting and not before:
            log.warning(
                "descriptors_short",
                links_waiting=len(waiting),
                open_files_limit=self._budget.limit,
                reserve=self._budget.reserve,
                hint="lwt connections beyond the open files limit wait; raise LimitNOFILE",
            )
        elif before and not self._waiting:
            log.info("descriptors_available", open_files_limit=self._budget.limit)

    def _attempt(self, session: Session) -> None:
        """Connector thread: the blocking TCP connect and TLS handshake."""
        try:
            session.client.reconnect()
        except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS, proxy: every failure is retried
            reason = describe_error(exc)
            self.call_soon(lambda: self._attempt_failed(session, reason))
            return
        self.call_soon(lambda: self._adopt(session))

    def _attempt_failed(self, session: Session, reason: str) -> None:
        session.last_error = reason
        before = session.state
        after = session.fire(Event.CONNECT_FAILED)
        if before in (State.CLOSING, State.RENEWING):
            self._closed_or_renewed(session, before, after)
            return
        self._retry_later(session, failed_attempt=True)
        self.listener.link_refused(session, reason)
        self._count_failure(session, reason)

    def _adopt(self, session: Session) -> None:
        sock = session.client.socket()
        if sock is None:
            self._attempt_failed(session, "no socket after connect")
            return
        _no_delay(sock)
        self._selector.register(sock, selectors.EVENT_READ, session)
        if session.fire(Event.SOCKET_OPENED) is State.HANDSHAKE:
            session.handshake_since = time.monotonic()
        else:  # closed (or renewed) while connecting: say goodbye properly
            session.closing_since = time.monotonic()
            session.client.disconnect()
        self._flush(session)

    def _force_close(self, session: Session, event: Event, reason: str) -> None:
        """Drop the socket without a DISCONNECT: the peer is not answering."""
        session.client._sock_close()  # paho has no public "drop the socket" call
        session.broker_reason = None
        session.reset_by_broker = False
        session.dropped_by_broker = False
        self._on_lost(session, event, reason)

    def check_timeouts(self, now: float) -> None:
        """On the loop's thread: drop the sessions whose CONNACK, DISCONNECT or broker has
        been silent too long as of `now`, and run paho's keepalive bookkeeping for the rest.
        The loop's own thread runs it once a second."""
        limit = max(2 * self.settings.connect_timeout, 5.0)
        for session in list(self._sessions.values()):
            state = session.state
            if state is State.HANDSHAKE and now - session.handshake_since > limit:
                self._force_close(
                    session, Event.CONNACK_TIMEOUT, f"no CONNACK from the broker within {limit:g} s"
                )
            elif state in (State.CLOSING, State.RENEWING) and now - session.closing_since > limit:
                self._force_close(session, Event.CLOSE_TIMEOUT, "DISCONNECT could not be sent")
            elif session.is_up and self._silent(session, now):
                self._force_close(
                    session, Event.SILENCE_TIMEOUT, "no answer from the broker for 1.5x keepalive"
                )
            elif session.is_up or state in (State.CLOSING, State.RENEWING):
                session.client.loop_misc()
                if session.is_up and session.ack_since:
                    self._expire_unacknowledged(session, now)
                if session.conflict is not None and now - session.connected_at >= STABLE_AFTER:
                    session.settled()

    def _expire_unacknowledged(self, session: Session, now: float) -> None:
        """QoS 1/2 messages the broker has not acknowledged within two keepalives, though it
        answered since (or the silence timeout, at 1.5, would have closed the connection): an
        error of their entry, said once per entry and connection, and no longer held, so that
        one stuck message cannot stall its entry for good. paho keeps them, and sends them
        again on the next connection, as MQTT asks (3.3.4)."""
        limit = max(ACK_LIMIT_MIN, 2 * session.client.keepalive)
        for mid in session.overdue(now, limit):
            entry_id, qos = session.settle(mid)
            reason = f"not acknowledged by the broker within {limit:g} s"
            if entry_id is not None and entry_id not in session.unacked_said:
                session.unacked_said.add(entry_id)
                log.warning(
                    "publish_unacknowledged",
                    entry_id=entry_id,
                    qos=qos,
                    waited_s=limit,
                    hint="counted as an error of the entry; said once per entry and connection",
                )
            self.listener.published(session, entry_id, qos, reason)

    @staticmethod
    def _silent(session: Session, now: float) -> bool:
        keepalive = session.client.keepalive  # the broker's Server Keep Alive once it set one
        return keepalive > 0 and now - session.last_read > SILENCE_LIMIT * keepalive

    def _close_all_sockets(self) -> None:
        for session in list(self._sessions.values()):
            sock = session.client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):  # not registered
                    self._selector.unregister(sock)
                sock.close()
        self._selector.close()


def _run_safely(fn: Callable[[], None]) -> None:
    """A command, the timer or a housekeeping call: a bug in one never stops the loop."""
    try:
        fn()
    except Exception:
        log.exception("network_command_failed")


def _acked_as_qos1(session: Session) -> bool:
    """The broker answered a QoS 2 PUBLISH of this client with a PUBACK (client.py)."""
    return bool(getattr(session.client, "qos2_acked_as_qos1", False))


def _publish_offline(session: Session, will: Will) -> mqtt.MQTTMessageInfo:
    """The will, published by the service itself: with its properties, if it has any (MQTT 5)."""
    if will.properties is None or not session.is_v5:
        return session.client.publish(will.topic, will.payload, will.qos, will.retain)
    return session.client.publish(
        will.topic, will.payload, will.qos, will.retain, publish_properties(will.properties)
    )


def buffered(sock: Any) -> bool:
    """Whether `sock` holds bytes already read from the kernel, which select() cannot see: an
    SSL socket's decrypted bytes, and, over wss://, those of the SSL socket under paho's
    WebSocket wrapper (its pending() asks that socket; it keeps no other bytes between
    reads: a frame it has begun stays in its buffer and is parsed on the next read)."""
    pending = getattr(sock, "pending", None)
    return callable(pending) and bool(pending())


def _no_delay(sock: Any) -> None:
    """Turn Nagle's algorithm off. paho leaves it on and writes one packet per send(): a small
    PINGREQ then waits for the broker's delayed ACK, and every publish queued behind it is held
    ~40 ms (measured in docs/design.md, "Keepalive stalls and TCP_NODELAY"). paho's WebSocket
    wrapper has no setsockopt(): the option is set through a duplicate of its descriptor (the
    same TCP socket)."""
    with contextlib.suppress(OSError):  # not TCP (a unix socket) or already gone
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
