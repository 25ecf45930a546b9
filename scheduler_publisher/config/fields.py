"""Field rules as data, and the checks they run.

A `FieldRule` says everything a field must be. The validator (loader.py) applies the rules
and schema.py writes them out as JSON Schema, so the two cannot drift. What JSON Schema cannot
state lives in a rule's `custom` check, and `unexpressed` says what the schema lets through
because of it. The entry's own rules are in rules.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import reprlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from scheduler_publisher.config.document import MAX_DOCUMENT_DEPTH, nesting_depth

__all__ = [
    "LONE_SURROGATE",
    "NOT_A_SURROGATE",
    "SENDABLE_TEXT",
    "UNSENDABLE_CLASS",
    "FieldRule",
    "Finding",
    "Forbidden",
    "JsonType",
    "Severity",
    "error_finding",
    "id_label",
    "render_value",
    "unknown_member",
]

Severity = Literal["error", "warning"]


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

# --- rendering what was received -------------------------------------------------------------


def render_value(value: Any) -> str:
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


def id_label(entry_id: str | None) -> str:
    return f" (id {render_value(entry_id)})" if entry_id else ""


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


def error_finding(subject: str, expected: str, value: Any) -> Finding:
    return _must(subject, expected, render_value(value))


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
            got = self.received(value, found) if self.received else render_value(value)
            yield _must(name, self.expected, got, self.verb)


def _where_unsendable(value: str, found: re.Match[str]) -> str:
    code = ord(found.group())
    kind = "NUL" if code == 0 else "a control character" if code <= 0x9F else "a noncharacter"
    return f"{render_value(value)}: U+{code:04X} ({kind}) at character {found.start() + 1}"


NOT_A_SURROGATE: Final = Forbidden(LONE_SURROGATE, _VALID_UNICODE)
SENDABLE_TEXT: Final = Forbidden(
    UNSENDABLE_CLASS,
    "free of NUL, control characters (U+0001-U+001F, U+007F-U+009F) and noncharacters",
    received=_where_unsendable,
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
        if not _HAS_TYPE[self.type](value) or (
            isinstance(value, str) and len(value) < self.min_length
        ):
            return error_finding(self.name, self.expected, value)
        if isinstance(value, float) and not math.isfinite(value):
            return error_finding(self.name, "a finite number", value)
        if self.enum is not None and value not in self.enum:
            return error_finding(self.name, self.expected, value)
        # Compared without float(): an int like 10**400 would overflow the conversion.
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            return error_finding(self.name, self.range_text, value)
        return None

    def _string_findings(self, value: str) -> Iterator[Finding]:
        for forbidden in self.forbidden:
            yield from forbidden.findings(self.name, value)
        if self.max_length is not None and len(value) > self.max_length:
            yield _must(
                self.name, f"at most {self.max_length} characters", f"{len(value)} characters"
            )
        if self.max_utf8_bytes is None:
            return
        size = _utf8_size(value)  # None: a lone surrogate, which a Forbidden reports
        if size is not None and size > self.max_utf8_bytes:
            yield _must(self.name, f"at most {self.max_utf8_bytes} UTF-8 bytes", f"{size} bytes")


def _plain(number: float) -> str:
    """An int in full (4294967295, not 4.29497e+09); a float in its shortest form."""
    return str(number) if isinstance(number, int) else f"{number:g}"


_HAS_TYPE: Final[Mapping[JsonType, Callable[[Any], bool]]] = MappingProxyType(
    {
        "string": lambda value: isinstance(value, str),
        "number": lambda value: _is_int(value) or isinstance(value, float),
        "integer": _is_int,
        "boolean": lambda value: isinstance(value, bool),
        "object": lambda value: isinstance(value, Mapping),
    }
)


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
        yield error_finding(f"{name} {subject}", expected, bad)


def _member_findings(rule: FieldRule, value: Mapping[str, Any]) -> Iterator[Finding]:
    known = {member.key: member for member in rule.members}
    for key, member_value in value.items():
        member = known.get(key)
        if member is None:
            yield unknown_member(f"{rule.name}.", key, list(known))
        else:
            yield from member.check(member_value)
    yield from _repeated_keys(value, lambda key: f"field {render_value(f'{rule.name}.{key}')}")


def _map_findings(rule: FieldRule, value: Mapping[str, Any]) -> Iterator[Finding]:
    if rule.max_members is not None and len(value) > rule.max_members:
        yield _must(rule.name, f"at most {rule.max_members} members", str(len(value)), "have")
    for key, member in value.items():
        if rule.key_rule is not None:
            named = dataclasses.replace(rule.key_rule, name=f"{rule.name} key {render_value(key)}")
            yield from named.check(key)
        if rule.value_rule is not None:
            named = dataclasses.replace(rule.value_rule, name=f"{rule.name}[{render_value(key)}]")
            yield from named.check(member)
    yield from _repeated_keys(value, lambda key: f"{rule.name} key {render_value(key)}")


def _repeated_keys(value: Mapping[str, Any], subject: Callable[[str], str]) -> Iterator[Finding]:
    """The keys a JSON object in the file repeats (document.JsonObject): json keeps the last."""
    for key in getattr(value, "repeated", ()):
        message = f"{subject(key)} appears more than once; the last one wins"
        yield Finding("warning", message, "once", "more than once")


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


def unknown_member(prefix: str, key: str, known: list[str]) -> Finding:
    """A key no rule knows, in the object whose members are `known` (`prefix` names the
    object: "" for an entry, "properties." for its properties): ignored, with a warning."""
    message = f"unknown field {render_value(prefix + key)} is ignored"
    guesses = difflib.get_close_matches(key, known, n=1)
    if guesses:
        message = f"{message} (did you mean {render_value(prefix + guesses[0])}?)"
    return Finding(
        "warning",
        message,
        "one of " + ", ".join(prefix + k for k in known),
        render_value(prefix + key),
    )
