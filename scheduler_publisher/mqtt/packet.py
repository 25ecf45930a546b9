"""Pre-encoded QoS 0 PUBLISH packets, written through paho's own out-queue.

A static entry at QoS 0 sends the same bytes on every tick: encoding the packet once per
config version (`static_header`) and appending it to the connection's socket queue takes
paho's per-message work off the hot path (a `MQTTMessageInfo` with its `Condition`, the
encoding, and for every written QoS 0 packet a `Properties` and a `ReasonCode` built for
`on_publish`; docs/design.md, "CPU per message: profile").

The bytes still go through the socket paho owns, on the network thread, in order with paho's
own packets: `PacketQueue` appends them to paho's out-queue (`Client._out_packet`) as one more
queued packet, which paho's `loop_write` writes and resumes after a partial write like any
other. Consecutive packets share one queue item, so a phase group reaches the socket in one
`send()`. Keepalive needs nothing from us: paho 2.1/2.2 moves its `_last_msg_out` only when it
pings, reconnects or disconnects, never for a written PUBLISH, so it pings every keepalive
whatever else is written.

paho-mqtt has no public API for this. The internals used are checked by `check_paho` and
tests/test_packet.py, and setup.cfg pins the versions they were read in.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    import paho.mqtt.client as mqtt

    from scheduler_publisher.config.loader import PublishConfig
    from scheduler_publisher.settings import MQTTVersion

PUBLISH = 0x30
MAX_REMAINING_LENGTH = 268_435_455  # MQTT 3.1.1 2.2.3 / MQTT 5 1.5.5: four varint bytes
MAX_TOPIC_BYTES = 65_535  # a UTF-8 string's two-byte length prefix (1.5.3 / 1.5.4)
# The command byte of our queue items. 0 is a reserved MQTT packet type that paho never
# queues itself, so `_packet_write` treats the item as plain bytes: no on_publish, no
# DISCONNECT handling (paho-mqtt 2.2 client.py, `_packet_write`).
RAW_COMMAND = 0


def has_static_packet(entry: PublishConfig) -> bool:
    """Whether every tick of the entry sends the same bytes: the one branch point between the
    pre-encoded path and paho's `publish`.

    Only at QoS 0 (QoS 1/2 need a packet id and paho's in-flight tracking), with nothing
    rendered per publish (a template) and no MQTT 5 properties: such an entry stays on paho's
    path, which renders and packs them."""
    return entry.qos == 0 and entry.renderer is None and entry.properties is None


def static_header(entry: PublishConfig, protocol: MQTTVersion) -> bytes | None:
    """The entry's PUBLISH packet up to its payload (`entry.payload` follows it on the wire),
    if it has a static packet (`has_static_packet`), else None. Only the header is kept: the
    payload bytes are the config's own, not a second copy per entry."""
    if not has_static_packet(entry):
        return None
    return publish_header(entry.topic, len(entry.payload), retain=entry.retain, protocol=protocol)


def encode_qos0(topic: str, payload: bytes, *, retain: bool, protocol: MQTTVersion) -> bytes | None:
    """A whole QoS 0 PUBLISH packet, or None (see `publish_header`)."""
    header = publish_header(topic, len(payload), retain=retain, protocol=protocol)
    return None if header is None else header + payload


def publish_header(
    topic: str, payload_length: int, *, retain: bool, protocol: MQTTVersion
) -> bytes | None:
    """A QoS 0 PUBLISH as paho 2.x encodes it (`Client._send_publish`), up to the payload:
    fixed header, topic, for MQTT 5 an empty property set. None for what paho's `publish`
    would refuse (a wildcard or oversized topic, an oversized packet), so that the refusal is
    reported where it is today."""
    name = topic.encode("utf-8")
    if not name or b"+" in name or b"#" in name or len(name) > MAX_TOPIC_BYTES:
        return None
    properties = b"\x00" if protocol == "5" else b""  # property length 0 (MQTT 5 3.3.2.3)
    remaining = 2 + len(name) + len(properties) + payload_length
    if remaining > MAX_REMAINING_LENGTH:
        return None
    return b"".join(
        (
            bytes((PUBLISH | int(retain),)),
            _varint(remaining),
            struct.pack("!H", len(name)),
            name,
            properties,
        )
    )


def _varint(value: int) -> bytes:
    """MQTT's Variable Byte Integer (MQTT 5 1.5.5): seven bits a byte, low first."""
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@dataclass(slots=True)
class _Batch:
    """One item of paho's out-queue holding our packets, and whose they are."""

    item: Any  # paho's _OutPacket, a TypedDict paho defines only for type checkers
    entry_ids: list[str] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class PacketQueue:
    """Pre-encoded packets of one connection that paho has not written yet. Network thread
    only, like the client it writes through."""

    batches: collections.deque[_Batch] = field(default_factory=collections.deque)

    def put(self, client: mqtt.Client, header: bytes, payload: bytes, entry_id: str) -> None:
        """Queue the packet `header` + `payload` behind everything paho has queued. While our
        last item is still the newest in paho's queue the packet joins it (one `send()` for
        the lot); once paho has queued a packet of its own behind it, a new item keeps the
        order."""
        out = client._out_packet  # paho-internal: see the module docstring
        last = self.batches[-1] if self.batches else None
        if last is not None and out and out[-1] is last.item:
            buffer = last.item["packet"]
            buffer += header
            buffer += payload
            last.item["to_process"] += len(header) + len(payload)
        else:
            item: Any = {
                "command": RAW_COMMAND,
                "mid": 0,
                "qos": 0,
                "pos": 0,
                "to_process": len(header) + len(payload),
                "packet": bytearray(header) + payload,
                "info": None,
            }
            out.append(item)
            last = _Batch(item)
            self.batches.append(last)
        last.entry_ids.append(entry_id)

    def unwritten_bytes(self) -> int:
        """Bytes of the newest item not yet written (what the next `send()` would carry)."""
        return self.batches[-1].item["to_process"] if self.batches else 0

    def written(self) -> Iterator[str]:
        """The entries of every packet paho has written since the last call, oldest first."""
        batches = self.batches
        while batches and batches[0].item["to_process"] == 0:
            yield from batches.popleft().entry_ids

    def drop(self) -> list[str]:
        """The connection is gone: the entries of every packet not (wholly) written. paho
        clears its out-queue on the next connect, so these bytes never reach another socket."""
        lost = [
            entry_id
            for batch in self.batches
            if batch.item["to_process"]
            for entry_id in batch.entry_ids
        ]
        self.batches.clear()
        return lost


def check_paho(client: mqtt.Client) -> None:
    """Raise if the installed paho lacks an internal we use: the out-queue PacketQueue writes
    through, and the socket wrappers that note a reset."""
    # client.ResetAwareClient wraps these
    for name in (
        "_sock_recv",
        "_sock_send",
        "_send_pingreq",
        "_handle_pingresp",
        "_handle_pubackcomp",
    ):
        if not callable(getattr(client, name, None)):
            raise TypeError(
                f"paho-mqtt's Client has no {name}: this paho version is not one "
                "the reset detection was checked against (setup.cfg)"
            )
    out = getattr(client, "_out_packet", None)
    if not isinstance(out, collections.deque):
        raise TypeError(
            "paho-mqtt's Client._out_packet is not a deque: this paho version is "
            "not one the pre-encoded QoS 0 path was checked against (setup.cfg)"
        )
