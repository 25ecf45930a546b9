"""Broker URLs on the wire: the real service publishing over ws:// and wss:// (amqtt: Debian's
Mosquitto here is built without WebSockets) and mqtts:// (Mosquitto), ALPN reaching the TLS
server, the WebSocket path reaching the HTTP server, and logs and /status naming the URL."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Amqtt, broker_subscriber
from tests.support import (
    Mosquitto,
    ServiceProcess,
    Subscriber,
    cli_args,
    entry,
    free_port,
    request,
    unique_topic,
    write_config,
)
from tests.test_security import pki, tls_listener  # noqa: F401 - the module's CA fixture


@pytest.fixture
def amqtt(tmp_path: Path) -> Iterator[Amqtt]:
    broker = Amqtt(tmp_path)
    broker.start()
    yield broker
    broker.stop()


def subscriber(port: int, topic: str) -> Subscriber:
    """A subscriber of amqtt's TCP listener (MQTT 3.1.1: amqtt speaks no 5)."""
    return broker_subscriber(port, [topic], 1, mqtt5=False).start()


def launch(tmp_path: Path, topic: str, *extra: str, port: int) -> ServiceProcess:
    """The real CLI with one entry every 0.3 s; `extra` names the broker by URL, and `port`
    is the --port cli_args gives, the URL's own (a different one would be refused)."""
    config = tmp_path / "config.json"
    write_config(config, [entry("e1", topic, 0.3, qos=1)])
    args = cli_args(port, config, *extra, backoff=(0.2, 0.5), http_port=free_port())
    return ServiceProcess(args, cwd=tmp_path)


# ---- WebSockets ------------------------------------------------------------------------------


def test_the_service_publishes_over_websockets_and_reconnects(tmp_path: Path, amqtt: Amqtt) -> None:
    """ws://: the messages reach a subscriber; after the broker restarts they flow again; logs
    and /status name the URL."""
    topic = unique_topic("ws")
    sub = subscriber(amqtt.tcp_port, topic)
    url = f"ws://127.0.0.1:{amqtt.ws_port}/mqtt"
    proc = launch(tmp_path, topic, "--broker", url, "--mqtt-version", "3.1.1", port=amqtt.ws_port)
    try:
        connected = proc.wait_for_event("mqtt_connected", timeout=30)
        assert connected["url.full"] == url
        assert (connected["server.address"], connected["server.port"]) == (
            "127.0.0.1",
            amqtt.ws_port,
        )
        sub.wait_for(topic, count=2)
        sub.stop()
        amqtt.stop()
        proc.wait_for_event("mqtt_disconnected", timeout=30)
        amqtt.start()
        again = subscriber(amqtt.tcp_port, topic)
        again.wait_for(topic, count=2)
        again.stop()
        assert len([e for e in proc.events() if e.get("message") == "mqtt_connected"]) >= 2
    finally:
        proc.stop()


def test_the_websocket_path_reaches_the_server(tmp_path: Path) -> None:
    """ws://host:port/custom/path: the HTTP upgrade asks for that path (amqtt ignores paths,
    so a plain socket reads the request)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    port = server.getsockname()[1]
    topic = unique_topic("wspath")
    proc = launch(tmp_path, topic, "--broker", f"ws://127.0.0.1:{port}/custom/p%20th", port=port)
    try:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            request = conn.recv(4096).decode("latin-1")
        assert request.startswith("GET /custom/p%20th HTTP/1.1\r\n"), request
    finally:
        proc.stop()
        server.close()


def test_the_service_publishes_over_wss_with_the_test_ca(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    """wss://: verified against --cafile, the messages reach a subscriber."""
    broker = Amqtt(tmp_path, cert=(pki / "server.pem", pki / "server.key"))
    broker.start()
    try:
        topic = unique_topic("wss")
        sub = subscriber(broker.tcp_port, topic)
        url = f"wss://localhost:{broker.ws_port}/mqtt"
        proc = launch(
            tmp_path,
            topic,
            *("--broker", url, "--cafile", str(pki / "ca.pem"), "--mqtt-version", "3.1.1"),
            port=broker.ws_port,
        )
        try:
            assert proc.wait_for_event("mqtt_connected", timeout=30)["url.full"] == url
            sub.wait_for(topic, count=3)
        finally:
            proc.stop()
            sub.stop()
    finally:
        broker.stop()


# ---- TLS: mqtts:// and ALPN ------------------------------------------------------------------


def test_the_service_publishes_over_mqtts_to_mosquitto(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    """mqtts://127.0.0.1:PORT with --cafile: TLS as --tls does it, messages arrive, and
    /status shows the URL."""
    plain = free_port()
    broker = Mosquitto(tmp_path, extra=tls_listener(pki) + f"listener {plain} 127.0.0.1\n")
    broker.start()
    topic = unique_topic("mqtts")
    sub = Subscriber(plain, [topic]).start()
    url = f"mqtts://127.0.0.1:{broker.port}"
    proc = launch(
        tmp_path, topic, "--broker", url, "--cafile", str(pki / "ca.pem"), port=broker.port
    )
    try:
        proc.wait_for_event("mqtt_connected", timeout=30)
        sub.wait_for(topic, timeout=20)
        http = proc.wait_for_event("http_listening", timeout=10)
        status = request(http["server.port"], "GET", "/status").json()
        assert status["connection"]["broker"] == url
    finally:
        proc.stop()
        sub.stop()
        broker.stop()


def test_alpn_protocols_reach_the_tls_server(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    """--tls-alpn x-amzn-mqtt-ca,mqtt: the TLS server that wants x-amzn-mqtt-ca gets it
    (without ALPN in the ClientHello, it would select none)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    port = server.getsockname()[1]
    proc = launch(
        tmp_path,
        unique_topic("alpn"),
        *("--broker", f"mqtts://127.0.0.1:{port}", "--cafile", str(pki / "ca.pem")),
        *("--tls-alpn", "x-amzn-mqtt-ca,mqtt"),
        port=port,
    )
    try:
        conn, _ = server.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            assert tls.selected_alpn_protocol() == "x-amzn-mqtt-ca"
    finally:
        proc.stop()
        server.close()
