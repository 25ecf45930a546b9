"""The HTTP endpoints of a real in-process service, read over HTTP, the broker up and down."""

from __future__ import annotations

import contextlib
import errno
import http.client
import itertools
import json
import os
import resource
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from scheduler_publisher.ops.http_server import (
    HTTP_QUEUE,
    HTTP_WORKERS,
    MAX_HEAD,
    MAX_WAITING,
    BoundedHTTPServer,
)
from scheduler_publisher.ops.status import EntryStatus
from scheduler_publisher.ops.status_query import SORT_KEYS
from tests.support import (
    Mosquitto,
    Reply,
    ServiceProcess,
    ServiceStarter,
    SubscriberFactory,
    call,
    cli_args,
    counter,
    entry,
    free_port,
    get,
    metrics,
    post,
    request,
    samples,
    value,
    wait_until,
    write_config,
)


def two_entries(topic_base: str) -> list[dict[str, Any]]:
    return [
        entry("plain", f"{topic_base}/plain", 0.2),
        entry("willed", f"{topic_base}/willed", 0.2, lwt=True),
    ]


def test_health_is_ok_with_the_broker_up_and_down(
    http_service: ServiceStarter, broker: Mosquitto, topic_base: str
) -> None:
    """GET /health is 200 while connected and stays 200 when the broker goes away, with the
    lost connection among its warnings."""
    service = http_service(two_entries(topic_base))
    wait_until(
        lambda: service.connection.connection_counts() == (2, 2), 10, message="both connections up"
    )

    up = get(service, "/health")
    assert (up.status, up.json()) == (200, {"ok": True, "problems": [], "warnings": []})
    assert up.content_type == "application/json"

    broker.stop()
    wait_until(lambda: not service.is_connected(), 10, message="disconnected")
    down = get(service, "/health")
    assert down.status == 200
    assert (down.json()["ok"], down.json()["problems"]) == (True, [])
    assert any(w.startswith("main connection") for w in down.json()["warnings"]), down.json()


def test_health_is_503_with_the_problem_when_a_component_died(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """GET /health is 503 and names the problem once a component's thread has died."""
    service = http_service(two_entries(topic_base))
    assert get(service, "/health").status == 200

    service._watcher.stop()  # the observer thread ends, as if it had died

    reply = get(service, "/health")
    assert reply.status == 503
    assert (reply.json()["ok"], reply.json()["problems"]) == (False, ["config watcher not running"])
    assert get(service, "/status").json()["health"] == reply.json()


def test_ready_follows_the_broker_connection(
    http_service: ServiceStarter, broker: Mosquitto, topic_base: str
) -> None:
    """GET /ready is 200 while connected, 503 once the broker stops, 200 again when it returns."""
    service = http_service(two_entries(topic_base))
    wait_until(lambda: get(service, "/ready").status == 200, 10, message="ready")
    assert get(service, "/ready").json() == {"ready": True}

    broker.stop()
    down = wait_until(
        lambda: (r := get(service, "/ready")).status == 503 and r, 10, message="/ready 503"
    )
    assert down.json() == {"ready": False}

    broker.start()
    wait_until(lambda: get(service, "/ready").status == 200, 15, message="ready again")


def test_status_is_get_status_as_json(
    http_service: ServiceStarter, broker: Mosquitto, topic_base: str
) -> None:
    """GET /status serves get_status(): configs, connection, statistics and every entry."""
    service = http_service(two_entries(topic_base))
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
    wait_until(
        lambda: get(service, "/status").json()["connected"] is False,
        10,
        message="status disconnected",
    )
    down = get(service, "/status").json()
    assert down["active_configs"] == 2
    assert down["connection"]["connections_up"] == 0
    assert set(down["entries"]) == {"plain", "willed"}


def test_metrics_expose_counters_histogram_and_gauges(
    http_service: ServiceStarter, broker: Mosquitto, topic_base: str
) -> None:
    """GET /metrics parses as Prometheus text: per-entry and service-wide counters, the lateness
    histogram, gauges."""
    bad = entry("broken", f"{topic_base}/broken", interval=0)
    service = http_service([*two_entries(topic_base), bad])
    wait_until(
        lambda: all(service.stats.entry(i).published >= 2 for i in ("plain", "willed")),
        10,
        message="publishes on both entries",
    )

    ticked = sum(service.stats.entry(i).ticks for i in ("plain", "willed"))
    assert ticked >= 2
    families = metrics(service)  # scraped after `ticked` was read: it can only count more
    for entry_id in ("plain", "willed"):
        assert counter(families, "scheduler_publisher_entry_published", entry=entry_id) >= 2
        assert (
            value(families, "scheduler_publisher_entry_tick_lateness_max_seconds", entry=entry_id)
            >= 0
        )
    assert counter(families, "scheduler_publisher_published") >= 4
    assert value(families, "scheduler_publisher_metrics_per_entry") == 1
    # One service-wide histogram (per-entry buckets would be a series per entry and bucket).
    buckets = samples(
        families,
        "scheduler_publisher_tick_lateness_seconds",
        "scheduler_publisher_tick_lateness_seconds_bucket",
    )
    assert buckets == sorted(buckets), "histogram buckets are cumulative"
    count = value(
        families,
        "scheduler_publisher_tick_lateness_seconds",
        "scheduler_publisher_tick_lateness_seconds_count",
    )
    assert count >= ticked
    assert buckets[-1] == count
    assert (
        value(
            families,
            "scheduler_publisher_tick_lateness_seconds",
            "scheduler_publisher_tick_lateness_seconds_bucket",
            le="+Inf",
        )
        == count
    )
    assert families["scheduler_publisher_tick_lateness_seconds"].type == "histogram"
    assert families["scheduler_publisher_connections_up"].type == "gauge"
    assert value(families, "scheduler_publisher_connections_up") == 2  # main + the lwt entry
    assert value(families, "scheduler_publisher_connections") == 2
    assert value(families, "scheduler_publisher_active_configs") == 2
    assert value(families, "scheduler_publisher_ready") == 1
    assert value(families, "scheduler_publisher_healthy") == 1
    assert counter(families, "scheduler_publisher_reloads") == 0
    assert counter(families, "scheduler_publisher_config_errors") == 1

    broker.stop()
    wait_until(
        lambda: value(metrics(service), "scheduler_publisher_connections_up") == 0,
        10,
        message="connections_up 0",
    )
    wait_until(
        lambda: counter(metrics(service), "scheduler_publisher_entry_dropped", entry="plain") >= 1,
        10,
        message="dropped ticks counted",
    )
    down = metrics(service)
    assert value(down, "scheduler_publisher_ready") == 0
    assert counter(down, "scheduler_publisher_dropped") >= 1


def test_reload_applies_the_file_and_counts(
    http_service: ServiceStarter,
    config_path: Path,
    topic_base: str,
    subscriber_factory: SubscriberFactory,
) -> None:
    """POST /reload re-reads the file (no watcher here) and answers with the outcome."""
    added = f"{topic_base}/added"
    sub = subscriber_factory(added)
    service = http_service([entry("one", f"{topic_base}/one", 0.2)], watch=False)
    write_config(config_path, [entry("one", f"{topic_base}/one", 0.2), entry("two", added, 0.2)])

    reply = post(service, "/reload")
    assert reply.status == 200
    assert reply.json() == {"success": True, "active_configs": 2, "error": None}
    sub.wait_for(added, 2)
    families = metrics(service)
    assert counter(families, "scheduler_publisher_reloads") == 1


def test_reload_reports_an_unusable_file(
    http_service: ServiceStarter, config_path: Path, topic_base: str
) -> None:
    """POST /reload of a broken file says why, keeps the running entries and counts the error."""
    service = http_service([entry("one", f"{topic_base}/one", 0.2)], watch=False)
    config_path.write_text("[{not json")

    reply = post(service, "/reload")
    assert reply.status == 200
    body = reply.json()
    assert body["success"] is False
    assert body["active_configs"] == 1
    assert body["error"]
    assert counter(metrics(service), "scheduler_publisher_config_errors") == 1


def test_a_partly_bad_edit_shows_in_status_and_health_until_it_is_fixed(
    http_service: ServiceStarter, config_path: Path, topic_base: str
) -> None:
    """An edit whose entries are partly invalid is no silent success: /status's config lists
    each error (entry, id, field, line), the invalid new entries that do not run (skipped)
    and the changed ones whose old version runs on (held back); /health warns, still 200.
    A fixed file clears all of it."""
    good = [entry("a", f"{topic_base}/a", 5), entry("b", f"{topic_base}/b", 5)]
    service = http_service(good, watch=False)
    config = get(service, "/status").json()["config"]
    assert (config["errors"], config["skipped_entries"], config["held_back_entries"]) == (
        [],
        [],
        [],
    )
    bad = [
        entry("a", f"{topic_base}/a", 7),
        entry("b", f"{topic_base}/b", 0),  # was valid: held back at interval 5
        entry("c", f"{topic_base}/c", 5, qos=5),  # new and invalid: skipped
        {"topic": f"{topic_base}/d", "data": {}, "interval": 5},  # no id: skipped, by position
    ]
    write_config(config_path, bad)
    assert post(service, "/reload").json()["success"] is True

    config = get(service, "/status").json()["config"]
    assert config["last_error"] is None  # the file itself is fine
    by_entry = {(e["entry"], e["id"], e["field"]): e for e in config["errors"]}
    assert set(by_entry) == {(2, "b", "interval"), (3, "c", "qos"), (4, None, "id")}
    assert by_entry[(2, "b", "interval")]["line"] > 1
    assert by_entry[(3, "c", "qos")]["message"].startswith('entry 3 (id "c"): qos must be')
    assert config["errors_total"] == 3
    assert config["skipped_entries"] == [{"entry": 3, "id": "c"}, {"entry": 4, "id": None}]
    assert (config["skipped_total"], config["held_back_entries"]) == (2, ["b"])
    health = get(service, "/health")
    assert health.status == 200
    (warning,) = [w for w in health.json()["warnings"] if w.startswith("entries file")]
    assert "2 invalid entries skipped, 1 held back" in warning

    config_path.write_text("[{not json")
    assert post(service, "/reload").json()["success"] is False
    warnings = get(service, "/health").json()["warnings"]
    assert any(w.startswith("entries file cannot be used") for w in warnings)

    write_config(config_path, good)
    assert post(service, "/reload").json()["success"] is True
    config = get(service, "/status").json()["config"]
    assert (config["errors_total"], config["skipped_total"], config["held_back_total"]) == (0, 0, 0)
    assert get(service, "/health").json()["warnings"] == []


def test_a_failing_checkpoint_shows_in_health_status_and_metrics(
    http_service: ServiceStarter, topic_base: str, tmp_path: Path
) -> None:
    """While the counters cannot be saved (here another process holds the state database's
    write lock), /health warns (still 200), /status says why and /metrics counts it; once a
    checkpoint works again, all three say so."""
    db = tmp_path / "state.db"
    service = http_service([entry("a", f"{topic_base}/a", 1)], state_db=db, checkpoint_interval=0.2)
    wait_until(db.exists, 10, message="the state database")
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")

        def failing() -> Any:
            return get(service, "/status").json()["statistics"]["checkpoint_error"]

        error = wait_until(failing, 30, message="a failed checkpoint in /status")
        assert "locked" in error
        health = get(service, "/health")
        assert health.status == 200
        assert any(
            w.startswith("state database: the counters cannot") for w in health.json()["warnings"]
        )
        families = metrics(service)
        assert value(families, "scheduler_publisher_checkpoint_failing") == 1
        assert counter(families, "scheduler_publisher_checkpoint_failures") >= 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_until(lambda: failing() is None, 30, message="a checkpoint that works again")
    assert get(service, "/health").json()["warnings"] == []
    assert value(metrics(service), "scheduler_publisher_checkpoint_failing") == 0


def test_reload_needs_the_bearer_token(http_service: ServiceStarter, topic_base: str) -> None:
    """With a token, POST /reload is 401 without it or with a wrong one, 200 with it."""
    token = f"tok-{uuid.uuid4().hex}"
    service = http_service([entry("one", f"{topic_base}/one", 0.2)], http_token=token)

    missing = post(service, "/reload")
    assert missing.status == 401
    assert missing.headers.get("WWW-Authenticate") == "Bearer"
    assert missing.json()["success"] is False
    assert post(service, "/reload", token="wrong").status == 401
    assert post(service, "/reload", authorization=token).status == 401  # no "Bearer "
    assert post(service, "/reload", authorization=f"Basic {token}").status == 401
    assert post(service, "/reload", authorization=f"Bearer {token}x").status == 401
    assert post(service, "/reload", authorization="Bearer").status == 401
    # The scheme is case-insensitive (RFC 7235 section 2.1).
    for scheme in ("bearer", "BEARER", "bEaReR"):
        reply = post(service, "/reload", authorization=f"{scheme} {token}")
        assert (reply.status, reply.json()["success"]) == (200, True), scheme
    right = post(service, "/reload", token=token)
    assert (right.status, right.json()["success"]) == (200, True)
    assert get(service, "/health").status == 200  # reads stay open


def test_an_empty_bearer_never_authorizes(http_service: ServiceStarter, topic_base: str) -> None:
    """`Authorization: Bearer` with nothing, or only blanks, after it is a 401; so is any
    header when the token is empty (set through the API), and a token with bytes beyond
    ASCII is compared as bytes, not crashed on."""
    token = f"tok-{uuid.uuid4().hex}"
    service = http_service([entry("one", f"{topic_base}/one", 0.2)], http_token=token)
    for header in ("Bearer", "Bearer ", "Bearer \t ", "bearer", " Bearer  "):
        assert post(service, "/reload", authorization=header).status == 401, repr(header)
    latin = raw_reply(
        service.http.port,
        b"POST /reload HTTP/1.0\r\nAuthorization: Bearer t\xf6k\xff\r\n\r\n",
    )
    assert latin.startswith(b"HTTP/1.0 401 ")

    empty = http_service([entry("two", f"{topic_base}/two", 0.2)], http_token="")
    for header in ("Bearer", "Bearer ", "Bearer x"):
        assert post(empty, "/reload", authorization=header).status == 401, repr(header)


def test_token_file_guards_reload_in_the_real_process(
    tmp_path: Path, broker: Mosquitto, topic_base: str
) -> None:
    """--http-token-file's first line is the bearer token the real process wants for /reload."""
    token = f"tok-{uuid.uuid4().hex}"
    (tmp_path / "token").write_text(f"{token}\nignored second line\n")
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{topic_base}/one", 0.5)])
    port = free_port()
    proc = ServiceProcess(
        cli_args(
            broker.port,
            config,
            "--http-token-file",
            str(tmp_path / "token"),
            command=(),
            http_port=port,
        ),
        cwd=tmp_path,
    )
    try:
        proc.wait_for_event("http_listening")
        assert call(port, "/reload", "POST").status == 401
        assert call(port, "/reload", "POST", token="wrong").status == 401
        right = call(port, "/reload", "POST", token=token)
        assert (right.status, right.json()["success"]) == (200, True)
        assert token not in "\n".join(proc.stdout + proc.stderr)
    finally:
        proc.stop()


def test_unknown_paths_are_404(http_service: ServiceStarter, topic_base: str) -> None:
    """Paths the server does not serve answer 404 with a JSON error, whatever the method."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])

    for method, path in (
        ("GET", "/nope"),
        ("GET", "/health/extra"),
        ("POST", "/reload/x"),
        ("PUT", "/nope"),
        ("HEAD", "/nope"),
    ):
        reply = request(service.http.port, method, path)
        assert reply.status == 404, (method, path)
        assert reply.content_type == "application/json"
        if method != "HEAD":
            assert path in reply.json()["error"]


def test_wrong_methods_are_405_json_with_allow(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Any method an endpoint does not serve (PUT, DELETE, PATCH, OPTIONS, made-up ones) gets
    405 with a JSON error and an Allow header naming the methods it does serve."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])
    port = service.http.port

    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FROB", "POST"):
        for path in ("/health", "/ready", "/status", "/metrics"):
            reply = request(port, method, path)
            assert (reply.status, reply.headers.get("Allow")) == (405, "GET, HEAD"), (method, path)
            assert reply.content_type == "application/json"
            assert method in reply.json()["error"]
    for method in ("GET", "HEAD", "PUT", "DELETE"):
        reply = request(port, method, "/reload")
        assert (reply.status, reply.headers.get("Allow")) == (405, "POST"), method
    assert get(service, "/health").status == 200


def test_malformed_requests_get_a_json_400(http_service: ServiceStarter, topic_base: str) -> None:
    """A request line the server cannot parse gets 400 with a JSON error, not an HTML page."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])

    for line in (b"NONSENSE\r\n\r\n", b"GET /health HTTP/9.x\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", service.http.port), timeout=10) as s:
            s.sendall(line)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 "), reply
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["error"]
    assert get(service, "/health").status == 200


def test_request_bodies_are_read_and_bounded(http_service: ServiceStarter, topic_base: str) -> None:
    """A request body is bounded: a huge Content-Length gets 413 and a garbled one 400, both
    JSON; a POST /reload with a small body (curl -d) is served as without one."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)], watch=False)
    port = service.http.port
    reply = request(port, "POST", "/reload", body=b'{"please": true}' * 1000)
    assert (reply.status, reply.json()["success"]) == (200, True)

    too_big = request(port, "POST", "/reload", {"Content-Length": str(10**9)})
    assert too_big.status == 413
    assert "at most" in too_big.json()["error"]
    garbled = request(port, "POST", "/reload", {"Content-Length": "-1"})
    assert garbled.status == 400
    assert "Content-Length" in garbled.json()["error"]
    # int() takes "1_0" and "+1", raises on 5,000 digits and on "²" (a digit to isdigit()).
    for odd in (b"5" * 5000, b"1_0", b"+1", b"0x10", b"\xb2", b"\xd9\xa3"):
        raw = raw_reply(port, b"POST /reload HTTP/1.0\r\nContent-Length: " + odd + b"\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 400 "), (odd[:10], raw[:100])
        assert b"\n" not in body
        assert json.loads(body)["error"].startswith("Content-Length: expected a byte count")
        assert len(body) < 200


def raw_reply(port: int, data: bytes) -> bytes:
    """What the server answers to `data` sent as is, read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_a_request_head_is_bounded(http_service: ServiceStarter, topic_base: str) -> None:
    """A request line and headers over MAX_HEAD get 431 JSON, and the server goes on."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])
    port = service.http.port
    big = b"GET /health HTTP/1.0\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    head, _, body = raw_reply(port, big).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 431 ")
    assert json.loads(body) == {"error": f"request line and headers: at most {MAX_HEAD} bytes"}
    assert get(service, "/health").status == 200


def test_head_answers_like_get_without_a_body(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """HEAD gets GET's status and headers, Content-Length included, and no body."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])
    wait_until(service.is_connected, 10, message="connected")
    port = service.http.port

    for path in ("/health", "/ready", "/status"):
        got = request(port, "GET", path)
        head = request(port, "HEAD", path)
        assert head.status == got.status == 200, path
        assert head.body == b""
        assert head.content_type == got.content_type == "application/json"
        assert int(head.headers["Content-Length"]) > 0
    head = request(port, "HEAD", "/metrics")
    assert head.status == 200
    assert head.body == b""
    assert head.content_type.startswith("text/plain")
    assert int(head.headers["Content-Length"]) > 1000


def test_query_strings_are_ignored(http_service: ServiceStarter, topic_base: str) -> None:
    """/health?x=1 is /health: the query string does not change the endpoint."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])
    wait_until(service.is_connected, 10, message="connected")

    assert get(service, "/health?x=1").json() == {"ok": True, "problems": [], "warnings": []}
    assert get(service, "/ready?probe=kubelet&t=2").json() == {"ready": True}
    assert get(service, "/status?").json()["active_configs"] == 1
    assert "scheduler_publisher_published_total" in get(service, "/metrics?x").body.decode()
    assert post(service, "/reload?now=1").json()["success"] is True
    assert get(service, "/nope?x=1").status == 404


def test_every_endpoint_answers_when_the_broker_was_never_up(
    http_service: ServiceStarter, broker: Mosquitto, topic_base: str
) -> None:
    """Started with the broker down: health 200, ready 503, status/metrics say so, reload ok."""
    broker.stop()
    service = http_service(two_entries(topic_base))

    assert get(service, "/health").status == 200
    assert get(service, "/ready").status == 503
    status = get(service, "/status").json()
    assert (status["connected"], status["active_configs"]) == (False, 2)
    wait_until(
        lambda: counter(metrics(service), "scheduler_publisher_entry_dropped", entry="plain") >= 1,
        10,
        message="dropped ticks counted",
    )
    assert value(metrics(service), "scheduler_publisher_connections_up") == 0
    assert post(service, "/reload").json()["success"] is True

    broker.start()
    wait_until(lambda: get(service, "/ready").status == 200, 15, message="ready once up")


def test_port_in_use_is_logged_and_the_service_runs_on(
    http_service: ServiceStarter, topic_base: str, subscriber_factory: SubscriberFactory
) -> None:
    """A taken HTTP port logs http_bind_failed; publishing goes on without HTTP."""
    topic = f"{topic_base}/one"
    sub = subscriber_factory(topic)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with capture_logs() as logs:
            service = http_service([entry("one", topic, 0.2)], http_port=port)
            sub.wait_for(topic, 3)

    failures = [e for e in logs if e["event"] == "http_bind_failed"]
    assert len(failures) == 1
    assert failures[0]["port"] == port
    assert failures[0]["log_level"] == "error"
    assert service.http is None
    assert any(e["event"] == "service_started" for e in logs)


def open_sockets(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset); False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""  # a 408/400 reply before the close counts as open
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_clients_cost_no_thread_and_are_cut_off(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Hundreds of silent connections add no threads, /health still answers beside them, and
    each is closed once the request timeout has passed."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)], http_request_timeout=2.0)
    port = service.http.port
    assert get(service, "/health").status == 200
    threads_before = threading.active_count()

    idle = open_sockets(port, 200)
    try:
        # The backlog is accepted in order: once /health is answered, every idle one is in.
        assert get(service, "/health").json() == {"ok": True, "problems": [], "warnings": []}
        assert threading.active_count() <= threads_before + 2  # slack for unrelated threads
        wait_until(
            lambda: all(closed_by_peer(s) for s in idle),
            20,
            message="idle connections closed by the request timeout",
        )
    finally:
        for s in idle:
            s.close()
    assert get(service, "/health").status == 200


def test_the_longest_silent_connections_go_first_beyond_the_cap(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Past MAX_WAITING silent connections, the oldest are closed to make room, long before
    the request timeout, and a real request still gets its answer."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)], http_request_timeout=60)
    port = service.http.port
    extra = 10

    idle = open_sockets(port, MAX_WAITING + extra)
    try:
        assert get(service, "/health").status == 200  # accepted after every idle one
        wait_until(
            lambda: all(closed_by_peer(s) for s in idle[: extra + 1]),
            10,
            message="the oldest silent connections closed",
        )
        assert not any(closed_by_peer(s) for s in idle[extra + 1 :])
    finally:
        for s in idle:
            s.close()


def trickle(
    sockets: list[socket.socket], data: bytes, stop: threading.Event, begun: threading.Event
) -> None:
    """Sends `data` one byte a second on each socket (a slow client's pace), round after
    round, until `stop`; `begun` is set once each has sent a byte. A socket the server has
    closed is left alone."""
    for byte in itertools.cycle(data):
        for s in sockets:
            with contextlib.suppress(OSError):
                s.send(bytes([byte]))
        begun.set()
        if stop.wait(1.0):
            return


def test_slow_clients_never_cost_a_probe_its_answer(
    tmp_path: Path, broker: Mosquitto, topic_base: str
) -> None:
    """Forty clients trickling a request head a byte a second take no worker: /health answers
    200 beside them, and each is cut off at the request deadline (10 s) although it never
    stops sending: the deadline is per request, not per recv."""
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{topic_base}/one", 0.5)])
    port = free_port()
    proc = ServiceProcess(cli_args(broker.port, config, command=(), http_port=port), cwd=tmp_path)
    stop, begun = threading.Event(), threading.Event()
    slow: list[socket.socket] = []
    try:
        proc.wait_for_event("http_listening")
        slow = open_sockets(port, 40)
        head = b"GET /status HTTP/1.0\r\nX-Slow: " + b"a" * 1000  # never ends: no blank line
        feeder = threading.Thread(target=trickle, args=(slow, head, stop, begun), daemon=True)
        feeder.start()
        assert begun.wait(10)
        for _ in range(3):  # while every slow client has begun its request
            reply = call(port, "/health", timeout=5)
            assert (reply.status, reply.json()["ok"]) == (200, True)
            assert call(port, "/status", timeout=5).status == 200
        wait_until(
            lambda: all(closed_by_peer(s) for s in slow),
            40,
            message="every slow client cut off at its deadline while still sending",
        )
        assert feeder.is_alive()
    finally:
        stop.set()
        for s in slow:
            s.close()
        proc.stop()


class StandIn(BaseHTTPRequestHandler):
    """A stand-in for the service's handler: `/wait` answers once `release` is set, `/big`
    with BIG bytes, any other path with a small JSON body."""

    release = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/wait":
            self.release.wait(30)
        body = BIG if self.path == "/big" else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


BIG = b"x" * (1 << 20)


@dataclass(frozen=True)
class Bound:
    server: BoundedHTTPServer
    release: threading.Event  # lets the stand-in's /wait requests answer

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def bounded() -> Iterator[Callable[..., Bound]]:
    """Starts BoundedHTTPServers on loopback with the stand-in handler; at the end their
    waiting requests are released and the servers stopped."""
    started: list[Bound] = []

    def start(request_timeout: float, *probe_paths: str) -> Bound:
        handler: type[StandIn] = type("Handler", (StandIn,), {"release": threading.Event()})
        server = BoundedHTTPServer(
            ("127.0.0.1", 0), handler, request_timeout, frozenset(probe_paths)
        )
        server.start()
        started.append(Bound(server, handler.release))
        return started[-1]

    yield start
    for bound in started:
        bound.release.set()
        bound.server.stop()


def test_requests_beyond_the_workers_get_503_while_probes_answer(
    bounded: Callable[..., Bound],
) -> None:
    """Complete requests that keep the workers busy fill the queue; those beyond get 503 JSON
    at once, no new thread, while a probe path has its own worker and answers; released,
    the others are answered."""
    server = bounded(30.0, "/health")
    threads_before = threading.active_count()
    beyond = 3
    waiting = open_sockets(server.port, HTTP_WORKERS + HTTP_QUEUE + beyond)
    try:
        for s in waiting:
            s.sendall(b"GET /wait HTTP/1.0\r\n\r\n")
            s.setblocking(False)  # busy_reply peeks without waiting
        refused = wait_until(
            lambda: (
                len(busy := [r for s in waiting if (r := busy_reply(s)) is not None]) >= beyond
                and busy
            ),
            10,
            message="503 while every worker is taken",
        )
        # Which of them find the queue full depends on how soon the workers took theirs.
        assert beyond <= len(refused) <= beyond + HTTP_WORKERS
        head, body = refused[0].split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.0 503 ")
        assert b"\r\nRetry-After: 1" in head
        assert json.loads(body) == {"error": "too many requests in progress; try again"}
        assert request(server.port, "GET", "/health", timeout=5).status == 200
        assert threading.active_count() <= threads_before + 2  # slack for unrelated threads

        server.release.set()
        answered = [s for s in waiting if busy_reply(s) is None]
        for s in answered:
            s.settimeout(10)
            assert s.recv(65536).startswith(b"HTTP/1.0 200 ")
    finally:
        for s in waiting:
            s.close()


def slow_reader(port: int) -> socket.socket:
    """A client that takes a reply a few hundred bytes at a time: small segments and a 4 KB
    receive window, so that a 1 MB reply cannot be sent at once."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def has_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def read_to_end(sock: socket.socket) -> int:
    """Bytes received until the server closes the connection."""
    sock.setblocking(True)
    sock.settimeout(20)
    total = 0
    while chunk := sock.recv(1 << 16):
        total += len(chunk)
    return total


def test_clients_that_never_read_their_reply_cost_no_worker(
    bounded: Callable[..., Bound],
) -> None:
    """Thirty clients that ask for a 1 MB reply and never read it each get the start of it,
    no worker waits on them, another request is answered beside them, and each is cut off
    at the deadline with its reply unfinished."""
    server = bounded(3.0)  # no probe lane: the workers themselves are free
    readers = [slow_reader(server.port) for _ in range(30)]
    try:
        for s in readers:
            s.sendall(b"GET /big HTTP/1.0\r\n\r\n")
            s.setblocking(False)  # has_data peeks without waiting
        wait_until(
            lambda: all(has_data(s) for s in readers), 10, message="every reply begun at once"
        )
        assert request(server.port, "GET", "/small", timeout=5).status == 200
        wait_until(
            lambda: server.server.held_connections() == (0, 0),
            20,
            message="the slow readers cut off at their deadline",
        )
        for s in readers:
            assert read_to_end(s) < len(BIG)
    finally:
        for s in readers:
            s.close()


def busy_reply(sock: socket.socket) -> bytes | None:
    """The whole reply on `sock` once the server has sent a 503 and closed; None until then
    (or for any other reply). Peeks, so the socket can still be read."""
    try:
        data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, ConnectionResetError):
        return None
    return data if data.startswith(b"HTTP/1.0 503 ") and data.endswith(b"}") else None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_file_descriptors_backs_off_instead_of_spinning(
    tmp_path: Path, broker: Mosquitto, topic_base: str
) -> None:
    """With the process out of descriptors, accept() failing with EMFILE is logged once and
    retried with a back-off (no core spinning), and HTTP recovers once descriptors free up."""
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{topic_base}/one", 0.5)])
    port = free_port()
    proc = ServiceProcess(cli_args(broker.port, config, command=(), http_port=port), cwd=tmp_path)
    clients: list[socket.socket] = []
    try:
        proc.wait_for_event("http_listening")
        assert call(port, "/health").status == 200
        pid = proc.proc.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 10, hard))

        clients = open_sockets(port, 30)  # 10 fill the table; the rest wait in the backlog
        proc.wait_for_event("http_accept_failed", where=lambda e: e.get("errno") == errno.EMFILE)
        window = 3.0
        before, started = cpu_seconds(pid), time.monotonic()
        wait_until(
            lambda: time.monotonic() - started >= window, window + 5, message="the measuring window"
        )  # a spin would burn ~1 CPU-second a second
        used = cpu_seconds(pid) - before
        assert used < 0.3 * (time.monotonic() - started), f"{used:.2f} s of CPU in the window"

        for s in clients:
            s.close()
        wait_until(lambda: call(port, "/health").status == 200, 30, message="/health again")
        proc.wait_for_event("http_accept_resumed")
        failed = [e for e in proc.events() if e.get("message") == "http_accept_failed"]
        assert len(failed) == 1, failed
    finally:
        for s in clients:
            s.close()
        proc.stop()


# ---- who may reach the endpoints: Host names, other sites' pages, address families ---------


def fetch(
    port: int,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    address: str = "127.0.0.1",
) -> Reply:
    """`request` to any address (an IPv6 one too), with the headers as given (Host included)."""
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, r.read(), r.headers.get("Content-Type", ""), r.headers)
    finally:
        conn.close()


FOREIGN_HOSTS = (
    "evil.example",
    "evil.example:8080",
    "localhost.evil.example",
    "127.0.0.1.evil.example",
    "evil.example.:80",
    "a b",
    "[::1",
    "[evil.example]:80",
    "x:y",
)


def test_names_the_server_does_not_answer_to_get_421(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """Bound to loopback, a Host that names another server (a DNS-rebinding page) gets a 421
    on every endpoint; localhost, any IP address, and no Host at all are answered."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])
    port = service.http.port
    for host in FOREIGN_HOSTS:
        for path in ("/status", "/", "/health", "/metrics"):
            reply = fetch(port, path, headers={"Host": host})
            assert reply.status == 421, (host, path)
            assert "--http-allowed-hosts" in reply.json()["error"]
        assert fetch(port, "/reload", method="POST", headers={"Host": host}).status == 421
    ours = (f"localhost:{port}", "LOCALHOST.", f"127.0.0.1:{port}", f"[::1]:{port}", "10.1.2.3")
    for host in ours:
        assert fetch(port, "/status", headers={"Host": host}).status == 200, host
    no_host = raw_reply(port, b"GET /health HTTP/1.0\r\n\r\n")
    assert no_host.startswith(b"HTTP/1.0 200 ")


def test_allowed_hosts_extend_the_names(http_service: ServiceStarter, topic_base: str) -> None:
    """--http-allowed-hosts names the hosts a browser may use besides localhost; `*` any."""
    listed = http_service(
        [entry("one", f"{topic_base}/one", 0.5)], http_allowed_hosts=("gateway.lan", "gw")
    )
    for host in ("gateway.lan", "GATEWAY.LAN.:8080", "gw", "localhost"):
        assert fetch(listed.http.port, "/status", headers={"Host": host}).status == 200, host
    for host in ("other.lan", "gateway.lan.evil.example"):
        assert fetch(listed.http.port, "/status", headers={"Host": host}).status == 421, host
    anything = http_service([entry("two", f"{topic_base}/two", 0.5)], http_allowed_hosts=("*",))
    assert fetch(anything.http.port, "/status", headers={"Host": "evil.example"}).status == 200


def test_cross_site_posts_to_reload_are_refused(
    http_service: ServiceStarter, config_path: Path, topic_base: str
) -> None:
    """Without a token, a POST /reload that another site's page could send (its Origin, a
    Sec-Fetch-Site other than same-origin, a form's Content-Type) is refused and applies
    nothing; the page's own fetch, curl and JSON are served."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)], watch=False)
    port = service.http.port
    here = f"127.0.0.1:{port}"
    write_config(config_path, two_entries(topic_base))  # what a reload would apply
    refused = [
        ({"Origin": "http://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": f"http://localhost:{port}"}, 403),  # another origin, even on this host
        ({"Origin": f"http://127.0.0.1:{port + 1}"}, 403),
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({"Content-Type": "Text/Plain;charset=UTF-8"}, 415),
    ]
    for headers, status in refused:
        reply = fetch(port, "/reload", method="POST", headers=headers)
        assert reply.status == status, headers
        assert reply.json()["success"] is False
    assert get(service, "/status").json()["active_configs"] == 1
    served: list[dict[str, str]] = [
        {"Origin": f"http://{here}", "Sec-Fetch-Site": "same-origin"},
        {},
        {"Sec-Fetch-Site": "none"},
        {"Content-Type": "application/json"},
    ]
    for headers in served:
        reply = fetch(port, "/reload", method="POST", headers={"Host": here, **headers})
        assert (reply.status, reply.json()["success"]) == (200, True), headers
        assert reply.json()["active_configs"] == 2


@pytest.mark.parametrize("host", ["::1", "127.0.0.1", "::"])
def test_http_host_may_be_ipv6_or_ipv4(
    host: str, tmp_path: Path, broker: Mosquitto, topic_base: str
) -> None:
    """--http-host ::1 serves IPv6, 127.0.0.1 IPv4, and :: both; a foreign Host is refused
    on loopback and accepted on all interfaces without --http-allowed-hosts."""
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{topic_base}/one", 0.5)])
    port = free_port()
    args = cli_args(broker.port, config, "--http-host", host, command=(), http_port=port)
    proc = ServiceProcess(args, cwd=tmp_path)
    try:
        proc.wait_for_event("http_listening")
        clients = {"::1": ["::1"], "127.0.0.1": ["127.0.0.1"], "::": ["::1", "127.0.0.1"]}[host]
        for address in clients:
            reply = fetch(port, "/health", address=address)
            assert (reply.status, reply.json()["ok"]) == (200, True), address
        foreign = fetch(port, "/status", headers={"Host": "evil.example"}, address=clients[0])
        assert foreign.status == (200 if host == "::" else 421)
    finally:
        proc.stop()


def test_allowed_hosts_from_the_environment_in_the_real_process(
    tmp_path: Path, broker: Mosquitto, topic_base: str
) -> None:
    """SCHEDULER_PUBLISHER_HTTP_ALLOWED_HOSTS sets the list like any option; a bad list is
    a usage error (exit 2) that names the variable."""
    config = tmp_path / "config.json"
    write_config(config, [entry("one", f"{topic_base}/one", 0.5)])
    port = free_port()
    args = cli_args(broker.port, config, command=(), http_port=port)
    env = {"SCHEDULER_PUBLISHER_HTTP_ALLOWED_HOSTS": "Gateway.lan, gw"}
    proc = ServiceProcess(args, cwd=tmp_path, env=env)
    try:
        proc.wait_for_event("http_listening")
        assert fetch(port, "/status", headers={"Host": f"gateway.lan:{port}"}).status == 200
        assert fetch(port, "/status", headers={"Host": "gw"}).status == 200
        assert fetch(port, "/status", headers={"Host": "other.lan"}).status == 421
    finally:
        proc.stop()
    bad = ServiceProcess(
        args, cwd=tmp_path, env={"SCHEDULER_PUBLISHER_HTTP_ALLOWED_HOSTS": "gw:8080"}
    )
    try:
        assert bad.wait(30) == 2
    finally:
        bad.stop()
    (line,) = [line for line in bad.stderr if "error" in line]
    assert "SCHEDULER_PUBLISHER_HTTP_ALLOWED_HOSTS" in line
    assert "'gw:8080'" in line


def test_odd_status_queries_get_a_one_line_400(
    http_service: ServiceStarter, topic_base: str
) -> None:
    """/status?offset=<5,000 digits> and other values int() would choke on or take get a 400
    whose JSON error is one short line naming the parameter (not a closed connection)."""
    service = http_service([entry("one", f"{topic_base}/one", 0.5)])
    port = service.http.port
    for query in (
        "offset=" + "9" * 5000,
        "limit=" + "9" * 5000,
        "offset=1_0",
        "offset=%2B1",
        "offset=%D9%A3",
        "offset=99999999999",
        "x" * 5000 + "=1",
        "q=" + "%00" * 300,
    ):
        reply = request(port, "GET", f"/status?{query}")
        assert reply.status == 400, query[:20]
        assert b"\n" not in reply.body
        assert len(reply.body) < 1000  # the value quoted back is cut short
        assert reply.json()["parameter"] in ("offset", "limit", "q", "x" * 40 + "…")


def test_a_page_of_status_builds_only_its_own_entries(
    http_service: ServiceStarter, topic_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paged /status (as the status page polls it) builds the status of its window of
    entries, whatever the filter and sort, not of all 2,000; its pages are those of the whole
    snapshot, and /status without a query still lists every entry."""
    entries = [
        entry(f"e{i:04d}", f"{topic_base}/{i % 7}/{i:04d}", 3600, qos=i % 3, retain=i % 2 == 0)
        for i in range(2000)
    ]
    service = http_service(entries)
    built = count_entry_builds(monkeypatch)
    whole = get(service, "/status").json()
    assert len(whole["entries"]) == 2000
    assert built() == 2000
    for sort, order, q in [
        *((key, "asc", "") for key in SORT_KEYS),
        ("id", "desc", ""),
        ("qos", "desc", "/3/"),
        ("topic", "asc", "E01"),
    ]:
        path = f"/status?offset=40&limit=50&sort={sort}&order={order}&q={q}"
        page = get(service, path).json()
        assert built() <= 50, path
        assert page["page"]["total"] == 2000
        assert len(page["page"]["ids"]) == len(page["entries"]) == 50
        if sort in ("id", "topic", "qos", "retain", "lwt", "interval"):  # what does not move
            assert page["page"]["ids"] == paged(whole["entries"], sort, order, q)[40:90], path
    beyond = get(service, "/status?offset=5000&limit=50").json()
    assert (beyond["page"]["ids"], beyond["page"]["matched"], built()) == ([], 2000, 0)


def count_entry_builds(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts the EntryStatus built from now on; the function returned gives the count since
    its last call."""
    original = EntryStatus.of
    built = [0]

    def counted(_cls: type[EntryStatus], *args: Any, **kwargs: Any) -> EntryStatus:
        built[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(EntryStatus, "of", classmethod(counted))

    def since_last() -> int:
        made, built[0] = built[0], 0
        return made

    return since_last


def paged(entries: dict[str, Any], sort: str, order: str, q: str) -> list[str]:
    """The ids of the whole document's entries filtered and sorted as /status documents it."""
    folded = q.casefold()
    ids = sorted(
        i for i, e in entries.items() if folded in i.casefold() or folded in e["topic"].casefold()
    )
    ids.sort(key=lambda i: i if sort == "id" else entries[i][sort], reverse=order == "desc")
    return ids
