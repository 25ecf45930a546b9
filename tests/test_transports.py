"""Broker URLs on the wire: the real service publishing over ws:// and wss:// (amqtt: Debian's
Mosquitto here is built without WebSockets) and mqtts:// (Mosquitto), ALPN reaching the TLS
server, the WebSocket path reaching the HTTP server, and logs and /status naming the URL."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.support import (
    Mosquitto,
    ServiceProcess,
    Subscriber,
    cli_args,
    entry,
    free_port,
    request,
    unique_topic,
    wait_until,
    write_config,
)
from tests.test_security import pki, tls_listener  # noqa: F401 - the module's CA fixture

# ---- an amqtt broker with a TCP and a WebSocket listener --------------------------------------


class Amqtt:
    """amqtt (MQTT 3.1.1) in this process, on its own asyncio loop in a thread: a TCP listener
    for the test's subscriber and a WebSocket one (with TLS if given a certificate) for the
    service. A stopped one can be started again on the same ports."""

    def __init__(self, cert: tuple[Path, Path] | None = None) -> None:
        self.tcp_port, self.ws_port = free_port(), free_port()
        self.cert = cert
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None

    def config(self) -> dict[str, Any]:
        ws: dict[str, Any] = {"type": "ws", "bind": f"127.0.0.1:{self.ws_port}"}
        if self.cert is not None:
            ws |= {"ssl": True, "certfile": str(self.cert[0]), "keyfile": str(self.cert[1])}
        return {
            "listeners": {
                "default": {"type": "tcp", "bind": f"127.0.0.1:{self.tcp_port}"},
                "ws": ws,
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def start(self) -> Amqtt:
        from amqtt.broker import Broker  # noqa: PLC0415 - the demo extra, as in cli/demo.py

        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._broker = Broker(self.config(), loop=loop)
            loop.run_until_complete(self._broker.start())
            started.set()
            loop.run_forever()
            loop.close()  # after stop(): the thread ends with its loop

        threading.Thread(target=run, name="amqtt", daemon=True).start()
        assert started.wait(20), "amqtt did not start"
        self._loop = loop
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)


class Subscriber311:
    """A recording MQTT 3.1.1 subscriber (amqtt speaks no MQTT 5)."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[bytes] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append(bytes(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(15), "subscription not acknowledged"

    def wait_for(self, count: int, timeout: float = 30) -> None:
        wait_until(lambda: len(self.messages) >= count, timeout, message=f"{count} messages")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def amqtt() -> Iterator[Amqtt]:
    broker = Amqtt().start()
    yield broker
    broker.stop()


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
    sub = Subscriber311(amqtt.tcp_port, topic)
    url = f"ws://127.0.0.1:{amqtt.ws_port}/mqtt"
    proc = launch(tmp_path, topic, "--broker", url, "--mqtt-version", "3.1.1", port=amqtt.ws_port)
    try:
        connected = proc.wait_for_event("mqtt_connected", timeout=30)
        assert connected["url.full"] == url
        assert (connected["server.address"], connected["server.port"]) == (
            "127.0.0.1",
            amqtt.ws_port,
        )
        sub.wait_for(2)
        sub.stop()
        amqtt.stop()
        proc.wait_for_event("mqtt_disconnected", timeout=30)
        amqtt.start()
        again = Subscriber311(amqtt.tcp_port, topic)
        again.wait_for(2)
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
    broker = Amqtt(cert=(pki / "server.pem", pki / "server.key")).start()
    try:
        topic = unique_topic("wss")
        sub = Subscriber311(broker.tcp_port, topic)
        url = f"wss://localhost:{broker.ws_port}/mqtt"
        proc = launch(
            tmp_path,
            topic,
            *("--broker", url, "--cafile", str(pki / "ca.pem"), "--mqtt-version", "3.1.1"),
            port=broker.ws_port,
        )
        try:
            assert proc.wait_for_event("mqtt_connected", timeout=30)["url.full"] == url
            sub.wait_for(3)
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
