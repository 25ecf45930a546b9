"""The HTTP listening socket: a bounded number of threads whatever the clients do.

- the "http" thread accepts connections and holds each one, threadless, until its request
  starts to arrive; a connection that stays silent for the request timeout is closed;
- HTTP_WORKERS "http-worker" threads read and answer the requests that have begun. When they
  and the queue in front of them are all taken, a new request gets a 503 at once: clients
  never cost a thread each;
- an accept() that fails for want of descriptors or memory backs off instead of spinning.
"""

from __future__ import annotations

import errno
import queue
import selectors
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from scheduler_publisher.logs.setup import get_logger

__all__ = ["HTTP_QUEUE", "HTTP_WORKERS", "MAX_WAITING", "BoundedHTTPServer"]

log = get_logger("scheduler_publisher.http")

HTTP_WORKERS = 4
HTTP_QUEUE = 16  # requests that have begun, waiting for a worker; beyond this: 503
MAX_WAITING = 256  # silent connections held; beyond this the longest-silent one is closed
LISTEN_BACKLOG = 128
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_LOG_PERIOD = 60.0
# accept() fails with these while the process or the system is out of descriptors or memory.
# The pending connection stays queued, so the listening socket stays readable: retrying at
# once would spin a core (issue: "one HTTP connect can pin a core").
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\n"
    b'{"error": "too many requests in progress; try again"}'
)


class BoundedHTTPServer(HTTPServer):
    """HTTPServer with bounded threads, an idle timeout, and an accept that backs off."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        request_timeout: float,
    ) -> None:
        super().__init__(address, handler)
        self.request_timeout = request_timeout
        self._stopping = threading.Event()
        self._jobs: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(HTTP_QUEUE)
        # Silent connections by arrival, so the oldest comes first: socket -> (address, deadline)
        self._waiting: dict[socket.socket, tuple[Any, float]] = {}
        self._selector = selectors.DefaultSelector()
        self._paused_until: float | None = None
        self._backoff = ACCEPT_BACKOFF_MIN
        self._failed_accepts = 0  # in a row, in the current episode
        self._logged_failure_at: float | None = None
        self._episode_logged = False
        self._threads = [threading.Thread(target=self._accept_loop, name="http", daemon=True)]
        self._threads += [
            threading.Thread(target=self._work, name=f"http-worker-{i}", daemon=True)
            for i in range(HTTP_WORKERS)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        self._threads[0].join(2)
        for _ in range(HTTP_WORKERS):
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                break  # workers busy with stalled clients: daemons, they end with the process
        self.server_close()

    # ---- the "http" thread ------------------------------------------------------------------
    def _accept_loop(self) -> None:
        self._selector.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                self._resume_accepting(time.monotonic())
                for key, _ in self._selector.select(self._select_timeout(time.monotonic())):
                    if key.fileobj is self.socket:
                        self._accept()
                    else:
                        self._begin(key.fileobj)  # type: ignore[arg-type]  # ours: sockets
                self._expire(time.monotonic())
        finally:
            for conn in list(self._waiting):
                self._drop(conn)
            self._selector.close()

    def _select_timeout(self, now: float) -> float:
        due = [now + 0.5]  # bounds how long stop() waits
        if self._waiting:
            due.append(next(iter(self._waiting.values()))[1])
        if self._paused_until is not None:
            due.append(self._paused_until)
        return max(0.0, min(due) - now)

    def _accept(self) -> None:
        try:
            conn, address = self.socket.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self._pause_accepting(exc)
            return  # otherwise the client gave up before we got to it (ECONNABORTED)
        if self._failed_accepts:
            self._accepting_again()
        if len(self._waiting) >= MAX_WAITING:
            self._drop(next(iter(self._waiting)))
        self._waiting[conn] = (address, time.monotonic() + self.request_timeout)
        self._selector.register(conn, selectors.EVENT_READ)

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
            self._selector.register(self.socket, selectors.EVENT_READ)

    def _begin(self, conn: socket.socket) -> None:
        """The request has started to arrive: hand it to a worker, or refuse it when all are
        taken and the queue is full."""
        if conn not in self._waiting:
            return  # dropped earlier in the same batch of events (MAX_WAITING)
        address, _deadline = self._waiting.pop(conn)
        self._selector.unregister(conn)
        try:
            self._jobs.put_nowait((conn, address))
        except queue.Full:
            _refuse_busy(conn)

    def _expire(self, now: float) -> None:
        while self._waiting:
            conn, (_address, deadline) = next(iter(self._waiting.items()))
            if deadline > now:
                return
            self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._waiting.pop(conn, None)
        self._selector.unregister(conn)
        conn.close()

    # ---- "http-worker" threads ----------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, address = job
            try:
                self.finish_request(conn, address)  # the handler sets the socket timeout
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the worker
                self._request_failed(address, exc)
            finally:
                self.shutdown_request(conn)

    def _request_failed(self, address: Any, exc: Exception) -> None:
        # Clients that hang up or time out mid-request are routine, not a server fault.
        log.debug(
            "http_request_failed",
            peer=str(address[0]),
            error=str(exc),
            **{"error.type": type(exc).__name__},
        )


def _refuse_busy(conn: socket.socket) -> None:
    try:
        conn.setblocking(False)
        conn.recv(65536)  # what has arrived, so that close() does not reset the connection
        conn.send(_BUSY)
    except OSError:
        pass  # the client is gone or its window is full: the close says enough
    finally:
        conn.close()
