"""The HTTP endpoints of a real in-process service, read with urllib, the broker up and down."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from scheduler_publisher.service import PublisherService
from tests.support import (
    Mosquitto,
    ServiceProcess,
    SubscriberFactory,
    entry,
    free_port,
    in_process_settings,
    wait_until,
    write_config,
)

ServiceStarter = Callable[..., PublisherService]


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, path: str, method: str = "GET", token: str | None = None,
         authorization: str | None = None) -> Reply:
    headers = {"Authorization": authorization or f"Bearer {token}"} \
        if (token or authorization) else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return Reply(r.status, r.read(), r.headers.get("Content-Type", ""))
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), e.headers.get("Content-Type", ""))


def get(service: PublisherService, path: str) -> Reply:
    return call(service.http.port, path)


def post(service: PublisherService, path: str, **auth: str) -> Reply:
    return call(service.http.port, path, "POST", **auth)


def metrics(service: PublisherService) -> dict[str, Any]:
    reply = get(service, "/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(reply.body.decode())}


def samples(families: dict[str, Any], family: str, sample: str | None = None,
            **labels: str) -> list[float]:
    """Values of the samples named `sample` (default: the family) whose labels include `labels`."""
    name = sample or family
    return [s.value for s in families[family].samples
            if s.name == name and labels.items() <= s.labels.items()]


def value(families: dict[str, Any], family: str, sample: str | None = None,
          **labels: str) -> float:
    (found,) = samples(families, family, sample, **labels)
    return found


def counter(families: dict[str, Any], family: str, **labels: str) -> float:
    """A counter's value; a per-entry one is 0 before the entry's first tick creates it."""
    found = samples(families, family, f"{family}_total", **labels)
    assert labels or len(found) == 1, f"{family}: one unlabelled sample expected, got {found}"
    return sum(found)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "config.json"


@pytest.fixture
def start_service(config_path: Path, broker: Mosquitto) -> Iterator[ServiceStarter]:
    """Starts an in-process service with HTTP on a free loopback port; stopped at teardown."""
    services: list[PublisherService] = []

    def start(entries: list[dict[str, Any]], **overrides: Any) -> PublisherService:
        write_config(config_path, entries)
        overrides.setdefault("http_port", free_port())
        service = PublisherService(in_process_settings(config_path, broker.port,
                                                       http_host="127.0.0.1", **overrides))
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        service.stop()


def two_entries(topic_base: str) -> list[dict[str, Any]]:
    return [entry("plain", f"{topic_base}/plain", 0.2),
            entry("willed", f"{topic_base}/willed", 0.2, lwt=True)]


def test_health_is_ok_with_the_broker_up_and_down(start_service: ServiceStarter,
                                                  broker: Mosquitto, topic_base: str) -> None:
    """GET /health is 200 while connected and stays 200 when the broker goes away, with the
    lost connection among its warnings."""
    service = start_service(two_entries(topic_base))
    wait_until(lambda: service.connection.connection_counts() == (2, 2), 10,
               message="both connections up")

    up = get(service, "/health")
    assert (up.status, up.json()) == (200, {"ok": True, "problems": [], "warnings": []})
    assert up.content_type == "application/json"

    broker.stop()
    wait_until(lambda: not service.is_connected(), 10, message="disconnected")
    down = get(service, "/health")
    assert down.status == 200
    assert (down.json()["ok"], down.json()["problems"]) == (True, [])
    assert any(w.startswith("main connection") for w in down.json()["warnings"]), down.json()


def test_health_is_503_with_the_problem_when_a_component_died(start_service: ServiceStarter,
                                                                topic_base: str) -> None:
    """GET /health is 503 and names the problem once a component's thread has died."""
    service = start_service(two_entries(topic_base))
    assert get(service, "/health").status == 200

    service._watcher.stop()  # the observer thread ends, as if it had died

    reply = get(service, "/health")
    assert reply.status == 503
    assert (reply.json()["ok"], reply.json()["problems"]) == (False,
                                                              ["config watcher not running"])
    assert get(service, "/status").json()["health"] == reply.json()


def test_ready_follows_the_broker_connection(start_service: ServiceStarter,
                                             broker: Mosquitto, topic_base: str) -> None:
    """GET /ready is 200 while connected, 503 once the broker stops, 200 again when it returns."""
    service = start_service(two_entries(topic_base))
    wait_until(lambda: get(service, "/ready").status == 200, 10, message="ready")
    assert get(service, "/ready").json() == {"ready": True}

    broker.stop()
    down = wait_until(lambda: (r := get(service, "/ready")).status == 503 and r, 10,
                      message="/ready 503")
    assert down.json() == {"ready": False}

    broker.start()
    wait_until(lambda: get(service, "/ready").status == 200, 15, message="ready again")


def test_status_is_get_status_as_json(start_service: ServiceStarter,
                                      broker: Mosquitto, topic_base: str) -> None:
    """GET /status serves get_status(): configs, connection, statistics and every entry."""
    service = start_service(two_entries(topic_base))
    wait_until(lambda: service.stats.totals().published >= 4, 10, message="publishes")

    reply = get(service, "/status")
    assert reply.status == 200
    status = reply.json()
    expected = json.loads(json.dumps(service.get_status()))
    assert status.keys() == expected.keys()
    assert status["active_configs"] == 2
    assert status["connected"] is True
    assert status["statistics"].keys() == expected["statistics"].keys()
    assert status["statistics"]["total_published"] >= 4
    assert status["config"]["digest"] == expected["config"]["digest"]
    assert set(status["entries"]) == {"plain", "willed"}
    assert status["entries"]["willed"]["topic"] == f"{topic_base}/willed"
    assert status["entries"]["willed"]["lwt"] is True
    assert status["entries"]["plain"]["published"] >= 1

    broker.stop()
    wait_until(lambda: get(service, "/status").json()["connected"] is False, 10,
               message="status disconnected")
    down = get(service, "/status").json()
    assert down["active_configs"] == 2
    assert down["connection"]["connections_up"] == 0
    assert set(down["entries"]) == {"plain", "willed"}


def test_metrics_expose_counters_histogram_and_gauges(
        start_service: ServiceStarter, broker: Mosquitto, topic_base: str) -> None:
    """GET /metrics parses as Prometheus text: per-entry counters, lateness histogram, gauges."""
    bad = entry("broken", f"{topic_base}/broken", interval=0)
    service = start_service([*two_entries(topic_base), bad])
    wait_until(lambda: all(service.stats.entry(i).published >= 2 for i in ("plain", "willed")),
               10, message="publishes on both entries")

    ticked = sum(service.stats.entry(i).ticks for i in ("plain", "willed"))
    assert ticked >= 2
    families = metrics(service)  # scraped after `ticked` was read: it can only count more
    for entry_id in ("plain", "willed"):
        assert counter(families, "scheduler_publisher_published", entry=entry_id) >= 2
        assert value(families, "scheduler_publisher_tick_lateness_max_seconds",
                     entry=entry_id) >= 0
    # One service-wide histogram (per-entry buckets would be a series per entry and bucket).
    buckets = samples(families, "scheduler_publisher_tick_lateness_seconds",
                      "scheduler_publisher_tick_lateness_seconds_bucket")
    assert buckets == sorted(buckets), "histogram buckets are cumulative"
    count = value(families, "scheduler_publisher_tick_lateness_seconds",
                  "scheduler_publisher_tick_lateness_seconds_count")
    assert count >= ticked
    assert buckets[-1] == count
    assert value(families, "scheduler_publisher_tick_lateness_seconds",
                 "scheduler_publisher_tick_lateness_seconds_bucket", le="+Inf") == count
    assert families["scheduler_publisher_tick_lateness_seconds"].type == "histogram"
    assert families["scheduler_publisher_connections_up"].type == "gauge"
    assert value(families, "scheduler_publisher_connections_up") == 2  # main + the lwt entry
    assert value(families, "scheduler_publisher_connections") == 2
    assert value(families, "scheduler_publisher_active_configs") == 2
    assert counter(families, "scheduler_publisher_reloads") == 0
    assert counter(families, "scheduler_publisher_config_errors") == 1

    broker.stop()
    wait_until(lambda: value(metrics(service), "scheduler_publisher_connections_up") == 0, 10,
               message="connections_up 0")
    wait_until(lambda: counter(metrics(service), "scheduler_publisher_dropped",
                               entry="plain") >= 1, 10, message="dropped ticks counted")


def test_reload_applies_the_file_and_counts(start_service: ServiceStarter,
                                            config_path: Path, topic_base: str,
                                            subscriber_factory: SubscriberFactory) -> None:
    """POST /reload re-reads the file (no watcher here) and answers with the outcome."""
    added = f"{topic_base}/added"
    sub = subscriber_factory(added)
    service = start_service([entry("one", f"{topic_base}/one", 0.2)], watch=False)
    write_config(config_path, [entry("one", f"{topic_base}/one", 0.2), entry("two", added, 0.2)])

    reply = post(service, "/reload")
    assert reply.status == 200
    assert reply.json() == {"success": True, "active_configs": 2, "error": None}
    sub.wait_for(added, 2)
    families = metrics(service)
    assert counter(families, "scheduler_publisher_reloads") == 1


def test_reload_reports_an_unusable_file(start_service: ServiceStarter,
                                         config_path: Path, topic_base: str) -> None:
    """POST /reload of a broken file says why, keeps the running entries and counts the error."""
    service = start_service([entry("one", f"{topic_base}/one", 0.2)], watch=False)
    config_path.write_text("[{not json")

    reply = post(service, "/reload")
    assert reply.status == 200
    body = reply.json()
    assert body["success"] is False
    assert body["active_configs"] == 1
    assert body["error"]
    assert counter(metrics(service), "scheduler_publisher_config_errors") == 1


def test_reload_needs_the_bearer_token(start_service: ServiceStarter,
                                       topic_base: str) -> None:
    """With a token, POST /reload is 401 without it or with a wrong one, 200 with it."""
    token = f"tok-{uuid.uuid4().hex}"
    service = start_service([entry("one", f"{topic_base}/one", 0.2)], http_token=token)

    missing = post(service, "/reload")
    assert missing.status == 401
    assert missing.json()["success"] is False
    assert post(service, "/reload", token="wrong").status == 401
    assert post(service, "/reload", authorization=token).status == 401  # no "Bearer "
    assert post(service, "/reload", authorization=f"Basic {token}").status == 401
    right = post(service, "/reload", token=token)
    assert (right.status, right.json()["success"]) == (200, True)
    assert get(service, "/health").status == 200  # reads stay open


def test_token_file_guards_reload_in_the_real_process(tmp_path: Path, broker: Mosquitto,
                                                      topic_base: str) -> None:
    """--http-token-file's first line is the bearer token the real process wants for /reload."""
    token = f"tok-{uuid.uuid4().hex}"
    (tmp_path / "token").write_text(f"{token}\nignored second line\n")
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{topic_base}/one", 0.5)])
    port = free_port()
    proc = ServiceProcess(["--broker", "127.0.0.1", "--port", str(broker.port),
                           "--config", str(config), "--state-db", "", "--log-file", "",
                           "--client-id", f"sp-test-{uuid.uuid4().hex[:8]}",
                           "--http-port", str(port), "--http-token-file",
                           str(tmp_path / "token")], cwd=tmp_path)
    try:
        proc.wait_for_event("http_listening")
        assert call(port, "/reload", "POST").status == 401
        assert call(port, "/reload", "POST", token="wrong").status == 401
        right = call(port, "/reload", "POST", token=token)
        assert (right.status, right.json()["success"]) == (200, True)
        assert token not in "\n".join(proc.stdout + proc.stderr)
    finally:
        proc.stop()


def test_unknown_paths_are_404(start_service: ServiceStarter,
                               topic_base: str) -> None:
    """Paths and methods the server does not serve answer 404 with a JSON error."""
    service = start_service([entry("one", f"{topic_base}/one", 0.5)])

    for method, path in (("GET", "/nope"), ("GET", "/reload"), ("POST", "/health"),
                         ("GET", "/health/extra"), ("POST", "/reload/x")):
        reply = call(service.http.port, path, method)
        assert reply.status == 404, (method, path)
        assert path in reply.json()["error"]


def test_every_endpoint_answers_when_the_broker_was_never_up(
        start_service: ServiceStarter, broker: Mosquitto, topic_base: str) -> None:
    """Started with the broker down: health 200, ready 503, status/metrics say so, reload ok."""
    broker.stop()
    service = start_service(two_entries(topic_base))

    assert get(service, "/health").status == 200
    assert get(service, "/ready").status == 503
    status = get(service, "/status").json()
    assert (status["connected"], status["active_configs"]) == (False, 2)
    wait_until(lambda: counter(metrics(service), "scheduler_publisher_dropped",
                               entry="plain") >= 1, 10, message="dropped ticks counted")
    assert value(metrics(service), "scheduler_publisher_connections_up") == 0
    assert post(service, "/reload").json()["success"] is True

    broker.start()
    wait_until(lambda: get(service, "/ready").status == 200, 15, message="ready once up")


def test_port_in_use_is_logged_and_the_service_runs_on(
        start_service: ServiceStarter, topic_base: str,
        subscriber_factory: SubscriberFactory) -> None:
    """A taken HTTP port logs http_bind_failed; publishing goes on without HTTP."""
    topic = f"{topic_base}/one"
    sub = subscriber_factory(topic)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with capture_logs() as logs:
            service = start_service([entry("one", topic, 0.2)], http_port=port)
            sub.wait_for(topic, 3)

    failures = [e for e in logs if e["event"] == "http_bind_failed"]
    assert len(failures) == 1
    assert failures[0]["port"] == port
    assert failures[0]["log_level"] == "error"
    assert service.http is None
    assert any(e["event"] == "service_started" for e in logs)
