"""The `/status` query parameters: parsing (bad values named) and the page they select."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler_publisher.config.loader import PublishConfig
from scheduler_publisher.ops.status import (
    ConfigStatus,
    ConnectionStatus,
    EntryCountersStatus,
    EntryIndex,
    EntryStatus,
    HealthStatus,
    IndexCache,
    LiveEntries,
    ServiceStatus,
    StatisticsStatus,
    UnconnectedStatus,
)
from scheduler_publisher.ops.status_query import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    SORT_KEYS,
    QueryError,
    StatusQuery,
    parse_query,
    select,
)
from scheduler_publisher.stats import EntryStats, Stats

# Built once: a fresh Stats' uptime moves, and two snapshots compared must agree on it.
FRESH_STATISTICS = StatisticsStatus.of(Stats())


def status(entries: Mapping[str, EntryStatus]) -> ServiceStatus:
    """A snapshot with these entries; the rest is what a fresh service would show."""
    return ServiceStatus(
        statistics=FRESH_STATISTICS,
        connection=ConnectionStatus(
            connected=True,
            connections=1,
            connections_up=1,
            broker="127.0.0.1:1883",
            protocol="5",
            client_id="sp",
            last_error=None,
            client_id_conflict=None,
            entries_without_connection=UnconnectedStatus(0, False, {}, 0),
            quarantined_entries={},
        ),
        health=HealthStatus((), ()),
        config=ConfigStatus("/c.json", None, None, None, "none"),
        entries=entries,
    )


def stats(topic: str, published: int | None = None, max_ms: float | None = None) -> EntryStatus:
    """An entry of the snapshot; one that never ticked has no counters."""
    counters = (
        None
        if published is None
        else EntryCountersStatus(published, 0, 0, 0, 0, 1.0, None, 1, 0.0, max_ms or 0.0)
    )
    return EntryStatus(topic, 1.0, 0, False, False, None, None, counters)


def test_no_query_means_the_whole_snapshot() -> None:
    """An empty query string selects nothing: /status answers as it always has."""
    assert parse_query("") is None


def test_defaults_fill_what_the_query_leaves_out() -> None:
    """Any one parameter turns paging on; the others take their defaults."""
    assert parse_query("q=Kitchen") == StatusQuery(0, DEFAULT_LIMIT, "kitchen", "id", "asc")
    assert parse_query("offset=100&limit=1000&sort=published&order=desc") == StatusQuery(
        100, MAX_LIMIT, "", "published", "desc"
    )


@pytest.mark.parametrize(
    ("query", "parameter", "received", "expected"),
    [
        ("offset=-1", "offset", "-1", "an integer from 0 to 1000000000"),
        ("offset=ten", "offset", "ten", "an integer from 0 to 1000000000"),
        ("offset=", "offset", "", "an integer from 0 to 1000000000"),
        (
            "offset=%D9%A3",
            "offset",
            "\u0663",
            "an integer from 0 to 1000000000",
        ),  # an Arabic-Indic 3
        ("limit=0", "limit", "0", "an integer from 1 to 1000"),
        ("limit=1001", "limit", "1001", "an integer from 1 to 1000"),
        ("limit=1.5", "limit", "1.5", "an integer from 1 to 1000"),
        ("sort=colour", "sort", "colour", "one of id, topic, interval"),
        ("order=up", "order", "up", "one of asc, desc"),
        ("page=2", "page", "page", "one of the parameters offset, limit, q, sort, order"),
        ("limit=5&limit=6", "limit", "5, 6", "the parameter at most once"),
        ("q=" + "x" * 201, "q", "x" * 40 + "…", "at most 200 characters"),
        # int() would take these, or raise ValueError past 4,300 digits (issue 27 #13)
        ("offset=" + "9" * 5000, "offset", "9" * 40 + "…", "an integer from 0 to 1000000000"),
        ("limit=" + "1" * 5000, "limit", "1" * 40 + "…", "an integer from 1 to 1000"),
        ("offset=1000000001", "offset", "1000000001", "an integer from 0 to 1000000000"),
        ("offset=1_0", "offset", "1_0", "an integer from 0 to 1000000000"),
        ("offset=+1", "offset", " 1", "an integer from 0 to 1000000000"),  # + is a space
        ("offset=%2B1", "offset", "+1", "an integer from 0 to 1000000000"),
        ("limit=%201", "limit", " 1", "an integer from 1 to 1000"),
        ("x" * 5000 + "=1", "x" * 40 + "…", "x" * 40 + "…", "one of the parameters"),
    ],
)
def test_a_bad_parameter_is_named_with_what_came_and_what_is_expected(
    query: str, parameter: str, received: str, expected: str
) -> None:
    """Each bad value raises one error naming the parameter, the value and what would do."""
    with pytest.raises(QueryError) as caught:
        parse_query(query)
    error = caught.value.as_dict()
    assert error["parameter"] == parameter
    assert error["received"] == received
    assert error["expected"].startswith(expected)
    assert error["error"] == f"{parameter}: expected {error['expected']}, got {received!r}"


def test_leading_zeros_do_not_count_against_the_length() -> None:
    """A number is bounded by its value, not its spelling: 0...05 is 5."""
    query = parse_query("offset=" + "0" * 50 + "5&limit=" + "0" * 30 + "1000")
    assert query == StatusQuery(5, MAX_LIMIT)


def test_the_filter_matches_id_or_topic_ignoring_case() -> None:
    """`q` keeps the entries whose id or topic contains it, whatever the case."""
    snapshot = status(
        {"Kitchen": stats("home/a"), "hall": stats("home/KITCHEN/b"), "porch": stats("home/c")}
    )
    page = select(snapshot, StatusQuery(q="kitchen"))
    assert page["page"]["ids"] == ["Kitchen", "hall"]  # code point order, as Python sorts
    assert list(page["entries"]) == ["Kitchen", "hall"]
    assert page["page"]["matched"] == 2
    assert page["page"]["total"] == 3
    assert page["active_configs"] == 3  # the rest of the snapshot is untouched


def test_sorting_puts_missing_values_last_and_breaks_ties_by_id() -> None:
    """Sorted by a counter both ways: entries that never ticked come last, equal ones by id."""
    snapshot = status(
        {"c": stats("t/c", 5), "a": stats("t/a", 5), "new": stats("t/n"), "b": stats("t/b", 9)}
    )
    ascending = select(snapshot, StatusQuery(sort="published"))
    descending = select(snapshot, StatusQuery(sort="published", order="desc"))
    assert ascending["page"]["ids"] == ["a", "c", "b", "new"]
    assert descending["page"]["ids"] == ["b", "a", "c", "new"]
    assert list(descending["entries"]) == descending["page"]["ids"]


def test_sorting_by_max_lateness_reads_the_nested_value() -> None:
    """`max_lateness_ms` sorts by lateness.max_ms."""
    snapshot = status(
        {"a": stats("t/a", 1, 30.0), "b": stats("t/b", 1, 2.5), "c": stats("t/c", 1, 700.0)}
    )
    page = select(snapshot, StatusQuery(sort="max_lateness_ms", order="desc"))
    assert page["page"]["ids"] == ["c", "a", "b"]


def test_offset_and_limit_slice_the_sorted_list() -> None:
    """A page is `limit` entries from `offset`; past the end it is empty, counts still right."""
    snapshot = status({f"e{i:02d}": stats(f"t/{i}") for i in range(30)})
    page = select(snapshot, StatusQuery(offset=25, limit=10))
    assert page["page"]["ids"] == [f"e{i}" for i in range(25, 30)]
    beyond = select(snapshot, StatusQuery(offset=40, limit=10))
    assert beyond["page"]["ids"] == []
    assert beyond["entries"] == {}
    assert beyond["page"]["matched"] == 30


def test_a_page_renders_its_entries_as_the_whole_snapshot_does() -> None:
    """The page's entries carry the same fields as in the whole document, in page order."""
    snapshot = status({"a": stats("t/a", 5, 1.5), "b": stats("t/b")})
    whole = snapshot.to_json()
    page = select(snapshot, StatusQuery(sort="topic", order="desc"))
    assert page["entries"] == {"b": whole["entries"]["b"], "a": whole["entries"]["a"]}
    assert list(page["entries"]) == ["b", "a"]
    assert {k: v for k, v in page.items() if k not in ("entries", "page")} == {
        k: v for k, v in whole.items() if k != "entries"
    }


entry_maps = st.dictionaries(
    st.text(alphabet="abcXYZ01", min_size=1, max_size=4),
    st.builds(
        stats, st.text(alphabet="ab/", min_size=1, max_size=5), st.none() | st.integers(0, 3)
    ),
    max_size=25,
)


@given(
    entries=entry_maps,
    q=st.sampled_from(["", "a", "B", "/"]),
    sort=st.sampled_from(["id", "topic", "published", "max_lateness_ms"]),
    order=st.sampled_from(["asc", "desc"]),
    limit=st.integers(1, 7),
)
def test_pages_cover_every_match_exactly_once(
    entries: dict[str, EntryStatus], q: str, sort: str, order: Any, limit: int
) -> None:
    """Walking the pages visits each matching entry once, in the same order as one big page."""
    snapshot = status(entries)
    query = StatusQuery(limit=MAX_LIMIT, q=q.casefold(), sort=sort, order=order)
    whole = select(snapshot, query)["page"]["ids"]
    walked: list[str] = []
    for offset in range(0, len(entries) + limit, limit):
        walked += select(snapshot, StatusQuery(offset, limit, query.q, sort, order))["page"]["ids"]
    assert walked == whole
    assert len(set(whole)) == len(whole)
    assert all(
        q.casefold() in i.casefold() or q.casefold() in entries[i].topic.casefold() for i in whole
    )


# ---- LiveEntries: a page built from the running entries, not from a built snapshot ---------
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@st.composite
def running_entries(
    draw: st.DrawFn,
) -> tuple[dict[str, PublishConfig], dict[str, EntryStats], dict[str, datetime | None]]:
    """Running entries (interval and cron, varied settings), the counters of those that have
    any, and their next runs (None: not scheduled): with ties, to check the tie-break."""
    ids = draw(st.lists(st.text(alphabet="abcXYZ01", min_size=1, max_size=4), max_size=30))
    configs: dict[str, PublishConfig] = {}
    counters: dict[str, EntryStats] = {}
    runs: dict[str, datetime | None] = {}
    for i in dict.fromkeys(ids):  # unique, in the drawn order (not sorted: the file's order)
        topic = draw(st.text(alphabet="ab/B", min_size=1, max_size=5))
        cron = draw(st.booleans())
        configs[i] = PublishConfig(
            i,
            topic,
            {"v": 1},
            None if cron else draw(st.sampled_from([0.5, 1.0, 60.0])),
            qos=draw(st.sampled_from([0, 1, 2])),
            retain=draw(st.booleans()),
            lwt=draw(st.booleans()),
            cron="*/5 * * * *" if cron else None,
            timezone="Europe/Berlin" if cron else "UTC",
        )
        if draw(st.booleans()):
            counters[i] = EntryStats(
                published=draw(st.integers(0, 3)),
                errors=draw(st.integers(0, 2)),
                dropped=draw(st.integers(0, 2)),
                missed=draw(st.integers(0, 2)),
                last_published_at=draw(st.none() | st.sampled_from([1.0, 2.0])),
                ticks=1,
                lateness_total=0.001,
                lateness_max=draw(st.sampled_from([0.0, 0.0012344, 0.0012341, 0.5])),
            )
        runs[i] = draw(st.none() | st.integers(0, 3).map(lambda s: T0 + timedelta(seconds=s)))
    return configs, counters, runs


class Built:
    """The per-entry builder the service gives LiveEntries, counting its calls."""

    def __init__(self, counters: dict[str, EntryStats], runs: dict[str, datetime | None]):
        self.counters, self.runs, self.calls = counters, runs, 0

    def __call__(self, config: PublishConfig) -> EntryStatus:
        self.calls += 1
        return EntryStatus.of(
            config,
            quarantined=None,
            next_run_at=self.runs.get(config.id),
            stats=self.counters.get(config.id),
        )


# No deadline: a cron entry costs a few ms to build (its period), and a shared machine is slow.
@settings(deadline=None)
@given(
    running=running_entries(),
    q=st.sampled_from(["", "a", "b", "/", "x0"]),
    sort=st.sampled_from(sorted(SORT_KEYS)),
    order=st.sampled_from(["asc", "desc"]),
    offset=st.integers(0, 35),
    limit=st.integers(1, 8),
)
def test_a_page_of_live_entries_is_the_page_of_the_whole_snapshot(
    running: tuple[dict[str, PublishConfig], dict[str, EntryStats], dict[str, datetime | None]],
    q: str,
    sort: str,
    order: Any,
    offset: int,
    limit: int,
) -> None:
    """Filtered, sorted by any key, either order, at any offset (past the end too): the page
    read from the running entries is the one the whole built snapshot gives, and only the
    page's entries are built."""
    configs, counters, runs = running
    build = Built(counters, runs)
    live = LiveEntries(EntryIndex.of(configs), build, counters, lambda: runs)
    whole = {i: Built(counters, runs)(c) for i, c in configs.items()}
    query = StatusQuery(offset, limit, q, sort, order)
    page = select(status(live), query)
    assert page == select(status(whole), query)
    assert build.calls == len(page["page"]["ids"]) <= limit


@settings(deadline=None)  # as above
@given(running=running_entries())
def test_live_entries_render_the_whole_document_as_a_built_snapshot(
    running: tuple[dict[str, PublishConfig], dict[str, EntryStats], dict[str, datetime | None]],
) -> None:
    """Unpaged, LiveEntries lists every entry in the file's order, as the built snapshot does."""
    configs, counters, runs = running
    live = LiveEntries(EntryIndex.of(configs), Built(counters, runs), counters, lambda: runs)
    whole = {i: Built(counters, runs)(c) for i, c in configs.items()}
    assert status(live).to_json() == status(whole).to_json()
    assert list(status(live).to_json()["entries"]) == list(configs)
    assert all(i in live for i in configs)
    assert "missing" not in live


def test_the_id_order_is_kept_per_version_of_the_entries() -> None:
    """The index is sorted once per version of the entries (swapped whole at each apply), and
    a new version gets a new one."""
    first = {i: PublishConfig(i, f"t/{i}", {}, 1.0) for i in ("b", "a", "c")}
    cache = IndexCache()
    index = cache.of(first)
    assert index.ids == ("a", "b", "c")
    assert cache.of(first) is index
    second = {**first, "0": PublishConfig("0", "t/0", {}, 1.0)}
    assert cache.of(second).ids == ("0", "a", "b", "c")
