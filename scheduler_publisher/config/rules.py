"""An entry's fields: their limits and rules (`FIELD_RULES`), in the order of PublishConfig's
fields. The rules are data (fields.py); this module holds what is particular to each field:
topics, the payload, schedules, MQTT 5 properties and metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from scheduler_publisher.config.cron import CronError, check_fires, parse_cron, time_zone
from scheduler_publisher.config.fields import (
    NOT_A_SURROGATE,
    SENDABLE_TEXT,
    FieldRule,
    Finding,
    Forbidden,
    error_finding,
    render_value,
)
from scheduler_publisher.config.template import (
    key_placeholders,
    placeholder_problems,
    stray_placeholder,
)

__all__ = [
    "CRON_EXPECTED",
    "DEFAULT_TIMEZONE",
    "FIELDS_BY_NAME",
    "FIELD_ORDER",
    "FIELD_RULES",
    "MAX_DATA_DEPTH",
    "MAX_INTERVAL",
    "MAX_MESSAGE_EXPIRY",
    "MAX_PROPERTY_CHARS",
    "MAX_TOPIC_BYTES",
    "MAX_TOPIC_LEVELS",
    "MAX_USER_PROPERTIES",
    "MIN_INTERVAL",
    "RESERVED_TOPIC_PREFIXES",
    "TIMEZONE_EXPECTED",
    "alternative_findings",
    "placeholder_findings",
]
DEFAULT_TIMEZONE: Final = "UTC"
MAX_DATA_DEPTH: Final = 32  # levels of objects/arrays in `data`, counting `data` itself
MIN_INTERVAL: Final = 0.1
MAX_INTERVAL: Final = 86400
MAX_TOPIC_BYTES: Final = 65535  # MQTT strings carry a 16-bit length prefix
# Mosquitto drops the connection ("Protocol error") at a topic of more than 201 levels
# (TOPIC_HIERARCHY_LIMIT, 200 separators): a round limit just under it.
MAX_TOPIC_LEVELS: Final = 200
# MQTT 5 properties (docs/entries.md, "MQTT 5 properties"). The expiry is a Four Byte Integer
# (MQTT 5 3.3.2.3.3). The other two limits are ours: properties travel with every publish, so they
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
_INTEGRAL_NOTE: Final = (
    "an integer written without a fraction: JSON Schema holds 1.0 equal to "
    "1, so the schema lets 1.0 through where the validator refuses it"
)


def _level_count(value: str, _found: re.Match[str]) -> str:
    return str(value.count("/") + 1)


# "(?![^/])": then a "/" or the end. Not "(?:/|$)": Python's $ also matches before a final
# newline, ECMA-262's does not.
_RESERVED_TREES: Final = Forbidden(
    "^\\$(?:" + "|".join(p.removeprefix("$") for p in RESERVED_TOPIC_PREFIXES) + ")(?![^/])",
    "outside the broker-owned " + ", ".join(RESERVED_TOPIC_PREFIXES) + " trees",
)
_TOPIC_FORBIDS: Final = (
    Forbidden("[+#]", 'free of the wildcards "+" and "#"'),
    SENDABLE_TEXT,
    NOT_A_SURROGATE,
    # 200 levels have 199 separators: 200 of them make one level too many.
    Forbidden(
        f"(?:/[^/]*){{{MAX_TOPIC_LEVELS}}}",
        f"at most {MAX_TOPIC_LEVELS} levels",
        verb="have",
        received=_level_count,
    ),
    _RESERVED_TREES,
)


def _check_online_key(name: str, value: Mapping[str, Any]) -> Iterator[Finding]:
    if "online" in value:
        owned = 'key "online" is overridden by the service (1 while running, 0 when offline)'
        got = render_value(value["online"])
        yield Finding("warning", f"{name} {owned}, got {got}", 'no key "online"', got)


def _check_dollar_topic(name: str, value: str) -> Iterator[Finding]:
    # The broker-owned trees are errors (a Forbidden above); any other "$" topic is legitimate
    # on some brokers ($aws/..., $iothub/...), so only worth a word.
    if value.startswith("$") and not _RESERVED_TREES.compiled.search(value):
        reserved = 'starts with "$": brokers reserve such topics, and subscribers to "#" never'
        got = render_value(value)
        yield Finding(
            "warning",
            f"{name} {reserved} get them, got {got}",
            'a topic not starting with "$"',
            got,
        )


def _check_timestamp(name: str, value: str) -> Iterator[Finding]:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        yield error_finding(name, "an ISO-8601 date-time string", value)


_ISO_NOTE: Final = (
    "the validator also requires what Python's datetime.fromisoformat "
    "accepts (a calendar date, an optional time and UTC offset); the schema "
    "checks only that it is a string"
)


_PLACEHOLDER_NOTE: Final = (
    'with "template": true, the placeholders in its strings are only '
    "the names the service knows, written without spaces; the schema "
    "does not look inside data's strings"
)


def _timestamp_rule(name: str, description: str) -> FieldRule:
    return FieldRule(
        name,
        "string",
        "an ISO-8601 date-time string",
        description,
        nullable=True,
        custom=_check_timestamp,
        unexpressed=_ISO_NOTE,
    )


# MQTT 5 1.5.4 holds for every UTF-8 string of a packet, and Mosquitto closes the connection
# at a control character or noncharacter in a property as in a topic.
_PROPERTY_TEXT_FORBIDS: Final = (SENDABLE_TEXT, NOT_A_SURROGATE)
_PROPERTIES_RULE: Final = FieldRule(
    "properties",
    "object",
    "an object",
    "MQTT 5 properties sent with every publish of the entry and with its will (lwt); "
    "ignored, with one warning per entry, on MQTT 3.1.1.",
    nullable=True,
    members=(
        FieldRule(
            "properties.message_expiry",
            "integer",
            f"an integer between 1 and {MAX_MESSAGE_EXPIRY}",
            "Message Expiry Interval, seconds: the broker discards the message (a "
            "retained one too) when it has not reached a subscriber by then.",
            minimum=1,
            maximum=MAX_MESSAGE_EXPIRY,
            unexpressed=_INTEGRAL_NOTE,
        ),
        FieldRule(
            "properties.content_type",
            "string",
            "a non-empty string",
            'Content Type: a MIME type such as "application/json".',
            min_length=1,
            max_length=MAX_PROPERTY_CHARS,
            forbidden=_PROPERTY_TEXT_FORBIDS,
        ),
        FieldRule(
            "properties.user_properties",
            "object",
            "an object of strings",
            f"User Properties: names and string values, sent in this order; at most "
            f"{MAX_USER_PROPERTIES}.",
            max_members=MAX_USER_PROPERTIES,
            key_rule=FieldRule(
                "name",
                "string",
                "a non-empty string",
                "A user property's name.",
                min_length=1,
                max_length=MAX_PROPERTY_CHARS,
                forbidden=_PROPERTY_TEXT_FORBIDS,
            ),
            value_rule=FieldRule(
                "value",
                "string",
                "a string",
                "A user property's value.",
                max_length=MAX_PROPERTY_CHARS,
                forbidden=_PROPERTY_TEXT_FORBIDS,
            ),
        ),
        FieldRule(
            "properties.payload_format_utf8",
            "boolean",
            "true or false",
            "Payload Format Indicator: true says the payload is UTF-8 text (it is: "
            "JSON). False or absent sends no indicator.",
        ),
    ),
)


def _check_cron(name: str, value: str) -> Iterator[Finding]:
    try:
        parse_cron(value)
        check_fires(value)
    except CronError as exc:
        got = render_value(value)
        yield Finding("error", f"{name}: {exc}, got {got}", CRON_EXPECTED, got)


def _check_timezone(name: str, value: str) -> Iterator[Finding]:
    try:
        time_zone(value)
    except CronError:
        got = render_value(value)
        yield Finding(
            "error", f"{name}: expected {TIMEZONE_EXPECTED}, got {got}", TIMEZONE_EXPECTED, got
        )


CRON_EXPECTED: Final = (
    'a crontab expression: 5 fields ("0 * * * *"), or 6 with seconds first ("*/10 * * * * *")'
)
TIMEZONE_EXPECTED: Final = 'an IANA time zone name such as "Europe/Berlin"'


# Order matters: it is the order of PublishConfig's fields and of its ValueError messages.
FIELD_RULES: Final[tuple[FieldRule, ...]] = (
    FieldRule(
        "id",
        "string",
        "a non-empty string",
        "Names the entry in logs, metrics and the API; unique in the file.",
        required=True,
        min_length=1,
        forbidden=(NOT_A_SURROGATE,),
        unexpressed="unique across entries: JSON Schema's uniqueItems compares whole "
        "entries, not one key of them, so the schema does not check it",
    ),
    FieldRule(
        "topic",
        "string",
        "a non-empty string",
        "The MQTT topic published to: no wildcards, control characters or "
        "noncharacters, at most 200 levels and 65535 UTF-8 bytes, outside $SYS, "
        '$CONTROL and $share (another "$" topic is a warning).',
        required=True,
        min_length=1,
        max_utf8_bytes=MAX_TOPIC_BYTES,
        forbidden=_TOPIC_FORBIDS,
        custom=_check_dollar_topic,
        unexpressed=f"at most {MAX_TOPIC_BYTES} UTF-8 bytes: JSON Schema counts "
        f"characters, so the schema checks at most {MAX_TOPIC_BYTES} "
        f"characters, which lets through a topic of up to 4 times as many "
        f"bytes",
    ),
    FieldRule(
        "data",
        "object",
        "an object",
        'The payload: published as {"online": 1, ...data}, compact UTF-8 JSON. A key '
        '"online" is overridden by the service (a warning).',
        required=True,
        max_depth=MAX_DATA_DEPTH,
        payload=True,
        custom=_check_online_key,
        unexpressed=_PLACEHOLDER_NOTE,
    ),
    FieldRule(
        "interval",
        "number",
        "a number",
        "Seconds between two publications. An entry has exactly one of interval and cron.",
        minimum=MIN_INTERVAL,
        maximum=MAX_INTERVAL,
        alternative="cron",
    ),
    FieldRule(
        "qos",
        "integer",
        "0, 1 or 2",
        "MQTT QoS (default 0).",
        enum=(0, 1, 2),
        unexpressed=_INTEGRAL_NOTE,
    ),
    FieldRule("retain", "boolean", "true or false", "Publish retained (default false)."),
    FieldRule(
        "lwt",
        "boolean",
        "true or false",
        'Own connection with a Last Will of {"online": 0, ...data} (default false).',
    ),
    FieldRule(
        "cron",
        "string",
        CRON_EXPECTED,
        "When to publish, as a crontab expression in `timezone`: 5 fields (minute hour "
        "day month day_of_week, 0 and 7 are Sunday) or 6 with seconds first. An entry "
        "has exactly one of interval and cron.",
        min_length=1,
        custom=_check_cron,
        alternative="interval",
        unexpressed="a valid expression: the schema checks only that it is a string; "
        "APScheduler's CronTrigger decides",
    ),
    FieldRule(
        "timezone",
        "string",
        TIMEZONE_EXPECTED,
        "The IANA time zone a cron entry's fields are read in (default UTC). An interval "
        "entry ignores it (a warning).",
        min_length=1,
        custom=_check_timezone,
        unexpressed="a known IANA name: the schema checks only that it is a string",
    ),
    FieldRule(
        "template",
        "boolean",
        "true or false",
        "Fill placeholders such as {{now}} and {{seq}} in data's string values at each "
        "publish (default false: braces are literal text).",
    ),
    _PROPERTIES_RULE,
    _timestamp_rule("created_at", "Metadata: when the entry was created (ISO 8601)."),
    _timestamp_rule("updated_at", "Metadata: when the entry was last changed (ISO 8601)."),
    FieldRule(
        "version",
        "integer",
        "an integer >= 1",
        "Metadata: the entry's revision.",
        nullable=True,
        minimum=1,
        unexpressed=_INTEGRAL_NOTE,
    ),
)
FIELDS_BY_NAME: Final[Mapping[str, FieldRule]] = MappingProxyType({r.name: r for r in FIELD_RULES})
FIELD_ORDER: Final[Mapping[str, int]] = MappingProxyType(
    {r.name: n for n, r in enumerate(FIELD_RULES)}
)


# --- placeholders in `data` (template.py) ----------------------------------------------------


def placeholder_findings(data: Mapping[str, Any], templated: bool) -> Iterator[Finding]:
    """Errors for bad placeholders of a templated entry; a warning for a placeholder that would
    be published as literal text (no `template`, or in a key). `data` is already checked."""
    if not templated:
        stray = stray_placeholder(data)
        if stray is not None:
            path, found = stray
            yield Finding(
                "warning",
                f"{path}: {found} is published as literal text because the "
                'entry has no "template": true (did you mean "template": true?)',
                '"template": true',
                found,
            )
        return
    for problem in placeholder_problems(data):
        got = render_value(problem.received)
        yield Finding(
            "error", f"{problem.path}: {problem.message}, got {got}", "known placeholders", got
        )
    for path in key_placeholders(data):
        yield Finding(
            "warning",
            f"{path}: keys are not templated; the key is published as written",
            "placeholders in string values only",
            path,
        )


def alternative_findings(entry: Mapping[str, Any]) -> Iterator[tuple[str, Finding]]:
    """An entry has exactly one field of each pair of alternatives (interval or cron)."""
    for rule in FIELD_RULES:
        other = rule.alternative
        if other is None or rule.name > other:
            continue  # each pair once
        first, second = sorted((rule.name, other), key=FIELD_ORDER.__getitem__)
        if first in entry and second in entry:
            got = (
                f"both ({first} {render_value(entry[first])}, "
                f"{second} {render_value(entry[second])})"
            )
            yield (
                second,
                Finding(
                    "error",
                    f"{second}: an entry has either {first} or {second}, not both, got {got}",
                    f"one of {first} and {second}",
                    got,
                ),
            )
        elif first not in entry and second not in entry:
            yield (
                first,
                Finding(
                    "error",
                    f"{first} or {second} is required (exactly one of them)",
                    f"one of {first} and {second}",
                ),
            )
