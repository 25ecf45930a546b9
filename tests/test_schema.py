"""schema.py: the committed JSON Schema is current, and it agrees with the validator.

"Agrees" means, for every file that is JSON (the schema has nothing to say about one that is
not): a file `validate` accepts (no errors; warnings allowed) passes the schema, and a file
it rejects fails the schema, except where every error is one of the gaps the schema's
`$comment` and docs/schema.md name (the schema is looser there, never stricter). Checked over
the test corpus (the parametrized cases of tests/test_config.py, the hostile files of
tests/test_faults.py, the sample) and over generated entries.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler_publisher.config.fields import FieldRule
from scheduler_publisher.config.loader import ConfigFileError, Problem, parse_config
from scheduler_publisher.config.rules import (
    CRON_EXPECTED,
    FIELD_RULES,
    MAX_MESSAGE_EXPIRY,
    MAX_TOPIC_BYTES,
    TIMEZONE_EXPECTED,
)
from scheduler_publisher.config.schema import DIALECT, entries_schema, schema_text
from tests import test_config, test_faults
from tests.support import REPO

COMMITTED = REPO / "JSON" / "entries.schema.json"
SAMPLE = REPO / "JSON" / "payloadStaticConfig.json"
VALIDATOR = jsonschema.Draft202012Validator(entries_schema())
FIELDS = {rule.name for rule in FIELD_RULES}


def every_rule(rules: tuple[FieldRule, ...] = FIELD_RULES) -> Iterator[FieldRule]:
    """The field rules and, depth first, the rules of their members (properties.*)."""
    for rule in rules:
        yield rule
        yield from every_rule(rule.members)


NOT_JSON = object()  # what JSON itself refuses: an editor reports it, no schema applies
INFINITY = "\x01inf"  # a string the generated files turn into 1e400 (which json.dumps cannot)


# --- the schema as a file -------------------------------------------------------------------


def test_committed_schema_is_the_generated_one() -> None:
    """JSON/entries.schema.json is exactly what `scheduler-publisher schema` prints."""
    assert COMMITTED.read_text(encoding="utf-8") == schema_text(), (
        "JSON/entries.schema.json is out of date: run "
        "`scheduler-publisher schema > JSON/entries.schema.json` and commit it"
    )


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    """The schema declares draft 2020-12 and passes that dialect's metaschema."""
    schema = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert schema["$schema"] == DIALECT
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schema_names_every_field_and_what_it_cannot_check() -> None:
    """Every field is a property (required ones required), and every gap is in `$comment`."""
    schema = entries_schema()
    entry = schema["$defs"]["entry"]
    assert set(entry["properties"]) == FIELDS
    assert entry["required"] == ["id", "topic", "data"]
    assert entry["allOf"] == [{"oneOf": [{"required": ["interval"]}, {"required": ["cron"]}]}]
    for rule in every_rule():
        if rule.unexpressed:
            assert f"{rule.name}: {rule.unexpressed}" in schema["$comment"]
            field_schema = entry
            for key in rule.name.split("."):
                field_schema = field_schema["properties"][key]
            assert rule.unexpressed in field_schema["$comment"]


def test_schema_defaults_are_what_an_omitted_field_becomes() -> None:
    """Each optional field's `default` is the value the service uses when it is left out."""
    properties = entries_schema()["$defs"]["entry"]["properties"]
    (config,) = parse_config(json.dumps([test_config.entry()]).encode()).entries
    defaults = {name: spec["default"] for name, spec in properties.items() if "default" in spec}
    assert set(defaults) == {
        rule.name for rule in FIELD_RULES if not rule.required and rule.alternative is None
    }
    assert defaults == {name: getattr(config, name) for name in defaults}


def test_schema_errors_point_at_the_field() -> None:
    """An editor's squiggle lands on the bad field: the error's path is the entry's field."""
    bad = [
        {"id": "a", "topic": "t", "data": {}, "interval": 1},
        {"id": "b", "topic": "a/+", "data": {}, "interval": 1},
    ]
    (error,) = VALIDATOR.iter_errors(bad)
    assert list(error.absolute_path) == [1, "topic"]


# --- the cross-check ------------------------------------------------------------------------


def _refuse(literal: str) -> Any:
    raise ValueError(literal)


def json_instance(raw: bytes) -> Any:
    """The file as a JSON Schema validator sees it, or NOT_JSON."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse)
    except (UnicodeDecodeError, ValueError, RecursionError):  # includes JSONDecodeError
        return NOT_JSON


def _not_iso(value: Any) -> bool:
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return True
    return False


def _integral_float(_expected: str | None, value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


def _calendar(_expected: str | None, value: Any) -> bool:
    return isinstance(value, str) and _not_iso(value)


# The gaps the schema documents, each as "this error is one of them", given the problem's
# expected text and the field's value. The test below checks that these are exactly the
# rules with `unexpressed` set.
GAPS: dict[str, Callable[[str | None, Any], bool]] = {
    "id": lambda expected, _value: expected == "unique",
    "data": lambda expected, _value: expected == "known placeholders",
    "topic": lambda expected, value: (
        expected == f"at most {MAX_TOPIC_BYTES} UTF-8 bytes" and len(value) <= MAX_TOPIC_BYTES
    ),
    "qos": _integral_float,
    "version": _integral_float,
    "created_at": _calendar,
    "updated_at": _calendar,
    # Problem.field names the entry's field; the member is in the expected text.
    "properties": lambda expected, value: (
        expected == f"an integer between 1 and {MAX_MESSAGE_EXPIRY}"
        and _integral_float(expected, value.get("message_expiry"))
    ),
    "cron": lambda expected, value: expected == CRON_EXPECTED and isinstance(value, str),
    "timezone": lambda expected, value: expected == TIMEZONE_EXPECTED and isinstance(value, str),
}


def _is_gap(instance: Any, problem: Problem) -> bool:
    if problem.field not in GAPS or problem.position is None:
        return False
    entry = instance[problem.position - 1]
    if problem.field not in entry:
        return False  # "is required": the schema says so too
    return GAPS[problem.field](problem.expected, entry[problem.field])


def test_the_gaps_are_the_documented_ones() -> None:
    """The test excuses exactly the rules the schema says it cannot check."""
    assert set(GAPS) == {rule.name.partition(".")[0] for rule in every_rule() if rule.unexpressed}


def verdicts(raw: bytes) -> tuple[bool, bool, bool] | None:
    """(validator accepts, schema accepts, every validator error is a documented gap), or
    None when the file is not JSON to begin with."""
    instance = json_instance(raw)
    if instance is NOT_JSON:
        return None
    try:
        result = parse_config(raw)
    except ConfigFileError:
        return False, VALIDATOR.is_valid(instance), False
    gaps_only = all(_is_gap(instance, problem) for problem in result.errors)
    return not result.errors, VALIDATOR.is_valid(instance), gaps_only


def assert_agree(raw: bytes) -> tuple[bool, bool, bool] | None:
    found = verdicts(raw)
    if found is not None:
        accepted, schema_ok, gaps_only = found
        if accepted:
            assert schema_ok, f"the schema refuses a valid file: {raw[:300]!r}"
        else:
            assert not schema_ok or gaps_only, f"the schema accepts an invalid file: {raw[:300]!r}"
    return found


def _parametrized_cases(function: Any) -> Iterator[dict[str, Any]]:
    """Every combination of a test function's parametrize marks, as keyword arguments."""
    marks = [m for m in getattr(function, "pytestmark", []) if m.name == "parametrize"]
    expanded = []
    for mark in marks:
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        rows = [getattr(v, "values", v) for v in values]
        expanded.append(
            [dict(zip(names, row if len(names) > 1 else (row,), strict=True)) for row in rows]
        )
    for combination in itertools.product(*expanded) if expanded else ():
        yield {key: value for part in combination for key, value in part.items()}


def _field_of(function_name: str, case: dict[str, Any]) -> tuple[str, Any] | None:
    if "name" in case and "value" in case:
        return case["name"], case["value"]
    for name in FIELDS:
        if name in case:
            return name, case[name]
    if "value" in case:  # test_id_... style: the field is in the test's name
        named = [f for f in FIELDS if function_name.startswith(f"test_{f}_")]
        return (named[0], case["value"]) if named else None
    return None


def config_corpus() -> Iterator[tuple[str, bytes]]:
    """Every file the config tests feed the validator: field values set into a valid entry,
    and whole files as bytes."""
    for name in dir(test_config):
        function = getattr(test_config, name)
        if not name.startswith("test_") or not callable(function):
            continue
        for index, case in enumerate(_parametrized_cases(function)):
            where = f"{name}[{index}]"
            if isinstance(case.get("raw"), bytes):
                yield where, case["raw"]
            found = _field_of(name, case)
            if found is None:
                continue
            try:  # some cases build PublishConfig directly, with data no file can hold
                text = json.dumps([test_config.entry(**{found[0]: found[1]})])
            except TypeError:
                continue
            yield where, text.encode()


def _entry_text(**fields: str) -> bytes:
    base = {"id": '"a"', "topic": '"t"', "data": "{}", "interval": "1"} | fields
    return ("[{" + ", ".join(f'"{k}": {v}' for k, v in base.items()) + "}]").encode()


# Cases tests/test_config.py writes in test bodies rather than parametrize.
BODY_CASES = {
    "lone surrogate id": _entry_text(id='"a\\ud800"'),
    "lone surrogate topic": _entry_text(topic='"t/\\udc00"'),
    "lone surrogate in data": _entry_text(data='{"x": "\\ud800"}'),
    "lone surrogate data key": _entry_text(data='{"\\udfff": 1}'),
    "1e400 in data": _entry_text(data='{"x": [1e400]}'),
    "1e400 interval": _entry_text(interval="1e400"),
    "huge integer in data": _entry_text(data='{"x": ' + "9" * 400 + "}"),
    "data 32 deep": json.dumps([test_config.entry(data=test_config.nested(32))]).encode(),
    "data 33 deep": json.dumps([test_config.entry(data=test_config.nested(33))]).encode(),
    "data arrays 33 deep": json.dumps(
        [test_config.entry(data={"n": json.loads("[" * 32 + "]" * 32)})]
    ).encode(),
    "unknown field 62 deep": json.dumps([test_config.entry(x=test_config.nested(62))]).encode(),
    "unknown field 63 deep": json.dumps([test_config.entry(x=test_config.nested(63))]).encode(),
    "topic at the byte limit": json.dumps([test_config.entry(topic="€" * 21845)]).encode(),
    "topic over the byte limit": json.dumps([test_config.entry(topic="€" * 21846)]).encode(),
    "topic over in characters": json.dumps([test_config.entry(topic="a" * 65536)]).encode(),
    "duplicate id": json.dumps([test_config.entry(), test_config.entry()]).encode(),
    "not an object": b'[1, "x", null]',
    "empty array": b"[]",
    "unknown and repeated fields": _entry_text(extra="1", interval='2, "interval": 3'),
    "cron instead of interval": b'[{"id": "a", "topic": "t", "data": {}, "cron": "0 * * * *"}]',
    "cron and interval": _entry_text(cron='"0 * * * *"'),
    "neither cron nor interval": b'[{"id": "a", "topic": "t", "data": {}}]',
    "malformed cron": b'[{"id": "a", "topic": "t", "data": {}, "cron": "0 25 * * *"}]',
    "unknown time zone": b'[{"id": "a", "topic": "t", "data": {}, "cron": "* * * * *", '
    b'"timezone": "Mars/Phobos"}]',
    "timezone on an interval entry": _entry_text(timezone='"Europe/Berlin"'),
}


def test_validator_and_schema_agree_on_the_config_tests_corpus() -> None:
    """Over every parametrized case of tests/test_config.py and the cases in its test bodies,
    the schema accepts what the validator accepts and rejects what it rejects (documented
    gaps excepted)."""
    corpus = [*config_corpus(), *BODY_CASES.items(), ("sample", SAMPLE.read_bytes())]
    outcomes = [(where, assert_agree(raw)) for where, raw in corpus]
    judged = [found for _, found in outcomes if found is not None]
    # Not vacuous: the harvest found the corpus, and both verdicts occur, gaps included.
    assert len(judged) > 100
    assert {accepted for accepted, _, _ in judged} == {True, False}
    assert any(not accepted and schema_ok for accepted, schema_ok, _ in judged)


def test_validator_and_schema_agree_on_the_hostile_files(tmp_path: Path) -> None:
    """The hostile files of tests/test_faults.py: where they are JSON at all, the schema
    rejects them as the validator does."""
    judged = []
    for name, content in test_faults.hostile_files("site/keep", limit=4096):
        if content is not None:
            judged.append((name, assert_agree(content)))
    assert {name for name, found in judged if found is not None} >= {
        "wrong types",
        "huge numbers",
        "overflowing float",
        "deep data",
        "not an array",
    }


# --- generated entries ----------------------------------------------------------------------

json_values = test_config.json_values
topic_chars = st.sampled_from(
    [
        "a",
        "b",
        "/",
        "+",
        "#",
        "$",
        " ",
        "\0",
        "\x1f",
        "\x7f",
        "\x9f",
        "\ufdd0",
        "\ufffe",
        "\U0001fffe",
        "\U0010ffff",
        "é",
        "\ud800",
        "\U0001f600",
        "\u200b",
    ]
)
VALID_FIELDS = {
    "id": st.sampled_from(["a", "b", "pump-7", "é"]),
    "topic": st.sampled_from(
        ["t", "site/gw/a", "$aws/x", "a/$SYS", "$SYSTEM/x", "/", "é/温度", "/" * 199, "€" * 21845]
    ),
    "data": st.dictionaries(st.sampled_from(["online", "v", "w"]), json_values, max_size=3)
    | st.sampled_from([{}, test_config.nested(32), {"x": 10**400}]),
    "interval": st.sampled_from([0.1, 1, 2.5, 86400, 86400.0]) | st.floats(0.1, 86400),
    "qos": st.sampled_from([0, 1, 2]),
    "retain": st.booleans(),
    "lwt": st.booleans(),
    "created_at": st.sampled_from([None, "2024-03-04", "2024-03-04T09:15:00+00:00"]),
    "updated_at": st.sampled_from([None, "2024-03-04 09:15"]),
    "version": st.sampled_from([None, 1, 7]),
    "properties": st.none()
    | st.fixed_dictionaries(
        {},
        optional={
            "message_expiry": st.sampled_from([1, 60, MAX_MESSAGE_EXPIRY]),
            "content_type": st.sampled_from(["application/json", "é", "x" * 4096]),
            "user_properties": st.dictionaries(
                st.sampled_from(["a", "é", "\U0001f600" * 4096]),
                st.sampled_from(["", "v", "温度"]),
                max_size=3,
            )
            | st.just({f"k{i}": "v" for i in range(64)}),
            "payload_format_utf8": st.booleans(),
            "unknown": json_values | st.just(test_config.nested(61)),
        },
    ),
    "cron": st.sampled_from(
        ["0 * * * *", "*/10 * * * * *", "0 9 * * 1-5", "0 0 * * 7", "30 2 * * sun", "0 0 1 1 *"]
    ),
    "timezone": st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
    "extra": json_values | st.just(test_config.nested(62)),
}
INVALID_FIELDS = {
    "id": st.sampled_from(["", "a\ud800", 5, None, True, ["a"]]) | json_values,
    "topic": st.text(topic_chars, max_size=6)
    | st.sampled_from(
        ["", "$SYS", "$SYS/x", "$CONTROL/y", "$share/g/t", "/" * 200, "é" * 40000, 5, None]
    ),
    "data": st.sampled_from(
        [[1], "x", None, test_config.nested(33), {"a": INFINITY}, {"\ud800": 1}, {"a": ["\udfff"]}]
    )
    | json_values,
    "interval": st.sampled_from(
        [0, -1, 86400.001, 86401, 10**30, True, "5", None, INFINITY, 0.09999999999999999]
    )
    | json_values,
    "qos": st.sampled_from([3, -1, True, False, 1.0, 2.0, 0.5, "1", None]) | json_values,
    "retain": st.sampled_from([0, 1, "true", None]) | json_values,
    "lwt": json_values,
    "created_at": st.sampled_from(["yesterday", "", "2024-02-30", 1714000000]) | json_values,
    "updated_at": json_values,
    "version": st.sampled_from([0, -1, 1.0, 1.5, True, "2"]) | json_values,
    "properties": json_values
    | st.fixed_dictionaries(
        {},
        optional={
            "message_expiry": st.sampled_from(
                [0, -1, 60.0, 1.5, MAX_MESSAGE_EXPIRY + 1, True, "60"]
            )
            | json_values,
            "content_type": st.sampled_from(["", "a\x00", "\x9f", "\ufffe", "a\ud800", "x" * 4097])
            | json_values,
            "user_properties": json_values
            | st.dictionaries(
                st.sampled_from(["", "a", "\n", "\ud800", "x" * 4097]),
                json_values | st.sampled_from(["\x7f", "\udfff", "v" * 4097]),
                max_size=3,
            )
            | st.just({f"k{i}": "v" for i in range(65)}),
            "payload_format_utf8": json_values,
            "unknown": st.just(test_config.nested(62)),
        },
    ),
    "cron": st.sampled_from(["", "* * *", "0 25 * * *", "0 0 * * 8", "x * * * *", None, 5])
    | json_values,
    "timezone": st.sampled_from(["", "Mars/Phobos", "utc", "../etc", None]) | json_values,
    "extra": st.just(test_config.nested(63)),
}
REQUIRED = ("id", "topic", "data", "interval")


def _entries(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    optional = {name: value for name, value in fields.items() if name not in REQUIRED}
    return st.fixed_dictionaries({name: fields[name] for name in REQUIRED}, optional=optional)


def _valid_entries() -> st.SearchStrategy[dict[str, Any]]:
    """Valid entries: an interval one, or a cron one (exactly one of the two)."""
    common = {name: value for name, value in VALID_FIELDS.items() if name != "cron"}
    scheduled_by_cron = {**common, "interval": VALID_FIELDS["cron"]}
    return _entries(common) | _entries(scheduled_by_cron).map(
        lambda entry: {
            ("cron" if name == "interval" else name): value for name, value in entry.items()
        }
    )


def _mixed(name: str) -> st.SearchStrategy[Any]:
    return VALID_FIELDS[name] | INVALID_FIELDS[name]


mixed_entry = _entries({name: _mixed(name) for name in VALID_FIELDS}) | st.fixed_dictionaries(
    {}, optional={n: _mixed(n) for n in VALID_FIELDS}
)


def _file(entries: list[Any]) -> bytes:
    # ASCII: a lone surrogate becomes a "\ud800" escape, as an editor would have to write it.
    return json.dumps(entries).replace(json.dumps(INFINITY), "1e400").encode()


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_valid_entries(), max_size=4, unique_by=lambda e: e["id"]))
def test_generated_valid_files_pass_both(entries: list[dict[str, Any]]) -> None:
    """Files of valid entries (warnings allowed) pass the validator and the schema."""
    found = verdicts(_file(entries))
    assert found is not None
    accepted, schema_ok, _ = found
    assert accepted
    assert schema_ok


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mixed_entry | json_values, max_size=4))
def test_generated_files_get_the_same_verdict(entries: list[Any]) -> None:
    """On generated files of valid and invalid entries, the schema accepts exactly what the
    validator accepts, documented gaps excepted."""
    assert_agree(_file(entries))


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("t", True),
        ("a\ud800", False),
        ("a\U0001f600", True),
        ("\U0001fffe", False),
        ("\U0001fffd", True),
        ("$SYS\n", False),
        ("$SYSX", True),
    ],
)
def test_patterns_use_code_points(value: str, accepted: bool) -> None:
    """A lone surrogate and an astral noncharacter are refused, a well-formed astral
    character passes: the patterns match code points, in the validator and the schema."""
    raw = _file([test_config.entry(topic=value)])
    found = assert_agree(raw)
    assert found is not None
    assert found[:2] == (accepted, accepted)


@pytest.fixture
def schema_command_output(capsys: pytest.CaptureFixture[str]) -> str:
    from scheduler_publisher.cli.main import main  # noqa: PLC0415 - only this fixture needs it

    with pytest.raises(SystemExit) as exit_info:
        main(["schema"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_schema_command_prints_the_committed_schema(schema_command_output: str) -> None:
    """`scheduler-publisher schema` prints the committed file byte for byte."""
    assert schema_command_output == COMMITTED.read_text(encoding="utf-8")


PATTERN_PROBES = [
    "t",
    "a\ud800",
    "a\U0001f600",
    "\U0001fffe",
    "\U0001fffd",
    "\U0010ffff",
    "$SYS\n",
    "$SYSX",
    "$SYS/x",
    "$share",
    "a/+",
    "#",
    "\0",
    "\x9f",
    "\xa0",
    "\ufdd0",
    "/" * 199,
    "/" * 200,
    "é/温度",
]
NODE_PROBE = """
const [patterns, probes] = JSON.parse(require('fs').readFileSync(0, 'utf8'));
console.log(JSON.stringify(patterns.map(p => probes.map(s => new RegExp(p, 'u').test(s)))));
"""


def _patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern":
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


def test_patterns_read_the_same_in_ecmascript() -> None:
    """Every pattern in the schema matches the same probes under ECMA-262 with the `u` flag
    (how VS Code compiles them) as under Python's re (how the validator does)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: no ECMAScript engine to compare with")
    patterns = sorted(set(_patterns(entries_schema())))
    assert len(patterns) >= 5
    request = json.dumps([patterns, PATTERN_PROBES])  # ASCII: surrogates travel as escapes
    ran = subprocess.run(
        [node, "-e", NODE_PROBE],
        input=request,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    python = [[re.search(p, probe) is not None for probe in PATTERN_PROBES] for p in patterns]
    assert json.loads(ran.stdout) == python
