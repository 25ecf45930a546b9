"""Counters, per entry and in total: for get_status(), /metrics, the stats log and the state DB.

Threads: each counter has exactly one writer.
- The network thread owns `entries` (which entries have counters, and every per-entry counter)
  and the publish totals and lateness histogram. It adds an entry's counters when it learns the
  entry (`add_entry`) and removes them when the entry goes (`remove_entry`), in the same turn
  as it updates its own view of the entries. A late acknowledgement for an entry removed since
  finds no counters and adds none: `record_*` never create an entry (issue 11 #3). The
  scheduler hands a tick's lateness to the network thread with the tick itself.
- The main loop writes reloads and config errors, and `restore()` runs before the network
  thread starts.
Readers (HTTP, main loop) see values that are at most one update old, which is all a counter
needs; no lock sits on the publish path.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Any

from scheduler_publisher.statestore import EntryCounters, SavedState, Totals

# Upper bounds (seconds) of the lateness histogram, also used by /metrics.
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass(slots=True)
class EntryStats:
    published: int = 0
    errors: int = 0
    dropped: int = 0  # QoS 0 ticks while the connection was down or stalled
    deferred: int = 0  # QoS 1/2 ticks while down or stalled; the newest goes out on reconnect
    missed: int = 0  # grid slots the scheduler skipped (coalesced after a stall)
    last_published_at: float | None = None  # unix time
    last_error: str | None = None
    # How late the ticks ran against their grid slots. Flat fields rather than an object of
    # their own, which would cost ~60 B more per entry (600 KB at 10,000 entries).
    ticks: int = 0
    lateness_total: float = 0.0
    lateness_max: float = 0.0
    seq: int = 0  # the last {{seq}} rendered; kept in the state DB

    def as_dict(self) -> dict[str, Any]:
        mean = self.lateness_total / self.ticks if self.ticks else 0.0
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
                "mean_ms": round(mean * 1000, 3),
                "max_ms": round(self.lateness_max * 1000, 3),
            },
        }


class Stats:
    def __init__(self, *, wall: Any = time.time, monotonic: Any = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self.started = monotonic()
        self.entries: dict[str, EntryStats] = {}
        self._restored: dict[str, EntryCounters] = {}  # saved counters of entries not yet added
        self.published = 0
        self.errors = 0
        self.dropped = 0
        self.deferred = 0
        self.missed = 0
        self.reconnects = 0
        self.reloads = 0
        self.config_errors = 0
        # Main loop: state checkpoints that failed, and why the latest one did (None: it
        # worked). Read by /health, /status and /metrics.
        self.checkpoint_failures = 0
        self.checkpoint_error: str | None = None
        self.base = Totals()  # what earlier runs left in the state DB
        # One service-wide histogram: per-entry buckets would cost memory for every entry and
        # give Prometheus a series per entry and bucket (120,000 at 10,000 entries).
        self.lateness_buckets = [0] * (len(LATENESS_BUCKETS) + 1)
        self.lateness_total = 0.0

    def entry(self, entry_id: str) -> EntryStats:
        """The entry's counters, for readers; an unknown entry reads as zeros (and is not
        added: only the network thread adds entries)."""
        return self.entries.get(entry_id) or EntryStats()

    # network thread
    def add_entry(self, entry_id: str) -> None:
        if entry_id in self.entries:
            return
        e = self.entries[entry_id] = EntryStats()
        saved = self._restored.pop(entry_id, None)
        if saved is not None:
            e.published, e.errors, e.dropped = saved.published, saved.errors, saved.dropped
            e.last_published_at = saved.last_published_at
            e.seq = saved.seq

    def remove_entry(self, entry_id: str) -> None:
        self.entries.pop(entry_id, None)

    def next_seq(self, entry_id: str) -> int:
        """The entry's next {{seq}} (from 1), counted as used; 1 for an entry without counters."""
        e = self.entries.get(entry_id)
        if e is None:
            return 1
        e.seq += 1
        return e.seq

    def record_published(self, entry_id: str) -> None:
        self.published += 1
        e = self.entries.get(entry_id)
        if e is not None:
            e.published += 1
            e.last_published_at = self._wall()

    def record_written(self, entry_ids: list[str]) -> None:
        """`record_published` for each of `entry_ids`, written to the socket in one `send()`:
        one moment for the lot."""
        now = self._wall()
        self.published += len(entry_ids)
        entries = self.entries
        for entry_id in entry_ids:
            e = entries.get(entry_id)
            if e is not None:
                e.published += 1
                e.last_published_at = now

    def record_error(self, entry_id: str | None, reason: str) -> None:
        self.errors += 1
        e = None if entry_id is None else self.entries.get(entry_id)
        if e is not None:
            e.errors += 1
            e.last_error = reason

    def record_dropped(self, entry_id: str) -> None:
        self.dropped += 1
        e = self.entries.get(entry_id)
        if e is not None:
            e.dropped += 1

    def record_deferred(self, entry_id: str) -> None:
        e = self.entries.get(entry_id)
        if e is not None:
            e.deferred += 1
        self.deferred += 1

    def record_missed(self, entry_id: str) -> None:
        """A cron slot that could not be sent (not connected, held back)."""
        self.missed += 1
        e = self.entries.get(entry_id)
        if e is not None:
            e.missed += 1

    def record_reconnect(self) -> None:
        self.reconnects += 1

    def record_tick(self, entry_id: str, lateness: float, missed: int) -> None:
        late = max(0.0, lateness)
        self.missed += missed
        self.lateness_buckets[bisect.bisect_left(LATENESS_BUCKETS, late)] += 1
        self.lateness_total += late
        e = self.entries.get(entry_id)
        if e is not None:
            e.ticks += 1
            e.lateness_total += late
            e.lateness_max = max(e.lateness_max, late)
            e.missed += missed

    # main loop, before the network thread starts
    def restore(self, saved: SavedState) -> None:
        """Counters of an earlier run; an entry's are taken over when the entry is added, and
        those of entries no longer configured are dropped with the next checkpoint."""
        self.base = saved.totals
        self._restored = dict(saved.entries)

    def uptime(self) -> float:
        return float(self._monotonic() - self.started)

    def totals(self) -> Totals:
        return Totals(
            published=self.base.published + self.published,
            errors=self.base.errors + self.errors,
            dropped=self.base.dropped + self.dropped,
            reconnects=self.base.reconnects + self.reconnects,
            uptime_seconds=self.base.uptime_seconds + self.uptime(),
        )

    def saved_state(self) -> SavedState:
        entries = {
            entry_id: EntryCounters(e.published, e.errors, e.dropped, e.last_published_at, e.seq)
            for entry_id, e in list(self.entries.items())
        }
        return SavedState(self.totals(), entries)

    def summary(self) -> dict[str, Any]:
        t = self.totals()
        return {
            "total_published": t.published,
            "total_errors": t.errors,
            "total_dropped": t.dropped,
            "reconnects": t.reconnects,
            "uptime_seconds": round(self.uptime(), 3),
            "lifetime_uptime_seconds": round(t.uptime_seconds, 3),
            "published_this_run": self.published,
            "reloads": self.reloads,
            "config_errors": self.config_errors,
            "checkpoint_failures": self.checkpoint_failures,
            "checkpoint_error": self.checkpoint_error,
        }
