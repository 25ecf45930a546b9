"""The config file: JSON text in, validated and frozen PublishConfig entries out.

Parsing is pure and never gives up on the whole file because of one entry: every problem of
every entry is reported at once, bad entries are skipped and good ones are kept. That holds
for an entry JSON itself refuses (NaN, an over-long integer, too deep) as long as the rest of
the file reads. Only a file that is not a readable JSON array of entries raises
(ConfigFileError).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import reprlib
import stat
from collections.abc import (
    Callable,
    Generator,
    ItemsView,
    Iterator,
    KeysView,
    Mapping,
    ValuesView,
)
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from scheduler_publisher import document
from scheduler_publisher.document import MAX_DOCUMENT_DEPTH, nesting_depth

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_DATA_DEPTH",
    "MAX_DOCUMENT_DEPTH",
    "MAX_INTERVAL",
    "MAX_TOPIC_BYTES",
    "MAX_TOPIC_LEVELS",
    "MIN_INTERVAL",
    "ConfigError",
    "ConfigFileError",
    "ConfigResult",
    "ConfigurationLoader",
    "PayloadData",
    "Problem",
    "PublishConfig",
    "QoS",
    "Severity",
    "parse_config",
    "parse_config_steps",
    "read_config_file",
]

QoS = Literal[0, 1, 2]
Severity = Literal["error", "warning"]

DEFAULT_MAX_BYTES: Final = 16 * 1024 * 1024
MAX_DATA_DEPTH: Final = 32  # levels of objects/arrays in `data`, counting `data` itself
MIN_INTERVAL: Final = 0.1
MAX_INTERVAL: Final = 86400
MAX_TOPIC_BYTES: Final = 65535  # MQTT strings carry a 16-bit length prefix
# Mosquitto drops the connection ("Protocol error") at a topic of more than 201 levels
# (TOPIC_HIERARCHY_LIMIT, 200 separators): a round limit just under it.
MAX_TOPIC_LEVELS: Final = 200
# Broker-owned `$` prefixes: $SYS is the broker's own status tree (MQTT 5 4.7.2; Mosquitto
# silently drops client publishes to it), $CONTROL is Mosquitto's control API, $share is the
# MQTT 5 shared-subscription prefix (4.8.2), never a topic name. Other `$` topics ($aws/...,
# $iothub/...) are legitimate on some brokers: those only get a warning (docs/design.md).
RESERVED_TOPIC_PREFIXES: Final = ("$SYS", "$CONTROL", "$share")
_RENDER_LIMIT: Final = 60
# MQTT 5 1.5.4: NUL is forbidden; control characters and noncharacters "SHOULD NOT" appear,
# and Mosquitto closes the connection at any of them ("Malformed packet"), so we refuse them.
_UNSENDABLE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)
_VALID_UNICODE: Final = "valid Unicode (no lone surrogates)"


class ConfigError(Exception):
    """Base of the errors this module raises on purpose."""


class ConfigFileError(ConfigError):
    """The file as a whole is unusable: unreadable, too large, not JSON, or not an entry list."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


# --- rendering what was received -------------------------------------------------------------


def _render(value: Any) -> str:
    """`value` as compact JSON (Python repr if it is not JSON), short and safe to log."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = _python_repr(value)
    # A lone surrogate from a "\ud800" escape would make the message unencodable downstream.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    # C1 controls (U+009B starts a terminal escape) and noncharacters: shown as escapes too.
    text = _UNSENDABLE.sub(_escape_character, text)
    return text if len(text) <= _RENDER_LIMIT else text[: _RENDER_LIMIT - 1] + "…"


def _escape_character(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _python_repr(value: Any) -> str:
    try:
        return reprlib.repr(value)
    except ValueError:  # ints beyond sys.get_int_max_str_digits() refuse to print
        return f"<{type(value).__name__}>"


def _id_label(entry_id: str | None) -> str:
    return f" (id {_render(entry_id)})" if entry_id else ""


# --- per-field checkers, shared by parsing and PublishConfig.__post_init__ --------------------

_Finding = tuple[Severity, str]
_Check = Callable[[str, Any], Iterator[_Finding]]


def _error(subject: str, expected: str, value: Any) -> _Finding:
    return ("error", f"{subject} must be {expected}, got {_render(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8_size(text: str) -> int | None:
    """Encoded length, or None when `text` holds a lone surrogate (not encodable)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _check_id(name: str, value: Any) -> Iterator[_Finding]:
    if not isinstance(value, str) or not value:
        yield _error(name, "a non-empty string", value)
    elif _utf8_size(value) is None:
        yield _error(name, _VALID_UNICODE, value)


def _unsendable_character(name: str, value: str) -> _Finding | None:
    found = _UNSENDABLE.search(value)
    if found is None:
        return None
    code = ord(found.group())
    kind = "NUL" if code == 0 else "a control character" if code <= 0x9F else "a noncharacter"
    where = f"U+{code:04X} ({kind}) at character {found.start() + 1}"
    expected = "free of NUL, control characters (U+0001-U+001F, U+007F-U+009F) and noncharacters"
    return ("error", f"{name} must be {expected}, got {_render(value)}: {where}")


def _check_topic(name: str, value: Any) -> Iterator[_Finding]:
    if not isinstance(value, str) or not value:
        yield _error(name, "a non-empty string", value)
        return
    if "+" in value or "#" in value:
        yield _error(name, 'free of the wildcards "+" and "#"', value)
    unsendable = _unsendable_character(name, value)
    if unsendable is not None:
        yield unsendable
    size = _utf8_size(value)
    if size is None:
        yield _error(name, _VALID_UNICODE, value)
    elif size > MAX_TOPIC_BYTES:
        yield ("error", f"{name} must be at most {MAX_TOPIC_BYTES} UTF-8 bytes, got {size} bytes")
    levels = value.count("/") + 1
    if levels > MAX_TOPIC_LEVELS:
        yield ("error", f"{name} must have at most {MAX_TOPIC_LEVELS} levels, got {levels}")
    yield from _check_dollar_topic(name, value)


def _check_dollar_topic(name: str, value: str) -> Iterator[_Finding]:
    if not value.startswith("$"):
        return
    first_level = value.split("/", 1)[0]
    if first_level in RESERVED_TOPIC_PREFIXES:
        expected = "outside the broker-owned " + ", ".join(RESERVED_TOPIC_PREFIXES) + " trees"
        yield _error(name, expected, value)
    else:
        reserved = 'starts with "$": brokers reserve such topics, and subscribers to "#" never'
        yield ("warning", f"{name} {reserved} get them, got {_render(value)}")


def _check_data(name: str, value: Any) -> Iterator[_Finding]:
    if not isinstance(value, Mapping):
        yield _error(name, "an object", value)
        return
    depth = nesting_depth(value, MAX_DOCUMENT_DEPTH)
    if depth > MAX_DATA_DEPTH:
        got = f"more than {MAX_DOCUMENT_DEPTH}" if depth > MAX_DOCUMENT_DEPTH else str(depth)
        yield ("error", f"{name} must be nested at most {MAX_DATA_DEPTH} levels deep, got {got}")
        return
    culprit = _unpublishable(value)
    if culprit is not None:
        subject, expected, bad = culprit
        yield _error(f"{name} {subject}", expected, bad)
    if "online" in value:
        owned = 'key "online" is overridden by the service (1 while running, 0 when offline)'
        yield ("warning", f"{name} {owned}, got {_render(value['online'])}")


def _check_interval(name: str, value: Any) -> Iterator[_Finding]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        yield _error(name, "a number", value)
    elif isinstance(value, float) and not math.isfinite(value):
        yield _error(name, "a finite number", value)
    # Compared without float(): an int like 10**400 would overflow the conversion.
    elif not MIN_INTERVAL <= value <= MAX_INTERVAL:
        yield _error(name, f"between {MIN_INTERVAL:g} and {MAX_INTERVAL:g}", value)


def _check_qos(name: str, value: Any) -> Iterator[_Finding]:
    if not _is_int(value) or value not in (0, 1, 2):
        yield _error(name, "0, 1 or 2", value)


def _check_bool(name: str, value: Any) -> Iterator[_Finding]:
    if not isinstance(value, bool):
        yield _error(name, "true or false", value)


def _check_timestamp(name: str, value: Any) -> Iterator[_Finding]:
    if value is not None and not (isinstance(value, str) and _is_iso8601(value)):
        yield _error(name, "an ISO-8601 date-time string", value)


def _is_iso8601(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _check_version(name: str, value: Any) -> Iterator[_Finding]:
    if value is not None and (not _is_int(value) or value < 1):
        yield _error(name, "an integer >= 1", value)


@dataclass(frozen=True, slots=True)
class _Field:
    check: _Check
    required: bool = False


# Order matters: it is the order of PublishConfig's fields and of its ValueError messages.
_FIELDS: Final[Mapping[str, _Field]] = MappingProxyType({
    "id": _Field(_check_id, required=True),
    "topic": _Field(_check_topic, required=True),
    "data": _Field(_check_data, required=True),
    "interval": _Field(_check_interval, required=True),
    "qos": _Field(_check_qos),
    "retain": _Field(_check_bool),
    "lwt": _Field(_check_bool),
    "created_at": _Field(_check_timestamp),
    "updated_at": _Field(_check_timestamp),
    "version": _Field(_check_version),
})


# --- JSON values inside `data` ---------------------------------------------------------------


def _unpublishable(value: Any) -> tuple[str, str, Any] | None:
    """Why `value` cannot be a JSON payload, as (subject, expected, culprit), or None.

    Recursion is bounded: callers have already checked the depth.
    """
    if isinstance(value, Mapping):
        for key, member in value.items():
            if not isinstance(key, str):
                return ("keys", "strings", key)
            found = _unpublishable(key) or _unpublishable(member)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        return next(filter(None, map(_unpublishable, value)), None)
    return _scalar_problem(value)


def _scalar_problem(value: Any) -> tuple[str, str, Any] | None:
    if isinstance(value, str):
        return None if _utf8_size(value) is not None else ("strings", _VALID_UNICODE, value)
    if isinstance(value, float):
        return None if math.isfinite(value) else ("numbers", "finite", value)
    if value is None or isinstance(value, int):
        return None
    return ("values", "JSON values", value)


def _as_json_object(value: Any) -> dict[str, Any]:
    """json.dumps encodes dicts only; data may hold any Mapping (another entry's data, say)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _render_payload(data: Mapping[str, Any], online: int) -> bytes:
    body = {"online": online}
    body.update(data)
    body["online"] = online  # after update: the service owns the key, and it stays first
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_as_json_object).encode()


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


# --- the public value types ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishConfig:
    """One scheduled publication. Constructing it validates it; invalid ones cannot exist."""

    id: str
    topic: str
    data: Mapping[str, Any]
    interval: float
    qos: QoS = 0
    retain: bool = False
    lwt: bool = False
    created_at: str | None = None
    updated_at: str | None = None
    version: int | None = None
    # Derived from data; compared so that 1, 1.0 and true in data (equal in Python) differ.
    payload: bytes = field(init=False, repr=False)

    __hash__ = None  # type: ignore[assignment]  # equal configs exist, but data is unhashable

    def __post_init__(self) -> None:
        self._check()
        self._derive()

    @classmethod
    def _from_checked(cls, fields: Mapping[str, Any]) -> PublishConfig:
        """Build from fields parse_config has already checked, without checking them twice."""
        config: PublishConfig = object.__new__(cls)
        for spec in dataclasses.fields(cls):
            if spec.init:
                object.__setattr__(config, spec.name, fields.get(spec.name, spec.default))
        config._derive()
        return config

    def _check(self) -> None:
        errors = [
            message
            for name, spec in _FIELDS.items()
            for severity, message in spec.check(name, getattr(self, name))
            if severity == "error"
        ]
        if errors:
            label = _id_label(self.id if isinstance(self.id, str) else None)
            raise ValueError(f"invalid PublishConfig{label}: " + "; ".join(errors))

    def _derive(self) -> None:
        payload = _render_payload(self.data, online=1)
        object.__setattr__(self, "payload", payload)
        object.__setattr__(self, "data", PayloadData(payload))
        object.__setattr__(self, "interval", _shared_interval(float(self.interval)))

    @property
    def offline_payload(self) -> bytes:
        """`{"online": 0, ...data}`: only lwt entries need it (as their will), so it is rendered
        on demand instead of being kept for every entry."""
        return _render_payload(_data_of(self.payload), online=0)

    def same_schedule(self, other: PublishConfig) -> bool:
        """True when `other` fires at the same rate, so its job need not be rescheduled."""
        return self.interval == other.interval

    def same_wire(self, other: PublishConfig) -> bool:
        """True when `other` puts the same bytes on the wire, with the same options."""
        return (self.topic, self.payload, self.qos, self.retain, self.lwt) == (
            other.topic, other.payload, other.qos, other.retain, other.lwt,
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about the config, located precisely enough to fix it."""

    severity: Severity
    position: int | None  # 1-based entry position; None for the file as a whole
    entry_id: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        if self.position is None:
            return self.message
        return f"entry {self.position}{_id_label(self.entry_id)}: {self.message}"


@dataclass(frozen=True, slots=True)
class ConfigResult:
    """The valid entries, every problem found, and which ids were rejected."""

    entries: tuple[PublishConfig, ...]
    problems: tuple[Problem, ...]  # in file order
    invalid_ids: frozenset[str]  # the caller keeps the last good version of these running
    digest: str  # sha256 of the raw bytes: an unchanged file needs no reload

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")


# --- validating entries ----------------------------------------------------------------------


class _Checked(NamedTuple):
    config: PublishConfig | None
    problems: list[Problem]
    entry_id: str | None


def _usable_id(value: Any) -> str | None:
    return value if not any(_check_id("id", value)) else None


def _unknown_field(name: str) -> str:
    message = f"unknown field {_render(name)} is ignored"
    guesses = difflib.get_close_matches(name, list(_FIELDS), n=1)
    return f"{message} (did you mean {_render(guesses[0])}?)" if guesses else message


def _field_findings(entry: Mapping[str, Any]) -> Iterator[tuple[str, Severity, str]]:
    for name, value in entry.items():
        spec = _FIELDS.get(name)
        if spec is None:
            yield name, "warning", _unknown_field(name)
            continue
        for severity, message in spec.check(name, value):
            yield name, severity, message
    for name in getattr(entry, "repeated", ()):
        yield name, "warning", f"field {_render(name)} appears more than once; the last one wins"
    for name, spec in _FIELDS.items():
        if spec.required and name not in entry:
            yield name, "error", f"{name} is required"


def _unreadable_entry(position: int, element: document.UnreadableElement,
                      first_seen: dict[str, int]) -> _Checked:
    """A well-formed element that holds what JSON refuses: this entry is rejected (its last
    good version keeps running), the rest of the file is not."""
    entry_id = _usable_id(element.entry_id)
    if entry_id is not None:
        first_seen.setdefault(entry_id, position)
    message = f"{element.detail} (line {element.line}, column {element.column})"
    return _Checked(None, [Problem("error", position, entry_id, element.field, message)],
                    entry_id)


def _check_entry(position: int, entry: Any, first_seen: dict[str, int]) -> _Checked:
    if isinstance(entry, document.UnreadableElement):
        return _unreadable_entry(position, entry, first_seen)
    if not isinstance(entry, dict):
        message = f"must be an object, got {_render(entry)}"
        return _Checked(None, [Problem("error", position, None, None, message)], None)
    entry_id = _usable_id(entry.get("id"))
    findings = list(_field_findings(entry))
    if entry_id is not None and first_seen.setdefault(entry_id, position) != position:
        used = f"already used by entry {first_seen[entry_id]}"
        findings.append(("id", "error", f"id must be unique, got {_render(entry_id)} ({used})"))
    problems = [Problem(sev, position, entry_id, name, msg) for name, sev, msg in findings]
    if any(problem.severity == "error" for problem in problems):
        return _Checked(None, problems, entry_id)
    config = PublishConfig._from_checked(entry)  # every field was checked just above
    return _Checked(config, problems, entry_id)


PARSE_STEP: Final = 250  # entries parsed between two pauses of parse_config_steps


def parse_config(raw: bytes, *, source: str = "<config>") -> ConfigResult:
    """Validate the file's bytes; raises ConfigFileError only if it is not an entry list."""
    steps = parse_config_steps(raw, source=source)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: ConfigResult = done.value
            return result


def parse_config_steps(raw: bytes, *, source: str = "<config>",
                       step: int = PARSE_STEP) -> Generator[None, None, ConfigResult]:
    """parse_config in steps: pauses (yields) after every `step` entries and returns the
    result. The service's main loop parses a large file this way, a slice per turn, so its
    systemd watchdog pings and stop requests are not held up (docs/design.md)."""
    entries: list[PublishConfig] = []
    problems: list[Problem] = []
    invalid_ids: set[str] = set()
    first_seen: dict[str, int] = {}
    try:
        for position, entry in enumerate(document.elements(raw), start=1):
            if position % step == 0:
                yield
            checked = _check_entry(position, entry, first_seen)
            problems.extend(checked.problems)
            if checked.config is not None:
                entries.append(checked.config)
            # A rejected duplicate must not mark the id: its first occurrence is running fine.
            elif checked.entry_id is not None and first_seen[checked.entry_id] == position:
                invalid_ids.add(checked.entry_id)
    except document.DocumentError as exc:
        raise ConfigFileError(source, exc.detail) from None
    return ConfigResult(tuple(entries), tuple(problems), frozenset(invalid_ids),
                        config_digest(raw))


def config_digest(raw: bytes) -> str:
    """What tells two versions of the file apart (ConfigResult.digest)."""
    return hashlib.sha256(raw).hexdigest()


# --- the file on disk ------------------------------------------------------------------------


def _check_file_kind(path: Path, max_bytes: int) -> None:
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise ConfigFileError(str(path), "is a directory, not a config file")
    # A FIFO or device would block or never end; checked before open() for that reason.
    if not stat.S_ISREG(info.st_mode):
        raise ConfigFileError(str(path), "is not a regular file")
    if info.st_size > max_bytes:
        detail = f"is {info.st_size} bytes, larger than the {max_bytes}-byte limit"
        raise ConfigFileError(str(path), detail)


def read_config_file(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, at most `max_bytes`; raises ConfigFileError."""
    try:
        _check_file_kind(path, max_bytes)
        with path.open("rb") as stream:
            # One byte more than allowed tells "grew after stat()" from "exactly at the limit".
            raw = stream.read(max_bytes + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigFileError(str(path), f"cannot read config file: {reason}") from exc
    if len(raw) > max_bytes:
        raise ConfigFileError(str(path), f"is larger than the {max_bytes}-byte limit")
    return raw


def permission_warnings(path: Path) -> list[str]:
    """What makes the file writable by anyone on the machine: then anyone could change what the
    gateway publishes. A world-writable folder counts too (without the sticky bit anyone can
    replace the file; with it, only the owner can, which is still worth a word)."""
    found = []
    try:
        if path.stat().st_mode & stat.S_IWOTH:
            found.append(f"{path} is world-writable")
        folder = path.resolve().parent
        mode = folder.stat().st_mode
    except OSError:
        return found  # unreadable: the loader says so
    if mode & stat.S_IWOTH:
        sticky = " (sticky)" if mode & stat.S_ISVTX else ""
        found.append(f"its folder {folder} is world-writable{sticky}")
    return found


class ConfigurationLoader:
    """Reads and validates one config file. Holds only the path: building it does no I/O."""

    __slots__ = ("_max_bytes", "_path")

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self._path = Path(path)
        self._max_bytes = max_bytes

    @property
    def path(self) -> Path:
        return self._path

    def read(self) -> bytes:
        """The file's bytes, within the size limit; raises ConfigFileError."""
        return read_config_file(self._path, max_bytes=self._max_bytes)

    def load(self) -> ConfigResult:
        """Read and parse the file; raises ConfigFileError if it is unusable as a whole."""
        return parse_config(self.read(), source=str(self._path))

    def load_steps(self, raw: bytes) -> Generator[None, None, ConfigResult]:
        """Parse bytes read with read() in steps (parse_config_steps); raises
        ConfigFileError."""
        return parse_config_steps(raw, source=str(self._path))

    def load_configurations(self) -> list[PublishConfig]:
        """Only the valid entries; use load() to see the problems too."""
        return list(self.load().entries)
