"""The network thread: one selector (epoll) loop that drives every Link.

paho's own `loop_start()` runs a thread per client and uses select(), which fails silently past
file descriptor 1024 (paho #819, #238). Instead this loop drives all clients through paho's
external-loop API (`loop_read`, `loop_write`, `loop_misc`, the socket callbacks) and does the
reconnecting itself, with backoff and a rate limit on connection attempts.

Threads: everything here runs on the network thread, except `call_soon` (any thread) and the
blocking `client.reconnect()` (a connector thread, while the link is CONNECTING and the network
thread does not touch it).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from scheduler_publisher.link import (
    DISCONNECT_WITH_WILL,
    MAIN_LINK,
    Link,
    LinkCallbacks,
    LinkKey,
    LinkState,
    Will,
    describe_error,
)
from scheduler_publisher.logs import get_logger
from scheduler_publisher.settings import BrokerSettings

log = get_logger("scheduler_publisher.network")

MISC_PERIOD = 1.0  # keepalive bookkeeping for every link, once a second
# paho alone notices a dead path only ~2x keepalive after the last byte (PINGREQ after one
# keepalive of silence, give up one keepalive later). The broker sends PINGRESP within a round
# trip of our PINGREQ, so silence for 1.5x keepalive already means the path is gone.
SILENCE_LIMIT = 1.5
CONNECTOR_THREADS = 4
# A connection that the broker ends within STABLE_AFTER seconds although it accepted it at
# the first attempt is a "flap"; FLAP_LIMIT flaps in a row mean another client is most likely
# using the same client id (Mosquitto 2.0 closes the older one without a DISCONNECT, so only
# an MQTT 5 broker that sends reason 0x8E says so outright).
STABLE_AFTER = 30.0
FLAP_LIMIT = 3


class LinkListener(Protocol):
    """What the connection manager hears from the loop; all on the network thread."""

    def link_up(self, link: Link) -> None: ...
    def link_down(self, link: Link, reason: str, was_up: bool) -> None: ...
    def link_refused(self, link: Link, reason: str) -> None: ...
    def link_closed(self, link: Link) -> None: ...
    def published(self, link: Link, entry_id: str | None, qos: int,
                  failure: str | None) -> None: ...
    def lost_unsent(self, link: Link, entry_id: str | None) -> None: ...


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
    def __init__(self, settings: BrokerSettings, listener: LinkListener) -> None:
        self.settings = settings
        self.listener = listener
        self.links: dict[LinkKey, Link] = {}
        self.heartbeat = time.monotonic()
        # The selector and the wake-up pipe are made by start(): no descriptors are held by a
        # loop that never runs.
        self._selector: selectors.BaseSelector
        self._wake_r: int
        self._wake_w: int
        self._commands: deque[Callable[[], None]] = deque()
        self._wake_pending = False
        self._closed = True  # no wake-up pipe (not started, or stopped); commands still queue
        self._want_write: set[Link] = set()
        self._farewells: dict[Link, int] = {}  # closing link -> mid of its offline announcement
        self._refused: dict[Link, str] = {}  # link -> the broker's CONNACK refusal, until closed
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connector = ThreadPoolExecutor(CONNECTOR_THREADS, thread_name_prefix="mqtt-connect")
        self._bucket = TokenBucket(settings.connect_rate, max(1.0, settings.connect_rate / 10),
                                   time.monotonic())
        self._next_misc = 0.0
        self._next_connect_check = 0.0  # earliest `due` of any WAITING link

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mqtt-network", daemon=True)
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the network thread. Cheap enough for every publish: one wake-up write per
        batch, not per call (the flag is cleared by the loop before it drains the queue)."""
        self._commands.append(fn)
        if self._closed:
            return  # no pipe: before start() the thread runs the queue when it starts
        if not self._wake_pending:
            self._wake_pending = True
            # A full pipe means wake-ups are pending already: the loop is bound to wake.
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def stop(self, timeout: float) -> None:
        if self._thread is None or self._closed:
            return  # never started, or stopped already: nothing runs, nothing is open
        self._stopping.set()
        self.call_soon(lambda: None)
        self._thread.join(timeout)
        self._connector.shutdown(wait=False, cancel_futures=True)
        if not self._thread.is_alive():
            # Closed here, after the join, never by the loop itself: a call_soon racing the
            # loop's exit would otherwise write to a closed (or reused) descriptor.
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    # ---- network thread ---------------------------------------------------------------------
    def open(self, key: LinkKey, client_id: str, will: Will | None) -> Link:
        link = Link(key, client_id, will, self.settings, self._callbacks())
        self.links[key] = link
        self._wait(link, time.monotonic())
        return link

    def _wait(self, link: Link, due: float) -> None:
        link.state = LinkState.WAITING
        link.due = due
        self._next_connect_check = min(self._next_connect_check, due)

    def publish(self, link: Link, topic: str, payload: bytes, qos: int, retain: bool,
                entry_id: str | None) -> bool:
        try:
            info = link.client.publish(topic, payload, qos, retain)
        except ValueError as exc:  # payload too large, bad topic: paho raises before queueing
            log.error("publish_rejected", topic=topic, entry_id=entry_id, error=str(exc))
            return False
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        link.track(info.mid, entry_id, qos)
        return True

    def close(self, link: Link, *, with_will: bool, reopen: Will | bool | None = False) -> None:
        """Close a link. `with_will`: subscribers see its will (graceful offline announcement).
        `reopen`: a Will (or None for no will) to rebuild the client with, then reconnect."""
        link.close_with_will = with_will
        link.reopen_after_close = reopen is not False
        if link.reopen_after_close:
            link.will = reopen if isinstance(reopen, Will) else None
        if link.state is LinkState.CONNECTED:
            self._disconnect(link)
        elif link.state is LinkState.HANDSHAKE:
            link.state = LinkState.CLOSING
            link.closing_since = time.monotonic()
            link.client.disconnect()
            self._flush(link)
        elif link.state is LinkState.CONNECTING:
            link.state = LinkState.CLOSING  # _adopt sees it and closes the fresh socket
        elif link.state is LinkState.WAITING:
            self._finish_close(link)

    def _disconnect(self, link: Link) -> None:
        will = link.will
        link.state = LinkState.CLOSING
        link.closing_since = time.monotonic()
        if link.close_with_will and will is not None:
            if link.is_v5 and self.settings.will_delay == 0:
                # MQTT 5: reason 0x04 makes the broker publish the will itself.
                link.client.disconnect(reasoncode=DISCONNECT_WITH_WILL)
                self._flush(link)
                return
            # MQTT 3.1.1 (or a will delay the broker would honour): say it ourselves first.
            info = link.client.publish(will.topic, will.payload, will.qos, will.retain)
            if will.qos and info.rc == mqtt.MQTT_ERR_SUCCESS:
                # A DISCONNECT right behind a QoS 2 PUBLISH makes the broker discard it (it is
                # only forwarded on PUBREL): disconnect once the broker has acknowledged it.
                self._farewells[link] = info.mid
                self._flush(link)
                return
        link.client.disconnect()
        self._flush(link)

    def _finish_close(self, link: Link) -> None:
        self._want_write.discard(link)
        self._farewells.pop(link, None)
        if link.reopen_after_close and not self._stopping.is_set():
            link.reopen_after_close = False
            link.close_with_will = False
            link.rebuild(link.will)
            self._wait(link, time.monotonic())
            return
        link.state = LinkState.CLOSED
        if self.links.get(link.key) is link:
            del self.links[link.key]
        self.listener.link_closed(link)

    def _callbacks(self) -> LinkCallbacks:
        return LinkCallbacks(
            connected=self._on_connected,
            refused=self._on_refused,
            lost=self._on_lost,
            published=self._on_published,
            want_write=self._on_want_write,
            socket_closed=self._on_socket_closed,
        )

    def _on_connected(self, link: Link) -> None:
        link.state = LinkState.CONNECTED
        link.was_connected = True
        link.last_error = None
        link.warned_error = None
        link.broker_reason = None
        link.connected_at = time.monotonic()
        link.quick_reconnect = link.backoff.failures <= 1
        if link.conflict is None:
            # While a client-id conflict is suspected the backoff keeps growing, so that two
            # processes knocking each other off slow down instead of flapping several times a
            # second (each flap also fires the will).
            link.backoff.reset()
        if link.key.is_main:
            self._next_connect_check = 0.0  # the entry links waited for it (see below)
        self.listener.link_up(link)

    def _on_refused(self, link: Link, reason: str) -> None:
        # paho closes the socket right after a refused CONNACK, and its on_disconnect names
        # only a generic "Protocol error": report the broker's reason once, from _on_lost, when
        # the retry is scheduled (so the failure carries the real delay).
        self._refused[link] = reason

    def _on_lost(self, link: Link, reason: str, taken_over: bool = False) -> None:
        refused = self._refused.pop(link, None)
        if refused is not None and link.state is LinkState.HANDSHAKE:
            self._want_write.discard(link)
            link.last_error = refused
            self._retry_later(link)
            self.listener.link_refused(link, refused)
            return
        was_up = link.state is LinkState.CONNECTED
        for entry_id in link.drop_unsent_qos0():
            self.listener.lost_unsent(link, entry_id)
        self._want_write.discard(link)
        if link.state is LinkState.CLOSING:
            self._finish_close(link)
            return
        link.last_error = reason
        if was_up:
            self._judge_loss(link, reason, taken_over)
        self._retry_later(link)
        self.listener.link_down(link, reason, was_up)

    @staticmethod
    def _judge_loss(link: Link, reason: str, taken_over: bool) -> None:
        """Suspect a client-id conflict on the broker's word (MQTT 5 reason 0x8E) or on the
        pattern it leaves when it gives no reason: short-lived connections, each accepted again
        at the first try. A broker that names another reason has said what it was."""
        lived = time.monotonic() - link.connected_at
        if taken_over:
            link.conflict = f"the broker says another client took over client id {link.client_id}"
        elif link.broker_reason is None and lived < STABLE_AFTER and link.quick_reconnect:
            link.flaps += 1
            if link.flaps >= FLAP_LIMIT and link.conflict is None:
                link.conflict = (f"the broker closed this connection {link.flaps} times in a row "
                                 f"soon after accepting it ({reason}): another process is "
                                 f"probably using client id {link.client_id} (or the broker "
                                 "refuses something this connection sends)")
        elif lived >= STABLE_AFTER:
            link.flaps = 0

    def _retry_later(self, link: Link) -> None:
        self._wait(link, time.monotonic() + link.backoff.next_delay())

    def _on_published(self, link: Link, mid: int, failure: str | None) -> None:
        if self._farewells.get(link) == mid:
            del self._farewells[link]
            link.client.disconnect()  # queued; the loop flushes it after this read
            return
        entry_id, qos = link.settle(mid)
        self.listener.published(link, entry_id, qos, failure)

    def _on_want_write(self, link: Link) -> None:
        # A connector thread queues the CONNECT packet inside reconnect(); _adopt flushes it.
        if self.in_loop_thread:
            self._want_write.add(link)

    def _on_socket_closed(self, link: Link, sock: Any) -> None:
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

    def _iterate(self) -> None:
        now = time.monotonic()
        self.heartbeat = now
        timeout = max(0.0, min(self._next_misc, self._next_connect_check) - now)
        for key, mask in self._selector.select(0 if self._commands else timeout):
            if key.data is None:
                self._drain_wake()
            else:
                self._service_socket(key.data, mask)
        self._run_commands()
        self._flush_all()
        now = time.monotonic()
        self._start_due_connects(now)
        if now >= self._next_misc:
            self._next_misc = now + MISC_PERIOD
            self._misc(now)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass  # drained

    def _run_commands(self) -> None:
        self._wake_pending = False  # before draining: a producer that appends now will wake us
        for _ in range(len(self._commands)):
            fn = self._commands.popleft()
            try:
                fn()
            except Exception:
                log.exception("network_command_failed")

    def _service_socket(self, link: Link, mask: int) -> None:
        client = link.client
        if mask & selectors.EVENT_READ:
            link.last_read = time.monotonic()
            client.loop_read()
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                client.loop_read()  # TLS may hold decrypted bytes that select() cannot see
                sock = client.socket()
        if mask & selectors.EVENT_WRITE:
            self._flush(link)

    def _flush_all(self) -> None:
        pending, self._want_write = self._want_write, set()
        for link in pending:
            self._flush(link)

    def _flush(self, link: Link) -> None:
        client = link.client
        client.loop_write()
        sock = client.socket()
        if sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        try:
            if self._selector.get_key(sock).events != events:
                self._selector.modify(sock, events, link)
        except (KeyError, ValueError):
            pass  # the socket closed while writing; _on_lost has run

    def _start_due_connects(self, now: float) -> None:
        if now < self._next_connect_check or self._stopping.is_set():
            return
        next_check = now + MISC_PERIOD
        # The main connection comes first, always: the entry links wait until it is up. A
        # broker's max_connections or a low `ulimit -n` then cannot be used up by lwt links
        # while the main connection (every other entry, and the status topic) has none.
        main = self.links.get(MAIN_LINK)
        entries_may_connect = main is not None and main.state is LinkState.CONNECTED
        for link in list(self.links.values()):
            if link.state is not LinkState.WAITING:
                continue
            if not (link.key.is_main or entries_may_connect):
                continue  # re-checked when the main link comes up (_on_connected)
            if link.due > now:
                next_check = min(next_check, link.due)
            elif self._bucket.take(now):
                link.state = LinkState.CONNECTING
                self._connector.submit(self._attempt, link)
            else:  # rate limited: come back when the bucket has a token again
                next_check = min(next_check, now + 1 / self._bucket.rate)
        self._next_connect_check = next_check

    def _attempt(self, link: Link) -> None:
        """Connector thread: the blocking TCP connect and TLS handshake."""
        try:
            link.client.reconnect()
        except Exception as exc:  # noqa: BLE001 - DNS, TCP, TLS, proxy: every failure is retried
            reason = describe_error(exc)
            self.call_soon(lambda: self._attempt_failed(link, reason))
            return
        self.call_soon(lambda: self._adopt(link))

    def _attempt_failed(self, link: Link, reason: str) -> None:
        link.last_error = reason
        if link.state is LinkState.CLOSING:
            self._finish_close(link)
            return
        self._retry_later(link)
        self.listener.link_refused(link, reason)

    def _adopt(self, link: Link) -> None:
        sock = link.client.socket()
        if sock is None:
            self._attempt_failed(link, "no socket after connect")
            return
        self._selector.register(sock, selectors.EVENT_READ, link)
        if link.state is LinkState.CLOSING:  # closed while connecting: say goodbye properly
            link.closing_since = time.monotonic()
            link.client.disconnect()
        else:
            link.state = LinkState.HANDSHAKE
            link.handshake_since = time.monotonic()
        self._flush(link)

    def _force_close(self, link: Link, reason: str) -> None:
        """Drop the socket without a DISCONNECT: the peer is not answering."""
        link.client._sock_close()  # paho has no public "drop the socket" call
        link.broker_reason = None
        self._on_lost(link, reason)

    def _misc(self, now: float) -> None:
        limit = max(2 * self.settings.connect_timeout, 5.0)
        for link in list(self.links.values()):
            if link.state is LinkState.HANDSHAKE and now - link.handshake_since > limit:
                self._force_close(link, "no CONNACK from the broker within "
                                  f"{limit:g} s")
            elif link.state is LinkState.CLOSING and now - link.closing_since > limit:
                self._force_close(link, "DISCONNECT could not be sent")
            elif link.state is LinkState.CONNECTED and self._silent(link, now):
                self._force_close(link, "no answer from the broker for 1.5x keepalive")
            elif link.state in (LinkState.CONNECTED, LinkState.CLOSING):
                link.client.loop_misc()
                if link.conflict is not None and now - link.connected_at >= STABLE_AFTER:
                    self._settled(link)

    @staticmethod
    def _settled(link: Link) -> None:
        """Up long enough: whoever shared the client id has gone."""
        link.conflict = None
        link.flaps = 0
        link.backoff.reset()

    @staticmethod
    def _silent(link: Link, now: float) -> bool:
        keepalive = link.client.keepalive  # the broker's Server Keep Alive once it set one
        return keepalive > 0 and now - link.last_read > SILENCE_LIMIT * keepalive

    def _close_all_sockets(self) -> None:
        for link in list(self.links.values()):
            sock = link.client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):  # not registered
                    self._selector.unregister(sock)
                sock.close()
        self._selector.close()
