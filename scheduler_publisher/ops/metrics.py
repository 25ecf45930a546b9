"""The Prometheus view of the service: what /metrics exposes, built at scrape time.

Series are bounded: the service-wide figures are a fixed set whatever the number of entries,
and the per-entry ones (six per entry) are exposed only while `--metrics-per-entry` allows
it (`auto`: up to `--metrics-entry-limit` entries). docs/metrics.md lists every metric.

Threads: `collect` runs on an HTTP request thread. It only reads the service's counters and
the current entries mapping, which the main loop replaces whole and never changes in place.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, RestrictedRegistry

from scheduler_publisher.config.cron_slots import CronSlots, cron_slots
from scheduler_publisher.logs.setup import get_logger
from scheduler_publisher.settings import MetricsPerEntry
from scheduler_publisher.stats import LATENESS_BUCKETS, EntryStats, Stats

if TYPE_CHECKING:
    from scheduler_publisher.config.loader import PublishConfig
    from scheduler_publisher.config.shard import Shard
    from scheduler_publisher.mqtt.descriptors import DescriptorsView

log = get_logger("scheduler_publisher.metrics")

PREFIX = "scheduler_publisher"
# An entry is overdue once it has missed a whole slot, with some slack for short intervals:
# 2 intervals, but at least one interval plus OVERDUE_SLACK seconds.
OVERDUE_SLACK = 10.0

_PER_ENTRY_COUNTERS = (
    ("published", "Messages published by the entry"),
    ("errors", "Publish errors of the entry"),
    ("dropped", "QoS 0 ticks of the entry dropped while offline"),
    ("deferred", "QoS 1/2 ticks of the entry superseded while offline"),
    ("missed", "Grid slots of the entry skipped after a stall"),
)


class ConnectionCounts(Protocol):
    def connection_counts(self) -> tuple[int, int]: ...

    def quarantined_count(self) -> int: ...

    def broker_urls(self) -> tuple[str, tuple[str, ...]]: ...


class MetricsSource(Protocol):
    """What the collector reads; PublisherService provides it."""

    @property
    def stats(self) -> Stats: ...

    @property
    def entries(self) -> Mapping[str, PublishConfig]: ...

    @property
    def last_applied_at(self) -> float | None: ...

    @property
    def connection(self) -> ConnectionCounts: ...

    @property
    def shard(self) -> Shard | None: ...

    @property
    def descriptors(self) -> DescriptorsView: ...

    def is_connected(self) -> bool: ...

    def health_problems(self) -> list[str]: ...


def per_entry_series(mode: MetricsPerEntry, limit: int, entries: int) -> bool:
    """Whether /metrics carries per-entry series for this many entries."""
    return mode == "on" or (mode == "auto" and entries <= limit)


def _since(last_published_at: float | None, applied_at: float | None) -> float | None:
    return max((t for t in (last_published_at, applied_at) if t is not None), default=None)


def overdue(
    interval: float, last_published_at: float | None, applied_at: float | None, now: float
) -> bool:
    """True when an entry has gone a whole slot (and some slack) without a publish.

    The clock starts at the later of its last publish and the last apply of the entries (a
    reload, or the start): an entry that was just added or edited is not yet overdue.
    """
    since = _since(last_published_at, applied_at)
    if since is None:
        return False
    return now - since > max(2 * interval, interval + OVERDUE_SLACK)


def cron_overdue(
    slots: CronSlots,
    period: float,
    last_published_at: float | None,
    applied_at: float | None,
    now: float,
) -> bool:
    """overdue() against a cron entry's own slots: the second slot after the clock started
    has passed, and the first one more than OVERDUE_SLACK ago (for an interval that is
    exactly overdue()'s rule). `period` is the shortest gap between slots: an entry heard
    from within it cannot be overdue, which spares most entries the trigger's arithmetic."""
    since = _since(last_published_at, applied_at)
    if since is None or now - since <= max(period, OVERDUE_SLACK):
        return False
    first = slots.slot_after(datetime.fromtimestamp(since, UTC))
    second = None if first is None else slots.slot_after(first)
    if first is None or second is None:
        return False  # the expression has no more slots
    return now > max(second.timestamp(), first.timestamp() + OVERDUE_SLACK)


def entry_overdue(
    config: PublishConfig, last_published_at: float | None, applied_at: float | None, now: float
) -> bool:
    """overdue() or cron_overdue(), whichever schedules the entry."""
    if config.cron is not None:
        return cron_overdue(
            cron_slots(config.cron, config.timezone),
            config.period,
            last_published_at,
            applied_at,
            now,
        )
    return overdue(config.period, last_published_at, applied_at, now)


class PerEntrySwitch:
    """Decides per scrape whether per-entry series are exposed; logs one line when `auto`
    turns them off (the entries outgrew the limit) and one when it turns them back on."""

    def __init__(self, mode: MetricsPerEntry, limit: int) -> None:
        self.mode = mode
        self.limit = limit
        self._on: bool | None = None
        self._lock = threading.Lock()  # concurrent scrapes must log a change once

    def update(self, entries: int) -> bool:
        on = per_entry_series(self.mode, self.limit, entries)
        with self._lock:
            previous, self._on = self._on, on
        if self.mode != "auto" or on == previous or (previous is None and on):
            return on  # only auto switches; say nothing while series are simply on
        if on:
            log.info("metrics_per_entry_enabled", entries=entries, limit=self.limit)
        else:
            log.info(
                "metrics_per_entry_disabled",
                entries=entries,
                limit=self.limit,
                hint="only service-wide metrics are exposed; per-entry figures are in "
                "/status, or raise --metrics-entry-limit",
            )
        return on


class ServiceRegistry(CollectorRegistry):
    """A registry whose `?name[]=` answer has the named samples of every collector.

    prometheus_client's own restriction collects only the collectors that described their
    names in advance; none of these does (the service's names depend on the entries and the
    shard, and the standard collectors describe none), so it found nothing and the answer was
    empty. Newer releases have `support_collectors_without_names`; 0.20, the oldest this
    package accepts, does not."""

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        return NamedSamples(names, self)


class NamedSamples(RestrictedRegistry):
    """Every collector's metrics, each cut down to the samples named (the families keep their
    name, help and type, as prometheus_client's own restriction does); a scrape at a time."""

    def __init__(self, names: Iterable[str], registry: CollectorRegistry) -> None:
        self.names = frozenset(names)
        self.source = registry
        super().__init__(self.names, registry)

    def collect(self) -> Iterator[Metric]:
        for metric in self.source.collect():
            samples = [s for s in metric.samples if s.name in self.names]
            if samples:
                kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                kept.samples = samples
                yield kept


def build_registry(source: MetricsSource, switch: PerEntrySwitch) -> CollectorRegistry:
    """The service's own metrics plus the standard process_* and python_* collectors."""
    registry = ServiceRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(ServiceCollector(source, switch))
    return registry


def build_info() -> dict[str, str]:
    from scheduler_publisher import __version__  # noqa: PLC0415 - __init__ sets it after its imports

    def dist(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return {
        "version": __version__,
        "paho_mqtt": dist("paho-mqtt"),
        "apscheduler": dist("APScheduler"),
        "python": platform.python_version(),
    }


class ServiceCollector(Collector):
    """Builds the metrics from the service's counters at scrape time: no second bookkeeping."""

    def __init__(
        self,
        source: MetricsSource,
        switch: PerEntrySwitch,
        *,
        wall: Callable[[], float] | None = None,
    ) -> None:
        self._source = source
        self._switch = switch
        self._build = build_info()
        self._wall = wall or time.time

    def collect(self) -> Iterator[Metric]:
        source = self._source
        entries = source.entries  # one reference: a reload mid-scrape swaps it, never edits it
        stats = source.stats
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "Versions of the service and its libraries (always 1)",
            labels=list(self._build),
        )
        info.add_metric(list(self._build.values()), 1)
        yield info
        if source.shard is not None:
            yield _shard_info(source.shard)
        yield _broker_info(*source.connection.broker_urls())
        yield from self._service_wide(source, stats, entries)
        yield _lateness(stats)
        per_entry = self._switch.update(len(entries))
        yield _gauge("metrics_per_entry", "1 while per-entry series are exposed", per_entry)
        if per_entry:
            yield from _per_entry(stats, list(entries))

    def _service_wide(
        self, source: MetricsSource, stats: Stats, entries: Mapping[str, PublishConfig]
    ) -> Iterator[Metric]:
        totals = stats.totals()
        for name, doc, value in (
            ("published", "Messages published (all entries)", totals.published),
            ("errors", "Publish errors (all entries)", totals.errors),
            ("dropped", "QoS 0 ticks dropped while offline (all entries)", totals.dropped),
            ("deferred", "QoS 1/2 ticks superseded while offline (all entries)", stats.deferred),
            ("missed_ticks", "Grid slots skipped after a stall (all entries)", stats.missed),
            ("reconnects", "MQTT connections lost", totals.reconnects),
            ("reloads", "Config reloads applied", stats.reloads),
            ("config_errors", "Config problems seen", stats.config_errors),
            ("checkpoint_failures", "State checkpoints that failed", stats.checkpoint_failures),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        total, up = source.connection.connection_counts()
        yield _gauge("connections", "MQTT connections", total)
        yield _gauge("connections_up", "MQTT connections up", up)
        yield _gauge(
            "connections_waiting_for_descriptor",
            "lwt connections that wait for a file descriptor (open files limit)",
            source.descriptors.links_waiting,
        )
        yield _gauge("active_configs", "Entries running", len(entries))
        yield _gauge(
            "entries_quarantined",
            "Entries held back because, published alone, they got the connection dropped",
            source.connection.quarantined_count(),
        )
        yield _gauge(
            "entries_overdue",
            "Entries without a publish for a whole slot and more (see /status for which)",
            self._count_overdue(stats, entries),
        )
        yield _gauge(
            "checkpoint_failing",
            "1 while the latest state checkpoint failed (the counters are not being saved)",
            stats.checkpoint_error is not None,
        )
        yield _gauge(
            "ready", "1 while the main MQTT connection is up (GET /ready)", source.is_connected()
        )
        yield _gauge(
            "healthy",
            "1 while every component is alive (GET /health)",
            not source.health_problems(),
        )

    def _count_overdue(self, stats: Stats, entries: Mapping[str, PublishConfig]) -> int:
        now = self._wall()
        applied = self._source.last_applied_at
        counters = stats.entries
        count = 0
        for entry_id, config in entries.items():
            e = counters.get(entry_id)
            count += entry_overdue(config, e.last_published_at if e else None, applied, now)
        return count


def _broker_info(current: str, brokers: tuple[str, ...]) -> GaugeMetricFamily:
    """One series per broker of --broker's list: 1 for the one in use, 0 for the others."""
    info = GaugeMetricFamily(
        f"{PREFIX}_broker_info",
        "The brokers of --broker's list (URL): 1 for the one in use, 0 for the others",
        labels=["url"],
    )
    for url in brokers:
        info.add_metric([url], 1 if url == current else 0)
    return info


def _shard_info(shard: Shard) -> GaugeMetricFamily:
    """Which shard this process is, so a dashboard can tell the shards of one file apart."""
    info = GaugeMetricFamily(
        f"{PREFIX}_shard_info",
        "This process runs shard `shard` of `shards` of the entries file (--shard; always 1)",
        labels=["shard", "shards"],
    )
    info.add_metric([str(shard.k), str(shard.n)], 1)
    return info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _per_entry(stats: Stats, entry_ids: list[str]) -> Iterator[Metric]:
    """Six series per running entry; an entry without counters yet reads as zeros."""
    zero = EntryStats()
    rows = [(i, stats.entries.get(i) or zero) for i in entry_ids]
    for attr, doc in _PER_ENTRY_COUNTERS:
        name = "missed_ticks" if attr == "missed" else attr
        family = CounterMetricFamily(f"{PREFIX}_entry_{name}", doc, labels=["entry"])
        for entry_id, e in rows:
            family.add_metric([entry_id], getattr(e, attr))
        yield family
    late = GaugeMetricFamily(
        f"{PREFIX}_entry_tick_lateness_max_seconds",
        "The latest any tick of the entry ran",
        labels=["entry"],
    )
    for entry_id, e in rows:
        late.add_metric([entry_id], e.lateness_max)
    yield late


def _lateness(stats: Stats) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        f"{PREFIX}_tick_lateness_seconds",
        "How late ticks ran against their grid slot (all entries)",
    )
    running = 0
    buckets = []
    for bound, count in zip(
        (*LATENESS_BUCKETS, float("inf")), list(stats.lateness_buckets), strict=True
    ):
        running += count
        buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
    family.add_metric([], buckets, stats.lateness_total)
    return family
