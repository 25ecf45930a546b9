"""Brokers other than Mosquitto, each a real process on free loopback ports, for the
wire-level checks that run against every broker (tests/test_brokers.py):

- `Amqtt`: amqtt (the demo's broker, MQTT 3.1.1) with a TCP and a WebSocket listener, started
  through its own CLI from a generated YAML file;
- `RabbitMq`: Debian's `rabbitmq-server` as a node of its own (its own node name, data, logs,
  config, ports and epmd), with the MQTT plugin on (MQTT 3.1.1);
- `AckDroppingProxy`: in front of a real broker, it withholds the broker's acknowledgements,
  as a broker would that takes QoS 1/2 messages and never completes them.

Both have Mosquitto's shape (tests/support.py): `start()`, `stop()`, `restart()`, `port`.
Nothing here sleeps to synchronise: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.netproxy import packet_end
from tests.support import Subscriber, free_port, wait_until

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM the process group, SIGKILL it if it outlives `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Amqtt:
    """amqtt's broker in a process of its own: a TCP listener on `tcp_port` (also `port`) and
    a WebSocket one on `ws_port` (paho's default path `/mqtt` is served), anonymous logins
    allowed. Its output goes to `log`."""

    def __init__(self, workdir: Path, cert: tuple[Path, Path] | None = None) -> None:
        self.workdir = workdir
        self.cert = cert  # the WebSocket listener's certificate and key: wss:// when given
        self.tcp_port = free_port()
        self.ws_port = free_port()
        self.conf = workdir / f"amqtt-{self.tcp_port}.yaml"
        self.log = workdir / f"amqtt-{self.tcp_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.tcp_port

    def start(self) -> None:
        self.conf.write_text(
            "listeners:\n"
            "  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.tcp_port}\n"
            "  ws:\n    type: ws\n"
            f"    bind: 127.0.0.1:{self.ws_port}\n"
            f"{self._tls()}"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        exe = Path(sys.executable).with_name("amqtt")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(
            lambda: self._running() and accepts(self.tcp_port) and accepts(self.ws_port),
            20,
            message=f"amqtt on ports {self.tcp_port} (tcp) and {self.ws_port} (ws)",
        )

    def _tls(self) -> str:
        if self.cert is None:
            return ""
        return f"    ssl: on\n    certfile: {self.cert[0]}\n    keyfile: {self.cert[1]}\n"

    def _running(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"amqtt exited ({self.proc.returncode}): {self.log.read_text()}")
        return True

    def stop(self) -> None:
        _stop(self.proc, 10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RabbitMq:
    """A RabbitMQ node of its own with the MQTT plugin: a unique node name, its data, logs,
    config and enabled-plugins file under `workdir`, free ports for AMQP, MQTT, the Erlang
    distribution and an epmd of its own (ERL_EPMD_PORT), so that a system RabbitMQ that
    Debian's package started on the default ports is neither used nor disturbed. Anonymous
    MQTT logins are the `guest` user, which RabbitMQ allows on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.node = f"sp-test-{uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port = free_port()
        self.mqtt_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.log = workdir / "rabbitmq.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return self.mqtt_port

    @staticmethod
    def available() -> bool:
        return RABBITMQ_SERVER.exists() and shutil.which("erl") is not None

    def _environ(self) -> dict[str, str]:
        base = self.workdir
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(base),  # its own Erlang cookie, not root's
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        }

    def _write_config(self) -> None:
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.1 = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            "log.console = false\n"
        )
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")

    def start(self) -> None:
        """Start the node (seconds: the fixture is session-scoped) and wait for MQTT."""
        self._write_config()
        with self.log.open("ab") as log:
            if self.epmd is None:
                # Our own epmd, in the foreground: the one erl would start is a daemon that
                # outlives the node.
                self.epmd = subprocess.Popen(
                    ["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                wait_until(lambda: accepts(self.epmd_port), 10, message="epmd")
            self.proc = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                env=self._environ(),
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its beam and epmd go with the group at stop()
            )
        wait_until(self._ready, 90, 0.1, message=f"RabbitMQ's MQTT on port {self.mqtt_port}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"rabbitmq-server exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}"
            )
        return accepts(self.mqtt_port)

    def stop(self) -> None:
        """Stop the node; its epmd stays for a restart (see close())."""
        _stop(self.proc, 30)
        self.proc = None

    def close(self) -> None:
        """Stop the node and its epmd."""
        self.stop()
        _stop(self.epmd, 10)
        self.epmd = None

    def restart(self) -> None:
        self.stop()
        self.start()


class AckDroppingProxy:
    """A loopback TCP proxy in front of a real broker that forwards every packet except the
    broker's packets of the types in `drop` (PUBACK 4, PUBREC 5, PUBCOMP 7): a broker that
    takes a QoS 1/2 message and never acknowledges it, while answering everything else
    (PINGREQ included)."""

    def __init__(self, broker_port: int, drop: frozenset[int]) -> None:
        self.broker_port = broker_port
        self.drop = drop
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> AckDroppingProxy:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stopped.set()
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(5)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.broker_port))
            self._sockets += [client, broker]
            self._spawn(self._copy, client, broker)
            self._spawn(self._filter, broker, client)

    def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(16384):
                dst.sendall(data)
        _shut(dst)

    def _filter(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = bytearray()
        with contextlib.suppress(OSError):
            while data := src.recv(16384):
                buffer += data
                while (end := packet_end(buffer, 0)) is not None:
                    packet, buffer = bytes(buffer[:end]), buffer[end:]
                    if packet[0] >> 4 not in self.drop:
                        dst.sendall(packet)
        _shut(dst)


def _shut(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


def broker_subscriber(
    port: int, topics: list[str], qos: int = 2, *, mqtt5: bool, transport: str = "tcp"
) -> Subscriber:
    """support.Subscriber, speaking MQTT 3.1.1 where the broker knows no 5, over `transport`."""
    sub = Subscriber(port, topics, qos)
    if mqtt5 and transport == "tcp":
        return sub
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"sub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311,
        transport="websockets" if transport == "websockets" else "tcp",
    )
    client.on_connect = sub.client.on_connect
    client.on_message = sub.client.on_message
    client.on_subscribe = sub.client.on_subscribe
    sub.client = client
    return sub
