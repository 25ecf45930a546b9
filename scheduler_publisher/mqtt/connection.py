"""MQTTConnectionManager: which connection carries which entry, wills, and what goes on the wire.

Entries without `lwt` share the main connection, which also carries the service's retained
status topic (`{"online": 1}`, and `{"online": 0}` as its will). Each `lwt: true` entry gets a
connection of its own whose will is the entry's `{"online": 0, ...data}`: MQTT carries one will
per connection, so this is the only way the broker itself can announce every entry offline.

This module routes: it decides which connection carries which entry and what to publish
when. It knows connections only by `LinkKey`, asks the network loop (netloop.py) to open, use
and end them, and reads them through `SessionView`; each connection's lifecycle is the state
machine in session.py.

Threads: the public methods may be called from any thread; they hand work to the network
thread (netloop.py), which owns every Session and every paho call. `_entries` is the network
thread's view of the running entries, replaced whole by `set_entries`.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from paho.mqtt.properties import Properties

from scheduler_publisher.config.loader import MessageProperties, PublishConfig
from scheduler_publisher.config.template import Moment, Template
from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.mqtt.capabilities import DOES, UNLIMITED, Feature, affected
from scheduler_publisher.mqtt.client import publish_properties
from scheduler_publisher.mqtt.faults import FaultSearch, Probe, Quarantine
from scheduler_publisher.mqtt.netloop import NetworkLoop, SessionView
from scheduler_publisher.mqtt.packet import has_static_packet, static_header
from scheduler_publisher.mqtt.session import MAIN_LINK, LinkKey, State, Will
from scheduler_publisher.settings import BrokerSettings
from scheduler_publisher.stats import Stats

log = get_logger("scheduler_publisher.connection")
V311_HINT = "the broker may speak MQTT 3.1.1 only (amqtt, RabbitMQ 3.x): try --mqtt-version 3.1.1"

BIRTH_CHUNK = 500  # publishes per network-loop turn when a connection comes up
MAX_PENDING_RAW = 10_000  # raw QoS>0 publishes kept (newest per topic) while disconnected
STATUS_ONLINE = b'{"online":1}'
STATUS_OFFLINE = b'{"online":0}'
STATUS_SAMPLE = 20  # entries named in /status and /health when many have no connection
RECENT_PUBLISHES = 4096  # publishes on the main connection remembered for attribution
# A probe (entries published alone, then a PINGREQ) is cleared by the PINGRESP: the broker
# took every packet before it. Without one within PROBE_TIMEOUT the probe is cleared all the
# same (no evidence against it). A client that cannot ping: cleared when the broker has not
# dropped the connection within PROBE_WINDOW, or four connect round trips if longer.
PROBE_TIMEOUT = 10.0
PROBE_WINDOW = 0.5


def entry_will(entry: PublishConfig, render: Callable[[str], bytes] | None = None) -> Will:
    return Will(
        entry.topic,
        entry.offline_payload,
        entry.qos,
        entry.retain,
        render=render,
        properties=entry.properties,
    )


class MQTTConnectionManager:
    """The service's MQTT side: one shared main connection, one connection per lwt entry,
    and which of them carries each entry.

    Args:
        settings: the broker, credentials, TLS, protocol, client id, keepalive, backoff,
            connect rate, will delay and `max_retries` (settings.BrokerSettings).
        stats: where publishes, drops, deferrals, errors and reconnects are counted; the
            network thread is the one writer of its per-entry counters. A fresh `Stats` if
            omitted.
        on_give_up: called once, on the network thread, with the last failure's reason when
            the main connection has failed `settings.max_retries` attempts in a row.
        clear_retained_on_remove: publish an empty retained message to the topic of a removed
            entry that was retained, so that the broker forgets its last payload.

    Nothing connects until `connect()`; `disconnect()` stops gracefully (wills, reason 0x04).
    """

    def __init__(
        self,
        settings: BrokerSettings,
        stats: Stats | None = None,
        *,
        on_give_up: Callable[[str], None] | None = None,
        clear_retained_on_remove: bool = False,
    ) -> None:
        self.settings = settings
        self.stats = stats or Stats()
        self._on_give_up = on_give_up
        self._clear_retained = clear_retained_on_remove
        self._loop = NetworkLoop(settings, self)
        self._entries: dict[str, PublishConfig] = {}
        # MQTT 5: the PUBLISH properties of each entry that has some, built once per config
        # version (equal ones shared), never per publish; replaced whole by set_entries.
        self._wire_properties: dict[str, Properties] = {}
        # entry id -> its pre-encoded QoS 0 PUBLISH header (packet.py), for the entries that
        # have one; network thread only, rebuilt with `_entries`
        self._headers: dict[str, bytes] = {}
        self._pending_raw: OrderedDict[str, tuple[bytes, int, bool]] = OrderedDict()
        self._main_up = threading.Event()
        self._all_closed = threading.Event()
        self._drained = threading.Event()
        self._draining = False
        self._started = False
        self._gave_up = False
        self._conflicts_warned: set[LinkKey] = set()
        self._warned: dict[LinkKey, str] = {}  # an entry connection's refusal logged at warning
        self._recent: deque[tuple[float, str]] = deque(maxlen=RECENT_PUBLISHES)
        self._faults = FaultSearch()  # network thread; its `quarantined` is read by any
        self._searching = False  # suspects, a probe or quarantined entries: the slow path
        self._birth_due = False  # the main connection's birth waits for the probes
        self._probe_pinged = False  # the probe out was followed by a PINGREQ
        self._main_born_at = 0.0  # monotonic: the main connection's last birth publishes
        self._probed: set[str] = set()  # published by a probe on this main connection
        self._cron_missed: set[str] = set()  # cron entries whose missed slot was logged
        # The broker limits last looked at, and per missing feature the entries said so far
        self._limits_seen = UNLIMITED
        self._said_missing: dict[Feature, frozenset[str]] = {}
        self._hostname = socket.gethostname()  # for {{hostname}}

    @property
    def _broker(self) -> str:
        """The URL of the broker in use (any thread), as logs and /status show it: never a
        password (endpoints.py)."""
        return self._loop.endpoint.url

    # ---- public API (any thread) ------------------------------------------------------------
    def connect(self, wait: float = 0.0) -> bool:
        """Start connecting (in the background, retried with backoff) and return whether the
        main connection is up after waiting at most `wait` seconds. A broker that is down is
        not an error: the connection comes up when the broker does."""
        if not self._started:
            self._started = True
            self._loop.start()
            self._loop.call_soon(self._open_main)
        if wait > 0:
            self._main_up.wait(wait)
        return self.is_connected()

    def is_connected(self) -> bool:
        return self._main_up.is_set()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Publish on the main connection. QoS 0 while disconnected returns False (dropped);
        QoS 1/2 keeps the newest message per topic and sends it on reconnect."""
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if qos == 0 and not self.is_connected():
            return False
        self._loop.call_soon(lambda: self._publish_raw(topic, data, qos, retain))
        return True

    def set_entries(self, entries: Mapping[str, PublishConfig]) -> None:
        snapshot = dict(entries)
        self._loop.call_soon(lambda: self._apply_entries(snapshot))

    def publish_entry(self, entry_id: str, slot: datetime | None = None, missed: int = 0) -> None:
        """Publish the entry's current version, from any thread: `tick`, on the network thread
        (at once there, handed over from any other)."""
        if self._loop.in_loop_thread:
            self.tick(entry_id, slot, missed)
        else:
            self._loop.call_soon(lambda: self.tick(entry_id, slot, missed))

    @property
    def event_loop(self) -> NetworkLoop:
        """The network thread's loop, which also runs the scheduler (scheduling.LoopScheduler)."""
        return self._loop

    def disconnect(self, timeout: float = 3.0) -> None:
        """Graceful stop: let in-flight QoS>0 messages reach the broker, announce every lwt
        entry (and the status topic) offline, disconnect, stop the network thread."""
        if not self._started:
            return
        deadline = time.monotonic() + timeout
        self._loop.call_soon(self._start_drain)
        self._drained.wait(max(0.0, timeout / 2))
        self._loop.call_soon(self._close_all)
        self._all_closed.wait(max(0.0, deadline - time.monotonic()))
        self._loop.stop(max(0.1, deadline - time.monotonic()))
        self._main_up.clear()

    def is_healthy(self, max_silence: float = 10.0) -> bool:
        return self._loop.is_alive() and time.monotonic() - self._loop.heartbeat < max_silence

    def connection_counts(self) -> tuple[int, int]:
        links = self._loop.sessions()
        return len(links), sum(1 for lk in links if lk.is_up)

    def status(self) -> dict[str, Any]:
        """Any thread: a view built from the network thread's links (read, never changed)."""
        links = self._loop.sessions()
        main = self._loop.get(MAIN_LINK)
        down = [lk for lk in links if not lk.key.is_main and not lk.is_up]
        conflicts = [lk.conflict for lk in links if lk.conflict is not None]
        return {
            "connected": self.is_connected(),
            "connections": len(links),
            "connections_up": sum(1 for lk in links if lk.is_up),
            "broker": self._broker,
            "brokers": [endpoint.url for endpoint in self._loop.brokers],
            "protocol": self.settings.protocol,
            "client_id": self.settings.client_id,
            "last_error": main.last_error if main else None,
            "client_id_conflict": conflicts[0] if conflicts else None,
            "entries_without_connection": self._unconnected(main, down),
            "quarantined_entries": {
                i: _why(q) for i, q in sorted(self._faults.quarantined.items())
            },
        }

    def quarantined(self, entry_id: str) -> str | None:
        """Why the entry is held back (the broker dropped the connection at its publishes)."""
        quarantine = self._faults.quarantined.get(entry_id)
        return None if quarantine is None else _why(quarantine)

    def broker_urls(self) -> tuple[str, tuple[str, ...]]:
        """Any thread: the URL of the broker in use, and every broker's, in failover order."""
        return self._broker, tuple(endpoint.url for endpoint in self._loop.brokers)

    def quarantined_count(self) -> int:
        return len(self._faults.quarantined)

    def _unconnected(self, main: SessionView | None, down: list[SessionView]) -> dict[str, Any]:
        entries = self._entries  # a reference the network thread swaps whole
        shared = (
            0 if main is not None and main.is_up else sum(1 for e in entries.values() if not e.lwt)
        )
        named = sorted(down, key=lambda lk: lk.key.entry_id or "")[:STATUS_SAMPLE]
        return {
            "count": shared + len(down),
            "main_connection_down": shared > 0,
            "lwt_entries": {lk.key.entry_id: lk.last_error or lk.state.value for lk in named},
            "lwt_entries_total": len(down),
        }

    def health_warnings(self) -> list[str]:
        """What an operator should know that is not a liveness problem: connections that are
        not up, and why; a suspected client-id conflict."""
        status = self.status()
        warnings = []
        if status["client_id_conflict"]:
            warnings.append(status["client_id_conflict"])
        unconnected = status["entries_without_connection"]
        if unconnected["main_connection_down"]:
            warnings.append(
                f"main connection to {self._broker} is not up "
                f"({status['last_error'] or 'connecting'}): entries without lwt "
                "and the status topic are not published"
            )
        if unconnected["lwt_entries_total"]:
            named = ", ".join(f"{i} ({why})" for i, why in unconnected["lwt_entries"].items())
            more = unconnected["lwt_entries_total"] - len(unconnected["lwt_entries"])
            warnings.append(
                f"{unconnected['lwt_entries_total']} lwt entries have no "
                f"connection: {named}" + (f" and {more} more" if more else "")
            )
        if status["quarantined_entries"]:
            held = ", ".join(f"{i} ({why})" for i, why in status["quarantined_entries"].items())
            warnings.append(
                f"entries held back because the broker dropped the connection at "
                f"their publishes: {held}"
            )
        return warnings

    # ---- network thread ---------------------------------------------------------------------
    def _open_main(self) -> None:
        topic = self.settings.effective_status_topic
        self._loop.open(MAIN_LINK, self.settings.client_id, Will(topic, STATUS_OFFLINE, 1, True))

    def _open_entry_link(self, entry: PublishConfig) -> None:
        self._loop.open(
            LinkKey(entry.id), self.settings.entry_client_id(entry.id), self._will(entry)
        )

    def _link_for(self, entry: PublishConfig) -> SessionView | None:
        return self._loop.get(LinkKey(entry.id) if entry.lwt else MAIN_LINK)

    def tick(self, entry_id: str, slot: datetime | None = None, missed: int = 0) -> None:
        """The scheduler's tick (scheduling.Tick), network thread only: publish the entry's
        current version. `slot` is the grid slot it was due at and `missed` the slots skipped
        before it; counted here, by the one writer of the entry's counters (stats.py). The
        scheduler runs on this thread (`event_loop`), so the packet goes out with the rest of
        its phase group; any other thread calls `publish_entry`."""
        if slot is not None:
            self.stats.record_tick(entry_id, time.time() - slot.timestamp(), missed)
        self._publish_entry(entry_id)

    def _publish_entry(self, entry_id: str) -> None:
        entry = self._entries.get(entry_id)
        if entry is None:
            return  # removed since the tick was queued
        if self._searching and not entry.lwt and self._held_back(entry_id):
            self._not_sent(entry, "held back while the broker's drops are looked into")
            return
        link = self._loop.get(LinkKey(entry_id) if entry.lwt else MAIN_LINK)
        if link is not None and link.is_up:
            born = self._main_born_at if link.key.is_main else link.connected_at
            if entry.cron is None and time.monotonic() - born < entry.period / 2:
                # The connect published the entry (the birth burst) moments ago: a grid slot
                # this close would publish it twice within half its interval. A cron slot is
                # an appointment and always fires (docs/entries.md, "Cron schedules").
                return
            if not link.saturated(entry_id):
                self._send(link, entry)
                return
            self._not_sent(entry, "the broker is not taking messages")
            return
        self._not_sent(entry, "not connected")

    def _held_back(self, entry_id: str) -> bool:
        """While a probe is out alone nothing else goes on the main connection; suspects wait
        for their probe, quarantined entries for their retry."""
        return self._faults.probe is not None or self._faults.held(entry_id)

    def _not_sent(self, entry: PublishConfig, reason: str) -> None:
        """Down, held back, or up but stalled (the broker stopped reading or acknowledging):
        paho's queues keep at most a few messages per entry, however long it lasts."""
        if entry.qos:
            self.stats.record_deferred(entry.id)  # the birth publish carries the newest
        elif entry.cron is None:
            self.stats.record_dropped(entry.id)
        else:  # an appointment nobody will get: counted and said, once an outage
            self.stats.record_missed(entry.id)
            if entry.id not in self._cron_missed:
                self._cron_missed.add(entry.id)
                log.warning(
                    "cron_slot_missed",
                    entry_id=entry.id,
                    topic=entry.topic,
                    reason=reason,
                    hint="counted in missed_ticks; said once until the entry publishes again",
                )

    def _send(self, link: SessionView, entry: PublishConfig) -> None:
        header = self._headers.get(entry.id)
        if header is not None:  # static QoS 0 (packet.py): its pre-encoded packet
            sent = self._loop.publish_packet(link.key, header, entry.payload, entry.id)
        else:
            # The one branch between static and templated entries: a static entry sends the
            # bytes rendered at load time; a templated one renders fresh bytes for this publish.
            payload = (
                entry.payload
                if entry.renderer is None
                else self._rendered(link, entry.id, entry.renderer)
            )
            # MQTT 5 properties, built once per config version (None: the entry has none)
            properties = self._wire_properties.get(entry.id)
            sent = self._loop.publish(
                link.key, entry.topic, payload, entry.qos, entry.retain, entry.id, properties
            )
        if not sent:
            self.stats.record_error(entry.id, "publish refused by the client")
            return
        if link.key.is_main:
            self._recent.append((time.monotonic(), entry.id))
        if entry.cron is not None:
            self._cron_missed.discard(entry.id)

    def _rendered(self, link: SessionView, entry_id: str, renderer: Template) -> bytes:
        """A templated entry's payload for one publish; each render takes the next {{seq}}."""
        return renderer.render(self._moment(link.client_id, self.stats.next_seq(entry_id)))

    def _moment(self, client_id: str, seq: int) -> Moment:
        return Moment(
            time.time_ns() // 1_000_000, seq, int(self.stats.uptime()), self._hostname, client_id
        )

    def _will(self, entry: PublishConfig) -> Will:
        """The entry's will; a templated one renders at each CONNECT of its connection, with
        the entry's last {{seq}} (it takes none of its own): it holds the values of that
        connect, not of the moment the connection dies (docs/entries.md, "Templated values")."""
        renderer = entry.offline_renderer
        if renderer is None:
            return entry_will(entry)
        entry_id = entry.id

        def render(client_id: str) -> bytes:  # network thread: before a connect attempt
            return renderer.render(self._moment(client_id, self.stats.entry(entry_id).seq))

        return entry_will(entry, render)

    def _publish_raw(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        main = self._loop.get(MAIN_LINK)
        if main is not None and main.is_up:
            self._loop.publish(MAIN_LINK, topic, data, qos, retain, None)
        elif qos > 0:
            self._pending_raw[topic] = (data, qos, retain)
            self._pending_raw.move_to_end(topic)
            while len(self._pending_raw) > MAX_PENDING_RAW:
                self._pending_raw.popitem(last=False)

    def _apply_entries(self, new: dict[str, PublishConfig]) -> None:
        old, self._entries = self._entries, new
        self._prepare_properties(old, new)
        self._headers = self._encode(old, new)
        for entry_id, entry in new.items():
            self.stats.add_entry(entry_id)
            before = old.get(entry_id)
            if (
                entry.properties is not None
                and self.settings.protocol != "5"
                and (before is None or before.properties != entry.properties)
            ):
                self._warn_properties_ignored(entry.id, entry.properties)
            self._apply_one(before, entry)
        for entry_id, gone in old.items():
            if entry_id not in new:
                self._remove_one(gone)
        if self._loop.limits is not UNLIMITED:
            self._say_missing()
        if self.settings.will_delay > 0 and self.settings.protocol != "5":
            lwt = sorted(e.id for e in new.values() if e.lwt)
            self._say("will_delay", lwt, "--mqtt-version 3.1.1 has no Will Delay Interval")

    def _say_missing(self) -> None:
        """Warn once per feature the broker lacks, naming the entries that use it, and again
        when entries that use it are added; the publishes stay within the broker's limits
        (netloop), never dropped in silence (docs/brokers.md)."""
        limits = self._limits_seen = self._loop.limits
        for feature in limits.missing():
            ids = affected(self._entries.values(), feature)
            # qos1 and retain: the status topic's will and birth (QoS 1, retained) lose it too
            if ids or feature != "qos2":
                self._say(feature, ids, limits.said(feature))

    def _say(self, feature: Feature, ids: list[str], detected_by: str) -> None:
        said = self._said_missing.get(feature)
        if said is not None and said.issuperset(ids):
            return
        self._said_missing[feature] = frozenset(ids) | (said or frozenset())
        log.warning(
            "broker_feature_missing",
            feature=feature,
            detected_by=detected_by,
            broker=self._broker,
            entries=ids,
            service_does=DOES[feature],
        )

    def _prepare_properties(
        self, old: dict[str, PublishConfig], new: dict[str, PublishConfig]
    ) -> None:
        if self.settings.protocol != "5":
            return  # MQTT 3.1.1 has no properties: _send never asks for them
        built: dict[MessageProperties | None, Properties] = {
            old[i].properties: props for i, props in self._wire_properties.items() if i in old
        }
        wire = {}
        for entry_id, entry in new.items():
            if entry.properties is not None:
                if entry.properties not in built:
                    built[entry.properties] = publish_properties(entry.properties)
                wire[entry_id] = built[entry.properties]
        self._wire_properties = wire

    def _warn_properties_ignored(self, entry_id: str, properties: MessageProperties) -> None:
        """MQTT 3.1.1 has no properties: once per entry and version of its properties."""
        log.warning(
            "entry_properties_ignored",
            entry_id=entry_id,
            ignored=list(properties.as_json()),
            mqtt_version=self.settings.protocol,
            hint="properties need MQTT 5 (--mqtt-version 5, the default)",
        )

    def _encode(
        self, old: dict[str, PublishConfig], new: dict[str, PublishConfig]
    ) -> dict[str, bytes]:
        """The pre-encoded headers of `new`, reusing those of entries whose wire form is
        unchanged (a reload of thousands of entries re-encodes only the edited ones)."""
        headers = {}
        for entry_id, entry in new.items():
            before = old.get(entry_id)
            header = (
                self._headers.get(entry_id)
                if before is not None and before.same_wire(entry) and has_static_packet(entry)
                else None
            )
            header = header or static_header(entry, self.settings.protocol)
            if header is not None:
                headers[entry_id] = header
        return headers

    def _apply_one(self, before: PublishConfig | None, entry: PublishConfig) -> None:
        if before is None or not before.same_wire(entry):
            self._release(entry.id)  # edited: give the new version its chance
        key = LinkKey(entry.id)
        link = self._loop.get(key)
        if entry.lwt and link is None:
            self._open_entry_link(entry)  # publishes on connect
            return
        if entry.lwt and link is not None and link.state is State.CLOSING:
            # Back while its connection is still closing (removed or moved to main a moment
            # ago, or closed mid-connect): reconnect it once closed, or it would stay without.
            self._loop.renew(key, self._will(entry))
            return
        if (
            entry.lwt
            and link is not None
            and before is not None
            and (entry_will(before), before.template) != (entry_will(entry), entry.template)
        ):
            # The will is fixed at CONNECT: only this entry's connection reconnects.
            self._loop.renew(key, self._will(entry))
            return
        if not entry.lwt and link is not None:
            self._loop.close_quietly(key)  # moved to the main connection
        if before is None or not (before.same_wire(entry) and before.same_schedule(entry)):
            # An added or edited entry reaches the wire now, not at its next grid slot (which
            # may be an interval away); its grid, and so its phase, stays as the plan says.
            target = self._link_for(entry)
            probing = self._searching and self._faults.probe is not None
            if target is not None and target.is_up and not (probing and target.key.is_main):
                self._send(target, entry)

    def _remove_one(self, gone: PublishConfig) -> None:
        if gone.lwt:
            self._loop.close_announcing(LinkKey(gone.id))  # subscribers see it go offline
        if self._clear_retained and gone.retain:
            self._publish_raw(gone.topic, b"", 1, True)  # an empty retained payload clears it
        self.stats.remove_entry(gone.id)
        self._release(gone.id)

    def _release(self, entry_id: str) -> None:
        if self._searching:
            probing = self._faults.probe is not None
            self._faults.forget(entry_id)
            self._search_changed()
            if probing and self._faults.probe is None:
                self._after_probe()  # the edit ended the probe out: go on as its verdict would

    def _birth(self, link: SessionView) -> None:
        if link.key.is_main and self._start_probe(link):
            self._birth_due = True  # the probes go alone on the fresh connection: birth after
            return
        self._birth_now(link)

    def _birth_now(self, link: SessionView) -> None:
        if link.key.is_main:
            self._main_born_at = time.monotonic()
            self._loop.publish(
                MAIN_LINK, self.settings.effective_status_topic, STATUS_ONLINE, 1, True, None
            )
            pending, self._pending_raw = self._pending_raw, OrderedDict()
            for topic, (data, qos, retain) in pending.items():
                self._loop.publish(MAIN_LINK, topic, data, qos, retain, None)
            probed, self._probed = self._probed, set()  # published moments ago, alone
            ids = [
                i
                for i, e in self._entries.items()
                if not e.lwt and i not in probed and not (self._searching and self._faults.held(i))
            ]
        else:
            ids = [link.key.entry_id] if link.key.entry_id is not None else []
        self._birth_chunk(link, ids, 0)

    def _birth_chunk(self, link: SessionView, ids: list[str], start: int) -> None:
        if not link.is_up:
            return  # lost again; the next connect starts over
        for entry_id in ids[start : start + BIRTH_CHUNK]:
            entry = self._entries.get(entry_id)
            if entry is not None and self._link_for(entry) is link:
                self._send(link, entry)
        if start + BIRTH_CHUNK < len(ids):
            self._loop.call_soon(lambda: self._birth_chunk(link, ids, start + BIRTH_CHUNK))

    def _start_drain(self) -> None:
        self._draining = True
        self._check_drained()

    def _check_drained(self) -> None:
        if self._draining and not any(lk.awaiting_acks for lk in self._loop.sessions()):
            self._drained.set()

    def _close_all(self) -> None:
        for link in self._loop.sessions():
            self._loop.close_announcing(link.key)
        if not self._loop.sessions():
            self._all_closed.set()

    # ---- SessionListener (network thread) ---------------------------------------------------
    def link_up(self, link: SessionView) -> None:
        self._warned.pop(link.key, None)
        if self._loop.limits is not self._limits_seen:
            self._say_missing()
        if link.key.is_main:
            self._main_up.set()
            log.info("mqtt_connected", broker=self._broker, client_id=link.client_id)
        self._birth(link)

    def link_down(self, link: SessionView, reason: str, was_up: bool) -> None:
        if was_up:
            self.stats.record_reconnect()
            self._report_conflict(link)
        if link.key.is_main:
            self._main_up.clear()
            self._birth_due = False
            self._probed.clear()
            if was_up and link.may_blame_a_packet:
                self._attribute(link, reason)
            elif was_up and self._searching:
                self._faults.lost()  # a probe out says nothing: sent again on reconnect
            if was_up:
                log.warning(
                    "mqtt_disconnected",
                    reason=reason,
                    broker=self._broker,
                    client_id=link.client_id,
                    retry_in_s=round(max(0.0, link.due - time.monotonic()), 2),
                )
            else:
                self._failed_attempt(link, reason)
        elif was_up:
            log.debug(
                "entry_connection_lost",
                entry_id=link.key.entry_id,
                reason=reason,
                broker=self._broker,
            )
        else:
            self.link_refused(link, reason)

    def _attribute(self, link: SessionView, reason: str) -> None:
        """The broker dropped the main connection naming no cause but, maybe, a packet of
        ours: what went out just before becomes suspect; a probe's drop narrows or convicts."""
        # What went out within a few round trips of the drop (the CONNECT -> CONNACK time is
        # the round trip we know); the broker stops reading at the bad packet.
        now = time.monotonic()
        window = 0.05 + 4 * _round_trip(link)
        published = {entry_id for at, entry_id in self._recent if at >= now - window}
        self._recent.clear()
        # A probe that was pinged counts until its PINGRESP; one that was not, only as long as
        # a broker takes to drop a packet it refuses.
        prompt = math.inf if self._probe_pinged else window
        guilty = self._faults.dropped(
            published & self._entries.keys(),
            reason,
            now,
            prompt,
            named=link.broker_reason is not None,
        )
        for entry_id in sorted(guilty & self._entries.keys()):
            self._quarantine(self._entries[entry_id])
        self._search_changed()

    def _start_probe(self, link: SessionView) -> bool:
        """Publish the next suspects (or a quarantined entry due for a retry) alone on the
        main connection; the verdict comes after the probe window. Whether one went out."""
        probe = self._faults.next_probe(time.monotonic()) if self._searching else None
        if probe is None:
            return False
        for entry_id in sorted(probe.batch):
            entry = self._entries.get(entry_id)
            if entry is not None:
                self._send(link, entry)
                self._probed.add(entry_id)
        self._probe_pinged = self._loop.ping(link.key, lambda: self._probe_verdict(probe))
        window = PROBE_TIMEOUT if self._probe_pinged else max(PROBE_WINDOW, 4 * _round_trip(link))
        self._loop.call_later(window, lambda: self._probe_verdict(probe))
        return True

    def _probe_verdict(self, probe: Probe) -> None:
        """The probe window went by: without a drop in it, the probe's entries are cleared."""
        if self._faults.probe is not probe:
            return  # it dropped the connection, or was dropped itself
        self._faults.cleared()
        if probe.retry:
            for entry_id in sorted(probe.batch & self._entries.keys()):
                log.info("entry_released", entry_id=entry_id, broker=self._broker)
        self._search_changed()
        self._after_probe()

    def _after_probe(self) -> None:
        """The next probe, if any is wanted; else the birth publishes a probe held back."""
        main = self._loop.get(MAIN_LINK)
        if main is None or not main.is_up or self._start_probe(main):
            return
        if self._birth_due:
            self._birth_due = False
            self._birth_now(main)

    def _retry_due(self) -> None:
        """A quarantined entry's retry time: probe it alone, if the connection is free."""
        main = self._loop.get(MAIN_LINK)
        if main is not None and main.is_up and self._faults.probe is None:
            self._start_probe(main)

    def _search_changed(self) -> None:
        faults = self._faults
        self._searching = bool(faults.suspects() or faults.probe or faults.quarantined)

    def _quarantine(self, entry: PublishConfig) -> None:
        quarantine = self._faults.quarantined[entry.id]
        retry_in = max(0.0, quarantine.retry_at - time.monotonic())
        self._loop.call_later(retry_in, self._retry_due)
        self.stats.record_error(entry.id, _why(quarantine))
        log.error(
            "entry_quarantined",
            entry_id=entry.id,
            topic=entry.topic,
            reason=quarantine.reason,
            broker=self._broker,
            times=quarantine.convictions,
            retry_in_s=round(retry_in, 1),
            hint="published alone, it got the connection dropped: held back and tried again "
            "alone later; an edit of the entry tries it at once",
        )

    def _report_conflict(self, link: SessionView) -> None:
        """One warning per connection and conflict, however often the broker drops it."""
        if link.conflict is None:
            self._conflicts_warned.discard(link.key)
        elif link.key not in self._conflicts_warned:
            self._conflicts_warned.add(link.key)
            log.warning(
                "mqtt_client_id_conflict",
                client_id=link.client_id,
                broker=self._broker,
                reason=link.conflict,
                hint="give each process its own --client-id",
            )

    def link_refused(self, link: SessionView, reason: str) -> None:
        if link.key.is_main:
            self._failed_attempt(link, reason)
            return
        # At warning once per connection and cause (the main connection is up, or the entry
        # links would not be trying: this is about this entry, not a broker outage).
        emit = log.debug if self._warned.get(link.key) == reason else log.warning
        self._warned[link.key] = reason
        emit(
            "entry_connection_failed",
            entry_id=link.key.entry_id,
            reason=reason,
            broker=self._broker,
            client_id=link.client_id,
            retry_in_s=round(max(0.0, link.due - time.monotonic()), 2),
        )

    def _failed_attempt(self, link: SessionView, reason: str) -> None:
        attempts = link.failures
        extra = {"hint": V311_HINT} if self._maybe_v311_only(reason) else {}
        log.warning(
            "mqtt_connect_failed",
            reason=reason,
            attempt=attempts,
            broker=self._broker,
            client_id=link.client_id,
            retry_in_s=round(max(0.0, link.due - time.monotonic()), 2),
            **extra,
        )
        if link.state is State.GIVEN_UP and not self._gave_up:
            self._gave_up = True
            if self._on_give_up is not None:
                self._on_give_up(reason)

    def _maybe_v311_only(self, reason: str) -> bool:
        """An MQTT 5 CONNECT refused as an unknown protocol version, left without a CONNACK
        (amqtt 0.12) or closed without one (RabbitMQ 3.x): the broker may speak MQTT 3.1.1
        only (docs/brokers.md)."""
        return self.settings.protocol == "5" and (
            reason
            in ("unsupported protocol version", "connection closed by the broker before CONNACK")
            or reason.startswith("no CONNACK from the broker")
        )

    def link_closed(self, link: SessionView) -> None:
        self._warned.pop(link.key, None)
        if link.key.is_main:
            self._main_up.clear()
        if not self._loop.sessions():
            self._all_closed.set()

    def published(
        self, link: SessionView, entry_id: str | None, qos: int, failure: str | None
    ) -> None:
        if self._loop.limits is not self._limits_seen:  # a PUBACK for QoS 2 (capabilities.py)
            self._say_missing()
        if entry_id is not None:
            if failure is None:
                self.stats.record_published(entry_id)
            else:
                self.stats.record_error(entry_id, failure)
        if qos and self._draining:
            self._check_drained()

    def written(self, link: SessionView, entry_ids: list[str]) -> None:
        """Pre-encoded QoS 0 packets (packet.py) that reached the socket: published."""
        self.stats.record_written(entry_ids)

    def lost_unsent(self, link: SessionView, entry_id: str | None) -> None:
        if entry_id is not None:
            self.stats.record_dropped(entry_id)


def _round_trip(link: SessionView) -> float:
    """The CONNECT -> CONNACK time of the link's last connect: the round trip we know."""
    return max(0.0, link.connected_at - link.handshake_since)


def _why(quarantine: Quarantine) -> str:
    return f"the broker dropped the connection at its publish: {quarantine.reason}"
