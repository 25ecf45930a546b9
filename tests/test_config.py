"""config/loader.py: the JSON entries file becomes validated, frozen PublishConfig objects."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler_publisher.config.document import located_elements
from scheduler_publisher.config.loader import (
    DEFAULT_MAX_BYTES,
    ConfigError,
    ConfigFileError,
    ConfigResult,
    ConfigurationLoader,
    MessageProperties,
    Problem,
    PublishConfig,
    parse_config,
    parse_config_steps,
    read_config_file,
)
from scheduler_publisher.config.rules import (
    MAX_MESSAGE_EXPIRY,
    MAX_PROPERTY_CHARS,
    MAX_USER_PROPERTIES,
)

SAMPLE = Path(__file__).resolve().parent.parent / "JSON" / "payloadStaticConfig.json"
ABSENT = object()  # marks a field to leave out of an entry


def entry(**fields: Any) -> dict[str, Any]:
    """A valid entry, with `fields` replacing (or, given ABSENT, removing) its defaults."""
    base: dict[str, Any] = {"id": "a", "topic": "site/gw01/a", "data": {"v": 1}, "interval": 5}
    base.update(fields)
    return {key: value for key, value in base.items() if value is not ABSENT}


def parse(*entries: Any) -> ConfigResult:
    return parse_config(json.dumps(list(entries), ensure_ascii=False).encode())


def lines(result: ConfigResult) -> list[str]:
    return [str(problem) for problem in result.problems]


def only_error(result: ConfigResult) -> str:
    assert len(result.errors) == 1, lines(result)
    assert result.entries == ()
    return str(result.errors[0])


def nested(depth: int) -> dict[str, Any]:
    """An object `depth` levels deep, counting itself."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


# --- a valid entry ---------------------------------------------------------------------------


def test_minimal_entry_gets_defaults() -> None:
    """Only the required fields are needed; the rest take their documented defaults."""
    result = parse(entry())
    assert result.problems == ()
    (config,) = result.entries
    assert config == PublishConfig(id="a", topic="site/gw01/a", data={"v": 1}, interval=5.0)
    assert (config.qos, config.retain, config.lwt) == (0, False, False)
    assert (config.created_at, config.updated_at, config.version) == (None, None, None)


def test_full_entry_keeps_every_field() -> None:
    """Every documented field is read into the config."""
    result = parse(
        entry(
            qos=2,
            retain=True,
            lwt=True,
            created_at="2024-03-04T09:15:00+00:00",
            updated_at="2024-06-18",
            version=3,
        )
    )
    (config,) = result.entries
    assert (config.qos, config.retain, config.lwt, config.version) == (2, True, True, 3)
    assert (config.created_at, config.updated_at) == ("2024-03-04T09:15:00+00:00", "2024-06-18")


# --- id --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("", '""'),
        (5, "5"),
        (True, "true"),
        (None, "null"),
        (["a"], '["a"]'),
    ],
)
def test_id_must_be_a_non_empty_string(value: Any, shown: str) -> None:
    """A non-string or empty id is rejected, and the message has no id label."""
    expected = f"entry 1: id must be a non-empty string, got {shown}"
    assert only_error(parse(entry(id=value))) == expected


def test_id_is_required() -> None:
    """An entry without an id is rejected."""
    assert only_error(parse(entry(id=ABSENT))) == "entry 1: id is required"


def test_id_with_lone_surrogate_is_rejected() -> None:
    """An id that cannot be encoded as UTF-8 would break every log line that names it."""
    result = parse_config(b'[{"id": "a\\ud800", "topic": "t", "data": {}, "interval": 1}]')
    assert only_error(result) == (
        'entry 1: id must be valid Unicode (no lone surrogates), got "a\\ud800"'
    )


# --- topic -----------------------------------------------------------------------------------

UNSENDABLE = (
    "topic must be free of NUL, control characters (U+0001-U+001F, U+007F-U+009F) and noncharacters"
)
RESERVED = "topic must be outside the broker-owned $SYS, $CONTROL, $share trees"


@pytest.mark.parametrize(
    "topic", ["t", "site/gw01/boiler/temperature", "/lead", "trail/", "a//b", "café/温度", "a b"]
)
def test_valid_topics(topic: str) -> None:
    """Any non-empty literal topic, including Unicode and empty levels, is accepted."""
    assert parse(entry(topic=topic)).entries[0].topic == topic


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("", 'topic must be a non-empty string, got ""'),
        (5, "topic must be a non-empty string, got 5"),
        (None, "topic must be a non-empty string, got null"),
        ("a/+/b", 'topic must be free of the wildcards "+" and "#", got "a/+/b"'),
        ("a/#", 'topic must be free of the wildcards "+" and "#", got "a/#"'),
        ("+", 'topic must be free of the wildcards "+" and "#", got "+"'),
        ("a\0b", f'{UNSENDABLE}, got "a\\u0000b": U+0000 (NUL) at character 2'),
        ("a\x07b", f'{UNSENDABLE}, got "a\\u0007b": U+0007 (a control character) at character 2'),
        ("a/\nb", f'{UNSENDABLE}, got "a/\\nb": U+000A (a control character) at character 3'),
        ("a\x7f", f'{UNSENDABLE}, got "a\\u007f": U+007F (a control character) at character 2'),
        ("\x9b2J", f'{UNSENDABLE}, got "\\u009b2J": U+009B (a control character) at character 1'),
        ("t\uffff", f'{UNSENDABLE}, got "t\\uffff": U+FFFF (a noncharacter) at character 2'),
        ("t\ufffe", f'{UNSENDABLE}, got "t\\ufffe": U+FFFE (a noncharacter) at character 2'),
        ("t\ufdd0", f'{UNSENDABLE}, got "t\\ufdd0": U+FDD0 (a noncharacter) at character 2'),
        (
            "t\U0010ffff",
            f'{UNSENDABLE}, got "t\\U0010ffff": U+10FFFF (a noncharacter) at character 2',
        ),
        ("/".join("l" * 201), "topic must have at most 200 levels, got 201"),
        ("$SYS/site/gw", f'{RESERVED}, got "$SYS/site/gw"'),
        ("$SYS", f'{RESERVED}, got "$SYS"'),
        ("$CONTROL/dynamic-security/v1", f'{RESERVED}, got "$CONTROL/dynamic-security/v1"'),
        ("$share/group/t", f'{RESERVED}, got "$share/group/t"'),
    ],
)
def test_invalid_topics(topic: Any, expected: str) -> None:
    """Non-strings, empty topics, wildcards, NUL, control characters, noncharacters, more
    levels than Mosquitto accepts and broker-owned $ trees are rejected with what was
    received: a broker drops the connection at such a publish, or silently discards it."""
    assert only_error(parse(entry(topic=topic))) == f'entry 1 (id "a"): {expected}'


def test_topic_is_required() -> None:
    """An entry without a topic is rejected."""
    assert only_error(parse(entry(topic=ABSENT))) == 'entry 1 (id "a"): topic is required'


def test_topic_limit_counts_utf8_bytes_not_characters() -> None:
    """65535 UTF-8 bytes is the limit: 21845 three-byte characters fit, one more byte does not."""
    at_limit = "€" * 21845
    assert len(at_limit.encode()) == 65535
    assert parse(entry(topic=at_limit)).entries[0].topic == at_limit
    over = only_error(parse(entry(topic=at_limit + "a")))
    assert over == 'entry 1 (id "a"): topic must be at most 65535 UTF-8 bytes, got 65536 bytes'


def test_topic_of_few_characters_but_too_many_bytes() -> None:
    """A topic under 65535 characters is still too long when its encoding is over 65535 bytes."""
    topic = "é" * 40000  # 40000 characters, 80000 bytes
    assert only_error(parse(entry(topic=topic))).endswith("got 80000 bytes")


def test_topic_with_lone_surrogate_is_rejected() -> None:
    """A topic that cannot be encoded as UTF-8 cannot be sent."""
    result = parse_config(b'[{"id": "a", "topic": "t/\\udc00", "data": {}, "interval": 1}]')
    assert "topic must be valid Unicode (no lone surrogates)" in only_error(result)


def test_dollar_topic_is_a_warning_only() -> None:
    """A topic starting with $ outside the broker-owned trees ($aws/..., $iothub/... are
    legitimate on those clouds) is accepted with a warning."""
    result = parse(entry(topic="$aws/things/gw01/shadow/update"))
    assert len(result.entries) == 1
    assert lines(result) == [
        'entry 1 (id "a"): topic starts with "$": brokers reserve such topics, and subscribers '
        'to "#" never get them, got "$aws/things/gw01/shadow/update"'
    ]
    assert result.warnings[0].field == "topic"


@pytest.mark.parametrize(
    "topic",
    [
        "/".join("l" * 200),
        "a\u200bb",
        "a\ue000b",
        "\u00a0",
        "$SYSTEM/x",
        "a/$SYS",
        "emoji/\U0001f600",
    ],
)
def test_topics_brokers_accept_pass(topic: str) -> None:
    """The limits are exact: 200 levels, format and private-use characters, U+00A0, and $SYS
    as a prefix of a longer first level or below the first level all pass without error."""
    assert parse(entry(topic=topic)).errors == ()


# --- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ([1, 2], "[1, 2]"),
        ("x", '"x"'),
        (1, "1"),
        (None, "null"),
        (True, "true"),
    ],
)
def test_data_must_be_an_object(data: Any, shown: str) -> None:
    """data that is not a JSON object is rejected."""
    expected = f'entry 1 (id "a"): data must be an object, got {shown}'
    assert only_error(parse(entry(data=data))) == expected


def test_data_is_required() -> None:
    """An entry without data is rejected."""
    assert only_error(parse(entry(data=ABSENT))) == 'entry 1 (id "a"): data is required'


def test_data_may_be_empty_and_nested() -> None:
    """Empty objects and nested arrays/objects are valid data."""
    data = {"a": [1, {"b": None}], "c": {}, "d": "é"}
    result = parse(entry(data={}), entry(id="b", data=data))
    assert [dict(config.data) for config in result.entries] == [{}, data]


def test_data_depth_limit_is_32_levels() -> None:
    """data may nest 32 levels counting itself; 33 is an error."""
    assert parse(entry(data=nested(32))).problems == ()
    assert only_error(parse(entry(data=nested(33)))) == (
        'entry 1 (id "a"): data must be nested at most 32 levels deep, got 33'
    )


def test_data_depth_counts_arrays_too() -> None:
    """Arrays inside data count as nesting levels."""
    data: dict[str, Any] = {"a": [[[[]]]]}
    data_33: dict[str, Any] = {"n": json.loads("[" * 32 + "]" * 32)}
    assert parse(entry(data=data)).problems == ()
    assert "got 33" in only_error(parse(entry(data=data_33)))


def test_data_with_out_of_range_number_is_rejected() -> None:
    """1e400 decodes to infinity, which a JSON payload cannot carry."""
    result = parse_config(b'[{"id": "a", "topic": "t", "data": {"x": [1e400]}, "interval": 1}]')
    assert only_error(result) == 'entry 1 (id "a"): data numbers must be finite, got Infinity'


@pytest.mark.parametrize("text", [b'{"x": "\\ud800"}', b'{"\\udfff": 1}'])
def test_data_with_lone_surrogate_is_rejected(text: bytes) -> None:
    """A string or key that cannot be encoded as UTF-8 cannot go into the payload."""
    raw = b'[{"id": "a", "topic": "t", "data": ' + text + b', "interval": 1}]'
    assert "data strings must be valid Unicode" in only_error(parse_config(raw))


def test_online_key_is_warned_and_overridden() -> None:
    """A data key "online" is accepted with a warning; the payload's online is the service's."""
    result = parse(entry(data={"v": 1, "online": 5}))
    assert lines(result) == [
        'entry 1 (id "a"): data key "online" is overridden by the service '
        "(1 while running, 0 when offline), got 5"
    ]
    (config,) = result.entries
    assert config.payload == b'{"online":1,"v":1}'
    assert config.offline_payload == b'{"online":0,"v":1}'


def test_nested_online_key_is_left_alone() -> None:
    """Only the top-level online key is the service's; nested ones are ordinary data."""
    result = parse(entry(data={"status": {"online": True}}))
    assert result.problems == ()
    assert result.entries[0].payload == b'{"online":1,"status":{"online":true}}'


def test_payload_is_compact_utf8_with_online_first() -> None:
    """The payload is compact JSON, UTF-8 (not \\u escapes), keys in file order after online."""
    (config,) = parse(entry(data={"z": "°C", "a": [1.5, None, False]})).entries
    assert config.payload == '{"online":1,"z":"°C","a":[1.5,null,false]}'.encode()
    assert list(json.loads(config.offline_payload)) == ["online", "z", "a"]


# --- interval --------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [0.1, 1, 2.5, 86400, 86400.0])
def test_valid_intervals(interval: float) -> None:
    """Intervals from 0.1 to 86400 seconds inclusive are accepted, as floats."""
    config = parse(entry(interval=interval)).entries[0]
    assert config.interval == interval
    assert type(config.interval) is float


@pytest.mark.parametrize(
    ("interval", "shown"),
    [
        (0, "0"),
        (0.09999999999999999, "0.09999999999999999"),
        (-1, "-1"),
        (86400.001, "86400.001"),
        (86401, "86401"),
        (10**30, str(10**30)),
    ],
)
def test_interval_out_of_range(interval: float, shown: str) -> None:
    """Intervals outside [0.1, 86400] are rejected with the exact received number."""
    assert only_error(parse(entry(interval=interval))) == (
        f'entry 1 (id "a"): interval must be between 0.1 and 86400, got {shown}'
    )


@pytest.mark.parametrize(
    ("interval", "shown"),
    [
        ("5", '"5"'),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        ([5], "[5]"),
        ({}, "{}"),
    ],
)
def test_interval_must_be_a_number(interval: Any, shown: str) -> None:
    """Strings, booleans and containers are not numbers, even when they look like one."""
    assert only_error(parse(entry(interval=interval))) == (
        f'entry 1 (id "a"): interval must be a number, got {shown}'
    )


def test_interval_must_be_finite() -> None:
    """An interval too large for a float decodes to infinity and is rejected."""
    result = parse_config(b'[{"id": "a", "topic": "t", "data": {}, "interval": 1e400}]')
    assert only_error(result) == 'entry 1 (id "a"): interval must be a finite number, got Infinity'


def test_interval_is_required() -> None:
    """The exact message for an entry with neither interval nor cron."""
    expected = 'entry 1 (id "x"): interval or cron is required (exactly one of them)'
    assert only_error(parse(entry(id="x", interval=ABSENT))) == expected


# --- qos, retain, lwt ------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_valid_qos(qos: int) -> None:
    """QoS 0, 1 and 2 are accepted."""
    assert parse(entry(qos=qos)).entries[0].qos == qos


@pytest.mark.parametrize(
    ("qos", "shown"),
    [
        ("1", '"1"'),
        (True, "true"),
        (False, "false"),
        (1.0, "1.0"),
        (3, "3"),
        (-1, "-1"),
        (None, "null"),
    ],
)
def test_invalid_qos(qos: Any, shown: str) -> None:
    """Anything but the integers 0, 1, 2 is rejected, including true and 1.0."""
    expected = f'entry 1 (id "a"): qos must be 0, 1 or 2, got {shown}'
    assert only_error(parse(entry(qos=qos))) == expected


@pytest.mark.parametrize("name", ["retain", "lwt"])
@pytest.mark.parametrize("value", [True, False])
def test_valid_flags(name: str, value: bool) -> None:
    """retain and lwt take JSON booleans."""
    config = parse(entry(**{name: value})).entries[0]
    assert getattr(config, name) is value


@pytest.mark.parametrize("name", ["retain", "lwt"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1, "1"),
        (0, "0"),
        ("true", '"true"'),
        (None, "null"),
    ],
)
def test_invalid_flags(name: str, value: Any, shown: str) -> None:
    """retain and lwt reject numbers, strings and null."""
    assert only_error(parse(entry(**{name: value}))) == (
        f'entry 1 (id "a"): {name} must be true or false, got {shown}'
    )


# --- metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["created_at", "updated_at"])
@pytest.mark.parametrize(
    "value",
    [
        "2024-03-04T09:15:00+00:00",
        "2024-03-04",
        "2024-03-04 09:15",
        "2024-03-04T09:15:00.123456",
        None,
    ],
)
def test_valid_timestamps(name: str, value: str | None) -> None:
    """Anything datetime.fromisoformat accepts, or null, is a valid timestamp."""
    assert getattr(parse(entry(**{name: value})).entries[0], name) == value


@pytest.mark.parametrize("name", ["created_at", "updated_at"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("yesterday", '"yesterday"'),
        ("", '""'),
        (1714000000, "1714000000"),
        (True, "true"),
    ],
)
def test_invalid_timestamps(name: str, value: Any, shown: str) -> None:
    """Non-ISO strings and epoch numbers are rejected."""
    assert only_error(parse(entry(**{name: value}))) == (
        f'entry 1 (id "a"): {name} must be an ISO-8601 date-time string, got {shown}'
    )


@pytest.mark.parametrize("version", [1, 7, None])
def test_valid_versions(version: int | None) -> None:
    """version is a positive integer, or null."""
    assert parse(entry(version=version)).entries[0].version == version


@pytest.mark.parametrize(
    ("version", "shown"),
    [
        (0, "0"),
        (-1, "-1"),
        (True, "true"),
        (1.5, "1.5"),
        (1.0, "1.0"),
        ("2", '"2"'),
    ],
)
def test_invalid_versions(version: Any, shown: str) -> None:
    """version rejects zero, negatives, booleans, floats and strings."""
    assert only_error(parse(entry(version=version))) == (
        f'entry 1 (id "a"): version must be an integer >= 1, got {shown}'
    )


# --- MQTT 5 properties -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"message_expiry": 1}, MessageProperties(message_expiry=1)),
        ({"message_expiry": MAX_MESSAGE_EXPIRY}, MessageProperties(message_expiry=2**32 - 1)),
        ({"content_type": "application/json"}, MessageProperties(content_type="application/json")),
        (
            {"user_properties": {"site": "gw01", "empty": ""}},
            MessageProperties(user_properties=(("site", "gw01"), ("empty", ""))),
        ),
        ({"payload_format_utf8": True}, MessageProperties(payload_format_utf8=True)),
        (
            {
                "message_expiry": 60,
                "content_type": "application/json",
                "payload_format_utf8": True,
                "user_properties": {"é": "温度"},
            },
            MessageProperties(60, "application/json", (("é", "温度"),), True),
        ),
    ],
)
def test_valid_properties(properties: dict[str, Any], expected: MessageProperties) -> None:
    """Each property is read into the entry's MessageProperties."""
    result = parse(entry(properties=properties))
    assert result.problems == ()
    assert result.entries[0].properties == expected


@pytest.mark.parametrize(
    "properties", [None, {}, {"payload_format_utf8": False}, {"user_properties": {}}]
)
def test_properties_that_set_nothing_are_none(properties: dict[str, Any] | None) -> None:
    """null, {} and properties that send nothing leave the entry without properties."""
    result = parse(entry(properties=properties))
    assert result.problems == ()
    assert result.entries[0].properties is None


def test_user_properties_keep_the_files_order() -> None:
    """User properties are kept in the order the file writes them (MQTT 5 keeps it too)."""
    names = ["z", "a", "m", "b"]
    (config,) = parse(entry(properties={"user_properties": {n: n.upper() for n in names}})).entries
    assert config.properties is not None
    assert [name for name, _ in config.properties.user_properties] == names


@pytest.mark.parametrize(
    ("properties", "shown"),
    [
        ([1], "properties must be an object, got [1]"),
        ("json", 'properties must be an object, got "json"'),
        (
            {"message_expiry": 0},
            "properties.message_expiry must be between 1 and 4294967295, got 0",
        ),
        (
            {"message_expiry": 2**32},
            "properties.message_expiry must be between 1 and 4294967295, got 4294967296",
        ),
        (
            {"message_expiry": 1.5},
            "properties.message_expiry must be an integer between 1 and 4294967295, got 1.5",
        ),
        (
            {"message_expiry": 60.0},
            "properties.message_expiry must be an integer between 1 and 4294967295, got 60.0",
        ),
        (
            {"message_expiry": "60"},
            'properties.message_expiry must be an integer between 1 and 4294967295, got "60"',
        ),
        ({"content_type": ""}, 'properties.content_type must be a non-empty string, got ""'),
        ({"content_type": 5}, "properties.content_type must be a non-empty string, got 5"),
        (
            {"content_type": "text/\x00"},
            "properties.content_type must be free of NUL, control characters (U+0001-U+001F, "
            'U+007F-U+009F) and noncharacters, got "text/\\u0000": U+0000 (NUL) at character 6',
        ),
        (
            {"content_type": "x" * 4097},
            "properties.content_type must be at most 4096 characters, got 4097 characters",
        ),
        (
            {"user_properties": ["a", "b"]},
            'properties.user_properties must be an object of strings, got ["a", "b"]',
        ),
        ({"user_properties": {"n": 5}}, 'properties.user_properties["n"] must be a string, got 5'),
        (
            {"user_properties": {"": "v"}},
            'properties.user_properties key "" must be a non-empty string, got ""',
        ),
        (
            {"user_properties": {"n": "a\tb"}},
            'properties.user_properties["n"] must be free of NUL, control characters '
            '(U+0001-U+001F, U+007F-U+009F) and noncharacters, got "a\\tb": '
            "U+0009 (a control character) at character 2",
        ),
        (
            {"user_properties": {"n": "v" * 4097}},
            'properties.user_properties["n"] must be at most 4096 characters, got 4097 characters',
        ),
        (
            {"user_properties": {f"k{i}": "v" for i in range(65)}},
            "properties.user_properties must have at most 64 members, got 65",
        ),
        ({"payload_format_utf8": 1}, "properties.payload_format_utf8 must be true or false, got 1"),
    ],
)
def test_invalid_properties(properties: Any, shown: str) -> None:
    """A bad property is an error naming the entry and the path inside properties."""
    result = parse(entry(properties=properties))
    assert only_error(result) == f'entry 1 (id "a"): {shown}'
    assert result.errors[0].field == "properties"


def test_property_limits_are_inclusive() -> None:
    """64 user properties and 4096-character strings (of 4-byte characters, too) are fine."""
    longest = "\U0001f600" * MAX_PROPERTY_CHARS
    users = {f"k{i}": "v" for i in range(MAX_USER_PROPERTIES - 1)} | {longest: longest}
    result = parse(entry(properties={"content_type": longest, "user_properties": users}))
    assert result.problems == ()


def test_unknown_property_is_a_warning_with_its_path() -> None:
    """An unknown key inside properties is ignored with a warning naming properties.<key>, and
    a close misspelling gets a hint."""
    result = parse(entry(properties={"message_expiry": 5, "colour": 1, "content_typ": "x"}))
    assert lines(result) == [
        'entry 1 (id "a"): unknown field "properties.colour" is ignored',
        'entry 1 (id "a"): unknown field "properties.content_typ" is ignored '
        '(did you mean "properties.content_type"?)',
    ]
    assert {p.severity for p in result.problems} == {"warning"}
    assert result.entries[0].properties == MessageProperties(message_expiry=5)


def test_repeated_keys_inside_properties_are_warnings() -> None:
    """A property or a user property written twice is a warning; the last one wins."""
    raw = (
        b'[{"id": "a", "topic": "t", "data": {}, "interval": 5, "properties": '
        b'{"content_type": "x", "content_type": "y", "user_properties": {"k": "1", "k": "2"}}}]'
    )
    result = parse_config(raw)
    assert lines(result) == [
        'entry 1 (id "a"): properties.user_properties key "k" appears more than once; the '
        "last one wins",
        'entry 1 (id "a"): field "properties.content_type" appears more than once; the last '
        "one wins",
    ]
    assert result.entries[0].properties == MessageProperties(
        content_type="y", user_properties=(("k", "2"),)
    )


def test_property_errors_point_at_the_properties_field() -> None:
    """The line and column of a property error are those of the entry's "properties" key."""
    raw = (
        b'[{"id": "a", "topic": "t", "data": {}, "interval": 5,\n'
        b'  "properties": {"message_expiry": 0}}]'
    )
    (problem,) = parse_config(raw).problems
    assert (problem.line, problem.column) == (2, 3)


def test_direct_construction_takes_properties_as_an_object_or_a_value() -> None:
    """PublishConfig(properties=...) takes the file's object or MessageProperties, and
    validates either."""
    # The file's form: typed as the value it becomes, as parse_config hands it over.
    from_object = PublishConfig("a", "t", {}, 1, properties={"content_type": "text/plain"})  # type: ignore[arg-type]
    from_value = PublishConfig(
        "a", "t", {}, 1, properties=MessageProperties(content_type="text/plain")
    )
    assert from_object == from_value
    assert from_object.properties == MessageProperties(content_type="text/plain")
    with pytest.raises(ValueError, match=r"properties\.message_expiry must be between"):
        PublishConfig("a", "t", {}, 1, properties=MessageProperties(message_expiry=0))


# --- unknown and repeated fields -------------------------------------------------------------


def test_unknown_field_is_a_warning() -> None:
    """An unknown field is reported as a warning and the entry stays valid."""
    result = parse(entry(colour="red"))
    assert len(result.entries) == 1
    assert lines(result) == ['entry 1 (id "a"): unknown field "colour" is ignored']
    assert result.problems[0].severity == "warning"
    assert result.problems[0].field == "colour"


def test_unknown_field_suggests_a_close_name() -> None:
    """A misspelt field name gets a did-you-mean hint."""
    result = parse(entry(intervall=10))
    assert lines(result) == [
        'entry 1 (id "a"): unknown field "intervall" is ignored (did you mean "interval"?)'
    ]


def test_repeated_field_is_a_warning() -> None:
    """A field written twice in one entry is a warning; JSON keeps the last value."""
    raw = b'[{"id": "a", "topic": "t", "data": {}, "interval": 5, "interval": 10}]'
    result = parse_config(raw)
    assert result.entries[0].interval == 10
    assert lines(result) == [
        'entry 1 (id "a"): field "interval" appears more than once; the last one wins'
    ]


# --- messages --------------------------------------------------------------------------------


def test_message_format_is_exact() -> None:
    """The documented message shape: position, id label, field, expectation, received value."""
    result = parse(entry(id="p1"), entry(id="pump-7", interval=0))
    assert lines(result) == ['entry 2 (id "pump-7"): interval must be between 0.1 and 86400, got 0']
    (problem,) = result.problems
    assert problem == Problem(
        "error", 2, "pump-7", "interval", "interval must be between 0.1 and 86400, got 0"
    )


def test_entry_that_is_not_an_object() -> None:
    """A non-object entry is rejected as a whole, without field or id."""
    result = parse(entry(), [1, 2], "x", None)
    assert lines(result) == [
        "entry 2: must be an object, got [1, 2]",
        'entry 3: must be an object, got "x"',
        "entry 4: must be an object, got null",
    ]
    assert len(result.entries) == 1


def test_long_received_values_are_truncated() -> None:
    """Received values are cut to about 60 characters with an ellipsis."""
    message = only_error(parse(entry(qos="x" * 500)))
    shown = message.split(", got ", 1)[1]
    assert len(shown) == 60
    assert shown.startswith('"xxx')
    assert shown.endswith("…")


def test_problem_without_position_is_the_message() -> None:
    """A file-level problem renders as its message alone."""
    assert str(Problem("warning", None, None, None, "all quiet")) == "all quiet"


# --- many entries at once --------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    """All entries and all fields are checked; nothing stops at the first error."""
    result = parse(
        entry(id="ok"),
        entry(id="b", topic="a/#", interval="5", qos=3, colour=1),
        {"topic": "t", "data": [], "lwt": "yes"},
        entry(id="d", retain=None, version=0, data={"online": 0}),
    )
    assert lines(result) == [
        'entry 2 (id "b"): topic must be free of the wildcards "+" and "#", got "a/#"',
        'entry 2 (id "b"): interval must be a number, got "5"',
        'entry 2 (id "b"): qos must be 0, 1 or 2, got 3',
        'entry 2 (id "b"): unknown field "colour" is ignored',
        "entry 3: data must be an object, got []",
        'entry 3: lwt must be true or false, got "yes"',
        "entry 3: id is required",
        "entry 3: interval or cron is required (exactly one of them)",
        'entry 4 (id "d"): data key "online" is overridden by the service '
        "(1 while running, 0 when offline), got 0",
        'entry 4 (id "d"): retain must be true or false, got null',
        'entry 4 (id "d"): version must be an integer >= 1, got 0',
    ]
    assert [config.id for config in result.entries] == ["ok"]
    assert result.invalid_ids == {"b", "d"}


def test_invalid_entries_are_skipped_and_valid_ones_kept_in_order() -> None:
    """One bad entry does not take the others down; order is the file's."""
    result = parse(entry(id="c"), entry(id="bad", qos=9), entry(id="a"), entry(id="b"))
    assert [config.id for config in result.entries] == ["c", "a", "b"]
    assert result.invalid_ids == {"bad"}


def test_errors_and_warnings_are_split() -> None:
    """errors and warnings partition problems, each in file order."""
    result = parse(entry(id="w", x=1), entry(id="e", qos=5), entry(id="w2", topic="$t"))
    assert [p.entry_id for p in result.errors] == ["e"]
    assert [p.entry_id for p in result.warnings] == ["w", "w2"]


def test_empty_array_is_valid() -> None:
    """An empty array means no entries and no problems."""
    result = parse()
    assert (result.entries, result.problems, result.invalid_ids) == ((), (), frozenset())


def test_digest_is_sha256_of_the_raw_bytes() -> None:
    """The digest identifies the exact file content."""
    raw = json.dumps([entry()]).encode()
    assert parse_config(raw).digest == hashlib.sha256(raw).hexdigest()


# --- duplicates and invalid_ids --------------------------------------------------------------


def test_duplicate_id_rejects_the_later_occurrence_only() -> None:
    """The first entry with an id stays valid; later ones are errors naming the first."""
    result = parse(entry(id="a", interval=1), entry(id="b"), entry(id="a", interval=2))
    assert [(c.id, c.interval) for c in result.entries] == [("a", 1.0), ("b", 5.0)]
    assert lines(result) == [
        'entry 3 (id "a"): id must be unique, got "a" (already used by entry 1)'
    ]
    assert result.invalid_ids == frozenset()


def test_duplicate_of_an_invalid_entry_is_still_a_duplicate() -> None:
    """When the first occurrence is invalid, its id is invalid and the later one still errs."""
    result = parse(entry(id="a", qos=7), entry(id="a"))
    assert result.entries == ()
    assert result.invalid_ids == {"a"}
    assert [p.field for p in result.errors] == ["qos", "id"]


def test_invalid_ids_holds_only_usable_string_ids() -> None:
    """Rejected entries without a usable id cannot be named, so they are not in invalid_ids."""
    result = parse(
        entry(id="x", interval=0),
        entry(id=5, interval=0),
        entry(id="", topic=""),
        [1],
        entry(id="y"),
    )
    assert result.invalid_ids == {"x"}
    assert [config.id for config in result.entries] == ["y"]


# --- PublishConfig built in Python -----------------------------------------------------------


def test_direct_construction_validates() -> None:
    """Invalid objects cannot exist: the constructor reports every bad field."""
    with pytest.raises(ValueError, match="interval") as caught:
        PublishConfig(id="q", topic="a/+", data={"x": 1}, interval=0, qos=True)  # type: ignore[arg-type]
    assert str(caught.value) == (
        'invalid PublishConfig (id "q"): topic must be free of the wildcards "+" and "#", '
        'got "a/+"; interval must be between 0.1 and 86400, got 0; qos must be 0, 1 or 2, got true'
    )


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"x": {1, 2}}, "data values must be JSON values, got {1, 2}"),
        ({1: "a"}, "data keys must be strings, got 1"),
        ({"x": float("nan")}, "data numbers must be finite, got NaN"),
        ({"x": [float("-inf")]}, "data numbers must be finite, got -Infinity"),
        ({"x": b"raw"}, "data values must be JSON values, got b'raw'"),
    ],
)
def test_direct_construction_rejects_non_json_data(data: Any, fragment: str) -> None:
    """Python values that are not JSON cannot reach a payload."""
    with pytest.raises(ValueError, match="invalid PublishConfig") as caught:
        PublishConfig(id="q", topic="t", data=data, interval=1)
    assert str(caught.value).endswith(fragment)


def test_direct_construction_rejects_cyclic_data() -> None:
    """A self-referencing mapping is reported as too deep instead of recursing forever."""
    data: dict[str, Any] = {}
    data["self"] = data
    with pytest.raises(ValueError, match="nested at most 32 levels deep, got more than 64"):
        PublishConfig(id="q", topic="t", data=data, interval=1)


def test_direct_construction_rejects_nan_interval() -> None:
    """NaN is never a valid interval."""
    with pytest.raises(ValueError, match="interval must be a finite number, got NaN"):
        PublishConfig(id="q", topic="t", data={}, interval=float("nan"))


def test_data_is_a_read_only_private_copy() -> None:
    """Mutating the caller's dict afterwards does not change the config, and data is read-only."""
    source: dict[str, Any] = {"x": [1], "y": {"z": 2}}
    config = PublishConfig(id="q", topic="t", data=source, interval=1)
    source["x"].append(2)
    source["y"]["z"] = 3
    source["new"] = 1
    assert config.data == {"x": [1], "y": {"z": 2}}
    assert config.payload == b'{"online":1,"x":[1],"y":{"z":2}}'
    with pytest.raises(TypeError):
        config.data["x"] = 0  # type: ignore[index]
    config.data["x"].append(9)  # a value read out of data is a fresh object
    config.data["y"]["z"] = 9
    assert config.data == {"x": [1], "y": {"z": 2}}
    assert config.payload == b'{"online":1,"x":[1],"y":{"z":2}}'


def test_data_is_what_goes_on_the_wire() -> None:
    """data is read back from the payload: nested mappings of any kind render, and the
    service-owned "online" key is not part of the operator's data."""
    nested = MappingProxyType({"b": (1, 2)})
    config = PublishConfig(id="q", topic="t", data={"online": 7, "a": nested}, interval=1)
    assert config.payload == b'{"online":1,"a":{"b":[1,2]}}'
    assert config.data == {"a": {"b": [1, 2]}}
    assert dict(config.data) == {"a": {"b": [1, 2]}}
    assert len(config.data) == 1
    assert "online" not in config.data
    assert "a" in config.data
    assert list(config.data.keys()) == ["a"]
    assert list(config.data.values()) == [{"b": [1, 2]}]
    assert dict(config.data.items()) == {"a": {"b": [1, 2]}}
    assert repr(config.data) == "{'a': {'b': [1, 2]}}"
    assert config.offline_payload == b'{"online":0,"a":{"b":[1,2]}}'


def test_equal_intervals_are_one_shared_float() -> None:
    """An int interval becomes a float, and entries with equal intervals share the object
    (10,000 entries usually have a handful of intervals between them)."""
    one = PublishConfig(id="q", topic="t", data={}, interval=60)
    two = PublishConfig(id="r", topic="u", data={}, interval=60.0)
    assert type(one.interval) is float
    assert one.interval is two.interval


def test_config_is_frozen_comparable_and_unhashable() -> None:
    """Configs compare by value, cannot be changed, and are not hashable (data is a mapping)."""
    one = PublishConfig(id="q", topic="t", data={"a": 1}, interval=1)
    assert one == PublishConfig(id="q", topic="t", data={"a": 1}, interval=1.0)
    assert one != PublishConfig(id="q", topic="t", data={"a": True}, interval=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.topic = "u"  # type: ignore[misc]
    with pytest.raises(TypeError, match="unhashable"):
        hash(one)


def test_config_accepts_another_configs_data() -> None:
    """The read-only data of one config can build another (replace() relies on this)."""
    one = PublishConfig(id="q", topic="t", data={"a": [1]}, interval=1)
    two = dataclasses.replace(one, interval=2)
    assert two.data == one.data
    assert two.payload == one.payload
    with pytest.raises(ValueError, match="qos"):
        dataclasses.replace(one, qos=5)  # type: ignore[arg-type]


def test_same_schedule_and_same_wire() -> None:
    """same_schedule compares the interval only; same_wire compares what reaches the broker."""
    base = PublishConfig(id="q", topic="t", data={"a": 1}, interval=5)
    slower = dataclasses.replace(base, interval=10)
    moved = dataclasses.replace(base, topic="u")
    restamped = dataclasses.replace(base, version=2, updated_at="2024-01-01")
    assert base.same_wire(slower)
    assert not base.same_schedule(slower)
    assert base.same_schedule(moved)
    assert not base.same_wire(moved)
    assert base.same_wire(restamped)
    assert base.same_schedule(restamped)
    for change in ({"qos": 1}, {"retain": True}, {"lwt": True}, {"data": {"a": 2}}):
        assert not base.same_wire(dataclasses.replace(base, **change))


# --- file-level problems ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    """A missing file raises ConfigFileError naming the path and the reason."""
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigFileError) as caught:
        read_config_file(path)
    assert str(caught.value) == f"{path}: cannot read config file: No such file or directory"
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_directory(tmp_path: Path) -> None:
    """A directory is not a config file."""
    with pytest.raises(ConfigFileError, match="is a directory, not a config file"):
        read_config_file(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO is refused before open(), which would wait for a writer forever."""
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigFileError, match="is not a regular file"):
        read_config_file(fifo)


def test_too_large_file(tmp_path: Path) -> None:
    """A file over max_bytes is refused; one exactly at the limit is read."""
    path = tmp_path / "c.json"
    path.write_bytes(b"[" + b" " * 98 + b"]")
    assert read_config_file(path, max_bytes=100) == path.read_bytes()
    with pytest.raises(ConfigFileError) as caught:
        read_config_file(path, max_bytes=99)
    assert str(caught.value) == f"{path}: is 100 bytes, larger than the 99-byte limit"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_file_larger_than_its_stat_size_is_cut_off() -> None:
    """A file that reports size 0 (like /proc) is still read no further than max_bytes + 1."""
    with pytest.raises(ConfigFileError, match="is larger than the 10-byte limit"):
        read_config_file(Path("/proc/self/status"), max_bytes=10)


def test_default_size_limit_is_16_mib() -> None:
    """The default limit is 16 MiB."""
    assert DEFAULT_MAX_BYTES == 16 * 1024 * 1024


def test_invalid_utf8_names_the_byte_offset() -> None:
    """Bytes that are not UTF-8 are reported with their offset."""
    with pytest.raises(ConfigFileError) as caught:
        parse_config(b'[{"id": "\xff"}]', source="c.json")
    assert str(caught.value) == "c.json: not valid UTF-8 at byte offset 9"


def test_utf8_bom_is_accepted() -> None:
    """A leading UTF-8 byte order mark is skipped, not an error."""
    assert parse_config(b"\xef\xbb\xbf" + json.dumps([entry()]).encode()).entries[0].id == "a"


def test_invalid_utf8_after_bom_counts_the_bom() -> None:
    """The reported offset is into the file, BOM included."""
    with pytest.raises(ConfigFileError, match="at byte offset 4"):
        parse_config(b"\xef\xbb\xbf[\xc3]")


def test_bad_json_names_line_and_column() -> None:
    """A syntax error is reported with the decoder's line and column."""
    raw = b'[\n  {"id": "a",\n    "topic" "t"}\n]'
    with pytest.raises(ConfigFileError) as caught:
        parse_config(raw, source="c.json")
    expected = "c.json: not valid JSON: Expecting ':' delimiter at line 3, column 13"
    assert str(caught.value) == expected


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_rejected(literal: str) -> None:
    """Python's json accepts NaN and Infinity; the config does not: the entry holding one is
    rejected, named by position, id, path and line/column, and the next entry is kept."""
    raw = (
        f'[\n  {{"id": "b", "topic": "t", "data": {{}}, "interval": 1}},\n'
        f'  {{"id": "a", "topic": "t", "data": {{"x": [1, {literal}]}}, "interval": 1}},\n'
        f'  {{"id": "c", "topic": "t", "data": {{}}, "interval": 1}}\n]'
    ).encode()
    result = parse_config(raw, source="c.json")
    assert lines(result) == [
        f'entry 2 (id "a"): data.x[1]: {literal} is not valid JSON (use a '
        "number or null) (line 3, column 3)"
    ]
    assert [e.id for e in result.entries] == ["b", "c"]
    assert result.invalid_ids == {"a"}  # its last good version keeps running
    assert result.errors[0].field == "data"


def test_refused_literal_in_an_entry_without_an_id_names_its_place() -> None:
    """Without a usable id the entry is still named by position, line and column."""
    result = parse_config(
        b'[{"interval": NaN}, {"id": "ok", "topic": "t", "data": {}, "interval": 1}]'
    )
    assert lines(result) == [
        "entry 1: interval: NaN is not valid JSON (use a number or null) (line 1, column 2)"
    ]
    assert [e.id for e in result.entries] == ["ok"]


def test_refused_literal_with_a_syntax_error_later_is_a_file_error() -> None:
    """The other entries are kept only when the rest of the file reads: a syntax error after
    the refused literal is still a file error, at its line and column."""
    raw = b'[{"id": "a", "data": {"x": NaN}},\n {"id": "b" "topic": 1}]'
    with pytest.raises(ConfigFileError, match="not valid JSON: Expecting ',' delimiter at line 2"):
        parse_config(raw)


def test_nan_inside_a_string_is_fine() -> None:
    """Only bare literals are rejected; the text "NaN" in a string is data."""
    assert parse(entry(data={"x": "NaN"})).problems == ()


def test_very_deep_nesting_is_a_file_error() -> None:
    """100000 nested arrays raise ConfigFileError naming where the element starts, not
    RecursionError: too deep for the decoder to find where the element ends."""
    with pytest.raises(ConfigFileError) as caught:
        parse_config(b'[{"id": "a"},\n ' + b"[" * 100_000 + b"]" * 100_000 + b"]", source="c")
    assert str(caught.value) == (
        "c: JSON nesting is deeper than 64 levels, in the element at line 2, column 2"
    )


def test_nesting_limit_is_64_levels() -> None:
    """64 levels parse (the entry is merely invalid); at 65 levels that entry is refused."""
    result = parse_config(b"[" * 64 + b"]" * 64)
    assert lines(result) == ["entry 1: must be an object, got " + "[" * 59 + "…"]
    result = parse_config(b"[" * 65 + b"]" * 65)
    assert lines(result) == [
        "entry 1: [0][0][0][0][0][0]…: JSON nesting is deeper than 64 levels (line 1, column 2)"
    ]


def test_data_nested_deeper_than_64_rejects_only_its_entry() -> None:
    """One entry whose data is nested 70 deep is rejected by id and field; the others stay."""
    deep = b'{"k": ' * 70 + b"1" + b"}" * 70
    raw = (
        b'[{"id": "deep", "topic": "t", "interval": 1, "data": ' + deep + b"},\n"
        b' {"id": "ok", "topic": "t", "data": {}, "interval": 1}]'
    )
    result = parse_config(raw)
    assert lines(result) == [
        'entry 1 (id "deep"): data.k.k.k.k.k…: JSON nesting is deeper than '
        "64 levels (line 1, column 2)"
    ]
    assert [e.id for e in result.entries] == ["ok"]
    assert result.invalid_ids == {"deep"}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"{}", "object"),
        (b'"x"', "string"),
        (b"1", "number"),
        (b"2.5", "number"),
        (b"null", "null"),
        (b"true", "boolean"),
    ],
)
def test_top_level_must_be_an_array(raw: bytes, kind: str) -> None:
    """Anything but an array at the top is refused, naming what was found."""
    with pytest.raises(ConfigFileError) as caught:
        parse_config(raw, source="c.json")
    assert str(caught.value) == f"c.json: must be a JSON array of entries, got {kind}"


@pytest.mark.parametrize("raw", [b"", b"  \n\t"])
def test_empty_file(raw: bytes) -> None:
    """An empty file (often a half-written one) gets its own clear message."""
    with pytest.raises(ConfigFileError, match="is empty; expected a JSON array of entries"):
        parse_config(raw)


def test_overlong_integer_rejects_only_its_entry() -> None:
    """An integer beyond Python's digit limit is reported by entry, path and digit count, not
    raised as a bare ValueError; the other entries are kept."""
    raw = (
        b'[{"id": "ok", "topic": "t", "data": {}, "interval": 1},\n'
        b' {"id": "big", "topic": "t", "data": {"n": -' + b"9" * 5000 + b'}, "interval": 1}]'
    )
    result = parse_config(raw)
    limit = sys.get_int_max_str_digits()
    assert lines(result) == [
        f'entry 2 (id "big"): data.n: an integer of 5000 digits is longer '
        f"than the {limit}-digit limit (line 2, column 2)"
    ]
    assert [e.id for e in result.entries] == ["ok"]
    assert parse_config(b"[" + b"9" * 5000 + b"]").errors[0].position == 1


# --- the loader and the sample file ----------------------------------------------------------


def test_loader_does_no_io_when_built(tmp_path: Path) -> None:
    """Building a loader for a missing file succeeds; loading it raises ConfigFileError."""
    loader = ConfigurationLoader(str(tmp_path / "later.json"))
    assert loader.path == tmp_path / "later.json"
    with pytest.raises(ConfigFileError, match="No such file"):
        loader.load()


def test_loader_reads_and_parses(tmp_path: Path) -> None:
    """load() gives the full result; load_configurations() the valid entries only."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps([entry(id="ok"), entry(id="bad", qos=3)]))
    loader = ConfigurationLoader(path)
    result = loader.load()
    assert lines(result) == ['entry 2 (id "bad"): qos must be 0, 1 or 2, got 3']
    assert [config.id for config in loader.load_configurations()] == ["ok"]


def test_loader_applies_max_bytes(tmp_path: Path) -> None:
    """The loader passes its size limit to the read, and refuses a non-positive one."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps([entry()]))
    with pytest.raises(ConfigFileError, match="larger than the 8-byte limit"):
        ConfigurationLoader(path, max_bytes=8).load()
    with pytest.raises(ValueError, match="max_bytes"):
        ConfigurationLoader(path, max_bytes=0)


def test_bundled_sample_is_valid() -> None:
    """The shipped sample has four clean entries exercising intervals, QoS, retain and LWT."""
    result = ConfigurationLoader(SAMPLE).load()
    assert result.problems == ()
    assert len(result.entries) == 4
    assert len({config.interval for config in result.entries}) == 4
    assert {config.qos for config in result.entries} == {0, 1, 2}
    assert {config.retain for config in result.entries} == {True, False}
    assert sum(config.lwt for config in result.entries) >= 1
    assert all(
        config.version and config.created_at and config.updated_at for config in result.entries
    )


# --- properties ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

entry_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["a", "b", "c", ""]) | json_values,
        "topic": st.sampled_from(["t/1", "a/+", "$s", "", "x\0"]) | json_values,
        "data": st.dictionaries(st.sampled_from(["online", "v", "w"]), json_values, max_size=3)
        | json_values,
        "interval": st.sampled_from([0, 0.1, 5, 86400, 86401, True]) | json_values,
        "qos": st.sampled_from([0, 1, 2, 3, True]) | json_values,
        "retain": st.booleans() | json_values,
        "lwt": st.booleans() | json_values,
        "created_at": st.sampled_from(["2024-01-01", "nope", None]) | json_values,
        "version": st.sampled_from([1, 0, None]) | json_values,
        "extra": json_values,
    },
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_config_file_error(raw: bytes) -> None:
    """No input bytes make parse_config raise anything but ConfigFileError."""
    with contextlib.suppress(ConfigFileError):
        assert isinstance(parse_config(raw), ConfigResult)


@settings(deadline=None)
@given(json_values)
def test_arbitrary_json_raises_only_config_file_error(value: Any) -> None:
    """No JSON document makes parse_config raise anything but ConfigFileError."""
    with contextlib.suppress(ConfigFileError):
        assert isinstance(parse_config(json.dumps(value).encode()), ConfigResult)


@settings(deadline=None)
@given(st.lists(entry_like | json_values, max_size=6))
def test_entry_lists_split_cleanly_into_valid_and_rejected(document: list[Any]) -> None:
    """Each entry is either returned or has an error; ids are unique and never also invalid."""
    result = parse_config(json.dumps(document).encode())
    rejected = {p.position for p in result.errors}
    assert len(result.entries) + len(rejected) == len(document)
    ids = [config.id for config in result.entries]
    assert len(ids) == len(set(ids))
    assert not set(ids) & result.invalid_ids
    for config in result.entries:
        assert json.loads(config.payload)["online"] == 1
        assert next(iter(json.loads(config.offline_payload).items())) == ("online", 0)


@settings(deadline=None)
@given(st.lists(entry_like | json_values, max_size=4), st.sampled_from([None, 0, 2]), st.data())
def test_entries_read_one_by_one_match_json_reading_the_whole_file(
    document: list[Any], indent: int | None, data: st.DataObject
) -> None:
    """The file is decoded an entry at a time (it saves memory), with the outcome json.loads
    gives for the whole text: the same entries and problems, or json's error at its position."""
    text = json.dumps(document, indent=indent)
    at = data.draw(st.integers(0, len(text)))
    insert = data.draw(st.sampled_from(["", ",", "]", "[", " ", "\n", "x", "}", '"', "1"]))
    text = text[:at] + insert + text[at + data.draw(st.integers(0, 1)) :]
    json_error: str | None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        whole, json_error = None, f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
    else:
        json_error = None
    if json_error is not None:
        with pytest.raises(ConfigFileError) as caught:
            parse_config(text.encode())
        assert json_error in str(caught.value)
        return
    if not isinstance(whole, list):
        with pytest.raises(ConfigFileError, match="must be a JSON array of entries"):
            parse_config(text.encode())
        return

    def outcome(result: ConfigResult) -> tuple[Any, ...]:
        problems = [p for p in result.problems if "appears more than once" not in p.message]
        return result.entries, problems, result.invalid_ids

    assert outcome(parse_config(text.encode())) == outcome(parse_config(json.dumps(whole).encode()))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'[{"id": "a"},\n ]', "Expecting value at line 2, column 2"),
        (b'[{"id": "a"}] x', "Extra data at line 1, column 15"),
        (b'[{"id": "a"} {"id": "b"}]', "Expecting ',' delimiter at line 1, column 14"),
        (b'[{"id": "a"}, ', "Expecting value at line 1, column 15"),
    ],
)
def test_structural_errors_after_good_entries_name_json_position(raw: bytes, expected: str) -> None:
    """A broken array after valid entries is still a file error, at json's own position."""
    with pytest.raises(ConfigFileError) as caught:
        parse_config(raw, source="c.json")
    assert str(caught.value) == f"c.json: not valid JSON: {expected}"


def test_parse_config_steps_pauses_and_returns_the_same_result() -> None:
    """Parsing in steps pauses once per `step` entries and ends with what parse_config gives."""
    raw = json.dumps([entry(id=f"e{i}") for i in range(10)]).encode()
    steps = parse_config_steps(raw, step=3)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result = done.value
            break
        pauses += 1
    assert pauses == 3
    assert result == parse_config(raw)


def running(result: ConfigResult) -> dict[str, PublishConfig]:
    return {config.id: config for config in result.entries}


def test_a_reload_takes_over_entries_whose_text_did_not_change() -> None:
    """Entries whose text is unchanged are the running objects again; a changed one is read
    anew; the result equals a full parse of the new file."""
    old = [entry(id=f"e{i}", topic=f"t/{i}") for i in range(5)]
    first = parse_config(json.dumps(old).encode())
    new = [*old[:2], entry(id="e2", topic="t/2", data={"v": 2}), *old[3:]]
    raw = json.dumps(new).encode()

    result = parse_config(raw, known=running(first))

    assert result == parse_config(raw)
    taken_over = {c.id for c in result.entries if c is running(first)[c.id]}
    assert taken_over == {"e0", "e1", "e3", "e4"}
    assert result.entries[2].payload == b'{"online":1,"v":2}'


def test_a_reload_reports_a_duplicate_of_an_unchanged_entry() -> None:
    """An unchanged entry that a new entry above it now duplicates is rejected as a duplicate,
    like a full parse does; it is not taken over unchecked."""
    first = parse_config(json.dumps([entry(id="a")]).encode())
    raw = json.dumps([entry(id="a", topic="other"), entry(id="a")]).encode()

    result = parse_config(raw, known=running(first))

    assert result == parse_config(raw)
    assert [c.topic for c in result.entries] == ["other"]
    assert "id must be unique" in lines(result)[0]


def test_a_reload_checks_again_every_entry_that_had_a_finding() -> None:
    """An entry with a warning is checked on every reload, so its warning is reported again
    (at its new line), never lost by taking the entry over."""
    warned = entry(id="w", colour="red")
    first = parse_config(json.dumps([warned]).encode())
    assert first.warnings
    raw = json.dumps([entry(id="new"), warned], indent=1).encode()

    result = parse_config(raw, known=running(first))

    assert result == parse_config(raw)
    assert [p.entry_id for p in result.warnings] == ["w"]
    assert result.warnings[0].line != first.warnings[0].line
    assert running(result)["w"] is not running(first)["w"]


def test_a_reload_takes_over_only_the_same_text_not_an_equal_value() -> None:
    """1 and 1.0 are equal in Python but publish different bytes: an entry whose text changed
    that way is read anew, and its payload follows the file."""
    first = parse_config(b'[{"id": "a", "topic": "t", "data": {"v": 1}, "interval": 5}]')
    raw = b'[{"id": "a", "topic": "t", "data": {"v": 1.0}, "interval": 5}]'

    result = parse_config(raw, known=running(first))

    assert result.entries[0].payload == b'{"online":1,"v":1.0}'
    assert result.entries[0] != first.entries[0]


# --- where problems are ----------------------------------------------------------------------


def test_problems_carry_the_line_and_column_of_their_field() -> None:
    """A field's problem is at its key; a missing field, a non-object and an entry JSON refuses
    are at the entry's start. CRLF line ends count as one line each."""
    raw = (
        b'[\r\n  {"id": "a", "topic": "t", "data": {}, "interval": 1},\r\n'
        b'  {"id": "b",\r\n     "topic": "x/#", "data": {}},\r\n'
        b"   5,\r\n"
        b'  {"id": "c", "topic": "t", "data": {"v": NaN}, "interval": 1}\r\n]'
    )
    result = parse_config(raw)
    where = [(p.position, p.field, p.line, p.column) for p in result.problems]
    assert where == [(2, "topic", 4, 6), (2, "interval", 3, 3), (3, None, 5, 4), (4, "data", 6, 3)]


def test_a_repeated_key_is_located_at_its_last_occurrence() -> None:
    """json keeps the last of a repeated key, so its problem is placed there."""
    raw = b'[{"id": "a", "topic": "t", "data": {},\n "interval": 1,\n "interval": 0}]'
    (error,) = parse_config(raw).errors
    assert (error.line, error.column) == (3, 2)


def test_problem_places_do_not_change_equality() -> None:
    """The same problem moved by an edit elsewhere in the file is still the same problem."""
    compact = parse(entry(interval=0))
    indented = parse_config(json.dumps([entry(interval=0)], indent=4).encode())
    assert compact.problems == indented.problems
    assert compact.problems[0].line != indented.problems[0].line


@pytest.mark.parametrize(
    ("raw", "line", "column"),
    [
        (b'[\n  {"id": "a",\n   "topic" "t"}]', 3, 12),
        (b'[\n  {"id": "\xc3\xa9\xff"}]', 2, 12),
        (b'\xef\xbb\xbf[{"id": "\xff"}]', 1, 10),
    ],
)
def test_file_errors_carry_line_and_column(raw: bytes, line: int, column: int) -> None:
    """A syntax error and bytes that are not UTF-8 are placed by line and column (characters,
    after a BOM)."""
    with pytest.raises(ConfigFileError) as caught:
        parse_config(raw)
    assert (caught.value.line, caught.value.column) == (line, column)


@given(
    st.lists(
        st.tuples(st.sampled_from(["", " ", "\n", "\n  ", "\r\n", " \n\n "]), st.integers(0, 99)),
        min_size=1,
        max_size=30,
    )
)
def test_each_element_is_located_at_its_line_and_column(layout: list[tuple[str, int]]) -> None:
    """Where located_elements says each element of the array starts is where it starts, on
    files laid out on one line or many: the line counts the newlines before it, the column the
    characters since the last one (both 1-based)."""
    text = "[" + ",".join(f'{gap}{{"n": {n}}}' for gap, n in layout) + "\n]"
    elements = list(located_elements(text.encode()))
    assert [e.value for e in elements] == [{"n": n} for _gap, n in layout]
    for element in elements:
        before = text[: element.start]
        assert (element.line, element.column) == (
            before.count("\n") + 1,
            element.start - before.rfind("\n"),
        )
