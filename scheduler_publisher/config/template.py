"""Templated payloads (`"template": true`): placeholders in an entry's data, checked and
compiled once at load time, rendered per publish by joining byte chunks.

A template is the entry's pre-rendered JSON cut at its placeholders: literal byte chunks with
a slot between each two. A publish fills the slots and joins the chunks, so its cost grows with
the number of placeholders, not with the size of the data (no json.dumps per publish).

Rules (docs/entries.md, "Templated values"):
- Placeholders are `{{name}}`, no whitespace inside the braces; every `{{` in a string of a
  templated entry starts one. Keys are never templated.
- A string that is exactly one numeric placeholder becomes a JSON number; anywhere else a
  placeholder is substituted as text.
- `{{entry_id}}` is known at load time and compiled into the literal chunks.

Pure: the moment of a render (time, counter, uptime, ...) is a parameter.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

__all__ = [
    "NUMERIC",
    "PLACEHOLDERS",
    "Moment",
    "PlaceholderProblem",
    "Template",
    "key_placeholders",
    "placeholder_problems",
    "stray_placeholder",
]

PLACEHOLDERS: Final = (
    "now",
    "now_unix",
    "now_unix_ms",
    "seq",
    "uptime",
    "hostname",
    "client_id",
    "entry_id",
)
NUMERIC: Final = frozenset({"now_unix", "now_unix_ms", "seq", "uptime"})
_OPEN: Final = "{{"
_CLOSE: Final = "}}"
_EXPECTED: Final = "one of " + ", ".join(f"{{{{{name}}}}}" for name in PLACEHOLDERS)
_KNOWN: Final = re.compile("|".join(re.escape(f"{{{{{name}}}}}") for name in PLACEHOLDERS))
_SHOWN: Final = 40  # characters of a bad placeholder quoted in its error
MAX_PROBLEMS: Final = 10  # per entry: one mistake copied into 5,000 strings is one message


class Moment(NamedTuple):
    """What a render fills in besides the entry's id: the publish's own values. A NamedTuple:
    one is built per templated publish, and it builds several times faster than a frozen
    dataclass."""

    now_ms: int  # wall clock, milliseconds since the Unix epoch (UTC)
    seq: int
    uptime: int  # whole seconds
    hostname: str
    client_id: str


def _iso(now_ms: int) -> str:
    seconds, millis = divmod(now_ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=1)
def _iso_second(seconds: int) -> str:
    """Formatting the date costs more than the rest of a render: once per second is enough."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _unix(now_ms: int) -> str:
    seconds, millis = divmod(now_ms, 1000)
    return f"{seconds}.{millis:03d}"


def _escaped(text: str) -> str:
    """`text` as the inside of a JSON string: what json.dumps writes between the quotes."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


# What each runtime placeholder writes, already JSON-safe: numbers and ISO text need no
# escaping; a host name or client id might.
_TEXT: Final[Mapping[str, Callable[[Moment], str]]] = {
    "now": lambda m: _iso(m.now_ms),
    "now_unix": lambda m: _unix(m.now_ms),
    "now_unix_ms": lambda m: str(m.now_ms),
    "seq": lambda m: str(m.seq),
    "uptime": lambda m: str(m.uptime),
    "hostname": lambda m: _escaped(m.hostname),
    "client_id": lambda m: _escaped(m.client_id),
}


# --- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaceholderProblem:
    """A bad placeholder: where in `data` (e.g. `data.readings[1].ts`), what, and what was
    expected."""

    path: str
    message: str
    received: str


def _path_step(key: str) -> str:
    if key.isidentifier():
        return f".{key}"
    return f"[{json.dumps(key, ensure_ascii=False)}]"


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string value in `value`, with its path; keys are not values. Depth is bounded by
    the caller (loader.py checks data's nesting first)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, member in value.items():
            yield from _strings(member, path + _path_step(key))
    elif isinstance(value, list | tuple):
        for index, member in enumerate(value):
            yield from _strings(member, f"{path}[{index}]")


def _pieces(text: str) -> Iterator[tuple[str, str | None]]:
    """`text` split into (literal, placeholder name or None) pairs; raises ValueError naming
    the first malformed or unknown placeholder."""
    start = 0
    while True:
        opened = text.find(_OPEN, start)
        if opened < 0:
            yield text[start:], None
            return
        closed = text.find(_CLOSE, opened + len(_OPEN))
        if closed < 0:
            shown = _escaped(text[opened : opened + _SHOWN])
            raise ValueError(f'unclosed placeholder {shown}: "{_OPEN}" without "{_CLOSE}"')
        name = text[opened + len(_OPEN) : closed]
        if name not in PLACEHOLDERS:
            raise ValueError(_unknown(name))
        yield text[start:opened], name
        start = closed + len(_CLOSE)


def _unknown(name: str) -> str:
    found = _escaped(f"{_OPEN}{name[:_SHOWN]}{_CLOSE}")
    if name.strip() in PLACEHOLDERS:
        return (
            f"malformed placeholder {found}: no spaces inside the braces "
            f"(write {_OPEN}{name.strip()}{_CLOSE})"
        )
    return f"unknown placeholder {found}"


def placeholder_problems(data: Mapping[str, Any]) -> Iterator[PlaceholderProblem]:
    """The bad placeholders of a templated entry's data, at most MAX_PROBLEMS."""
    count = 0
    for path, text in _strings(data, "data"):
        if _OPEN not in text:
            continue
        try:
            for _ in _pieces(text):
                pass
        except ValueError as exc:
            yield PlaceholderProblem(path, f"{exc}; expected {_EXPECTED}", text)
            count += 1
            if count == MAX_PROBLEMS:
                return


def _may_hold_placeholder(value: Any) -> bool:
    """Whether a JSON-decoded value (dicts, lists, strings) has "{{" in a string value: the
    check every static entry pays at load time (a few µs), so no generators."""
    if isinstance(value, str):
        return _OPEN in value
    if isinstance(value, dict):  # the document reader's objects are dict subclasses
        value = value.values()
    elif not isinstance(value, list):
        return False
    for member in value:  # noqa: SIM110 - any() over a generator is 4x slower here
        if _may_hold_placeholder(member):
            return True
    return False


def stray_placeholder(data: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first (path, placeholder) of an entry WITHOUT template: published as literal text,
    which is probably not what its author meant."""
    if not _may_hold_placeholder(data):
        return None
    for path, text in _strings(data, "data"):
        found = _KNOWN.search(text) if _OPEN in text else None
        if found is not None:
            return path, found.group()
    return None


def key_placeholders(data: Mapping[str, Any], path: str = "data") -> Iterator[str]:
    """Paths of keys that hold a placeholder: keys are not templated."""
    for key, member in data.items():
        here = path + _path_step(key)
        if _KNOWN.search(key):
            yield here
        if isinstance(member, Mapping):
            yield from key_placeholders(member, here)
        elif isinstance(member, list | tuple):
            for index, item in enumerate(member):
                if isinstance(item, Mapping):
                    yield from key_placeholders(item, f"{here}[{index}]")


# --- compiling and rendering --------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


class _Builder:
    """Writes a JSON value the way loader.py's json.dumps does (compact separators, no ASCII
    escaping), except that placeholders become slots between literal chunks."""

    def __init__(self, entry_id: str) -> None:
        self.entry_id = _escaped(entry_id)
        self.chunks: list[str] = []
        self.slots: list[str] = []
        self._text: list[str] = []

    def literal(self, text: str) -> None:
        self._text.append(text)

    def slot(self, name: str) -> None:
        self.chunks.append("".join(self._text))
        self._text = []
        self.slots.append(name)

    def value(self, value: Any) -> None:
        if isinstance(value, str):
            self.string(value)
        elif isinstance(value, Mapping):
            self.literal("{")
            for index, (key, member) in enumerate(value.items()):
                self.literal(("," if index else "") + _dumps(key) + ":")
                self.value(member)
            self.literal("}")
        elif isinstance(value, list | tuple):
            self.literal("[")
            for index, member in enumerate(value):
                self.literal("," if index else "")
                self.value(member)
            self.literal("]")
        else:
            self.literal(_dumps(value))

    def string(self, text: str) -> None:
        pieces = list(_pieces(text))
        if (
            len(pieces) == 2
            and pieces[0][0] == ""
            and pieces[1][0] == ""
            and pieces[0][1] in NUMERIC
        ):
            self.slot(pieces[0][1])  # exactly one numeric placeholder: a JSON number
            return
        self.literal('"')
        for literal, name in pieces:
            self.literal(_escaped(literal))
            if name == "entry_id":
                self.literal(self.entry_id)  # known now: part of the literal chunk
            elif name is not None:
                self.slot(name)
        self.literal('"')

    def done(self) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
        chunks = [*self.chunks, "".join(self._text)]
        return tuple(c.encode() for c in chunks), tuple(self.slots)


@dataclass(frozen=True, slots=True)
class Template:
    """A payload with slots: `chunks[0] slot[0] chunks[1] ... slot[n-1] chunks[n]`."""

    chunks: tuple[bytes, ...]
    slots: tuple[str, ...]  # placeholder names, one per slot
    # Derived: the chunks as one bytes %-format (a single C-level join per render), the
    # distinct names, and which of them fills each slot (None: each once, in slot order).
    _format: bytes = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _picks: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.chunks) != len(self.slots) + 1:
            raise ValueError(
                f"{len(self.slots)} slots need {len(self.slots) + 1} chunks, got {len(self.chunks)}"
            )
        names = tuple(dict.fromkeys(self.slots))
        picks = None if names == self.slots else tuple(names.index(n) for n in self.slots)
        object.__setattr__(
            self, "_format", b"%s".join(chunk.replace(b"%", b"%%") for chunk in self.chunks)
        )
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_picks", picks)

    @classmethod
    def compile(cls, payload: bytes, entry_id: str) -> Template:
        """From a rendered payload whose strings hold placeholders (already checked with
        placeholder_problems; raises ValueError on a bad one)."""
        builder = _Builder(entry_id)
        builder.value(json.loads(payload))
        chunks, slots = builder.done()
        return cls(chunks, slots)

    def render(self, moment: Moment) -> bytes:
        """The payload for `moment`: one text per placeholder used, then one join."""
        texts = [_TEXT[name](moment).encode() for name in self._names]
        if self._picks is not None:
            texts = [texts[index] for index in self._picks]
        return self._format % tuple(texts)
