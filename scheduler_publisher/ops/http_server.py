"""The HTTP listening socket: a bounded number of threads whatever the clients do.

- the "http" thread owns every socket from accept to hand-over, without blocking: it reads
  each request's head (and counts and drops its body) against one deadline per connection,
  set at accept, and writes what a reply's first send left over against another. A slow or
  silent client costs a buffer here, never a thread, and is cut off at its deadline however
  it trickles; beyond MAX_WAITING (MAX_WRITING) such connections the oldest is closed;
- only complete requests reach a worker: one "http-probe" thread answers the probe paths
  (`/health`, `/ready`), HTTP_WORKERS "http-worker" threads the rest, so a probe never waits
  behind a reload or a big `/status`. When a lane's workers and queue are all taken, a new
  request gets a 503 at once;
- a handler reads the buffered request and writes its reply to memory (`Exchange`); the
  worker sends it without blocking and leaves the rest to the "http" thread;
- an accept() that fails for want of descriptors or memory backs off instead of spinning.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from io import BytesIO
from typing import Any, cast
from urllib.parse import urlsplit

from scheduler_publisher.logs.setup import get_logger

__all__ = [
    "HTTP_QUEUE",
    "HTTP_WORKERS",
    "MAX_BODY",
    "MAX_HEAD",
    "MAX_WAITING",
    "MAX_WRITING",
    "BoundedHTTPServer",
    "Exchange",
    "body_length",
]

log = get_logger("scheduler_publisher.http")

HTTP_WORKERS = 4
HTTP_QUEUE = 16  # complete requests waiting for a worker; beyond this: 503
PROBE_QUEUE = 16  # the same for the probe thread
MAX_WAITING = 256  # connections whose request is not complete; beyond, the oldest is closed
MAX_WRITING = 32  # replies the client is slow to take; beyond, the oldest is closed
MAX_HEAD = 32 * 1024  # request line and headers; http.server's own limit is 64 KB a line
MAX_BODY = 64 * 1024  # no endpoint reads a body: counted and dropped
RECV_SIZE = 64 * 1024
LISTEN_BACKLOG = 128
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_LOG_PERIOD = 60.0
# accept() fails with these while the process or the system is out of descriptors or memory.
# The pending connection stays queued, so the listening socket stays readable: retrying at
# once would spin a core (issue: "one HTTP connect can pin a core").
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Complete requests (socket, peer address, head) for a kind of worker; None stops one.
Lane = queue.Queue[tuple[socket.socket, Any, bytes] | None]
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.I | re.M)


def _canned(status: str, error: str, extra: str = "") -> bytes:
    body = f'{{"error": "{error}"}}'
    return (
        f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


_BUSY = _canned(
    "503 Service Unavailable", "too many requests in progress; try again", "Retry-After: 1\r\n"
)
_HEAD_TOO_LARGE = _canned(
    "431 Request Header Fields Too Large", f"request line and headers: at most {MAX_HEAD} bytes"
)


def body_length(text: str) -> int:
    """A Content-Length value as a byte count; ValueError for anything but ASCII digits
    (`int()` also takes "1_0", " 10" and other scripts' digits, and raises on 5,000 digits)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ValueError(f"Content-Length: expected a byte count, got {text[:40]!r}")
    return int(text)


def _declared_body(head: bytes | bytearray) -> int:
    """The body to read after the head: 0 when Content-Length is missing, garbled or over
    MAX_BODY (the handler answers those with 400 or 413, and the connection is closed)."""
    found = _CONTENT_LENGTH.search(head)
    if found is None:
        return 0
    try:
        length = body_length(found.group(1).decode("latin-1"))
    except ValueError:
        return 0
    return length if length <= MAX_BODY else 0


def _head_end(buffer: bytearray, start: int) -> int | None:
    """Where the blank line after the headers ends (http.server takes LF as CRLF), or None."""
    ends = [
        found + len(mark)
        for mark in (b"\r\n\r\n", b"\n\n", b"\n\r\n")
        if (found := buffer.find(mark, start)) >= 0
    ]
    return min(ends) if ends else None


@dataclass(slots=True)
class _Incoming:
    """A request being read, owned by the "http" thread."""

    address: Any
    deadline: float
    head: bytearray = field(default_factory=bytearray)
    body_left: int | None = None  # None while the head is incomplete

    def feed(self, data: bytes) -> bool:
        """True once the head and the declared body have arrived; raises OverflowError when
        the head outgrows MAX_HEAD."""
        if self.body_left is not None:
            self.body_left = max(0, self.body_left - len(data))
            return self.body_left == 0
        start = max(0, len(self.head) - 3)  # a mark may straddle two reads
        self.head += data
        end = _head_end(self.head, start)
        if (end or len(self.head)) > MAX_HEAD:
            raise OverflowError
        if end is None:
            return False
        early_body = len(self.head) - end
        del self.head[end:]
        self.body_left = max(0, _declared_body(self.head) - early_body)
        return self.body_left == 0


@dataclass(slots=True)
class _Outgoing:
    """The part of a reply the client has not taken yet, owned by the "http" thread."""

    data: memoryview
    deadline: float


class Exchange:
    """What a handler takes for its socket: the request as the "http" thread read it, and a
    buffer for the reply. It has what BaseHTTPRequestHandler uses of a socket (`makefile`
    for reading, `sendall`), so a stdlib handler works unchanged and never blocks."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self.reply = bytearray()

    def makefile(self, mode: str = "rb", buffering: int = -1) -> BytesIO:
        if mode != "rb":
            raise ValueError(
                f"Exchange.makefile: only 'rb' (the reply goes to sendall), got {mode!r}"
            )
        return BytesIO(self._request)

    def sendall(self, data: bytes) -> None:
        self.reply += data

    def settimeout(self, timeout: float | None) -> None:
        return  # nothing here blocks

    def setsockopt(self, *args: Any) -> None:
        return  # the real socket's options are the server's


def _family(host: str) -> socket.AddressFamily:
    """IPv6 for an IPv6 literal, or a name with only IPv6 addresses; IPv4 otherwise (a name
    with both, such as localhost, binds IPv4, as it always has)."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return socket.AF_INET6 if literal.version == 6 else socket.AF_INET
    try:
        found = {info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return socket.AF_INET  # the bind fails and says why
    return socket.AF_INET6 if found == {socket.AF_INET6} else socket.AF_INET


def _send_some(conn: socket.socket, data: memoryview) -> int | None:
    """Sends what the socket takes now; how much, or None when the client is gone."""
    sent = 0
    try:
        while sent < len(data):
            sent += conn.send(data[sent:])
    except BlockingIOError:
        pass
    except OSError:
        return None
    return sent


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.recv(RECV_SIZE)  # what is left unread, so that close() does not reset the line
    except OSError:
        pass  # gone, or nothing to read
    conn.close()


class BoundedHTTPServer(HTTPServer):
    """HTTPServer with bounded threads, deadlines per connection, a lane for probes, and an
    accept that backs off. IPv6 when the address asks for it (`::` serves IPv4 too)."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        request_timeout: float,
        probe_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.address_family = _family(address[0])
        super().__init__(address, handler)
        self.socket.setblocking(False)
        self.request_timeout = request_timeout
        self.probe_paths = probe_paths
        self._stopping = threading.Event()
        self._jobs: Lane = queue.Queue(HTTP_QUEUE)
        self._probes: Lane = queue.Queue(PROBE_QUEUE)
        # Both by arrival, so the oldest (the first deadline) comes first.
        self._reading: dict[socket.socket, _Incoming] = {}
        self._writing: dict[socket.socket, _Outgoing] = {}
        self._handed_back: queue.SimpleQueue[tuple[socket.socket, memoryview]] = queue.SimpleQueue()
        self._waker, self._wake_end = socket.socketpair()
        self._waker.setblocking(False)
        self._wake_end.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._paused_until: float | None = None
        self._backoff = ACCEPT_BACKOFF_MIN
        self._failed_accepts = 0  # in a row, in the current episode
        self._logged_failure_at: float | None = None
        self._episode_logged = False
        self._threads = self._make_threads()

    def _make_threads(self) -> list[threading.Thread]:
        lanes = [(self._probes, "http-probe")]
        lanes += [(self._jobs, f"http-worker-{i}") for i in range(HTTP_WORKERS)]
        return [threading.Thread(target=self._serve, name="http", daemon=True)] + [
            threading.Thread(target=self._work, args=(lane,), name=name, daemon=True)
            for lane, name in lanes
        ]

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # `::` then takes IPv4 clients as well, whatever net.ipv6.bindv6only says.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        self._threads[0].join(2)
        for lane, workers in ((self._probes, 1), (self._jobs, HTTP_WORKERS)):
            for _ in range(workers):
                try:
                    lane.put_nowait(None)
                except queue.Full:
                    break  # workers busy: daemons, they end with the process
        self.server_close()
        self._wake_end.close()

    def held_connections(self) -> tuple[int, int]:
        """Connections the "http" thread holds: requests being read, replies being written."""
        return len(self._reading), len(self._writing)

    # ---- the "http" thread ------------------------------------------------------------------
    def _serve(self) -> None:
        self._selector.register(self.socket, selectors.EVENT_READ, self._accept)
        self._selector.register(self._waker, selectors.EVENT_READ, self._woken)
        try:
            while not self._stopping.is_set():
                self._resume_accepting(time.monotonic())
                for key, _ in self._selector.select(self._select_timeout(time.monotonic())):
                    key.data(key.fileobj)
                self._expire(time.monotonic())
        finally:
            for conn in [*self._reading, *self._writing]:
                self._forget(conn)
            while not self._handed_back.empty():
                self._handed_back.get_nowait()[0].close()
            self._selector.close()
            self._waker.close()

    def _select_timeout(self, now: float) -> float:
        due = [now + 0.5]  # bounds how long stop() waits
        for held in self._held():
            if held:
                due.append(next(iter(held.values())).deadline)
        if self._paused_until is not None:
            due.append(self._paused_until)
        return max(0.0, min(due) - now)

    def _accept(self, _listener: socket.socket) -> None:
        try:
            conn, address = self.socket.accept()
        except BlockingIOError:
            return  # the client gave up before we got to it
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self._pause_accepting(exc)
            return  # otherwise the client gave up before we got to it (ECONNABORTED)
        if self._failed_accepts:
            self._accepting_again()
        if len(self._reading) >= MAX_WAITING:
            self._forget(next(iter(self._reading)))
        conn.setblocking(False)
        self._reading[conn] = _Incoming(address, time.monotonic() + self.request_timeout)
        self._selector.register(conn, selectors.EVENT_READ, self._read)

    def _pause_accepting(self, exc: OSError) -> None:
        """Stop watching the listening socket for a while (doubling up to a second). Logged
        once per ACCEPT_LOG_PERIOD: freed descriptors are soon taken again, and each short
        recovery must not add two lines."""
        now = time.monotonic()
        if not self._failed_accepts and (
            self._logged_failure_at is None or now - self._logged_failure_at >= ACCEPT_LOG_PERIOD
        ):
            log.error(
                "http_accept_failed",
                error=str(exc),
                errno=exc.errno,
                hint="out of file descriptors: raise LimitNOFILE or look for a leak; "
                "HTTP retries with a back-off",
            )
            self._logged_failure_at = now
            self._episode_logged = True
        self._failed_accepts += 1
        self._selector.unregister(self.socket)
        self._paused_until = time.monotonic() + self._backoff
        self._backoff = min(ACCEPT_BACKOFF_MAX, self._backoff * 2)

    def _accepting_again(self) -> None:
        if self._episode_logged:
            log.info("http_accept_resumed", failed_attempts=self._failed_accepts)
        self._episode_logged = False
        self._failed_accepts = 0
        self._backoff = ACCEPT_BACKOFF_MIN

    def _resume_accepting(self, now: float) -> None:
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            self._selector.register(self.socket, selectors.EVENT_READ, self._accept)

    def _read(self, conn: socket.socket) -> None:
        incoming = self._reading[conn]
        try:
            data = conn.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._forget(conn)
            return
        if not data:  # the client sent all it will: what it sent is answered, if anything
            if incoming.head:
                self._dispatch(conn)
            else:
                self._forget(conn)
            return
        try:
            complete = incoming.feed(data)
        except OverflowError:
            self._stop_reading(conn)
            self._reply(conn, memoryview(_HEAD_TOO_LARGE))
            return
        if complete:
            self._dispatch(conn)

    def _dispatch(self, conn: socket.socket) -> None:
        """The request is complete: to its lane's queue, or a 503 when that is full."""
        incoming = self._stop_reading(conn)
        lane = self._probes if self._is_probe(incoming.head) else self._jobs
        try:
            lane.put_nowait((conn, incoming.address, bytes(incoming.head)))
        except queue.Full:
            self._reply(conn, memoryview(_BUSY))

    def _is_probe(self, head: bytearray) -> bool:
        words = bytes(head.split(b"\n", 1)[0]).split()
        return len(words) >= 2 and urlsplit(words[1].decode("latin-1")).path in self.probe_paths

    def _reply(self, conn: socket.socket, data: memoryview) -> None:
        """Sends what the socket takes now; the rest waits for it, until its deadline."""
        sent = _send_some(conn, data)
        if sent is None or sent == len(data):
            _close(conn)
            return
        if len(self._writing) >= MAX_WRITING:
            self._forget(next(iter(self._writing)))
        self._writing[conn] = _Outgoing(data[sent:], time.monotonic() + self.request_timeout)
        self._selector.register(conn, selectors.EVENT_WRITE, self._write)

    def _write(self, conn: socket.socket) -> None:
        outgoing = self._writing[conn]
        sent = _send_some(conn, outgoing.data)
        if sent is None or sent == len(outgoing.data):
            del self._writing[conn]
            self._selector.unregister(conn)
            _close(conn)
        else:
            outgoing.data = outgoing.data[sent:]

    def _woken(self, waker: socket.socket) -> None:
        """Workers hand back the replies their first send did not finish."""
        with contextlib.suppress(BlockingIOError):
            waker.recv(4096)
        while True:
            try:
                conn, rest = self._handed_back.get_nowait()
            except queue.Empty:
                return
            self._reply(conn, rest)

    def _wake(self) -> None:
        # A wake-up already pending is as good (BlockingIOError); or the server has stopped.
        with contextlib.suppress(OSError):
            self._wake_end.send(b"\0")

    def _expire(self, now: float) -> None:
        for held in self._held():
            while held:
                conn, state = next(iter(held.items()))
                if state.deadline > now:
                    break
                self._forget(conn)

    def _held(self) -> tuple[Mapping[socket.socket, _Incoming | _Outgoing], ...]:
        return (self._reading, self._writing)

    def _stop_reading(self, conn: socket.socket) -> _Incoming:
        self._selector.unregister(conn)
        return self._reading.pop(conn)

    def _forget(self, conn: socket.socket) -> None:
        """Closes a connection the "http" thread holds, without an answer."""
        if self._reading.pop(conn, None) is not None or self._writing.pop(conn, None) is not None:
            self._selector.unregister(conn)
        conn.close()

    # ---- "http-worker" and "http-probe" threads ------------------------------------------------
    def _work(self, lane: Lane) -> None:
        while (job := lane.get()) is not None:
            conn, address, request = job
            exchange = Exchange(request)
            try:
                # The handler takes the Exchange for its socket (see Exchange).
                self.finish_request(cast(socket.socket, exchange), address)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the worker
                self._request_failed(address, exc)
            self._send_reply(conn, memoryview(bytes(exchange.reply)))

    def _send_reply(self, conn: socket.socket, reply: memoryview) -> None:
        # This thread holds the socket until it hands it back to the "http" thread.
        sent = _send_some(conn, reply)
        if sent is None or sent == len(reply):
            _close(conn)
            return
        self._handed_back.put((conn, reply[sent:]))
        self._wake()

    def _request_failed(self, address: Any, exc: Exception) -> None:
        # Clients that hang up or send nonsense are routine, not a server fault.
        log.debug(
            "http_request_failed",
            peer=str(address[0]),
            error=str(exc),
            **{"error.type": type(exc).__name__},
        )
