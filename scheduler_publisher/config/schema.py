"""The entries file as JSON Schema (draft 2020-12), written out from rules.py's FIELD_RULES.

Nothing here restates a rule: each keyword comes from a FieldRule field or a loader.py
constant, so the schema changes when validation does. Where a rule has no JSON Schema form,
the schema is looser than the validator, never stricter: an editor never marks a file the
service accepts. Each such gap is named in the schema's `$comment` (and in docs/schema.md),
and tests/test_schema.py checks both directions over the test corpus and generated entries.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from typing import Any, Final

from scheduler_publisher.config.document import MAX_DOCUMENT_DEPTH
from scheduler_publisher.config.entry import PublishConfig
from scheduler_publisher.config.fields import LONE_SURROGATE, FieldRule
from scheduler_publisher.config.rules import FIELD_RULES

__all__ = ["DIALECT", "entries_schema", "schema_text"]

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
_FLOAT_MAX: Final = sys.float_info.max
# The array around the entries is one level and each entry another: what an entry's other
# (unknown) fields may nest before the element is too deep for the validator.
_UNKNOWN_FIELD_DEPTH: Final = MAX_DOCUMENT_DEPTH - 2
_GENERAL: Final = (
    "Patterns use Unicode code-point semantics (ECMA-262 with the u flag, as "
    "VS Code and Python's jsonschema apply them). Not in the schema, so only "
    "`scheduler-publisher validate` reports them: warnings (unknown or "
    'repeated fields, a data key "online", a "$" topic outside the '
    'broker-owned trees, a placeholder in an entry without "template" or in '
    "a key); and "
)


def _never(pattern: str) -> dict[str, Any]:
    """A string must not contain `pattern`; other types pass (a bare `"not": {"pattern"}`
    would refuse them all, since `pattern` passes whatever is not a string)."""
    return {"not": {"type": "string", "pattern": pattern}}


def _scalar_or_nested(prefix: str, level: int) -> dict[str, Any]:
    """A value nesting at most `level` objects/arrays: each level is one $defs entry, since
    JSON Schema has no depth keyword."""
    if level == 0:
        return {"not": {"type": ["object", "array"]}}
    inner = {"$ref": f"#/$defs/{prefix}{level - 1}"}
    return {"items": inner, "additionalProperties": inner}


def _payload_value(level: int) -> dict[str, Any]:
    """A payload value: finite numbers (a float beyond the largest double is 1e400, which
    decodes to infinity; integers are exact and unbounded), valid Unicode strings and keys."""
    unicode_text = _never(LONE_SURROGATE)
    finite = {"anyOf": [{"type": "integer"}, {"minimum": -_FLOAT_MAX, "maximum": _FLOAT_MAX}]}
    return {
        **_scalar_or_nested("payload", level),
        "propertyNames": unicode_text,
        "allOf": [unicode_text, finite],
    }


def _nesting_defs(prefix: str, levels: int, payload: bool) -> dict[str, Any]:
    make = _payload_value if payload else (lambda level: _scalar_or_nested(prefix, level))
    return {f"{prefix}{level}": make(level) for level in range(levels + 1)}


def _string_keywords(rule: FieldRule) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if rule.min_length:
        found["minLength"] = rule.min_length
    if rule.max_length is not None:
        found["maxLength"] = rule.max_length
    if rule.max_utf8_bytes is not None:
        # A character is 1 to 4 UTF-8 bytes: at most as many characters as bytes is the
        # strictest bound that never refuses a valid topic (see `unexpressed`).
        found["maxLength"] = min(found.get("maxLength", rule.max_utf8_bytes), rule.max_utf8_bytes)
    if rule.forbidden:
        found["allOf"] = [
            {**_never(f.pattern), "$comment": f"must {f.verb} {f.expected}"} for f in rule.forbidden
        ]
    return found


# What an optional field is when left out: PublishConfig's own defaults, shown by editors.
_DEFAULTS: Final = {
    spec.name: spec.default
    for spec in dataclasses.fields(PublishConfig)
    if spec.init and spec.default is not dataclasses.MISSING
}


def _field_schema(rule: FieldRule) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "description": rule.description,
        "type": [rule.type, "null"] if rule.nullable else rule.type,
    }
    if rule.name in _DEFAULTS and rule.alternative is None:  # an alternative has no default
        schema["default"] = _DEFAULTS[rule.name]
    if rule.type == "string":
        schema.update(_string_keywords(rule))
    if rule.enum is not None:
        schema["enum"] = list(rule.enum)
    if rule.minimum is not None:
        schema["minimum"] = rule.minimum
    if rule.maximum is not None:
        schema["maximum"] = rule.maximum
    if rule.max_depth is not None:
        prefix = "payload" if rule.payload else "nested"
        # The object itself is the first level: its members may nest one level less.
        inner = {"$ref": f"#/$defs/{prefix}{rule.max_depth - 1}"}
        schema["additionalProperties"] = inner
        if rule.payload:
            schema["propertyNames"] = _never(LONE_SURROGATE)
    schema.update(_object_keywords(rule))
    if rule.unexpressed:
        schema["$comment"] = f"Not checked here: {rule.unexpressed}."
    return schema


def _object_keywords(rule: FieldRule) -> dict[str, Any]:
    """An object's named members (others are only a warning, so any value nesting within the
    file's limit passes), or a map's rule for every key and value."""
    found: dict[str, Any] = {}
    if rule.members:
        found["properties"] = {member.key: _field_schema(member) for member in rule.members}
        # One level below an entry's own unknown fields.
        found["additionalProperties"] = {"$ref": f"#/$defs/nested{_UNKNOWN_FIELD_DEPTH - 1}"}
    if rule.max_members is not None:
        found["maxProperties"] = rule.max_members
    if rule.key_rule is not None:
        key = _field_schema(rule.key_rule)
        del key["type"]  # keys are strings; the keyword checks no type of its own
        found["propertyNames"] = key
    if rule.value_rule is not None:
        found["additionalProperties"] = _field_schema(rule.value_rule)
    return found


def _all_rules(rules: tuple[FieldRule, ...]) -> Iterator[FieldRule]:
    for rule in rules:
        yield rule
        yield from _all_rules(rule.members)


def _alternatives() -> list[dict[str, Any]]:
    """Exactly one field of each pair of alternatives (interval or cron): a `oneOf` per pair,
    all of them in an `allOf`."""
    pairs = {
        tuple(sorted((rule.name, rule.alternative)))
        for rule in FIELD_RULES
        if rule.alternative is not None
    }
    order = [rule.name for rule in FIELD_RULES]
    return [
        {"oneOf": [{"required": [name]} for name in sorted(pair, key=order.index)]}
        for pair in sorted(pairs)
    ]


def _gaps() -> str:
    return (
        "; ".join(
            f"{rule.name}: {rule.unexpressed}"
            for rule in _all_rules(FIELD_RULES)
            if rule.unexpressed
        )
        + "."
    )


def entries_schema() -> dict[str, Any]:
    """The JSON Schema of the entries file."""
    data_depth = max(rule.max_depth or 0 for rule in FIELD_RULES if rule.payload)
    entry = {
        "type": "object",
        "required": [rule.name for rule in FIELD_RULES if rule.required],
        "allOf": _alternatives(),
        "properties": {rule.name: _field_schema(rule) for rule in FIELD_RULES},
        # Unknown fields are only a warning; still, they count towards the file's nesting.
        "additionalProperties": {"$ref": f"#/$defs/nested{_UNKNOWN_FIELD_DEPTH}"},
    }
    return {
        "$schema": DIALECT,
        "title": "scheduler-publisher entries file",
        "description": "A JSON array of entries, each published to MQTT on its own schedule. "
        "Generated by `scheduler-publisher schema` from the rules "
        "`scheduler-publisher validate` applies.",
        "$comment": _GENERAL + _gaps(),
        "type": "array",
        "items": {"$ref": "#/$defs/entry"},
        "$defs": {
            "entry": entry,
            **_nesting_defs("payload", data_depth - 1, payload=True),
            **_nesting_defs("nested", _UNKNOWN_FIELD_DEPTH, payload=False),
        },
    }


def schema_text() -> str:
    """The schema as the committed file holds it: ASCII JSON, two-space indent, final newline."""
    return json.dumps(entries_schema(), indent=2, ensure_ascii=True) + "\n"
