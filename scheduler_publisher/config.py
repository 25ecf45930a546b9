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
from scheduler_publisher.cron import CronError, check_fires, cron_period, parse_cron, time_zone
from scheduler_publisher.document import MAX_DOCUMENT_DEPTH, nesting_depth
from scheduler_publisher.template import (
    Template,
    key_placeholders,
    placeholder_problems,
    stray_placeholder,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEZONE",
    "FIELD_RULES",
    "LONE_SURROGATE",
    "MAX_DATA_DEPTH",
    "MAX_DOCUMENT_DEPTH",
    "MAX_INTERVAL",
    "MAX_MESSAGE_EXPIRY",
    "MAX_PROPERTY_CHARS",
    "MAX_TOPIC_BYTES",
    "MAX_TOPIC_LEVELS",
    "MAX_USER_PROPERTIES",
    "MIN_INTERVAL",
    "UNSENDABLE_CLASS",
    "ConfigError",
    "ConfigFileError",
    "ConfigResult",
    "ConfigurationLoader",
    "FieldRule",
    "Finding",
    "Forbidden",
    "MessageProperties",
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
DEFAULT_TIMEZONE: Final = "UTC"
MAX_DATA_DEPTH: Final = 32  # levels of objects/arrays in `data`, counting `data` itself
MIN_INTERVAL: Final = 0.1
MAX_INTERVAL: Final = 86400
MAX_TOPIC_BYTES: Final = 65535  # MQTT strings carry a 16-bit length prefix
# Mosquitto drops the connection ("Protocol error") at a topic of more than 201 levels
# (TOPIC_HIERARCHY_LIMIT, 200 separators): a round limit just under it.
MAX_TOPIC_LEVELS: Final = 200
# MQTT 5 properties (README, "MQTT 5 properties"). The expiry is a Four Byte Integer (MQTT 5
# 3.3.2.3.3). The other two limits are ours: properties travel with every publish, so they
# stay small, and a string of at most 4096 characters is at most 16384 UTF-8 bytes, always
# within MQTT's 65535-byte strings (and a limit JSON Schema can state exactly).
MAX_MESSAGE_EXPIRY: Final = 2**32 - 1
MAX_USER_PROPERTIES: Final = 64
MAX_PROPERTY_CHARS: Final = 4096
# Broker-owned `$` prefixes: $SYS is the broker's own status tree (MQTT 5 4.7.2; Mosquitto
# silently drops client publishes to it), $CONTROL is Mosquitto's control API, $share is the
# MQTT 5 shared-subscription prefix (4.8.2), never a topic name. Other `$` topics ($aws/...,
# $iothub/...) are legitimate on some brokers: those only get a warning (docs/design.md).
RESERVED_TOPIC_PREFIXES: Final = ("$SYS", "$CONTROL", "$share")
_RENDER_LIMIT: Final = 60
# MQTT 5 1.5.4: NUL is forbidden; control characters and noncharacters "SHOULD NOT" appear,
# and Mosquitto closes the connection at any of them ("Malformed packet"), so we refuse them.
# A regular expression that reads the same in Python and in ECMA-262 with the `u` flag (JSON
# Schema's dialect): escapes for the BMP, the astral noncharacters as themselves.
UNSENDABLE_CLASS: Final = (
    "[\\x00-\\x1f\\x7f-\\x9f\\ufdd0-\\ufdef\\ufffe\\uffff"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17))
    + "]"
)
_UNSENDABLE: Final = re.compile(UNSENDABLE_CLASS)
# A decoded "\ud800" escape: a str can hold it, UTF-8 cannot encode it. Matches only lone
# surrogates: a well-formed astral character is one code point in Python and under `u`.
LONE_SURROGATE: Final = "[\\ud800-\\udfff]"
_VALID_UNICODE: Final = "valid Unicode (no lone surrogates)"
_INTEGRAL_NOTE: Final = ("an integer written without a fraction: JSON Schema holds 1.0 equal to "
                         "1, so the schema lets 1.0 through where the validator refuses it")


class ConfigError(Exception):
    """Base of the errors this module raises on purpose."""


class ConfigFileError(ConfigError):
    """The file as a whole is unusable: unreadable, too large, not JSON, or not an entry list."""

    def __init__(self, source: str, detail: str, *, line: int | None = None,
                 column: int | None = None) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail
        self.line = line  # where in the file, when the problem has a place (1-based)
        self.column = column


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


# --- field rules, as data: the validator applies them, schema.py writes them as JSON Schema ---


class Finding(NamedTuple):
    """One thing found about a value: a sentence, and its parts for machine-readable output."""

    severity: Severity
    message: str
    expected: str | None = None
    received: str | None = None


_Check = Callable[[str, Any], Iterator[Finding]]


def _must(name: str, expected: str, received: str, verb: str = "be") -> Finding:
    return Finding("error", f"{name} must {verb} {expected}, got {received}", expected, received)


def _error(subject: str, expected: str, value: Any) -> Finding:
    return _must(subject, expected, _render(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8_size(text: str) -> int | None:
    """Encoded length, or None when `text` holds a lone surrogate (not encodable)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


@dataclass(frozen=True, slots=True)
class Forbidden:
    """What a string field must not contain, as a regular expression searched for: the
    validator searches with it and the JSON Schema says `"not": {"pattern": ...}`."""

    pattern: str  # reads the same in Python's re and in ECMA-262 with the `u` flag
    expected: str  # the rule, as "<field> must <verb> <expected>"
    verb: str = "be"
    # What was received, when more telling than the value itself.
    received: Callable[[str, re.Match[str]], str] | None = None
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.pattern))

    def findings(self, name: str, value: str) -> Iterator[Finding]:
        found = self.compiled.search(value)
        if found is not None:
            got = self.received(value, found) if self.received else _render(value)
            yield _must(name, self.expected, got, self.verb)


def _where_unsendable(value: str, found: re.Match[str]) -> str:
    code = ord(found.group())
    kind = "NUL" if code == 0 else "a control character" if code <= 0x9F else "a noncharacter"
    return f"{_render(value)}: U+{code:04X} ({kind}) at character {found.start() + 1}"


def _level_count(value: str, _found: re.Match[str]) -> str:
    return str(value.count("/") + 1)


_NOT_A_SURROGATE: Final = Forbidden(LONE_SURROGATE, _VALID_UNICODE)
# "(?![^/])": then a "/" or the end. Not "(?:/|$)": Python's $ also matches before a final
# newline, ECMA-262's does not.
_RESERVED_TREES: Final = Forbidden(
    "^\\$(?:" + "|".join(p.removeprefix("$") for p in RESERVED_TOPIC_PREFIXES) + ")(?![^/])",
    "outside the broker-owned " + ", ".join(RESERVED_TOPIC_PREFIXES) + " trees")
_SENDABLE_TEXT: Final = Forbidden(UNSENDABLE_CLASS, "free of NUL, control characters "
                                  "(U+0001-U+001F, U+007F-U+009F) and noncharacters",
                                  received=_where_unsendable)
_TOPIC_FORBIDS: Final = (
    Forbidden("[+#]", 'free of the wildcards "+" and "#"'),
    _SENDABLE_TEXT,
    _NOT_A_SURROGATE,
    # 200 levels have 199 separators: 200 of them make one level too many.
    Forbidden(f"(?:/[^/]*){{{MAX_TOPIC_LEVELS}}}", f"at most {MAX_TOPIC_LEVELS} levels",
              verb="have", received=_level_count),
    _RESERVED_TREES,
)

JsonType = Literal["string", "number", "integer", "boolean", "object"]


@dataclass(frozen=True, slots=True)
class FieldRule:
    """Everything an entry field must be. The validator reads these rules and schema.py writes
    them out as JSON Schema, so the two cannot drift. What JSON Schema cannot state lives in
    `custom`, and `unexpressed` says what the schema lets through because of it."""

    name: str
    type: JsonType
    expected: str  # said of a value of the wrong type (or of an empty string, or off the enum)
    description: str
    required: bool = False
    nullable: bool = False
    min_length: int = 0
    max_length: int | None = None  # in characters (code points), as JSON Schema counts them
    max_utf8_bytes: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[int, ...] | None = None
    forbidden: tuple[Forbidden, ...] = ()
    max_depth: int | None = None  # of an object, counting itself
    payload: bool = False  # a JSON payload: finite numbers, valid Unicode strings and keys
    # An object with named members (each checked by its rule, named "<name>.<member>";
    # others are a warning, like unknown fields of an entry), or a map whose every key and
    # value follows one rule, with at most `max_members` of them.
    members: tuple[FieldRule, ...] = ()
    key_rule: FieldRule | None = None
    value_rule: FieldRule | None = None
    max_members: int | None = None
    custom: _Check | None = None
    unexpressed: str | None = None
    # The field an entry has instead of this one: exactly one of the two (interval or cron).
    alternative: str | None = None

    @property
    def key(self) -> str:
        """The rule's own key in its object: a member rule is named "<object>.<key>"."""
        return self.name.rpartition(".")[2]

    @property
    def range_text(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"between {_plain(self.minimum)} and {_plain(self.maximum)}"
        return self.expected

    def check(self, value: Any) -> Iterator[Finding]:
        """Every finding about `value` as this field, in a stable order."""
        if value is None and self.nullable:
            return
        early = self._type_finding(value)
        if early is not None:
            yield early
            return
        if isinstance(value, str):
            yield from self._string_findings(value)
        if self.max_depth is not None:
            too_deep = _depth_finding(self.name, value, self.max_depth)
            if too_deep is not None:
                yield too_deep
                return  # the checks below recurse: only within the limit
        if self.payload:
            yield from _payload_findings(self.name, value)
        if self.members:
            yield from _member_findings(self, value)
        if self.key_rule is not None or self.value_rule is not None:
            yield from _map_findings(self, value)
        if self.custom is not None:
            yield from self.custom(self.name, value)

    def _type_finding(self, value: Any) -> Finding | None:
        if not _HAS_TYPE[self.type](value) or (isinstance(value, str)
                                                and len(value) < self.min_length):
            return _error(self.name, self.expected, value)
        if isinstance(value, float) and not math.isfinite(value):
            return _error(self.name, "a finite number", value)
        if self.enum is not None and value not in self.enum:
            return _error(self.name, self.expected, value)
        # Compared without float(): an int like 10**400 would overflow the conversion.
        if (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum):
            return _error(self.name, self.range_text, value)
        return None

    def _string_findings(self, value: str) -> Iterator[Finding]:
        for forbidden in self.forbidden:
            yield from forbidden.findings(self.name, value)
        if self.max_length is not None and len(value) > self.max_length:
            yield _must(self.name, f"at most {self.max_length} characters",
                        f"{len(value)} characters")
        if self.max_utf8_bytes is None:
            return
        size = _utf8_size(value)  # None: a lone surrogate, which a Forbidden reports
        if size is not None and size > self.max_utf8_bytes:
            yield _must(self.name, f"at most {self.max_utf8_bytes} UTF-8 bytes", f"{size} bytes")


def _plain(number: float) -> str:
    """An int in full (4294967295, not 4.29497e+09); a float in its shortest form."""
    return str(number) if isinstance(number, int) else f"{number:g}"


_HAS_TYPE: Final[Mapping[JsonType, Callable[[Any], bool]]] = MappingProxyType({
    "string": lambda value: isinstance(value, str),
    "number": lambda value: _is_int(value) or isinstance(value, float),
    "integer": _is_int,
    "boolean": lambda value: isinstance(value, bool),
    "object": lambda value: isinstance(value, Mapping),
})


def _depth_finding(name: str, value: Any, limit: int) -> Finding | None:
    depth = nesting_depth(value, MAX_DOCUMENT_DEPTH)
    if depth <= limit:
        return None
    got = f"more than {MAX_DOCUMENT_DEPTH}" if depth > MAX_DOCUMENT_DEPTH else str(depth)
    return _must(name, f"nested at most {limit} levels deep", got)


def _payload_findings(name: str, value: Any) -> Iterator[Finding]:
    culprit = _unpublishable(value)
    if culprit is not None:
        subject, expected, bad = culprit
        yield _error(f"{name} {subject}", expected, bad)


def _member_findings(rule: FieldRule, value: Mapping[str, Any]) -> Iterator[Finding]:
    known = {member.key: member for member in rule.members}
    for key, member_value in value.items():
        member = known.get(key)
        if member is None:
            yield _unknown_member(f"{rule.name}.", key, list(known))
        else:
            yield from member.check(member_value)
    yield from _repeated_keys(value, lambda key: f"field {_render(f'{rule.name}.{key}')}")


def _map_findings(rule: FieldRule, value: Mapping[str, Any]) -> Iterator[Finding]:
    if rule.max_members is not None and len(value) > rule.max_members:
        yield _must(rule.name, f"at most {rule.max_members} members", str(len(value)), "have")
    for key, member in value.items():
        if rule.key_rule is not None:
            named = dataclasses.replace(rule.key_rule, name=f"{rule.name} key {_render(key)}")
            yield from named.check(key)
        if rule.value_rule is not None:
            named = dataclasses.replace(rule.value_rule, name=f"{rule.name}[{_render(key)}]")
            yield from named.check(member)
    yield from _repeated_keys(value, lambda key: f"{rule.name} key {_render(key)}")


def _repeated_keys(value: Mapping[str, Any], subject: Callable[[str], str]) -> Iterator[Finding]:
    """The keys a JSON object in the file repeats (document.JsonObject): json keeps the last."""
    for key in getattr(value, "repeated", ()):
        message = f"{subject(key)} appears more than once; the last one wins"
        yield Finding("warning", message, "once", "more than once")


def _check_online_key(name: str, value: Mapping[str, Any]) -> Iterator[Finding]:
    if "online" in value:
        owned = 'key "online" is overridden by the service (1 while running, 0 when offline)'
        got = _render(value["online"])
        yield Finding("warning", f"{name} {owned}, got {got}", 'no key "online"', got)


def _check_dollar_topic(name: str, value: str) -> Iterator[Finding]:
    # The broker-owned trees are errors (a Forbidden above); any other "$" topic is legitimate
    # on some brokers ($aws/..., $iothub/...), so only worth a word.
    if value.startswith("$") and not _RESERVED_TREES.compiled.search(value):
        reserved = 'starts with "$": brokers reserve such topics, and subscribers to "#" never'
        got = _render(value)
        yield Finding("warning", f"{name} {reserved} get them, got {got}",
                      'a topic not starting with "$"', got)


def _check_timestamp(name: str, value: str) -> Iterator[Finding]:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        yield _error(name, "an ISO-8601 date-time string", value)


_ISO_NOTE: Final = ("the validator also requires what Python's datetime.fromisoformat "
                    "accepts (a calendar date, an optional time and UTC offset); the schema "
                    "checks only that it is a string")


_PLACEHOLDER_NOTE: Final = ('with "template": true, the placeholders in its strings are only '
                            "the names the service knows, written without spaces; the schema "
                            "does not look inside data's strings")


def _timestamp_rule(name: str, description: str) -> FieldRule:
    return FieldRule(name, "string", "an ISO-8601 date-time string", description,
                     nullable=True, custom=_check_timestamp, unexpressed=_ISO_NOTE)


# MQTT 5 1.5.4 holds for every UTF-8 string of a packet, and Mosquitto closes the connection
# at a control character or noncharacter in a property as in a topic.
_PROPERTY_TEXT_FORBIDS: Final = (_SENDABLE_TEXT, _NOT_A_SURROGATE)
_PROPERTIES_RULE: Final = FieldRule(
    "properties", "object", "an object",
    "MQTT 5 properties sent with every publish of the entry and with its will (lwt); "
    "ignored, with one warning per entry, on MQTT 3.1.1.",
    nullable=True,
    members=(
        FieldRule("properties.message_expiry", "integer",
                  f"an integer between 1 and {MAX_MESSAGE_EXPIRY}",
                  "Message Expiry Interval, seconds: the broker discards the message (a "
                  "retained one too) when it has not reached a subscriber by then.",
                  minimum=1, maximum=MAX_MESSAGE_EXPIRY, unexpressed=_INTEGRAL_NOTE),
        FieldRule("properties.content_type", "string", "a non-empty string",
                  'Content Type: a MIME type such as "application/json".',
                  min_length=1, max_length=MAX_PROPERTY_CHARS, forbidden=_PROPERTY_TEXT_FORBIDS),
        FieldRule("properties.user_properties", "object", "an object of strings",
                  f"User Properties: names and string values, sent in this order; at most "
                  f"{MAX_USER_PROPERTIES}.",
                  max_members=MAX_USER_PROPERTIES,
                  key_rule=FieldRule("name", "string", "a non-empty string",
                                     "A user property's name.", min_length=1,
                                     max_length=MAX_PROPERTY_CHARS,
                                     forbidden=_PROPERTY_TEXT_FORBIDS),
                  value_rule=FieldRule("value", "string", "a string",
                                       "A user property's value.",
                                       max_length=MAX_PROPERTY_CHARS,
                                       forbidden=_PROPERTY_TEXT_FORBIDS)),
        FieldRule("properties.payload_format_utf8", "boolean", "true or false",
                  "Payload Format Indicator: true says the payload is UTF-8 text (it is: "
                  "JSON). False or absent sends no indicator."),
    ),
)


def _check_cron(name: str, value: str) -> Iterator[Finding]:
    try:
        parse_cron(value)
        check_fires(value)
    except CronError as exc:
        got = _render(value)
        yield Finding("error", f"{name}: {exc}, got {got}", _CRON_EXPECTED, got)


def _check_timezone(name: str, value: str) -> Iterator[Finding]:
    try:
        time_zone(value)
    except CronError:
        got = _render(value)
        yield Finding("error", f"{name}: expected {_TIMEZONE_EXPECTED}, got {got}",
                      _TIMEZONE_EXPECTED, got)


_CRON_EXPECTED: Final = ('a crontab expression: 5 fields ("0 * * * *"), or 6 with seconds '
                         'first ("*/10 * * * * *")')
_TIMEZONE_EXPECTED: Final = 'an IANA time zone name such as "Europe/Berlin"'


# Order matters: it is the order of PublishConfig's fields and of its ValueError messages.
FIELD_RULES: Final[tuple[FieldRule, ...]] = (
    FieldRule("id", "string", "a non-empty string",
              "Names the entry in logs, metrics and the API; unique in the file.",
              required=True, min_length=1, forbidden=(_NOT_A_SURROGATE,),
              unexpressed="unique across entries: JSON Schema's uniqueItems compares whole "
                          "entries, not one key of them, so the schema does not check it"),
    FieldRule("topic", "string", "a non-empty string",
              "The MQTT topic published to: no wildcards, control characters or "
              "noncharacters, at most 200 levels and 65535 UTF-8 bytes, outside $SYS, "
              "$CONTROL and $share (another \"$\" topic is a warning).",
              required=True, min_length=1, max_utf8_bytes=MAX_TOPIC_BYTES,
              forbidden=_TOPIC_FORBIDS, custom=_check_dollar_topic,
              unexpressed=f"at most {MAX_TOPIC_BYTES} UTF-8 bytes: JSON Schema counts "
                          f"characters, so the schema checks at most {MAX_TOPIC_BYTES} "
                          f"characters, which lets through a topic of up to 4 times as many "
                          f"bytes"),
    FieldRule("data", "object", "an object",
              'The payload: published as {"online": 1, ...data}, compact UTF-8 JSON. A key '
              '"online" is overridden by the service (a warning).',
              required=True, max_depth=MAX_DATA_DEPTH, payload=True, custom=_check_online_key,
              unexpressed=_PLACEHOLDER_NOTE),
    FieldRule("interval", "number", "a number",
              "Seconds between two publications. An entry has exactly one of interval and cron.",
              minimum=MIN_INTERVAL, maximum=MAX_INTERVAL, alternative="cron"),
    FieldRule("qos", "integer", "0, 1 or 2", "MQTT QoS (default 0).", enum=(0, 1, 2),
              unexpressed=_INTEGRAL_NOTE),
    FieldRule("retain", "boolean", "true or false", "Publish retained (default false)."),
    FieldRule("lwt", "boolean", "true or false",
              "Own connection with a Last Will of {\"online\": 0, ...data} (default false)."),
    FieldRule("cron", "string", _CRON_EXPECTED,
              "When to publish, as a crontab expression in `timezone`: 5 fields (minute hour "
              "day month day_of_week, 0 and 7 are Sunday) or 6 with seconds first. An entry "
              "has exactly one of interval and cron.",
              min_length=1, custom=_check_cron, alternative="interval",
              unexpressed="a valid expression: the schema checks only that it is a string; "
                          "APScheduler's CronTrigger decides"),
    FieldRule("timezone", "string", _TIMEZONE_EXPECTED,
              "The IANA time zone a cron entry's fields are read in (default UTC). An interval "
              "entry ignores it (a warning).",
              min_length=1, custom=_check_timezone,
              unexpressed="a known IANA name: the schema checks only that it is a string"),
    FieldRule("template", "boolean", "true or false",
              "Fill placeholders such as {{now}} and {{seq}} in data's string values at each "
              "publish (default false: braces are literal text)."),
    _PROPERTIES_RULE,
    _timestamp_rule("created_at", "Metadata: when the entry was created (ISO 8601)."),
    _timestamp_rule("updated_at", "Metadata: when the entry was last changed (ISO 8601)."),
    FieldRule("version", "integer", "an integer >= 1", "Metadata: the entry's revision.",
              nullable=True, minimum=1, unexpressed=_INTEGRAL_NOTE),
)
_FIELDS: Final[Mapping[str, FieldRule]] = MappingProxyType({r.name: r for r in FIELD_RULES})
_FIELD_ORDER: Final[Mapping[str, int]] = MappingProxyType(
    {r.name: n for n, r in enumerate(FIELD_RULES)})


# --- placeholders in `data` (template.py) ----------------------------------------------------


def _placeholder_findings(data: Mapping[str, Any], templated: bool) -> Iterator[Finding]:
    """Errors for bad placeholders of a templated entry; a warning for a placeholder that would
    be published as literal text (no `template`, or in a key). `data` is already checked."""
    if not templated:
        stray = stray_placeholder(data)
        if stray is not None:
            path, found = stray
            yield Finding("warning", f"{path}: {found} is published as literal text because the "
                          'entry has no "template": true (did you mean "template": true?)',
                          '"template": true', found)
        return
    for problem in placeholder_problems(data):
        got = _render(problem.received)
        yield Finding("error", f"{problem.path}: {problem.message}, got {got}",
                      "known placeholders", got)
    for path in key_placeholders(data):
        yield Finding("warning", f"{path}: keys are not templated; the key is published as "
                      "written", "placeholders in string values only", path)


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
        found = cls(value.get("message_expiry"), value.get("content_type"),
                    tuple(users.items()), bool(value.get("payload_format_utf8", False)))
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
        for spec in dataclasses.fields(cls):
            if spec.init:
                object.__setattr__(config, spec.name, fields.get(spec.name, spec.default))
        object.__setattr__(config, "source_key", None)
        config._derive()
        return config

    def _check(self) -> None:
        errors = [
            finding.message
            for rule in FIELD_RULES
            # Left out (None) is the alternative's business: _alternative_findings says.
            if not (rule.alternative is not None and getattr(self, rule.name) is None)
            for finding in rule.check(self._as_read(rule.name))
            if finding.severity == "error"
        ]
        present = {rule.name: getattr(self, rule.name) for rule in FIELD_RULES
                   if rule.alternative is not None and getattr(self, rule.name) is not None}
        errors.extend(f.message for _name, f in _alternative_findings(present)
                      if f.severity == "error")
        if not errors and self.template:
            errors = [f.message for f in _placeholder_findings(self.data, templated=True)
                      if f.severity == "error"]
        if errors:
            label = _id_label(self.id if isinstance(self.id, str) else None)
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
            other.interval, other.cron, other.schedule_timezone)

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
        return f"cron {_render(self.cron)} in {self.timezone}"

    def same_wire(self, other: PublishConfig) -> bool:
        """True when `other` puts the same bytes on the wire, with the same options."""
        return (self.topic, self.payload, self.qos, self.retain, self.lwt, self.template,
                self.properties) == (
            other.topic, other.payload, other.qos, other.retain, other.lwt, other.template,
            other.properties,
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding about the config, located precisely enough to fix it."""

    severity: Severity
    position: int | None  # 1-based entry position; None for the file as a whole
    entry_id: str | None
    field: str | None
    message: str
    # The message's parts, for machine-readable output: not compared, the message says it all.
    expected: str | None = dataclasses.field(default=None, compare=False)
    received: str | None = dataclasses.field(default=None, compare=False)  # None: absent
    # Where the entry starts in the file (1-based), when known. Not compared: the same problem
    # moved by an edit elsewhere in the file is the same problem.
    line: int | None = dataclasses.field(default=None, compare=False)
    column: int | None = dataclasses.field(default=None, compare=False)

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
    return value if not any(_FIELDS["id"].check(value)) else None


def _unknown_field(name: str) -> Finding:
    return _unknown_member("", name, list(_FIELDS))


def _unknown_member(prefix: str, key: str, known: list[str]) -> Finding:
    """A key no rule knows, in the object whose members are `known` (`prefix` names the
    object: "" for an entry, "properties." for its properties): ignored, with a warning."""
    message = f"unknown field {_render(prefix + key)} is ignored"
    guesses = difflib.get_close_matches(key, known, n=1)
    if guesses:
        message = f"{message} (did you mean {_render(prefix + guesses[0])}?)"
    return Finding("warning", message, "one of " + ", ".join(prefix + k for k in known),
                   _render(prefix + key))


def _field_findings(entry: Mapping[str, Any]) -> Iterator[tuple[str, Finding]]:
    refused: set[str] = set()  # fields with an error
    for name, value in entry.items():
        rule = _FIELDS.get(name)
        if rule is None:
            yield name, _unknown_field(name)
            continue
        for finding in rule.check(value):
            if finding.severity == "error":
                refused.add(name)
            yield name, finding
    for name in getattr(entry, "repeated", ()):
        message = f"field {_render(name)} appears more than once; the last one wins"
        yield name, Finding("warning", message, "once", "more than once")
    for rule in FIELD_RULES:
        if rule.required and rule.name not in entry:
            yield rule.name, Finding("error", f"{rule.name} is required", rule.expected)
    if "data" in entry and not refused & {"data", "template"}:
        for finding in _placeholder_findings(entry["data"], entry.get("template", False)):
            yield "data", finding
    yield from _alternative_findings(entry)
    if "timezone" in entry and "cron" not in entry and "interval" in entry:
        got = _render(entry["timezone"])
        yield "timezone", Finding("warning", f"timezone: applies to cron entries only; an "
                                  f"interval entry ignores it, got {got}", "no timezone", got)


def _alternative_findings(entry: Mapping[str, Any]) -> Iterator[tuple[str, Finding]]:
    """An entry has exactly one field of each pair of alternatives (interval or cron)."""
    for rule in FIELD_RULES:
        other = rule.alternative
        if other is None or rule.name > other:
            continue  # each pair once
        first, second = sorted((rule.name, other), key=_FIELD_ORDER.__getitem__)
        if first in entry and second in entry:
            got = f"both ({first} {_render(entry[first])}, {second} {_render(entry[second])})"
            yield second, Finding("error", f"{second}: an entry has either {first} or {second}, "
                                  f"not both, got {got}", f"one of {first} and {second}", got)
        elif first not in entry and second not in entry:
            yield first, Finding("error", f"{first} or {second} is required (exactly one of "
                                 f"them)", f"one of {first} and {second}")


def _unreadable_entry(position: int, element: document.UnreadableElement,
                      first_seen: dict[str, int]) -> _Checked:
    """A well-formed element that holds what JSON refuses: this entry is rejected (its last
    good version keeps running), the rest of the file is not."""
    entry_id = _usable_id(element.entry_id)
    if entry_id is not None:
        first_seen.setdefault(entry_id, position)
    message = f"{element.detail} (line {element.line}, column {element.column})"
    problem = Problem("error", position, entry_id, element.field, message,
                      line=element.line, column=element.column)
    return _Checked(None, [problem], entry_id)


def _reused(position: int, located: document.Located, known: Mapping[str, PublishConfig],
            first_seen: dict[str, int]) -> _Checked | None:
    """The running entry, when the file still holds the very text it was read from: checking
    that text again would find nothing and build an equal entry. A reload of a large file
    that changed in one place so checks one entry instead of all of them."""
    entry = located.value
    entry_id = entry.get("id") if isinstance(entry, dict) else None
    before = known.get(entry_id) if isinstance(entry_id, str) else None
    if before is None or before.source_key is None or before.source_key != located.fingerprint:
        return None
    if first_seen.setdefault(before.id, position) != position:
        return None  # a duplicate now: the full check says so
    return _Checked(before, [], before.id)


def _check_entry(position: int, located: document.Located,
                 first_seen: dict[str, int]) -> _Checked:
    entry = located.value
    if isinstance(entry, document.UnreadableElement):
        return _unreadable_entry(position, entry, first_seen)
    where = {"line": located.line, "column": located.column}
    if not isinstance(entry, dict):
        got = _render(entry)
        problem = Problem("error", position, None, None, f"must be an object, got {got}",
                          "an object", got, **where)
        return _Checked(None, [problem], None)
    entry_id = _usable_id(entry.get("id"))
    findings = list(_field_findings(entry))
    if entry_id is not None and first_seen.setdefault(entry_id, position) != position:
        used, got = f"already used by entry {first_seen[entry_id]}", _render(entry_id)
        findings.append(("id", Finding("error", f"id must be unique, got {got} ({used})",
                                       "unique", got)))
    members = located.member_positions() if findings else {}
    problems = [Problem(f.severity, position, entry_id, name, f.message, f.expected, f.received,
                        *members.get(name, (located.line, located.column)))
                for name, f in findings]
    if any(problem.severity == "error" for problem in problems):
        return _Checked(None, problems, entry_id)
    config = PublishConfig._from_checked(entry)  # every field was checked just above
    if not problems:
        object.__setattr__(config, "source_key", located.fingerprint)
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


def parse_config_steps(raw: bytes, *, source: str = "<config>", step: int = PARSE_STEP,
                       known: Mapping[str, PublishConfig] | None = None,
                       ) -> Generator[None, None, ConfigResult]:
    """parse_config in steps: pauses (yields) after every `step` entries and returns the
    result. The service's main loop parses a large file this way, a slice per turn, so its
    systemd watchdog pings and stop requests are not held up (docs/design.md).

    `known` are the entries in force: an element whose text is the one such an entry was read
    from is that entry again, without being checked a second time."""
    known = known or {}
    entries: list[PublishConfig] = []
    problems: list[Problem] = []
    invalid_ids: set[str] = set()
    first_seen: dict[str, int] = {}
    try:
        for position, entry in enumerate(document.located_elements(raw), start=1):
            if position % step == 0:
                yield
            checked = (_reused(position, entry, known, first_seen)
                       or _check_entry(position, entry, first_seen))
            problems.extend(checked.problems)
            if checked.config is not None:
                entries.append(checked.config)
            # A rejected duplicate must not mark the id: its first occurrence is running fine.
            elif checked.entry_id is not None and first_seen[checked.entry_id] == position:
                invalid_ids.add(checked.entry_id)
    except document.DocumentError as exc:
        raise ConfigFileError(source, exc.detail, line=exc.line, column=exc.column) from None
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

    def load_steps(self, raw: bytes, known: Mapping[str, PublishConfig] | None = None,
                   ) -> Generator[None, None, ConfigResult]:
        """Parse bytes read with read() in steps (parse_config_steps, which reuses the `known`
        entries whose text did not change); raises ConfigFileError."""
        return parse_config_steps(raw, source=str(self._path), known=known)

    def load_configurations(self) -> list[PublishConfig]:
        """Only the valid entries; use load() to see the problems too."""
        return list(self.load().entries)
