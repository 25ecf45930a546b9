"""Health, readiness, status, Prometheus metrics and reload over HTTP (stdlib server).

Bound to loopback by default. Threads: one daemon thread serves, a thread per request reads
the service's counters (never mutating them) or asks the main loop to reload.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from scheduler_publisher.logs import get_logger
from scheduler_publisher.stats import LATENESS_BUCKETS, Stats

if TYPE_CHECKING:
    from scheduler_publisher.service import PublisherService

log = get_logger("scheduler_publisher.http")


class ServiceCollector(Collector):
    """Builds the metrics from the service's counters at scrape time: no second bookkeeping."""

    def __init__(self, service: PublisherService) -> None:
        self._service = service

    def collect(self) -> Iterator[Any]:
        stats = self._service.stats
        entries = list(stats.entries.items())
        for name, doc, attr in (
            ("scheduler_publisher_published", "Messages published, per entry", "published"),
            ("scheduler_publisher_errors", "Publish errors, per entry", "errors"),
            ("scheduler_publisher_dropped", "QoS 0 ticks dropped while offline", "dropped"),
            ("scheduler_publisher_deferred", "QoS 1/2 ticks superseded while offline",
             "deferred"),
            ("scheduler_publisher_missed_ticks", "Grid slots skipped after a stall", "missed"),
        ):
            family = CounterMetricFamily(name, doc, labels=["entry"])
            for entry_id, e in entries:
                family.add_metric([entry_id], getattr(e, attr))
            yield family
        yield self._lateness(stats)
        late = GaugeMetricFamily("scheduler_publisher_tick_lateness_max_seconds",
                                 "The latest any tick of the entry ran", labels=["entry"])
        for entry_id, e in entries:
            late.add_metric([entry_id], e.lateness_max)
        yield late
        total, up = self._service.connection.connection_counts()
        yield GaugeMetricFamily("scheduler_publisher_connections", "MQTT connections",
                                value=total)
        yield GaugeMetricFamily("scheduler_publisher_connections_up", "MQTT connections up",
                                value=up)
        yield GaugeMetricFamily("scheduler_publisher_active_configs", "Entries running",
                                value=self._service.active_configs)
        yield CounterMetricFamily("scheduler_publisher_reloads", "Config reloads applied",
                                  value=stats.reloads)
        yield CounterMetricFamily("scheduler_publisher_config_errors", "Config problems seen",
                                  value=stats.config_errors)
        yield CounterMetricFamily("scheduler_publisher_reconnects", "Connections lost",
                                  value=stats.totals().reconnects)

    @staticmethod
    def _lateness(stats: Stats) -> HistogramMetricFamily:
        family = HistogramMetricFamily("scheduler_publisher_tick_lateness_seconds",
                                       "How late ticks ran against their grid slot (all entries)")
        running = 0
        buckets = []
        for bound, count in zip((*LATENESS_BUCKETS, float("inf")), list(stats.lateness_buckets),
                                strict=True):
            running += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
        family.add_metric([], buckets, stats.lateness_total)
        return family


class StatusServer:
    def __init__(self, service: PublisherService, host: str, port: int, *,
                 token: str | None = None) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.token = token
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Serve in a daemon thread; False (logged) when the port cannot be bound."""
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self._server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            log.error("http_bind_failed", host=self.host, port=self.port, error=str(exc))
            return False
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        daemon=True)
        self._thread.start()
        log.info("http_listening", host=self.host, port=self.port)
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())


class _Handler(BaseHTTPRequestHandler):
    app: StatusServer
    server_version = "scheduler-publisher"

    def log_message(self, format: str, *args: Any) -> None:
        return  # access logs would flood the JSON log at every scrape

    def do_GET(self) -> None:
        service = self.app.service
        if self.path == "/health":
            problems = service.health_problems()
            self._json(503 if problems else 200, {"ok": not problems, "problems": problems,
                                                  "warnings": service.health_warnings()})
        elif self.path == "/ready":
            connected = service.is_connected()
            self._json(200 if connected else 503, {"ready": connected})
        elif self.path == "/status":
            self._json(200, service.get_status())
        elif self.path == "/metrics":
            self._send(200, generate_latest(self.app.registry),
                       "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._json(404, {"error": f"no such endpoint: {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/reload":
            self._json(404, {"error": f"no such endpoint: {self.path}"})
            return
        if not self.app.authorized(self.headers.get("Authorization")):
            self._json(401, {"success": False, "error": "missing or wrong bearer token"})
            return
        service = self.app.service
        applied = service.reload_config()
        self._json(200, {"success": applied, "active_configs": service.active_configs,
                         "error": service.last_config_error})

    def _json(self, code: int, body: dict[str, Any]) -> None:
        self._send(code, json.dumps(body).encode(), "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
