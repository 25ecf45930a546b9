"""The config document: the file's bytes in, its top-level array's elements out, one at a time.

Only the JSON itself is judged here (UTF-8, syntax, NaN, nesting depth, an array at the top);
what the elements mean is loader.py's business. Errors are DocumentError, with a detail that
loader.py puts after the file name. An element that is well-formed but holds something JSON
or this service refuses (NaN/Infinity, an integer longer than Python's digit limit, nesting
deeper than MAX_DOCUMENT_DEPTH) is not a file error: it comes out as an UnreadableElement,
which names where, and the other elements are read as usual.
"""

from __future__ import annotations

import codecs
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

MAX_DOCUMENT_DEPTH: Final = 64  # levels of arrays/objects in the whole file
TOO_DEEP: Final = f"JSON nesting is deeper than {MAX_DOCUMENT_DEPTH} levels"


class DocumentError(Exception):
    """The bytes are not a readable JSON array; `detail` says why, and where."""

    def __init__(self, detail: str, *, line: int | None = None, column: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.line = line  # where (1-based), when the problem has a place
        self.column = column


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "number"


# Leaves: most of a file's values. Testing the exact type first spares them the Mapping check,
# an ABC lookup that made up most of the depth walk over a 10,000-entry file.
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})


def _children(node: Any) -> Iterable[Any] | None:
    if type(node) in _SCALARS:
        return None
    if isinstance(node, Mapping):
        return node.values()
    if isinstance(node, list | tuple):
        return node
    return None


def nesting_depth(value: Any, cap: int) -> int:
    """Levels of nested objects/arrays in `value`; stops at cap + 1, so cycles terminate."""
    deepest = 0
    stack = [(value, 1)]  # iterative: the input may be far deeper than the recursion limit
    while stack:
        node, level = stack.pop()
        children = _children(node)
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > cap:
            return deepest
        stack.extend((child, level + 1) for child in children if type(child) not in _SCALARS)
    return deepest


class JsonObject(dict[str, Any]):
    """A decoded JSON object that remembers the keys the file repeated (json keeps the last)."""

    __slots__ = ("repeated",)
    repeated: tuple[str, ...]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> JsonObject:
        obj = cls(pairs)
        obj.repeated = ()
        if len(obj) < len(pairs):
            counts = Counter(key for key, _ in pairs)
            obj.repeated = tuple(key for key, count in counts.items() if count > 1)
        return obj


class _NonFiniteLiteralError(Exception):
    """NaN, Infinity or -Infinity in the text: Python's json accepts them, JSON does not."""


def _reject_constant(literal: str) -> Any:
    raise _NonFiniteLiteralError(literal)


def _decode_utf8(raw: bytes) -> str:
    body = raw.removeprefix(codecs.BOM_UTF8)  # some Windows editors prepend one; not content
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + len(raw) - len(body)
        line, column = _byte_position(body, exc.start)
        raise DocumentError(
            f"not valid UTF-8 at byte offset {offset}", line=line, column=column
        ) from None


def _byte_position(body: bytes, at: int) -> tuple[int, int]:
    """Line and column (in characters) of byte `at`; everything before it is valid UTF-8."""
    start = body.rfind(b"\n", 0, at) + 1
    return body.count(b"\n", 0, at) + 1, len(body[start:at].decode("utf-8")) + 1


def _load_json(text: str) -> Any:
    """The whole document, read only to say what is wrong with it. Leniently: a NaN or an
    over-long integer is an entry's problem, while a syntax error anywhere is the file's."""
    try:
        return _LENIENT_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise DocumentError(
            f"not valid JSON: {exc.msg} at {where}", line=exc.lineno, column=exc.colno
        ) from None
    except RecursionError:
        raise DocumentError(TOO_DEEP) from None


_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # JSON's four whitespace characters
_ELEMENT_DECODER: Final = json.JSONDecoder(
    parse_constant=_reject_constant, object_pairs_hook=JsonObject.from_pairs
)


def _skip_whitespace(text: str, at: int) -> int:
    match = _WHITESPACE.match(text, at)  # never None: the pattern matches the empty string
    return at if match is None else match.end()


class _NotStreamableError(Exception):
    """The text is not a plain array of values; json itself has to say what it is."""


@dataclass(frozen=True, slots=True)
class UnreadableElement:
    """An array element that is well-formed JSON but cannot be used: it stands in for the
    element, so the entry is reported (and skipped) while the rest of the file is read."""

    detail: str  # what is wrong, after the path to it inside the element
    line: int  # where the element starts (1-based)
    column: int
    entry_id: str | None  # its "id", when it is an object with a string one
    field: str | None  # the entry's field that holds the problem


class _Refused:
    """What the lenient decoder puts where the strict one gave up: a NaN/Infinity literal or
    an integer longer than the interpreter converts."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail


def _refused_constant(literal: str) -> _Refused:
    return _Refused(f"{literal} is not valid JSON (use a number or null)")


def _lenient_int(digits: str) -> int | _Refused:
    limit = sys.get_int_max_str_digits()
    count = len(digits.lstrip("-"))
    if limit and count > limit:
        return _Refused(f"an integer of {count} digits is longer than the {limit}-digit limit")
    return int(digits)


_LENIENT_DECODER: Final = json.JSONDecoder(
    parse_constant=_refused_constant,
    parse_int=_lenient_int,
    object_pairs_hook=JsonObject.from_pairs,
)
_PATH_STEPS_SHOWN: Final = 6


def _path_text(steps: tuple[str | int, ...]) -> str:
    shown = steps[:_PATH_STEPS_SHOWN]
    text = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in shown).lstrip(".")
    return text + ("…" if len(steps) > len(shown) else "")


def _first_refusal(value: Any) -> tuple[tuple[str | int, ...], str] | None:
    """The path to the first refused value, or to where nesting gets too deep, and why."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, _Refused):
            return path, node.detail
        if len(path) >= MAX_DOCUMENT_DEPTH - 1 and _children(node) is not None:
            return path, TOO_DEEP  # the array around the entries is one level
        steps = (
            list(node.items())
            if isinstance(node, Mapping)
            else (list(enumerate(node)) if isinstance(node, list) else [])
        )
        stack.extend((child, (*path, step)) for step, child in reversed(steps))
    return None


def _position(text: str, at: int) -> tuple[int, int]:
    line = text.count("\n", 0, at) + 1
    return line, at - text.rfind("\n", 0, at)


def _unreadable(text: str, start: int) -> tuple[UnreadableElement, int]:
    """Re-read the element at `start` leniently and say what is wrong with it, and where."""
    line, column = _position(text, start)
    try:
        value, end = _LENIENT_DECODER.raw_decode(text, start)
    except RecursionError:
        # Too deep for the decoder itself: where it starts is all we can say.
        detail = f"{TOO_DEEP}, in the element at line {line}, column {column}"
        raise DocumentError(detail, line=line, column=column) from None
    found = _first_refusal(value)
    if found is None:  # pragma: no cover - the strict decoder refused it for a reason
        raise _NotStreamableError
    path, why = found
    where = _path_text(path)
    detail = f"{where}: {why}" if where else why
    entry_id = value.get("id") if isinstance(value, Mapping) else None
    field = path[0] if path and isinstance(path[0], str) and isinstance(value, Mapping) else None
    usable_id = entry_id if isinstance(entry_id, str) else None
    return UnreadableElement(detail, line, column, usable_id, field), end


def _decode_element(text: str, at: int) -> tuple[Any, int]:
    try:
        value, end = _ELEMENT_DECODER.raw_decode(text, at)
    except json.JSONDecodeError:
        raise  # a syntax error: the whole file is unreadable, json says where
    except (_NonFiniteLiteralError, ValueError, RecursionError):
        return _unreadable(text, at)
    # The array itself is one level.
    if nesting_depth(value, MAX_DOCUMENT_DEPTH - 1) > MAX_DOCUMENT_DEPTH - 1:
        return _unreadable(text, at)
    return value, end


@dataclass(frozen=True, slots=True)
class Located:
    """An element of the top-level array and where it starts in the file (1-based)."""

    value: Any
    line: int
    column: int
    text: str = field(default="", repr=False, compare=False)  # the whole document, shared
    start: int = field(default=0, repr=False, compare=False)  # the element's offset in it
    end: int = field(default=0, repr=False, compare=False)  # just past the element

    @property
    def fingerprint(self) -> int:
        """Tells this element's text from any other's, within this process: equal texts,
        equal fingerprints. A reload uses it to recognise entries that did not change."""
        return hash(self.text[self.start : self.end])

    def member_positions(self) -> dict[str, tuple[int, int]]:
        """Line and column of each member's key, when the element is an object. Scans the
        element's text again, so it is meant for the few entries that have problems."""
        try:
            offsets = _member_offsets(self.text, self.start)
        except (ValueError, RecursionError):
            # Cannot happen to an element that decoded once; the entry's own place still holds.
            return {}
        return {
            key: (
                self.line + self.text.count("\n", self.start, at),
                at - self.text.rfind("\n", 0, at),
            )
            for key, at in offsets.items()
        }


def _member_offsets(text: str, start: int) -> dict[str, int]:
    """Where each key of the object at `start` begins (a repeated key: its last occurrence,
    the one json keeps). The element decoded once already, so its syntax is sound."""
    found: dict[str, int] = {}
    if text[start : start + 1] != "{":
        return found
    at = _skip_whitespace(text, start + 1)
    while text[at : at + 1] == '"':
        key, end = _ELEMENT_DECODER.raw_decode(text, at)
        found[key] = at
        value_at = _skip_whitespace(text, _skip_whitespace(text, end) + 1)  # past the ":"
        _, end = _ELEMENT_DECODER.raw_decode(text, value_at)
        at = _skip_whitespace(text, _skip_whitespace(text, end) + 1)  # past "," or "}"
    return found


class _LineCounter:
    """Offsets to line and column, for offsets that only grow: each character is looked at
    once, so locating every element of a 10,000-entry file costs one pass over the text."""

    __slots__ = ("_at", "_line", "_line_start", "_text")

    def __init__(self, text: str) -> None:
        self._text, self._at, self._line, self._line_start = text, 0, 1, 0

    def position(self, at: int) -> tuple[int, int]:
        newlines = self._text.count("\n", self._at, at)
        if newlines:
            self._line += newlines
            # Searched back only to the last offset: a file on one line (as programs write
            # them) would otherwise be searched back to its start for every element.
            self._line_start = self._text.rfind("\n", self._at, at) + 1
        self._at = at
        return self._line, at - self._line_start + 1


def _stream_array(text: str) -> Iterator[tuple[Any, int, int]]:
    """The elements of the top-level array with their start and end offsets, each decoded
    only when the previous one is done.

    Decoding the whole array first holds every entry's dicts and pairs at once: at 10,000
    entries that parse peaked at 9.3 MB of Python objects, one element at a time at 6.2 MB
    (most of it the decoded text), and the blocks freed by one element are reused by the next.
    Raises _NotStreamableError, or json's own errors, at anything but a well-formed array.
    """
    at = _skip_whitespace(text, 0)
    if text[at : at + 1] != "[":
        raise _NotStreamableError
    at = _skip_whitespace(text, at + 1)
    closed = text[at : at + 1] == "]"
    while not closed:
        start = at
        value, at = _decode_element(text, at)
        yield value, start, at
        del value
        at = _skip_whitespace(text, at)
        separator = text[at : at + 1]
        if separator not in (",", "]"):
            raise _NotStreamableError
        closed = separator == "]"
        if not closed:
            at = _skip_whitespace(text, at + 1)
    if _skip_whitespace(text, at + 1) != len(text):
        raise _NotStreamableError


def located_elements(raw: bytes) -> Iterator[Located]:
    """The elements of the file's top-level array, each with where it starts; raises
    DocumentError for anything else."""
    text = _decode_utf8(raw)
    if not text.strip(" \t\r\n"):
        raise DocumentError("is empty; expected a JSON array of entries")
    lines = _LineCounter(text)
    try:
        for value, start, end in _stream_array(text):
            yield Located(value, *lines.position(start), text, start, end)
    except (_NotStreamableError, ValueError, RecursionError, _NonFiniteLiteralError):
        pass  # json's full parse below names the problem, at its line and column
    else:
        return
    document = _load_json(text)
    if nesting_depth(document, MAX_DOCUMENT_DEPTH) > MAX_DOCUMENT_DEPTH:
        raise DocumentError(TOO_DEEP)
    detail = f"must be a JSON array of entries, got {_json_type(document)}"
    if isinstance(document, list):  # json accepted what the streaming scanner did not
        detail = "could not be read as a JSON array of entries"
    raise DocumentError(detail)
