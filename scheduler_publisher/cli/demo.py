"""Quick-start helpers: an in-process broker (amqtt, the `demo` extra) and an echo subscriber.

Neither is used in production. amqtt speaks MQTT 3.1.1 only, so the CLI switches the service
to 3.1.1 when it runs against the embedded broker.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt


# amqtt and its state machine (transitions) log every connection, session and state change at
# INFO: the demo's output was mostly theirs. Their warnings still show; DEBUG shows it all.
BROKER_LOGGERS = ("amqtt", "transitions")


class DemoError(Exception):
    """The demo parts could not start."""


def quiet_broker_logs(level: str) -> None:
    """The embedded broker's loggers at WARNING, unless `level` (--log-level) asks for DEBUG."""
    if level.upper() != "DEBUG":
        for name in BROKER_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt's broker on its own asyncio loop in a daemon thread, on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._broker: Any = None

    def start(self, timeout: float = 15.0) -> None:
        try:
            from amqtt.broker import Broker  # noqa: PLC0415 - optional dependency
        except ImportError as exc:
            raise DemoError(
                "--embedded-broker needs the demo extra: pip install 'scheduler-publisher[demo]'"
            ) from exc
        _check_port_free(self.port)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        threading.Thread(
            target=self._run, args=(Broker, config), name="embedded-broker", daemon=True
        ).start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise DemoError(f"embedded broker did not start on port {self.port}: {self._error}")

    def _run(self, broker_cls: Any, config: dict[str, Any]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._broker = broker_cls(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except Exception as exc:  # noqa: BLE001 - reported to start(), raised there as DemoError
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._broker is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                future.result(5)
            except Exception as exc:  # noqa: BLE001 - best effort at exit; the process ends anyway
                self._error = exc
            self._loop.call_soon_threadsafe(self._loop.stop)


def _check_port_free(port: int) -> None:
    """Fail in one line before amqtt does, which logs a 15-line traceback for a busy port."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # The same option asyncio's create_server sets, so the two agree on what "busy" means.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise DemoError(
                f"embedded broker cannot listen on 127.0.0.1:{port}: {exc.strerror}"
            ) from None
        raise DemoError(
            f"port {port} on 127.0.0.1 is already in use (another MQTT broker?); "
            f"pick a free one with --port, for example `scripts/demo --port "
            f"{port + 10000 if port < 55535 else 11883}`"
        ) from None
    finally:
        probe.close()


class EchoSubscriber:
    """Subscribes to everything and hands each message to `show` (the CLI prints it)."""

    def __init__(self, host: str, port: int, show: Callable[[str, bytes, bool], None]) -> None:
        # Imported here so that the CLI, which imports this module, does not load paho for
        # `validate` and the other commands that never connect.
        import paho.mqtt.client as mqtt  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="", protocol=MQTTProtocolVersion.MQTTv311
        )
        self._subscribed = threading.Event()
        self._show = show
        # A marker of our own, published at stop and not shown (see stop()).
        self._marker = f"scheduler-publisher/demo-echo/{uuid.uuid4().hex}"
        self._marker_back = threading.Event()
        self._client.on_connect = lambda c, *_: c.subscribe("#")
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect_async(host, port)

    def _on_message(self, _c: mqtt.Client, _u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic == self._marker:
            self._marker_back.set()
            return
        self._show(m.topic, bytes(m.payload), bool(m.retain))

    def start(self, timeout: float = 5.0) -> None:
        """Returns once subscribed (or after `timeout`; it keeps trying): started before the
        service, it then shows the first publish of every entry, not only the retained ones."""
        self._client.loop_start()
        self._subscribed.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Called after the service has closed its connections and before the broker stops.
        The broker may still be forwarding their last messages (the offline payloads of the
        lwt entries): a marker published now comes back after them, so they are shown before
        the echo disconnects (issue 11 #4)."""
        if self._subscribed.is_set():
            self._client.publish(self._marker, b"", qos=1)
            self._marker_back.wait(timeout)
        self._client.disconnect()
        self._client.loop_stop()
