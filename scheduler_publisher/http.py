"""Health, readiness, status, Prometheus metrics and reload over HTTP (stdlib server).

Bound to loopback by default. Threads, and what each may cost:
- the "http" thread accepts connections and holds each one, threadless, until its request
  starts to arrive; a connection that stays silent for the request timeout is closed;
- HTTP_WORKERS "http-worker" threads read and answer the requests that have begun. They only
  read the service's state, or ask the main loop to reload. When they and the queue in front
  of them are all taken, a new request gets a 503 at once: clients never cost a thread each.
Connections are HTTP/1.0, one request each.

`/` is a status page for people (scheduler_publisher/web/): static HTML, CSS and JavaScript
that poll `/status` for one page of entries at a time. Its Content-Security-Policy allows
scripts, styles and requests from this origin only, so entry-provided text cannot run.
"""

from __future__ import annotations

import errno
import hmac
import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import make_wsgi_app

from scheduler_publisher.logs import get_logger
from scheduler_publisher.metrics import MetricsSource, PerEntrySwitch, build_registry
from scheduler_publisher.status_query import QueryError, parse_query, select

if TYPE_CHECKING:
    from scheduler_publisher.mailbox import Trigger
    from scheduler_publisher.settings import ServiceSettings
    from scheduler_publisher.status import ServiceStatus

log = get_logger("scheduler_publisher.http")

HTTP_WORKERS = 4
HTTP_QUEUE = 16  # requests that have begun, waiting for a worker; beyond this: 503
MAX_WAITING = 256  # silent connections held; beyond this the longest-silent one is closed
LISTEN_BACKLOG = 128
MAX_BODY = 64 * 1024
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
ACCEPT_LOG_PERIOD = 60.0
# accept() fails with these while the process or the system is out of descriptors or memory.
# The pending connection stays queued, so the listening socket stays readable: retrying at
# once would spin a core (issue: "one HTTP connect can pin a core").
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

GET = ("GET", "HEAD")
# path -> (methods, handler)
ROUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "/": (GET, "_page"),
    "/page.js": (GET, "_asset"),
    "/page.css": (GET, "_asset"),
    "/health": (GET, "_health"),
    "/ready": (GET, "_ready"),
    "/status": (GET, "_status"),
    "/metrics": (GET, "_metrics"),
    "/reload": (("POST",), "_reload"),
}
# path -> (file in scheduler_publisher/web, content type)
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}
# The page's only script and style sheet are the files above: no inline code, nothing from
# another origin (gateways are often offline), and fetch() only to this server.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The page learns from this attribute whether the reload button must ask for a token.
_TOKEN_MARK = b'data-token-required="no"'
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\n\r\n"
         b'{"error": "too many requests in progress; try again"}')


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`; the scheme is case-insensitive (RFC 7235 section 2.1)."""
    scheme, _, credentials = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode("utf-8", "replace"), token.encode())


@cache
def asset(name: str) -> bytes:
    """A file of the status page, read once from the package (works from a wheel too)."""
    return resources.files("scheduler_publisher").joinpath("web", name).read_bytes()


class StatusSource(MetricsSource, Protocol):
    """What the endpoints read from the service, and the one thing they ask of it (a
    reload); PublisherService provides it. /metrics reads the MetricsSource part."""

    def status(self) -> ServiceStatus: ...

    def health_warnings(self) -> list[str]: ...

    def reload_config(self, timeout: float = ..., *, trigger: Trigger = ...) -> bool: ...

    @property
    def active_configs(self) -> int: ...

    @property
    def last_config_error(self) -> str | None: ...


class StatusServer:
    """The HTTP endpoints of one service: built by the service, started and stopped by it.
    Listens on `settings.http_host`/`http_port`; `POST /reload` wants `settings.http_token`
    when one is set."""

    def __init__(self, service: StatusSource, settings: ServiceSettings) -> None:
        self.service = service
        self.host = settings.http_host
        self.port = settings.http_port
        self.token = settings.http_token
        self.request_timeout = settings.http_request_timeout
        self.per_entry = PerEntrySwitch(settings.metrics_per_entry, settings.metrics_entry_limit)
        self.registry = build_registry(service, self.per_entry)
        self.metrics_app = make_wsgi_app(self.registry)  # gzip and content negotiation
        self._server: _Server | None = None

    def start(self) -> bool:
        """Serve in daemon threads; False (logged) when the port cannot be bound."""
        handler = type("Handler", (_Handler,), {"app": self, "timeout": self.request_timeout})
        try:
            self._server = _Server((self.host, self.port), handler, self.request_timeout)
        except OSError as exc:
            log.error("http_bind_failed", host=self.host, port=self.port, error=str(exc),
                      hint="choose another port with --http-port (0 turns HTTP off)")
            return False
        self.port = self._server.server_address[1]
        self._server.start()
        log.info("http_listening", host=self.host, port=self.port)
        self.per_entry.update(self.service.active_configs)  # say it at start, not at 1st scrape
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def authorized(self, header: str | None) -> bool:
        return self.token is None or bearer_matches(header, self.token)


class _Server(HTTPServer):
    """HTTPServer with bounded threads, an idle timeout, and an accept that backs off."""

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[_Handler],
                 request_timeout: float) -> None:
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
        self._threads += [threading.Thread(target=self._work, name=f"http-worker-{i}",
                                           daemon=True) for i in range(HTTP_WORKERS)]

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
        if not self._failed_accepts and (self._logged_failure_at is None
                                         or now - self._logged_failure_at >= ACCEPT_LOG_PERIOD):
            log.error("http_accept_failed", error=str(exc), errno=exc.errno,
                      hint="out of file descriptors: raise LimitNOFILE or look for a leak; "
                           "HTTP retries with a back-off")
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
        log.debug("http_request_failed", peer=str(address[0]), error=str(exc),
                  **{"error.type": type(exc).__name__})


def _refuse_busy(conn: socket.socket) -> None:
    try:
        conn.setblocking(False)
        conn.recv(65536)  # what has arrived, so that close() does not reset the connection
        conn.send(_BUSY)
    except OSError:
        pass  # the client is gone or its window is full: the close says enough
    finally:
        conn.close()


class _Handler(BaseHTTPRequestHandler):
    app: StatusServer
    server_version = "scheduler-publisher"
    # Answers to garbled request lines keep their status line and headers (0.9 has none).
    default_request_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        return  # access logs would flood the JSON log at every scrape

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors the stdlib detects (bad request line, a method with no do_*) as JSON too."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            self._route()  # an unknown method: 405 with the methods the path has, or 404
            return
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _route(self) -> None:
        if not self._discard_body():
            return
        path = urlsplit(self.path).path
        route = ROUTES.get(path)
        if route is None:
            self._json(404, {"error": f"no such endpoint: {path}"})
            return
        methods, handler = route
        if self.command not in methods:
            self._json(405, {"error": f"{self.command} not allowed on {path}; use "
                                      f"{' or '.join(methods)}"},
                       headers=[("Allow", ", ".join(methods))])
            return
        getattr(self, handler)()

    def _discard_body(self) -> bool:
        """Read the body a client sent (no endpoint uses one): closing a socket with unread
        bytes resets the connection, and the client could lose the answer."""
        text = self.headers.get("Content-Length") or "0"
        if not text.isdigit():
            self.send_error(400, f"Content-Length: expected a byte count, got {text!r}")
            return False
        if int(text) > MAX_BODY:
            self.send_error(413, f"request body: at most {MAX_BODY} bytes, got {text}")
            return False
        self.rfile.read(int(text))
        return True

    def _health(self) -> None:
        service = self.app.service
        problems = service.health_problems()
        self._json(503 if problems else 200, {"ok": not problems, "problems": problems,
                                              "warnings": service.health_warnings()})

    def _ready(self) -> None:
        connected = self.app.service.is_connected()
        self._json(200 if connected else 503, {"ready": connected})

    def _status(self) -> None:
        """The whole snapshot, or one page of its entries when the query asks for one."""
        try:
            query = parse_query(urlsplit(self.path).query)
        except QueryError as exc:
            self._json(400, exc.as_dict())
            return
        status = self.app.service.status()
        self._json(200, status.to_json() if query is None else select(status, query))

    def _page(self) -> None:
        body = asset(ASSETS["/"][0])
        if self.app.token is not None:
            body = body.replace(_TOKEN_MARK, b'data-token-required="yes"')
        self._send_asset("/", body)

    def _asset(self) -> None:
        path = urlsplit(self.path).path
        self._send_asset(path, asset(ASSETS[path][0]))

    def _send_asset(self, path: str, body: bytes) -> None:
        # no-cache: revalidate, so an upgraded service never runs with last version's script.
        self._send(200, body, [("Content-Type", ASSETS[path][1]),
                               ("Content-Security-Policy", PAGE_POLICY),
                               ("Cache-Control", "no-cache"),
                               ("Referrer-Policy", "no-referrer")])

    def _metrics(self) -> None:
        """prometheus_client's own WSGI app answers: gzip when the scraper accepts it, and the
        text or OpenMetrics format as the scraper's Accept header asks."""
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics",
                   "QUERY_STRING": urlsplit(self.path).query,
                   "HTTP_ACCEPT": self.headers.get("Accept", ""),
                   "HTTP_ACCEPT_ENCODING": self.headers.get("Accept-Encoding", "")}
        reply: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            reply.extend((int(status.split(maxsplit=1)[0]), headers))

        body: Iterable[bytes] = self.app.metrics_app(environ, start_response)
        code, headers = reply
        self._send(code, b"".join(body), headers)

    def _reload(self) -> None:
        if not self.app.authorized(self.headers.get("Authorization")):
            self._json(401, {"success": False, "error": "missing or wrong bearer token"},
                       headers=[("WWW-Authenticate", "Bearer")])
            return
        service = self.app.service
        applied = service.reload_config(trigger="http")
        self._json(200, {"success": applied, "active_configs": service.active_configs,
                         "error": service.last_config_error})

    def _json(self, code: int, body: dict[str, Any],
              headers: list[tuple[str, str]] | None = None) -> None:
        self._send(code, json.dumps(body).encode(),
                   [("Content-Type", "application/json"), *(headers or [])])

    def _send(self, code: int, body: bytes, headers: list[tuple[str, str]]) -> None:
        """HEAD gets the headers a GET would, with the same Content-Length, and no body."""
        self.send_response(code)
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
