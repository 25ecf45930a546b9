"""Paging, filtering and sorting of the `/status` snapshot: pure functions, no HTTP.

`GET /status` without parameters answers the whole snapshot as it always has. With any of
`offset`, `limit`, `q`, `sort` or `order`, `entries` holds one page of entries, and `page` says
which ones, in which order (JSON object keys that look like integers lose their order in
JavaScript, so the order travels as a list). The status page asks for one page at each poll,
so 10,000 entries never cross the wire every few seconds; and from the service's LiveEntries,
only the page's entries are built: the filter and the sort read one cheap key per entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qs

from scheduler_publisher.ops.status import LiveEntries

if TYPE_CHECKING:
    from scheduler_publisher.ops.status import EntryCountersStatus, EntryStatus, ServiceStatus

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
MAX_OFFSET = 1_000_000_000
MAX_SHOWN = 40  # characters of a bad value quoted back: a query string can be 64 KB
MAX_FILTER = 200  # characters of `q`

Order = Literal["asc", "desc"]


def _counter(read: Callable[[EntryCountersStatus], Any]) -> Callable[[str, EntryStatus], Any]:
    """A sort key read from the entry's counters; None (sorted last) before it has any."""
    return lambda _i, e: None if e.counters is None else read(e.counters)


# Sort key -> how to read it from one entry of the snapshot (the id is the mapping's key).
SORT_KEYS: dict[str, Callable[[str, EntryStatus], Any]] = {
    "id": lambda i, _e: i,
    "topic": lambda _i, e: e.topic,
    "interval": lambda _i, e: e.interval,
    "qos": lambda _i, e: e.qos,
    "retain": lambda _i, e: e.retain,
    "lwt": lambda _i, e: e.lwt,
    "next_run_at": lambda _i, e: e.next_run_at,
    "last_published_at": _counter(lambda c: c.last_published_at),
    "published": _counter(lambda c: c.published),
    "errors": _counter(lambda c: c.errors),
    "dropped": _counter(lambda c: c.dropped),
    "missed": _counter(lambda c: c.missed),
    "max_lateness_ms": _counter(lambda c: c.lateness_max_ms),
}
PARAMETERS = ("offset", "limit", "q", "sort", "order")


class QueryError(ValueError):
    """One bad query parameter: which, what came, what was expected."""

    def __init__(self, parameter: str, received: str, expected: str) -> None:
        if len(received) > MAX_SHOWN:
            received = received[:MAX_SHOWN] + "…"
        if len(parameter) > MAX_SHOWN:
            parameter = parameter[:MAX_SHOWN] + "…"
        super().__init__(f"{parameter}: expected {expected}, got {received!r}")
        self.parameter = parameter
        self.received = received
        self.expected = expected

    def as_dict(self) -> dict[str, str]:
        return {
            "error": str(self),
            "parameter": self.parameter,
            "received": self.received,
            "expected": self.expected,
        }


@dataclass(frozen=True)
class StatusQuery:
    offset: int = 0
    limit: int = DEFAULT_LIMIT
    q: str = ""
    sort: str = "id"
    order: Order = "asc"


def parse_query(query: str) -> StatusQuery | None:
    """None for an empty query string (the whole snapshot); raises QueryError otherwise."""
    if not query:
        return None
    values = _single_values(parse_qs(query, keep_blank_values=True))
    return StatusQuery(
        offset=_integer(values, "offset", 0, 0, MAX_OFFSET),
        limit=_integer(values, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        q=_filter(values.get("q", "")),
        sort=_choice(values, "sort", "id", tuple(SORT_KEYS)),
        order="desc" if _choice(values, "order", "asc", ("asc", "desc")) == "desc" else "asc",
    )


def _single_values(parsed: dict[str, list[str]]) -> dict[str, str]:
    for name, values in parsed.items():
        if name not in PARAMETERS:
            raise QueryError(name, name, f"one of the parameters {', '.join(PARAMETERS)}")
        if len(values) > 1:
            raise QueryError(name, ", ".join(values), "the parameter at most once")
    return {name: values[0] for name, values in parsed.items()}


def _integer(values: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = values.get(name)
    if text is None:
        return default
    # ASCII digits only: int() also takes "1_0", " 1", "+1" and other scripts' digits, and
    # raises past 4,300 digits; so the length is checked before int() sees the text.
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(high)):
        raise QueryError(name, text, f"an integer from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise QueryError(name, text, f"an integer from {low} to {high}")
    return number


def _filter(text: str) -> str:
    if len(text) > MAX_FILTER:
        raise QueryError("q", text, f"at most {MAX_FILTER} characters")
    return text.strip().casefold()


def _choice(values: dict[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    text = values.get(name, default)
    if text not in choices:
        raise QueryError(name, text, f"one of {', '.join(choices)}")
    return text


class EntryKeys(Protocol):
    """What a page is chosen by: the ids in id order (filtered) and one sort key per entry."""

    def matching(self, q: str) -> Sequence[str]: ...

    def key(self, sort: str) -> Callable[[str], Any]: ...


@dataclass(frozen=True)
class BuiltKeys:
    """EntryKeys of a snapshot whose entries are all built already (a plain mapping)."""

    entries: Mapping[str, EntryStatus]

    def matching(self, q: str) -> Sequence[str]:
        return sorted(i for i, e in self.entries.items() if _matches(i, e, q))

    def key(self, sort: str) -> Callable[[str], Any]:
        entries, read = self.entries, SORT_KEYS[sort]
        return lambda i: read(i, entries[i])


def select(status: ServiceStatus, query: StatusQuery) -> dict[str, Any]:
    """The snapshot's document with one page of entries: those whose id or topic contains `q`
    (case folded), sorted by `sort` (entries without the value last, ties by id), then sliced.
    Only the page's entries are rendered (and, from LiveEntries, built)."""
    entries = status.entries
    keys: EntryKeys = entries if isinstance(entries, LiveEntries) else BuiltKeys(entries)
    matched = keys.matching(query.q)
    ordered = _sorted(matched, keys, query)
    page = list(ordered[query.offset : query.offset + query.limit])
    return {
        **status.to_json(only=page),
        "page": {
            "offset": query.offset,
            "limit": query.limit,
            "q": query.q,
            "sort": query.sort,
            "order": query.order,
            "total": len(entries),
            "matched": len(matched),
            "ids": page,
        },
    }


def _matches(entry_id: str, entry: EntryStatus, q: str) -> bool:
    return not q or q in entry_id.casefold() or q in entry.topic.casefold()


def _sorted(by_id: Sequence[str], keys: EntryKeys, query: StatusQuery) -> Sequence[str]:
    """`by_id` (in id order, the tie-break) sorted by the query's key."""
    descending = query.order == "desc"
    if query.sort == "id":  # already in order: the common case (the page's default) costs nothing
        return by_id[::-1] if descending else by_id
    read = keys.key(query.sort)
    values = {i: read(i) for i in by_id}  # one read per entry, not one per comparison
    present = [i for i in by_id if values[i] is not None]
    missing = [i for i in by_id if values[i] is None]
    # Stable sorts (reverse included) keep the id order among ties.
    present.sort(key=values.__getitem__, reverse=descending)
    return present + missing
