"""Health, readiness, status, Prometheus metrics and reload over HTTP (stdlib server).

Bound to loopback by default. The threads and their bounds are http_server.py's; the
handlers here only read the service's state, or ask the main loop to reload. Connections are
HTTP/1.0, one request each.

Pages of other sites must not reach these endpoints through a user's browser: the checks on
`Host:`, `Origin` and the bearer token are http_guard.py's.

`/` is a status page for people (scheduler_publisher/ops/web/): static HTML, CSS and JavaScript
that poll `/status` for one page of entries at a time. Its Content-Security-Policy allows
scripts, styles and requests from this origin only, so entry-provided text cannot run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from prometheus_client import make_wsgi_app

from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.ops.http_guard import HostCheck, bearer_matches, cross_site_refusal, shown
from scheduler_publisher.ops.http_server import MAX_BODY, BoundedHTTPServer, body_length
from scheduler_publisher.ops.metrics import MetricsSource, PerEntrySwitch, build_registry
from scheduler_publisher.ops.status_query import QueryError, parse_query, select

if TYPE_CHECKING:
    from scheduler_publisher.mailbox import Trigger
    from scheduler_publisher.ops.status import ServiceStatus
    from scheduler_publisher.settings import ServiceSettings

log = get_logger("scheduler_publisher.http")

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
# Answered by their own worker, so that a liveness probe never waits behind a reload.
PROBE_PATHS = frozenset({"/health", "/ready"})
# path -> (file in scheduler_publisher/ops/web, content type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
# The page's only script and style sheet are the files above: no inline code, nothing from
# another origin (gateways are often offline), and fetch() only to this server.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The page learns from this attribute whether the reload button must ask for a token.
_TOKEN_MARK = b'data-token-required="no"'


@cache
def asset(name: str) -> bytes:
    """A file of the status page, read once from the package (works from a wheel too)."""
    return resources.files("scheduler_publisher.ops").joinpath("web", name).read_bytes()


class StatusSource(MetricsSource, Protocol):
    """What the endpoints read from the service, and the one thing they ask of it (a
    reload); PublisherService provides it. /metrics reads the MetricsSource part."""

    def status(self) -> ServiceStatus: ...

    def status_view(self) -> ServiceStatus: ...

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
        self.host = settings.http_host.removeprefix("[").removesuffix("]")  # [::1] as in a URL
        self.port = settings.http_port
        self.token = settings.http_token
        self.hosts = HostCheck.of(self.host, settings.http_allowed_hosts)
        self.request_timeout = settings.http_request_timeout
        self.per_entry = PerEntrySwitch(settings.metrics_per_entry, settings.metrics_entry_limit)
        self.registry = build_registry(service, self.per_entry)
        self.metrics_app = make_wsgi_app(self.registry)  # gzip and content negotiation
        self._server: BoundedHTTPServer | None = None

    def start(self) -> bool:
        """Serve in daemon threads; False (logged) when the port cannot be bound."""
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self._server = BoundedHTTPServer(
                (self.host, self.port), handler, self.request_timeout, PROBE_PATHS
            )
        except OSError as exc:
            log.error(
                "http_bind_failed",
                host=self.host,
                port=self.port,
                error=str(exc),
                hint="choose another port with --http-port (0 turns HTTP off)",
            )
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

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the stdlib detects (bad request line, a method with no do_*) as JSON too."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            self._route()  # an unknown method: 405 with the methods the path has, or 404
            return
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _route(self) -> None:
        if not self.app.hosts.allows(self.headers.get("Host")):
            host = shown(self.headers.get("Host", ""))
            self._json(
                421,
                {
                    "error": f"Host {host!r} is not a name this server answers to "
                    "(see --http-allowed-hosts)"
                },
            )
            return
        if not self._body_ok():
            return
        path = urlsplit(self.path).path
        route = ROUTES.get(path)
        if route is None:
            self._json(404, {"error": f"no such endpoint: {shown(path)}"})
            return
        methods, handler = route
        if self.command not in methods:
            self._json(
                405,
                {
                    "error": f"{shown(self.command)} not allowed on {path}; "
                    f"use {' or '.join(methods)}"
                },
                headers=[("Allow", ", ".join(methods))],
            )
            return
        getattr(self, handler)()

    def _body_ok(self) -> bool:
        """The server has read and dropped the body a client sent (no endpoint uses one),
        up to MAX_BODY bytes; a larger or garbled Content-Length is refused here."""
        text = self.headers.get("Content-Length")
        if text is None:
            return True
        try:
            length = body_length(text)
        except ValueError as exc:
            self.send_error(400, str(exc))
            return False
        if length > MAX_BODY:
            self.send_error(413, f"request body: at most {MAX_BODY} bytes, got {shown(text)}")
            return False
        return True

    def _health(self) -> None:
        service = self.app.service
        problems = service.health_problems()
        self._json(
            503 if problems else 200,
            {"ok": not problems, "problems": problems, "warnings": service.health_warnings()},
        )

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
        if query is None:
            self._json(200, self.app.service.status().to_json())
        else:  # builds only the page's entries (LiveEntries)
            self._json(200, select(self.app.service.status_view(), query))

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
        self._send(
            200,
            body,
            [
                ("Content-Type", ASSETS[path][1]),
                ("Content-Security-Policy", PAGE_POLICY),
                ("Cache-Control", "no-cache"),
                ("Referrer-Policy", "no-referrer"),
            ],
        )

    def _metrics(self) -> None:
        """prometheus_client's own WSGI app answers: gzip when the scraper accepts it, and the
        text or OpenMetrics format as the scraper's Accept header asks."""
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/metrics",
            "QUERY_STRING": urlsplit(self.path).query,
            "HTTP_ACCEPT": self.headers.get("Accept", ""),
            "HTTP_ACCEPT_ENCODING": self.headers.get("Accept-Encoding", ""),
        }
        reply: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            reply.extend((int(status.split(maxsplit=1)[0]), headers))

        body: Iterable[bytes] = self.app.metrics_app(environ, start_response)
        code, headers = reply
        self._send(code, b"".join(body), headers)

    def _reload(self) -> None:
        refusal = cross_site_refusal(self.headers)
        if refusal is not None:
            self._json(refusal[0], {"success": False, "error": refusal[1]})
            return
        if not self.app.authorized(self.headers.get("Authorization")):
            self._json(
                401,
                {"success": False, "error": "missing or wrong bearer token"},
                headers=[("WWW-Authenticate", "Bearer")],
            )
            return
        service = self.app.service
        applied = service.reload_config(trigger="http")
        self._json(
            200,
            {
                "success": applied,
                "active_configs": service.active_configs,
                "error": service.last_config_error,
            },
        )

    def _json(
        self, code: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None
    ) -> None:
        self._send(
            code,
            json.dumps(body).encode(),
            [("Content-Type", "application/json"), *(headers or [])],
        )

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
