"""One typed snapshot of the service, as `GET /status` shows it.

`PublisherService.status()` builds a `ServiceStatus` from its own state, the counters
(stats.py) and the connections (connection.py); `to_json()` is the `/status` document, whose
shape the status page (web/page.js), status_query.py and operators' scripts read. Every value is
copied when the snapshot is built: an HTTP thread can hold it while the owners move on.

A paged request (`PublisherService.status_view()`) gets the same snapshot but with
`LiveEntries`: each entry's `EntryStatus` is built when the page reads it, so that a poll of
the status page builds its window of entries, not all 10,000 of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from scheduler_publisher.config.cron import time_zone
from scheduler_publisher.config.loader import ConfigResult, Problem, PublishConfig
from scheduler_publisher.config.shard import Shard
from scheduler_publisher.mqtt.descriptors import DescriptorsView
from scheduler_publisher.stats import EntryStats, Stats


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class StatisticsStatus:
    """Service-wide counters; the totals include what earlier runs left in the state DB."""

    total_published: int
    total_errors: int
    total_dropped: int
    reconnects: int
    uptime_seconds: float
    lifetime_uptime_seconds: float
    published_this_run: int
    reloads: int
    config_errors: int
    checkpoint_failures: int = 0
    checkpoint_error: str | None = None  # why the latest state checkpoint failed; None: saved

    @classmethod
    def of(cls, stats: Stats) -> StatisticsStatus:
        t = stats.totals()
        return cls(
            total_published=t.published,
            total_errors=t.errors,
            total_dropped=t.dropped,
            reconnects=t.reconnects,
            uptime_seconds=round(stats.uptime(), 3),
            lifetime_uptime_seconds=round(t.uptime_seconds, 3),
            published_this_run=stats.published,
            reloads=stats.reloads,
            config_errors=stats.config_errors,
            checkpoint_failures=stats.checkpoint_failures,
            checkpoint_error=stats.checkpoint_error,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "total_published": self.total_published,
            "total_errors": self.total_errors,
            "total_dropped": self.total_dropped,
            "reconnects": self.reconnects,
            "uptime_seconds": self.uptime_seconds,
            "lifetime_uptime_seconds": self.lifetime_uptime_seconds,
            "published_this_run": self.published_this_run,
            "reloads": self.reloads,
            "config_errors": self.config_errors,
            "checkpoint_failures": self.checkpoint_failures,
            "checkpoint_error": self.checkpoint_error,
        }


@dataclass(frozen=True, slots=True)
class UnconnectedStatus:
    """Entries that have no connection up: those on the main connection while it is down,
    and the lwt entries whose own connection is down (a sample of them by id, with why)."""

    count: int
    main_connection_down: bool
    lwt_entries: Mapping[str, str]
    lwt_entries_total: int

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "main_connection_down": self.main_connection_down,
            "lwt_entries": dict(self.lwt_entries),
            "lwt_entries_total": self.lwt_entries_total,
        }


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """The MQTT connections: the main one and one per lwt entry."""

    connected: bool  # the main connection is up
    connections: int
    connections_up: int
    broker: str  # the URL of the broker in use
    protocol: str
    client_id: str
    last_error: str | None  # of the main connection
    client_id_conflict: str | None
    entries_without_connection: UnconnectedStatus
    quarantined_entries: Mapping[str, str]  # entry id -> why it is held back
    brokers: tuple[str, ...] = ()  # --broker's list, in failover order

    @classmethod
    def of(cls, view: Mapping[str, Any]) -> ConnectionStatus:
        """From MQTTConnectionManager.status(), the one place that reads it."""
        unconnected = view["entries_without_connection"]
        return cls(
            connected=bool(view["connected"]),
            connections=view["connections"],
            connections_up=view["connections_up"],
            broker=view["broker"],
            brokers=tuple(view.get("brokers", (view["broker"],))),
            protocol=str(view["protocol"]),
            client_id=view["client_id"],
            last_error=view["last_error"],
            client_id_conflict=view["client_id_conflict"],
            entries_without_connection=UnconnectedStatus(
                count=unconnected["count"],
                main_connection_down=unconnected["main_connection_down"],
                lwt_entries=_frozen(unconnected["lwt_entries"]),
                lwt_entries_total=unconnected["lwt_entries_total"],
            ),
            quarantined_entries=_frozen(view["quarantined_entries"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "connections": self.connections,
            "connections_up": self.connections_up,
            "broker": self.broker,
            "brokers": list(self.brokers or (self.broker,)),
            "protocol": self.protocol,
            "client_id": self.client_id,
            "last_error": self.last_error,
            "client_id_conflict": self.client_id_conflict,
            "entries_without_connection": self.entries_without_connection.to_json(),
            "quarantined_entries": dict(self.quarantined_entries),
        }


@dataclass(frozen=True, slots=True)
class DescriptorStatus:
    """The open files limit, the descriptors kept free for HTTP, the entries file, the state
    database and the log file, and the lwt connections waiting for a descriptor."""

    limit: int | None  # the soft RLIMIT_NOFILE; None: unlimited
    reserve: int
    links_waiting: int

    @classmethod
    def of(cls, view: DescriptorsView) -> DescriptorStatus:
        return cls(view.limit, view.reserve, view.links_waiting)

    def to_json(self) -> dict[str, Any]:
        return {"limit": self.limit, "reserve": self.reserve, "links_waiting": self.links_waiting}


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """What GET /health says: liveness problems (503) and warnings that are not."""

    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": list(self.problems), "warnings": list(self.warnings)}


# At most this many entry errors and skipped or held-back entries are listed in /status (the
# totals count them all): a file of 10,000 broken entries must not make every poll huge.
MAX_LISTED = 100


@dataclass(frozen=True, slots=True)
class EntryError:
    """One entry error of the version in force, located: entry position and id, field, line."""

    position: int | None
    entry_id: str | None
    field: str | None
    line: int | None
    column: int | None
    message: str  # the whole one-line message, place included

    @classmethod
    def of(cls, problem: Problem) -> EntryError:
        return cls(
            problem.position,
            problem.entry_id,
            problem.field,
            problem.line,
            problem.column,
            str(problem),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": self.position,
            "id": self.entry_id,
            "field": self.field,
            "line": self.line,
            "column": self.column,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class EntryErrors:
    """What of the version in force does not run as written: its entry errors, the invalid
    entries that are not running at all (skipped), and those whose last good version runs
    on (held back). Built at each apply, read by HTTP threads (replaced whole)."""

    errors: tuple[EntryError, ...] = ()
    skipped: tuple[tuple[int | None, str | None], ...] = ()  # (position, id) of each
    held_back: tuple[str, ...] = ()  # ids

    @classmethod
    def of(cls, result: ConfigResult, held_back: Iterable[str]) -> EntryErrors:
        kept = tuple(held_back)
        errors = result.errors
        skipped: dict[int | None, str | None] = {}
        for problem in errors:
            if problem.entry_id not in kept:
                skipped.setdefault(problem.position, problem.entry_id)
        return cls(tuple(EntryError.of(p) for p in errors), tuple(skipped.items()), kept)

    def summary(self) -> str | None:
        """One line for /health's warnings; None when every entry runs as written."""
        if not self.errors:
            return None
        more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        return (
            f"entries file: {len(self.skipped)} invalid entries skipped, {len(self.held_back)} "
            f"held back at their last good version: {self.errors[0].message}{more}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "errors": [e.to_json() for e in self.errors[:MAX_LISTED]],
            "errors_total": len(self.errors),
            "skipped_entries": [
                {"entry": position, "id": entry_id}
                for position, entry_id in self.skipped[:MAX_LISTED]
            ],
            "skipped_total": len(self.skipped),
            "held_back_entries": list(self.held_back[:MAX_LISTED]),
            "held_back_total": len(self.held_back),
        }


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    """The config file and the version in force."""

    path: str
    digest: str | None
    last_reload_at: float | None  # unix time of the last apply (start or reload)
    last_error: str | None  # why the file on disk cannot be used, while it cannot
    watcher: str  # "inotify", "polling", ... or "none"
    entry_errors: EntryErrors = EntryErrors()

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "digest": self.digest,
            "last_reload_at": self.last_reload_at,
            "last_error": self.last_error,
            "watcher": self.watcher,
            **self.entry_errors.to_json(),
        }


@dataclass(frozen=True, slots=True)
class EntryCountersStatus:
    """One entry's counters (stats.EntryStats), frozen."""

    published: int
    errors: int
    dropped: int
    deferred: int
    missed: int
    last_published_at: float | None
    last_error: str | None
    ticks: int
    lateness_mean_ms: float
    lateness_max_ms: float

    @classmethod
    def of(cls, e: EntryStats) -> EntryCountersStatus:
        # Positional: /status builds one per entry (100,000 at the most), and keywords cost.
        mean = e.lateness_total / e.ticks if e.ticks else 0.0
        return cls(
            e.published,
            e.errors,
            e.dropped,
            e.deferred,
            e.missed,
            e.last_published_at,
            e.last_error,
            e.ticks,
            milliseconds(mean),
            milliseconds(e.lateness_max),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "errors": self.errors,
            "dropped": self.dropped,
            "deferred": self.deferred,
            "missed": self.missed,
            "last_published_at": self.last_published_at,
            "last_error": self.last_error,
            "lateness": {
                "count": self.ticks,
                "mean_ms": self.lateness_mean_ms,
                "max_ms": self.lateness_max_ms,
            },
        }


def milliseconds(seconds: float) -> float:
    """A lateness as /status shows it (and sorts it: LiveEntries reads it the same way)."""
    return round(seconds * 1000, 3)


@dataclass(frozen=True, slots=True)
class EntryStatus:
    """One running entry: its settings, its next slot, and its counters once it has any."""

    topic: str
    interval: float | None  # None for a cron entry
    qos: int
    retain: bool
    lwt: bool
    quarantined: str | None
    next_run_at: datetime | None
    counters: EntryCountersStatus | None  # None until the network thread has learnt it
    cron: str | None = None
    timezone: str | None = None  # a cron entry's

    @classmethod
    def of(
        cls,
        entry: PublishConfig,
        *,
        quarantined: str | None,
        next_run_at: datetime | None,
        stats: EntryStats | None,
    ) -> EntryStatus:
        if entry.cron is not None and next_run_at is not None:
            next_run_at = next_run_at.astimezone(time_zone(entry.timezone))  # as people read it
        return cls(
            entry.topic,
            entry.interval,
            entry.qos,
            entry.retain,
            entry.lwt,
            quarantined,
            next_run_at,
            None if stats is None else EntryCountersStatus.of(stats),
            entry.cron,
            entry.schedule_timezone,
        )

    def to_json(self) -> dict[str, Any]:
        body = {
            "topic": self.topic,
            "interval": self.interval,
            "qos": self.qos,
            "retain": self.retain,
            "lwt": self.lwt,
            "quarantined": self.quarantined,
            "next_run_at": self.next_run_at.isoformat() if self.next_run_at else None,
        }
        if self.cron is not None:  # only then: an interval entry's document stays as it was
            body["cron"] = self.cron
            body["timezone"] = self.timezone
        if self.counters is not None:
            body.update(self.counters.to_json())
        return body


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """The whole service at one moment: what GET /status serves."""

    statistics: StatisticsStatus
    connection: ConnectionStatus
    health: HealthStatus
    config: ConfigStatus
    entries: Mapping[str, EntryStatus]  # by entry id
    shard: Shard | None = None  # --shard: this process runs only this shard's entries
    descriptors: DescriptorStatus | None = None  # None: not known (no network loop)

    @property
    def active_configs(self) -> int:
        return len(self.entries)

    @property
    def connected(self) -> bool:
        return self.connection.connected

    def to_json(self, only: Iterable[str] | None = None) -> dict[str, Any]:
        """The `/status` document (its shape is public: keep it backward compatible); with
        `only`, just those entries (a page, status_query.py), in that order."""
        ids = self.entries if only is None else only
        body: dict[str, Any] = {
            "active_configs": self.active_configs,
            "connected": self.connected,
            "statistics": self.statistics.to_json(),
            "connection": self.connection.to_json(),
            "health": self.health.to_json(),
            "config": self.config.to_json(),
        }
        if self.shard is not None:  # only when sharded: an unsharded document stays as it was
            body["shard"] = shard_json(self.shard)
        if self.descriptors is not None:
            body["descriptors"] = self.descriptors.to_json()
        body["entries"] = {i: self.entries[i].to_json() for i in ids}
        return body


def shard_json(shard: Shard) -> dict[str, Any]:
    """`{"k": 1, "n": 2, "name": "1-of-2"}`: which shard of how many this process is."""
    return {"k": shard.k, "n": shard.n, "name": shard.name}


@dataclass(frozen=True, slots=True)
class EntryIndex:
    """One version of the running entries, their ids in id order and the case-folded id and
    topic the filter reads. The entries are swapped whole at each apply, so this is built
    once per version (IndexCache), not sorted again at every request."""

    configs: Mapping[str, PublishConfig]
    ids: tuple[str, ...]  # sorted
    folded: tuple[tuple[str, str], ...]  # (id, topic) case folded, in the order of `ids`

    @classmethod
    def of(cls, configs: Mapping[str, PublishConfig]) -> EntryIndex:
        ids = tuple(sorted(configs))
        folded = tuple((i.casefold(), configs[i].topic.casefold()) for i in ids)
        return cls(configs, ids, folded)

    def matching(self, q: str) -> Sequence[str]:
        """The ids whose id or topic contains `q` (already case folded), in id order."""
        if not q:
            return self.ids
        return [i for i, (fi, ft) in zip(self.ids, self.folded, strict=True) if q in fi or q in ft]


class IndexCache:
    """The EntryIndex of the latest version of the entries asked for. Any thread: two HTTP
    threads that find it stale both build one, and the reference swap keeps either."""

    def __init__(self) -> None:
        self._last: EntryIndex | None = None

    def of(self, configs: Mapping[str, PublishConfig]) -> EntryIndex:
        last = self._last
        if last is None or last.configs is not configs:
            last = self._last = EntryIndex.of(configs)
        return last


# Sort key -> how to read it from a running entry's settings, counters (None before it has
# any) or next run, without building its EntryStatus: the values EntryStatus carries
# (status_query.SORT_KEYS reads the same keys from a built snapshot; a test compares them).
CONFIG_KEYS: dict[str, Callable[[PublishConfig], Any]] = {
    "topic": lambda c: c.topic,
    "interval": lambda c: c.interval,
    "qos": lambda c: c.qos,
    "retain": lambda c: c.retain,
    "lwt": lambda c: c.lwt,
}
COUNTER_KEYS: dict[str, Callable[[EntryStats], Any]] = {
    "last_published_at": lambda e: e.last_published_at,
    "published": lambda e: e.published,
    "errors": lambda e: e.errors,
    "dropped": lambda e: e.dropped,
    "missed": lambda e: e.missed,
    "max_lateness_ms": lambda e: milliseconds(e.lateness_max),
}


@dataclass(frozen=True, slots=True)
class LiveEntries(Mapping[str, EntryStatus]):
    """The running entries of a snapshot, each EntryStatus built when it is read (`build`):
    one page of /status builds only its own entries. In the entries' own order, as the whole
    snapshot lists them; `matching()` gives the ids in id order (kept, not sorted per request),
    `key()` a sort key (status_query.EntryKeys)."""

    index: EntryIndex
    build: Callable[[PublishConfig], EntryStatus]
    counters: Mapping[str, EntryStats]  # Stats.entries: read, never changed, here
    next_runs: Callable[[], Mapping[str, datetime | None]]  # every job's next run, at once

    def __getitem__(self, entry_id: str) -> EntryStatus:
        return self.build(self.index.configs[entry_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self.index.configs)

    def __len__(self) -> int:
        return len(self.index.configs)

    def __contains__(self, entry_id: object) -> bool:  # Mapping's own would build the entry
        return entry_id in self.index.configs

    def matching(self, q: str) -> Sequence[str]:
        """The ids whose id or topic contains `q` (case folded), in id order."""
        return self.index.matching(q)

    def key(self, sort: str) -> Callable[[str], Any]:
        """Reads the sort key `sort` of an entry by id (None: it has none yet, sorted last)."""
        if sort == "id":
            return lambda i: i
        if sort in CONFIG_KEYS:
            configs, read_config = self.index.configs, CONFIG_KEYS[sort]
            return lambda i: read_config(configs[i])
        if sort == "next_run_at":
            return self.next_runs().get  # one pass over the jobs, not one lookup per entry
        counters, read = self.counters, COUNTER_KEYS[sort]
        return lambda i: None if (e := counters.get(i)) is None else read(e)
