"""The paho client of a session: how it is built (protocol, credentials, TLS, will, MQTT 5
properties), the wrapper that notes a reset by the broker, and words for paho's reason codes.
A Session (session.py) drives it; only the network thread calls it (see there)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from scheduler_publisher.config.loader import MessageProperties
from scheduler_publisher.mqtt.packet import check_paho

if TYPE_CHECKING:
    from scheduler_publisher.mqtt.session import Session, Will
    from scheduler_publisher.settings import BrokerSettings

PAHO_LOGGER = logging.getLogger("paho.mqtt.client")


class ResetAwareClient(mqtt.Client):
    """paho's client, noting when the broker reset the connection: paho reports a reset and a
    clean close alike ("Unspecified error"), and a reset is how an MQTT 5 broker's DISCONNECT
    for a refused packet gets lost (`Session.may_blame_a_packet`). Overrides paho's socket
    wrappers `_sock_recv` and `_sock_send`, which `check_paho` checks exist.

    It also sends a PINGREQ on demand (`ping`) and reports the PINGRESP (`on_pong`): a broker
    handles one connection's packets in order, so the answer proves it took every packet
    written before the PINGREQ (mqtt/faults.py's probes).

    And it notes a PUBACK that answers a QoS 2 PUBLISH (`qos2_acked_as_qos1`): RabbitMQ's MQTT
    plugin does so, having handled the message as QoS 1; paho takes it as done and says
    nothing (mqtt/capabilities.py). Overrides `_handle_pubackcomp`, which `check_paho` checks."""

    _reset = False
    qos2_acked_as_qos1 = False
    on_pong: Callable[[], None] | None = None

    def ping(self) -> None:
        self._send_pingreq()

    def _handle_pingresp(self) -> MQTTErrorCode:
        rc = super()._handle_pingresp()
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self.on_pong is not None:
            self.on_pong()
        return rc

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        if cmd == "PUBACK" and not self.qos2_acked_as_qos1:
            # Before paho settles it: the packet's message id is its first two bytes.
            packet = self._in_packet["packet"]
            mid = int.from_bytes(packet[:2], "big") if len(packet) >= 2 else -1
            with self._out_message_mutex:
                message = self._out_messages.get(mid)
            if message is not None and message.qos == 2:
                self.qos2_acked_as_qos1 = True
        return super()._handle_pubackcomp(cmd)

    def reconnect(self) -> MQTTErrorCode:
        self._reset = False  # a new socket: a loss of the old one noted but never reported
        return super().reconnect()

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            return super()._sock_recv(bufsize)
        except ConnectionResetError:
            self._reset = True
            raise

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except ConnectionResetError:
            self._reset = True
            raise

    def take_reset(self) -> bool:
        """Whether the connection just lost was reset, and forget it for the next one."""
        reset, self._reset = self._reset, False
        return reset


def paho_client(session: Session) -> mqtt.Client:
    """The real client for `session`: its protocol, credentials, TLS, will and callbacks."""
    s = session.settings
    endpoint = session.endpoint or s.brokers[0]  # the broker in use (see Session.endpoint)
    protocol = MQTTProtocolVersion.MQTTv5 if session.is_v5 else MQTTProtocolVersion.MQTTv311
    client = ResetAwareClient(
        CallbackAPIVersion.VERSION2,
        client_id=session.client_id,
        protocol=protocol,
        transport=endpoint.transport,
        reconnect_on_failure=False,
    )
    if endpoint.transport == "websockets":
        client.ws_set_options(path=endpoint.path)
    check_paho(client)  # pre-encoded packets go through its out-queue (packet.py)
    client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
    client.enable_logger(PAHO_LOGGER)
    client.connect_timeout = s.connect_timeout
    client.max_inflight_messages_set(s.max_inflight)
    if s.username is not None:
        client.username_pw_set(s.username, s.password)
    if endpoint.tls:
        _set_tls(client, s)
    if session.will is not None:
        set_will(client, session.will, s)
    session.bind(client)
    client.connect_async(
        endpoint.host, endpoint.port, keepalive=s.keepalive, properties=_connect_properties(s)
    )
    return client


def _set_tls(client: mqtt.Client, settings: BrokerSettings) -> None:
    """TLS as --tls verifies it (the CLI's one context: CA file, client certificate, ALPN),
    or Python's defaults for a caller that named a TLS broker without a context."""
    client.tls_set_context(settings.tls_context or ssl.create_default_context())
    client.tls_insecure_set(settings.tls_insecure)


def set_will(client: mqtt.Client, will: Will, settings: BrokerSettings) -> None:
    client.will_set(
        will.topic,
        will.payload,
        will.qos,
        will.retain,
        properties=_will_properties(settings, will.properties),
    )


def _will_properties(
    settings: BrokerSettings, entry: MessageProperties | None
) -> Properties | None:
    if settings.protocol != "5" or (settings.will_delay <= 0 and entry is None):
        return None
    props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
    if entry is not None:
        _fill(props, entry)
    if settings.will_delay > 0:
        props.WillDelayInterval = settings.will_delay
    return props


class PackedOnce(Properties):
    """Properties that pack once. paho packs a PUBLISH's properties again for every publish,
    and its pack() walks every property name MQTT 5 defines (about 45 µs, docs/design.md);
    an entry's properties never change once built, so their bytes are kept."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()  # type: ignore[no-untyped-call]
            # Around Properties.__setattr__, which takes only property names.
            object.__setattr__(self, "_packed", packed)
        return packed


def publish_properties(entry: MessageProperties) -> Properties:
    """An entry's properties as paho sends them in a PUBLISH (MQTT 5 only)."""
    props = PackedOnce(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    _fill(props, entry)
    return props


def _fill(props: Properties, entry: MessageProperties) -> None:
    if entry.message_expiry is not None:
        props.MessageExpiryInterval = entry.message_expiry
    if entry.content_type is not None:
        props.ContentType = entry.content_type
    if entry.user_properties:
        # A list in one assignment keeps the file's order (paho appends, MQTT 5 3.3.2.3.7).
        props.UserProperty = list(entry.user_properties)
    if entry.payload_format_utf8:
        props.PayloadFormatIndicator = 1


def _connect_properties(settings: BrokerSettings) -> Properties | None:
    if settings.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    # The broker publishes a delayed will when the delay ends or the session ends, whichever
    # comes first (MQTT 5 3.1.3.2.2 Will Delay Interval); the session ends after its Session
    # Expiry Interval (3.1.2.11.2), 0 unless set. So the session must outlive the delay, or
    # the will would go out at once (docs/design.md, "Graceful stop").
    if settings.will_delay > 0:
        props.SessionExpiryInterval = settings.will_delay + 30
    return props


def describe_reason(reason: ReasonCode | int) -> str:
    """Words for a paho reason code ("not authorized", "session taken over"), never a bare
    number."""
    if isinstance(reason, ReasonCode):
        return str(reason.getName()).lower()
    return str(mqtt.error_string(reason))


def describe_error(exc: BaseException) -> str:
    """Words for a failed connect attempt, naming a certificate problem when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "connect timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return f"{type(exc).__name__}: {exc}"


DISCONNECT_WITH_WILL = ReasonCode(PacketTypes.DISCONNECT, identifier=4)
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: another client connected with our id
