"""An entry: `PublishConfig`, with its payload rendered once and its MQTT 5 properties.

Constructing one checks it against the field rules (rules.py); loader.py builds them from the
file's entries, which it has already checked, without checking twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from scheduler_publisher.config.cron import cron_period
from scheduler_publisher.config.fields import id_label, render_value
from scheduler_publisher.config.rules import (
    DEFAULT_TIMEZONE,
    FIELD_RULES,
    alternative_findings,
    placeholder_findings,
)
from scheduler_publisher.config.template import Template

__all__ = ["MessageProperties", "PayloadData", "PublishConfig", "QoS"]

QoS = Literal[0, 1, 2]


def _as_json_object(value: Any) -> dict[str, Any]:
    """json.dumps encodes dicts only; data may hold any Mapping (another entry's data, say)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _render_payload(data: Mapping[str, Any], online: int) -> bytes:
    body = {"online": online}
    body.update(data)
    body["online"] = online  # after update: the service owns the key, and it stays first
    return json.dumps(
        body, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_as_json_object
    ).encode()


@functools.lru_cache(maxsize=1024)
def _shared_interval(seconds: float) -> float:
    """The first float seen with this value: thousands of entries share a handful of
    intervals, so they share the float objects too."""
    return seconds


def _data_of(payload: bytes) -> dict[str, Any]:
    """The operator's data in a rendered payload: all of it but the service's `online` key."""
    body: dict[str, Any] = json.loads(payload)
    del body["online"]
    return body


class PayloadData(Mapping[str, Any]):
    """An entry's `data`, read back from its rendered payload rather than kept a second time.

    The payload is what goes on the wire, so it is the one copy we keep: at 10,000 entries a
    frozen dict per entry would cost ~2 MB for a value that only the offline payload, the API
    and the tests read. Reading it decodes the payload (microseconds), and every read returns
    fresh objects, so nothing reachable from a PublishConfig can be mutated.
    """

    __slots__ = ("_payload",)

    def __init__(self, payload: bytes) -> None:
        self._payload = payload

    def _decoded(self) -> dict[str, Any]:
        return _data_of(self._payload)

    def __getitem__(self, key: str) -> Any:
        return self._decoded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    # One decode each; Mapping's defaults would decode again for every key.
    def __contains__(self, key: object) -> bool:
        return key in self._decoded()

    def keys(self) -> KeysView[str]:
        return self._decoded().keys()

    def items(self) -> ItemsView[str, Any]:
        return self._decoded().items()

    def values(self) -> ValuesView[Any]:
        return self._decoded().values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PayloadData):
            return self._payload == other._payload
        if isinstance(other, Mapping):
            return self._decoded() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a mapping, like dict

    def __repr__(self) -> str:
        return repr(self._decoded())


_INIT_DEFAULTS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _init_defaults(cls: type) -> tuple[tuple[str, Any], ...]:
    """A dataclass's init fields and their defaults, worked out once per class:
    `dataclasses.fields` builds a new tuple at every call, and at 10,000 entries loaded the
    interpreter then keeps 2,000 of them (368 KB) on its free list of tuples of that length."""
    found = _INIT_DEFAULTS.get(cls)
    if found is None:
        fields = dataclasses.fields(cls)
        found = _INIT_DEFAULTS[cls] = tuple((f.name, f.default) for f in fields if f.init)
    return found


# --- the public value types ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """An entry's MQTT 5 properties: sent with each of its publishes, and with its will."""

    message_expiry: int | None = None  # seconds
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()  # in the file's order
    payload_format_utf8: bool = False

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> MessageProperties | None:
        """From a checked `properties` object; None when it sets nothing (`{}`, or unknown
        keys only), so that such an entry stays on the path of entries without properties."""
        users = value.get("user_properties") or {}
        found = cls(
            value.get("message_expiry"),
            value.get("content_type"),
            tuple(users.items()),
            bool(value.get("payload_format_utf8", False)),
        )
        return found if found != _NO_PROPERTIES else None

    def as_json(self) -> dict[str, Any]:
        """The `properties` object that reads back as these properties."""
        found: dict[str, Any] = {}
        if self.message_expiry is not None:
            found["message_expiry"] = self.message_expiry
        if self.content_type is not None:
            found["content_type"] = self.content_type
        if self.user_properties:
            found["user_properties"] = dict(self.user_properties)
        if self.payload_format_utf8:
            found["payload_format_utf8"] = True
        return found


_NO_PROPERTIES: Final = MessageProperties()


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """One scheduled publication. Constructing it validates it; invalid ones cannot exist."""

    id: str
    topic: str
    data: Mapping[str, Any]
    interval: float | None = None  # exactly one of interval and cron
    qos: QoS = 0
    retain: bool = False
    lwt: bool = False
    cron: str | None = None
    timezone: str = DEFAULT_TIMEZONE  # of a cron entry's fields; an interval entry ignores it
    template: bool = False
    # Given as the file's object (a Mapping) or as MessageProperties; always the latter (or
    # None) once constructed.
    properties: MessageProperties | None = None
    created_at: str | None = None
    updated_at: str | None = None
    version: int | None = None
    # Derived from data; compared so that 1, 1.0 and true in data (equal in Python) differ.
    payload: bytes = field(init=False, repr=False)
    # Compiled from payload when `template` is true (template.py); None for a static entry.
    renderer: Template | None = field(init=False, repr=False, compare=False)
    # The fingerprint of the file text this entry was read from, when it was read without a
    # single finding: a reload that meets the same text again reuses the entry unchecked.
    source_key: int | None = field(init=False, default=None, repr=False, compare=False)
    # Seconds between publications: the interval, or a cron entry's shortest gap between slots
    # (cron.cron_period). Only where a rough period will do; a cron entry's slots come from
    # its trigger. A field, not a property: the publish path reads it (connection.py).
    period: float = field(init=False, repr=False, compare=False)

    __hash__ = None  # type: ignore[assignment]  # equal configs exist, but data is unhashable

    def __post_init__(self) -> None:
        self._check()
        self._derive()

    @classmethod
    def _from_checked(cls, fields: Mapping[str, Any]) -> PublishConfig:
        """Build from fields parse_config has already checked, without checking them twice."""
        config: PublishConfig = object.__new__(cls)
        for name, default in _init_defaults(cls):
            object.__setattr__(config, name, fields.get(name, default))
        object.__setattr__(config, "source_key", None)
        config._derive()
        return config

    def _check(self) -> None:
        errors = [
            finding.message
            for rule in FIELD_RULES
            # Left out (None) is the alternative's business: alternative_findings says.
            if not (rule.alternative is not None and getattr(self, rule.name) is None)
            for finding in rule.check(self._as_read(rule.name))
            if finding.severity == "error"
        ]
        present = {
            rule.name: getattr(self, rule.name)
            for rule in FIELD_RULES
            if rule.alternative is not None and getattr(self, rule.name) is not None
        }
        errors.extend(
            f.message for _name, f in alternative_findings(present) if f.severity == "error"
        )
        if not errors and self.template:
            errors = [
                f.message
                for f in placeholder_findings(self.data, templated=True)
                if f.severity == "error"
            ]
        if errors:
            label = id_label(self.id if isinstance(self.id, str) else None)
            raise ValueError(f"invalid PublishConfig{label}: " + "; ".join(errors))

    def _as_read(self, name: str) -> Any:
        """A field as the file would hold it, for its rule to check."""
        value = getattr(self, name)
        return value.as_json() if isinstance(value, MessageProperties) else value

    def _derive(self) -> None:
        given: Any = self.properties
        if isinstance(given, Mapping):
            object.__setattr__(self, "properties", MessageProperties.from_json(given))
        payload = _render_payload(self.data, online=1)
        object.__setattr__(self, "payload", payload)
        object.__setattr__(self, "data", PayloadData(payload))
        renderer = Template.compile(payload, self.id) if self.template else None
        object.__setattr__(self, "renderer", renderer)
        if self.interval is not None:
            interval = _shared_interval(float(self.interval))
            object.__setattr__(self, "interval", interval)
            object.__setattr__(self, "period", interval)
        else:
            assert self.cron is not None  # checked: exactly one of the two
            object.__setattr__(self, "period", cron_period(self.cron, self.timezone))

    @property
    def offline_payload(self) -> bytes:
        """`{"online": 0, ...data}`: only lwt entries need it (as their will), so it is rendered
        on demand instead of being kept for every entry."""
        return _render_payload(_data_of(self.payload), online=0)

    @property
    def offline_renderer(self) -> Template | None:
        """The will of a templated entry, compiled when its connection is opened."""
        return Template.compile(self.offline_payload, self.id) if self.template else None

    def same_schedule(self, other: PublishConfig) -> bool:
        """True when `other` fires on the same slots, so its job need not be rescheduled."""
        return (self.interval, self.cron, self.schedule_timezone) == (
            other.interval,
            other.cron,
            other.schedule_timezone,
        )

    @property
    def schedule_timezone(self) -> str | None:
        """The time zone the schedule is read in: a cron entry's; None for an interval."""
        return self.timezone if self.cron is not None else None

    @property
    def schedule(self) -> str:
        """The schedule in a few words, for logs and the status page: "every 5 s", or
        'cron "0 * * * *" in Europe/Berlin'."""
        if self.cron is None:
            return f"every {self.interval:g} s"
        return f"cron {render_value(self.cron)} in {self.timezone}"

    def same_wire(self, other: PublishConfig) -> bool:
        """True when `other` puts the same bytes on the wire, with the same options."""
        return (
            self.topic,
            self.payload,
            self.qos,
            self.retain,
            self.lwt,
            self.template,
            self.properties,
        ) == (
            other.topic,
            other.payload,
            other.qos,
            other.retain,
            other.lwt,
            other.template,
            other.properties,
        )
